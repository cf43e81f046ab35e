"""DDP under torchrun with real gloo processes: 2 ranks x 8 images and 4 x 4 give the same loss
and the same updated weights as 1 process x 16 images (global-batch statistics, gradient
averaging, lr scaling); a 2-rank `lsdr train` stopped mid-run twice (the preemption signal to
all ranks, then kill -9 of one) resumes to the weights of an uninterrupted run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_dirs import checkpoint_steps

from lsdr_repr.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Deterministic views (no random augmentation) and no BatchNorm (SyncBatchNorm needs GPUs), so
# the only difference between the two runs is how the batch is split over processes.
IDENTITY_AUGMENT = [
    "augment.preset=null", "augment.crop_size=32", "augment.scale.area=[1.0, 1.0]",
    "augment.scale.aspect=[1.0, 1.0]", "augment.flip_p=0.0", "augment.grayscale_p=0.0",
    "augment.lighting.p=0.0", "augment.blur.p=[0.0]", "augment.solarize.p=[0.0]",
]
VIT = [
    "model.arch=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 32, patch_size: 8}",
    "model.projector=[64, 64]", "model.projector_bn=false", "model.stages=[1, 2]",
    "objective.layer_weights=[0.5, 0.5]", "objective.layer_invariance_weights=[0.0, 1.0]",
    "objective.layer_variance_weights=[0.0, 1.0]",
]


def run_worker(nproc: int, out: Path, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(REPO / "tests" / "ddp_step_worker.py"),
           str(REPO / "configs" / "demo.yaml"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ddp_common(sample_shards) -> list[str]:
    return [
        f"data.train_shards={sample_shards['train']}", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=0", "train.device=cpu",
        "log.wandb.mode=disabled", "log.progress=false", "optim.warmup_steps=0",
        # LARS, not the demo's AdamW: Adam divides by sqrt(v), so a parameter whose gradient is
        # ~0 moves by ~lr whatever the sign of its float rounding, which differs between 1 and
        # 2 processes summing the same batch; LARS keeps the comparison about DDP itself
        "optim.name=lars", "optim.lr=0.3", "optim.lars_trust=0.02",
        *IDENTITY_AUGMENT, *VIT,
    ]


@pytest.fixture(scope="module")
def one_process_step(sample_shards, tmp_path_factory) -> dict:
    """The reference: one process stepping on all 16 images."""
    work = tmp_path_factory.mktemp("one-process")
    out = work / "world1.pt"
    run_worker(1, out, [*ddp_common(sample_shards), f"train.run_dir={work / 'run'}",
                        "optim.accumulation_steps=1"])
    return torch.load(out, weights_only=True)


@pytest.mark.distributed
@pytest.mark.parametrize(("ranks", "accumulation"), [(2, 1), (2, 2), (4, 1)])
def test_gloo_ranks_match_one_process_with_the_global_batch(sample_shards, one_process_step,
                                                            tmp_path, ranks, accumulation):
    """2 ranks x 8 images (and 4 x 4) against 1 x 16. accumulation 2: each rank splits its
    8 images into 2 micro-batches (features cached, all-gathered in the loss, no_sync on the
    first): still the one-process 16-image step."""
    out = tmp_path / f"world{ranks}.pt"
    run_worker(ranks, out, [*ddp_common(sample_shards), f"train.run_dir={tmp_path / 'run'}",
                            f"optim.accumulation_steps={accumulation}"])
    one, two = one_process_step, torch.load(out, weights_only=True)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    assert one["terms"] == pytest.approx(two["terms"], rel=1e-4, abs=1e-6)
    assert one["losses"][1] != one["losses"][0]  # the step changed the weights
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------ a rank stopped mid-run, resumed
TOTAL_STEPS = 12


def torchrun_train(shards: dict[str, Path], run_dir: Path) -> list[str]:
    """`torchrun --nproc_per_node 2 -m lsdr_repr train` of a tiny demo run (gloo on CPU)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "lsdr_repr", "train", str(REPO / "configs" / "demo.yaml"),
        f"data.train_shards={shards['train']}", f"train.run_dir={run_dir}",
        "data.image_size=32", "data.batch_size=16", "data.num_workers=1",
        "data.prefetch_factor=2", "data.shuffle_buffer=64", "augment.crop_size=24",
        "model.projector=[64, 64, 64]", f"train.total_steps={TOTAL_STEPS}",
        "train.checkpoint_every=2", "train.keep_checkpoints=10", "train.log_every=2",
        "train.image_grid_every=0", "train.spectrum_every=0", "train.eval_every=0",
        "train.device=cpu", "log.progress=false", "log.wandb.mode=disabled",
    ]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    """The command with its output in `log` (a file: no pipe to fill while the test polls)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes, read from /proc (their RANK variable)."""
    ranks = {}
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = (proc_dir / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        rank = next((e[5:] for e in env if e.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(proc_dir.name)
    return ranks


def rank_exit_codes(report: str) -> dict[int, int]:
    """The per-rank exit codes in torchrun's failure report."""
    found = re.findall(r"rank\s+:\s+(\d+) \(local_rank: \d+\)\s+exitcode\s+:\s+(-?\d+)", report)
    return {int(rank): int(code) for rank, code in found}


def run_to_end(cmd: list[str], log: Path) -> str:
    code = launch(cmd, log).wait(timeout=300)
    out = log.read_text()
    assert code == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(sample_shards, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("ddp") / "uninterrupted"
    run_to_end(torchrun_train(sample_shards, run_dir), run_dir.parent / "uninterrupted.log")
    return load_checkpoint(run_dir / "checkpoints" / f"step-{TOTAL_STEPS:08d}.pt")


def stop_mid_run(cmd: list[str], run_dir: Path, log: Path, after_step: int,
                 how: str) -> tuple[str, float]:
    """Launch `cmd`; once checkpoint `after_step` exists, send kill -9 to rank 1 ("kill") or
    SIGUSR2 to rank 0 and Ctrl-C's SIGINT to rank 1 ("mixed": a preemption that one rank sees
    as Ctrl-C must still be requeued by all). -> (the launcher's output, seconds from signal to
    exit)."""
    proc = launch(cmd, log)
    deadline = time.monotonic() + 240
    while after_step not in checkpoint_steps(run_dir):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint at step {after_step}"
        time.sleep(0.05)
    ranks = worker_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    if how == "kill":
        os.kill(ranks[1], signal.SIGKILL)
    else:
        os.kill(ranks[0], signal.SIGUSR2)
        os.kill(ranks[1], signal.SIGINT)
    start = time.monotonic()
    code = proc.wait(timeout=180)
    out = log.read_text()
    assert code == 1, out[-4000:]  # torchrun's own status for failed workers
    return out, time.monotonic() - start


@pytest.mark.distributed
@pytest.mark.slow
def test_a_two_rank_run_preempted_then_killed_resumes_to_the_uninterrupted_weights(
        sample_shards, uninterrupted, tmp_path):
    """SIGUSR2 to rank 0 (what SLURM sends each task) and SIGINT to rank 1 after step 2: one
    checkpoint at the step they stop at, both ranks exit 3 (requeue), not 130. The same command resumes; kill -9 of rank 1 after the next
    checkpoint: the survivor fails on gloo's connection reset, well before torchrun's SIGKILL
    escalation (30 s) or a collective timeout. The same command again ends with the weights and
    optimiser state of a run never stopped. (The barrier that keeps rank 1 from exiting before
    rank 0's write is not what this tiny run can catch: its checkpoint is written long before
    torchrun's escalation.)"""
    run_dir = tmp_path / "run"
    cmd = torchrun_train(sample_shards, run_dir)

    out, _ = stop_mid_run(cmd, run_dir, tmp_path / "preempted.log", 2, "mixed")
    codes = rank_exit_codes(out)
    # The rank that leaves first exits 3; torchrun may then SIGTERM the other, which has
    # already passed the barrier after the checkpoint (or exits 3 itself first).
    assert 3 in codes.values() and set(codes.values()) <= {3, -signal.SIGTERM}, out[-4000:]
    stopped = int(re.search(r"preempted at step (\d+): checkpoint", out).group(1))
    assert checkpoint_steps(run_dir)[-1] == stopped, (checkpoint_steps(run_dir), stopped)
    assert 2 <= stopped <= TOTAL_STEPS - 6, stopped  # room for the kill below
    assert load_checkpoint(run_dir / "checkpoints" / f"step-{stopped:08d}.pt")["step"] == stopped

    next_save = stopped + 2 - stopped % 2  # the cadence is every 2 steps
    out, elapsed = stop_mid_run(cmd, run_dir, tmp_path / "killed.log", next_save, "kill")
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped:08d}.pt'}" in out
    assert rank_exit_codes(out)[1] == -signal.SIGKILL, out[-4000:]
    assert re.search(r"Connection (reset|closed) by peer", out), out[-4000:]
    # the survivor: one line naming what happened, not the collective's traceback
    assert re.search(r"lsdr: error: \[rank 0\] another rank of the job stopped \(gloo: "
                     r"Connection (reset|closed) by peer\)", out), out[-4000:]
    assert "[rank0]: Traceback" not in out, out[-4000:]  # (torchrun prints its own)
    assert elapsed < 25, elapsed
    last = checkpoint_steps(run_dir)[-1]
    assert next_save <= last < TOTAL_STEPS

    resumed = run_to_end(cmd, tmp_path / "resumed.log")
    assert f"at step {last}" in resumed and "resumed from" in resumed
    final = load_checkpoint(run_dir / "checkpoints" / f"step-{TOTAL_STEPS:08d}.pt")
    assert final["world_size"] == 2 and final["samples_seen"] == uninterrupted["samples_seen"]
    for key, value in uninterrupted["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    expected = uninterrupted["optimizer"]["state"]
    for index, state in expected.items():
        for name, value in state.items():
            torch.testing.assert_close(final["optimizer"]["state"][index][name], value,
                                       rtol=1e-5, atol=1e-6, msg=f"optimizer {index} {name}")
