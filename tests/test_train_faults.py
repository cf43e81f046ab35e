"""`lsdr train` under faults, with real processes, signals, files and a real full file system:
each fault ends with a documented exit status (0 done, 2 bad input, 3 preempted, 4 diverged)
and one line naming the culprit (issue 15)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from run_dirs import checkpoint_steps

from lsdr_repr import distributed as dist
from lsdr_repr.checkpoint import load_checkpoint
from lsdr_repr.cli import main
from lsdr_repr.config import load_config
from lsdr_repr.errors import ConfigError
from lsdr_repr.optim import build_optimizer, build_scheduler
from lsdr_repr.preemption import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    PreemptionFlag,
    StopWhileWaiting,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
EXIT_BAD_INPUT = 2

# timm's test_resnet: a 3 MB checkpoint, about 10 steps a second on one CPU core.
SMALL = [
    "data.image_size=32", "data.batch_size=16", "data.num_workers=1", "data.prefetch_factor=2",
    "data.shuffle_buffer=64", "augment.crop_size=24", "model.arch=test_resnet",
    "model.projector=[64, 64, 64]", "train.total_steps=6", "train.checkpoint_every=2",
    "train.keep_checkpoints=3", "train.log_every=1", "train.image_grid_every=0",
    "train.spectrum_every=0", "train.device=cpu", "log.progress=false", "log.wandb.mode=disabled",
    "optim.warmup_steps=0", "train.eval_every=0",
    # LARS, not the demo's AdamW: Adam normalises every update, so the huge loss weight that
    # makes these runs diverge would only make them train at lr
    "optim.name=lars", "optim.lr=0.3", "optim.lars_trust=0.02",
]


def small(sample_shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return ["train", str(DEMO), f"data.train_shards={sample_shards['train']}",
            f"data.val_shards={sample_shards['val']}", f"data.test_shards={sample_shards['test']}",
            f"train.run_dir={run_dir}", *SMALL, *extra]


@contextlib.contextmanager
def sigint_handler(handler) -> Iterator[None]:
    """SIGINT handled by `handler` inside the block, the previous handler back after it (unless
    that one was not set from Python: getsignal gives None and it cannot be restored)."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


class Cli:
    """`python -m lsdr_repr ...` in a real process; its output collected by a thread."""

    def __init__(self, args: list[str], new_session: bool = False) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # new_session: the process is a terminal's foreground job, whose Ctrl-C it handles. A
        # suite started in the background of a script has SIGINT ignored, which the child would
        # inherit (and keep, by design), so it is spawned with the foreground job's default.
        with sigint_handler(signal.SIG_DFL) if new_session else contextlib.nullcontext():
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lsdr_repr", *args], cwd=REPO, env=env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=new_session)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, predicate, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                self._reader.join(5)
                if predicate():
                    return
                raise AssertionError(f"process ended early ({self.proc.returncode}):\n"
                                     f"{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting:\n{self.output}")
            time.sleep(0.02)

    def wait_for_line(self, text: str, timeout: float = 120) -> None:
        self.wait_for(lambda: any(text in line for line in self.lines), timeout)

    def finish(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (/proc/PID/status SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


# ---------------------------------------------------------------------- 1: divergence
def test_divergence_keeps_the_checkpoints_from_before_it_and_names_the_newest(
        sample_shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert main(small(sample_shards, run_dir)) == EXIT_OK
    assert checkpoint_steps(run_dir) == [2, 4, 6]
    before = {s: digest(run_dir / "checkpoints" / f"step-{s:08d}.pt") for s in (2, 4, 6)}
    # A huge invariance weight: the first step is finite but blows the weights up (finite,
    # ~1e29), every later loss is non-finite. The old trainer saved at step 8 (weights finite)
    # and its keep-3 rotation removed step 2; longer streaks removed all of them.
    with caplog.at_level(logging.WARNING, logger="lsdr_repr"):
        code = main(small(sample_shards, run_dir, "train.total_steps=20",
                          "objective.invariance_weight=1e36", "train.max_nonfinite_steps=3"))
    assert code == EXIT_DIVERGED
    assert checkpoint_steps(run_dir) == [2, 4, 6]
    assert {s: digest(run_dir / "checkpoints" / f"step-{s:08d}.pt") for s in (2, 4, 6)} == before
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "step-00000006.pt" in errors[0], errors


# adamw: torch's fused AdamW skips on the device and the trainer reads the finite flag a step
# later (lsdr_repr/guarded_step.py); lars: the synchronous check. The same guarantees for both.
@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_no_checkpoint_is_written_during_a_nonfinite_streak(sample_shards, tmp_path, caplog,
                                                           optimizer):
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lsdr_repr"):
        code = main(small(sample_shards, run_dir, "train.checkpoint_every=1",
                          "train.max_nonfinite_steps=4", "train.total_steps=20",
                          "optim.lr=1e30", "optim.warmup_steps=0", f"optim.name={optimizer}"))
    assert code == EXIT_DIVERGED
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    steps = checkpoint_steps(run_dir)
    assert len(errors) == 1 and (f"step-{steps[-1]:08d}.pt" if steps else "no checkpoint") \
        in errors[0], errors
    first_bad = min(int(r.getMessage().split()[1].rstrip(":")) for r in caplog.records
                    if "non-finite loss" in r.getMessage())
    steps = checkpoint_steps(run_dir)
    assert all(s < first_bad for s in steps), (steps, first_bad)
    for s in steps:
        state = load_checkpoint(run_dir / "checkpoints" / f"step-{s:08d}.pt")
        assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())


# --------------------------------------------------------------------- 2: one writer
def test_a_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(
        sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    first = Cli(small(sample_shards, run_dir, "train.total_steps=100000",
                      "train.checkpoint_every=5"))
    try:
        first.wait_for(lambda: 5 in checkpoint_steps(run_dir))
        config_before = (run_dir / "config.yaml").read_bytes()
        second = Cli(small(sample_shards, run_dir, "train.total_steps=100000", "train.seed=1"))
        assert second.finish() == EXIT_BAD_INPUT, second.output
        error = [line for line in second.lines if line.startswith("lsdr: error:")]
        assert len(error) == 1, second.output
        assert f"pid {first.proc.pid} on host {socket.gethostname()}" in error[0]
        assert (run_dir / "config.yaml").read_bytes() == config_before
        assert first.proc.poll() is None  # the holder trains on
    finally:
        first.kill()  # SIGKILL: the lock file stays, the kernel drops the lock
    assert (run_dir / ".lock").read_text().split()[0] == str(first.proc.pid)
    third = Cli(small(sample_shards, run_dir, "train.total_steps=12"))
    assert third.finish() == EXIT_OK, third.output
    assert "resumed from" in third.output
    assert (run_dir / ".lock").read_text().split()[0] == str(third.proc.pid)


# ------------------------------------------------------------ 5: preemption at start-up
@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_a_preemption_signal_during_start_up_exits_3(sample_shards, tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = Cli(small(sample_shards, run_dir))
    try:
        # As soon as the handler is there: the process is still importing torch.
        proc.wait_for(lambda: catches(proc.proc.pid, sig), timeout=30)
        proc.proc.send_signal(sig)
        assert proc.finish() == EXIT_PREEMPTED, proc.output
    finally:
        proc.kill()
    assert "preempted during start-up" in proc.output
    assert checkpoint_steps(run_dir) == []  # nothing to save: the requeued job starts afresh


def test_a_preemption_signal_during_start_up_of_a_resumed_run_exits_3(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert main(small(sample_shards, run_dir, "train.total_steps=4")) == EXIT_OK
    before = digest(run_dir / "checkpoints" / "step-00000004.pt")
    proc = Cli(small(sample_shards, run_dir, "train.total_steps=8"))
    try:
        proc.wait_for(lambda: catches(proc.proc.pid, signal.SIGUSR2), timeout=30)
        proc.proc.send_signal(signal.SIGUSR2)
        assert proc.finish() == EXIT_PREEMPTED, proc.output
    finally:
        proc.kill()
    assert checkpoint_steps(run_dir) == [2, 4]  # the resumed state is already on disk
    assert digest(run_dir / "checkpoints" / "step-00000004.pt") == before


# ------------------------------------------------------------- 10: SIGTERM, final step
def test_sigterm_during_the_final_step_ends_a_complete_run_with_0(sample_shards, tmp_path):
    from lsdr_repr.train import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(DEMO, small(sample_shards, run_dir)[2:])
    trainer = Trainer(cfg, dist.read_dist_env({}), torch.device("cpu"))

    def signal_before_the_last_step(t: Trainer) -> None:
        if t.step == cfg.train.total_steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # real signal; arrives in the final step

    trainer.step_hook = signal_before_the_last_step
    result = trainer.run()
    assert result.exit_code == EXIT_OK  # was 3: SLURM requeued a finished job
    assert result.step == cfg.train.total_steps
    assert checkpoint_steps(run_dir)[-1] == cfg.train.total_steps


def test_a_stop_signal_while_the_source_stalls_checkpoints_at_once(sample_shards, tmp_path):
    """The shards vanish mid-run (a `pipe:cat` source whose files move away, as a server that
    went down) and `data.stall_timeout_s=0` retries for ever: SIGTERM then ends the wait for the
    next batch, the step in flight completes, its checkpoint is written and the run exits 3,
    instead of waiting out a stall that may outlast SLURM's grace before SIGKILL. With the
    shards back the rerun goes on from that step: none lost, none twice."""
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards["train"], shards)
    run_dir = tmp_path / "run"
    spec = f"pipe:cat {shards}/train-{{000000..000008}}.tar"
    args = [*small(sample_shards, run_dir, "train.total_steps=400",
                   "train.checkpoint_every=200", "data.stall_timeout_s=0"),
            f"data.train_shards={spec}"]
    proc = Cli(args)
    try:
        proc.wait_for(lambda: len(logged_steps(run_dir)) >= 3, timeout=120)
        shards.rename(tmp_path / "gone")
        proc.wait_for_line("retrying", timeout=60)  # the worker's stall warning
        # Batches already in the loader's queue still train: signal once the steps stop
        # coming (the trainer is then blocked on the dry source), not at a fixed delay.
        steps, still_since = len(logged_steps(run_dir)), time.monotonic()
        while time.monotonic() - still_since < 3:
            time.sleep(0.2)
            if len(logged_steps(run_dir)) != steps:
                steps, still_since = len(logged_steps(run_dir)), time.monotonic()
        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish(timeout=60) == EXIT_PREEMPTED, proc.output
        assert time.monotonic() - signalled < 30
    finally:
        proc.kill()
    [stopped] = checkpoint_steps(run_dir)
    assert logged_steps(run_dir) == list(range(1, stopped + 1)), proc.output
    assert "left unread" in proc.output and "preempted at step" in proc.output, proc.output
    (tmp_path / "gone").rename(shards)
    assert main([*args, f"train.total_steps={stopped + 2}"]) == EXIT_OK
    assert logged_steps(run_dir) == list(range(1, stopped + 3))


# ------------------------------------------------------------------------- Ctrl-C
def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() \
        else []


def test_ctrl_c_checkpoints_the_step_it_stops_at_and_the_rerun_goes_on_from_there(
        sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = Cli(small(sample_shards, run_dir, "train.total_steps=400",
                     "train.checkpoint_every=200"), new_session=True)
    try:
        proc.wait_for(lambda: len(logged_steps(run_dir)) >= 2, timeout=120)
        # Ctrl-C signals the terminal's whole foreground group: the loader's worker too
        os.killpg(proc.proc.pid, signal.SIGINT)
        assert proc.finish() == EXIT_INTERRUPTED, proc.output
    finally:
        proc.kill()
    [stopped] = checkpoint_steps(run_dir)  # the step it stopped at, not a cadence step
    assert 2 <= stopped < 200 and "interrupted at step" in proc.output
    assert proc.output.count("received SIGINT") == 1, proc.output  # not again by a worker
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == EXIT_INTERRUPTED and summary["final_step"] == stopped
    assert summary["checkpoint"].endswith(f"step-{stopped:08d}.pt")
    assert main(small(sample_shards, run_dir, f"train.total_steps={stopped + 2}")) == EXIT_OK
    assert logged_steps(run_dir) == list(range(1, stopped + 3))  # none lost, none twice


def send_sigint_to_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)  # a Python handler runs in the main thread at the next bytecode


def test_a_stop_signal_cuts_only_a_wait_for_data_short():
    flag = PreemptionFlag("SIGUSR2")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # outside a wait: the flag is set, nothing raised
        assert flag.is_set and flag.requeue
        with pytest.raises(StopWhileWaiting), flag.waiting():
            pytest.fail("no new wait starts once a stop has come")
    finally:
        flag.close()
    flag = PreemptionFlag("SIGUSR2")
    try:
        with pytest.raises(StopWhileWaiting), flag.waiting():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(5)  # the stalled read: cut short at once
        assert flag.received == signal.SIGUSR2
    finally:
        flag.close()


def test_ctrl_c_stops_at_once_in_start_up_and_at_the_second_press():
    # Python's own Ctrl-C, as in a foreground process (a suite run in the background of a
    # script inherits SIGINT ignored, which the flag would rightly leave alone)
    with sigint_handler(signal.default_int_handler):
        flag = PreemptionFlag("SIGUSR2", interrupt=True)
        try:
            with pytest.raises(KeyboardInterrupt):  # start-up: nothing to save
                send_sigint_to_self()
            assert not flag.is_set
            flag.hold_interrupts()  # the training loop
            try:
                send_sigint_to_self()
            except KeyboardInterrupt:
                pytest.fail("the first Ctrl-C in the training loop must only set the flag")
            assert flag.received == signal.SIGINT and not flag.requeue
            with pytest.raises(KeyboardInterrupt):
                send_sigint_to_self()
        finally:
            flag.close()


def test_ctrl_c_is_left_alone_where_it_is_not_asked_for_or_inherited_ignored():
    library = PreemptionFlag("SIGUSR2")  # benchmarks, notebooks: Python's own Ctrl-C
    try:
        assert signal.SIGINT not in library.signals
    finally:
        library.close()
    with sigint_handler(signal.SIG_IGN):  # a background job of a script
        flag = PreemptionFlag("SIGUSR2", interrupt=True)
        assert signal.SIGINT not in flag.signals
        flag.close()


@pytest.mark.parametrize("name", ["SIGINT", "int", "2"])
def test_ctrl_c_cannot_be_the_preemption_signal(name):
    with pytest.raises(ConfigError, match="Ctrl-C, which stops a run without requeueing"):
        PreemptionFlag(name)


# ------------------------------------------------ bad input found after start-up work
def test_an_unreadable_val_set_fails_before_the_first_step(sample_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-val-here"
    code = main(small(sample_shards, run_dir, "train.eval_every=2",
                      f"data.val_shards={missing}"))
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.val_shards" in err[0] and str(missing) in err[0], err
    assert logged_steps(run_dir) == [] and checkpoint_steps(run_dir) == []


def test_resuming_with_another_model_is_one_line_and_leaves_the_run_as_it_was(
        sample_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(small(sample_shards, run_dir, "train.total_steps=2")) == EXIT_OK
    before = {p: digest(p) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    code = main(small(sample_shards, run_dir, "train.total_steps=4",
                      "model.projector=[32, 32]"))
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000002.pt" in err[0], err
    assert "model.projector=[32, 32] (checkpoint had [64, 64, 64])" in err[0], err
    after = {p: digest(p) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # config.yaml, metrics, checkpoints: nothing rewritten or added


def test_a_run_that_fails_records_its_exit_status_in_the_summary(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    not_a_shard = tmp_path / "noise.tar"
    not_a_shard.write_bytes(os.urandom(20_000))
    code = main(small(sample_shards, run_dir, f"data.train_shards={not_a_shard}"))
    assert code == EXIT_BAD_INPUT
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_code"] == EXIT_BAD_INPUT and summary["final_step"] == 0


# --------------------------------------------------- 6: resume with a changed schedule
def expected_lr(sample_shards, run_dir: Path, overrides: list[str], step: int) -> float:
    """The lr a run configured so from the start has at `step` (same factories, tiny model)."""
    cfg = load_config(DEMO, small(sample_shards, run_dir, *overrides)[2:])
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.total_steps)
    scheduler.step_update(step)
    return optimizer.param_groups[0]["lr"]


def logged_lr(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["metrics"]["lr"] for rec in map(json.loads, lines)}


@pytest.mark.parametrize("change", [["train.total_steps=12"],
                                    ["train.total_steps=12", "optim.lr=0.05"]])
def test_resume_follows_a_changed_schedule_from_the_current_step(sample_shards, tmp_path,
                                                                 change):
    run_dir = tmp_path / "run"
    assert main(small(sample_shards, run_dir)) == EXIT_OK  # 6 steps, down to the cosine floor
    floor = logged_lr(run_dir)[6]
    assert main(small(sample_shards, run_dir, *change)) == EXIT_OK
    lr = logged_lr(run_dir)
    for step in (7, 9, 12):
        assert lr[step] == pytest.approx(expected_lr(sample_shards, run_dir, change, step),
                                         rel=1e-6), step
    assert lr[7] > 10 * floor  # the old run's floor was kept before


# ------------------------------------------------------- 7: every checkpoint unreadable
def test_every_checkpoint_unreadable_is_refused_naming_them(sample_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(small(sample_shards, run_dir, "train.total_steps=4")) == EXIT_OK
    ckpts = run_dir / "checkpoints"
    (ckpts / "step-00000004.pt").write_bytes(b"garbage")
    second = ckpts / "step-00000002.pt"
    second.write_bytes(second.read_bytes()[:1000])  # truncated
    before = {p.name: digest(p) for p in ckpts.iterdir()}
    metrics = (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(small(sample_shards, run_dir, "train.total_steps=4")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000004.pt" in err[0] and "step-00000002.pt" in err[0], err
    assert {p.name: digest(p) for p in ckpts.iterdir()} == before  # nothing overwritten
    assert (run_dir / "metrics.jsonl").read_text() == metrics


# ----------------------------------------------------------- 10: batch sizes
@pytest.mark.parametrize("size", [0, 1])
def test_a_batch_too_small_for_batchnorm_is_one_line_naming_the_key(sample_shards, tmp_path,
                                                                    capsys, size):
    code = main(small(sample_shards, tmp_path / "run", f"data.batch_size={size}"))
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    # the override that set it, not the YAML file (which holds a valid batch)
    assert len(err) == 1 and f"override 'data.batch_size={size}'" in err[0], err


# ------------------------------------------------------------ 4: a full file system
@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 24 MB tmpfs (needs root and mount rights; skipped, saying so, without them)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a real full disk: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mount: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); returns it."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * (1 << 16)
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == 28, exc  # ENOSPC
    small_block = b"\0" * 512
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(small_block)
        except OSError:
            pass
    return filler


def assert_whole_json_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # a torn line fails here


@pytest.mark.parametrize("freed", [True, False], ids=["space-freed", "disk-stays-full"])
def test_a_full_disk_outside_the_checkpoint_writer_keeps_training_and_ends_documented(
        sample_shards, small_tmpfs, freed):
    run_dir = small_tmpfs / "run"
    proc = Cli(small(sample_shards, run_dir, "train.total_steps=100000",
                     "train.checkpoint_every=20"))
    try:
        proc.wait_for(lambda: 20 in checkpoint_steps(run_dir))
        filler = fill(small_tmpfs)
        proc.wait_for_line("metrics.jsonl: cannot append")
        proc.wait_for_line("could not write checkpoint")  # a periodic save failed too
        assert proc.proc.poll() is None  # still training
        if freed:
            filler.unlink()
            proc.wait_for_line("appending works again")
        proc.proc.send_signal(signal.SIGTERM)
        code = proc.finish()
    finally:
        proc.kill()
    assert "Traceback" not in proc.output
    records = assert_whole_json_lines(run_dir / "metrics.jsonl")
    steps = checkpoint_steps(run_dir)
    if freed:
        assert code == EXIT_PREEMPTED, proc.output
        assert steps[-1] > 20 and records
        assert load_checkpoint(run_dir / "checkpoints" / f"step-{steps[-1]:08d}.pt")
    else:
        # The preemption checkpoint cannot be written: one line saying so, the old one intact.
        assert code == EXIT_BAD_INPUT, proc.output
        error = [line for line in proc.lines if line.startswith("lsdr: error:")]
        assert len(error) == 1 and "No space left on device" in error[0], proc.output
        assert "step-00000020.pt is intact" in error[0] or steps[-1] > 20
        assert load_checkpoint(run_dir / "checkpoints" / f"step-{steps[-1]:08d}.pt")
    shutil.rmtree(run_dir, ignore_errors=True)
