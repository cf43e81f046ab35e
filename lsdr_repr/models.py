"""Backbone (any timm model) + projector MLP, with pooled intermediate stages for layer-wise terms.

    model = build_model(cfg.model)          # lsdr_repr.builders; SSLModel: .backbone, .projector
    out = model(images)                     # ModelOutput(embedding, projection, stages)

The state dict holds only "backbone.*" (the timm model's own keys, so the export is a plain timm
checkpoint) and "projector.*".
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch import nn

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
