"""Batched GPU augmentation: V random views of a uint8 batch, parameters sampled per sample.

    aug = build_augment(cfg.augment)            # lsdr_repr.builders; no learnable state
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
  offset, the rest of the view filled by the view's border fill (below);
- rotation: uniform in [-degrees, degrees] with probability p. Border 'fill' shows the border
  fill where rotated corners leave the image; border 'crop' shrinks the view (about its centre,
  then re-centres it) until its rotated footprint lies inside the image, so no view pixel comes
  from outside (zoomed-out views keep their size and their fill);
- border fill (`fill`, a list drawn from uniformly per sample): 'zeros', 'reflection' (mirrored
  content), 'replicate' (alias 'border': the edge pixels), 'random' (a random colour per
  sample) or a gray level in [0, 1]. A mixture keeps the embedding from tying its invariance to
  one kind of border (real rotations, letterboxing and padding produce all kinds);
- horizontal flip;
- lighting with probability p: gamma (log-uniform in [1/(1+g), 1+g]), white balance (red/blue
  gains e^{+-t}, t uniform in [-temperature, temperature]), brightness, contrast, saturation
  (torchvision's ranges: uniform in [max(0, 1-s), 1+s]), hue (uniform in [-h, h] turns);
- grayscale; gaussian blur (sigma uniform in `blur.sigma` pixels of the view, truncated at
  `kernel_size // 2` pixels, reflect borders); solarize (values >= threshold inverted);
- then any `kornia.augmentation` modules listed in `augment.kornia` (all views, or `views:`);
- normalisation with mean/std; on CUDA the views are channels_last.

What runs where. Kornia's functionals with our per-sample parameters: gamma
(`kornia.enhance.adjust_gamma`), the lighting chain (`adjust_brightness_accumulative`,
`adjust_contrast_with_mean_subtraction`, `adjust_saturation_with_gray_subtraction`,
`adjust_hue`, `kornia.color.rgb_to_grayscale`), solarize (`kornia.enhance.solarize`), and any
`kornia.augmentation` module the config lists. Kornia's versions of the blur
(`kornia.filters.gaussian_blur2d`) and the warp (`kornia.geometry.transform.warp_affine`, one
call per fill kind) are here too, selected per stage by `build_augment(impl=...)` and checked
against the fused ones in the tests, but by default those two stay custom
(`augment_ops.DEFAULT_IMPL`), because the same-run benchmark (`benchmarks/augment_bench.py`,
benchmarks/RESULTS.md) measured them 3.95 ms (blur) and 3.76 ms (warp with a fill mixture) slower
per ResNet-50 step than the fused ones (kornia's colour chain: +0.44 ms, so it runs): crop, zoom,
rotation and flip are one `affine_grid + grid_sample` per view for any fill mixture; the blur is
two batched matmuls by dense reflect-Gaussian matrices. White balance has no Kornia functional
(three channel gains before the chain). Parameters come from one `torch.rand(B, NUM_UNIFORMS)`
per view followed by pure tensor maths (`sample_view`), so with `compile=True` each view
(sampling + rendering) is one `torch.compile`d graph. The `augment.kornia` modules run eagerly
after it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsdr_repr.augment_ops import (
    DEFAULT_IMPL,
    FILL_COLOR,
    FILL_REFLECTION,
    FILL_REPLICATE,
    LUMA,
    RenderSpec,
    StageHook,
    affine_theta,
    fit_inside,
    footprint_area,
    render,
    to_float01,
)

log = logging.getLogger(__name__)

# Columns of the per-view uniform draw U [B, NUM_UNIFORMS]: one `torch.rand` call per view.
CROP_TRIES = 10
_AREA = slice(0, CROP_TRIES)
_RATIO = slice(CROP_TRIES, 2 * CROP_TRIES)
(
    _CX, _CY, _SCALE, _ZOOM, _ZOOM_F, _ZCX, _ZCY, _ROT, _ANGLE, _FLIP, _LIGHT,
    _BRI, _CON, _SAT, _HUE, _GAM, _TEMP, _GRAY, _BLUR, _SIGMA, _SOLAR, _FILL,
) = range(2 * CROP_TRIES, 2 * CROP_TRIES + 22)
_FILL_RGB = slice(2 * CROP_TRIES + 22, 2 * CROP_TRIES + 25)
NUM_UNIFORMS = 2 * CROP_TRIES + 25

# Names of `augment.fill` entries (besides a gray level in [0, 1]).
FILL_NAMES = ("zeros", "reflection", "replicate", "border", "random")


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
    fill: tuple[str | float, ...]
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
    impl: tuple[tuple[str, str], ...] = tuple(sorted(DEFAULT_IMPL.items()))

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

    def render_spec(self, out_hw: tuple[int, int] | None = None) -> RenderSpec:
        return RenderSpec(
            out_hw=out_hw or (self.out_size, self.out_size), has_gamma=self.has_gamma,
            has_color=self.has_color, has_blur=self.has_blur, has_solarize=self.has_solarize,
            blur_radius=self.blur_radius, solarize_threshold=self.solarize_threshold,
            interpolation=self.interpolation,
            fill_kinds=tuple(sorted({fill_entry(f)[0] for f in self.fill})), impl=self.impl,
        )


def fill_entry(entry: str | float) -> tuple[int, float | None]:
    """One `augment.fill` entry -> (FILL_* kind, gray level; None = a random colour per sample)."""
    if isinstance(entry, (int, float)):
        return FILL_COLOR, float(entry)
    return {"zeros": (FILL_COLOR, 0.0), "reflection": (FILL_REFLECTION, 0.0),
            "replicate": (FILL_REPLICATE, 0.0), "border": (FILL_REPLICATE, 0.0),
            "random": (FILL_COLOR, None)}[entry]


@dataclass
class ViewParams:
    """The sampled parameters of one view; `GpuAugment.apply(images, params)` replays it.

    Tensors have the batch first: theta [B,2,3] (view -> source, normalised coordinates),
    gamma [B], lighting [B,6] (brightness, contrast, saturation, hue in turns, white-balance
    temperature, grayscale 0/1), blur_sigma [B] (pixels of the view, 0 = no blur), solarize [B]
    (1.0 = solarized), fill_kind [B] (augment_ops.FILL_*) and fill_color [B,3] (the border fill).
    angle [B] (degrees), flip [B] (bool) and area [B] (view footprint / image area; > 1 when
    zoomed out) describe the sample for logging. `spec` is the view's static description and
    `kornia_params` the parameters the `augment.kornia` modules drew (replayed by `apply`).
    """

    theta: Tensor
    gamma: Tensor
    lighting: Tensor
    blur_sigma: Tensor
    solarize: Tensor
    fill_kind: Tensor
    fill_color: Tensor
    angle: Tensor
    flip: Tensor
    area: Tensor
    spec: ViewSpec
    kornia_params: list[dict[str, Any] | None] = dataclasses.field(default_factory=list)

    TENSORS = (
        "theta", "gamma", "lighting", "blur_sigma", "solarize", "fill_kind", "fill_color",
        "angle", "flip", "area",
    )
    RENDERED = 7  # the first seven tensors are what `render` reads

    @property
    def grayscale(self) -> Tensor:
        """[B] bool: samples turned gray."""
        return self.lighting[:, 5] > 0.5

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self.TENSORS)

    def to(self, device: torch.device | str) -> ViewParams:
        moved = {name: getattr(self, name).to(device) for name in self.TENSORS}
        return dataclasses.replace(self, **moved)

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], spec: ViewSpec) -> ViewParams:
        return cls(*tensors, spec=spec)

    @classmethod
    def identity(
        cls, batch: int, out_size: int, device: torch.device | str = "cpu",
        fill: tuple[str | float, ...] = ("reflection",),
    ) -> ViewParams:
        """Parameters that show the whole image unchanged: a base to edit for hand-made views."""
        zeros = torch.zeros(batch, device=device)
        neutral = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], device=device)
        spec = ViewSpec(
            out_size=out_size, scale_p=0.0, area=(1.0, 1.0), aspect=(1.0, 1.0), zoom_out_p=0.0,
            zoom_out=(1.0, 1.0), rotation_p=0.0, degrees=0.0, border="fill", fill=fill,
            flip_p=0.0, lighting_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
            gamma=0.0, temperature=0.0, grayscale_p=0.0, blur_p=0.0, blur_sigma=(0.1, 0.1),
            blur_radius=0, solarize_p=0.0, solarize_threshold=0.5, interpolation="bilinear",
        )
        kind, color = sample_fill(zeros, torch.zeros(batch, 3, device=device), fill)
        return cls(
            theta=torch.eye(2, 3, device=device).expand(batch, 2, 3).clone(), gamma=zeros + 1.0,
            lighting=neutral.repeat(batch, 1), blur_sigma=zeros.clone(), solarize=zeros.clone(),
            fill_kind=kind, fill_color=color, angle=zeros.clone(), flip=zeros.bool(),
            area=zeros + 1.0, spec=spec,
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


def sample_fill(u: Tensor, rgb: Tensor, fill: Sequence[str | float]) -> tuple[Tensor, Tensor]:
    """u [B] and rgb [B,3] uniforms -> fill_kind [B] (int64) and fill_color [B,3].

    Entry i of `fill` is drawn with probability 1/len(fill); a 'random' entry takes rgb as its
    colour. Static loop over the (few) entries: no data-dependent control flow.
    """
    pick = (u * len(fill)).long().clamp(max=len(fill) - 1)
    kind = torch.zeros_like(pick)
    color = torch.zeros_like(rgb)
    for i, entry in enumerate(fill):
        k, gray = fill_entry(entry)
        chosen = pick == i
        kind = torch.where(chosen, k, kind)
        value = rgb if gray is None else torch.full_like(rgb, gray)
        color = torch.where(chosen[:, None], value, color)
    return kind, color


def sample_view(u: Tensor, spec: ViewSpec) -> tuple[Tensor, ...]:
    """Turn uniforms u [B, NUM_UNIFORMS] into the ViewParams tensors of one view (pure maths).

    Returns the tensors in ViewParams.TENSORS order. No data-dependent control flow: compiles
    to one fused graph.
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

    hue = torch.where(lit, (2.0 * u[:, _HUE] - 1.0) * spec.hue, 0.0)
    gamma = torch.where(lit, torch.exp((2.0 * u[:, _GAM] - 1.0) * math.log1p(spec.gamma)), 1.0)
    temp = torch.where(lit, (2.0 * u[:, _TEMP] - 1.0) * spec.temperature, 0.0)
    gray = (u[:, _GRAY] < spec.grayscale_p).to(u.dtype)
    lighting = torch.stack([factor(_BRI, spec.brightness), factor(_CON, spec.contrast),
                            factor(_SAT, spec.saturation), hue, temp, gray], dim=1)

    blurred = u[:, _BLUR] < spec.blur_p
    sigma = torch.where(blurred, _uniform(u[:, _SIGMA], *spec.blur_sigma), 0.0)
    solar = (u[:, _SOLAR] < spec.solarize_p).to(u.dtype)
    fill_kind, fill_color = sample_fill(u[:, _FILL], u[:, _FILL_RGB], spec.fill)
    return theta, gamma, lighting, sigma, solar, fill_kind, fill_color, angle, flip, footprint


def _rand(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Uniforms on `device`, drawn from `generator` on its own device when that differs."""
    if generator is None or torch.device(generator.device).type == device.type:
        return torch.rand(shape, device=device, generator=generator)
    return torch.rand(shape, device=generator.device, generator=generator).to(device)


# ---------------------------------------------------------------------------------- module
def _view_graph(
    images: Tensor, u: Tensor, luma: Tensor, scale: Tensor | None, bias: Tensor | None, *,
    spec: ViewSpec, channels_last: bool, blur_dtype: torch.dtype, render_dtype: torch.dtype,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Sampling + rendering of one view as one function: what `compile=True` compiles."""
    tensors = sample_view(u, spec)
    view = render(
        to_float01(images, render_dtype), *tensors[:ViewParams.RENDERED],
        spec=spec.render_spec(), luma=luma, norm_scale=scale, norm_bias=bias,
        channels_last=channels_last, blur_dtype=blur_dtype,
    )
    return view, tensors


class GpuAugment(nn.Module):
    """V views of a uint8 batch with per-sample random parameters (see the module docstring).

    specs: one `ViewSpec` per view (globals, then local crops; each names its kornia-or-fused
    implementation per stage); mean/std: the normalisation; kornia: (module, view indices)
    pairs applied after the built-in ops (`lsdr_repr.builders.augment.build_augment` makes these
    from `cfg.augment`). compile: run each view (sampling + rendering) as one torch.compile'd
    graph (one graph per distinct view spec); compile_mode is passed to torch.compile.
    channels_last: output memory format (None: channels_last on CUDA only). render_dtype: the
    dtype the views are rendered in before normalisation (`augment.precision`; the output is
    float32 either way). `stage_hook(name)` (eager only) is called after each stage, for
    profiling. The module has no parameters and no persistent state.
    """

    def __init__(
        self,
        specs: Sequence[ViewSpec],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        kornia: Sequence[tuple[nn.Module, Sequence[int]]] = (),
        compile: bool = False,
        compile_mode: str | None = None,
        channels_last: bool | None = None,
        render_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.specs = list(specs)
        # (module, views) pairs: the augment.kornia list, applied after the built-in ops
        self.kornia_ops = nn.ModuleList([module for module, _ in kornia])
        self.kornia_views = [list(views) for _, views in kornia]
        self.compile = compile
        self.compile_mode = compile_mode
        self.channels_last = channels_last
        self.render_dtype = render_dtype
        self.stage_hook: StageHook = None
        self.last_params: list[ViewParams] = []
        self._graphs: dict[tuple, object] = {}
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.register_buffer("norm_scale", 1.0 / std_t, persistent=False)
        self.register_buffer("norm_bias", -mean_t / std_t, persistent=False)
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
        """Draw the built-in parameters of view `view_index` for `batch_size` samples."""
        device = torch.device(device)
        spec = self.specs[view_index]
        u = _rand((batch_size, NUM_UNIFORMS), device, generator)
        return ViewParams.from_tensors(sample_view(u, spec), spec)

    def apply(
        self, images: Tensor, params: ViewParams, out_size: int | tuple[int, int] | None = None
    ) -> Tensor:
        """Render one view of images (uint8 [B,3,S,S], or float in [0,1]) with given params.

        Returns float32 [B,3,R,R] normalised (channels_last on CUDA); the `augment.kornia`
        modules replay `params.kornia_params` when they are set. The built-in part is pure
        tensor maths with no data-dependent control flow (`torch.compile` traces it).
        """
        self._check_images(images)
        hw = None if out_size is None else _hw(out_size)
        if not params.kornia_params:
            return self._render(to_float01(images, self.render_dtype), params, hw, normalize=True)
        view = self._render(to_float01(images, self.render_dtype), params, hw, normalize=False)
        return self._normalize(self._kornia(view, params, replay=True))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """images uint8 [B,3,S,S] on any device -> list of num_views float32 [B,3,R,R] views."""
        self._check_images(images)
        device, batch = images.device, images.shape[0]
        luma, scale, bias = self._consts(device)
        hook = self.stage_hook
        views, params = [], []
        # shared by the eager views
        source = None if self.compile else to_float01(images, self.render_dtype)
        if hook is not None and not self.compile:
            hook("to_float")
        for index, spec in enumerate(self.specs):
            u = _rand((batch, NUM_UNIFORMS), device, generator)
            extra = any(index in v for v in self.kornia_views)
            if self.compile:
                norm = (None, None) if extra else (scale, bias)
                view, tensors = self._graph(spec, device, extra)(images, u, luma, *norm)
                p = ViewParams.from_tensors(tensors, spec)
            else:
                p = ViewParams.from_tensors(sample_view(u, spec), spec)
                if hook is not None:
                    hook("sample")
                view = self._render(source, p, None, normalize=not extra)
            if extra:
                p.kornia_params = [None] * len(self.kornia_ops)
                view = self._normalize(self._kornia(view, p, index=index))
            views.append(view)
            params.append(p)
        self.last_params = params
        return views

    def denormalize(self, view: Tensor) -> Tensor:
        """Normalised view [B,3,H,W] -> [0,1] (for image grids)."""
        mean, std = self.mean.to(view.device), self.std.to(view.device)
        return (view.float() * std + mean).clamp(0.0, 1.0)

    # ---------------------------------------------------------------------------- helpers
    def _kornia(self, view01: Tensor, params: ViewParams, index: int | None = None,
                replay: bool = False) -> Tensor:
        """The augment.kornia modules on a [0,1] view, recording (or replaying) their params."""
        for i, (module, views) in enumerate(zip(self.kornia_ops, self.kornia_views)):
            if replay:
                saved = params.kornia_params[i]
                if saved is not None:
                    view01 = module(view01, params=saved)
            elif index in views:
                view01 = module(view01)
                params.kornia_params[i] = module._params
        if self.stage_hook is not None:
            self.stage_hook("kornia")
        return view01

    def _normalize(self, view01: Tensor) -> Tensor:
        _, scale, bias = self._consts(view01.device)
        channels_last, _ = self._layout(view01.device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.addcmul(bias, view01.float(), scale).contiguous(memory_format=fmt)

    def _consts(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if self.luma.device != device:
            self.to(device)  # buffers follow the images (they are a few floats)
        return self.luma, self.norm_scale, self.norm_bias

    def _layout(self, device: torch.device) -> tuple[bool, torch.dtype]:
        channels_last = device.type == "cuda" if self.channels_last is None else self.channels_last
        blur_dtype = torch.float16 if device.type == "cuda" else torch.float32
        return channels_last, blur_dtype

    def _render(
        self, source: Tensor, params: ViewParams, out_hw: tuple[int, int] | None,
        normalize: bool,
    ) -> Tensor:
        luma, scale, bias = self._consts(source.device)
        channels_last, blur_dtype = self._layout(source.device)
        return render(
            source, *params.tensors()[:ViewParams.RENDERED],
            spec=params.spec.render_spec(out_hw), luma=luma,
            norm_scale=scale if normalize else None, norm_bias=bias if normalize else None,
            channels_last=channels_last, blur_dtype=blur_dtype, hook=self.stage_hook,
        )

    def _graph(self, spec: ViewSpec, device: torch.device, extra: bool):
        channels_last, blur_dtype = self._layout(device)
        key = (spec, channels_last, blur_dtype, self.render_dtype, device.type, extra)
        if key not in self._graphs:
            # Every view spec is a recompile of the one `_view_graph` code object; dynamo's
            # default limit (8) is reached by a few augmenters in one process (a benchmark, a
            # trainer and its evaluation) and then silently falls back to eager.
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, 8 * (len(self._graphs) + 1))
            fn = functools.partial(
                _view_graph, spec=spec, channels_last=channels_last, blur_dtype=blur_dtype,
                render_dtype=self.render_dtype,
            )
            self._graphs[key] = torch.compile(fn, dynamic=False, mode=self.compile_mode)
        return self._graphs[key]

    @staticmethod
    def _check_images(images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"augment: expected images [B,3,S,S], got {shape}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(
                f"augment: expected uint8 (or float in [0,1]) images, got {images.dtype}"
            )
