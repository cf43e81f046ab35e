"""Tracking: real W&B offline runs read back from their .wandb files, metrics.jsonl, progress."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from wandb_history import (
    read_records,
    read_wandb_config,
    read_wandb_history,
    read_wandb_run_ids,
    read_wandb_summary,
    wandb_files,
)

from lsdr_repr.config import LogConfig, WandbConfig
from lsdr_repr.errors import ConfigError
from lsdr_repr.rundir import METRICS_FILE
from lsdr_repr.tracking import (
    RUN_ID_FILE,
    NullTracker,
    Progress,
    RunTracker,
    image_grid,
    make_tracker,
    read_run_log,
    resolve_wandb_mode,
    spectrum_plot,
)

CONFIG = {"optim": {"lr": 0.2, "betas": [0.9, 0.999]}, "train": {"run_dir": "r", "seed": 3}}


def log_cfg(mode: str = "offline") -> LogConfig:
    return LogConfig(wandb=WandbConfig(mode=mode, project="lsdr-test", name="tiny",
                                       group="g1", tags=["ci", "cpu"]))


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    """W&B must read nothing from the host: no key, no mode, its own config dir."""
    for name in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID",
                 "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_offline_run_logs_history_media_config_summary_and_jsonl(tmp_path, no_wandb_env):
    run_dir = tmp_path / "run"
    tracker = make_tracker(log_cfg(), CONFIG, run_dir, rank=0, environ={})
    assert isinstance(tracker, RunTracker)
    for step in (1, 2, 3):
        tracker.log({"loss": 10.0 / step, "train/lr": torch.tensor(0.1 * step)}, step=step)
    images = torch.rand(5, 3, 12, 12)
    tracker.log_images("views", images, step=3, nrow=3)
    tracker.log_spectrum(torch.tensor([4.0, 1.0, 0.25, 1e-3, 0.0, -1e-9]), step=3)
    tracker.log_summary({"knn_top1": 0.5, "loss": torch.tensor(3.25)})
    tracker.finish()
    tracker.finish()  # idempotent

    # W&B files in RUN_DIR/wandb, one offline run, its id persisted for a resume
    (wandb_file,) = wandb_files(run_dir)
    assert wandb_file.parent.parent == run_dir / "wandb"
    assert tracker.run_path == str(wandb_file.parent)
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id
    assert read_wandb_run_ids(run_dir) == [tracker.run_id]
    run_record = next(r.run for r in read_records(wandb_file) if r.HasField("run"))
    assert (run_record.project, run_record.display_name, run_record.run_group) == \
        ("lsdr-test", "tiny", "g1")
    assert list(run_record.tags) == ["ci", "cpu"]
    assert read_wandb_config(run_dir) == CONFIG

    rows = read_wandb_history(run_dir)
    assert [r["_step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx([10.0, 5.0, 10.0 / 3])
    assert [r["train/lr"] for r in rows] == pytest.approx([0.1, 0.2, 0.3])
    for key in ("views", "spectrum"):
        media = rows[-1][key]
        assert media["_type"] == "image-file"
        png = wandb_file.parent / "files" / media["path"]
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert (rows[-1]["views"]["width"], rows[-1]["views"]["height"]) == (44, 30)  # 3x2 grid
    assert read_wandb_summary(run_dir)["knn_top1"] == 0.5

    records = read_run_log(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["metrics"] == pytest.approx({"loss": 10.0, "train/lr": 0.1})
    assert all(abs(r["time"] - time.time()) < 600 for r in records)
    assert json.loads((run_dir / "summary.json").read_text()) == {"knn_top1": 0.5, "loss": 3.25}


def test_resumed_tracker_continues_the_same_run_id(tmp_path, no_wandb_env):
    run_dir = tmp_path / "run"
    first = make_tracker(log_cfg(), CONFIG, run_dir, rank=0, environ={})
    first.log({"loss": 1.0}, step=10)
    first.finish()
    # the job is requeued before any checkpoint: the id comes from RUN_DIR/wandb_run_id.txt
    second = make_tracker(log_cfg(), CONFIG, run_dir, rank=0, environ={})
    second.log({"loss": 0.5}, step=20)
    second.finish()
    assert second.run_id == first.run_id
    # a checkpoint's id wins over the file, and is written back to it
    third = make_tracker(log_cfg(), CONFIG, run_dir, rank=0, run_id="ckpt0001", environ={})
    third.log({"loss": 0.25}, step=30)
    third.finish()
    assert third.run_id == "ckpt0001"
    assert (run_dir / RUN_ID_FILE).read_text().strip() == "ckpt0001"

    assert read_wandb_run_ids(run_dir) == [first.run_id, first.run_id, "ckpt0001"]
    assert [(r["_step"], r["loss"]) for r in read_wandb_history(run_dir)] == \
        [(10, 1.0), (20, 0.5), (30, 0.25)]
    assert [r["step"] for r in read_run_log(run_dir)] == [10, 20, 30]


def test_online_without_credentials_falls_back_to_offline(tmp_path, no_wandb_env, caplog):
    with caplog.at_level(logging.WARNING, logger="lsdr_repr.tracking"):
        tracker = make_tracker(log_cfg("online"), CONFIG, tmp_path, rank=0, environ={})
    tracker.log({"loss": 2.0}, step=1)
    tracker.finish()
    assert "W&B online run could not start" in caplog.text and "wandb sync" in caplog.text
    assert [r["loss"] for r in read_wandb_history(tmp_path)] == [2.0]


def test_disabled_mode_imports_no_wandb_and_writes_no_wandb_dir(tmp_path):
    # a fresh interpreter: whether `wandb` was imported is only meaningful there
    script = textwrap.dedent(f"""
        import sys, torch
        from lsdr_repr.config import LogConfig, WandbConfig
        from lsdr_repr.tracking import make_tracker
        t = make_tracker(LogConfig(wandb=WandbConfig(mode="disabled")), {{"a": 1}},
                         {str(tmp_path / "run")!r}, rank=0, environ={{}})
        t.log({{"loss": float("nan"), "x": 1}}, step=5)
        t.log_images("views", torch.rand(2, 3, 4, 4), step=5)
        t.log_spectrum(torch.ones(3), step=5)
        t.finish()
        print("wandb imported:", "wandb" in sys.modules, "run_id:", t.run_id)
    """)
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "wandb imported: False run_id: None"
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [METRICS_FILE]
    assert (run_dir / METRICS_FILE).read_text().count("\n") == 1
    assert read_run_log(run_dir)[0]["metrics"] == {"loss": "nan", "x": 1.0}


def test_environment_overrides_the_configured_mode(tmp_path):
    tracker = make_tracker(log_cfg("offline"), CONFIG, tmp_path, 0,
                           environ={"WANDB_MODE": "disabled"})
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert not (tmp_path / "wandb").exists() and tracker.run_path is None
    assert resolve_wandb_mode("online", {"WANDB_DISABLED": "true"}) == "disabled"
    assert resolve_wandb_mode("disabled", {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode("offline", {}) == "offline"
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        resolve_wandb_mode("offline", {"WANDB_MODE": "sometimes"})


def test_rank_one_gets_a_null_tracker_that_touches_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = make_tracker(log_cfg(), CONFIG, run_dir, rank=1, environ={})
    assert type(tracker) is NullTracker and tracker.run_id is None
    with tracker:
        tracker.log({"loss": 1.0}, step=1)
        tracker.log_images("v", torch.rand(1, 3, 2, 2), step=1)
        tracker.log_spectrum(torch.ones(2), step=1)
        tracker.log_summary({"a": 1})
    assert not run_dir.exists()


def test_metric_values_must_be_scalars(tmp_path):
    tracker = make_tracker(log_cfg("disabled"), CONFIG, tmp_path, 0, environ={})
    with pytest.raises(ValueError, match="'emb' is a tensor of shape \\(3,\\)"):
        tracker.log({"emb": torch.ones(3)}, step=1)
    with pytest.raises(ValueError, match="'name' is not a number"):
        tracker.log({"name": "x"}, step=1)
    tracker.finish()


# --------------------------------------------------------------------------------- rendering
def test_image_grid_and_spectrum_plot_render_arrays():
    grid = image_grid(torch.rand(4, 3, 10, 10))
    assert grid.shape == (2 + 2 * 12, 2 + 2 * 12, 3) and str(grid.dtype) == "uint8"
    assert image_grid(torch.rand(16, 3, 10, 10), nrow=8).shape == (2 + 2 * 12, 2 + 8 * 12, 3)
    gray = image_grid(torch.zeros(1, 1, 6, 6))
    assert gray.shape == (6, 6, 3) and gray[5, 5].tolist() == [0, 0, 0]  # one image: no padding
    with pytest.raises(ValueError, match=r"\[N,3,H,W\]"):
        image_grid(torch.rand(3, 10, 10))
    plot = spectrum_plot(torch.logspace(0, -6, 64))
    assert plot.shape == (380, 550, 3) and plot.std() > 0
    assert spectrum_plot(torch.zeros(8)).shape == (380, 550, 3)  # full collapse still renders


def test_spectrum_shows_what_the_batch_resolves_and_marks_the_rank():
    from lsdr_repr.objectives import covariance_spectrum
    from lsdr_repr.tracking import resolvable_spectrum

    gen = torch.Generator().manual_seed(0)
    # 16 embeddings of 64 dims spanning 4 directions: the centred covariance has rank 4, and
    # 64 - 15 of its eigenvalues are zero whatever the network (a batch of 16 resolves 15)
    z = torch.randn(16, 4, generator=gen) @ torch.randn(4, 64, generator=gen)
    eig = covariance_spectrum(z)
    assert float(eig[20:].abs().max()) < 1e-20 * float(eig[0])  # what read as collapse
    values, rank = resolvable_spectrum(eig, num_samples=16)
    assert len(values) == 15 and rank == 4
    values, rank = resolvable_spectrum(torch.randn(16, 64, generator=gen).pow(2).sum(0), None)
    assert len(values) == 64 and rank == 64  # no batch size given: all of them
    def red(plot):  # the rank line is the only red in the plot (tab:red, dashed)
        return int(((plot[..., 0] > 180) & (plot[..., 1] < 80) & (plot[..., 2] < 80)).sum())

    marked = spectrum_plot(eig, "spectrum", num_samples=16, rankme=3.9)
    full_rank = spectrum_plot(torch.logspace(0, -2, 15), "spectrum", num_samples=16)
    assert red(marked) > 50 and red(full_rank) == 0


def test_labelled_view_grid_is_larger_than_the_bare_grid():
    from lsdr_repr.tracking import labelled_grid

    images = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    bare = image_grid(images, nrow=8)
    labelled = labelled_grid(images, 8, ["view 1", "view 2"], [f"image {j}" for j in range(8)])
    assert labelled.ndim == 3 and labelled.shape[0] > bare.shape[0] and labelled.shape[1] > bare.shape[1]


# ---------------------------------------------------------------------------------- progress
LINE = re.compile(r"^step (\d+)/100 loss [\d.]+ [\d.]+ samples/s( eta \d+:\d\d:\d\d)?$")


def test_progress_without_a_tty_writes_periodic_log_lines(caplog):
    with caplog.at_level(logging.INFO, logger="lsdr_repr.tracking"):
        progress = Progress(100, start_step=10, enabled=True, is_tty=False, min_interval_s=0)
        for step in (20, 30, 40):
            progress.update(step, {"train/loss": 12.3456, "perf/samples_per_s": 512.0})
            time.sleep(0.01)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all(LINE.match(line) for line in lines), lines
    assert lines[0] == "step 20/100 loss 12.35 512.0 samples/s"  # no rate known yet
    assert lines[1].startswith("step 30/100 loss 12.35 512.0 samples/s eta 0:00:0")


def test_progress_throttles_lines_but_logs_the_last_step(caplog):
    with caplog.at_level(logging.INFO, logger="lsdr_repr.tracking"):
        progress = Progress(100, 0, True, is_tty=False, min_interval_s=3600)
        for step in range(1, 60):
            progress.update(step, {"loss": 1.0})
        progress.close()
        finished = Progress(100, 0, True, is_tty=False, min_interval_s=3600)
        finished.update(99, {"loss": 2.0})
        finished.update(100, {"loss/total": 1.0, "loss/invariance": 0.5})
        finished.close()
        Progress(100, 0, enabled=False, is_tty=False, min_interval_s=0).update(5, {"loss": 1.0})
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["1/100", "59/100", "99/100", "100/100"]
    assert lines[-1].startswith("step 100/100 loss 1 eta 0:00:00")  # the total, not a term


def test_progress_on_a_tty_draws_a_tqdm_bar(capsys):
    progress = Progress(50, start_step=5, enabled=True, is_tty=True)
    progress.update(10, {"loss": 0.5, "samples_per_s": 64.0})
    progress.close()
    err = capsys.readouterr().err
    assert "10/50" in err and "loss=0.5" in err and "samples/s=64.0" in err


def test_log_lines_during_the_training_bar_are_not_glued_onto_it(capsys):
    """A console handler on stderr (as `lsdr`'s basicConfig installs) writing while the bar is
    drawn: the line must stand alone, not follow the bar's last frame on the same line."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stderr, like a terminal's
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
    try:
        progress = Progress(50, enabled=True, is_tty=True)
        progress.update(10, {"loss": 0.5})
        logging.getLogger("lsdr_repr.train").warning("step 10: online kNN top1 0.500")
        progress.update(20, {"loss": 0.25})
        progress.close()
        logging.getLogger("lsdr_repr.train").warning("after the bar")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    segments = [seg for line in err.split("\n") for seg in line.split("\r")]
    assert "WARNING step 10: online kNN top1 0.500" in segments, err
    assert "WARNING after the bar" in segments  # the redirection ends with the bar
    assert "20/50" in err


def test_wandb_history_reader_rejects_foreign_and_corrupt_files(tmp_path, no_wandb_env):
    foreign = tmp_path / "x.wandb"
    foreign.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(read_records(foreign))
    tracker = make_tracker(log_cfg(), CONFIG, tmp_path / "run", 0, environ={})
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    (wandb_file,) = wandb_files(tmp_path / "run")
    data = bytearray(wandb_file.read_bytes())
    data[20] ^= 0xFF  # inside the first record
    corrupt = tmp_path / "corrupt.wandb"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch"):
        list(read_records(corrupt))
    # a live run's file ends in a torn record: the complete ones are still read
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(wandb_file.read_bytes()[:-5])
    assert len(list(read_records(torn))) == len(list(read_records(wandb_file))) - 1
    assert Path(wandb_files(wandb_file)[0]) == wandb_file
