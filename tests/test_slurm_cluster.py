"""`lsdr submit` against a real single-node SLURM started by slurm/local-cluster.sh.

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (the script apt-installs them when
missing); without them every test here is skipped with the reason. The training jobs are the
real trainer on CPU: 2 srun tasks, gloo, the demo config shrunk to a few steps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import warnings
from datetime import datetime
from pathlib import Path

import pytest
from run_dirs import checkpoint_steps

from lsdr_repr import submit as sub
from lsdr_repr.errors import SubmitError

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster.sh"
SLURM_DIR = Path(os.environ.get("LSDR_SLURM_DIR", "/tmp/lsdr-slurm"))
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")

# The demo config shrunk so a 2-rank CPU run takes seconds (resnet18 at 24 px, batch 8).
TINY = [
    "data.batch_size=8", "data.image_size=32", "data.num_workers=1", "data.prefetch_factor=2",
    "data.shuffle_buffer=50", "augment.crop_size=24", "model.projector=[64,64]",
    "optim.warmup_steps=2", "train.log_every=1", "train.image_grid_every=0",
    "train.spectrum_every=0", "train.eval_every=0", "log.progress=false",
]


def _missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node cluster; stopped afterwards if this session started it."""
    if os.geteuid() != 0:
        reason = "SLURM CLUSTER TESTS SKIPPED: slurm/local-cluster.sh needs root"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True,
                                 check=False).returncode == 0
    proc = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600,
                          check=False)
    if proc.returncode != 0:
        missing = _missing_binaries()
        if missing:  # apt-get could not install them (no network, no apt): skip, loudly
            reason = (f"SLURM CLUSTER TESTS SKIPPED: {', '.join(missing)} not installed and "
                      f"slurm/local-cluster.sh could not install them: {proc.stderr.strip()}")
            warnings.warn(reason, stacklevel=1)
            pytest.skip(reason)
        pytest.fail(f"local cluster did not start: {proc.stderr.strip()}")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(SLURM_DIR / "etc" / "slurm.conf"))
    yield SLURM_DIR
    mp.undo()
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, check=False, timeout=120)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """`lsdr shards sample` output (train/val/test shard dirs), small images for speed."""
    from data_pipelines.sample import write_sample_shards

    root = tmp_path_factory.mktemp("sample")
    write_sample_shards(root / "sample", image_size=32)
    return root / "sample"


def _demo_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={json.dumps(str(data / 'train'))}", "data.val_shards=null",
            "data.test_shards=null", f"train.run_dir={json.dumps(str(run_dir))}", *TINY, *extra]


def _job(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id],
                          capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _wait(job_id: str, run_dir: Path, timeout: float, until=None) -> dict[str, str]:
    """Poll until the job is finished (or `until(job)` is true); on timeout cancel and fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(job_id)
        if (until and until(job)) or (not until and job["JobState"] in sub.TERMINAL_STATES):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} still {job['JobState']} after {timeout} s\n{_logs(run_dir, job_id)}")


def _logs(run_dir: Path, job_id: str) -> str:
    out = []
    for suffix in ("out", "err"):
        path = run_dir / f"slurm-{job_id}.{suffix}"
        out.append(f"--- {path.name}\n" + (path.read_text()[-6000:] if path.exists() else "(none)"))
    return "\n".join(out)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            continue
    return steps


def test_dry_run_of_4_nodes_x_8_gpus_is_a_valid_sbatch_script(slurm_cluster, tmp_path):
    """The 4x8 request itself cannot fit this 2-CPU, GPU-less node; what we can check honestly:
    (1) sbatch parses every line and the controller rejects it for resources, not syntax;
    (2) the same script with only the resource lines overridden on the command line (which wins
    over #SBATCH) is accepted by the controller as it stands: signal, requeue, open-mode, chdir,
    output/error paths (with spaces and quotes), time, exclusive, job name."""
    run_dir = tmp_path / 'big run "x"'
    proc = subprocess.run(
        [sys.executable, "-m", "lsdr_repr", "submit", str(REPO / "configs" / "demo.yaml"),
         f"train.run_dir={json.dumps(str(run_dir))}", "data.batch_size=256",
         "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12", "--mem", "400G",
         "--time", "2-00:00:00", "--exclusive", "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path, check=True,
    )
    script = tmp_path / "big.sbatch"
    script.write_text(proc.stdout)
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n" \
        in proc.stdout

    full = subprocess.run(["sbatch", "--test-only", str(script), "cfg.yaml"],
                          capture_output=True, text=True, check=False)
    assert full.returncode == 1, full.stderr  # 255 would be sbatch's own parse failure
    assert re.search(r"(?i)gres|node configuration|requested node|resources", full.stderr), \
        full.stderr
    assert not re.search(r"(?i)unrecognized|invalid --|unmatched|unexpected", full.stderr)

    shrunk = subprocess.run(
        ["sbatch", "--test-only", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
         "--cpus-per-task=1", "--mem=100M", str(script), "cfg.yaml"],
        capture_output=True, text=True, check=False)
    assert shrunk.returncode == 0, shrunk.stderr
    assert "to start at" in shrunk.stderr


@pytest.mark.parametrize(("options", "expected"), [
    (sub.SubmitOptions(partition="nosuchpartition"), "invalid partition"),
    (sub.SubmitOptions(constraint="nosuchfeature"), "feature"),
])
def test_sbatch_rejection_is_one_clear_line(slurm_cluster, tmp_path, options, expected):
    run_dir = tmp_path / "run"
    with pytest.raises(SubmitError, match=f"(?i){expected}") as info:
        sub.submit(REPO / "configs" / "demo.yaml", _demo_overrides(tmp_path, run_dir),
                   options, workdir=tmp_path)
    assert "\n" not in str(info.value) and "sbatch rejected the job" in str(info.value)


def test_two_rank_cpu_run_completes_with_hostile_values(slurm_cluster, sample_data, tmp_path):
    """`lsdr submit` of the demo config: 2 tasks (gloo) to completion; spaces, quotes, `$(...)`,
    backticks and `;` in the run dir and W&B name/tags reach the trainer literally."""
    marker = Path("/tmp") / f"lsdr-pw-{uuid.uuid4().hex[:8]}"
    hostile = f"a b 'q' \"dq\" $(touch {marker}) `touch {marker}`; touch {marker}"
    tags = [f"$(touch {marker})", f"`touch {marker}`; x", "$HOME"]  # W&B: tags <= 64 chars
    run_dir = tmp_path / "runs" / "r $(touch x) 'q' `y`; z"
    total = 4
    overrides = _demo_overrides(
        sample_data, run_dir, f"train.total_steps={total}", "train.checkpoint_every=2",
        "train.keep_checkpoints=3", f"log.wandb.name={json.dumps(hostile)}",
        f"log.wandb.tags={json.dumps(tags)}")
    proc = subprocess.run(
        [sys.executable, "-m", "lsdr_repr", "submit", str(REPO / "configs" / "demo.yaml"),
         *overrides, "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "00:10:00",
         "--watch", "--interval", "1"],
        capture_output=True, text=True, cwd=tmp_path, check=False, timeout=150,
    )
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    # --watch follows the job to its end and exits 0 only if it COMPLETED.
    assert proc.returncode == 0, proc.stdout + proc.stderr + _logs(run_dir, job_id)
    assert f"logs:     {run_dir}/slurm-{job_id}.out" in proc.stdout
    assert f"job {job_id}: RUNNING" in proc.stdout and f"job {job_id}: COMPLETED" in proc.stdout
    assert _job(job_id)["JobState"] == "COMPLETED"
    assert not marker.exists()

    from lsdr_repr.checkpoint import load_checkpoint

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step-00000002.pt", "step-00000002.pt.sha256",
                     "step-00000004.pt", "step-00000004.pt.sha256"]
    state = load_checkpoint(run_dir / "checkpoints" / "step-00000004.pt")
    assert state["step"] == total and state["world_size"] == 2
    assert len(state["rng"]) == 2 and len(state["data_state"]) == 2
    # What the trainer itself received (it saves its own config in the checkpoint):
    assert state["config"]["log"]["wandb"]["name"] == hostile
    assert state["config"]["log"]["wandb"]["tags"] == tags
    assert state["config"]["train"]["run_dir"] == str(run_dir)
    assert (run_dir / f"slurm-{job_id}.out").exists() and (run_dir / f"slurm-{job_id}.err").exists()

    status = sub.run_status(run_dir)
    assert status.jobs[0].job_id == job_id and status.jobs[0].state == "COMPLETED"
    assert sub.active_jobs(run_dir) == []  # finished: the run dir may be submitted again
    assert status.step == total and status.total_steps == total
    assert status.checkpoints == ["step-00000002.pt", "step-00000004.pt"]


def _stamp(line: str) -> float:
    """Time of a batch-script line `[2025-01-01T12:00:00.123] lsdr job: ...`."""
    return datetime.fromisoformat(re.match(r"\[([^\]]+)\]", line).group(1)).timestamp()


def _log_time(text: str, message: str, after: float) -> float:
    """Time of the first trainer log line (`HH:MM:SS [rank R] LEVEL name: message`, the rank
    only under srun or torchrun) at or after `after`
    (the logging format has no date, and only whole seconds)."""
    day = datetime.fromtimestamp(after).strftime("%Y-%m-%d")
    pattern = rf"(?m)^(\d\d:\d\d:\d\d) (?:\[rank \d+\] )?\w+ \S+: {re.escape(message)}"
    for hms in re.findall(pattern, text):
        t = datetime.strptime(f"{day} {hms}", "%Y-%m-%d %H:%M:%S").timestamp()
        if t >= int(after):
            return t
    raise AssertionError(f"no log line '{message}' after {after}")


def _signal_past(job_id: str, run_dir: Path, step: int, sig: str) -> float:
    """Once the run has logged a step beyond `step`, `scancel --signal=SIG` the job (its steps:
    every task on every node, not the batch shell); returns the signal's time."""
    deadline = time.monotonic() + 90
    while not any(logged > step for logged in _steps(run_dir)):
        assert time.monotonic() < deadline, _logs(run_dir, job_id)
        # (between the two runs a requeued job passes through COMPLETING and PENDING)
        assert _job(job_id)["JobState"] not in sub.TERMINAL_STATES, _logs(run_dir, job_id)
        time.sleep(0.2)
    t_signal = time.time()
    subprocess.run(["scancel", f"--signal={sig}", job_id], check=True)
    return t_signal


def test_preempted_job_checkpoints_requeues_and_resumes_twice(slurm_cluster, sample_data,
                                                               tmp_path):
    """A 2-node job preempted twice: USR2 mid-run (what --signal=USR2@120 delivers before the
    time limit, and what a preempting cluster with PreemptParameters=send_user_signal sends),
    then TERM once the requeued job has gone on (what preemption sends otherwise). Each time:
    checkpoint, exit 3, `scontrol requeue`, resume from exactly that checkpoint; the job ends
    COMPLETED at total_steps with every step logged once. One job for both signals: a cold
    start of two ranks is most of such a test's time."""
    run_dir = tmp_path / "preempt twice"
    total = 16
    result = sub.submit(
        REPO / "configs" / "demo.yaml",
        _demo_overrides(sample_data, run_dir, f"train.total_steps={total}",
                        "train.checkpoint_every=100", "train.keep_checkpoints=5"),
        # Two nodes (two slurmd on this machine) x one rank: the signal reaches both nodes' tasks.
        sub.SubmitOptions(nodes=2, gpus_per_node=0, tasks_per_node=1, time="00:10:00"),
        workdir=tmp_path,
    )
    job_id = result.job_id
    # A second job in the same run dir would train over this one: refused while it is active.
    with pytest.raises(SubmitError, match=f"already has job {job_id} (PENDING|RUNNING)"):
        sub.submit(REPO / "configs" / "demo.yaml", _demo_overrides(sample_data, run_dir),
                   sub.SubmitOptions(gpus_per_node=0, tasks_per_node=1), workdir=tmp_path)
    t_signal = _signal_past(job_id, run_dir, 1, "USR2")  # once training is under way

    # The second signal once the restarted job has logged a step past the first checkpoint.
    _wait(job_id, run_dir, timeout=150,
          until=lambda j: j["Restarts"] == "1" or j["JobState"] in ("FAILED", "CANCELLED"))
    first = checkpoint_steps(run_dir)
    assert len(first) == 1, (first, _logs(run_dir, job_id))
    # room for a step past the checkpoint and a signal well before the last step (a TERM in the
    # final step ends the run complete, with 0, and there would be no second requeue)
    assert first[0] + 2 <= total - 4, (first, _logs(run_dir, job_id))
    t_term = _signal_past(job_id, run_dir, first[0] + 1, "TERM")

    job = _wait(job_id, run_dir, timeout=150,
                until=lambda j: j["JobState"] in sub.TERMINAL_STATES and j["Restarts"] == "2"
                or j["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT"))
    logs = _logs(run_dir, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "2", logs

    out = (run_dir / f"slurm-{job_id}.out").read_text().splitlines()
    err = (run_dir / f"slurm-{job_id}.err").read_text()
    starts = [ln for ln in out if "start (restart" in ln]
    assert len(starts) == 3 and "(restart 1)" in starts[1] and "(restart 2)" in starts[2], logs
    assert "on 2 node(s)" in starts[0], logs
    requeue = next(ln for ln in out if "requeueing job" in ln)
    ended = [ln.rsplit(" ", 1)[-1] for ln in out if "training step ended with status" in ln]
    assert ended == ["3", "3", "0"], logs

    # The checkpoints written on the signals, and each resume from exactly that step.
    from lsdr_repr.checkpoint import load_checkpoint

    steps = checkpoint_steps(run_dir)
    assert len(steps) == 3 and steps[-1] == total and 2 <= steps[0] < steps[1] < total, steps
    for step in steps:  # sha256 verified, weights_only load: none is corrupt
        path = run_dir / "checkpoints" / f"step-{step:08d}.pt"
        assert load_checkpoint(path)["step"] == step
    stops = re.findall(r"\[rank 0\] WARNING \S+: preempted at step (\d+): checkpoint .* exiting "
                       r"with 3", err)
    assert stops == [str(steps[0]), str(steps[1])], logs  # one per signal, at its checkpoint
    resumed = re.findall(r"(\[rank \d\]) INFO \S+: resumed from .* at step (\d+)", err)
    # once per restart, by rank 0: the other ranks log warnings and errors only (lsdr_repr.cli)
    assert resumed == [("[rank 0]", str(steps[0])), ("[rank 0]", str(steps[1]))], logs
    assert _steps(run_dir) == list(range(1, total + 1))  # every step once, none past total

    # Timeline of the first preemption (seconds after the signal), for the record (pytest -s).
    timeline = {
        "checkpoint written": _mtime(run_dir, steps[0]) - t_signal,
        "requeue issued": _stamp(requeue) - t_signal,
        "job restarted": _stamp(starts[1]) - t_signal,
        "resumed at step": _log_time(err, "resumed from", _stamp(starts[1])) - t_signal,
    }
    print("\npreemption timeline (s after SIGUSR2):",
          ", ".join(f"{k} {v:.1f}" for k, v in timeline.items()))
    assert 0 <= timeline["checkpoint written"] < 30
    assert 0 <= _mtime(run_dir, steps[1]) - t_term < 30  # the TERM's checkpoint, as promptly
    assert timeline["requeue issued"] < timeline["job restarted"]


def _mtime(run_dir: Path, step: int) -> float:
    return (run_dir / "checkpoints" / f"step-{step:08d}.pt").stat().st_mtime


def test_nodes_that_cannot_reach_the_master_fail_fast(slurm_cluster, tmp_path):
    """Partition `nodns` puts rank 0 on node `lsdr-nodns`, a name no resolver knows: the batch
    script's check fails the job within seconds, with the reason, before any training starts
    (and the job is not requeued)."""
    run_dir = tmp_path / "nodns"
    result = sub.submit(
        REPO / "configs" / "demo.yaml", _demo_overrides(tmp_path, run_dir),
        sub.SubmitOptions(nodes=2, gpus_per_node=0, tasks_per_node=1, partition="nodns",
                          time="00:05:00"),
        workdir=tmp_path,
    )
    start = time.monotonic()
    job = _wait(result.job_id, run_dir, timeout=60)
    elapsed = time.monotonic() - start
    logs = _logs(run_dir, result.job_id)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", logs
    err = (run_dir / f"slurm-{result.job_id}.err").read_text()
    assert "cannot resolve the master host lsdr-nodns" in err, logs
    assert "the nodes cannot reach the master host lsdr-nodns; not training" in err, logs
    assert not (run_dir / "metrics.jsonl").exists()
    assert elapsed < 30


def test_hand_submitted_script_logs_into_the_run_dir(slurm_cluster, tmp_path):
    """`sbatch slurm/train.sbatch CONFIG key=value` (resources on sbatch's command line): the job
    moves its output into RUN_DIR, records itself for `lsdr status`, and hands the trainer's exit
    status (here 2: the shards do not exist) back without requeueing."""
    run_dir = tmp_path / "by hand"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=00:05:00", str(REPO / "slurm" / "train.sbatch"),
         str(REPO / "configs" / "demo.yaml"), f"train.run_dir={run_dir}",
         f"data.train_shards={tmp_path / 'no shards here'}"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env=dict(os.environ, LSDR_PYTHON=sys.executable),
    )
    job_id = proc.stdout.strip()
    job = _wait(job_id, run_dir, timeout=60)
    logs = _logs(run_dir, job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0" and job["Restarts"] == "0"
    first = (tmp_path / f"slurm-{job_id}.out").read_text()  # sbatch's default, in the cwd
    assert f"output continues in {run_dir}/slurm-{job_id}.out" in first
    out = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "start (restart 0)" in out and "training step ended with status 2" in out, logs
    assert "no shards here" in (run_dir / f"slurm-{job_id}.err").read_text(), logs
    status = sub.run_status(run_dir)
    assert [(j.job_id, j.state) for j in status.jobs] == [(job_id, "FAILED")]


def test_time_limit_signal_reaches_the_trainer(slurm_cluster, sample_data, tmp_path):
    """The rendered `#SBATCH --signal=USR2@15` itself, with a 1-minute limit: slurmctld checks
    time limits every 30 s and sends the signal at the first check within signal + 30 s of the
    end (15-45 s after the start here). The trainer checkpoints and exits 3; with
    slurm.max_requeues=0 the script gives up instead of requeueing (job FAILED, exit 3)."""
    run_dir = tmp_path / "timer"
    result = sub.submit(
        REPO / "configs" / "demo.yaml",
        _demo_overrides(sample_data, run_dir, "train.total_steps=5000",
                        "train.checkpoint_every=10000", "slurm.signal_seconds=15",
                        "slurm.max_requeues=0"),
        sub.SubmitOptions(gpus_per_node=0, tasks_per_node=1, time="00:01:00"),
        workdir=tmp_path,
    )
    assert "#SBATCH --signal=USR2@15\n" in result.script
    job = _wait(result.job_id, run_dir, timeout=75)
    logs = _logs(run_dir, result.job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "3:0", "0"), logs
    out = (run_dir / f"slurm-{result.job_id}.out").read_text()
    err = (run_dir / f"slurm-{result.job_id}.err").read_text()
    assert "received SIGUSR2" in err, logs
    assert "preempted, but already requeued 0 times (slurm.max_requeues); giving up" in err, logs
    ckpts = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert len(ckpts) == 1, logs
    from lsdr_repr.checkpoint import load_checkpoint

    step = load_checkpoint(ckpts[0])["step"]
    assert 0 < step < 5000 and _steps(run_dir)[-1] == step
    start = next(ln for ln in out.splitlines() if "start (restart 0)" in ln)
    print(f"\ntime-limit signal: checkpoint at step {step}, "
          f"{ckpts[0].stat().st_mtime - _stamp(start):.1f} s after the job started")


def test_status_of_a_job_slurm_no_longer_knows(slurm_cluster, tmp_path):
    """Past MinJobAge `scontrol` forgets a job and, without accounting, `sacct` has nothing:
    the state is UNKNOWN (said so), and it does not block a new submission."""
    run_dir = tmp_path / "old run"
    run_dir.mkdir()
    (run_dir / sub.JOBS_FILE).write_text("999999\t2020-01-01T00:00:00\tlsdr submit\n")
    sacct = subprocess.run(["sacct", "-j", "999999"], capture_output=True, text=True,
                           check=False)
    assert sacct.returncode != 0  # accounting is off on the local cluster
    status = sub.run_status(run_dir)
    assert [(j.job_id, j.state) for j in status.jobs] == [("999999", "UNKNOWN")]
    assert "not known to scontrol or sacct" in sub.format_status(status)
    assert sub.active_jobs(run_dir) == []
