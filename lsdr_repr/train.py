"""`lsdr train`: shards -> GPU augmentations -> timm backbone + projector -> LSDR loss -> checkpoints.

The loop is step-based (schedules, logging, checkpoints and evaluation count optimiser steps) and
never branches on rank: rank 0 holds the real tracker and checkpoint writer, the other ranks
no-op twins. Everything that touches files, signals or the network lives in its own component.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lsdr_repr import distributed as dist
from lsdr_repr.accumulate import exact_accumulation_step
from lsdr_repr.builders.augment import build_augment
from lsdr_repr.builders.model import build_model
from lsdr_repr.builders.objective import build_objective
from lsdr_repr.checkpoint import (
    FORMAT_VERSION,
    capture_rng_state,
    find_latest_valid,
    load_resume_state,
    make_checkpoint_writer,
    restore_rng_state,
)
from lsdr_repr.checkpointer import Checkpointer
from lsdr_repr.config import Config, config_to_dict, dump_config
from lsdr_repr.errors import CheckpointError, ConfigError, LsdrError, RunDirError
from lsdr_repr.guarded_step import GuardedStep, PendingFlag, autocast_dtype, make_scaler
from lsdr_repr.objectives import covariance_spectrum, embedding_diagnostics
from lsdr_repr.optim import build_optimizer, build_scheduler
from lsdr_repr.preemption import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PREEMPTED,
    PreemptionFlag,
    StopWhileWaiting,
    exit_code_for,
    lost_peer,
)
from lsdr_repr.rundir import CONFIG_FILE
from lsdr_repr.runlock import RunDirLock, RunDirLocked
from lsdr_repr.staging.feed import Staging
from lsdr_repr.staging.prefetch import Staged
from lsdr_repr.step_metrics import PendingMetrics
from lsdr_repr.tracking import Progress, make_tracker

log = logging.getLogger(__name__)

__all__ = ["EXIT_DIVERGED", "EXIT_OK", "EXIT_PREEMPTED", "TrainResult", "Trainer", "train"]


# Config values the learning-rate schedule is built from: when a resume changes one, the schedule
# is rebuilt from the current config instead of restored (see `Trainer._restore`).
SCHEDULE_KEYS = (
    ("train", "total_steps"), ("optim", "lr"), ("optim", "lr_scaling"),
    ("optim", "base_batch_size"), ("optim", "warmup_steps"), ("optim", "min_lr_ratio"),
    ("data", "batch_size"),
)


class Validator(Protocol):
    """What the trainer asks of an evaluation during training (lsdr_repr.eval.online.OnlineKnn):
    injected, so the trainer imports no evaluation code. `run` is called on every rank with the
    backbone and returns the metrics to log. `check_data` opens its data at start-up, right
    after the training data, so a set it cannot read fails before any step is trained."""

    def check_data(self) -> None: ...

    def should_run(self, step: int) -> bool: ...

    def run(self, model: nn.Module, step: int) -> dict[str, float]: ...


class TrainingDiverged(LsdrError):
    """The loss was non-finite for `train.max_nonfinite_steps` steps in a row."""


@dataclasses.dataclass
class TrainResult:
    exit_code: int
    step: int
    run_dir: Path
    checkpoint: Path | None
    wandb_path: str | None


class MultiView(nn.Module):
    """Runs the model on each view separately (per-view BatchNorm statistics, as in VICReg), in
    one module call so DDP sees a single forward before the backward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, views: list[torch.Tensor]) -> list:
        return [self.model(v) for v in views]


def resolve_device_type(requested: str) -> str:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return "cuda"


def resolve_compile_mode(mode: str, device_type: str, world_size: int) -> str:
    """train.compile_mode -> torch.compile's mode: auto is CUDA graphs ("reduce-overhead") on one
    GPU, where they were measured correct (tests/test_cuda_graphs.py on an H200) and faster (ViT-S
    end to end +10 points, benchmarks/RESULTS.md), and "default" on CPU and under DDP, where they
    are not measured yet."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device_type == "cuda" and world_size == 1 else "default"


def train(cfg: Config, preempt: PreemptionFlag | None = None,
          validator: Validator | None = None) -> TrainResult:
    """Train or resume the run in `cfg.train.run_dir`; returns the exit code and where things are.

    `preempt`: a flag installed by the caller before its heavy imports, so that a preemption
    signal during start-up also ends with EXIT_PREEMPTED (the CLI passes one); None: one is
    installed here. `validator`: the evaluation run during training
    (`lsdr_repr.eval.online.online_validator(cfg)` for the online kNN); None: none.
    """
    env = dist.read_dist_env()
    device = dist.init_distributed(env, resolve_device_type(cfg.train.device))
    try:
        with _lock_run_dir(cfg.train.run_dir, env.rank):
            cfg = _shards_from_image_folder(cfg, env.rank)
            return Trainer(cfg, env, device, preempt=preempt, validator=validator).run()
    except OSError as exc:
        # A full disk or a vanished mount outside the checkpoint writer (config.yaml, the W&B id
        # file...): one line naming the file, not a traceback and an undocumented status.
        where = exc.filename or cfg.train.run_dir
        raise RunDirError(f"{where}: {exc.strerror or exc} (the checkpoints written so far are "
                        "intact; run again to resume)") from exc
    except RuntimeError as exc:
        # Another rank died (its own log names why): here one line, not a collective's
        # traceback that reads like a bug of this rank.
        words = lost_peer(exc) if env.is_distributed else None
        if words is None:
            raise
        # on GPUs the stop agreement's gloo group may be the one that notices, not NCCL
        backend = "gloo" if device.type != "cuda" or "gloo" in str(exc).lower() else "nccl"
        raise dist.DistributedError(
            f"another rank of the job stopped ({backend}: {words}); its log "
            "names the cause. The checkpoints written so far are intact: run again to "
            "resume") from exc
    finally:
        dist.cleanup()


IMAGE_FOLDER_SHARDS = "shards/train"  # under RUN_DIR: where an ImageFolder source is written


def _shards_from_image_folder(cfg: Config, rank: int) -> Config:
    """`data.train_shards` naming a local ImageFolder: its shards are written once to
    RUN_DIR/shards/train (rank 0, with a progress bar; the other ranks wait at a barrier) and
    the run streams those. The config from here on (config.yaml, checkpoints) names the shards,
    so a resume with the same command line finds the same config."""
    from data_pipelines.writer import is_image_folder, shards_for_image_folder

    spec = cfg.data.train_shards
    if not spec or "::" in spec or not is_image_folder(spec):
        return cfg
    out = Path(cfg.train.run_dir) / IMAGE_FOLDER_SHARDS
    if rank == 0:
        if not (out / "manifest.json").is_file():
            log.info("data.train_shards=%s is an image folder: writing it to shards in %s, once "
                     "(later starts of this run stream them)", spec, out)
        _, written = shards_for_image_folder(spec, out, progress=cfg.log.progress)
        if not written:
            log.info("data.train_shards=%s: streaming the shards written from it in %s", spec, out)
    if dist.is_distributed():
        dist.barrier()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_shards=str(out)))


@contextlib.contextmanager
def _lock_run_dir(run_dir: str, rank: int):
    """Rank 0 holds RUN_DIR/.lock for the whole run; every rank fails alike if it cannot."""
    lock = RunDirLock(run_dir) if rank == 0 else None
    refused = None
    if lock is not None:
        try:
            lock.acquire()
        except RunDirLocked as exc:
            refused = str(exc)
    refused = dist.broadcast_object(refused)
    if refused:
        raise RunDirLocked(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class Trainer:
    def __init__(self, cfg: Config, env: dist.DistEnv, device: torch.device,
                 preempt: PreemptionFlag | None = None,
                 validator: Validator | None = None) -> None:
        from data_pipelines.reader import make_train_loader, resolve_train_data

        self.cfg, self.env, self.device = cfg, env, device
        self.rank, self.world_size = env.rank, env.world_size
        self.preempt = preempt
        self.validator = validator
        if cfg.data.batch_size // self.world_size < 2:
            # BatchNorm (and the variance and covariance terms) need two images per rank.
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} gives "
                              f"{cfg.data.batch_size // self.world_size} image(s) per rank on "
                              f"{self.world_size} rank(s); at least 2 per rank are needed")
        accumulation = cfg.optim.accumulation_steps
        if accumulation < 1 or cfg.data.batch_size // self.world_size // max(1, accumulation) < 2:
            raise ConfigError(f"optim.accumulation_steps={accumulation} must be >= 1 and leave "
                              f"at least 2 images per micro-batch (data.batch_size="
                              f"{cfg.data.batch_size} over {self.world_size} rank(s))")
        self.run_dir = Path(cfg.train.run_dir)
        self.global_batch = cfg.data.batch_size
        # Resolved (and each source's first shard opened) before the model is built: a source
        # that cannot be read fails here in one line. Without manifests there are no epochs.
        self.train_data = resolve_train_data(cfg.data)
        self.samples_per_epoch = self.train_data.num_samples
        if validator is not None:
            validator.check_data()
        if self.samples_per_epoch is None and env.rank == 0:
            log.info("%s: no shard manifest: logging steps and samples seen instead of epochs "
                     "(`lsdr shards index` writes one)", self.train_data.name)
        self.autocast_dtype = autocast_dtype(cfg.train.precision, device)
        self.scaler = make_scaler(self.autocast_dtype, device)  # fp16 only

        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        # channels_last (build_model's decision) survives .to(device): it preserves the format
        model = build_model(cfg.model, smallest_view=cfg.augment.smallest_view).to(device)
        if device.type == "cuda" and self.world_size > 1 and cfg.model.sync_bn:
            # BatchNorm statistics over the global batch, so the loss does not depend on how
            # many GPUs share it (SyncBatchNorm runs on GPUs only).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        forward_model = (
            torch.compile(model, mode=resolve_compile_mode(
                cfg.train.compile_mode, device.type, self.world_size))
            if cfg.train.compile else model
        )
        self.multiview: nn.Module = MultiView(forward_model)
        if self.world_size > 1:
            self.multiview = nn.parallel.DistributedDataParallel(
                self.multiview, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.loss_fn = build_objective(cfg.objective, stages=cfg.model.stages,
                                       global_views=cfg.augment.num_views).to(device)
        # The views come out in the model's memory format: channels_last views into a model
        # that is not would still run channels_last convolutions, which build_model turns off
        # at 1 x 1 maps for PyTorch's compiled channels_last bug (pytorch/pytorch#171622).
        augment = build_augment(cfg.augment, compile=cfg.train.compile_augment,
                                channels_last=None if model.channels_last else False
                                ).to(device)
        # Augmentation randomness is per rank (different views on every GPU) and checkpointed.
        aug_generator = torch.Generator(device=device)
        aug_generator.manual_seed(cfg.train.seed * 100_003 + self.rank)

        self._buffers = [b for b in model.buffers() if b.is_floating_point()]
        self._buffer_backup = [b.detach().clone() for b in self._buffers]
        self.optimizer = build_optimizer(model, cfg.optim, self.global_batch)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.total_steps)
        self.stepper = GuardedStep(
            self.optimizer, model, clip_grad=cfg.optim.clip_grad, scaler=self.scaler,
            buffers=self._buffers, backups=self._buffer_backup, world_size=self.world_size)
        # Finite flags of steps not yet read on the host (deferred check): (step, flag).
        self._pending_flags: list[tuple[int, bool | PendingFlag]] = []
        self._nonfinite_streak = 0
        # The last log step's record, written once the next step is queued (_write_log).
        self._pending_log: PendingMetrics | None = None
        loader = make_train_loader(
            cfg.data, seed=cfg.train.seed, rank=self.rank, world_size=self.world_size,
            data=self.train_data,
        )
        # Batch k+1 is copied, decoded and augmented while step k runs (lsdr_repr.staging);
        # benchmarks swap in another Staging (another loader, augmentation or ahead=False).
        self.staging = Staging(loader, augment, aug_generator, device,
                               micro_batches=cfg.optim.accumulation_steps)
        # Called after every step with the trainer (benchmarks time steps through it);
        # `last_data_wait_s` is the host time that step's batch was waited for.
        self.step_hook: Callable[[Trainer], None] | None = None
        self.last_data_wait_s = 0.0

        self.step = 0
        self.nonfinite_total = 0
        self.skipped_samples = 0
        self.wandb_run_id: str | None = None
        self._last_projection: torch.Tensor | None = None
        # Refuses (CheckpointError) when every checkpoint is unreadable, instead of step 0.
        resume_path, resume_state = load_resume_state(self.run_dir) or (None, None)
        self.config_dict = config_to_dict(cfg)
        if resume_state:
            self.wandb_run_id = resume_state.get("wandb_run_id")
            # Before config.yaml and W&B are touched: a run resumed with another model is
            # refused with nothing of it changed.
            self._load_weights(resume_path, resume_state)

        is_main = self.rank == 0
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / CONFIG_FILE)
        # Cadence and the divergence guard (lsdr_repr.checkpointer); the resumed-from
        # checkpoint is the last good one until a new one is written.
        self.checkpointer = Checkpointer(
            make_checkpoint_writer(self.run_dir, cfg.train.keep_checkpoints, self.rank),
            every=cfg.train.checkpoint_every, total_steps=cfg.train.total_steps,
            good=resume_path)
        self.tracker = make_tracker(
            cfg.log, self.config_dict, self.run_dir, self.rank, run_id=self.wandb_run_id
        )
        self.wandb_run_id = self.tracker.run_id
        # Restored last: nothing after this may draw from the random generators.
        if resume_state:
            self._restore(resume_path, resume_state)
        self.progress = Progress(
            cfg.train.total_steps, self.step, enabled=is_main and cfg.log.progress
        )

    # ------------------------------------------------------------------------------ resume
    def _load_weights(self, path: Path, state: dict) -> None:
        """The checkpoint's model and optimiser state, or one line naming the config keys that
        make them not fit (`ConfigError`) instead of torch's list of missing tensors."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            resumable = {f"{section}.{key}" for section, key in SCHEDULE_KEYS}
            changed = [_describe_change(change) for change in config_differences(
                           state.get("config", {}), self.config_dict, sections=("model", "optim"))
                       if change[0] not in resumable]
            # torch's first line is only "Error(s) in loading state_dict for ...": the next
            # names the tensors
            detail = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            why = (", ".join(changed) if changed
                   else detail[min(1, len(detail) - 1)][:200] if detail else type(exc).__name__)
            raise ConfigError(
                f"{path} does not fit this config's model or optimiser ({why}): resume with "
                "the settings it was trained with, or start a new train.run_dir") from None

    def _restore(self, path: Path, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_steps", 0))
        self.skipped_samples = int(state.get("skipped_samples", 0))
        saved_config = state.get("config", {})
        # The same on every rank: said once, by rank 0 (the others log warnings too).
        say = log.warning if self.rank == 0 else log.debug
        for change in config_differences(saved_config, self.config_dict):
            say("resuming with %s", _describe_change(change))
        changed = schedule_changes(saved_config, self.config_dict)
        if changed:
            self._rebuild_schedule(changed, say)
        else:
            self.scheduler.load_state_dict(state["scheduler"])
        if int(state.get("world_size", 1)) == self.world_size:
            rng = state["rng"][self.rank]
            restore_rng_state(rng["global"])
            self.staging.load_state_dict({"data": state["data_state"][self.rank],
                                          "augment": rng["augment"]})
        else:
            say(
                "checkpoint %s was written by %d ranks, this run has %d: weights and optimiser "
                "resume exactly, the data stream and random state start afresh",
                path, state.get("world_size"), self.world_size,
            )
        log.info("resumed from %s at step %d", path, self.step)

    def _rebuild_schedule(self, changed: list[str], say: Callable[..., None]) -> None:
        """Follow the current config's schedule from the current step: the learning rate is what
        a run configured so from the start would have now (extending a finished 40-step run to
        80 steps continues half-way down the new cosine, not at the old one's floor)."""
        # The optimiser state just loaded carries the old run's base lr ("initial_lr"); the
        # scheduler built from the current config holds the new one.
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_values):
            group["initial_lr"] = base
        self.scheduler.step_update(self.step)
        say("learning-rate schedule rebuilt for the changed %s: from step %d it follows "
                    "the current config (lr now %.6g)", ", ".join(changed), self.step,
                    self.optimizer.param_groups[0]["lr"])

    def _checkpoint_state(self) -> dict:
        # Collective: every rank contributes its random state and data-stream position (as of
        # the next batch a step takes, not of a batch already staged ahead).
        stream = self.staging.state_dict()
        rng = {"global": capture_rng_state(), "augment": stream["augment"]}
        rngs = dist.gather_objects(rng)
        data_states = dist.gather_objects(stream["data"])
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "samples_seen": self.step * self.global_batch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # fp16's loss scale (bf16 and fp32 need none): a resume continues at the same scale
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rngs,
            "data_state": data_states,
            "config": self.config_dict,
            "world_size": self.world_size,
            "wandb_run_id": self.wandb_run_id,
            "nonfinite_steps": self.nonfinite_total,
            "skipped_samples": self.skipped_samples,
        }

    def _weights_finite(self) -> bool:
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([t.isfinite().all() for t in tensors]).all())

    # ------------------------------------------------------------------------------- step
    @contextlib.contextmanager
    def forward_module(self, multiview: nn.Module) -> Iterator[None]:
        """Steps inside run `multiview` (a MultiView of the same model: eager, CUDA graphs) instead
        of the trainer's own forward module; benchmarks compare them on one trainer."""
        saved, self.multiview = self.multiview, multiview
        try:
            yield
        finally:
            self.multiview = saved

    def model_step(self, views: list[torch.Tensor]) -> bool | PendingFlag:
        """One optimiser step on ready views (no data, no augmentation): the model-only ceiling
        that benchmarks compare the end-to-end rate with. Returns whether the loss was finite
        (the step applied): a bool, or a `PendingFlag` to read later when deferred."""
        return self.train_step([views])[3]

    def train_step(
        self, chunks: list[list[torch.Tensor]] | torch.Tensor, prefetch: bool = False
    ) -> tuple[torch.Tensor, object, list, bool | PendingFlag]:
        """One optimiser step over micro-batches (the views of each, or uint8 images to augment
        here; more than one: exact accumulation); returns the loss, the last loss output, the
        last views, and whether the loss was finite (bool, or a `PendingFlag` when the check is
        deferred: `GuardedStep`). prefetch: stage the next batch once this step's kernels are
        queued, before anything synchronises."""
        if isinstance(chunks, torch.Tensor):
            chunks = self.staging.views(chunks)
        # BatchNorm running statistics change in the forward pass; a skipped (non-finite) step
        # must not leave NaNs in them, so they are backed up (one fused copy) and restored.
        if self._buffers:
            torch._foreach_copy_(self._buffer_backup, self._buffers)
        if len(chunks) > 1:
            total, out, self._last_projection = self._accumulated(chunks)
            views = chunks[-1]
        else:
            views = chunks[0]
            with self._autocast():
                outputs = self.multiview(views)
            out = self.loss_fn([o.projection for o in outputs], [o.stages for o in outputs])
            self.stepper.backward(out.total)
            total = out.total.detach()
            self._last_projection = outputs[0].projection.detach()
        if prefetch:
            self._prefetch_next()
        applied = self.stepper.step(total)
        return total, out, views, applied

    def _prefetch_next(self) -> None:
        """Fetch and stage the next batch while this step's kernels run. A stop signal while the
        loader stalls leaves that batch unread: this step completes, and the run loop's
        agreement (every rank has finished the step's collectives by now) checkpoints it."""
        try:
            self.staging.prefetch()
        except StopWhileWaiting:
            log.warning("stop signal while waiting for the next batch: it is left unread")

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype != torch.float32)

    def _accumulated(self, chunks: list[list[torch.Tensor]]) -> tuple[torch.Tensor, object,
                                                                      torch.Tensor]:
        """optim.accumulation_steps > 1: the full-batch loss and gradient by feature caching
        (lsdr_repr.accumulate); returns the loss, the last loss output, the first view's
        projections of the whole batch."""
        ddp = isinstance(self.multiview, nn.parallel.DistributedDataParallel)
        inner = self.multiview.module if ddp else self.multiview

        def run(module: nn.Module) -> Callable[[list[torch.Tensor]], list]:
            def forward(views: list[torch.Tensor]) -> list:
                with self._autocast():
                    return module(views)
            return forward

        def sync_context(last: bool) -> contextlib.AbstractContextManager:
            return contextlib.nullcontext() if last or not ddp else self.multiview.no_sync()

        def restore_buffers() -> None:
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._buffer_backup)

        return exact_accumulation_step(
            chunks, forward=run(self.multiview), forward_no_grad=run(inner),
            loss_fn=self.loss_fn, backward=self.stepper.backward, sync_context=sync_context,
            restore_buffers=restore_buffers, device=self.device)

    # -------------------------------------------------------------------------------- run
    def run(self, max_steps: int | None = None) -> TrainResult:
        """Train to `train.total_steps` (or for at most `max_steps` steps of this call: benchmarks
        and tests; no final checkpoint unless total_steps is reached)."""
        cfg = self.cfg.train
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        own_flag = self.preempt is None
        preempt = PreemptionFlag(cfg.preempt_signal) if own_flag else self.preempt
        self._nonfinite_streak = 0
        last_ckpt: Path | None = None
        window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0
        exit_code = EXIT_OK
        paused = False
        started_at = self.step
        self.model.train()
        # A stop signal cuts a stalled wait for data short: always for the batch fetched inside
        # a step (every rank has passed the step's collectives), and for one fetched at the top
        # of the loop only in one process (under DDP the other ranks may already be in this
        # step's collectives).
        self.staging.wait_ahead = preempt.waiting
        if self.world_size == 1:
            self.staging.wait_on_demand = preempt.waiting
        try:
            if self.step >= cfg.total_steps:
                log.info("run already complete at step %d", self.step)
            elif self._agree(preempt.is_set):
                # The signal came during start-up (imports, model, loader): nothing new to save;
                # the newest checkpoint (if any) already holds this state. Exit 3 so the SLURM
                # script requeues the job instead of losing it.
                exit_code = self._stop_status(preempt)
                log.warning("%s during start-up at step %d (%s): nothing new to "
                            "checkpoint (resume from %s), exiting with %d",
                            _stopped(exit_code), self.step,
                            preempt.received.name if preempt.received else "signal",
                            self.checkpointer.good or "the start", exit_code)
                end = self.step
            preempt.hold_interrupts()  # from here a first Ctrl-C stops with a checkpoint
            while self.step < end:
                staged = self._next_batch()
                if staged is None:  # a stop signal while waiting for this step's batch
                    exit_code = self._stop_status(preempt)
                    self._resolve_flags(keep=0)
                    self._write_log()
                    if self.step > started_at:
                        last_ckpt = self._save_before_stopping() or last_ckpt
                    log.warning("%s at step %d while waiting for data: checkpoint %s, exiting "
                                "with %d", _stopped(exit_code), self.step,
                                last_ckpt or self.checkpointer.good or "(none yet)", exit_code)
                    break
                chunks, skipped = staged.value
                # host time blocked on the loader (for a batch fetched ahead, inside the
                # previous step, where the GPU may still have been busy)
                self.last_data_wait_s = staged.wait_s
                window_wait += staged.wait_s
                self.skipped_samples += skipped

                loss, out, views, applied = self.train_step(chunks, prefetch=self.step + 1 < end)
                self.step += 1
                self.scheduler.step_update(self.step)
                window_samples += self.global_batch
                self._pending_flags.append((self.step, applied))
                # The previous log step's record, now that this step is queued; before this
                # step's flag is read, so that its non-finite count stops at its own step.
                self._write_log()
                # Deferred: the newest step's flag stays on the device (the host runs ahead);
                # every boundary below that acts on the state reads all of them first.
                self._resolve_flags(keep=1 if self.stepper.deferred else 0)

                due_log = self.step % cfg.log_every == 0 or self.step == cfg.total_steps
                due_save = self.checkpointer.due(self.step)
                if due_log:
                    elapsed = time.perf_counter() - window_start
                    self._pending_log = self._queue_metrics(loss, out, window_samples / elapsed,
                                                            window_wait / elapsed)
                    window_start, window_samples, window_wait = time.perf_counter(), 0, 0.0
                if due_save or self.step >= end:
                    self._resolve_flags(keep=0)
                    self._write_log()
                self._periodic_media(views)
                if self.validator is not None and self.validator.should_run(self.step):
                    self.tracker.log(self.validator.run(self.model.backbone, self.step),
                                     self.step)

                stop = self._agree(preempt.is_set)
                if stop:
                    self._resolve_flags(keep=0)
                    self._write_log()
                if stop and self.step >= cfg.total_steps:
                    # The signal came during the final step: the run is complete, and exit 3
                    # would make the SLURM script requeue a finished job.
                    log.info("received %s during the final step: the run is complete",
                             preempt.received.name if preempt.received else "a signal")
                    stop = False
                if stop:
                    last_ckpt = self._save_before_stopping() or last_ckpt
                    exit_code = self._stop_status(preempt)
                    log.warning("%s at step %d: checkpoint %s written, exiting with %d",
                                _stopped(exit_code), self.step, last_ckpt, exit_code)
                    break
                if due_save:
                    last_ckpt = self.checkpointer.save(
                        self.step, self._checkpoint_state, self._weights_finite,
                        final=self.step == cfg.total_steps) or last_ckpt
                if self.step_hook is not None:
                    self.step_hook(self)
            self._resolve_flags(keep=0)
            self._write_log()
            paused = self.step < cfg.total_steps and exit_code == EXIT_OK
        except TrainingDiverged as exc:
            log.error("%s", exc)
            exit_code = EXIT_DIVERGED
        except BaseException as exc:
            # what summary.json records; the CLI prints it (train() turns a lost peer into a
            # DistributedError: exit 2)
            exit_code = (EXIT_BAD_INPUT if self.world_size > 1 and lost_peer(exc)
                         else exit_code_for(exc))
            self._write_log_after_failure()
            raise
        finally:
            self.staging.wait_ahead = self.staging.wait_on_demand = contextlib.nullcontext
            if own_flag:
                preempt.close()
            if not paused:  # stopped by max_steps: run() may be called again to go on
                self.staging.reset()
                self.progress.close()
                newest = last_ckpt or self.checkpointer.good  # what a rerun resumes from
                self.tracker.log_summary({"final_step": self.step, "exit_code": exit_code,
                                          "checkpoint": str(newest) if newest else None})
                self.tracker.finish()
        if exit_code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
            # Every rank agreed to stop (`_agree`), so every rank is here. torchrun stops the
            # other workers as soon as one exits non-zero: a rank other than 0 (which writes
            # nothing) must not exit 3 while rank 0 is still writing the checkpoint or closing
            # W&B.
            dist.barrier()
        last_ckpt = last_ckpt or find_latest_valid(self.run_dir)
        if exit_code == EXIT_OK and not paused:
            log.info("done: step %d; checkpoint %s; W&B run %s", self.step, last_ckpt,
                     self.tracker.run_path)
        return TrainResult(exit_code, self.step, self.run_dir, last_ckpt, self.tracker.run_path)

    def _next_batch(self) -> Staged | None:
        """The batch of the next step, or None when a stop signal cut the wait for it short
        (`Staging.wait_on_demand`). A batch staged ahead is taken as it is: no wait."""
        try:
            return next(self.staging)
        except StopWhileWaiting:
            return None

    def _resolve_flags(self, keep: int = 0, through: int | None = None) -> None:
        """Read the finite flags of all but the newest `keep` pending steps, or of the steps up
        to `through` (a `PendingFlag` waits for its own step only, not for the step queued
        since), and apply the divergence rule to each, in step order."""
        while len(self._pending_flags) > keep and (
                through is None or self._pending_flags[0][0] <= through):
            step, flag = self._pending_flags.pop(0)
            if bool(flag):
                self._nonfinite_streak = 0
                continue
            self._nonfinite_streak += 1
            streak = self._nonfinite_streak
            self.nonfinite_total += 1
            self.checkpointer.note_nonfinite(step)
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", step, streak)
            if streak >= self.cfg.train.max_nonfinite_steps:
                self._pending_flags.clear()
                good = self.checkpointer.good
                kept = (f"the last good checkpoint is {good}"
                        if good else "no checkpoint was written before it")
                raise TrainingDiverged(
                    f"loss was non-finite for {streak} steps in a row at step {step} (since "
                    f"step {step - streak + 1}); no checkpoint written since, {kept} (lower "
                    f"optim.lr or set optim.clip_grad)")

    def _save_before_stopping(self) -> Path | None:
        """The preemption checkpoint, its outcome shared: only rank 0 writes, so when its write
        fails every rank raises the error (exit 2), instead of the others exiting 3 or waiting
        at the barrier that keeps the ranks of a stopped run together."""
        error: CheckpointError | None = None
        path = None
        try:
            path = self.checkpointer.save(self.step, self._checkpoint_state,
                                          self._weights_finite, final=True)
        except CheckpointError as exc:
            error = exc
        if self._agree(error is not None):
            raise error or CheckpointError(
                f"step {self.step}: rank 0 could not write the preemption checkpoint (its log "
                "names the cause); nothing newer than the last checkpoint is saved")
        return path

    def _stop_status(self, preempt: PreemptionFlag) -> int:
        """One status on every rank: 3 (requeue) if any rank saw a preemption signal, 130 if
        Ctrl-C was all there was (a SIGINT may reach one rank, SLURM's signal another)."""
        return EXIT_PREEMPTED if self._agree(preempt.requeue) else EXIT_INTERRUPTED

    def _agree(self, flag: bool) -> bool:
        """True on every rank if any rank saw the preemption signal (they stop at the same step);
        over a CPU group, so the per-step call does not wait for the GPU (`any_true_on_host`)."""
        return dist.any_true_on_host(flag)

    def _queue_metrics(self, loss: torch.Tensor, out, samples_per_s: float,
                       wait_frac: float) -> PendingMetrics:
        """This step's log record, its device values on their way to the host (no sync)."""
        host = {
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": samples_per_s,
            "pairs_per_s": samples_per_s,  # one sample = one pair of global views
            "data_wait_frac": wait_frac,
            "samples_seen": self.step * self.global_batch,
        }
        if self.samples_per_epoch:
            host["epoch"] = self.step * self.global_batch / self.samples_per_epoch
        if self.device.type == "cuda":
            host["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            # CUDA-graph pools (compile_mode=reduce-overhead) are reserved, not allocated
            host["gpu_mem_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        device = {f"loss/{k}": v for k, v in out.terms.items()}
        if self.scaler is not None:  # fp16: falls when the scaler skips an overflowing step
            # the scale tensor, copied with the record (get_scale() would wait for the GPU)
            scale = self.scaler._get_scale_async()
            if scale is not None:
                device["amp/loss_scale"] = scale
        device["loss/total"] = loss
        # a collective on every rank at the same step; under NCCL it stays on the device
        device["skipped_samples"] = dist.all_sum(self.skipped_samples, self.device)
        return PendingMetrics(self.step, host, device, self._last_projection)

    def _write_log(self) -> None:
        """Log the pending record (`_queue_metrics`), with the non-finite steps up to its step."""
        pending, self._pending_log = self._pending_log, None
        if pending is None:
            return
        self._resolve_flags(through=pending.step)
        metrics = {**pending.metrics(), "nonfinite_steps": self.nonfinite_total}
        self.tracker.log(metrics, pending.step)
        self.progress.update(pending.step, metrics)

    def _write_log_after_failure(self) -> None:
        """Log the pending record on the way out of a failed loop (a lost peer, a checkpoint
        error, Ctrl-C twice): its step ran, and the synchronous log had written it already.
        Best effort: no finite flag is read (that could raise again), nothing waits for the device,
        and a record that cannot be read is reported, not raised over the real error."""
        pending, self._pending_log = self._pending_log, None
        if pending is None:
            return
        if not pending.ready():
            # its step's kernels have not finished: under DDP they may wait on a collective a
            # lost peer never joins, and waiting would hang this rank until the NCCL timeout
            log.warning("the log record of step %d was dropped: its step had not finished on "
                        "the device", pending.step)
            return
        try:
            # nonfinite_steps: the flags read so far (none is read here; they could raise again)
            metrics = {**pending.metrics(), "nonfinite_steps": self.nonfinite_total}
            self.tracker.log(metrics, pending.step)
        except BaseException as exc:  # noqa: BLE001 - the loop's own error is the one to raise
            log.warning("the log record of step %d was lost: %s", pending.step, exc)

    def _periodic_media(self, views: list[torch.Tensor]) -> None:
        cfg = self.cfg.train
        if cfg.image_grid_every and self.step % cfg.image_grid_every == 0:
            shown = [v[:8] for v in views[:2]]
            grid = torch.cat([self.staging.augment.denormalize(v.float()) for v in shown])
            # one row per view, one column per image: the same image's views stacked
            self.tracker.log_images(
                "augmented_views", grid.cpu(), self.step, nrow=len(shown[0]),
                row_labels=[f"view {i + 1}" for i in range(len(shown))],
                col_labels=[f"image {j + 1}" for j in range(len(shown[0]))])
        if cfg.spectrum_every and self.step % cfg.spectrum_every == 0:
            z = self._last_projection
            self.tracker.log_spectrum(covariance_spectrum(z).cpu(), self.step,
                                      num_samples=z.shape[0],  # this rank's batch
                                      rankme=embedding_diagnostics(z)["rankme"])


def _stopped(exit_code: int) -> str:
    return "interrupted" if exit_code == EXIT_INTERRUPTED else "preempted"


def schedule_changes(saved: dict, current: dict) -> list[str]:
    """The `SCHEDULE_KEYS` ("optim.lr", ...) whose values differ between two config dicts."""
    changed = []
    for section, key in SCHEDULE_KEYS:
        old = saved.get(section, {}).get(key)
        if old is not None and old != current.get(section, {}).get(key):
            changed.append(f"{section}.{key}")
    return changed


def config_differences(saved: dict, current: dict, prefix: str = "",
                       sections: Sequence[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(dotted key, current value, saved value) of every leaf that differs between two config
    dicts (of the top-level `sections` only, if given), in key order."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if sections is not None and key not in sections:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", b, a))
    return out


def _describe_change(change: tuple[str, Any, Any]) -> str:
    key, current, saved = change
    return f"{key}={current!r} (checkpoint had {saved!r})"

