"""Batched tensor maths behind `lsdr_repr.augment`: pure functions, per-sample parameters.

Every function takes and returns tensors with the batch first and contains no Python branch on
tensor values, so the whole chain traces under `torch.compile(fullgraph=True)` and CUDA graphs.

Coordinates follow `torch.nn.functional.affine_grid` with `align_corners=False`: a view pixel at
normalised position u in [-1, 1]^2 (x right, y down) reads the source at `theta @ [u, 1]`, also
normalised to [-1, 1]^2 over the whole source image.

Colour maths (a fixed order, unlike torchvision's ColorJitter, which shuffles its four steps):

    x -> x ** gamma -> D (white balance) -> brightness b -> contrast c -> saturation S -> hue H
      -> grayscale G -> clamp to [0, 1]

Every step after gamma is linear in x apart from contrast's pull toward the image's mean gray,
and S, H and G all map gray to itself, so the chain is `y = M x + o` per sample with
`M = c b G H S D` and `o = (1 - c) b (w . D x_mean)` (w: luma weights, x_mean: mean colour of
the view after gamma). Intermediate clamps of torchvision's step-by-step version are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import kornia
import torch
import torch.nn.functional as F
from kornia.geometry.conversions import convert_affinematrix_to_homography, denormalize_homography
from kornia.geometry.transform import invert_affine_transform, warp_affine
from torch import Tensor

# ITU-R BT.601 luma, the weights of kornia.color.rgb_to_grayscale (torchvision: 0.2989).
LUMA = (0.299, 0.587, 0.114)

StageHook = Callable[[str], None] | None


def to_float01(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [B,3,H,W] in 0..255 -> `dtype` [B,3,H,W] in [0,1]; float input is cast to it."""
    if images.dtype == torch.uint8:
        if dtype == torch.float32:
            return images * (1.0 / 255.0)  # one kernel: uint8 * python float promotes to float32
        return images.to(dtype) * (1.0 / 255.0)
    return images.to(dtype)


# ------------------------------------------------------------------------------ geometry
def affine_theta(
    center: Tensor, extent: Tensor, angle: Tensor, flip: Tensor, aspect: float = 1.0
) -> Tensor:
    """Per-sample 2x3 matrices mapping view coordinates to source coordinates (both normalised).

    center [B,2]: view centre in the source; extent [B,2]: half width/height of the unrotated view
    as a fraction of the source side (1 = whole image, >1 = zoomed out); angle [B] radians,
    positive = content turned counter-clockwise on screen (torchvision's convention; 90 degrees
    is `torch.rot90(x, 1, dims=(2, 3))`); flip [B] bool, horizontal mirror of the view; aspect =
    view width / height in pixels, so the rotation is a rotation in pixels. Returns [B,2,3]:
    A = diag(extent) . diag(1/aspect, 1) R diag(aspect, 1) . diag(flip, 1), theta = [A | center].
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    f = 1.0 - 2.0 * flip.to(cos.dtype)
    ex, ey = extent[:, 0], extent[:, 1]
    row0 = torch.stack([ex * cos * f, -ex * sin / aspect, center[:, 0]], dim=1)
    row1 = torch.stack([ey * sin * aspect * f, ey * cos, center[:, 1]], dim=1)
    return torch.stack([row0, row1], dim=1)


def fit_inside(theta: Tensor, keep: Tensor) -> Tensor:
    """Shrink each view (about its centre) until its footprint lies inside the source.

    theta [B,2,3]; keep [B] bool: samples left unchanged (zoomed-out views, which cannot fit).
    The footprint of the view square under A spans |A_r0| + |A_r1| around the centre along source
    axis r; A is scaled by k = min(1, 1 / max_r span_r) and the centre then clamped so the
    footprint stays inside [-1, 1]. A view that already fits is unchanged. Returns [B,2,3].
    """
    lin, center = theta[:, :, :2], theta[:, :, 2]
    span = lin.abs().sum(dim=2)  # [B,2]
    k = torch.clamp(1.0 / span.amax(dim=1), max=1.0)
    k = torch.where(keep, torch.ones_like(k), k)
    lin = lin * k[:, None, None]
    room = (1.0 - span * k[:, None]).clamp(min=0.0)
    fitted = torch.maximum(torch.minimum(center, room), -room)
    center = torch.where(keep[:, None], center, fitted)
    return torch.cat([lin, center[:, :, None]], dim=2)


# Border fills: what a view shows where it reads outside the source (rotated corners, zoom-out).
# A fill entry is a kind and a colour; `fill_kind` [B] holds the kind per sample.
FILL_COLOR, FILL_REFLECTION, FILL_REPLICATE = 0, 1, 2


def fold_grid(grid: Tensor, kind: Tensor, in_hw: tuple[int, int]) -> Tensor:
    """Per-sample border handling of a sampling grid, as grid_sample's padding modes do it.

    grid [B,h,w,2] in normalised coordinates (align_corners=False, x then y); kind [B] (FILL_*).
    Reflection folds each coordinate about the image edges (-1, 1), replicate clamps it; both are
    then clamped to the outermost pixel centres, which is exactly `grid_sample`'s 'reflection' and
    'border' modes. Constant-colour samples keep their grid (read as zeros outside, then filled).
    """
    h, w = in_hw
    inner = grid.new_tensor([1.0 - 1.0 / w, 1.0 - 1.0 / h])  # outermost pixel centres
    t = torch.remainder(grid + 1.0, 4.0)
    reflected = torch.where(t <= 2.0, t, 4.0 - t) - 1.0
    k = kind[:, None, None, None]
    folded = torch.where(k == FILL_REFLECTION, reflected, grid)
    clamped = torch.maximum(torch.minimum(folded, inner), -inner)
    return torch.where(k == FILL_COLOR, grid, clamped)


def grid_coverage(grid: Tensor, in_hw: tuple[int, int]) -> Tensor:
    """[B,h,w,2] grid -> [B,1,h,w]: the weight bilinear sampling gives to pixels inside the image.

    1 inside, falling linearly to 0 over the one pixel beyond the outermost pixel centres (what
    grid_sample with zeros padding gives an all-ones image), so `y + (1 - coverage) * colour`
    equals kornia's 'fill' padding without a second grid_sample.
    """
    h, w = in_hw
    size = grid.new_tensor([w, h])
    pixel = ((grid + 1.0) * size - 1.0) / 2.0  # pixel coordinates, centres at 0 .. size-1
    outside = torch.maximum(-pixel, pixel - (size - 1.0)).clamp(min=0.0)
    cover = (1.0 - outside).clamp(min=0.0)
    return (cover[..., 0] * cover[..., 1])[:, None]


def warp(
    x: Tensor,
    theta: Tensor,
    out_hw: tuple[int, int],
    fill_kind: Tensor,
    fill_color: Tensor,
    mode: str = "bilinear",
) -> Tensor:
    """Resample float [B,C,H,W] through theta [B,2,3] into [B,C,out_h,out_w], per-sample fill.

    One affine_grid + grid_sample per view carries crop, resize, zoom-out, rotation and flip.
    fill_kind [B] (FILL_*) and fill_color [B,C] say what each sample shows outside the source:
    its mirror image, its edge pixels, or a constant colour. One grid_sample for any mixture of
    fills (kornia's `warp_affine` takes one padding mode per call; `warp_kornia` is that path).
    """
    in_hw = (x.shape[2], x.shape[3])
    # folding and coverage in float32 whatever x is; grid_sample then reads x's dtype (float16
    # coordinates are 1/16 pixel apart at 256 px, fine for a random crop)
    grid = F.affine_grid(
        theta.float(), [x.shape[0], x.shape[1], out_hw[0], out_hw[1]], align_corners=False
    )
    grid = fold_grid(grid, fill_kind, in_hw)
    y = F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)
    missing = (1.0 - grid_coverage(grid, in_hw)).to(y.dtype)  # 0 where folding kept it inside
    return y + missing * fill_color.to(y.dtype)[:, :, None, None]


def kornia_matrix(theta: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """Our theta (view -> source, normalised) as kornia's source -> view pixel matrix [B,2,3]."""
    dst_from_src = convert_affinematrix_to_homography(invert_affine_transform(theta))
    pixel = denormalize_homography(dst_from_src, in_hw, out_hw, align_corners=False)
    return pixel[:, :2]


def warp_kornia(
    x: Tensor,
    theta: Tensor,
    out_hw: tuple[int, int],
    fill_kind: Tensor,
    fill_color: Tensor,
    kinds: tuple[int, ...] = (FILL_REFLECTION,),
    mode: str = "bilinear",
) -> Tensor:
    """`warp` through `kornia.geometry.transform.warp_affine`: one call per fill kind in `kinds`
    (static: the kinds a view's fill list can draw), merged per sample by `fill_kind`."""
    m = kornia_matrix(theta.to(x.dtype), (x.shape[2], x.shape[3]), out_hw)
    out = None
    for kind in sorted(set(kinds)):
        if kind == FILL_COLOR:
            y = warp_affine(x, m, out_hw, mode=mode, padding_mode="fill", align_corners=False,
                            fill_value=fill_color.to(x.dtype)[:, :, None, None])
        else:
            padding = "reflection" if kind == FILL_REFLECTION else "border"
            y = warp_affine(x, m, out_hw, mode=mode, padding_mode=padding, align_corners=False)
        out = y if out is None else torch.where((fill_kind == kind)[:, None, None, None], y, out)
    return out

# ------------------------------------------------------------------------------- colour
def _eye(batch: int, like: Tensor) -> Tensor:
    return torch.eye(3, dtype=like.dtype, device=like.device).expand(batch, 3, 3)


def saturation_matrix(factor: Tensor, luma: Tensor) -> Tensor:
    """Blend with the grayscale image, torchvision/kornia `adjust_saturation_with_gray_subtraction`.

    factor [B] (0 = gray, 1 = unchanged), luma [3] -> [B,3,3]: s I + (1 - s) 1 w^T.
    """
    gray = luma.expand(3, 3)  # every output channel reads w . rgb
    s = factor[:, None, None]
    return s * _eye(factor.shape[0], factor) + (1.0 - s) * gray


def grayscale_matrix(mask: Tensor, luma: Tensor) -> Tensor:
    """mask [B] in {0,1} (or a blend weight) -> [B,3,3]: I where 0, 1 w^T (gray) where 1."""
    return saturation_matrix(1.0 - mask, luma)


def hue_matrix(turns: Tensor) -> Tensor:
    """Rotate colours about the gray axis (1,1,1)/sqrt(3) by `turns` full turns: [B] -> [B,3,3].

    Gray stays gray. A third of a turn is the cyclic channel shift R<-B, G<-R, B<-G, which is
    exactly HSV's hue shift by 120 degrees (kornia `adjust_hue(x, 2*pi/3)`); in between it follows
    a circle where HSV follows a hexagon, so small shifts match HSV only approximately.
    """
    a = 2.0 * math.pi * turns
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    # cross-product matrix of the unit gray axis, P - P^T with P the cyclic shift; built on the
    # device (no host-to-device copy, so the function can be captured in a CUDA graph)
    shift = torch.eye(3, dtype=turns.dtype, device=turns.device).roll(1, dims=0)
    k = (shift - shift.T) / math.sqrt(3.0)
    uu = turns.new_full((3, 3), 1.0 / 3.0)
    return cos * _eye(turns.shape[0], turns) + sin * k + (1.0 - cos) * uu


def white_balance_gains(temperature: Tensor, luma: Tensor) -> Tensor:
    """temperature [B] (>0 warmer: red up, blue down) -> per-channel gains [B,3].

    Gains (e^t, 1, e^-t), divided by their luma so a gray surface keeps its brightness.
    """
    t = temperature
    gains = torch.stack([torch.exp(t), torch.ones_like(t), torch.exp(-t)], dim=1)
    return gains / (gains * luma).sum(dim=1, keepdim=True)


def color_transform(
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    temperature: Tensor,
    grayscale: Tensor,
    luma: Tensor,
) -> tuple[Tensor, Tensor]:
    """Compose the linear colour chain into `y = M x + (offset . x_mean)` (see module doc).

    All inputs [B] (hue in turns, grayscale a 0/1 mask), luma [3]. Returns M [B,3,3] and
    offset [B,3]: the contrast pull toward the mean gray is `offset . mean_rgb(x)` and is added
    equally to the three channels. Neutral values (1, 1, 1, 0, 0, 0) give M = I, offset = 0.
    """
    gains = white_balance_gains(temperature, luma)  # [B,3]
    m = hue_matrix(hue) @ saturation_matrix(saturation, luma)
    m = grayscale_matrix(grayscale, luma) @ m
    cb = (contrast * brightness)[:, None, None]
    m = cb * m * gains[:, None, :]  # right-multiplying by diag(gains) scales the columns
    offset = ((1.0 - contrast) * brightness)[:, None] * (luma * gains)
    return m, offset


def apply_color(x: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """x [B,3,H,W] float -> M x + (offset . mean_rgb(x)) per sample, [B,3,H,W] (not clamped)."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    shift = (offset * flat.mean(dim=2)).sum(dim=1)  # [B]
    bias = shift.to(x.dtype)[:, None, None].expand(b, c, 1)
    return torch.baddbmm(bias, matrix.to(x.dtype), flat).view(b, c, h, w)


# --------------------------------------------------------------------------------- blur
def gaussian_blur_matrix(
    sigma: Tensor, n: int, radius: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dense [B,n,n] matrices T with (T v)_i = sum_k g(k) v[reflect(i + k)], |k| <= radius.

    sigma [B] in pixels; g is the Gaussian truncated at `radius` and normalised over its taps
    (kornia's `gaussian_blur2d` kernel of size 2*radius+1 with 'reflect' borders); sigma <= 1e-3
    gives the identity exactly. Reflection at the borders is folded into the matrix, so one
    batched matmul per axis blurs with a different sigma per sample at any kernel size.
    Built as one small GEMM: taps [B,K] @ reflect-shift one-hots [K,n*n] (K = 2*radius+1).
    """
    radius = max(0, min(int(radius), n - 1))  # one reflection is then always enough
    offsets = torch.arange(-radius, radius + 1, device=sigma.device)
    k = offsets.float()
    s = sigma.float().clamp(min=1e-3)[:, None]
    taps = torch.exp(-(k * k) / (2.0 * s * s))
    taps = taps / taps.sum(dim=1, keepdim=True)  # [B,K]
    src = torch.arange(n, device=sigma.device)[None, :] + offsets[:, None]  # [K,n]: i + k
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    onehot = (src[:, :, None] == torch.arange(n, device=sigma.device)).to(dtype)  # [K,n,n]
    return (taps.to(dtype) @ onehot.view(-1, n * n)).view(-1, n, n)


def blur_to_channels_last(x: Tensor, matrix: Tensor) -> Tensor:
    """Separable blur of square x [B,C,n,n] by T [B,n,n] along both axes: T X T^T per channel.

    The horizontal pass reads NCHW as it is; the vertical pass runs on NHWC, so the result comes
    out [B,C,n,n] with channels_last memory and no further copy. Dtype follows x.
    """
    b, c, h, w = x.shape
    t = matrix.to(x.dtype)
    across = torch.matmul(x.reshape(b, c * h, w), t.transpose(1, 2))  # [B, C*H, W]
    nhwc = across.view(b, c, h, w).permute(0, 2, 3, 1).reshape(b, h, w * c)
    down = torch.bmm(t, nhwc)  # [B, H, W*C]
    return down.view(b, h, w, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- pipeline
# Which implementation runs each stage: "kornia" (its functionals) or "fused" (this module's
# batched maths: one grid_sample for any fill mixture, the colour chain as one 3x3 matrix, the blur
# as two matmuls). Gamma and solarize run through kornia in both. The default is what the
# same-run benchmark chose (benchmarks/RESULTS.md, "Kornia functionals against the fused ops":
# ResNet-50 views, B=256, two views, compiled, one H200, one stage through kornia at a time):
# every stage fused 3.78 ms; the colour chain through kornia +0.44 ms (under the 1 ms a custom op
# may save, so kornia runs it); kornia's blur +3.95 ms and its per-fill warps +3.76 ms (above it,
# so those two stay fused).
STAGES = ("warp", "color", "blur")
Impl = dict[str, str]
DEFAULT_IMPL: Impl = {"warp": "fused", "color": "kornia", "blur": "fused"}


@dataclass(frozen=True)
class RenderSpec:
    """The static part of rendering one view (hashable: compiled graphs are keyed by it)."""

    out_hw: tuple[int, int]
    has_gamma: bool = True
    has_color: bool = True
    has_blur: bool = True
    has_solarize: bool = True
    blur_radius: int = 11
    solarize_threshold: float = 0.5
    interpolation: str = "bilinear"
    fill_kinds: tuple[int, ...] = (FILL_REFLECTION,)
    impl: tuple[tuple[str, str], ...] = tuple(sorted(DEFAULT_IMPL.items()))

    def stage(self, name: str) -> str:
        return dict(self.impl)[name]


def color_kornia(
    y: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor, hue: Tensor,
    temperature: Tensor, grayscale: Tensor, luma: Tensor,
) -> Tensor:
    """The lighting chain step by step through `kornia.enhance` / `kornia.color` (clamped after
    each step, as kornia does). y [B,3,H,W] in [0,1]; factors [B] (hue in turns, grayscale a
    0/1 mask). White balance has no kornia functional (only the RandomPlanckianJitter module,
    whose illuminants are a table, not a per-sample strength): it is three channel gains here."""
    gains = white_balance_gains(temperature, luma)[:, :, None, None]
    y = (y * gains.to(y.dtype)).clamp(0.0, 1.0)
    y = kornia.enhance.adjust_brightness_accumulative(y, brightness.to(y.dtype))
    y = kornia.enhance.adjust_contrast_with_mean_subtraction(y, contrast.to(y.dtype))
    y = kornia.enhance.adjust_saturation_with_gray_subtraction(y, saturation.to(y.dtype))
    y = kornia.enhance.adjust_hue(y, (2.0 * math.pi * hue).to(y.dtype))
    gray = kornia.color.rgb_to_grayscale(y).expand_as(y)
    return torch.where(grayscale.bool()[:, None, None, None], gray, y)


def render(
    x: Tensor,
    theta: Tensor,
    gamma: Tensor,
    lighting: Tensor,
    blur_sigma: Tensor,
    solarize: Tensor,
    fill_kind: Tensor,
    fill_color: Tensor,
    *,
    spec: RenderSpec,
    luma: Tensor,
    norm_scale: Tensor | None = None,
    norm_bias: Tensor | None = None,
    channels_last: bool = False,
    blur_dtype: torch.dtype = torch.float32,
    hook: StageHook = None,
) -> Tensor:
    """One view: float source [B,3,H,W] in [0,1] -> float32 [B,3,out_h,out_w].

    theta [B,2,3]; gamma [B]; lighting [B,6] = brightness, contrast, saturation, hue (turns),
    temperature, grayscale (0/1); blur_sigma [B] (pixels of the view, 0 = none); solarize [B]
    (1 = invert values >= threshold); fill_kind [B] (FILL_*), fill_color [B,3]. `spec` is
    static: a stage whose probability is 0 for this view is left out (identical result, less
    work) and `spec.impl` picks kornia or the fused maths per stage. norm_scale/norm_bias
    [1,3,1,1] give `y * scale + bias` (normalisation); without them the output stays in [0,1].
    The fused blur runs in `blur_dtype` (float16 on GPUs: tensor-core matmul). hook(name) is
    called after each stage (eager profiling only).
    """
    def mark(name: str) -> None:
        if hook is not None:
            hook(name)

    out_hw, mode = spec.out_hw, spec.interpolation
    if spec.stage("warp") == "kornia":
        y = warp_kornia(x, theta, out_hw, fill_kind, fill_color, spec.fill_kinds, mode)
    else:
        y = warp(x, theta, out_hw, fill_kind, fill_color, mode)
    if mode != "bilinear":
        y = y.clamp(0.0, 1.0)  # bicubic overshoots; pow of a negative number is NaN
    mark("warp")
    if spec.has_gamma:
        y = kornia.enhance.adjust_gamma(y, gamma.to(y.dtype))
        mark("gamma")
    if spec.has_color:
        bri, con, sat, hue, temp, gray = lighting.unbind(dim=1)
        if spec.stage("color") == "kornia":
            y = color_kornia(y, bri, con, sat, hue, temp, gray, luma)
        else:
            matrix, offset = color_transform(bri, con, sat, hue, temp, gray, luma)
            y = apply_color(y, matrix, offset).clamp_(0.0, 1.0)
        mark("color")
    if spec.has_blur:
        radius = max(0, min(spec.blur_radius, min(out_hw) - 1))
        if spec.stage("blur") == "kornia":
            sigma = blur_sigma.clamp(min=1e-3).to(y.dtype)  # ~0: a one-tap (identity) kernel
            y = kornia.filters.gaussian_blur2d(
                y, (2 * radius + 1, 2 * radius + 1), torch.stack([sigma, sigma], dim=1),
                border_type="reflect",
            )
        else:
            if out_hw[0] != out_hw[1]:
                raise ValueError(f"the fused blur needs a square view, got {out_hw}")
            t = gaussian_blur_matrix(blur_sigma, out_hw[0], radius, dtype=blur_dtype)
            y = blur_to_channels_last(y.to(blur_dtype), t)
        mark("blur")
    if spec.has_solarize:
        # not solarized: a threshold above every value (kornia inverts values >= threshold)
        threshold = torch.where(solarize > 0.5, spec.solarize_threshold, 2.0).to(y.dtype)
        y = kornia.enhance.solarize(y, threshold)
        mark("solarize")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if torch.compiler.is_compiling():
        # functional form: inductor fuses it with the stages before and picks the layout
        out = y.float() if norm_scale is None else torch.addcmul(norm_bias, y, norm_scale)
        return out.contiguous(memory_format=fmt)
    out = torch.empty(y.shape, dtype=torch.float32, device=y.device, memory_format=fmt)
    if norm_scale is not None and norm_bias is not None:
        torch.addcmul(norm_bias, y, norm_scale, out=out)  # one pass: solarized y -> normalised
    else:
        out.copy_(y)
    mark("normalize")
    return out

def footprint_area(theta: Tensor) -> Tensor:
    """theta [B,2,3] -> [B]: area of the view's footprint over the source area (|det A|)."""
    a = theta[:, :, :2]
    return (a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]).abs()
