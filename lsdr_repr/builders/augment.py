"""`build_augment`: cfg.augment -> GpuAugment (view specs, normalisation, Kornia modules),
every augment value checked first as a one-line ConfigError naming its key."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lsdr_repr import kornia_ops
from lsdr_repr.augment import FILL_NAMES, GpuAugment, ViewSpec
from lsdr_repr.augment_ops import DEFAULT_IMPL, STAGES, Impl
from lsdr_repr.config import AugmentConfig
from lsdr_repr.errors import ConfigError

RENDER_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # augment.precision


def _check_p(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"augment.{name}: probability {p} is outside [0, 1]")


def _check_range(name: str, r: Sequence[float], low: float = 0.0, strict: bool = True) -> None:
    lo, hi = r
    if (lo <= low if strict else lo < low) or hi < lo:
        bound = ">" if strict else ">="
        raise ConfigError(f"augment.{name}: expected {bound} {low} and low <= high, got {list(r)}")


def check_augment_config(cfg: AugmentConfig) -> None:
    """Raise a one-line ConfigError naming the first invalid augment value."""
    if cfg.num_views < 2:
        raise ConfigError(f"augment.num_views: need at least 2 views, got {cfg.num_views}")
    if cfg.crop_size < 1 or (cfg.local_crops > 0 and cfg.local_crop_size < 1):
        raise ConfigError(
            f"augment.crop_size/local_crop_size: must be >= 1, got "
            f"{cfg.crop_size}/{cfg.local_crop_size}"
        )
    if cfg.local_crops < 0:
        raise ConfigError(f"augment.local_crops: must be >= 0, got {cfg.local_crops}")
    for name, p in [
        ("scale.p", cfg.scale.p), ("scale.zoom_out_p", cfg.scale.zoom_out_p),
        ("rotation.p", cfg.rotation.p), ("lighting.p", cfg.lighting.p), ("flip_p", cfg.flip_p),
        ("grayscale_p", cfg.grayscale_p),
    ]:
        _check_p(name, p)
    for block in ("blur", "solarize"):
        probs = getattr(cfg, block).p
        if not probs:
            raise ConfigError(f"augment.{block}.p: needs at least one probability (one per view)")
        for i, p in enumerate(probs):
            _check_p(f"{block}.p[{i}]", p)
    _check_range("scale.area", cfg.scale.area)
    _check_range("local_area", cfg.local_area)
    _check_range("scale.aspect", cfg.scale.aspect)
    _check_range("scale.zoom_out", cfg.scale.zoom_out)
    _check_range("blur.sigma", cfg.blur.sigma, strict=False)
    if cfg.blur.kernel_size < 1 or cfg.blur.kernel_size % 2 == 0:
        raise ConfigError(
            f"augment.blur.kernel_size: must be odd and >= 1, got {cfg.blur.kernel_size}"
        )
    light = cfg.lighting
    for name in ("brightness", "contrast", "saturation", "gamma", "temperature"):
        if getattr(light, name) < 0:
            raise ConfigError(f"augment.lighting.{name}: must be >= 0, got {getattr(light, name)}")
    if not 0.0 <= light.hue <= 0.5:
        raise ConfigError(f"augment.lighting.hue: must be in [0, 0.5] turns, got {light.hue}")
    if cfg.rotation.degrees < 0:
        raise ConfigError(f"augment.rotation.degrees: must be >= 0, got {cfg.rotation.degrees}")
    if not cfg.fill:
        raise ConfigError("augment.fill: needs at least one fill (e.g. [zeros, reflection])")
    for i, entry in enumerate(cfg.fill):
        if isinstance(entry, str) and entry not in FILL_NAMES:
            raise ConfigError(f"augment.fill[{i}]: unknown fill {entry!r} (known: "
                              f"{', '.join(FILL_NAMES)}, or a gray level in [0, 1])")
        if not isinstance(entry, str) and not 0.0 <= entry <= 1.0:
            raise ConfigError(f"augment.fill[{i}]: a gray level must be in [0, 1], got {entry}")
    if not 0.0 <= cfg.solarize.threshold <= 1.0:
        raise ConfigError(
            f"augment.solarize.threshold: must be in [0, 1], got {cfg.solarize.threshold}"
        )
    if any(s <= 0 for s in cfg.std):
        raise ConfigError(f"augment.std: must be > 0, got {list(cfg.std)}")
    interpolation = cfg.interpolation
    if interpolation not in ("bilinear", "bicubic"):
        raise ConfigError(
            f"augment.interpolation: expected bilinear | bicubic, got {interpolation!r}"
        )


def view_spec(cfg: AugmentConfig, view_index: int, impl: Impl | None = None) -> ViewSpec:
    """The static description of view `view_index` (globals first, then local crops)."""
    total = cfg.num_views + cfg.local_crops
    if not 0 <= view_index < total:
        raise ConfigError(f"augment: view index {view_index} out of range (0..{total - 1})")
    local = view_index >= cfg.num_views
    return ViewSpec(
        out_size=cfg.local_crop_size if local else cfg.crop_size,
        scale_p=cfg.scale.p,
        area=tuple(cfg.local_area if local else cfg.scale.area),
        aspect=tuple(cfg.scale.aspect),
        zoom_out_p=0.0 if local else cfg.scale.zoom_out_p,
        zoom_out=tuple(cfg.scale.zoom_out),
        rotation_p=cfg.rotation.p,
        degrees=cfg.rotation.degrees,
        border="crop" if cfg.rotation.border == "crop" else "fill",
        fill=tuple(cfg.fill),
        flip_p=cfg.flip_p,
        lighting_p=cfg.lighting.p,
        brightness=cfg.lighting.brightness,
        contrast=cfg.lighting.contrast,
        saturation=cfg.lighting.saturation,
        hue=cfg.lighting.hue,
        gamma=cfg.lighting.gamma,
        temperature=cfg.lighting.temperature,
        grayscale_p=cfg.grayscale_p,
        blur_p=cfg.blur.p[view_index % len(cfg.blur.p)],
        blur_sigma=tuple(cfg.blur.sigma),
        blur_radius=cfg.blur.kernel_size // 2,
        solarize_p=cfg.solarize.p[view_index % len(cfg.solarize.p)],
        solarize_threshold=cfg.solarize.threshold,
        interpolation=cfg.interpolation,
        impl=tuple(sorted({**DEFAULT_IMPL, **(impl or {})}.items())),
    )


def build_augment(aug_cfg: AugmentConfig, *, impl: Impl | None = None, **kwargs: Any
                  ) -> GpuAugment:
    """The augmentation module of a config (kwargs: compile, compile_mode, channels_last; impl:
    kornia or fused per stage, augment_ops.DEFAULT_IMPL, for benchmarks and tests)."""
    check_augment_config(aug_cfg)
    unknown = set(impl or {}) - set(STAGES) or {
        v for v in (impl or {}).values() if v not in ("kornia", "fused")}
    if unknown:
        raise ValueError(f"impl: unknown stage or implementation {sorted(unknown)}")
    total = aug_cfg.num_views + aug_cfg.local_crops
    return GpuAugment(
        [view_spec(aug_cfg, i, impl) for i in range(total)], aug_cfg.mean, aug_cfg.std,
        render_dtype=RENDER_DTYPES[aug_cfg.precision],
        kornia=[(module, kornia_ops.views_of(entry, total))
                for module, entry in zip(kornia_ops.build(aug_cfg.kornia), aug_cfg.kornia,
                                         strict=True)],
        **kwargs)
