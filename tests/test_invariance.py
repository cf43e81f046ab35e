"""lsdr_repr.eval.invariance: Kornia's standard transforms, fills side by side, standardised retrieval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kornia.geometry.transform import rotate

from lsdr_repr.eval import invariance

ROOT = Path(__file__).resolve().parents[1]


def test_rows_cover_each_geometric_family_with_both_fills():
    names = [row for row, _, _ in invariance.rows()]
    assert "brightness" in names and "rotate/zeros" in names and "rotate/reflection" in names
    assert "zoom_out/zeros" in names and "combined/reflection" in names
    with pytest.raises(ValueError, match="unknown invariance family 'texture'"):
        invariance.rows(("texture",))


def test_levels_are_kornias_transforms_with_the_named_fill():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    level = invariance.LEVELS["rotate"][1]  # 30 degrees
    for fill in ("zeros", "reflection"):
        ref = rotate(x, torch.full((3,), 30.0), padding_mode=fill)
        torch.testing.assert_close(invariance.apply_level(x, level, fill), ref.clamp(0, 1))
    zeros = invariance.apply_level(x, level, "zeros")
    reflection = invariance.apply_level(x, level, "reflection")
    assert float(zeros[:, :, 0, 0].abs().max()) == 0.0  # the rotated corner is empty
    assert float(reflection[:, :, 0, 0].abs().min()) > 0.0  # ... or mirrored content
    zoomed = invariance.apply_level(x, invariance.LEVELS["zoom_out"][2], "zeros")  # 0.5
    assert float(zoomed[:, :, :3, :].abs().max()) == 0.0  # the image shrank to the centre
    dim = invariance.apply_level(x, invariance.LEVELS["brightness"][1], None)  # x 0.6
    torch.testing.assert_close(dim, x * 0.6)


def test_standardised_retrieval_ignores_a_dominant_feature():
    g = torch.Generator().manual_seed(1)

    def embed(x01):
        # 32 features that identify the image and ignore its brightness, plus one
        # large-variance feature that is pure noise (it changes on every call)
        flat = x01[:, 0].flatten(1)
        ident = flat / flat.mean(dim=1, keepdim=True)
        return torch.cat([ident, 1000.0 * torch.randn(len(x01), 1, generator=g)], dim=1)

    images = torch.rand(64, 3, 4, 8, generator=g) * 0.8 + 0.1
    raw = invariance.invariance_table(embed, images, families=("brightness",))
    std = invariance.invariance_table(embed, images, families=("brightness",),
                                      reference=embed(images))
    assert raw["brightness"]["0.8"]["retrieval_top1"] < 0.5  # the noise decides the cosine
    assert std["brightness"]["0.8"]["retrieval_top1"] > 0.9


def test_evaluation_does_not_import_the_training_augmentation():
    """The invariance measurement shares no code with what it measures: no module of
    lsdr_repr/eval imports the training augmentation, directly or through another module."""
    from tests.test_imports import reachable

    for name in sorted(reachable("lsdr_repr.eval")):
        assert name not in {"lsdr_repr.augment", "lsdr_repr.augment_ops"}, name
