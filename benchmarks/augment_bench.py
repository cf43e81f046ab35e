"""Time lsdr_repr.augment against kornia's AugmentationSequential on the same batch.

    python benchmarks/augment_bench.py --device cuda --batch 256 --size 256 --crop 224 \
        --iters 50 --out bench_out/

Rows (each: the views of one call, two global views by default, uint8 [B,3,S,S] already on the
device, the uint8 -> float conversion included):
- kornia: one `kornia.augmentation.AugmentationSequential` per view of RandomResizedCrop,
  RandomRotation, RandomHorizontalFlip, ColorJitter, RandomGrayscale, RandomGaussianBlur,
  RandomSolarize, Normalize, with the probabilities and ranges of the `equivalent` config;
- ours-eager/<config>: GpuAugment eagerly, for `equivalent` (the same ops as the kornia row, no
  gamma / white balance / zoom-out) and the `lsdr-invariance` and `vicreg` (bicubic) presets;
- ours-compiled/<config>: the same with `compile=True` (each view's sampling + rendering one
  torch.compile graph); on by default on CUDA, `--compile off` skips it;
- impl/<variant>: the `lsdr-invariance` preset compiled with each stage through Kornia's
  functionals or the fused maths (`build_augment(impl=...)`): `default` (augment_ops.DEFAULT_IMPL),
  `all-kornia`, `all-fused`, one stage swapped at a time, and `old` (every stage fused and the
  reflection fill only: the path before Kornia). The cost of the Kornia version of a stage is
  its row minus the row with that stage fused (the rule: a custom op stays only where Kornia
  costs more than 1 ms per step).
Timing: CUDA events around each call after warm-up (the first compiled calls compile), or
perf_counter with a synchronize on other devices. Stages: the eager pipeline with a CUDA event
after each stage (`GpuAugment.stage_hook`), and kornia module by module. The table goes to
stdout and everything to OUT/augment_bench.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from lsdr_repr.augment_ops import DEFAULT_IMPL, STAGES
from lsdr_repr.builders.augment import build_augment
from lsdr_repr.config import AugmentConfig, config_from_dict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=256, help="images per call")
    p.add_argument("--size", type=int, default=256, help="side S of the uint8 input batch")
    p.add_argument("--crop", type=int, default=224, help="side R of the global views")
    p.add_argument("--local-crops", type=int, default=0, help="multi-crop: extra local views")
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=50, help="timed calls per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (compiles)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="compiled rows (auto: on for CUDA only: inductor on CPU is slow to build)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--no-kornia", action="store_true", help="skip the kornia rows")
    p.add_argument("--impl-study", choices=["auto", "on", "off"], default="auto",
                   help="compiled kornia-vs-fused rows per stage (auto: on with --compile)")
    p.add_argument("--out", default="bench_out", help="folder for augment_bench.json")
    return p.parse_args(argv)


def make_configs(args: argparse.Namespace) -> dict[str, AugmentConfig]:
    common = {"crop_size": args.crop, "local_crops": args.local_crops,
              "local_crop_size": args.local_size}
    equivalent = {
        **common,
        "scale": {"p": 1.0, "area": [0.08, 1.0]},
        "rotation": {"p": 0.5, "degrees": 30.0, "border": "reflection"},
        "lighting": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1},
        "flip_p": 0.5, "grayscale_p": 0.2,
        "blur": {"p": [1.0, 0.1], "sigma": [0.1, 2.0], "kernel_size": 23},
        "solarize": {"p": [0.0, 0.2], "threshold": 0.5},
    }
    def preset(name: str) -> AugmentConfig:
        return config_from_dict({"augment": {**common, "preset": name}}).augment

    return {
        "equivalent": config_from_dict({"augment": equivalent}).augment,
        "lsdr-invariance": preset("lsdr-invariance"),
        "vicreg": preset("vicreg"),
    }


def make_kornia(cfg: AugmentConfig, device: torch.device) -> tuple[list, Callable]:
    """One AugmentationSequential per view with `cfg`'s ops and per-view blur/solarize p."""
    import kornia.augmentation as K

    pipes = []
    for index in range(cfg.num_views + cfg.local_crops):
        local = index >= cfg.num_views
        size = cfg.local_crop_size if local else cfg.crop_size
        area = cfg.local_area if local else cfg.scale.area
        light = cfg.lighting
        pipe = K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=tuple(area), ratio=tuple(cfg.scale.aspect)),
            K.RandomRotation(degrees=cfg.rotation.degrees, p=cfg.rotation.p),
            K.RandomHorizontalFlip(p=cfg.flip_p),
            K.ColorJitter(light.brightness, light.contrast, light.saturation, light.hue, p=light.p),
            K.RandomGrayscale(p=cfg.grayscale_p),
            K.RandomGaussianBlur(
                (cfg.blur.kernel_size, cfg.blur.kernel_size), tuple(cfg.blur.sigma),
                p=cfg.blur.p[index % len(cfg.blur.p)],
            ),
            K.RandomSolarize(  # thresholds=0: exactly 0.5, as PIL's ImageOps.solarize
                thresholds=0.0, additions=0.0, p=cfg.solarize.p[index % len(cfg.solarize.p)]
            ),
            # mean/std already on the device: kornia would copy them there on every call
            K.Normalize(mean=torch.tensor(cfg.mean, device=device),
                        std=torch.tensor(cfg.std, device=device)),
        ).to(device)
        pipes.append(pipe)

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float() / 255.0
        return [pipe(x) for pipe in pipes]

    return pipes, run


def impl_variants(cfg: AugmentConfig) -> dict[str, tuple[AugmentConfig, dict[str, str]]]:
    """{variant: (config, impl)} of the kornia-vs-fused study (see the module docstring)."""
    import dataclasses

    fused = {stage: "fused" for stage in STAGES}
    variants = {"default": (cfg, dict(DEFAULT_IMPL)),
                "all-kornia": (cfg, {stage: "kornia" for stage in STAGES}),
                "all-fused": (cfg, fused)}
    for stage in STAGES:
        other = "fused" if DEFAULT_IMPL[stage] == "kornia" else "kornia"
        variants[f"{stage}={other}"] = (cfg, {**DEFAULT_IMPL, stage: other})
    variants["old"] = (dataclasses.replace(cfg, fill=["reflection"]), fused)
    return variants


class Clock:
    """Marks on the device timeline: CUDA events on CUDA, perf_counter after a sync elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def intervals(self) -> list[tuple[str, float]]:
        """(name, ms since the previous mark) for every mark after the first; syncs first."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1000.0
            out.append((name, ms))
        self.marks.clear()
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict:
    """Warm up, then time `iters` calls one by one; returns ms statistics (first call too)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first_ms = (time.perf_counter() - start) * 1000.0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        clock = Clock(device)
        clock.mark("start")
        fn()
        clock.mark("call")
        times.append(clock.intervals()[0][1])
    times.sort()
    return {
        "ms_mean": statistics.fmean(times),
        "ms_median": statistics.median(times),
        "ms_min": times[0],
        "ms_p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        "first_call_ms": first_ms,
        "iters": iters,
    }


def stage_breakdown(run_once: Callable[[Clock], object], device: torch.device, iters: int) -> dict:
    """Mean ms per stage name (summed over views) over `iters` instrumented calls."""
    totals: dict[str, float] = defaultdict(float)
    for _ in range(iters):
        clock = Clock(device)
        clock.mark("start")
        run_once(clock)
        for name, ms in clock.intervals():
            totals[name] += ms / iters
    return dict(totals)


def ours_stages(aug, images: torch.Tensor, device: torch.device, iters: int) -> dict:
    def once(clock: Clock) -> None:
        aug.stage_hook = clock.mark
        try:
            aug(images)
        finally:
            aug.stage_hook = None

    once(Clock(device))  # warm
    sync(device)
    return stage_breakdown(once, device, iters)


def kornia_stages(pipes: list, images: torch.Tensor, device: torch.device, iters: int) -> dict:
    def once(clock: Clock) -> None:
        x = images.float() / 255.0
        clock.mark("to_float")
        for pipe in pipes:
            y = x
            for module in pipe.children():
                y = module(y)
                clock.mark(type(module).__name__)

    once(Clock(device))
    sync(device)
    return stage_breakdown(once, device, iters)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    images = images.to(device)
    configs = make_configs(args)
    stage_iters = max(1, min(args.iters, 10))
    rows: dict[str, dict] = {}
    stages: dict[str, dict] = {}

    if not args.no_kornia:
        pipes, run = make_kornia(configs["equivalent"], device)
        with torch.no_grad():
            rows["kornia"] = time_calls(lambda: run(images), device, args.iters, args.warmup)
            stages["kornia"] = kornia_stages(pipes, images, device, stage_iters)

    with torch.no_grad():
        for name, cfg in configs.items():
            aug = build_augment(cfg).to(device)
            rows[f"ours-eager/{name}"] = time_calls(
                functools.partial(aug, images), device, args.iters, args.warmup
            )
            stages[f"ours-eager/{name}"] = ours_stages(aug, images, device, stage_iters)
        if compile_on:
            for name in ("equivalent", "lsdr-invariance"):
                aug = build_augment(configs[name], compile=True, compile_mode=args.compile_mode)
                aug = aug.to(device)
                rows[f"ours-compiled/{name}"] = time_calls(
                    functools.partial(aug, images), device, args.iters, max(args.warmup, 3)
                )

    study = args.impl_study == "on" or (args.impl_study == "auto" and compile_on)
    if study:
        with torch.no_grad():
            for name, (cfg, impl) in impl_variants(configs["lsdr-invariance"]).items():
                aug = build_augment(cfg, compile=compile_on, compile_mode=args.compile_mode,
                                    impl=impl).to(device)
                rows[f"impl/{name}"] = {**time_calls(functools.partial(aug, images), device,
                                                     args.iters, max(args.warmup, 3)),
                                        "impl": impl}

    report = {
        "args": vars(args),
        "env": {
            "torch": torch.__version__,
            "kornia": _version("kornia"),
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()),
        },
        "views_per_call": configs["equivalent"].num_views + args.local_crops,
        "rows": rows,
        "stages_ms": stages,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "augment_bench.json").write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {out / 'augment_bench.json'}")
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a version string is informational
        return "?"


def format_table(report: dict) -> str:
    a = report["args"]
    env = report["env"]
    lines = [
        (
            f"{report['views_per_call']} views of {a['batch']} images {a['size']} -> {a['crop']} "
            f"on {env['device']} (torch {env['torch']}, kornia {env['kornia']})"
        ),
        f"{'row':32s} {'mean ms':>9s} {'median':>9s} {'p90':>9s} {'first call':>11s}",
    ]
    for name, r in report["rows"].items():
        lines.append(
            f"{name:32s} {r['ms_mean']:9.2f} {r['ms_median']:9.2f} {r['ms_p90']:9.2f} "
            f"{r['first_call_ms']:11.1f}"
        )
    for name, st in report["stages_ms"].items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in st.items())
        lines.append(f"stages {name}: {parts} (sum {sum(st.values()):.2f} ms)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
