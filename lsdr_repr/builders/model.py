"""`build_model`: cfg.model -> SSLModel (timm backbone, random init, no classifier, + projector)."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import timm
import torch
from torch import nn

from lsdr_repr.config import ModelConfig
from lsdr_repr.errors import ConfigError
from lsdr_repr.models import SSLModel, build_projector

logger = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig, smallest_view: int | None = None) -> SSLModel:
    """The SSL model for `model_cfg`: timm backbone (random init, no classifier) + projector.

    smallest_view: the side of the smallest view it will see (`AugmentConfig.smallest_view`);
    when its last stage then works on a 1 x 1 map, channels_last is turned off (see
    `one_pixel_last_stage`).
    """
    arch = model_cfg.arch
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.arch: unknown timm model '{arch}'{hint}")
    kwargs: dict[str, Any] = dict(model_cfg.timm_kwargs)
    if model_cfg.drop_path_rate:
        # Only when asked: some architectures (VGG, ...) do not accept the argument at all.
        kwargs["drop_path_rate"] = model_cfg.drop_path_rate
    try:
        backbone = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"model: timm model '{arch}' rejects its arguments "
                          f"{sorted(kwargs)}: {exc}") from None
    if model_cfg.grad_checkpointing:
        if not hasattr(backbone, "set_grad_checkpointing"):
            raise ConfigError(f"model.grad_checkpointing: '{arch}' does not support it")
        backbone.set_grad_checkpointing(True)
    # head_hidden_size: models with a pre-logits layer (MobileNetV3's conv_head) output that
    # width, not num_features.
    num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
    stages, channels = _resolve_stages(backbone, arch, list(model_cfg.stages))
    for d in model_cfg.projector:
        if d <= 0:
            raise ConfigError(f"model.projector: widths must be positive, got {model_cfg.projector}")
    projector = build_projector(num_features, list(model_cfg.projector), model_cfg.projector_bn)
    channels_last = model_cfg.channels_last
    if channels_last and one_pixel_last_stage(backbone, smallest_view):
        # Compiled channels_last convolutions over a 1 x 1 map fail in their first backward on
        # CUDA (pytorch/pytorch#171622); channels_last buys nothing at such sizes anyway.
        logger.warning("model.channels_last: off for %s: its last stage sees a 1 x 1 map at "
                       "%d px views (pytorch/pytorch#171622)", arch, smallest_view)
        channels_last = False
    model = SSLModel(backbone, projector, num_features, stages, channels,
                     channels_last=channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    logger.info("model %s: %d features, projector %s, stages %s", arch, num_features,
                model_cfg.projector, stages)
    return model


def one_pixel_last_stage(backbone: nn.Module, view: int | None) -> bool:
    """Whether `backbone`'s last stage sees a 1 x 1 map at `view` px (its reduction >= view);
    False when the view or the reduction (timm's feature_info) is unknown."""
    info = getattr(backbone, "feature_info", None)
    if view is None or not info:
        return False
    try:  # timm's list of dicts (its FeatureInfo indexes the same way)
        return int(info[-1]["reduction"]) >= view
    except (IndexError, KeyError, TypeError, ValueError):
        return False  # an architecture that does not say: keep the configured format


def _resolve_stages(backbone: nn.Module, arch: str, stages: list[int]) -> tuple[list[int], list[int]]:
    """Absolute stage indices (negatives count from the end) and their channel counts."""
    if not stages:
        return [], []
    info = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not info:
        raise ConfigError(f"model.stages: '{arch}' has no forward_intermediates in timm; "
                          f"set model.stages: []")
    channels = [int(f["num_chs"]) for f in info]
    n = len(channels)
    out: list[int] = []
    for idx in stages:
        absolute = idx + n if idx < 0 else idx
        if not 0 <= absolute < n:
            raise ConfigError(f"model.stages: index {idx} is out of range for '{arch}', which has "
                              f"{n} stages (0..{n - 1}, or -{n}..-1 from the end)")
        if absolute in out:
            raise ConfigError(f"model.stages: stage {absolute} is listed twice in {stages}")
        out.append(absolute)
    return out, [channels[i] for i in out]
