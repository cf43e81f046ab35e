"""Invariance of a frozen encoder, measured with Kornia's standard transforms.

    table = invariance_table(embed, images01, reference=train_features)  # embed: [0,1] -> [B,F]
    table["rotate/zeros"]["30"]["retrieval_top1"]      # rotated 30 degrees, zero fill
    invariance_eval(evaluator, "data/sample/test")     # a loaded backbone on a shard spec

Each image is embedded as it is and after one transform at a fixed strength; the scores are
`probes.invariance_scores` (cosine, centred cosine, and retrieval: the fraction of transformed
images whose nearest original, by cosine, is their own). With `reference` features (the train
split's), both sets are standardised by the reference's per-feature mean and std first, so a few
large-variance features do not decide the cosine.

The transforms are Kornia's own functions with their own conventions (angles in degrees,
counter-clockwise; `scale` about the centre), never the training augmentation's code, so the
table measures invariance to rotations, zooms and lighting as another library applies them, not
to the exact warp the network was trained on. Geometric transforms run with two border fills
side by side, zeros (kornia's and torchvision's default) and reflection, because a network can
learn to be invariant only under the fill it was trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from kornia.enhance import adjust_brightness_accumulative
from kornia.geometry.transform import rotate, scale
from torch import Tensor, nn

from lsdr_repr.errors import ConfigError
from lsdr_repr.eval import probes
from lsdr_repr.eval.cache import Evaluator
from lsdr_repr.eval.features import load_images01, normalize_images

FILLS = ("zeros", "reflection")


@dataclass(frozen=True)
class Level:
    """One strength of the combined-or-single transform: None leaves that part out."""

    label: str
    degrees: float | None = None
    zoom: float | None = None  # kornia `scale` factor: < 1 zooms out, > 1 zooms in
    brightness: float | None = None  # multiplicative


# Transform families and their strengths (the middle ones are the headline columns).
LEVELS: dict[str, tuple[Level, ...]] = {
    "brightness": tuple(Level(f"{b:g}", brightness=b) for b in (0.8, 0.6, 0.4)),
    "rotate": tuple(Level(f"{d:g}", degrees=d) for d in (15.0, 30.0, 60.0)),
    "zoom_out": tuple(Level(f"{z:g}", zoom=z) for z in (0.85, 0.7, 0.5)),
    "zoom_in": tuple(Level(f"{z:g}", zoom=z) for z in (1.25, 1.5)),
    "combined": (
        Level("15/0.85/0.8", degrees=15.0, zoom=0.85, brightness=0.8),
        Level("30/0.7/0.6", degrees=30.0, zoom=0.7, brightness=0.6),
    ),
}
# the families whose transform shows a border, measured once per fill (zoom-in shows none)
GEOMETRIC = ("rotate", "zoom_out", "combined")
# The headline cells: (row, level label).
HEADLINE = (("brightness", "0.6"), ("rotate/zeros", "30"), ("rotate/reflection", "30"),
            ("zoom_out/zeros", "0.7"), ("zoom_out/reflection", "0.7"),
            ("combined/zeros", "30/0.7/0.6"), ("combined/reflection", "30/0.7/0.6"))


FAMILIES = tuple(LEVELS)  # in the table's row order


def rows(families: Sequence[str] = FAMILIES) -> list[tuple[str, str, str | None]]:
    """(row name, family, fill) for each table row: geometric families once per fill."""
    out = []
    for family in families:
        if family not in LEVELS:
            raise ValueError(f"unknown invariance family {family!r} (known: {', '.join(LEVELS)})")
        fills = FILLS if family in GEOMETRIC else (None,)
        out += [(family if f is None else f"{family}/{f}", family, f) for f in fills]
    return out


def apply_level(images01: Tensor, level: Level, fill: str | None) -> Tensor:
    """images [B,3,H,W] in [0,1] -> the same transformed by Kornia (rotation, then zoom, then
    brightness), geometric parts with padding `fill` ('zeros' or 'reflection')."""
    x = images01
    batch = x.shape[0]
    padding = fill or "zeros"
    if level.degrees is not None:
        x = rotate(x, torch.full((batch,), level.degrees, device=x.device, dtype=x.dtype),
                   padding_mode=padding)
    if level.zoom is not None:
        x = scale(x, torch.full((batch, 2), level.zoom, device=x.device, dtype=x.dtype),
                  padding_mode=padding)
    if level.brightness is not None:
        x = adjust_brightness_accumulative(x, torch.full((batch,), level.brightness,
                                                         device=x.device, dtype=x.dtype))
    return x.clamp(0.0, 1.0)


def standardizer(reference: Tensor | None) -> Callable[[Tensor], Tensor]:
    """z [N,F] -> (z - mean) / std with the reference's per-feature statistics (or identity)."""
    if reference is None:
        return lambda z: z
    mean = reference.float().mean(dim=0, keepdim=True)
    std = reference.float().std(dim=0, keepdim=True).clamp(min=1e-6)
    return lambda z: (z.float() - mean.to(z.device)) / std.to(z.device)


@torch.no_grad()
def invariance_table(
    embed: Callable[[Tensor], Tensor],
    images01: Tensor,
    families: Sequence[str] = tuple(LEVELS),
    reference: Tensor | None = None,
    batch_size: int = 256,
    on_cell: Callable[[str], None] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {level: scores}} for images [N,3,R,R] in [0,1].

    `on_cell(name)` is called after each (row, level) cell, `num_cells(families)` in all (for a
    progress bar; this module prints nothing).

    embed: [B,3,R,R] in [0,1] -> [B,F] (normalisation is the caller's); reference [M,F]: the
    features whose statistics standardise both sides (None: raw features). Deterministic: the
    transforms have no randomness.
    """
    std = standardizer(reference)

    def features(x01: Tensor) -> Tensor:
        return std(torch.cat([embed(x01[i:i + batch_size]).float()
                              for i in range(0, len(x01), batch_size)]))

    z = features(images01)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for row, family, fill in rows(families):
        table[row] = {}
        for level in LEVELS[family]:
            moved = torch.cat([apply_level(images01[i:i + batch_size], level, fill)
                               for i in range(0, len(images01), batch_size)])
            table[row][level.label] = probes.invariance_scores(z, features(moved))
            if on_cell is not None:
                on_cell(f"{row}@{level.label}")
    return table


def num_cells(families: Sequence[str] = FAMILIES) -> int:
    """The number of (row, level) cells `invariance_table` measures for `families`."""
    return sum(len(LEVELS[family]) for _, family, _ in rows(families))


def headline(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """The headline retrieval cells as flat metrics: {"retrieval/rotate/zeros@30": ...}."""
    return {f"retrieval/{row}@{label}": table[row][label]["retrieval_top1"]
            for row, label in HEADLINE if row in table and label in table[row]}


# ------------------------------------------------------------------- on a loaded backbone
def backbone_invariance_table(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images01: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    families: Sequence[str] = FAMILIES,
    reference: torch.Tensor | None = None,
    batch_size: int = 128,
    on_cell: Callable[[str], None] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {level: scores}} for images [N,3,R,R] in [0,1] and an encoder of normalised
    images [B,3,R,R] -> [B,F]: `invariance_table` above (Kornia's transforms,
    zero and reflection fill), features standardised by `reference` [M,F] when given."""
    size = images01.shape[-1]
    return invariance_table(
        lambda x01: encoder(normalize_images(x01, size, mean, std)), images01, families,
        reference, batch_size, on_cell)


def invariance_eval(ev: Evaluator, data: str, families: Sequence[str] = FAMILIES,
                    max_images: int = 512, reference: str | torch.Tensor | None = None,
                    backbone: nn.Module | None = None) -> dict[str, Any]:
    """The invariance table of the first `max_images` images of `data`; features standardised
    by those of `reference`, the train split, when given: its features [M,F] already computed
    with this backbone, or its data (the first 4096 images are embedded)."""
    t = ev.trained
    unknown = [f for f in families if f not in LEVELS]
    if unknown:
        known = ", ".join(LEVELS)
        raise ConfigError(f"invariance: unknown family {unknown[0]!r} (known: {known})")
    images = load_images01(data, t.image_size, max_images, ev.batch_size, ev.num_workers)
    model = backbone if backbone is not None else t.backbone
    if reference is None or isinstance(reference, torch.Tensor):
        ref = reference
    else:
        ref = ev.features(reference, model, max_samples=4096).x
    from lsdr_repr.tracking import progress_bar

    was_training = model.training
    model.eval()
    try:
        with progress_bar(num_cells(families), f"invariance of {len(images)} images",
                          "transform", ev.progress) as bar:
            def on_cell(name: str) -> None:
                bar.set_postfix_str(name, refresh=False)
                bar.update(1)

            table = backbone_invariance_table(model, images.to(ev.device), t.mean, t.std, families,
                                     None if ref is None else ref.to(ev.device), ev.batch_size,
                                     on_cell=on_cell)
    finally:
        model.train(was_training)
    metrics = {f"{row}@{level}/{m}": v for row, cells in table.items()
               for level, cell in cells.items() for m, v in cell.items()}
    return {"metrics": metrics, "table": table,
            "details": {"data": str(data), "num_images": len(images),
                        "reference": reference if isinstance(reference, str) else None}}
