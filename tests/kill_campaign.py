"""Randomised kill -9 campaign against `lsdr train` (issue 15): real SIGKILLs at random moments,
a third of them aimed at checkpoint writes, one or two per run, each run resumed until it
completes; every completed
run must end with weights and optimiser state bit-identical to an uninterrupted run.

    python tests/kill_campaign.py [--kills 24] [--seed 0] [--work /tmp/kill-campaign]

Prints the counts and exits 1 if any completed run differs or any resume failed. Not part of the
pytest run (minutes on 2 cores); the single-kill version is test_train.py's SIGKILL test.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "data.image_size=32", "data.batch_size=16", "data.num_workers=1", "data.prefetch_factor=2",
    "data.shuffle_buffer=64", "augment.crop_size=24", "model.arch=test_resnet",
    "model.projector=[64, 64, 64]", "train.total_steps=40", "train.checkpoint_every=3",
    "train.keep_checkpoints=3", "train.log_every=1", "train.image_grid_every=0",
    "train.spectrum_every=0", "train.eval_every=0", "train.device=cpu", "log.progress=false",
    "log.wandb.mode=offline",
]


def command(shards: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lsdr_repr", "train", str(REPO / "configs" / "demo.yaml"),
            f"data.train_shards={shards / 'train'}", f"data.val_shards={shards / 'val'}",
            f"data.test_shards={shards / 'test'}", f"train.run_dir={run_dir}", *OVERRIDES]


def start(shards: Path, run_dir: Path, log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    return subprocess.Popen(command(shards, run_dir), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def writing_checkpoint(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.name.endswith(".pt.tmp") for p in folder.iterdir())


def final_state(run_dir: Path):
    from lsdr_repr.checkpoint import find_latest_valid, load_checkpoint

    state = load_checkpoint(find_latest_valid(run_dir))
    return state["step"], state["model"], state["optimizer"]["state"]


def identical(a, b) -> bool:
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kill-campaign"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    shards = args.work / "shards"
    subprocess.run([sys.executable, "-m", "lsdr_repr", "shards", "sample", str(shards)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    log = open(args.work / "campaign.log", "ab")  # noqa: SIM115 - for the whole campaign

    t0 = time.monotonic()
    ref = start(shards, args.work / "reference", log)
    assert ref.wait() == 0, "the reference run failed"
    duration = time.monotonic() - t0
    ref_step, ref_model, ref_optim = final_state(args.work / "reference")

    kills = during_write = completed = resumes = bad = 0
    failures: list[str] = []
    run = 0
    while kills < args.kills:
        run += 1
        run_dir = args.work / f"run-{run:02d}"
        budget = rng.randint(1, 2)  # kills of this run, then it runs to the end
        while True:
            proc = start(shards, run_dir, log)
            aim_at_write = kills < args.kills and rng.random() < 1 / 3
            limit = kills + (1 if budget > 0 else 0)
            deadline = time.monotonic() + rng.uniform(0.5, duration)
            killed = False
            while proc.poll() is None and kills < min(args.kills, limit):
                if (aim_at_write and writing_checkpoint(run_dir)) or (
                        not aim_at_write and time.monotonic() > deadline):
                    in_write = writing_checkpoint(run_dir)
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    budget -= 1
                    during_write += in_write
                    killed = True
                    break
                time.sleep(0.002 if aim_at_write else 0.02)
            if not killed:
                code = proc.wait()
                if code != 0:
                    failures.append(f"{run_dir}: exit {code}")
                    bad += 1
                    break
                completed += 1
                step, model, optim = final_state(run_dir)
                if not (step == ref_step and identical(model, ref_model)
                        and identical(optim, ref_optim)):
                    failures.append(f"{run_dir}: final state differs from the reference")
                    bad += 1
                break
            resumes += 1
    print(f"kills: {kills} (during a checkpoint write: {during_write}); resumes: {resumes}; "
          f"completed runs: {completed}, bit-identical to the uninterrupted run: "
          f"{completed - sum('differs' in f for f in failures)}; failures: {bad}")
    for line in failures:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
