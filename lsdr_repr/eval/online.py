"""The trainer's validator: leave-one-out kNN on `data.val_shards` every `train.eval_every` steps.

    validator = online_validator(cfg)          # None when there is nothing to validate
    train(cfg, validator=validator)            # the trainer calls should_run(step), run(model, step)

Every rank embeds its share of the set (the eval reader splits it between ranks, every image
once), the shares are gathered, and every rank scores the whole set: the same numbers on every
rank, no rank idles at the next collective while rank 0 evaluates, and the trainer has no branch
on its rank. Each image is classified by its k nearest *other* images, so one labelled split is
enough.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsdr_repr import distributed as dist
from lsdr_repr.eval import probes
from lsdr_repr.eval.features import (
    Features,
    check_readable_data,
    extract_features,
    resolve_device,
)

log = logging.getLogger(__name__)


class OnlineKnn:
    """`should_run(step)` / `run(backbone, step) -> {"knn/top1": ..., "knn/top5": ...}`."""

    def __init__(self, data: str, every: int, image_size: int, mean: Sequence[float],
                 std: Sequence[float], *, num_workers: int = 2, k: int = 20,
                 temperature: float = 0.07) -> None:
        self.data, self.every = data, every
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.num_workers, self.k, self.temperature = num_workers, k, temperature

    def check_data(self) -> None:
        """Open the set (its first shard, or the folder), `LsdrError` naming data.val_shards."""
        check_readable_data(self.data, key="data.val_shards")

    def should_run(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, backbone: nn.Module, step: int) -> dict[str, float]:
        device = next(backbone.parameters()).device
        scores = online_knn(backbone, self.data, self.image_size, self.mean, self.std,
                            device=device, k=self.k, temperature=self.temperature,
                            num_workers=self.num_workers)
        log.info("step %d: online kNN %s", step,
                 ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return {f"knn/{k}": v for k, v in scores.items()}


def online_validator(cfg: Any) -> OnlineKnn | None:
    """The validator `cfg` asks for (`lsdr_repr.config.Config`), or None: no `train.eval_every`
    or no `data.val_shards`. The trainer opens the set at start-up (`check_data`): an
    unreadable one fails before training, not `train.eval_every` steps into it."""
    if not (cfg.train.eval_every and cfg.data.val_shards):
        return None
    return OnlineKnn(cfg.data.val_shards, cfg.train.eval_every, cfg.augment.crop_size,
                     cfg.augment.mean, cfg.augment.std,
                     num_workers=min(2, cfg.data.num_workers))


def online_knn(
    backbone: nn.Module,
    data: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: str | torch.device = "auto",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 128,
    num_workers: int = 2,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Leave-one-out kNN top-1/top-5 on one labelled set, the same on every rank (a collective
    under torch.distributed: every rank calls it). The backbone's mode is restored.
    `max_samples` caps each rank's share."""
    dev = resolve_device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = extract_features(backbone, data, image_size, mean, std, device=dev,
                             batch_size=batch_size, num_workers=num_workers,
                             max_samples=max_samples, rank=rank, world_size=world)
    x = dist.all_gather_cat(share.x.to(dev))
    y = dist.all_gather_cat(share.y.to(dev))
    Features(x, y).labelled(str(data))  # the same verdict on every rank: none waits for another
    return probes.knn_accuracy(x, y, x, y, k=k, temperature=temperature, exclude_self=True)
