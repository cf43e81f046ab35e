"""lsdr_repr.augment: batched per-sample views, replay, each family's effect, kornia references."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path

import kornia
import pytest
import torch
import torch.nn.functional as F

from lsdr_repr.augment import (
    NUM_UNIFORMS,
    ViewParams,
    _view_graph,
)
from lsdr_repr.augment_ops import (
    LUMA,
    affine_theta,
    apply_color,
    blur_to_channels_last,
    color_transform,
    gaussian_blur_matrix,
    grayscale_matrix,
    hue_matrix,
    render,
    saturation_matrix,
    to_float01,
)
from lsdr_repr.builders.augment import build_augment
from lsdr_repr.config import AUGMENT_PRESETS, AugmentConfig, config_from_dict
from lsdr_repr.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LUMA_T = torch.tensor(LUMA)

# every family off: the view is the whole image resized, normalised
PLAIN = {
    "scale": {"p": 0.0}, "rotation": {"p": 0.0}, "lighting": {"p": 0.0}, "flip_p": 0.0,
    "grayscale_p": 0.0, "blur": {"p": [0.0]}, "solarize": {"p": [0.0]},
}


def make_cfg(**augment) -> AugmentConfig:
    return config_from_dict({"augment": augment}).augment


def plain_cfg(size: int, **changes) -> AugmentConfig:
    raw = {**PLAIN, "crop_size": size}
    for key, value in changes.items():
        if isinstance(value, dict):
            raw[key] = {**raw.get(key, {}), **value}
        else:
            raw[key] = value
    return make_cfg(**raw)


def images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)


def smooth_images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency colour images (upsampled noise): values well inside (0, 255)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (40 + 175 * x).round().to(torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------ views and replay
def test_views_shapes_dtypes_ranges_and_multicrop():
    cfg = make_cfg(preset="lsdr-invariance", crop_size=24, local_crops=2, local_crop_size=12)
    aug = build_augment(cfg)
    x = images(4, 40)
    views = aug(x, generator=gen(0))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 2
    assert aug.num_views == 4 and len(aug.last_params) == 4
    for v in views:
        assert v.dtype == torch.float32 and v.is_contiguous()  # CPU: NCHW
        raw = v * aug.std + aug.mean  # denormalised before the clamp of denormalize()
        assert raw.min() > -1e-4 and raw.max() < 1 + 1e-4
        assert v.std() > 0.1  # not a constant image
        assert aug.denormalize(v).shape == v.shape
    # local crops draw their area from local_area and never zoom out
    assert all(float(p.area.max()) <= 0.3 + 1e-5 for p in aug.last_params[2:])


def test_channels_last_layout_on_request_and_on_cuda():
    cfg = make_cfg(preset="vicreg", crop_size=16)
    x = images(2, 24)
    for blur in ([1.0], [0.0]):  # with and without the blur stage (it writes NHWC itself)
        aug = build_augment(make_cfg(preset="vicreg", crop_size=16, blur={"p": blur}),
                            channels_last=True)
        for v in aug(x, generator=gen(1)):
            assert v.is_contiguous(memory_format=torch.channels_last)
    # the CUDA recipe (float16 blur, channels_last float32 output) run here on the CPU
    aug = build_augment(make_cfg(preset="lsdr-invariance", crop_size=16, solarize={"p": [1.0]}))
    views = aug(x, gen(2))
    p = aug.last_params[0]
    kw = {"spec": p.spec.render_spec(), "luma": aug.luma, "norm_scale": aug.norm_scale,
          "norm_bias": aug.norm_bias}
    half = render(to_float01(x), *p.tensors()[:ViewParams.RENDERED], blur_dtype=torch.float16,
                  channels_last=True, **kw)
    assert half.dtype == torch.float32 and half.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(half, views[0], atol=2e-3 / float(aug.std.min()), rtol=0)
    if not torch.cuda.is_available():
        pytest.skip("channels_last by default is a CUDA-only behaviour; no GPU here")
    views = build_augment(cfg)(x.cuda())
    assert all(v.is_cuda and v.is_contiguous(memory_format=torch.channels_last) for v in views)


def test_parameters_differ_per_sample():
    aug = build_augment(make_cfg(preset="lsdr-invariance", crop_size=16))
    p = aug.sample_params(8, "cpu", gen(3), view_index=0)
    assert p.theta.shape == (8, 2, 3) and p.lighting.shape == (8, 6)
    assert p.fill_kind.shape == (8,) and p.fill_color.shape == (8, 3)
    assert len({tuple(t.flatten().tolist()) for t in p.theta}) == 8
    lit = p.gamma != 1.0
    assert lit.sum() >= 2
    assert len({tuple(c.tolist()) for c in p.lighting[lit, :5]}) == int(lit.sum())


def test_replay_from_params_gives_identical_views():
    aug = build_augment(make_cfg(preset="lsdr-invariance", crop_size=16, local_crops=1,
                                 local_crop_size=8))
    x = images(3, 24)
    views = aug(x, generator=gen(5))
    for view, params in zip(views, aug.last_params):
        assert torch.equal(aug.apply(x, params), view)
    # sample_params with the same generator state draws the same parameters as the call
    g = gen(5)
    first = aug.sample_params(3, "cpu", g, view_index=0)
    second = aug.sample_params(3, "cpu", g, view_index=1)
    for mine, theirs in ((first, aug.last_params[0]), (second, aug.last_params[1])):
        for a, b in zip(mine.tensors(), theirs.tensors()):
            assert torch.equal(a, b)


def test_deterministic_under_a_seed():
    aug = build_augment(make_cfg(preset="vicreg", crop_size=16))
    x = images(3, 24)
    a, b, c = aug(x, gen(7)), aug(x, gen(7)), aug(x, gen(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_sampled_distributions_follow_the_config():
    cfg = make_cfg(
        scale={"p": 1.0, "area": [0.2, 0.6], "aspect": [0.5, 2.0]}, rotation={"p": 0.5, "degrees": 40},
        flip_p=0.3, lighting={"p": 0.6, "gamma": 0.5}, grayscale_p=0.2, blur={"p": [0.7]},
        solarize={"p": [0.25]},
    )
    aug = build_augment(cfg)
    n = 4000
    p = aug.sample_params(n, "cpu", gen(11), view_index=0)
    def near(frac: torch.Tensor, target: float) -> bool:
        return abs(float(frac.float().mean()) - target) < 0.03

    assert near(p.flip, 0.3) and near(p.angle != 0, 0.5) and near(p.grayscale, 0.2)
    assert near(p.gamma != 1, 0.6) and near(p.blur_sigma > 0, 0.7) and near(p.solarize, 0.25)
    assert float(p.angle.abs().max()) <= 40.0
    unrotated = p.angle == 0
    assert float(p.area[unrotated].min()) >= 0.2 - 1e-5 and float(p.area.max()) <= 0.6 + 1e-5
    w, h = p.theta[unrotated, 0, 0].abs(), p.theta[unrotated, 1, 1].abs()
    assert float((w / h).min()) >= 0.5 - 1e-4 and float((w / h).max()) <= 2.0 + 1e-4
    assert float(p.gamma.min()) >= 1 / 1.5 - 1e-5 and float(p.gamma.max()) <= 1.5 + 1e-5
    sig = p.blur_sigma[p.blur_sigma > 0]
    assert float(sig.min()) >= 0.1 and float(sig.max()) <= 2.0


# ------------------------------------------------------------------------------- geometry
def test_rotation_by_90_degrees_matches_rot90_on_a_centred_crop():
    aug = build_augment(plain_cfg(16))
    x = images(2, 32)
    params = ViewParams.identity(2, 16)
    # the central half of the image, turned by +90 degrees (counter-clockwise on screen)
    params.theta = affine_theta(torch.zeros(2, 2), torch.full((2, 2), 0.5),
                                torch.full((2,), math.pi / 2), torch.zeros(2, dtype=torch.bool))
    view = aug.denormalize(aug.apply(x, params))
    expected = torch.rot90(x[:, :, 8:24, 8:24].float() / 255, 1, dims=(2, 3))
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_flip_matches_torch_flip():
    x = images(3, 16)
    aug = build_augment(plain_cfg(16, flip_p=1.0))
    views = aug(x, gen(0))
    for v in views:
        torch.testing.assert_close(aug.denormalize(v), x.flip(3).float() / 255, atol=1e-5, rtol=0)
    assert bool(aug.last_params[0].flip.all())


def test_crop_border_keeps_rotated_views_inside_the_image():
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])

    def corner_reach(border: str) -> torch.Tensor:
        cfg = make_cfg(scale={"p": 0.5}, rotation={"p": 1.0, "degrees": 180, "border": border})
        p = build_augment(cfg).sample_params(512, "cpu", gen(2))
        return torch.einsum("bij,kj->bki", p.theta, corners).abs().amax(dim=(1, 2))

    assert float(corner_reach("crop").max()) <= 1.0 + 1e-5
    assert float(corner_reach("fill").max()) > 1.2  # rotated corners leave the image
    assert float(corner_reach("reflection").max()) > 1.2  # the older name of "fill"


def test_zoom_out_shrinks_the_image_inside_the_view():
    x = images(2, 32)
    aug = build_augment(plain_cfg(32))
    params = ViewParams.identity(2, 32)
    params.theta = affine_theta(torch.zeros(2, 2), torch.full((2, 2), 2.0), torch.zeros(2),
                                torch.zeros(2, dtype=torch.bool))
    view = aug.denormalize(aug.apply(x, params))
    # the whole image at half size in the centre (bilinear at 2x = 2x2 means), mirrored around
    torch.testing.assert_close(view[:, :, 8:24, 8:24], F.avg_pool2d(x.float() / 255, 2),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(view[:, :, 8:24, 7], view[:, :, 8:24, 8], atol=1e-5, rtol=0)
    # sampled: zoom_out_p=1 gives views covering z^2 times the image, z in the configured range
    sampled = build_augment(plain_cfg(32, scale={"zoom_out_p": 1.0, "zoom_out": [1.5, 2.0]}))
    p = sampled.sample_params(64, "cpu", gen(4))
    assert float(p.area.min()) >= 1.5**2 - 1e-4 and float(p.area.max()) <= 4.0 + 1e-4
    # the whole image stays inside the view, at a random place
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    in_view = torch.linalg.solve(p.theta[:, None, :, :2], corners[None, :, :, None]
                                 - p.theta[:, None, :, 2:])
    assert float(in_view.abs().max()) <= 1.0 + 1e-5
    assert float(p.theta[:, :, 2].std(dim=0).min()) > 0.05
    assert sampled(x, gen(4))[0].isfinite().all()


# --------------------------------------------------------------------------------- colour
def test_brightness_only_scales_values():
    x = smooth_images(4, 16)
    aug = build_augment(plain_cfg(16, lighting={"p": 1.0, "brightness": 0.5, "contrast": 0.0,
                                                "saturation": 0.0, "hue": 0.0}))
    view = aug.denormalize(aug(x, gen(9))[0])
    p = aug.last_params[0]
    factor = p.lighting[:, 0]
    torch.testing.assert_close(p.lighting[:, 1:], torch.tensor([1.0, 1, 0, 0, 0]).expand(4, 5))
    assert float((factor - 1).abs().min()) > 0
    expected = (x.float() / 255 * factor[:, None, None, None]).clamp(0, 1)
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)


def test_grayscale_gives_equal_channels_matching_kornia():
    x = images(3, 16)
    aug = build_augment(plain_cfg(16, grayscale_p=1.0))
    view = aug.denormalize(aug(x, gen(0))[0])
    torch.testing.assert_close(view[:, 0], view[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(view[:, 1], view[:, 2], atol=1e-5, rtol=0)
    gray = kornia.color.rgb_to_grayscale(x.float() / 255)
    torch.testing.assert_close(view[:, :1], gray, atol=1e-5, rtol=0)


def test_solarize_inverts_values_above_the_threshold():
    x = images(3, 16)
    aug = build_augment(plain_cfg(16, solarize={"p": [1.0], "threshold": 0.5}))
    view = aug.denormalize(aug(x, gen(0))[0])
    f = x.float() / 255
    torch.testing.assert_close(view, torch.where(f >= 0.5, 1 - f, f), atol=1e-5, rtol=0)


def test_saturation_and_contrast_match_kornia():
    x = torch.rand(2, 3, 12, 12, generator=gen(1))
    for s in (torch.tensor([0.3, 0.8]), torch.tensor([1.5, 1.9])):
        ours = apply_color(x, saturation_matrix(s, LUMA_T), torch.zeros(2, 3)).clamp(0, 1)
        ref = kornia.enhance.adjust_saturation_with_gray_subtraction(x, s)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ones, zeros, c = torch.ones(2), torch.zeros(2), torch.tensor([0.5, 1.4])
    m, offset = color_transform(ones, c, ones, zeros, zeros, zeros, LUMA_T)
    ours = apply_color(x, m, offset).clamp(0, 1)
    ref = kornia.enhance.adjust_contrast_with_mean_subtraction(x, c)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    gray = apply_color(x, grayscale_matrix(torch.ones(2), LUMA_T), torch.zeros(2, 3))
    torch.testing.assert_close(gray, kornia.color.rgb_to_grayscale(x).expand(2, 3, 12, 12),
                               atol=1e-6, rtol=0)


def test_composed_colour_chain_matches_kornia_step_by_step():
    # factors <= 1 keep every kornia step inside [0, 1], so its clamps never act
    x = torch.rand(2, 3, 12, 12, generator=gen(4))
    b, c, s = torch.tensor([0.7, 0.9]), torch.tensor([0.6, 0.8]), torch.tensor([0.5, 0.2])
    gamma, zeros = torch.tensor([0.8, 1.3]), torch.zeros(2)
    m, offset = color_transform(b, c, s, zeros, zeros, zeros, LUMA_T)
    y = x ** gamma[:, None, None, None]
    ours = apply_color(y, m, offset)
    ref = kornia.enhance.adjust_brightness_accumulative(y, b)
    ref = kornia.enhance.adjust_contrast_with_mean_subtraction(ref, c)
    ref = kornia.enhance.adjust_saturation_with_gray_subtraction(ref, s)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_white_balance_warms_and_keeps_gray_luminance():
    g = torch.full((2, 3, 4, 4), 0.5)
    ones, zeros = torch.ones(2), torch.zeros(2)
    m, offset = color_transform(ones, ones, ones, zeros, torch.tensor([0.3, -0.3]), zeros, LUMA_T)
    y = apply_color(g, m, offset)
    assert float(y[0, 0].mean()) > 0.5 > float(y[0, 2].mean())  # warmer: red up, blue down
    assert float(y[1, 0].mean()) < 0.5 < float(y[1, 2].mean())
    torch.testing.assert_close(kornia.color.rgb_to_grayscale(y), g[:, :1])


def test_hue_rotation_matches_kornia_hsv_shift():
    x = torch.rand(2, 3, 12, 12, generator=gen(2))
    # a third of a turn is exactly HSV's 120-degree shift, in both directions
    for turns in (1 / 3, -1 / 3):
        ours = apply_color(x, hue_matrix(torch.full((2,), turns)), torch.zeros(2, 3))
        ref = kornia.enhance.adjust_hue(x, torch.full((2,), 2 * math.pi * turns))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # small shifts move the HSV hue by the requested angle on average (a circle, not a hexagon)
    for turns in (0.05, -0.1):
        ours = apply_color(x, hue_matrix(torch.full((2,), turns)), torch.zeros(2, 3)).clamp(0, 1)
        d = kornia.color.rgb_to_hsv(ours)[:, 0] - kornia.color.rgb_to_hsv(x)[:, 0]
        shift = torch.atan2(d.sin().mean(), d.cos().mean())
        assert abs(float(shift) - 2 * math.pi * turns) < 0.15 * abs(2 * math.pi * turns)
    # gray stays gray
    g = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(apply_color(g, hue_matrix(torch.tensor([0.2])), torch.zeros(1, 3)), g)


def test_blur_matches_kornia_gaussian_blur2d():
    x = torch.rand(3, 3, 20, 20, generator=gen(3))
    sigma = torch.tensor([0.4, 1.1, 2.5])
    ours = blur_to_channels_last(x, gaussian_blur_matrix(sigma, 20, radius=5))
    ref = kornia.filters.gaussian_blur2d(x, (11, 11), torch.stack([sigma, sigma], 1), "reflect")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(blur_to_channels_last(x, gaussian_blur_matrix(torch.zeros(3), 20, 5)), x)
    # the GPU path runs the two matmuls in float16: within a fraction of a uint8 step
    half = blur_to_channels_last(x.half(), gaussian_blur_matrix(sigma, 20, 5, torch.float16))
    torch.testing.assert_close(half.float(), ref, atol=2e-3, rtol=0)


# --------------------------------------------------------------------- presets and errors
def test_presets_load_and_match_the_papers_code():
    for name in AUGMENT_PRESETS:
        aug = build_augment(make_cfg(preset=name, crop_size=16))
        assert len(aug(images(2, 24), gen(0))) == 2
    for name in ("vicreg", "barlow"):  # facebookresearch/{vicreg,barlowtwins} transforms
        cfg = make_cfg(preset=name)
        assert cfg.interpolation == "bicubic" and cfg.scale.area == (0.08, 1.0)
        light = cfg.lighting
        assert (light.p, light.brightness, light.contrast, light.saturation, light.hue) == (
            0.8, 0.4, 0.4, 0.2, 0.1)
        assert (cfg.flip_p, cfg.grayscale_p) == (0.5, 0.2) and cfg.blur.sigma == (0.1, 2.0)
        assert cfg.blur.p == [1.0, 0.1] and cfg.solarize.p == [0.0, 0.2]
        assert cfg.rotation.p == 0.0 and cfg.scale.zoom_out_p == 0.0


def test_bad_images_raise_value_error():
    """The reader hands the augmentation uint8 [B,3,S,S]: anything else is a caller's bug."""
    aug = build_augment(make_cfg(crop_size=8))
    with pytest.raises(ValueError, match=r"expected images \[B,3,S,S\], got \(2, 1, 8, 8\)"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="int64"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.int64))


# ------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_view_graph_traces_as_one_graph_and_matches_eager(precision):
    aug = build_augment(make_cfg(preset="lsdr-invariance", crop_size=12, precision=precision,
                                 rotation={"border": "crop"}))
    spec = aug.specs[1]  # blur, solarize, gamma, crop-to-fit: every stage
    fn = functools.partial(_view_graph, spec=spec, channels_last=False, blur_dtype=torch.float32,
                           render_dtype=aug.render_dtype)
    x, u = images(2, 16), torch.rand(2, NUM_UNIFORMS, generator=gen(0))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=False)
    view, tensors = compiled(x, u, aug.luma, aug.norm_scale, aug.norm_bias)
    ref_view, ref_tensors = fn(x, u, aug.luma, aug.norm_scale, aug.norm_bias)
    torch.testing.assert_close(view, ref_view)
    for a, b in zip(tensors, ref_tensors):
        torch.testing.assert_close(a, b)
    params = ViewParams.from_tensors(ref_tensors, spec)
    replay = torch.compile(aug.apply, fullgraph=True, backend="aot_eager")(x, params)
    torch.testing.assert_close(replay, ref_view)


# ------------------------------------------------------- kornia path against the fused path
# Tolerances: the two paths agree to float32 rounding (1e-5 on [0,1] values) where kornia's
# intermediate clamps do not act; hue is HSV's hexagon in kornia and a rotation about the gray
# axis in the fused matrix, equal at a third of a turn (test_hue_rotation_matches_kornia_hsv_shift).
ALL_KORNIA = {"warp": "kornia", "color": "kornia", "blur": "kornia"}
ALL_FUSED = {"warp": "fused", "color": "fused", "blur": "fused"}


@pytest.mark.parametrize("stage, changes", [
    ("warp", {"scale": {"p": 1.0, "area": [0.3, 1.0], "zoom_out_p": 0.5, "zoom_out": [1.2, 2.0]},
              "rotation": {"p": 1.0, "degrees": 180.0},
              "fill": ["zeros", "reflection", "replicate", "random", 0.5]}),
    ("color", {"lighting": {"p": 1.0, "brightness": 0.2, "contrast": 0.2, "saturation": 0.3,
                            "hue": 0.0, "gamma": 0.3, "temperature": 0.1}, "grayscale_p": 0.3}),
    ("blur", {"blur": {"p": [1.0], "sigma": [0.1, 2.0], "kernel_size": 9}}),
])
def test_kornia_and_fused_paths_agree_per_op_and_per_sample(stage, changes):
    # mid-range values: no colour step leaves [0, 1], so kornia's clamps between steps never act
    x = 0.35 + 0.3 * smooth_images(6, 24, seed=3).float() / 255
    cfg = plain_cfg(16, **changes)
    views = {}
    for name, impl in (("kornia", ALL_KORNIA), ("fused", ALL_FUSED)):
        aug = build_augment(cfg, impl=impl)
        views[name] = aug.denormalize(aug(x, gen(6))[0])
    per_sample = (views["kornia"] - views["fused"]).abs().amax(dim=(1, 2, 3))
    assert float(per_sample.max()) < 2e-5, (stage, per_sample)


def test_fused_warp_equals_grid_sample_and_kornia_for_each_fill():
    from kornia.geometry.transform import warp_affine

    from lsdr_repr.augment_ops import kornia_matrix, warp

    x = torch.rand(3, 3, 20, 24, generator=gen(8))
    theta = affine_theta(torch.full((3, 2), 0.1), torch.full((3, 2), 1.4), torch.full((3,), 0.6),
                         torch.zeros(3, dtype=torch.bool))
    grid = F.affine_grid(theta, [3, 3, 16, 16], align_corners=False)
    m = kornia_matrix(theta, (20, 24), (16, 16))
    color = torch.rand(3, 3, generator=gen(9))
    for kind, padding in ((1, "reflection"), (2, "border")):
        ours = warp(x, theta, (16, 16), torch.full((3,), kind), color)
        ref = F.grid_sample(x, grid, padding_mode=padding, align_corners=False)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        theirs = warp_affine(x, m, (16, 16), padding_mode=padding, align_corners=False)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    ours = warp(x, theta, (16, 16), torch.zeros(3, dtype=torch.long), color)
    theirs = warp_affine(x, m, (16, 16), padding_mode="fill", align_corners=False,
                         fill_value=color[:, :, None, None])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_a_batch_through_gpu_augment_runs_kornia_functionals():
    import sys

    ran: set[str] = set()

    def record(frame, event, arg):  # the real call stack: which kornia functions executed
        if event == "call" and "/kornia/" in frame.f_code.co_filename:
            ran.add(frame.f_code.co_name)

    cfg = make_cfg(preset="lsdr-invariance", crop_size=16, solarize={"p": [1.0]},
                   kornia=[{"op": "RandomPlanckianJitter", "p": 1.0}])

    def kornia_calls(impl: dict | None) -> set[str]:
        ran.clear()
        aug = build_augment(cfg, impl=impl)
        sys.setprofile(record)
        try:
            aug(images(2, 24), gen(0))
        finally:
            sys.setprofile(None)
        return set(ran)

    default = kornia_calls(None)
    # the default path: gamma, the colour chain and solarize are kornia's functionals, then the
    # config's module; the warp and the blur are the fused maths (DEFAULT_IMPL)
    assert {"adjust_gamma", "adjust_brightness_accumulative", "adjust_hue", "rgb_to_grayscale",
            "solarize", "forward"} <= default, sorted(default)
    assert not {"warp_affine", "gaussian_blur2d"} & default
    every = kornia_calls(ALL_KORNIA)
    expected = {"adjust_gamma", "adjust_brightness_accumulative",
                "adjust_contrast_with_mean_subtraction", "adjust_saturation_with_gray_subtraction",
                "adjust_hue", "rgb_to_grayscale", "gaussian_blur2d", "solarize", "warp_affine"}
    assert expected <= every, sorted(expected - every)


def test_fill_mixture_gives_different_fills_within_one_batch():
    cfg = plain_cfg(16, scale={"p": 0.0, "zoom_out_p": 1.0, "zoom_out": [2.0, 2.0]},
                    fill=["zeros", "reflection", "replicate", "random", 0.5])
    aug = build_augment(cfg)
    x = smooth_images(64, 16, seed=5)
    view = aug.denormalize(aug(x, gen(3))[0])
    p = aug.last_params[0]
    assert set(p.fill_kind.tolist()) == {0, 1, 2}
    colours = {tuple(round(v, 4) for v in c.tolist()) for c in p.fill_color[p.fill_kind == 0]}
    assert (0.0, 0.0, 0.0) in colours and (0.5, 0.5, 0.5) in colours and len(colours) > 3
    # the view's corner pixel is outside the (zoomed-out) image: it shows the sample's fill
    corner = view[:, :, 0, 0]
    constant = p.fill_kind == 0
    torch.testing.assert_close(corner[constant], p.fill_color[constant], atol=1e-5, rtol=0)
    assert float((corner[~constant] - p.fill_color[~constant]).abs().max()) > 0.05


def test_kornia_modules_from_the_config_run_on_the_views():
    mods = [{"op": "RandomPlanckianJitter", "mode": "blackbody", "p": 1.0},
            {"op": "RandomPlasmaShadow", "p": 1.0, "views": [1]},
            {"op": "RandomPerspective", "distortion_scale": 0.3, "p": 1.0}]
    cfg = plain_cfg(16, kornia=mods)
    plain = build_augment(plain_cfg(16))
    aug = build_augment(cfg)
    x = smooth_images(4, 16)
    views = aug(x, gen(1))
    base = plain(x, gen(1))
    assert [type(m).__name__ for m in aug.kornia_ops] == [m["op"] for m in mods]
    assert aug.kornia_views == [[0, 1], [1], [0, 1]]
    for v, b in zip(views, base):
        assert v.shape == b.shape and float((v - b).abs().mean()) > 1e-3
    raw = views[0] * aug.std + aug.mean
    assert raw.min() > -1e-4 and raw.max() < 1 + 1e-4
    # replay: the built-in parameters and the modules' own
    assert aug.last_params[0].kornia_params[1] is None  # the shadow is for view 1 only
    for view, params in zip(views, aug.last_params):
        torch.testing.assert_close(aug.apply(x, params), view, atol=1e-5, rtol=0)


@pytest.mark.parametrize("entry, message", [
    ({"op": "RandomPlanckianJiter"}, (r"augment\.kornia\[0\]\.op: .*'RandomPlanckianJiter'"
                                      r".*did you mean RandomPlanckianJitter")),
    ({"op": "RandomPerspective", "distortion": 0.3},
     (r"augment\.kornia\[0\]\.distortion: RandomPerspective takes no argument 'distortion'"
      r" \(did you mean distortion_scale")),
    ({"op": "RandomPlasmaShadow", "views": [5]}, r"augment\.kornia\[0\]\.views"),
    ({"op": "RandomPlanckianJitter", "mode": "sunset"}, r"augment\.kornia\[0\]: "),
    ({"op": "RandomGamma", "p": 2}, r"augment\.kornia\[0\]\.p: a probability in \[0, 1\], got 2"),
    ({"op": "RandomGamma", "p": -1}, r"augment\.kornia\[0\]\.p: a probability in \[0, 1\]"),
])
def test_bad_kornia_entry_is_a_one_line_config_error(entry, message):
    with pytest.raises(ConfigError, match=message) as err:
        make_cfg(kornia=[entry])
    assert "\n" not in str(err.value)


def test_bad_kornia_entry_on_the_command_line_exits_2(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {train_shards: x}\n")
    out = subprocess.run(
        [sys.executable, "-m", "lsdr_repr", "config", str(cfg),
         "augment.kornia=[{op: RandomPlanckianJiter, p: 0.5}]"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean RandomPlanckianJitter" in lines[0], out.stderr



# ----------------------------------------------------------------------------- benchmark
def test_benchmark_runs_on_cpu_with_tiny_sizes(tmp_path):
    spec = importlib.util.spec_from_file_location("augment_bench", ROOT / "benchmarks" /
                                                  "augment_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--device", "cpu", "--batch", "4", "--size", "64", "--crop", "32",
                     "--iters", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "augment_bench.json").read_text())
    assert {"kornia", "ours-eager/equivalent", "ours-eager/lsdr-invariance",
            "ours-eager/vicreg"} <= set(report["rows"])
    assert all(r["ms_mean"] > 0 for r in report["rows"].values())
    stages = report["stages_ms"]["ours-eager/equivalent"]
    assert {"sample", "warp", "color", "blur", "normalize"} <= set(stages)
    assert "RandomGaussianBlur" in report["stages_ms"]["kornia"]


def test_float16_rendering_draws_the_same_views_to_within_rounding():
    """augment.precision=fp16 renders in float16 (measured faster on a GPU) and hands out the
    same float32 views as fp32 rendering, up to float16 rounding: same parameters, under a grey
    level apart on average (solarize thresholds and near-grey hues may flip single pixels)."""
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    views, params = {}, {}
    for precision in ("fp32", "fp16"):
        aug = build_augment(make_cfg(preset="lsdr-invariance", crop_size=48, precision=precision,
                                     fill=["reflection", "zeros", 0.5]))
        views[precision] = aug(images, generator=torch.Generator().manual_seed(0))
        params[precision] = aug.last_params
    for v32, v16, p32, p16 in zip(views["fp32"], views["fp16"], params["fp32"], params["fp16"],
                                  strict=True):
        assert v16.dtype == torch.float32 and v16.shape == v32.shape
        assert not torch.equal(v16, v32)  # rendered in float16 indeed
        assert all(torch.equal(a, b) for a, b in zip(p32.tensors(), p16.tensors(), strict=True))
        diff = (aug.denormalize(v32) - aug.denormalize(v16)).abs()
        assert float(diff.mean()) < 1 / 255 and float(diff.median()) < 0.5 / 255
    with pytest.raises(ConfigError, match="precision"):
        make_cfg(precision="bf16")
