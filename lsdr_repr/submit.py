"""SLURM submission and status: `lsdr submit CONFIG ...` and `lsdr status RUN_DIR`.

    result = submit("configs/demo.yaml", ["optim.lr=0.1"], SubmitOptions(nodes=2, gpus_per_node=8))
    result.job_id, result.script_path          # RUN_DIR/train.sbatch, RUN_DIR/config.yaml
    format_status(run_status(result.run_dir))  # text for the CLI to print

The batch script is `lsdr_repr/templates/train.sbatch` (also `slurm/train.sbatch`, for hand
submission) with its `#SBATCH` lines and settings block filled in from the config's `slurm`
section and the command-line flags. What reaches a shell or sbatch's own parser is quoted for it:
config values never appear in the script at all (the job reads RUN_DIR/config.yaml and gets its
arguments from `lsdr _job-plan` as NUL-separated data); paths in `#SBATCH` lines are quoted for
sbatch's tokenizer, paths in shell lines with `shlex.quote`. The exceptions are `slurm.setup`
(shell lines by definition) and `slurm.extra_sbatch` (raw sbatch options).

Preemption: the script asks SLURM for the preemption signal (`train.preempt_signal`, SIGUSR2)
`slurm.signal_seconds` before the time limit, delivered to the training tasks (no `B:`); the
trainer checkpoints and exits with `lsdr_repr.preemption.EXIT_PREEMPTED`, and the script requeues its
own job while SLURM_RESTART_COUNT < `slurm.max_requeues`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lsdr_repr.config import Config, check_required, dump_config, load_config
from lsdr_repr.errors import ConfigError, SubmitError
from lsdr_repr.preemption import EXIT_PREEMPTED
from lsdr_repr.rundir import CONFIG_FILE, METRICS_FILE, list_checkpoints

JOBS_FILE = "slurm_jobs.txt"  # one line per job: JOBID <tab> submitted-at <tab> how
SCRIPT_FILE = "train.sbatch"
# SLURM job states after which a job does nothing more (PREEMPTED jobs that SLURM requeues
# show up as PENDING again, so PREEMPTED here means "not requeued").
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
})

_SETTINGS_BLOCK = re.compile(r"^# >>> settings.*?^# <<< settings\n", re.DOTALL | re.MULTILINE)
_SETUP_BLOCK = re.compile(r"^# >>> setup.*?^# <<< setup\n", re.DOTALL | re.MULTILINE)
_SBATCH_PLAIN = re.compile(r"^[A-Za-z0-9_./:@%+,=\-\[\]]+$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.:,\-\[\]|&*()!]+$")  # partition/account/qos/constraint
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_ARRAY = re.compile(r"^[0-9,\-:]+(%\d+)?$")


# ------------------------------------------------------------------------------- options
@dataclass
class SubmitOptions:
    """Command-line flags of `lsdr submit`; None leaves the config's `slurm` value."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool | None = None
    array: str | None = None
    job_name: str | None = None
    python: str | None = None  # interpreter on the compute nodes (default: this one)


@dataclass
class SubmitResult:
    run_dir: Path
    script: str
    job_id: str | None = None  # None for a dry run
    script_path: Path | None = None
    config_path: Path | None = None
    sbatch_command: list[str] = field(default_factory=list)
    log_pattern: str = ""  # RUN_DIR/slurm-JOBID.out
    wandb: str = ""  # where the W&B run goes, in words

    def describe(self) -> str:
        lines = [f"submitted job {self.job_id}"] if self.job_id else []
        out = self.log_pattern
        if self.job_id:
            out = out.replace("%j", self.job_id).replace("%A", self.job_id)
        lines += [
            f"run dir:  {self.run_dir}",
            f"script:   {self.script_path}",
            f"logs:     {out} (and .err)",
            f"W&B:      {self.wandb}",
            f"status:   lsdr status {shlex.quote(str(self.run_dir))}",
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ rendering
def resolve_job_config(
    config: str | Path, overrides: Sequence[str], options: SubmitOptions
) -> Config:
    """The config with the command-line flags written into its `slurm` section, checked."""
    cfg = load_config(config, overrides)
    check_required(cfg, str(config))
    flags = {
        k: v for k, v in dataclasses.asdict(options).items()
        if v is not None and k in {f.name for f in dataclasses.fields(cfg.slurm)}
    }
    cfg.slurm = dataclasses.replace(cfg.slurm, **flags)
    _check_slurm(cfg)
    return cfg


def tasks_per_node(cfg: Config) -> int:
    s = cfg.slurm
    if s.tasks_per_node is not None:
        return s.tasks_per_node
    return s.gpus_per_node if s.gpus_per_node > 0 else 1


def render_script(
    cfg: Config,
    *,
    python: str | None = None,
    workdir: str | Path | None = None,
    array: str | None = None,
    job_name: str | None = None,
) -> str:
    """The batch script for `cfg` (its `slurm` section already holding the flags)."""
    s = cfg.slurm
    run_dir = _abspath(cfg.train.run_dir, workdir)
    log_name = "slurm-%A_%a" if array else "slurm-%j"
    name = job_name or _job_name(run_dir)
    opts: list[tuple[str, str | None]] = [
        ("job-name", name),
        ("nodes", str(s.nodes)),
        ("ntasks-per-node", str(tasks_per_node(cfg))),
    ]
    if s.gpus_per_node > 0:
        opts.append(("gpus-per-node", str(s.gpus_per_node)))
    opts += [("cpus-per-task", str(s.cpus_per_task)), ("time", s.time)]
    for key in ("partition", "account", "qos", "constraint", "mem"):
        value = getattr(s, key)
        if value:
            opts.append((key, value))
    if s.exclusive:
        opts.append(("exclusive", None))
    if array:
        opts.append(("array", array))
    opts += [
        ("signal", f"{_signal_name(cfg.train.preempt_signal)}@{s.signal_seconds}"),
        ("requeue", None),
        ("open-mode", "append"),
        ("chdir", str(_abspath(".", workdir))),
        ("output", _sbatch_filename(run_dir) + f"/{log_name}.out"),
        ("error", _sbatch_filename(run_dir) + f"/{log_name}.err"),
    ]
    lines = [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={_sbatch_quote(v, k)}"
             for k, v in opts]
    for i, extra in enumerate(s.extra_sbatch):
        _no_newline(extra, f"slurm.extra_sbatch[{i}]")
        lines.append(f"#SBATCH {extra}")

    settings = "\n".join([
        "# >>> settings (written by lsdr submit)",
        f"LSDR_PYTHON={shlex.quote(python or sys.executable)}",
        f"LSDR_MAX_REQUEUES={int(s.max_requeues)}",
        f"LSDR_EXIT_PREEMPTED={int(EXIT_PREEMPTED)}  # lsdr_repr.preemption.EXIT_PREEMPTED",
        "# <<< settings",
        "",
    ])
    for i, line in enumerate(s.setup):
        _no_newline(line, f"slurm.setup[{i}]")
    setup = "\n".join(["# >>> setup (slurm.setup)", *s.setup, "# <<< setup", ""])

    text = template_text()
    head, sep, rest = text.partition("\n#SBATCH ")
    if not sep:
        raise SubmitError("the batch script template has no #SBATCH lines")  # a packaging bug
    body = "\n".join(ln for ln in ("#SBATCH " + rest).split("\n") if not ln.startswith("#SBATCH"))
    text = head + "\n" + "\n".join(lines) + "\n" + body
    text = _SETTINGS_BLOCK.sub(lambda _: settings, text, count=1)
    text = _SETUP_BLOCK.sub(lambda _: setup, text, count=1)
    return text


def template_text() -> str:
    return (resources.files("lsdr_repr") / "templates" / "train.sbatch").read_text()


# ------------------------------------------------------------------------------- submit
def submit(
    config: str | Path,
    overrides: Sequence[str] = (),
    options: SubmitOptions | None = None,
    *,
    dry_run: bool = False,
    workdir: str | Path | None = None,
) -> SubmitResult:
    """Render the batch script, write it and the resolved config into the run dir, `sbatch` it.

    A dry run only renders (nothing is written or submitted). sbatch's own error (unknown
    partition, bad time ...) comes back as a one-line `SubmitError`.
    """
    options = options or SubmitOptions()
    workdir = Path(workdir) if workdir is not None else Path.cwd()
    if options.array is not None and not _ARRAY.match(options.array):
        raise SubmitError(f"--array: {options.array!r} is not a SLURM array spec (e.g. 0-3, 1,5,7, "
                          f"0-15%4)")
    cfg = resolve_job_config(config, overrides, options)
    run_dir = _abspath(cfg.train.run_dir, workdir)
    script = render_script(cfg, python=options.python, workdir=workdir, array=options.array,
                           job_name=options.job_name)
    result = SubmitResult(
        run_dir=run_dir, script=script,
        log_pattern=str(run_dir / ("slurm-%A_%a.out" if options.array else "slurm-%j.out")),
        wandb=_describe_wandb(cfg, run_dir),
    )
    config_path = run_dir / CONFIG_FILE
    script_path = run_dir / SCRIPT_FILE
    sbatch_args = ["--parsable", str(script_path), str(config_path)]
    if dry_run:  # what would be written and run, written nowhere
        result.script_path, result.config_path = script_path, config_path
        result.sbatch_command = ["sbatch", *sbatch_args]
        return result

    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: submit from a SLURM login node "
                          "(--dry-run shows the script without SLURM)")
    busy = active_jobs(run_dir)
    if busy:
        j = busy[0]
        raise SubmitError(f"{run_dir} already has job {j.job_id} {j.state}: two jobs must not "
                          f"train in one run dir (scancel {j.job_id}, or set train.run_dir)")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, config_path)
    script_path.write_text(script)
    script_path.chmod(0o755)
    cmd = [sbatch, *sbatch_args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch rejected the job: {_one_line(proc.stderr or proc.stdout)}")
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id:
        raise SubmitError(f"sbatch printed no job id: {_one_line(proc.stderr)}")
    with open(run_dir / JOBS_FILE, "a", encoding="utf-8") as f:
        f.write(f"{job_id}\t{time.strftime('%Y-%m-%dT%H:%M:%S')}\tlsdr submit\n")
    result.job_id, result.script_path, result.config_path = job_id, script_path, config_path
    result.sbatch_command = cmd
    return result


def job_plan(args: Sequence[str], array_task: str = "") -> list[str]:
    """What the batch script needs, computed in Python so the shell never parses config values:
    [log dir, run dir, trainer args...]. Array task i trains in RUN_DIR/task-i with seed + i."""
    if not args:
        raise SubmitError("the batch script needs a config path as its first argument")
    config, overrides = args[0], list(args[1:])
    cfg = load_config(config, overrides)
    check_required(cfg, config)
    log_dir = Path(os.path.abspath(cfg.train.run_dir))
    run_dir = log_dir
    if array_task:
        task = int(array_task)
        run_dir = log_dir / f"task-{task}"
        # JSON strings are YAML scalars: the path survives the override parser whatever it holds.
        overrides += [f"train.run_dir={json.dumps(str(run_dir))}",
                      f"train.seed={cfg.train.seed + task}"]
    return [str(log_dir), str(run_dir), config, *overrides]


# ------------------------------------------------------------------------------- status
@dataclass
class JobInfo:
    job_id: str
    state: str  # RUNNING, PENDING, COMPLETED ... or UNKNOWN
    reason: str = ""
    elapsed: str = ""
    restarts: int | None = None
    exit_code: str = ""
    source: str = ""  # scontrol | sacct | "" (not found)


@dataclass
class RunStatus:
    run_dir: Path
    jobs: list[JobInfo]
    step: int | None = None
    total_steps: int | None = None
    samples_per_s: float | None = None
    metrics_time: float | None = None
    checkpoints: list[str] = field(default_factory=list)
    tasks: list[RunStatus] = field(default_factory=list)  # array tasks (RUN_DIR/task-i)
    loss: float | None = None
    eta_s: float | None = None  # from the step rate of the latest attempt; None when unknown
    knn: dict[str, float] = field(default_factory=dict)  # latest online kNN scores
    knn_step: int | None = None
    rankme: float | None = None  # of the projector output, at the latest training record
    wandb_sync: str | None = None  # the command that uploads every offline piece of the run

    @property
    def finished(self) -> bool:
        return bool(self.jobs) and all(j.state in TERMINAL_STATES for j in self.jobs)


def read_job_ids(run_dir: str | Path) -> list[str]:
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    ids = []
    for line in path.read_text(encoding="utf-8").splitlines():
        job = line.split("\t", 1)[0].strip()
        if job and job not in ids:
            ids.append(job)
    return ids


def query_jobs(job_ids: Sequence[str]) -> list[JobInfo]:
    """State of each job (each task of an array job) from `scontrol show job` (pending, running,
    recently finished), else `sacct` (needs accounting), else UNKNOWN. Never raises for a
    missing SLURM."""
    out: list[JobInfo] = []
    for job_id in job_ids:
        infos = _scontrol_job(job_id) or _sacct_job(job_id)
        out.extend(infos or [JobInfo(job_id, "UNKNOWN", reason="not known to scontrol or sacct")])
    # An array job is recorded once by `lsdr submit` (JOBID) and once per task by the script.
    return list({info.job_id: info for info in out}.values())


def active_jobs(run_dir: str | Path) -> list[JobInfo]:
    """The run dir's jobs that SLURM still knows as pending, running or completing."""
    return [j for j in query_jobs(read_job_ids(run_dir))
            if j.state not in TERMINAL_STATES and j.state != "UNKNOWN"]


def run_status(run_dir: str | Path, *, query_slurm: bool = True) -> RunStatus:
    """Jobs, progress (last step, throughput from metrics.jsonl) and checkpoints of a run dir."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SubmitError(f"{run_dir}: no such run directory")
    ids = read_job_ids(run_dir)
    jobs = query_jobs(ids) if query_slurm else [JobInfo(j, "UNKNOWN") for j in ids]
    status = _progress(run_dir, jobs)
    for task_dir in sorted(run_dir.glob("task-*"), key=_task_index):
        if task_dir.is_dir():
            status.tasks.append(_progress(task_dir, []))
    return status


def _progress(run_dir: Path, jobs: list[JobInfo]) -> RunStatus:
    from lsdr_repr.tracking import wandb_sync_command

    status = RunStatus(run_dir=run_dir, jobs=jobs)
    cfg_path = run_dir / CONFIG_FILE
    if cfg_path.is_file():
        try:
            status.total_steps = load_config(cfg_path).train.total_steps
        except ConfigError:  # a hand-edited config must not break the status line
            status.total_steps = None
    _read_progress(status, _metrics_records(run_dir / METRICS_FILE))
    status.checkpoints = [p.name for _, p in list_checkpoints(run_dir)]
    status.wandb_sync = wandb_sync_command(run_dir)
    return status


def _read_progress(status: RunStatus, records: list[dict]) -> None:
    """Fill the progress fields from metrics.jsonl's records. The file mixes training records
    (loss, samples_per_s every log_every steps) with kNN records and summaries, so each field
    comes from the newest record that has it, not from the last line."""
    if not records:
        return
    last = records[-1]
    status.step, status.metrics_time = int(last.get("step", 0)), last.get("time")
    train_records = [r for r in records if _number(r["metrics"].get("samples_per_s")) is not None]
    for record in reversed(records):
        knn = {k.removeprefix("knn/"): v for k, v in record["metrics"].items()
               if k.startswith("knn/") and _number(v) is not None}
        if knn:
            status.knn, status.knn_step = knn, int(record["step"])
            break
    if not train_records:
        return
    newest = train_records[-1]["metrics"]
    status.samples_per_s = _number(newest.get("samples_per_s"))
    status.loss = _number(newest.get("loss/total", newest.get("loss")))
    status.rankme = _number(newest.get("diag/rankme"))
    status.eta_s = _eta_seconds(train_records, status.total_steps)


def _eta_seconds(train_records: list[dict], total_steps: int | None) -> float | None:
    """Seconds left at the step rate of the latest attempt (wall time, so evaluation pauses
    count). The window stops where the steps go back (a resume repeats the steps after its
    checkpoint) and spans the last 20 records at most, so the rate is the current one."""
    if not total_steps:
        return None
    window = [train_records[-1]]
    for record in reversed(train_records[:-1]):
        if len(window) >= 20 or not (record["step"] < window[-1]["step"]
                                     and record.get("time", 0) < window[-1].get("time", 0)):
            break
        window.append(record)
    newest, oldest = window[0], window[-1]
    if newest["step"] >= total_steps:
        return 0.0
    steps, seconds = newest["step"] - oldest["step"], newest["time"] - oldest["time"]
    if steps <= 0 or seconds <= 0:
        return None
    return (total_steps - newest["step"]) * seconds / steps


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def format_status(status: RunStatus) -> str:
    lines = [f"run dir: {status.run_dir}"]
    if not status.jobs:
        lines.append(f"jobs: none recorded in {JOBS_FILE}")
    for j in status.jobs:
        bits = [f"job {j.job_id}: {j.state}"]
        if j.reason and j.reason not in ("None", "(null)"):
            bits.append(f"reason {j.reason}")
        if j.elapsed:
            bits.append(f"elapsed {j.elapsed}")
        if j.restarts:
            bits.append(f"requeued {j.restarts}x")
        if j.exit_code and j.state in TERMINAL_STATES:
            bits.append(f"exit {j.exit_code}")
        lines.append(", ".join(bits))
    shown = [status, *status.tasks] if status.step is not None or not status.tasks else status.tasks
    for s in shown:
        prefix = "" if s is status else f"{s.run_dir.name}: "
        lines.append(prefix + _progress_line(s))
    return "\n".join(lines)


def _progress_line(s: RunStatus) -> str:
    if s.step is None:
        progress = "no metrics yet"
    else:
        total = f"/{s.total_steps}" if s.total_steps else ""
        progress = f"step {s.step}{total}"
        if s.loss is not None:
            progress += f", loss {s.loss:.4g}"
        if s.samples_per_s is not None:
            progress += f", {s.samples_per_s:.1f} samples/s"
        if s.eta_s is not None:
            progress += ", done" if s.eta_s == 0 else f", eta {_duration(s.eta_s)}"
        if s.metrics_time:
            progress += f", logged {max(0, int(time.time() - s.metrics_time))} s ago"
    parts = [progress]
    if s.knn:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(s.knn.items()))
        parts.append(f"kNN at step {s.knn_step}: {scores}")
    if s.rankme is not None:
        parts.append(f"RankMe {s.rankme:.1f}")
    ckpts = ", ".join(s.checkpoints) if s.checkpoints else "none"
    parts.append(f"checkpoints: {ckpts}")
    line = "; ".join(parts)
    if s.wandb_sync:
        line += f"\nW&B upload: {s.wandb_sync}"
    return line


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def watch(
    run_dir: str | Path,
    on_update: Callable[[RunStatus], None],
    *,
    interval_s: float = 10.0,
    timeout_s: float | None = None,
) -> RunStatus:
    """Poll `run_status` until every job is finished (or `timeout_s`), calling `on_update` when
    the status changes."""
    start = time.monotonic()
    last = None
    while True:
        status = run_status(run_dir)
        # What counts as a change: job states and requeues, progress, checkpoints (not the
        # elapsed-time counters, which change at every poll).
        key = ([(j.job_id, j.state, j.restarts) for j in status.jobs],
               [(s.step, s.checkpoints) for s in (status, *status.tasks)])
        if key != last:
            on_update(status)
            last = key
        if status.finished or (timeout_s is not None and time.monotonic() - start > timeout_s):
            return status
        time.sleep(interval_s)


# ------------------------------------------------------------------------------ helpers
def _check_slurm(cfg: Config) -> None:
    s = cfg.slurm
    if s.nodes < 1:
        raise SubmitError(f"slurm.nodes must be >= 1, got {s.nodes}")
    if s.gpus_per_node < 0:
        raise SubmitError(f"slurm.gpus_per_node must be >= 0, got {s.gpus_per_node}")
    ntasks = tasks_per_node(cfg)
    if ntasks < 1:
        raise SubmitError(f"slurm.tasks_per_node must be >= 1, got {ntasks}")
    if s.gpus_per_node > 0 and ntasks != s.gpus_per_node:
        raise SubmitError(f"slurm.tasks_per_node ({ntasks}) must equal slurm.gpus_per_node "
                          f"({s.gpus_per_node}): each rank drives one GPU")
    if s.cpus_per_task < 1:
        raise SubmitError(f"slurm.cpus_per_task must be >= 1, got {s.cpus_per_task}")
    world = s.nodes * ntasks
    if cfg.data.batch_size % world:
        raise SubmitError(f"data.batch_size {cfg.data.batch_size} is not divisible by the "
                          f"{world} ranks ({s.nodes} nodes x {ntasks}): it is the global batch")
    if s.max_requeues < 0:
        raise SubmitError(f"slurm.max_requeues must be >= 0, got {s.max_requeues}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(s, key)
        if value is not None and not _SLURM_NAME.match(value):
            raise SubmitError(f"slurm.{key}: {value!r} is not a SLURM name")
    if s.mem is not None and not _MEM.match(s.mem):
        raise SubmitError(f"slurm.mem: {s.mem!r} is not a SLURM memory size (e.g. 480G)")
    limit = parse_slurm_time(s.time)
    if limit is None and s.time.strip().upper() not in UNLIMITED_TIMES:
        # Checked here, not left to sbatch: a --dry-run would print it as if it were valid.
        raise SubmitError(f"slurm.time: {s.time!r} is not a SLURM time limit (minutes, M:S, "
                          "H:M:S, D-H, D-H:M or D-H:M:S, e.g. 48:00:00 or 2-00:00:00)")
    if limit is not None and s.signal_seconds >= limit:
        raise SubmitError(f"slurm.signal_seconds ({s.signal_seconds}) must be shorter than the "
                          f"time limit {s.time!r} ({limit} s), or the job is warned at once")
    if s.signal_seconds < 0:
        raise SubmitError(f"slurm.signal_seconds must be >= 0, got {s.signal_seconds}")
    _signal_name(cfg.train.preempt_signal)
    _no_newline(cfg.train.run_dir, "train.run_dir")


UNLIMITED_TIMES = ("INFINITE", "UNLIMITED")  # --time values without a limit


def parse_slurm_time(text: str) -> int | None:
    """SLURM's --time forms in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None if not one
    or unlimited."""
    text = text.strip()
    if text.upper() in UNLIMITED_TIMES:
        return None
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            return None
        days = int(d)
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            return None
        h, m, s = ([int(p) for p in parts] + [0, 0])[:3]
    else:
        parts = text.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            return None
        nums = [int(p) for p in parts]
        h, m, s = {1: (0, nums[0], 0), 2: (0, *nums), 3: tuple(nums)}[len(nums)]
    return ((days * 24 + h) * 60 + m) * 60 + s


def _signal_name(name: str) -> str:
    """'SIGUSR2' / 'USR2' / '12' -> 'USR2', the form sbatch's --signal takes."""
    from lsdr_repr.preemption import parse_signal

    return parse_signal(name).name.removeprefix("SIG")


def _sbatch_quote(value: str, key: str) -> str:
    """A value for an `#SBATCH --key=value` line. sbatch splits these lines itself (not a shell):
    whitespace separates, '...' and "..." group, backslash escapes, an unquoted # starts a
    comment. Anything but plain characters is double-quoted with \\ and " escaped."""
    _no_newline(value, key)
    if _SBATCH_PLAIN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sbatch_filename(path: Path) -> str:
    # sbatch expands %j, %A ... in --output/--error; a literal % in the path is written %%.
    return str(path).replace("%", "%%")


def _no_newline(value: str, key: str) -> None:
    if any(c in value for c in "\n\r\0"):
        raise SubmitError(f"{key}: {value!r} contains a line break or NUL, which a batch "
                          f"script line cannot hold")


def _abspath(path: str | Path, workdir: str | Path | None) -> Path:
    base = Path(workdir) if workdir is not None else Path.cwd()
    return Path(os.path.abspath(base / Path(path).expanduser()))


def _job_name(run_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_dir.name).strip("-")
    return f"lsdr-{name}"[:64] if name else "lsdr"


def _describe_wandb(cfg: Config, run_dir: Path) -> str:
    w = cfg.log.wandb
    if w.mode == "disabled":
        return "disabled (metrics still in RUN_DIR/metrics.jsonl)"
    project = f"{w.entity}/{w.project}" if w.entity else w.project
    name = f", run name {w.name!r}" if w.name else ""
    if w.mode == "offline":
        return (f"offline, project {project}{name}: files in {run_dir / 'wandb'} "
                f"(upload: wandb sync {shlex.quote(str(run_dir / 'wandb'))}/offline-run-*)")
    return f"online, project {project}{name} (falls back to offline in {run_dir / 'wandb'})"


def _one_line(text: str) -> str:
    lines = [re.sub(r"^(sbatch: )?(error: )?", "", ln.strip()) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return "; ".join(dict.fromkeys(lines)) or "no message"


def _task_index(path: Path) -> int:
    tail = path.name.removeprefix("task-")
    return int(tail) if tail.isdigit() else 1 << 30


# metrics.jsonl grows by a line per log_every steps (about 1 MB per 10,000 lines): the tail read
# holds thousands of records, enough for the newest kNN, loss and the rate over the last ones.
_METRICS_TAIL_BYTES = 4 << 20


def _metrics_records(path: Path) -> list[dict]:
    """The complete records of metrics.jsonl (its last 4 MB), oldest first; torn lines skipped."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        start = max(0, size - _METRICS_TAIL_BYTES)
        f.seek(start)
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    if start:
        lines = lines[1:]  # the first line read is a partial one
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) \
                and isinstance(record.get("metrics", {}), dict):
            record.setdefault("metrics", {})
            records.append(record)
    return records


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    exe = shutil.which(cmd[0])
    if exe is None:
        return None
    try:
        return subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _scontrol_job(job_id: str) -> list[JobInfo]:
    proc = _run(["scontrol", "show", "job", "--oneliner", job_id])
    if proc is None or proc.returncode != 0:
        return []
    infos = []
    for line in proc.stdout.strip().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobState" not in fields:
            continue
        task = fields.get("ArrayTaskId")
        restarts = fields.get("Restarts", "")
        infos.append(JobInfo(
            job_id=f"{fields.get('ArrayJobId')}_{task}" if task else job_id,
            state=fields["JobState"],
            reason=fields.get("Reason", ""),
            elapsed=fields.get("RunTime", ""),
            restarts=int(restarts) if restarts.isdigit() else None,
            exit_code=fields.get("ExitCode", ""),
            source="scontrol",
        ))
    return infos


def _sacct_job(job_id: str) -> list[JobInfo]:
    proc = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,Elapsed,ExitCode"])
    if proc is None or proc.returncode != 0:
        return []  # no accounting (sacct: "Slurm accounting storage is disabled")
    infos = []
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 4 and parts[0].split("_")[0] == job_id.split("_")[0]:
            infos.append(JobInfo(parts[0], parts[1].split()[0] if parts[1] else "UNKNOWN",
                                 elapsed=parts[2], exit_code=parts[3], source="sacct"))
    return infos
