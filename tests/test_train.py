"""`lsdr train` end to end on real sample shards: checkpoints, W&B offline history, resume after
SIGKILL, the preemption signal, a corrupt newest checkpoint, non-finite losses, and DDP under
torchrun (real gloo processes)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_dirs import DEMO, TINY, checkpoint_steps, final_weights, tiny_overrides
from test_accumulate import trainer_for
from wandb_history import read_wandb_history

from lsdr_repr.checkpoint import load_checkpoint
from lsdr_repr.cli import main
from lsdr_repr.train import EXIT_DIVERGED, EXIT_PREEMPTED, resolve_compile_mode
from tests.terminal import final_bars, run_on_a_terminal

REPO = Path(__file__).resolve().parents[1]


def cli_process(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lsdr_repr", *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs,
    )


def run_cli(args: list[str], timeout: float = 240) -> tuple[int, str]:
    proc = cli_process(args)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def sync_dry_run(command: str) -> list[Path]:
    """The .wandb files a printed `wandb sync ...` command would upload: the real command, run
    by the shell (which expands its glob) with W&B's own --dry-run, which needs no network."""
    assert command.startswith("wandb sync ")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command.replace("wandb sync ", "wandb sync --dry-run ", 1)],
                          capture_output=True, text=True, env=env, timeout=60, check=True)
    lines = (done.stdout + done.stderr).splitlines()
    return [Path(ln.split("wandb:", 1)[1].strip()) for ln in lines
            if ln.strip().endswith(".wandb")]


def test_train_end_to_end_writes_checkpoints_config_and_wandb_history(sample_shards, tmp_path,
                                                                      capsys):
    run_dir = tmp_path / "run"
    # the CLI injects the online kNN validator: every 4 steps on data.val_shards
    code = main(["train", str(DEMO), *tiny_overrides(sample_shards, run_dir, "train.eval_every=4")])
    assert code == 0
    assert checkpoint_steps(run_dir) == [4, 6, 8]  # keep_checkpoints=3, the final one included
    state = load_checkpoint(run_dir / "checkpoints" / "step-00000008.pt")
    assert state["step"] == 8 and state["samples_seen"] == 8 * 16
    assert state["config"]["train"]["run_dir"] == str(run_dir)
    assert any(k.startswith("backbone.") for k in state["model"])
    assert any(k.startswith("projector.") for k in state["model"])
    assert (run_dir / "config.yaml").is_file()

    history = read_wandb_history(run_dir)
    logged = [row for row in history if "loss/total" in row]
    assert [row["_step"] for row in logged] == [2, 4, 6, 8]
    keys = set().union(*logged)
    for key in ("loss/invariance", "loss/variance", "loss/decorrelation", "lr", "samples_per_s",
                "pairs_per_s", "data_wait_frac", "skipped_samples", "nonfinite_steps",
                "diag/rankme", "epoch"):
        assert key in keys, key
    assert all(row["loss/total"] == row["loss/total"] for row in logged)  # finite, not NaN
    knn = [row for row in history if "knn/top1" in row]
    assert [row["_step"] for row in knn] == [4, 8]
    assert all(0.0 <= row["knn/top1"] <= row["knn/top5"] <= 1.0 for row in knn)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 8

    # Running again on a finished run resumes at the end and does nothing more.
    capsys.readouterr()
    assert main(["train", str(DEMO),
                 *tiny_overrides(sample_shards, run_dir, "train.eval_every=4")]) == 0
    assert checkpoint_steps(run_dir) == [4, 6, 8]

    # That second process opened a second W&B offline directory (same id) holding no training
    # history: the printed upload command must cover both pieces, oldest first.
    out = capsys.readouterr().out
    (sync_line,) = [ln for ln in out.splitlines() if "wandb sync" in ln]
    assert "all 2 pieces" in sync_line
    files = sync_dry_run(sync_line[sync_line.index("wandb sync"):])
    assert len(files) == 2 and files == sorted(files)
    assert not [r for r in read_wandb_history(files[-1].parent) if "loss/total" in r]
    pieces = [r for f in files for r in read_wandb_history(f.parent) if "loss/total" in r]
    assert [r["_step"] for r in pieces] == [2, 4, 6, 8]

    # `lsdr status` reads the whole metrics.jsonl: the loss and RankMe of the last training
    # record, the run done, the checkpoints and the same upload command.
    assert main(["status", str(run_dir)]) == 0
    status = capsys.readouterr().out
    last = [r["metrics"] for r in map(json.loads, lines) if "loss/total" in r["metrics"]][-1]
    assert "kNN at step 8: top1 " in status
    assert f"step 8/8, loss {last['loss/total']:.4g}, " in status and ", done" in status
    assert f"RankMe {last['diag/rankme']:.1f}" in status
    assert "checkpoints: step-00000004.pt, step-00000006.pt, step-00000008.pt" in status
    assert "W&B upload: " + sync_line[sync_line.index("wandb sync"):] in status


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_the_same_weights(sample_shards, tmp_path):
    steps = ["train.total_steps=10", "train.checkpoint_every=2", "log.wandb.mode=disabled"]
    reference = tmp_path / "reference"
    code, out = run_cli(["train", str(DEMO), *tiny_overrides(sample_shards, reference, *steps)])
    assert code == 0, out

    killed = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).choice([2, 4, 6])
    args = ["train", str(DEMO), *tiny_overrides(sample_shards, killed, *steps)]
    proc = cli_process(args)
    wait_for(lambda: kill_after in checkpoint_steps(killed), timeout=180, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint_steps(killed)[-1] < 10
    code, out = run_cli(args)
    assert code == 0, out
    assert "resumed from" in out

    expected, actual = final_weights(reference), final_weights(killed)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_preemption_signal_checkpoints_and_exits_with_the_requeue_status(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", str(DEMO), *tiny_overrides(
        sample_shards, run_dir, "train.total_steps=400", "train.checkpoint_every=100",
        "log.wandb.mode=disabled")]
    proc = cli_process(args)
    # Mid-run: after the first logged step (a signal during start-up has nothing to save).
    wait_for(lambda: metrics_lines(run_dir) > 0, timeout=180, proc=proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out
    saved = checkpoint_steps(run_dir)
    assert saved and 0 < saved[-1] < 400, saved
    assert load_checkpoint(run_dir / "checkpoints" / f"step-{saved[-1]:08d}.pt")["step"] == saved[-1]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(sample_shards, run_dir, "log.wandb.mode=disabled")
    assert main(["train", str(DEMO), *overrides, "train.total_steps=4"]) == 0
    newest = run_dir / "checkpoints" / "step-00000004.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated write
    assert main(["train", str(DEMO), *overrides, "train.total_steps=6"]) == 0
    state = load_checkpoint(run_dir / "checkpoints" / "step-00000006.pt")
    assert state["step"] == 6


def test_nonfinite_losses_stop_without_overwriting_the_last_good_checkpoint(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    # A learning rate of 1e30 blows the weights up within a step or two; every later loss is
    # non-finite, each such step is skipped, and the run stops after two in a row.
    overrides = tiny_overrides(sample_shards, run_dir, "log.wandb.mode=disabled",
                               "train.checkpoint_every=1", "train.max_nonfinite_steps=2",
                               "train.total_steps=20", "optim.lr=1e30", "optim.warmup_steps=0")
    assert main(["train", str(DEMO), *overrides]) == EXIT_DIVERGED
    steps = checkpoint_steps(run_dir)
    assert steps and steps[-1] < 18  # it stopped early
    for step in steps:  # what was saved is loadable and finite: the last good state survives
        state = load_checkpoint(run_dir / "checkpoints" / f"step-{step:08d}.pt")
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # Resuming the diverged run fails the same way instead of silently training on.
    assert main(["train", str(DEMO), *overrides]) == EXIT_DIVERGED


def test_train_from_an_image_folder_writes_shards_once_then_streams_them(image_folder, tmp_path,
                                                                         caplog):
    """`data.train_shards` naming an ImageFolder: shards under RUN_DIR on first use (a line and,
    on a terminal, a progress bar saying so), the run trains on them, and a second start reuses
    them."""
    import logging

    run_dir = tmp_path / "run"
    args = ["train", str(DEMO), f"data.train_shards={image_folder}", f"train.run_dir={run_dir}",
            *TINY, "train.total_steps=2", "train.log_every=1", "train.image_grid_every=0",
            "train.spectrum_every=0", "train.eval_every=0", "log.wandb.mode=disabled",
            "data.num_workers=0", "log.progress=true"]
    done = run_on_a_terminal(args)
    assert done.returncode == 0, done.err
    shards = run_dir / "shards" / "train"
    assert f"data.train_shards={image_folder} is an image folder: writing it to shards in " \
           f"{shards}" in done.err
    assert "24/24" in final_bars(done.err)[f"writing {shards}"]  # the writer's bar, every image
    manifest = json.loads((shards / "manifest.json").read_text())
    assert sum(s["num_samples"] for s in manifest["shards"]) == 24
    assert checkpoint_steps(run_dir) == [2]
    # the run's config names the shards it streamed, so a resume compares like with like
    assert f"train_shards: {shards}" in (run_dir / "config.yaml").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args) == 0  # finished: resumes at the end
    assert "streaming the shards written from it" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before
    assert "resuming with data.train_shards" not in caplog.text  # no config change seen


def test_compile_mode_auto_means_cuda_graphs_on_one_gpu_only():
    # CUDA graphs are measured correct on one GPU (tests/test_cuda_graphs.py), not under DDP
    assert resolve_compile_mode("auto", "cuda", 1) == "reduce-overhead"
    assert resolve_compile_mode("auto", "cuda", 2) == "default"
    assert resolve_compile_mode("auto", "cpu", 1) == "default"
    assert resolve_compile_mode("max-autotune", "cuda", 4) == "max-autotune"


def test_the_trainer_pairs_local_crops_with_the_global_views_only(sample_shards, tmp_path):
    """objective.view_pairs=global in the real Trainer: the loss knows augment.num_views, and a
    multi-crop step (2 global + 2 local views) takes the invariance over the 5 pairs that hold a
    global view, not over all 6."""
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    trainer = trainer_for(sample_shards, tmp_path / "run", "objective.view_pairs=global",
                          "augment.local_crops=2", "augment.local_crop_size=32",
                          "augment.local_area=[0.3, 0.6]")
    assert trainer.loss_fn.global_views == 2
    views = trainer.staging.views(images)[0]
    assert len(views) == 4
    with torch.no_grad():  # the same weights and (no drop path here) the same forward as the step
        z = [o.projection.float() for o in trainer.multiview(views)]
    _, out, _, applied = trainer.train_step([views])
    assert bool(applied)
    mse = {(i, j): torch.nn.functional.mse_loss(z[i], z[j]).item()
           for i in range(4) for j in range(i + 1, 4)}
    global_pairs = [mse[p] for p in mse if p != (2, 3)]
    assert out.terms["invariance"].item() == pytest.approx(sum(global_pairs) / 5, rel=1e-5)
    assert out.terms["invariance"].item() != pytest.approx(sum(mse.values()) / 6, rel=1e-5)
