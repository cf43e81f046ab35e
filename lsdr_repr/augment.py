"""Batched GPU augmentation: V random views of a uint8 batch, parameters sampled per sample.

    aug = build_augment(cfg.augment)            # an nn.Module; no learnable state
    views = aug(images_uint8)                   # list of float32 [B,3,R,R], normalised
    aug.last_params                             # one ViewParams per view: replayable
    same = aug.apply(images_uint8, aug.last_params[0])      # == views[0]
    grid = aug.denormalize(views[0])            # [0,1] for image grids

Views 0..num_views-1 are global crops at `crop_size`; then `local_crops` views at
`local_crop_size` with the crop area drawn from `local_area` and no zoom-out. The per-view
probability lists `blur.p` and `solarize.p` are cycled over all views by index (view 0 takes
p[0], view 1 p[1], view 2 p[0] again for a two-entry list, ...).

Per view and per sample (all probabilities are masks over the batch, never Python branches):
- scale: random resized crop (torchvision's rule: up to 10 draws of area fraction and
  log-uniform aspect, the first that fits; otherwise the whole image); with `zoom_out_p` the view
  instead shows the whole image shrunk by a log-uniform factor in `zoom_out`, placed at a random
  offset, the rest of the view filled by reflection;
- rotation: uniform in [-degrees, degrees] with probability p. Border 'reflection' reads mirrored
  content where rotated corners leave the image; border 'crop' shrinks the view (about its
  centre, then re-centres it) until its rotated footprint lies inside the image, so no view
  pixel comes from outside (zoomed-out views keep their size and use reflection);
- horizontal flip;
- lighting with probability p: gamma (log-uniform in [1/(1+g), 1+g]), white balance (red/blue
  gains e^{+-t}, t uniform in [-temperature, temperature]), brightness, contrast, saturation
  (torchvision's ranges: uniform in [max(0, 1-s), 1+s]), hue (uniform in [-h, h] turns);
- grayscale; gaussian blur (sigma uniform in `blur.sigma` pixels of the view, truncated at
  `kernel_size // 2` pixels, reflect borders); solarize (values >= threshold inverted);
- normalisation with mean/std; on CUDA the views are channels_last.

Speed: crop, zoom, rotation and flip are one `affine_grid + grid_sample` per view (composed 2x3
matrices); the colour steps are one 3x3 matrix plus an offset per sample (one batched matmul);
the blur is two batched matmuls by dense [R,R] reflect-Gaussian matrices (tensor cores in fp16
on GPUs, so its cost does not depend on the kernel size); solarize and normalisation are one
elementwise pass that writes the channels_last float32 output. Parameters come from one
`torch.rand(B, NUM_UNIFORMS)` per view followed by pure tensor maths (`sample_view`), so with
`compile=True` each view (sampling + rendering) is one `torch.compile`d graph. The maths lives in
`lsdr_repr.augment_ops`. kornia's `AugmentationSequential` is the slow reference
(`benchmarks/augment_bench.py`); kornia's functionals are the numerical references in the tests.

Invariance evaluation: `transform_family(images, family, strength)` applies one family
(lighting, rotation, scale, zoom_in, zoom_out or combined) at a fixed strength.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lsdr_repr.augment_ops import (
    LUMA,
    StageHook,
    affine_theta,
    color_transform,
    fit_inside,
    footprint_area,
    render,
    to_float01,
)
from lsdr_repr.config import AugmentConfig
from lsdr_repr.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Columns of the per-view uniform draw U [B, NUM_UNIFORMS]: one `torch.rand` call per view.
CROP_TRIES = 10
_AREA = slice(0, CROP_TRIES)
_RATIO = slice(CROP_TRIES, 2 * CROP_TRIES)
(
    _CX, _CY, _SCALE, _ZOOM, _ZOOM_F, _ZCX, _ZCY, _ROT, _ANGLE, _FLIP, _LIGHT,
    _BRI, _CON, _SAT, _HUE, _GAM, _TEMP, _GRAY, _BLUR, _SIGMA, _SOLAR,
) = range(2 * CROP_TRIES, 2 * CROP_TRIES + 21)
NUM_UNIFORMS = 2 * CROP_TRIES + 21

Family = Literal["lighting", "rotation", "scale", "zoom_in", "zoom_out", "combined"]
FAMILIES: tuple[str, ...] = ("lighting", "rotation", "scale", "zoom_in", "zoom_out", "combined")

# What `transform_family` does at strength 1 (it scales linearly in angle and in log factor):
# rotation by 180 degrees; zoom by a factor 3 (in: a central crop of a third of the side, about
# RRC's smallest 0.08 area; out: the image at a third of the view side); lighting with brightness,
# contrast, saturation and gamma factors 1.5 or 1/1.5, hue 0.1 turn, white balance t = 0.3 (the
# edges of the lsdr-invariance preset).
FAMILY_MAX = {
    "degrees": 180.0, "zoom": 3.0, "brightness": 1.5, "contrast": 1.5, "saturation": 1.5,
    "hue": 0.1, "gamma": 1.5, "temperature": 0.3,
}


# ------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class ViewSpec:
    """Everything static about one view (hashable: it keys the compiled graphs)."""

    out_size: int
    scale_p: float
    area: tuple[float, float]
    aspect: tuple[float, float]
    zoom_out_p: float
    zoom_out: tuple[float, float]
    rotation_p: float
    degrees: float
    border: str
    flip_p: float
    lighting_p: float
    brightness: float
    contrast: float
    saturation: float
    hue: float
    gamma: float
    temperature: float
    grayscale_p: float
    blur_p: float
    blur_sigma: tuple[float, float]
    blur_radius: int
    solarize_p: float
    solarize_threshold: float
    interpolation: str

    @property
    def has_gamma(self) -> bool:
        return self.lighting_p > 0 and self.gamma > 0

    @property
    def has_color(self) -> bool:
        jitter = (self.brightness, self.contrast, self.saturation, self.hue, self.temperature)
        return (self.lighting_p > 0 and any(v > 0 for v in jitter)) or self.grayscale_p > 0

    @property
    def has_blur(self) -> bool:
        return self.blur_p > 0

    @property
    def has_solarize(self) -> bool:
        return self.solarize_p > 0


@dataclass
class ViewParams:
    """The sampled parameters of one view; `GpuAugment.apply(images, params)` replays it.

    Tensors have the batch first: theta [B,2,3] (view -> source, normalised coordinates),
    gamma [B], color [B,3,3], offset [B,3] (contrast pull: offset . mean colour), blur_sigma [B]
    (pixels of the view, 0 = no blur), solarize [B] (1.0 = solarized). angle [B] (degrees),
    flip [B] (bool), area [B] (view footprint / image area; > 1 when zoomed out) and grayscale
    [B] (bool) describe the sample for logging. The remaining fields are static.
    """

    theta: Tensor
    gamma: Tensor
    color: Tensor
    offset: Tensor
    blur_sigma: Tensor
    solarize: Tensor
    angle: Tensor
    flip: Tensor
    area: Tensor
    grayscale: Tensor
    out_size: tuple[int, int]
    has_gamma: bool = True
    has_color: bool = True
    has_blur: bool = True
    has_solarize: bool = True

    TENSORS = (
        "theta", "gamma", "color", "offset", "blur_sigma", "solarize", "angle", "flip", "area",
        "grayscale",
    )

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self.TENSORS)

    def to(self, device: torch.device | str) -> ViewParams:
        moved = {name: getattr(self, name).to(device) for name in self.TENSORS}
        return dataclasses.replace(self, **moved)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], spec: ViewSpec) -> ViewParams:
        return cls(
            *tensors,
            out_size=(spec.out_size, spec.out_size),
            has_gamma=spec.has_gamma,
            has_color=spec.has_color,
            has_blur=spec.has_blur,
            has_solarize=spec.has_solarize,
        )

    @classmethod
    def identity(
        cls, batch: int, out_size: int | tuple[int, int], device: torch.device | str = "cpu"
    ) -> ViewParams:
        """Parameters that show the whole image unchanged: a base to edit for hand-made views."""
        zeros = torch.zeros(batch, device=device)
        eye = torch.eye(2, 3, device=device).expand(batch, 2, 3).clone()
        return cls(
            theta=eye, gamma=zeros + 1.0, color=torch.eye(3, device=device).repeat(batch, 1, 1),
            offset=torch.zeros(batch, 3, device=device), blur_sigma=zeros.clone(),
            solarize=zeros.clone(), angle=zeros.clone(), flip=zeros.bool(), area=zeros + 1.0,
            grayscale=zeros.bool(), out_size=_hw(out_size),
        )


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * u


def _log_uniform(u: Tensor, lo: float, hi: float) -> Tensor:
    return torch.exp(_uniform(u, math.log(lo), math.log(hi)))


def _crop_fallback(aspect: tuple[float, float]) -> tuple[float, float]:
    """torchvision's fallback after 10 misses: the whole square image, aspect clamped to range."""
    ratio = min(max(1.0, aspect[0]), aspect[1])
    return (1.0, 1.0 / ratio) if ratio >= 1.0 else (ratio, 1.0)


def sample_view(u: Tensor, spec: ViewSpec, luma: Tensor) -> tuple[Tensor, ...]:
    """Turn uniforms u [B, NUM_UNIFORMS] into the ViewParams tensors of one view (pure maths).

    Returns (theta, gamma, color, offset, blur_sigma, solarize, angle, flip, area, grayscale),
    in ViewParams.TENSORS order. No data-dependent control flow: compiles to one fused graph.
    """
    # random resized crop (extent = half width / height as a fraction of the source side)
    area = _uniform(u[:, _AREA], *spec.area)
    ratio = _log_uniform(u[:, _RATIO], *spec.aspect)
    w_try, h_try = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
    fits = (w_try <= 1.0) & (h_try <= 1.0)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first draw that fits
    fw, fh = _crop_fallback(spec.aspect)
    any_fit = fits.any(dim=1)
    w = torch.where(any_fit, w_try.gather(1, first)[:, 0], fw)
    h = torch.where(any_fit, h_try.gather(1, first)[:, 0], fh)
    cx = (2.0 * u[:, _CX] - 1.0) * (1.0 - w)
    cy = (2.0 * u[:, _CY] - 1.0) * (1.0 - h)
    cropped = u[:, _SCALE] < spec.scale_p
    w, h = torch.where(cropped, w, 1.0), torch.where(cropped, h, 1.0)
    cx, cy = torch.where(cropped, cx, 0.0), torch.where(cropped, cy, 0.0)

    # zoom-out replaces the crop: the view spans z times the image, the image sits inside it
    zoomed = u[:, _ZOOM] < spec.zoom_out_p
    z = _log_uniform(u[:, _ZOOM_F], *spec.zoom_out)
    w, h = torch.where(zoomed, z, w), torch.where(zoomed, z, h)
    cx = torch.where(zoomed, (2.0 * u[:, _ZCX] - 1.0) * (z - 1.0), cx)
    cy = torch.where(zoomed, (2.0 * u[:, _ZCY] - 1.0) * (z - 1.0), cy)

    rotated = u[:, _ROT] < spec.rotation_p
    angle = torch.where(rotated, (2.0 * u[:, _ANGLE] - 1.0) * spec.degrees, 0.0)
    flip = u[:, _FLIP] < spec.flip_p
    theta = affine_theta(
        torch.stack([cx, cy], dim=1), torch.stack([w, h], dim=1), torch.deg2rad(angle), flip
    )
    if spec.border == "crop":
        theta = fit_inside(theta, keep=zoomed)
    footprint = footprint_area(theta)

    lit = u[:, _LIGHT] < spec.lighting_p

    def factor(col: int, strength: float) -> Tensor:
        return torch.where(lit, _uniform(u[:, col], max(0.0, 1.0 - strength), 1.0 + strength), 1.0)

    bri = factor(_BRI, spec.brightness)
    con = factor(_CON, spec.contrast)
    sat = factor(_SAT, spec.saturation)
    hue = torch.where(lit, (2.0 * u[:, _HUE] - 1.0) * spec.hue, 0.0)
    gamma = torch.where(lit, torch.exp((2.0 * u[:, _GAM] - 1.0) * math.log1p(spec.gamma)), 1.0)
    temp = torch.where(lit, (2.0 * u[:, _TEMP] - 1.0) * spec.temperature, 0.0)
    gray = u[:, _GRAY] < spec.grayscale_p
    color, offset = color_transform(bri, con, sat, hue, temp, gray.to(u.dtype), luma)

    blurred = u[:, _BLUR] < spec.blur_p
    sigma = torch.where(blurred, _uniform(u[:, _SIGMA], *spec.blur_sigma), 0.0)
    solar = (u[:, _SOLAR] < spec.solarize_p).to(u.dtype)
    return theta, gamma, color, offset, sigma, solar, angle, flip, footprint, gray


def _rand(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Uniforms on `device`, drawn from `generator` on its own device when that differs."""
    if generator is None or torch.device(generator.device).type == device.type:
        return torch.rand(shape, device=device, generator=generator)
    return torch.rand(shape, device=generator.device, generator=generator).to(device)


# ---------------------------------------------------------------------------------- config
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
    if cfg.rotation.border not in ("reflection", "crop"):
        raise ConfigError(
            f"augment.rotation.border: expected reflection | crop, got {cfg.rotation.border!r}"
        )
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


def view_spec(cfg: AugmentConfig, view_index: int) -> ViewSpec:
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
        border=cfg.rotation.border,
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
    )


# ---------------------------------------------------------------------------------- module
def _view_graph(
    images: Tensor, u: Tensor, luma: Tensor, scale: Tensor, bias: Tensor, *,
    spec: ViewSpec, channels_last: bool, blur_dtype: torch.dtype,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Sampling + rendering of one view as one function: what `compile=True` compiles."""
    tensors = sample_view(u, spec, luma)
    view = render(
        to_float01(images), *tensors[:6], out_hw=(spec.out_size, spec.out_size),
        has_gamma=spec.has_gamma, has_color=spec.has_color, has_blur=spec.has_blur,
        has_solarize=spec.has_solarize, blur_radius=spec.blur_radius,
        solarize_threshold=spec.solarize_threshold, interpolation=spec.interpolation,
        norm_scale=scale, norm_bias=bias, channels_last=channels_last, blur_dtype=blur_dtype,
    )
    return view, tensors


class GpuAugment(nn.Module):
    """V views of a uint8 batch with per-sample random parameters (see the module docstring).

    compile: run each view (sampling + rendering) as one torch.compile'd graph (one graph per
    distinct view spec); compile_mode is passed to torch.compile. channels_last: output memory
    format (None: channels_last on CUDA only). `stage_hook(name)` (eager only) is called after
    each stage, for profiling. The module has no parameters and no persistent state.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        *,
        compile: bool = False,
        compile_mode: str | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        check_augment_config(cfg)
        self.cfg = cfg
        self.specs = [view_spec(cfg, i) for i in range(cfg.num_views + cfg.local_crops)]
        self.compile = compile
        self.compile_mode = compile_mode
        self.channels_last = channels_last
        self.stage_hook: StageHook = None
        self.last_params: list[ViewParams] = []
        self._graphs: dict[tuple, object] = {}
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("norm_scale", 1.0 / std, persistent=False)
        self.register_buffer("norm_bias", -mean / std, persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA, dtype=torch.float32), persistent=False)

    @property
    def num_views(self) -> int:
        """Global views plus local crops."""
        return len(self.specs)

    def view_size(self, view_index: int) -> int:
        return self.specs[view_index].out_size

    # ----------------------------------------------------------------- sampling and replay
    def sample_params(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator | None = None,
        view_index: int = 0,
    ) -> ViewParams:
        """Draw the parameters of view `view_index` for `batch_size` samples on `device`."""
        device = torch.device(device)
        spec = self.specs[view_index]
        u = _rand((batch_size, NUM_UNIFORMS), device, generator)
        return ViewParams.from_tensors(sample_view(u, spec, self._consts(device)[0]), spec)

    def apply(
        self, images: Tensor, params: ViewParams, out_size: int | tuple[int, int] | None = None
    ) -> Tensor:
        """Render one view of images (uint8 [B,3,S,S], or float in [0,1]) with given params.

        Returns float32 [B,3,R,R] normalised (channels_last on CUDA). Pure tensor maths with no
        data-dependent control flow: `torch.compile(aug.apply)` traces it as one graph.
        """
        self._check_images(images)
        return self._render(to_float01(images), params, out_size)

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """images uint8 [B,3,S,S] on any device -> list of num_views float32 [B,3,R,R] views."""
        self._check_images(images)
        device, batch = images.device, images.shape[0]
        luma, scale, bias = self._consts(device)
        hook = self.stage_hook
        views, params = [], []
        source = None if self.compile else to_float01(images)  # shared by the eager views
        if hook is not None and not self.compile:
            hook("to_float")
        for index, spec in enumerate(self.specs):
            u = _rand((batch, NUM_UNIFORMS), device, generator)
            if self.compile:
                view, tensors = self._graph(spec, device)(images, u, luma, scale, bias)
                p = ViewParams.from_tensors(tensors, spec)
            else:
                p = ViewParams.from_tensors(sample_view(u, spec, luma), spec)
                if hook is not None:
                    hook("sample")
                view = self._render(source, p, None)
            views.append(view)
            params.append(p)
        self.last_params = params
        return views

    def denormalize(self, view: Tensor) -> Tensor:
        """Normalised view [B,3,H,W] -> [0,1] (for image grids)."""
        mean, std = self.mean.to(view.device), self.std.to(view.device)
        return (view.float() * std + mean).clamp(0.0, 1.0)

    # ---------------------------------------------------------------------------- helpers
    def _consts(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if self.luma.device != device:
            self.to(device)  # buffers follow the images (they are a few floats)
        return self.luma, self.norm_scale, self.norm_bias

    def _layout(self, device: torch.device) -> tuple[bool, torch.dtype]:
        channels_last = device.type == "cuda" if self.channels_last is None else self.channels_last
        blur_dtype = torch.float16 if device.type == "cuda" else torch.float32
        return channels_last, blur_dtype

    def _render(
        self, source: Tensor, params: ViewParams, out_size: int | tuple[int, int] | None
    ) -> Tensor:
        _, scale, bias = self._consts(source.device)
        channels_last, blur_dtype = self._layout(source.device)
        return render(
            source, *params.tensors()[:6],
            out_hw=params.out_size if out_size is None else _hw(out_size),
            has_gamma=params.has_gamma, has_color=params.has_color, has_blur=params.has_blur,
            has_solarize=params.has_solarize, blur_radius=self.cfg.blur.kernel_size // 2,
            solarize_threshold=self.cfg.solarize.threshold,
            interpolation=self.cfg.interpolation,
            norm_scale=scale, norm_bias=bias, channels_last=channels_last,
            blur_dtype=blur_dtype, hook=self.stage_hook,
        )

    def _graph(self, spec: ViewSpec, device: torch.device):
        channels_last, blur_dtype = self._layout(device)
        key = (spec, channels_last, blur_dtype, device.type)
        if key not in self._graphs:
            fn = functools.partial(
                _view_graph, spec=spec, channels_last=channels_last, blur_dtype=blur_dtype
            )
            self._graphs[key] = torch.compile(fn, dynamic=False, mode=self.compile_mode)
        return self._graphs[key]

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DataError(f"augment: expected images [B,3,S,S], got {shape}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise DataError(
                f"augment: expected uint8 (or float in [0,1]) images, got {images.dtype}"
            )


def build_augment(aug_cfg: AugmentConfig, **kwargs) -> GpuAugment:
    """The augmentation module of a config (kwargs: compile, compile_mode, channels_last)."""
    return GpuAugment(aug_cfg, **kwargs)


# ------------------------------------------------------------------- invariance evaluation
def family_params(
    batch: int,
    family: str,
    strength: float,
    size: int | tuple[int, int],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    border: Literal["reflection", "crop"] = "reflection",
) -> ViewParams:
    """Parameters that change one invariance family by a fixed amount (see transform_family)."""
    if family not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise ConfigError(f"augment: unknown invariance family {family!r} (known: {known})")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"augment: family strength must be in [0, 1], got {strength}")
    device = torch.device(device)
    out_hw = _hw(size)
    signs = torch.where(_rand((batch, 8), device, generator) < 0.5, -1.0, 1.0)
    params = ViewParams.identity(batch, out_hw, device)
    s = float(strength)
    angle = torch.zeros(batch, device=device)
    extent = torch.ones(batch, device=device)
    if family in ("rotation", "combined"):
        angle = signs[:, 0] * FAMILY_MAX["degrees"] * s
    if family in ("scale", "zoom_in", "zoom_out", "combined"):
        direction = {"zoom_in": 1.0, "zoom_out": -1.0}.get(family)
        sign = signs[:, 1] if direction is None else torch.full_like(extent, direction)
        extent = FAMILY_MAX["zoom"] ** (-s * sign)  # > 0 zooms in (a central crop)
    theta = affine_theta(
        torch.zeros(batch, 2, device=device), torch.stack([extent, extent], dim=1),
        torch.deg2rad(angle), torch.zeros(batch, dtype=torch.bool, device=device),
        aspect=out_hw[1] / out_hw[0],
    )
    if border == "crop":
        theta = fit_inside(theta, keep=extent > 1.0)
    params.theta, params.angle = theta, angle
    params.area = footprint_area(theta)
    if family in ("lighting", "combined"):
        luma = torch.tensor(LUMA, device=device)

        def fac(name: str, col: int) -> Tensor:
            return FAMILY_MAX[name] ** (s * signs[:, col])

        params.gamma = fac("gamma", 2)
        params.color, params.offset = color_transform(
            fac("brightness", 3), fac("contrast", 4), fac("saturation", 5),
            signs[:, 6] * FAMILY_MAX["hue"] * s, signs[:, 7] * FAMILY_MAX["temperature"] * s,
            torch.zeros(batch, device=device), luma,
        )
    params.has_blur = params.has_solarize = False
    return params


def transform_family(
    images: Tensor,
    family: Family,
    strength: float,
    generator: torch.Generator | None = None,
    border: Literal["reflection", "crop"] = "reflection",
) -> Tensor:
    """Change one invariance family of float images [B,3,H,W] in [0,1] by a fixed amount.

    strength in [0, 1] (0 = unchanged; 1 = the FAMILY_MAX amounts); directions (the sign of the
    angle, zoom in or out, each lighting factor up or down) are drawn per sample from
    `generator`, so a fixed generator seed gives the same transform every time.
    - 'rotation': turn by +-180*s degrees about the centre; corners read mirrored content
      ('reflection') or the image is enlarged until no corner leaves it ('crop').
    - 'scale': zoom in (central crop, side / 3**s) or out (image at side / 3**s of the view,
      reflection around it), each with probability 1/2; 'zoom_in' / 'zoom_out' pick one.
    - 'lighting': gamma, brightness, contrast and saturation factors 1.5**(+-s), hue +-0.1*s
      turn, white balance +-0.3*s (the chain of GpuAugment's lighting, without grayscale).
    - 'combined': rotation, scale and lighting at once.
    Returns float32 [B,3,H,W] in [0,1] (not normalised), the same size as the input.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(f"augment: expected images [B,3,H,W], got {tuple(images.shape)}")
    x = to_float01(images)
    size = (x.shape[2], x.shape[3])
    p = family_params(x.shape[0], family, strength, size, x.device, generator, border)
    return render(
        x, *p.tensors()[:6], out_hw=p.out_size, has_gamma=p.has_gamma, has_color=p.has_color,
        has_blur=False, has_solarize=False,
    )
