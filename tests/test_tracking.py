"""Experiment tracking: offline wandb runs, TensorBoard, gradient norm, loss plots, secret scrubbing,
run reports and the rich progress bar."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
import yaml

from scgpt import report, tracking
from scgpt.plots import plot_confusion_matrix, plot_embedding, plot_loss_curves, plot_run_dir
from scgpt.train import optimized_metric, train

from conftest import SMALL_DATA, compose_config

FAST = [*SMALL_DATA, "trainer=debug"]
FAKE_KEY = "fakewandbkey0123456789abcdef0123456789abcd"


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb offline with a fake API key in the environment; its config and caches kept in tmp_path."""
    pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    return home


def read_wandb_history(run_file: Path, wait_s: float = 30.0) -> list[dict[str, float]]:
    """The history rows of a ``run-*.wandb`` file (a LevelDB-style log of protobuf ``Record``s), once
    wandb's service process has written the run's exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        rows, finished = _wandb_records(run_file)
        if finished or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(run_file: Path) -> tuple[list[dict[str, float]], bool]:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pieces, rows, finished = run_file.read_bytes(), 32768, 7, [], [], False
    assert data[:4] == b":W&B", run_file
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += block - pos % block if pos % block else 0
            continue
        if pos + length > len(data):  # still being written
            break
        pieces.append(data[pos:pos + length])
        pos += length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            finished |= record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, finished


def test_offline_wandb_run_writes_run_files_with_the_logged_metrics(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    summary = train(compose_config(run_dir, *FAST, "logger=wandb"))
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "one offline run, its files under <run_dir>/wandb"
    history = read_wandb_history(run_files[0])
    logged = {k for row in history for k in row}
    assert {"train/loss", "train/gep", "train/gen", "train/mvc", "train/lr", "train/grad_norm",
            "throughput/cells_per_s", "throughput/tokens_per_s", "val/masked_mse", "val/pearson"} <= logged
    val_mse = [row["val/masked_mse"] for row in history if "val/masked_mse" in row]
    assert val_mse[-1] == pytest.approx(summary["val"]["masked_mse"])
    assert max(row.get("trainer/global_step", 0) for row in history) >= 3
    assert (run_dir / "plots" / "loss.png").is_file() and summary["plots"] == [str(run_dir / "plots" / "loss.png")]


def test_no_api_key_string_in_any_saved_file(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    train(compose_config(run_dir, *FAST, "logger=wandb", f"+notes.api_key={FAKE_KEY}",
                         f"+notes.comment=key is {FAKE_KEY}"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["notes"] == {"api_key": tracking.REDACTED, "comment": f"key is {tracking.REDACTED}"}
    files = [p for p in [*run_dir.rglob("*"), *offline_wandb.rglob("*")] if p.is_file()]
    assert len(files) > 5
    leaks = [str(p) for p in files if FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, f"API key written to {leaks}"


def test_scrub_secrets_redacts_secret_keys_and_known_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    data = {"logger": {"api_key": "x" * 12, "project": "p"}, "hf_token": None,
            "args": [f"--key={FAKE_KEY}", 3], "password": ""}
    assert tracking.scrub_secrets(data) == {"logger": {"api_key": "<redacted>", "project": "p"}, "hf_token": None,
                                            "args": ["--key=<redacted>", 3], "password": ""}


def test_wandb_is_offline_without_a_key_and_online_with_one(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.wandb_mode() == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode() == "online"  # `wandb login` wrote a key
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode() == "offline"  # the environment wins
    assert tracking.wandb_mode("disabled") == "disabled"  # and the config over it


def test_csv_logger_records_gradient_norm_and_the_loss_plot(tmp_path):
    summary = train(compose_config(tmp_path, *FAST))
    header = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/grad_norm" in header and "train/lr" in header
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_run_dir(tmp_path) == [tmp_path / "plots" / "loss.png"]  # redrawn from metrics.csv
    assert summary["plots"]


def test_tensorboard_logger_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    train(compose_config(tmp_path, *FAST, "logger=tensorboard"))
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    rows = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.0}]
    with caplog.at_level("INFO", logger="scgpt"):
        assert plot_loss_curves(rows, tmp_path / "loss.png") == []
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "loss.png").exists()


def test_confusion_matrix_and_embedding_plots(tmp_path):
    pytest.importorskip("matplotlib")
    assert plot_confusion_matrix([[5, 1], [0, 4]], ["B cell", "T cell"], tmp_path / "cm.png")
    assert plot_embedding([[0, 0], [1, 1], [2, 0]], ["a", "b", "a"], tmp_path / "umap.png")
    assert (tmp_path / "cm.png").stat().st_size > 0 and (tmp_path / "umap.png").stat().st_size > 0


def _fake_run(path: Path, lr: float, mse: float) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"task": "pretrain", "global_step": 4, "train_loss_last": 1.5,
                                                   "cells_per_s": 100.0, "val": {"masked_mse": mse, "pearson": 0.5}}))
    (path / "config.yaml").write_text(yaml.safe_dump({"run_dir": str(path), "task": {"name": "pretrain", "optimizer": {
        "lr": lr}}, "model": {"d_model": 32, "n_layers": 2}, "data": {"global_batch_size": 16, "seed": 0}}))
    return path


def test_report_compares_runs_on_metrics_and_what_varied(tmp_path, capsys):
    _fake_run(tmp_path / "sweep" / "0", lr=1e-3, mse=2.0)
    _fake_run(tmp_path / "sweep" / "1", lr=3e-4, mse=1.0)
    report.main([str(tmp_path / "sweep"), "--sort", "val/masked_mse", "-o", str(tmp_path / "r.md")])
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].startswith("| run | val masked_mse") and "| lr |" in lines[0]
    assert lines[2].startswith("| 1 | 1 |") and lines[3].startswith("| 0 | 2 |")  # best first
    assert "0.0003" in lines[2] and "run_dir" not in lines[0]
    assert (tmp_path / "r.md").read_text() == table


def test_report_names_a_missing_run_dir_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2 and "nope: no such run directory" in capsys.readouterr().err


def test_optimized_metric_reads_the_summary(tmp_path):
    from omegaconf import OmegaConf

    from scgpt.errors import ConfigError

    summary = {"val": {"masked_mse": 2.5}, "cells_per_s": 10.0}
    assert optimized_metric(OmegaConf.create({"optimized_metric": "val/masked_mse"}), summary) == 2.5
    assert optimized_metric(OmegaConf.create({"optimized_metric": "cells_per_s"}), summary) == 10.0
    assert optimized_metric(OmegaConf.create({"optimized_metric": None}), summary) is None
    with pytest.raises(ConfigError, match="optimized_metric=val/nope.*val/masked_mse"):
        optimized_metric(OmegaConf.create({"optimized_metric": "val/nope"}), summary)


def test_training_shows_a_rich_progress_bar(tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar

    shown = tracking.tracking_callbacks(compose_config(tmp_path, "trainer=cpu"), logger=False)
    hidden = tracking.tracking_callbacks(compose_config(tmp_path, "trainer=debug", "trainer.enable_progress_bar=false"),
                                         logger=False)
    assert any(isinstance(c, RichProgressBar) for c in shown)
    assert not any(isinstance(c, RichProgressBar) for c in hidden)


def test_cli_progress_counter_reports_on_stderr_and_draws_nothing_when_disabled(capsys):
    from scgpt.io import progress_counter

    with progress_counter(True, 5, "converting") as advance:
        advance(5)
    assert "converting" in capsys.readouterr().err
    with progress_counter(False, 5, "converting") as advance:
        assert advance is None
    assert capsys.readouterr().err == ""
