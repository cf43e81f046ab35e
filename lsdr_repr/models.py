"""Backbone (any timm model) + projector MLP, with pooled intermediate stages for layer-wise terms.

    model = build_model(cfg.model)          # SSLModel: .backbone (timm, num_classes=0), .projector
    out = model(images)                     # ModelOutput(embedding, projection, stages)

The state dict holds only "backbone.*" (the timm model's own keys, so the export is a plain timm
checkpoint) and "projector.*".
"""

from __future__ import annotations

import difflib
import logging
from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from lsdr_repr.config import ModelConfig
from lsdr_repr.errors import ConfigError

logger = logging.getLogger(__name__)


class ModelOutput(NamedTuple):
    """embedding [N, F] (pooled backbone features), projection [N, D], stages: [N, C_i] each."""

    embedding: torch.Tensor
    projection: torch.Tensor
    stages: list[torch.Tensor]


def build_projector(in_dim: int, dims: list[int], batch_norm: bool = True) -> nn.Module:
    """VICReg's expander (facebookresearch/vicreg main_vicreg.py `Projector`): for every hidden
    width Linear-BN-ReLU (Linear-ReLU without BN), then a bias-free Linear to dims[-1].
    An empty `dims` gives the identity (projection = embedding)."""
    if not dims:
        return nn.Identity()
    sizes = [in_dim, *dims]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if batch_norm:
            layers.append(nn.BatchNorm1d(sizes[i + 1]))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


def pool_stage(feature: torch.Tensor, channels: int) -> torch.Tensor:
    """Global average pool of one intermediate feature to [N, C].

    Accepts NCHW (ConvNets, ViTs with output_fmt NCHW), NHWC, NLC (tokens; timm leaves out prefix
    tokens, so this is the mean over patch tokens) and already pooled [N, C]; `channels` (from
    timm's feature_info) tells NCHW from NHWC."""
    if feature.ndim == 2:
        return feature
    if feature.ndim == 3:  # N, L, C
        return feature.mean(dim=1)
    if feature.ndim == 4:
        if feature.shape[1] == channels:
            return feature.mean(dim=(2, 3))
        if feature.shape[-1] == channels:
            return feature.mean(dim=(1, 2))
    raise ValueError(f"cannot pool a stage feature of shape {tuple(feature.shape)} "
                     f"with {channels} channels")


class SSLModel(nn.Module):
    """timm backbone -> pooled embedding -> projector; optional pooled stage features."""

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Module,
        num_features: int,
        stages: list[int] | None = None,
        stage_channels: list[int] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.num_features = num_features
        self.stage_indices = list(stages or [])  # absolute indices, in the config's order
        self.stage_channels = list(stage_channels or [])
        self.channels_last = channels_last
        # timm returns intermediates in network order; remember where each configured stage is.
        self._take = sorted(self.stage_indices)
        self._order = [self._take.index(i) for i in self.stage_indices]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """x [N, 3, H, W] -> ModelOutput(embedding [N, F], projection [N, D], stages [N, C_i])."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._take:
            # One pass: the intermediates come out of the same forward as the final features.
            final, inter = self.backbone.forward_intermediates(x, indices=self._take)
            embedding = self.backbone.forward_head(final, pre_logits=True)
            stages = [pool_stage(inter[pos], self.stage_channels[k])
                      for k, pos in enumerate(self._order)]
        else:
            embedding = self.backbone(x)
            stages = []
        return ModelOutput(embedding, self.projector(embedding), stages)


def build_model(model_cfg: ModelConfig) -> SSLModel:
    """The SSL model for `model_cfg`: timm backbone (random init, no classifier) + projector."""
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
    model = SSLModel(backbone, projector, num_features, stages, channels,
                     channels_last=model_cfg.channels_last)
    if model_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    logger.info("model %s: %d features, projector %s, stages %s", arch, num_features,
                model_cfg.projector, stages)
    return model


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
