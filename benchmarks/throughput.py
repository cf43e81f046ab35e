"""End-to-end training throughput from JPEG shards against the model-only ceiling, in one run.

    python benchmarks/throughput.py --config configs/resnet50_imagenet.yaml --batch 256 \
        --out bench_out/ --data-dir /tmp/lsdr_bench

What it does, in one process:
1. Data: writes `--images` synthetic photos-like JPEGs (varied sizes and content: colour fields,
   shapes, blur, multi-scale texture, quality 80-95; about 45 KiB at 380-620 x 300-480 px), then
   shards them twice with the real writer: `lsdr shards write SRC DATA/full` and
   `lsdr shards write SRC DATA/shrunk --min-side S` (the pre-shrunk copy: shorter side S, the
   loader's side, so it never upsamples). Kept in --data-dir and reused by later runs.
2. One `Trainer(cfg, env, device)` from --config (+ flags and `--set key=value` overrides), W&B
   disabled, checkpoints never due. Every row below uses its model, optimiser and augmentation:
   (a) model-only ceiling: `Trainer.model_step(views)` on fixed, ready views (eager and
       torch.compile'd); the compiled one is "the ceiling" when the trainer compiles;
   (b) loader alone: `make_train_loader` + `staging.device.to_device` (CPU decode and H2D copy, or nvJPEG
       decode + batched resize), per decode mode and shard set; plus the GPU resize alone,
       batched against the former loop over distinct image sizes;
   (c) augmentation alone: the trainer's GpuAugment, eager and compiled (CUDA events);
   (d) end to end: `Trainer.run(max_steps)` (the real `lsdr train` loop: prefetch, staging,
       augmentation, step, logging) on a fresh loader per variant, timed from its step hook;
       variants `decode:shards:overlap:augment[:workers]` (see --variants);
   (e) NVIDIA DALI's pipeline on the same shards (loader alone, and feeding the same
       `model_step`), when `nvidia.dali` is importable (optional, never a dependency).
   Each row: pairs/s (one pair = one image's two global views), % of the ceiling, data-wait
   fraction (host time blocked on the loader / wall time) and peak GPU memory.
   --profile-variants runs a few more steps of those variants under torch.profiler, after all
   timed rows (CUPTI stays attached after a profile and slows every later launch), and reports
   GPU busy time (union of kernel intervals / wall), the top kernels (OUT/profile_*.txt) and
   the timeline (OUT/trace_*.json.gz, for Perfetto).
3. Prints one table; writes OUT/throughput_<arch>_b<batch>.json (everything) and the profiles.

Under torchrun each process is one rank (data.batch_size = --batch x world size); rank 0
reports per-GPU and global rates, for DDP scaling tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import io
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timeline import timeline_summary, union_us  # benchmarks/timeline.py, beside this script

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("throughput")
PARTIAL: dict[str, Path | None] = {"path": None}  # rows so far, rewritten after each row


# ----------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "resnet50_imagenet.yaml"))
    p.add_argument("--arch", default=None, help="timm model (default: the config's)")
    p.add_argument("--batch", type=int, default=256, help="images (pairs) per GPU per step")
    p.add_argument("--image-size", type=int, default=256, help="side S of the loader's batch")
    p.add_argument("--crop", type=int, default=224, help="side R of the global views")
    p.add_argument("--workers", type=int, default=12, help="loader workers, CPU decode")
    p.add_argument("--gpu-workers", type=int, default=4,
                   help="loader workers, GPU decode (they only read tar members)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="train.compile (off: the eager model step is the ceiling)")
    p.add_argument("--variants", default="cpu:full:off:eager,cpu:full:on:compiled,"
                   "cpu:shrunk:on:compiled,gpu:full:on:compiled,cpu:shrunk:on:compiled::cg,"
                   "gpu:full:on:compiled::cg",
                   help="end-to-end variants decode:shards:overlap:augment[:workers[:model]], "
                   "comma separated (decode cpu|gpu, shards full|shrunk, overlap on|off, "
                   "augment eager|compiled|old (old: the fused ops before Kornia), workers: "
                   "empty for the default, model "
                   "default|eager|cg)")
    p.add_argument("--order", choices=["once", "abba"], default="once",
                   help="end-to-end variants once in the given order, or forward then reversed "
                   "(each measured twice, rows NAME#1 and NAME#2): rows warm up in run order "
                   "(benchmarks/RESULTS.md, issue 18: the same row gave 1907 and 2396 pairs/s "
                   "first and last), so compare variants only within one pass or on abba")
    p.add_argument("--loader-rows", default="cpu:full,cpu:shrunk,gpu:full,gpu:shrunk",
                   help="loader-alone rows decode:shards[:workers]")
    p.add_argument("--augment-rows", default="eager,compiled,old",
                   help="augmentation-alone rows to measure (eager|compiled|old, comma "
                   "separated; empty: none; the end-to-end variants build theirs anyway)")
    p.add_argument("--steps", type=int, default=40,
                   help="timed steps per row; end-to-end rows record how many of theirs were "
                   "train.log_every steps (log_steps): --steps = log_every counts the log at "
                   "its real rate")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--images", type=int, default=5000, help="synthetic images to write")
    p.add_argument("--source-width", default="380,620", help="min,max width of the images")
    p.add_argument("--source-height", default="300,480", help="min,max height")
    p.add_argument("--min-side", type=int, default=None,
                   help="shorter side of the pre-shrunk shard copy (lsdr shards write "
                   "--min-side; default: --image-size, so the reader never upsamples)")
    p.add_argument("--max-side", type=int, default=None,
                   help="also bound the longer side of the pre-shrunk copy (--max-side). The "
                   "earlier default, 320 alone, left the shorter side of most of these images "
                   "below 256 (median 251, down to 163): the reader upsampled them")
    p.add_argument("--shrunk-quality", type=int, default=90,
                   help="JPEG quality of the pre-shrunk copy")
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard")
    p.add_argument("--data-dir", default=None, help="where the images and shards go (reused; "
                   "default OUT/data)")
    p.add_argument("--out", default="bench_out", help="output folder for the JSON")
    p.add_argument("--run-dir", default=None, help="the trainer's run dir (default OUT/run)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--profile-variants", default="",
                   help="indices into --variants to profile (e.g. 0,-1)")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--no-dali", action="store_true", help="skip the DALI rows")
    p.add_argument("--cudnn-benchmark", choices=["off", "on", "both"], default="both",
                   help="torch.backends.cudnn.benchmark for the compiled ceiling (both: measure "
                   "both, keep the faster for the rest)")
    p.add_argument("--cudagraphs", choices=["on", "off"], default="on",
                   help="also measure the model compiled with mode=reduce-overhead (model cg)")
    p.add_argument("--accumulation", default="",
                   help="also measure the model-only step as K micro-batches (exact "
                   "accumulation, optim.accumulation_steps=K): comma-separated K values, "
                   "e.g. 2; the memory cost against the K=1 ceiling")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra config overrides, e.g. model.projector=[64,64]")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ data writing
def synth_jpeg(seed: int, width: tuple[int, int], height: tuple[int, int]) -> bytes:
    """One photo-like JPEG: a smooth colour field, random shapes, optional blur, coarse, medium
    and fine texture, random quality 80-95, landscape or (1 in 5) portrait."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w = int(rng.integers(width[0], width[1], endpoint=True))
    h = int(rng.integers(height[0], height[1], endpoint=True))
    if rng.random() < 0.2:
        w, h = h, w
    grid = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 16))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1 = x0 + int(rng.integers(max(1, w // 16), max(2, w // 2)))
        y1 = y0 + int(rng.integers(max(1, h // 16), max(2, h // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0 + int(rng.integers(0, max(1, w // 3))),
                           y0 + int(rng.integers(0, max(1, h // 3)))) for _ in range(5)],
                         fill=colour)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3.0))))
    arr = np.asarray(img, dtype=np.float32)

    def noise(step: int, channels: int) -> np.ndarray:
        small = rng.normal(0, 1, (h // step + 1, w // step + 1, channels)).astype(np.float32)
        planes = [np.asarray(Image.fromarray(small[..., c], mode="F").resize(
            (w, h), Image.Resampling.BILINEAR)) for c in range(channels)]
        return np.stack(planes, axis=-1)

    arr = (arr + noise(8, 1) * rng.uniform(2, 20) + noise(3, 3) * rng.uniform(4, 16)
           + rng.normal(0, rng.uniform(0, 6), (h, w, 1)).astype(np.float32))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
        buf, format="JPEG", quality=int(rng.integers(80, 95, endpoint=True)))
    return buf.getvalue()


def _write_images(task: tuple[Path, list[int], tuple[int, int], tuple[int, int]]) -> int:
    folder, seeds, width, height = task
    for seed in seeds:
        (folder / f"img{seed:06d}.jpg").write_bytes(synth_jpeg(seed, width, height))
    return len(seeds)


def prepare_data(args: argparse.Namespace, data_dir: Path) -> dict[str, Path]:
    """DATA/src (JPEG files), DATA/full and DATA/shrunk (shards + manifest) through the real
    shard writer behind `lsdr shards write`; an existing complete set with the same parameters
    is reused."""
    from data_pipelines.writer import write_shards

    width = tuple(int(v) for v in args.source_width.split(","))
    height = tuple(int(v) for v in args.source_height.split(","))
    min_side = args.min_side or args.image_size
    spec = {"images": args.images, "width": width, "height": height, "max_side": args.max_side,
            "min_side": min_side, "quality": args.shrunk_quality, "per_shard": args.per_shard,
            "version": 2}
    stamp = data_dir / "spec.json"
    shards = {"full": data_dir / "full", "shrunk": data_dir / "shrunk"}
    if (stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(spec))
            and all((d / "manifest.json").is_file() for d in shards.values())):
        return shards
    src = data_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(os.cpu_count() or 1, 16))
    seeds = list(range(args.images))
    start = time.perf_counter()
    tasks = [(src, seeds[i::workers], width, height) for i in range(workers)]
    if workers == 1 or args.images < 64:
        for task in tasks:
            _write_images(task)
    else:
        import concurrent.futures as cf

        with cf.ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_images, tasks))
    log.info("wrote %d JPEGs in %.1f s", args.images, time.perf_counter() - start)
    shrink = {"min_side": min_side, "quality": args.shrunk_quality}
    if args.max_side:
        shrink["max_side"] = args.max_side
    for name, extra in (("full", {}), ("shrunk", shrink)):
        write_shards(src, shards[name], prefix="train", max_count=args.per_shard,
                     progress=False, workers=workers, **extra)
    stamp.write_text(json.dumps(spec))
    return shards


def shard_stats(path: Path) -> dict:
    from data_pipelines.manifest import read_manifest

    m = read_manifest(path)
    return {"samples": m.num_samples, "shards": len(m.shards),
            "mean_kib": m.num_bytes / max(1, m.num_samples) / 1024}


# ------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        # Cached blocks of earlier rows freed first, so a row's reserved peak is its own (plus
        # whatever earlier rows still hold, such as CUDA-graph pools: measure those last).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def peak_reserved_gb(device: torch.device) -> float | None:
    """max_memory_reserved: counts CUDA-graph pools, which max_memory_allocated misses after a
    reset (their blocks were allocated before it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return None


def close_loader(loader: Any) -> None:
    """Stop a StatefulDataLoader's workers now (not at garbage collection)."""
    it = getattr(loader, "_iterator", None)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    gc.collect()


def row(kind: str, name: str, **values: Any) -> dict:
    return {"kind": kind, "name": name, **values}


def guarded(rows: list[dict], kind: str, name: str, fn: Callable[[], dict]) -> dict | None:
    """Run one measurement; a failure becomes a row with the error, and the run goes on."""
    try:
        result = fn()
    except Exception as exc:  # one broken row must not lose the others
        log.exception("%s %s failed", kind, name)
        rows.append(row(kind, name, error=f"{type(exc).__name__}: {exc}"[:500]))
        return None
    rows.append(row(kind, name, **result))
    log.info("%s %s: %s", kind, name, {k: v for k, v in result.items() if k != "profile"})
    if PARTIAL["path"] is not None:
        PARTIAL["path"].write_text(json.dumps(rows, indent=1))
    return result


# ------------------------------------------------------------------------------- the trainer
def make_config(args: argparse.Namespace, shards: Path, run_dir: Path, world_size: int,
                device: torch.device, decode: str = "cpu", workers: int | None = None) -> Any:
    from lsdr_repr.config import load_config

    overrides = [
        f"data.train_shards={shards}", "data.val_shards=null", "data.test_shards=null",
        f"data.batch_size={args.batch * world_size}", f"data.image_size={args.image_size}",
        f"data.num_workers={args.workers if workers is None else workers}",
        f"data.decode={decode}", f"augment.crop_size={args.crop}",
        f"train.run_dir={run_dir}", "train.total_steps=1000000000",
        "train.checkpoint_every=1000000000", "train.eval_every=0", "train.image_grid_every=0",
        "train.spectrum_every=0", f"train.device={device.type}",
        f"train.compile={'true' if args.compile == 'on' else 'false'}",
        # The trainer's own model is the compiled one without CUDA graphs, the ceiling the
        # "% of compiled ceiling" column divides by; the product's default on one GPU
        # (train.compile_mode=auto: CUDA graphs) is the model variant `cg` of the rows.
        "train.compile_mode=default",
        "log.wandb.mode=disabled", "log.progress=false",
    ]
    if args.arch:
        overrides.append(f"model.arch={args.arch}")
    return load_config(args.config, [*overrides, *args.set])


def data_cfg_for(cfg: Any, shards: Path, decode: str, workers: int) -> Any:
    import dataclasses

    return dataclasses.replace(cfg.data, train_shards=str(shards), decode=decode,
                               num_workers=workers)


def one_batch_on_device(trainer: Any, data_cfg: Any) -> torch.Tensor:
    from data_pipelines.reader import make_train_loader
    from lsdr_repr.staging.device import to_device

    loader = make_train_loader(data_cfg, seed=1, rank=trainer.rank, world_size=trainer.world_size)
    try:
        batch = next(iter(loader))
        images, _ = to_device(batch, trainer.device)
    finally:
        close_loader(loader)
    return images


# ---------------------------------------------------------------------------------- (a) model
def model_variants(trainer: Any, cudagraphs: bool) -> dict[str, Any]:
    """The forward modules the ceiling and end-to-end rows can run: the trainer's own
    ("default": torch.compile'd when train.compile), "eager", and "cg" (the same model compiled
    with mode="reduce-overhead": CUDA graphs, so the step costs the host a few launches)."""
    from lsdr_repr.train import MultiView

    models = {"default": trainer.multiview}
    if trainer.world_size == 1:
        models["eager"] = MultiView(trainer.model)
        if cudagraphs:
            models["cg"] = MultiView(torch.compile(trainer.model, mode="reduce-overhead"))
    return models


def measure_model(trainer: Any, views: list[torch.Tensor], steps: int, warmup: int,
                  multiview: Any, accumulation: int = 1) -> dict:
    """Model-only steps on fixed views; accumulation k: the same batch as k micro-batches
    through the trainer's exact accumulation (optim.accumulation_steps=k)."""
    chunks = [list(c) for c in zip(*(v.chunk(accumulation) for v in views))]

    def step() -> None:
        if accumulation == 1:
            trainer.model_step(views)
        else:
            trainer.train_step(chunks)

    with trainer.forward_module(multiview):
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(trainer.device)
        first_s = time.perf_counter() - start
        reset_peak(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(trainer.device)
        wall = time.perf_counter() - start
    pairs = steps * trainer.global_batch / wall
    return {"pairs_per_s": pairs, "step_ms": wall / steps * 1000, "warmup_s": first_s,
            "peak_gb": peak_gb(trainer.device),
            "peak_reserved_gb": peak_reserved_gb(trainer.device)}


# --------------------------------------------------------------------------------- (b) loader
def measure_loader(trainer: Any, data_cfg: Any, batches: int, warmup: int) -> dict:
    from data_pipelines.reader import make_train_loader
    from lsdr_repr.staging.device import to_device

    loader = make_train_loader(data_cfg, seed=2, rank=trainer.rank, world_size=trainer.world_size)
    try:
        it = iter(loader)
        start = time.perf_counter()
        for _ in range(warmup):
            to_device(next(it), trainer.device)
        sync(trainer.device)
        first_s = time.perf_counter() - start
        reset_peak(trainer.device)
        start = time.perf_counter()
        for _ in range(batches):
            to_device(next(it), trainer.device)
        sync(trainer.device)
        wall = time.perf_counter() - start
    finally:
        close_loader(loader)
    per_rank = data_cfg.batch_size // trainer.world_size
    return {"pairs_per_s": batches * per_rank * trainer.world_size / wall,
            "batch_ms": wall / batches * 1000, "warmup_s": first_s,
            "peak_gb": peak_gb(trainer.device),
            "peak_reserved_gb": peak_reserved_gb(trainer.device)}


def measure_gpu_resize(trainer: Any, data_cfg: Any, iters: int) -> dict:
    """nvJPEG decode of one batch, then the resize to S alone: batched matmuls against the
    former loop over distinct image sizes (one interpolate per size)."""
    from data_pipelines.reader import ShardStream, resolve_shards
    from lsdr_repr.staging.device import (
        _decode_jpeg,
        resize_center_crop,
        resize_center_crop_batch,
    )

    device = trainer.device
    urls, _ = resolve_shards(data_cfg.train_shards)
    stream = ShardStream(urls, image_size=data_cfg.image_size,
                         batch_size=data_cfg.batch_size // trainer.world_size, output="jpeg")
    jpegs = list(next(iter(stream)).images)
    size = data_cfg.image_size

    def per_size_loop() -> torch.Tensor:  # the reader before batching (kept here to compare)
        out = torch.empty((len(decoded), 3, size, size), dtype=torch.uint8, device=device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(decoded):
            groups.setdefault(tuple(img.shape[-2:]), []).append(i)
        for idx in groups.values():
            out[idx] = resize_center_crop(torch.stack([decoded[i] for i in idx]), size)
        return out

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        return (time.perf_counter() - start) / iters * 1000

    decode_ms = timed(lambda: _decode_jpeg(jpegs, device))
    decoded = _decode_jpeg(jpegs, device)
    loop_ms = timed(per_size_loop)
    batched_ms = timed(lambda: resize_center_crop_batch(decoded, size))
    diff = (per_size_loop().float() - resize_center_crop_batch(decoded, size).float()).abs()
    return {"decode_ms": decode_ms, "resize_loop_ms": loop_ms, "resize_batched_ms": batched_ms,
            "distinct_sizes": len({tuple(d.shape[-2:]) for d in decoded}),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


# ------------------------------------------------------------------------------- (c) augment
def measure_augment(aug: Any, images: torch.Tensor, iters: int, warmup: int,
                    generator: torch.Generator | None) -> dict:
    device = images.device
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(warmup):
            aug(images, generator=generator)
        sync(device)
        first_s = time.perf_counter() - start
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                aug(images, generator=generator)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                aug(images, generator=generator)
                times.append((time.perf_counter() - t) * 1000)
    ms = statistics.median(times)
    return {"pairs_per_s": images.shape[0] / ms * 1000, "call_ms": ms, "warmup_s": first_s}


# --------------------------------------------------------------------------- (d) end to end
def measure_end_to_end(trainer: Any, data_cfg: Any, steps: int, warmup: int, overlap: bool,
                       augment: Any, multiview: Any, profile_steps: int = 0,
                       profile_dir: Path | None = None, name: str = "") -> dict:
    """`Trainer.run` on a fresh loader: `warmup` steps, then `steps` timed steps (from the step
    hook's clock: the interval covers whole loop iterations), then optional profiled steps."""
    from data_pipelines.reader import make_train_loader

    loader = make_train_loader(data_cfg, seed=3, rank=trainer.rank, world_size=trainer.world_size)
    stamps: list[float] = []
    waits: list[float] = []

    def hook(t: Any) -> None:
        stamps.append(time.perf_counter())
        waits.append(t.last_data_wait_s)
        if len(stamps) == warmup:
            reset_peak(t.device)

    from lsdr_repr.staging.feed import Staging

    # the trainer's own generator, micro-batches and device; this row's loader, augmentation
    # and overlap
    saved_staging = trainer.staging
    trainer.staging = Staging(loader, augment, saved_staging.generator, trainer.device,
                              micro_batches=saved_staging.micro_batches, ahead=overlap)
    trainer.step_hook = hook
    result: dict = {}
    first_timed = trainer.step + warmup + 1
    try:
        start = time.perf_counter()
        with trainer.forward_module(multiview):
            trainer.run(max_steps=warmup + steps)
        sync(trainer.device)
        wall = stamps[-1] - stamps[warmup - 1]
        result = {
            "pairs_per_s": steps * trainer.global_batch / wall,
            "step_ms": wall / steps * 1000,
            "data_wait_frac": sum(waits[warmup:]) / wall,
            "warmup_s": stamps[warmup - 1] - start,
            "peak_gb": peak_gb(trainer.device),
            "peak_reserved_gb": peak_reserved_gb(trainer.device),
            # a log step drains less than it did, but still costs: compare rows that hold
            # the same number (--steps = train.log_every counts it at its real rate)
            "log_steps": log_steps_in(first_timed, steps, trainer.cfg.train.log_every),
            # the mean above hides where the time went: one slow step (a log record) or all
            **step_spread(stamps[warmup - 1:]),
        }
        if profile_steps:
            trainer.step_hook = None
            with trainer.forward_module(multiview):
                result["profile"] = profile_steps_of(trainer, profile_steps, profile_dir, name)
    finally:
        trainer.step_hook = None
        trainer.staging = saved_staging
        close_loader(loader)
    return result


def step_spread(stamps: list[float]) -> dict[str, float]:
    """Loop-iteration end times [s], the first one the window's start -> the median and the
    slowest step of the window [ms] (a steady state far below the mean means a few slow steps)."""
    steps = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return {"step_ms_median": statistics.median(steps), "step_ms_max": max(steps)}


def log_steps_in(first: int, steps: int, log_every: int) -> int:
    """How many of the steps first .. first + steps - 1 are `train.log_every` steps."""
    return (first + steps - 1) // log_every - (first - 1) // log_every


def profile_steps_of(trainer: Any, steps: int, out_dir: Path | None, name: str) -> dict:
    """GPU busy fraction (union of kernel intervals over the wall time of the window), per-
    stream kernel time and the top kernels, for `steps` more steps of the paused run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(trainer.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        trainer.run(max_steps=steps)
        sync(trainer.device)
        wall_ms = (time.perf_counter() - start) * 1000
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy_us = union_us(intervals)
    span_us = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    kernel_sum_us = sum(e.time_range.elapsed_us() for e in kernels)
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if kernels else "cpu_time_total", row_limit=30)
    timeline = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"profile_{name.replace(':', '-')}.txt").write_text(table)
        # the whole timeline too (open in Perfetto / chrome://tracing): where the GPU idles
        # and what the host was doing then is not in any table; summarised by timeline.py
        trace = out_dir / f"trace_{name.replace(':', '-')}.json.gz"
        prof.export_chrome_trace(str(trace))
        with gzip.open(trace, "rt") as f:
            timeline = timeline_summary(json.load(f)["traceEvents"], steps)
    return {
        "timeline": timeline,
        "steps": steps, "wall_ms_per_step": wall_ms / steps,
        "gpu_busy_ms_per_step": busy_us / 1000 / steps,
        "gpu_busy_frac_of_wall": busy_us / 1000 / wall_ms if wall_ms else None,
        "gpu_busy_frac_of_kernel_span": busy_us / span_us if span_us else None,
        "kernel_time_sum_ms_per_step": kernel_sum_us / 1000 / steps,
        "kernels_per_step": len(kernels) / steps,
    }


# --------------------------------------------------------------------------------- (e) DALI
def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_dali_iterator(cfg: Any, shards: Path, device: torch.device, workers: int) -> Any:
    """DALI's equivalent of our pipeline: webdataset reader, decode (mixed nvJPEG on a GPU, DALI's
    CPU-only mode otherwise, which is how the CPU tests run it), random resized crop, rotation,
    flip, brightness/contrast, hue/saturation, 23-tap blur, normalise."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    tars = sorted(str(p) for p in shards.glob("*.tar"))
    aug = cfg.augment
    per_rank = cfg.data.batch_size // max(1, int(os.environ.get("WORLD_SIZE", "1")))
    mean = [255 * m for m in aug.mean]
    std = [255 * s for s in aug.std]

    def uniform(low: float, high: float) -> Any:
        # DALI rejects an empty range ([1, 1) for a strength of 0): a constant then
        return fn.random.uniform(range=(low, high)) if high > low else float(low)

    on_gpu = device.type == "cuda"
    device_id = (device.index or 0) if on_gpu else None  # None: DALI's CPU-only pipeline

    @pipeline_def(batch_size=per_rank, num_threads=workers, device_id=device_id,
                  prefetch_queue_depth=2)
    def pipe():  # the DALI graph
        jpegs = fn.readers.webdataset(paths=tars, ext=["jpg"], random_shuffle=True,
                                      initial_fill=2048, name="reader",
                                      missing_component_behavior="skip")
        images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu",
                                   output_type=types.RGB)
        outputs = []
        for v in range(aug.num_views):
            x = fn.random_resized_crop(images, size=(aug.crop_size, aug.crop_size),
                                       random_area=list(aug.scale.area),
                                       random_aspect_ratio=list(aug.scale.aspect))
            if aug.rotation.p > 0 and aug.rotation.degrees > 0:
                x = fn.rotate(x, angle=uniform(-aug.rotation.degrees, aug.rotation.degrees),
                              keep_size=True)
            light = aug.lighting
            x = fn.brightness_contrast(
                x, brightness=uniform(1 - light.brightness, 1 + light.brightness),
                contrast=uniform(1 - light.contrast, 1 + light.contrast))
            x = fn.hsv(x, hue=uniform(-360 * light.hue, 360 * light.hue),
                       saturation=uniform(1 - light.saturation, 1 + light.saturation))
            if aug.blur.p[v % len(aug.blur.p)] > 0:
                x = fn.gaussian_blur(x, window_size=aug.blur.kernel_size,
                                     sigma=uniform(*aug.blur.sigma))
            x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=mean,
                                         std=std, mirror=fn.random.coin_flip(probability=aug.flip_p))
            outputs.append(x)
        return tuple(outputs)

    p = pipe()
    p.build()
    names = [f"v{i}" for i in range(aug.num_views)]
    # DROP: every batch full (the model step's shapes stay fixed); auto_reset: the iterator
    # resets itself after each epoch, but still raises StopIteration there (endless_batches)
    return endless_batches(DALIGenericIterator([p], names, reader_name="reader", auto_reset=True,
                                               last_batch_policy=LastBatchPolicy.DROP))


def endless_batches(epochs: Any) -> Iterator[Any]:
    """An iterable that ends each epoch with StopIteration and restarts on the next iter()
    (DALIGenericIterator with auto_reset) -> one endless iterator. The DALI row used to stop
    with StopIteration at the first epoch boundary (5000 images = 19 batches of 256)."""
    while True:
        empty = True
        for batch in epochs:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the DALI pipeline produced an empty epoch")


def measure_dali(trainer: Any, shards: Path, steps: int, warmup: int, workers: int) -> dict:
    it = make_dali_iterator(trainer.cfg, shards, trainer.device, workers)
    names = [f"v{i}" for i in range(trainer.cfg.augment.num_views)]

    def views() -> list[torch.Tensor]:
        out = next(it)[0]
        return [out[n] for n in names]

    for _ in range(warmup):
        views()
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        views()
    sync(trainer.device)
    loader_wall = time.perf_counter() - start
    for _ in range(warmup):
        trainer.model_step(views())
    sync(trainer.device)
    reset_peak(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.model_step(views())
    sync(trainer.device)
    wall = time.perf_counter() - start
    return {"loader_pairs_per_s": steps * trainer.global_batch / loader_wall,
            "pairs_per_s": steps * trainer.global_batch / wall,
            "step_ms": wall / steps * 1000, "peak_gb": peak_gb(trainer.device),
            "peak_reserved_gb": peak_reserved_gb(trainer.device)}


# ------------------------------------------------------------------------------------ report
def environment(device: torch.device) -> dict:
    import PIL

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpus": os.cpu_count(), "pillow": PIL.__version__}
    for name in ("torchvision", "timm", "webdataset", "torchdata", "kornia", "nvidia.dali"):
        try:
            env[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - informational
            env[name] = None
    env["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or platform.machine())
    return env


def format_table(report: dict) -> str:
    a = report["args"]
    lines = [
        (f"{report['arch']} @ {a['crop']} (loader side {a['image_size']}), {a['batch']} pairs "
         f"per GPU x {report['world_size']} GPU(s), {report['env']['device']}, torch "
         f"{report['env']['torch']}; ceiling = {report['ceiling_row']}"),
        (f"{'row':48s} {'pairs/s':>8s} {'% ceil':>7s} {'% best':>7s} {'wait':>6s} "
         f"{'peak GB':>8s}  notes"),
    ]
    for r in report["rows"]:
        name = f"{r['kind']} {r['name']}"
        if "error" in r:
            lines.append(f"{name:48s} {'error':>8s}  {r['error'][:80]}")
            continue
        pairs = r.get("pairs_per_s")
        own, best = r.get("pct_of_ceiling"), r.get("pct_of_best_ceiling")
        pct = f"{own:6.1f}% {best:6.1f}%" if own is not None else "      -       -"
        wait = r.get("data_wait_frac")
        wait_s = f"{100 * wait:5.1f}%" if wait is not None else "     -"
        peak = r.get("peak_gb")
        peak_s = f"{peak:8.2f}" if peak is not None else "       -"
        pairs_s = f"{pairs:8.0f}" if pairs else "       -"
        notes = []
        for key in ("peak_reserved_gb", "step_ms", "batch_ms", "call_ms", "decode_ms",
                    "resize_loop_ms", "resize_batched_ms", "distinct_sizes", "loader_pairs_per_s",
                    "log_steps", "step_ms_median", "step_ms_max"):
            if r.get(key) is not None:
                notes.append(f"{key}={r[key]:.1f}" if isinstance(r[key], float)
                             else f"{key}={r[key]}")
        prof = r.get("profile")
        if prof:
            notes.append(f"gpu_busy={100 * (prof['gpu_busy_frac_of_wall'] or 0):.1f}%")
        lines.append(f"{name:48s} {pairs_s} {pct} {wait_s} {peak_s}  {' '.join(notes)}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main
def parse_variant(text: str, args: argparse.Namespace) -> dict:
    parts = text.strip().split(":")
    if len(parts) not in (4, 5, 6):
        raise SystemExit(f"--variants: {text!r} is not "
                         f"decode:shards:overlap:augment[:workers[:model]]")
    decode, shards, overlap, aug = parts[:4]
    model = parts[5] if len(parts) == 6 else "default"
    if (decode not in ("cpu", "gpu") or shards not in ("full", "shrunk")
            or overlap not in ("on", "off") or aug not in ("eager", "compiled", "old")
            or model not in ("default", "eager", "cg")):
        raise SystemExit(f"--variants: bad value in {text!r}")
    workers = int(parts[4]) if len(parts) >= 5 and parts[4] else (
        args.workers if decode == "cpu" else args.gpu_workers)
    name = f"{decode}:{shards}:{overlap}:{aug}:w{workers}" + (
        f":{model}" if model != "default" else "")
    return {"decode": decode, "shards": shards, "overlap": overlap == "on", "augment": aug,
            "workers": workers, "model": model, "name": name}


def parse_loader_row(text: str, args: argparse.Namespace) -> dict:
    parts = text.strip().split(":")
    decode, shards = parts[0], parts[1]
    workers = int(parts[2]) if len(parts) == 3 else (
        args.workers if decode == "cpu" else args.gpu_workers)
    return {"decode": decode, "shards": shards, "workers": workers,
            "name": f"{decode}:{shards}:w{workers}"}


def end_to_end_order(variants: list[dict], order: str) -> list[tuple[dict, str]]:
    """(variant, row name) in run order: once, or A B ... B A with the pass in the name."""
    if order == "once":
        return [(v, v["name"]) for v in variants]
    return ([(v, f"{v['name']}#1") for v in variants]
            + [(v, f"{v['name']}#2") for v in reversed(variants)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    from lsdr_repr import distributed as dist
    from lsdr_repr.builders.augment import build_augment
    from lsdr_repr.train import Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    variants = [parse_variant(v, args) for v in args.variants.split(",") if v.strip()]
    loader_rows = [parse_loader_row(v, args) for v in args.loader_rows.split(",") if v.strip()]
    env = dist.read_dist_env()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = dist.init_distributed(env, device_type)
    is_main = env.rank == 0
    if is_main:
        prepare_data(args, data_dir)
    dist.barrier()  # the other ranks read what rank 0 wrote
    shards = {"full": data_dir / "full", "shrunk": data_dir / "shrunk"}
    run_dir = Path(args.run_dir or out / "run") / f"rank{env.rank}"
    cfg = make_config(args, shards["full"], run_dir, env.world_size, device)
    rows: list[dict] = []
    steps, warmup = args.steps, args.warmup
    PARTIAL["path"] = out / "rows_partial.json" if is_main else None
    try:
        trainer = Trainer(cfg, env, device)
        trainer.tracker.log_summary({"benchmark": "throughput"})
        images = one_batch_on_device(trainer, data_cfg_for(cfg, shards["full"], "cpu",
                                                           args.workers))
        with torch.no_grad():
            views = [v.clone() for v in trainer.staging.augment(images, generator=trainer.staging.generator)]

        # (a) the model-only ceilings: the trainer's model (compiled when train.compile) with
        # cuDNN's heuristics and with its benchmark mode, eager, and under CUDA graphs
        default = "compiled" if cfg.train.compile else "eager"
        models = model_variants(trainer, cudagraphs=args.cudagraphs == "on"
                                and cfg.train.compile and device.type == "cuda")
        bench_modes = {"off": [False], "on": [True], "both": [False, True]}[args.cudnn_benchmark]
        if device.type != "cuda":
            bench_modes = [False]
        best_bench, best_rate = bench_modes[0], -1.0
        for bench in bench_modes:
            torch.backends.cudnn.benchmark = bench
            suffix = "+cudnn.benchmark" if bench else ""
            result = guarded(rows, "model-only", default + suffix, lambda: measure_model(
                trainer, views, steps, max(warmup, 3), models["default"]))
            if result and result["pairs_per_s"] > best_rate:
                best_bench, best_rate = bench, result["pairs_per_s"]
            if rows[-1].get("pairs_per_s"):
                rows[-1]["model"] = "default"
        torch.backends.cudnn.benchmark = best_bench
        ceilings = {"default": max((r for r in rows if r.get("model") == "default"),
                                   key=lambda r: r["pairs_per_s"], default=None)}
        def other_ceiling(name: str) -> None:
            with torch.no_grad():
                fixed = [v.clone() for v in trainer.staging.augment(images, generator=trainer.staging.generator)]
            guarded(rows, "model-only", name, lambda: measure_model(
                trainer, fixed, steps, max(warmup, 3), models[name]))
            if rows[-1].get("pairs_per_s"):
                rows[-1]["model"] = name
                ceilings[name] = rows[-1]

        if "eager" in models and default != "eager":
            other_ceiling("eager")
        for k in (int(v) for v in args.accumulation.split(",") if v.strip()):
            guarded(rows, "model-only", f"{default}:accum{k}", lambda k=k: measure_model(
                trainer, views, steps, max(warmup, 3), models["default"], accumulation=k))
        views = []  # free the ceiling's inputs
        ceiling_row = ceilings["default"]

        # (b) loader alone (to uint8 [B,3,S,S] on the device)
        for lr in loader_rows:
            if lr["decode"] == "gpu" and device.type != "cuda":
                continue
            guarded(rows, "loader", lr["name"], lambda lr=lr: measure_loader(
                trainer, data_cfg_for(cfg, shards[lr["shards"]], lr["decode"], lr["workers"]),
                steps, max(2, warmup // 2)))
        if device.type == "cuda" and any(lr["decode"] == "gpu" for lr in loader_rows):
            guarded(rows, "gpu-resize", "full", lambda: measure_gpu_resize(
                trainer, data_cfg_for(cfg, shards["full"], "gpu", 1), 10))

        # (c) augmentation alone; views in the model's memory format, as the trainer makes them
        layout = {"channels_last": trainer.staging.augment.channels_last}
        eager_aug = build_augment(cfg.augment, compile=False, **layout).to(device)
        compiled_aug = (trainer.staging.augment if cfg.train.compile_augment
                        else build_augment(cfg.augment, compile=True, **layout).to(device))
        augs = {"eager": eager_aug}
        if device.type == "cuda":
            augs["compiled"] = compiled_aug
            # the path before Kornia: every stage fused, reflection fill only (same run, to
            # compare; augment variant "old")
            augs["old"] = build_augment(
                dataclasses.replace(cfg.augment, fill=["reflection"]), compile=True,
                impl={"warp": "fused", "color": "fused", "blur": "fused"}, **layout).to(device)
        wanted = {n.strip() for n in args.augment_rows.split(",") if n.strip()}
        for name, aug in augs.items():
            if name in wanted:
                guarded(rows, "augment", name, lambda aug=aug: measure_augment(
                    aug, images, steps, 3, trainer.staging.generator))

        # (d) end to end through Trainer.run; the CUDA-graph ceiling just before its first
        # variant (its graph pools would otherwise count in the peaks of the other rows)
        profile = {int(i) % max(1, len(variants)) for i in args.profile_variants.split(",")
                   if i.strip()}
        for v, label in end_to_end_order(variants, args.order):
            if v["decode"] == "gpu" and device.type != "cuda":
                continue
            if v["model"] not in models:
                continue
            if v["model"] not in ceilings:
                other_ceiling(v["model"])
            aug = augs.get(v["augment"], eager_aug)
            guarded(rows, "end-to-end", label, lambda v=v, aug=aug: measure_end_to_end(
                trainer, data_cfg_for(cfg, shards[v["shards"]], v["decode"], v["workers"]),
                steps, warmup, v["overlap"], aug, models[v["model"]]))
            if rows[-1].get("pairs_per_s"):
                rows[-1]["model"] = v["model"]

        # (e) DALI on the same shards, feeding the same model step
        if not args.no_dali and dali_available():
            for shard_set in ("full",):
                where = "gpu" if device.type == "cuda" else device.type  # the rows' names
                guarded(rows, "dali", f"{where}:{shard_set}", lambda s=shard_set: measure_dali(
                    trainer, shards[s], steps, warmup, args.gpu_workers))
                if rows[-1].get("pairs_per_s"):
                    rows[-1]["model"] = "default"
        images = None

        # Profiles last: after torch.profiler has run with CUDA activities, CUPTI stays attached
        # (Kineto does not tear it down by default; pytorch/pytorch#144455) and every later
        # launch is slower, which once cost the rows measured after a profile 10-25 %.
        for i in sorted(profile):
            v = variants[i]
            target = next((r for r in rows if r["kind"] == "end-to-end"
                           and r["name"].split("#")[0] == v["name"] and "error" not in r), None)
            if target is None:
                continue
            try:
                target["profile"] = measure_end_to_end(
                    trainer, data_cfg_for(cfg, shards[v["shards"]], v["decode"], v["workers"]),
                    1, max(2, warmup // 2), v["overlap"], augs.get(v["augment"], eager_aug),
                    models[v["model"]], profile_steps=args.profile_steps, profile_dir=out,
                    name=v["name"])["profile"]
            except Exception as exc:  # a profile is diagnostic: never lose the table to it
                log.exception("profiling %s failed", v["name"])
                target["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        trainer.tracker.finish()
    finally:
        # Drop the DDP-wrapped models before leaving the group: gloo/NCCL objects that outlive
        # destroy_process_group abort the process at exit (lsdr_repr.distributed.cleanup).
        trainer = models = augs = None
        dist.cleanup()

    if not is_main:
        return 0
    ceiling = ceiling_row["pairs_per_s"] if ceiling_row else None
    best = max((r["pairs_per_s"] for r in ceilings.values() if r and r.get("model") != "eager"),
               default=ceiling)
    for r in rows:
        if ceiling and r.get("pairs_per_s"):
            own = ceilings.get(r.get("model", "default")) or ceiling_row
            # % of the ceiling of the same model step (what the data pipeline costs), and of
            # the fastest model-only step measured (what a user gets against the best ceiling)
            r["pct_of_ceiling"] = 100 * r["pairs_per_s"] / own["pairs_per_s"]
            r["pct_of_best_ceiling"] = 100 * r["pairs_per_s"] / best
            r["pairs_per_s_per_gpu"] = r["pairs_per_s"] / env.world_size
    report = {
        "args": vars(args), "env": environment(device), "arch": cfg.model.arch,
        "world_size": env.world_size, "config": {"model": cfg.model.arch,
                                                 "objective": cfg.objective.name,
                                                 "projector": cfg.model.projector,
                                                 "stages": cfg.model.stages,
                                                 "optim": cfg.optim.name,
                                                 "augment_preset": cfg.augment.preset},
        "shards": {k: shard_stats(v) for k, v in shards.items()},
        "ceiling_row": (f"{ceiling_row['kind']} {ceiling_row['name']}" if ceiling_row else None),
        "ceiling_pairs_per_s": ceiling, "best_ceiling_pairs_per_s": best,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "rows": rows,
    }
    name = f"throughput_{cfg.model.arch}_b{args.batch}_x{env.world_size}.json"
    (out / name).write_text(json.dumps(report, indent=2))
    if PARTIAL["path"] is not None:
        PARTIAL["path"].unlink(missing_ok=True)  # the report holds every row
    print(format_table(report))
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
