"""Experiment tracking on rank 0: W&B (offline by default), RUN_DIR/metrics.jsonl and progress.

    tracker = make_tracker(cfg.log, config_to_dict(cfg), run_dir, rank, run_id=ckpt_run_id)
    tracker.log({"loss": 1.2, "perf/samples_per_s": 512.0}, step=120)
    tracker.log_images("views", grid_images, step=120)        # [N,3,H,W] in [0,1]
    tracker.log_spectrum(eigenvalues, step=120)
    tracker.finish()

Every `log` call also appends one JSON line to RUN_DIR/metrics.jsonl (`{"step", "time",
"metrics"}`), which `lsdr status` reads without W&B. The W&B mode is `log.wandb.mode` unless the
environment says otherwise (WANDB_MODE, WANDB_DISABLED); W&B files land in RUN_DIR/wandb/. The run
id is kept in RUN_DIR/wandb_run_id.txt, so a resumed job continues the same W&B run even when it
stopped before its first checkpoint. This module and distributed.py are the only ones that read
the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import os
import secrets
import shlex
import string
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsdr_repr.errors import ConfigError
from lsdr_repr.rundir import METRICS_FILE

if TYPE_CHECKING:
    from typing_extensions import Self

    from lsdr_repr.config import LogConfig

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"
SUMMARY_FILE = "summary.json"

_MODE_ALIASES = {"offline": "offline", "dryrun": "offline", "online": "online", "run": "online",
                 "disabled": "disabled"}
_TRUE = {"1", "true", "yes", "on"}


# ----------------------------------------------------------------------------------- trackers
class Tracker:
    """The tracker interface; this base does nothing (what ranks != 0 get, see `NullTracker`)."""

    run_id: str | None = None
    run_path: str | None = None  # offline run directory or online URL, for printing

    def log(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        """Scalars for one step (tensors are turned into floats)."""

    def log_images(
        self, key: str, images: torch.Tensor, step: int, nrow: int | None = None,
        row_labels: list[str] | None = None, col_labels: list[str] | None = None,
    ) -> None:
        """An image grid of `images` [N,3,H,W] (or [N,1,H,W]) with values in [0,1], `nrow`
        images per row (default: a near-square grid; pass the per-view count to get one view
        per row), labelled along the side and the top when labels are given."""

    def log_spectrum(self, eigenvalues: torch.Tensor, step: int, key: str = "spectrum",
                     num_samples: int | None = None, rankme: float | None = None) -> None:
        """A log-scale plot of covariance eigenvalues [D] (any order, sorted here) of a batch of
        `num_samples`: only the min(D, N - 1) a batch can resolve, the rank marked."""

    def log_plot(self, key: str, image: Any, step: int) -> None:
        """A rendered plot (uint8 numpy [H,W,3])."""

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Run-level values (final metrics): into the W&B summary and RUN_DIR/summary.json."""

    def finish(self, exit_code: int | None = None) -> None:
        """Close the run (idempotent); a non-zero `exit_code` marks the W&B run failed."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)


class NullTracker(Tracker):
    """No-op tracker for ranks != 0."""


class RunTracker(Tracker):
    """Rank 0's tracker: metrics.jsonl always, W&B unless its mode is "disabled"."""

    def __init__(self, run_dir: str | Path, wandb_run: Any = None, run_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb_run
        self.run_id = run_id
        if wandb_run is None:
            self.run_path = None
        elif wandb_run.offline:
            self.run_path = str(Path(wandb_run.dir).parent)
        else:
            self.run_path = wandb_run.url
        self._runlog = RunLog(self.run_dir / METRICS_FILE)
        self._finished = False

    def log(self, metrics: Mapping[str, float | torch.Tensor], step: int) -> None:
        values = {key: _to_float(key, value) for key, value in metrics.items()}
        self._runlog.append(step, values)
        self._wandb(lambda run: run.log(values, step=step))

    def log_images(
        self, key: str, images: torch.Tensor, step: int, nrow: int | None = None,
        row_labels: list[str] | None = None, col_labels: list[str] | None = None,
    ) -> None:
        if self._run is None:
            return
        import wandb

        if row_labels or col_labels:
            grid = labelled_grid(images, nrow, row_labels, col_labels, title=f"{key}, step {step}")
        else:
            grid = image_grid(images, nrow)
        self._wandb(lambda run: run.log({key: wandb.Image(grid, caption=f"step {step}")}, step=step))

    def log_spectrum(self, eigenvalues: torch.Tensor, step: int, key: str = "spectrum",
                     num_samples: int | None = None, rankme: float | None = None) -> None:
        if self._run is None:
            return
        plot = spectrum_plot(eigenvalues, title=f"embedding covariance spectrum, step {step}",
                             num_samples=num_samples, rankme=rankme)
        self.log_plot(key, plot, step)

    def log_plot(self, key: str, image: Any, step: int) -> None:
        if self._run is None:
            return
        import wandb

        self._wandb(lambda run: run.log({key: wandb.Image(image)}, step=step))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        values = {key: _plain(value) for key, value in summary.items()}
        path = self.run_dir / SUMMARY_FILE
        merged = {}
        if path.is_file():
            try:
                merged = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("%s is unreadable; starting it again", path)
        merged.update(values)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError as exc:  # a full disk at the end of a run must not hide how it ended
            tmp.unlink(missing_ok=True)
            log.error("%s: cannot be written (%s); the summary is in the log only: %s", path,
                      exc.strerror or exc, json.dumps(values, sort_keys=True))
        self._wandb(lambda run: run.summary.update(values))

    def finish(self, exit_code: int | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        self._runlog.close()
        self._wandb(lambda run: run.finish(exit_code=exit_code))

    def _wandb(self, call: Any) -> None:
        """Run `call(run)` unless W&B is off. If W&B's service has gone (under SLURM the job's
        SIGTERM reaches wandb-core too), say so once and go on with metrics.jsonl alone: losing
        the dashboard must not lose the checkpoint that preemption is about to write."""
        if self._run is None:
            return
        try:
            call(self._run)
        except Exception as exc:  # noqa: BLE001 - wandb raises many types (its own, OSError...)
            log.error("W&B stopped working (%s); metrics go on to %s only",
                      _first_line(exc), self.run_dir / METRICS_FILE)
            self._run = None


class RunLog:
    """Appends one JSON line per `append` call: {"step", "time", "metrics"}.

    Non-finite values are written as the strings "nan", "inf", "-inf" (strict JSON, still legible).
    A failed write (a full disk) never stops training and never leaves a torn line: the file is
    cut back to its last complete line, the failure is logged once, and later appends retry (the
    lines of the steps in between are lost; W&B, if on, still has them).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # Unbuffered: each line is one write(), so a failure is known at once and can be undone.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - open for the run
        self._failing = False

    def append(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "time": round(time.time(), 3),
                  "metrics": {k: _json_number(v) for k, v in metrics.items()}}
        line = (json.dumps(record) + "\n").encode()
        end = os.fstat(self._file.fileno()).st_size
        try:
            written = self._file.write(line)  # `lsdr status` and `tail -f` read it as it goes
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            self._cut_back(end)
            if not self._failing:
                log.error("%s: cannot append the metrics of step %d (%s); training goes on, "
                          "the next lines are retried", self.path, step, exc.strerror or exc)
            self._failing = True
            return
        if self._failing:
            log.warning("%s: appending works again from step %d", self.path, step)
        self._failing = False

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self._file.fileno(), size)
        except OSError as exc:  # should not happen: truncation frees space
            log.error("%s: could not remove a partly written line: %s", self.path, exc)

    def close(self) -> None:
        self._file.close()


def read_run_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, in order; a torn last line (a kill) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def offline_run_dirs(run_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Every W&B offline directory of the run (RUN_DIR/wandb/offline-run-<time>-<id>[-<n>]),
    oldest first. W&B opens a new one at each resume, evaluation and demo re-run, all with the
    same id: the run's history is spread over all of them."""
    run_dir = Path(run_dir)
    run_id = run_id or read_run_id(run_dir)
    if not run_id:
        return []
    found = []
    for path in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*"):
        # offline-run-<yyyymmdd>_<hhmmss>-<id> or ...-<id>-<n>: nothing else (a longer id)
        tail = path.name.split("-", 3)[-1] if path.name.count("-") >= 3 else ""
        if path.is_dir() and not path.is_symlink() and (
            tail == run_id or (tail.startswith(run_id + "-") and tail[len(run_id) + 1:].isdigit())
        ):
            found.append(path)
    # the timestamp sorts by time; W&B's "-1" suffix (same second) sorts after its base
    return sorted(found, key=lambda p: (p.name.split("-")[2], len(p.name), p.name))


def wandb_sync_command(run_dir: str | Path, run_id: str | None = None) -> str | None:
    """The shell command that uploads every offline piece of the run, or None (no offline run).

    A glob, not the newest directory: `wandb sync` of the newest piece alone would upload only
    what the last process logged (after a demo re-run: the evaluation, not the training curves).
    The shell expands it in time order, which is the order the pieces must be replayed in.
    """
    run_dir = Path(run_dir)
    run_id = run_id or read_run_id(run_dir)
    if not run_id or not offline_run_dirs(run_dir, run_id):
        return None
    return f"wandb sync {shlex.quote(str(run_dir / 'wandb'))}/offline-run-*-{shlex.quote(run_id)}*"


# -------------------------------------------------------------------------------- the factory
def make_tracker(
    log_cfg: LogConfig,
    config_dict: Mapping[str, Any],
    run_dir: str | Path,
    rank: int,
    run_id: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Tracker:
    """Rank 0: a `RunTracker` (W&B in the resolved mode + metrics.jsonl); other ranks: NullTracker.

    `run_id` (from a checkpoint) wins over RUN_DIR/wandb_run_id.txt; with neither a new id is made.
    An online run that cannot start (no API key, no network) falls back to offline with a warning,
    so a long job is not lost to a tracking outage; `wandb sync RUN_DIR/wandb/offline-run-*`
    uploads it later.
    """
    if rank != 0:
        return NullTracker()
    environ = os.environ if environ is None else environ
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mode = resolve_wandb_mode(log_cfg.wandb.mode, environ)
    if mode == "disabled":
        return RunTracker(run_dir, None, run_id or read_run_id(run_dir))
    run_id = run_id or read_run_id(run_dir) or new_run_id()
    write_run_id(run_dir, run_id)
    run = _init_wandb(log_cfg, dict(config_dict), run_dir, run_id, mode)
    return RunTracker(run_dir, run, run.id)


def resolve_wandb_mode(configured: str, environ: Mapping[str, str]) -> str:
    """offline | online | disabled: WANDB_DISABLED, then WANDB_MODE, then the config."""
    if environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled"
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        if env_mode not in _MODE_ALIASES:
            known = ", ".join(sorted(_MODE_ALIASES))
            raise ConfigError(f"environment: WANDB_MODE={env_mode!r} is not one of {known}")
        return _MODE_ALIASES[env_mode]
    if configured not in _MODE_ALIASES:
        raise ConfigError(f"config: log.wandb.mode: unknown mode {configured!r}")
    return _MODE_ALIASES[configured]


def read_run_id(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_run_id(run_dir: str | Path, run_id: str) -> None:
    path = Path(run_dir) / RUN_ID_FILE
    if read_run_id(run_dir) == run_id:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


def new_run_id() -> str:
    """8 lowercase letters and digits, as W&B makes them (valid in URLs and directory names)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _init_wandb(log_cfg: LogConfig, config: dict, run_dir: Path, run_id: str, mode: str) -> Any:
    import wandb

    w = log_cfg.wandb
    for tag in w.tags:
        if not 1 <= len(tag) <= 64:  # W&B's own limit; its pydantic error is a page long
            raise ConfigError(f"log.wandb.tags: tag {tag!r} has {len(tag)} characters; "
                              "W&B accepts 1 to 64")
    settings = wandb.Settings(
        silent=True,  # our own logging says what matters; W&B's banners clutter SLURM logs
        console="off",  # stdout is the SLURM log and the tqdm bar: no capture, no rewrapping
        disable_job_creation=True,
    )
    kwargs: dict[str, Any] = {
        "project": w.project, "entity": w.entity, "name": w.name, "group": w.group,
        "tags": list(w.tags) or None, "config": config, "dir": str(run_dir), "id": run_id,
        "resume": "allow",
        "reinit": "create_new",  # never finish or reuse a run the host program may hold
        "settings": settings,
    }
    try:
        return wandb.init(mode=mode, **kwargs)
    except Exception as exc:
        if mode != "online":
            raise
        log.warning("W&B online run could not start (%s); logging offline to %s/wandb instead "
                    "(upload later with `wandb sync`)", _first_line(exc), run_dir)
        return wandb.init(mode="offline", **kwargs)


# --------------------------------------------------------------------------------- rendering
def image_grid(images: torch.Tensor, nrow: int | None = None) -> Any:
    """images [N,C,H,W] (C = 1 or 3) in [0,1] -> uint8 numpy grid [H',W',3] (near-square)."""
    from torchvision.utils import make_grid

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"log_images expects [N,3,H,W] or [N,1,H,W], got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(0.0, 1.0)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)  # [3,H',W']
    return (grid.permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


def resolvable_spectrum(eigenvalues: torch.Tensor, num_samples: int | None = None
                        ) -> tuple[Any, int]:
    """(the min(D, N - 1) largest eigenvalues, descending, as float64 numpy; the numerical
    rank: how many exceed 1e-6 of the largest). N = `num_samples` (None: keep all D)."""
    values = eigenvalues.detach().double().cpu().flatten()
    values = torch.sort(values, descending=True).values.numpy()
    keep = values.size if num_samples is None else max(1, min(values.size, num_samples - 1))
    values = values[:keep]
    top = float(values[0]) if values.size and math.isfinite(values[0]) else 0.0
    rank = int((values > 1e-6 * top).sum()) if top > 0 else 0
    return values, rank


def spectrum_plot(eigenvalues: torch.Tensor, title: str = "covariance spectrum",
                  num_samples: int | None = None, rankme: float | None = None) -> Any:
    """eigenvalues [D] -> RGB uint8 numpy image [H,W,3] of the sorted spectrum on a log scale.

    A batch of N embeddings has a centred covariance of rank at most N - 1: the eigenvalues past
    it are rounding noise (1e-30 and below), which on a log axis looks like a collapse. Only
    the min(D, N - 1) resolvable ones are drawn (all of them when `num_samples` is None); the
    numerical rank (eigenvalues above 1e-6 of the largest) is marked, and RankMe, when given,
    goes in the title. Uses the Agg canvas directly (no pyplot): no global figure state.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    total = eigenvalues.numel()
    values, rank = resolvable_spectrum(eigenvalues, num_samples)
    resolvable = values.size
    top = values[0] if values.size and np.isfinite(values[0]) else 0.0
    floor = top * 1e-7 if top > 0 else 1e-12
    shown = np.maximum(np.nan_to_num(values, nan=floor), floor)
    fig = Figure(figsize=(5.5, 3.8), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(1, shown.size + 1), shown, linewidth=1.5, label="eigenvalue")
    if 0 < rank < shown.size:
        ax.axvline(rank, color="tab:red", linestyle="--", linewidth=1,
                   label=f"numerical rank {rank}")
    ax.set_yscale("log")
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("eigenvalue")
    if resolvable < total:
        ax.text(0.98, 0.97, f"{resolvable} of {total} shown: a batch of {num_samples}\n"
                f"resolves at most {num_samples - 1}", transform=ax.transAxes, ha="right",
                va="top", fontsize=8, color="0.3")
    heading = title if rankme is None else f"{title}\nRankMe {rankme:.1f} of {total} dims"
    ax.set_title(heading, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def labelled_grid(images: torch.Tensor, nrow: int | None, row_labels: list[str] | None,
                  col_labels: list[str] | None, title: str = "") -> Any:
    """`image_grid` with a label per row (e.g. "view 1") and per column (e.g. "image 3")."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = image_grid(images, nrow)
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows_ = math.ceil(n / cols)
    pad = 2  # make_grid's padding
    scale = max(1.0, 48.0 / max(h, w))  # tiny crops drawn large enough to see
    fig = Figure(figsize=(1.2 + cols * w * scale / 60, 0.9 + rows_ * h * scale / 60), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([pad + c * (w + pad) + w / 2 for c in range(cols)])
    ax.set_xticklabels(col_labels or [""] * cols, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(rows_)])
    ax.set_yticklabels(row_labels or [""] * rows_, fontsize=8)
    ax.tick_params(length=0)
    if title:
        ax.set_xlabel(title, fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------------------------- progress
@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, unit: str = "it",
                 enabled: bool = True) -> Iterator[Any]:
    """Progress of one long pass (feature extraction, probes, invariance, fine-tuning): a tqdm
    bar on a terminal, with log lines printed above it instead of glued onto it; where stderr is
    a log file or a pipe (SLURM's output, nohup's), a log line at most every 30 s instead of
    every redraw (`data_pipelines.progress`). `enabled=False` gives a bar that draws nothing, so
    callers update it unconditionally. The finished bar stays on screen."""
    from data_pipelines.progress import make_progress

    bar = make_progress(total, desc, unit, enabled, dynamic_ncols=True, mininterval=0.5)
    try:
        with _logs_above_bars(not bar.disable):
            yield bar
    finally:
        bar.close()


def _logs_above_bars(enabled: bool) -> contextlib.AbstractContextManager:
    """tqdm's logging redirection: the console handlers write through `tqdm.write`, which
    clears the bar, prints the line and redraws the bar below it."""
    if not enabled:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal, periodic log lines otherwise (SLURM logs).

    `update(step, metrics)` reads the loss and the throughput from `metrics` by name: the key
    `loss_key` / `throughput_key`, else that name + "/total" ("loss/total"), else a key ending in
    "/" + the name ("train/loss"). The ETA comes from the
    step rate since the first update, so start-up and compilation time do not inflate it.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        is_tty: bool | None = None,
        *,
        loss_key: str = "loss",
        throughput_key: str = "samples_per_s",
        min_interval_s: float = 30.0,
    ) -> None:
        self.total_steps = total_steps
        self.enabled = enabled
        self.loss_key, self.throughput_key = loss_key, throughput_key
        self.min_interval_s = min_interval_s
        self.is_tty = sys.stderr.isatty() if is_tty is None else is_tty
        self._step = start_step
        self._first: tuple[int, float] | None = None
        self._last_line_time = -math.inf
        self._last_line_step: int | None = None
        self._last_metrics: Mapping[str, Any] = {}
        self._bar = None
        self._redirect: contextlib.AbstractContextManager | None = None
        if enabled and self.is_tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, smoothing=0.05)
            # Log lines during training (kNN, checkpoints, warnings) go above the bar.
            self._redirect = _logs_above_bars(True)
            self._redirect.__enter__()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._first is None:
            self._first = (step, now)
        metrics = metrics or {}
        self._last_metrics = metrics
        loss = _pick(metrics, self.loss_key)
        rate = _pick(metrics, self.throughput_key)
        if self._bar is not None:
            self._bar.update(max(0, step - self._step))
            postfix = {}
            if loss is not None:
                postfix["loss"] = f"{loss:.4g}"
            if rate is not None:
                postfix["samples/s"] = f"{rate:.1f}"
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        self._step = step
        if self._bar is None and (
            now - self._last_line_time >= self.min_interval_s or step >= self.total_steps
        ):
            self._log_line(step, loss, rate, now)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
        elif self._first is not None and self._last_line_step != self._step:
            metrics = self._last_metrics
            self._log_line(self._step, _pick(metrics, self.loss_key),
                           _pick(metrics, self.throughput_key), time.monotonic())

    def _log_line(self, step: int, loss: float | None, rate: float | None, now: float) -> None:
        parts = [f"step {step}/{self.total_steps}"]
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        if rate is not None:
            parts.append(f"{rate:.1f} samples/s")
        eta = self._eta(step, now)
        if eta is not None:
            parts.append(f"eta {eta}")
        log.info(" ".join(parts))
        self._last_line_time, self._last_line_step = now, step

    def _eta(self, step: int, now: float) -> str | None:
        if self._first is None:
            return None
        first_step, first_time = self._first
        if step <= first_step or now <= first_time:
            return None
        per_step = (now - first_time) / (step - first_step)
        remaining = max(0, self.total_steps - step) * per_step
        return str(datetime.timedelta(seconds=round(remaining)))


# ------------------------------------------------------------------------------------ helpers
def _to_float(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"metric {key!r} is a tensor of shape {shape}, not a scalar")
        return float(value.detach().float().item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r} is not a number: {value!r}") from None


def _json_number(value: float) -> float | int | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _json_number(float(value.item())) if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return _json_number(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _pick(metrics: Mapping[str, Any], name: str) -> float | None:
    """metrics[name], else metrics[name + "/total"], else the first key ending in "/" + name."""
    key = next((k for k in (name, f"{name}/total") if k in metrics), None)
    if key is None:
        key = next((k for k in metrics if k.endswith("/" + name)), None)
    if key is None:
        return None
    try:
        return float(metrics[key])
    except (TypeError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
