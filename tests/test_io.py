"""scgpt/io.py: the one home of atomic writes, one-line failures, progress bars and the rank-zero logger."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from scgpt import io
from scgpt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_path_keeps_the_previous_file_when_the_write_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target, durable=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
    with io.atomic_path(target, durable=True) as tmp:
        assert tmp.name.startswith(".last.ckpt.") and tmp.name.endswith(".tmp")  # hidden: finders skip it
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_replace_directory_swaps_a_complete_directory_in(tmp_path):
    old, new = tmp_path / "store", tmp_path / "staging"
    old.mkdir(), new.mkdir()
    (old / "a").write_text("old"), (new / "a").write_text("new")
    io.replace_directory(new, old)
    assert (old / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_fail_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        io.fail(ConfigError("model.d_model: must be positive;\n  pick 32 or more"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: model.d_model: must be positive; pick 32 or more\n"


def test_rank_zero_logger_says_info_once_and_warnings_from_every_rank(monkeypatch, caplog):
    log = io.rank_zero_logger("scgpt.test_io")
    caplog.set_level(logging.INFO, logger="scgpt.test_io")
    monkeypatch.setattr(io, "process_rank", lambda: 1)
    log.info("rank 1 info")
    log.warning("rank 1 warning")
    monkeypatch.setattr(io, "process_rank", lambda: 0)
    log.info("rank 0 info")
    assert [r.getMessage() for r in caplog.records] == ["rank 1 warning", "rank 0 info"]


@pytest.mark.parametrize("pattern", [r"os\.replace\(", r"rich\.progress", r"print\(f?\"error: ",
                                     r"(?m)^\w+ = logging\.getLogger\("])  # module loggers (console.py filters Lightning's)
def test_plumbing_is_written_once(pattern):
    """Atomic renames, progress bars, one-line errors and loggers are made in scgpt/io.py only."""
    elsewhere = [str(p.relative_to(ROOT)) for pkg in ("scgpt", "data_modules") for p in (ROOT / pkg).rglob("*.py")
                 if p.name != "io.py" and re.search(pattern, p.read_text(encoding="utf-8"))]
    assert elsewhere == []
