"""Fine-tuning end to end with a new linear head: the optimiser and schedule factories of
pretraining (lsdr_repr.optim), a mild augmentation of Kornia's, top-1/top-5 on a held-out set."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.writer import is_image_folder
from lsdr_repr.backbone import TrainedBackbone
from lsdr_repr.errors import DataError
from lsdr_repr.eval import probes
from lsdr_repr.eval.cache import Evaluator
from lsdr_repr.eval.features import (
    collate_readable,
    count_images,
    image_folder_dataset,
    iter_images,
    normalize_images,
    readable_batches,
)

log = logging.getLogger(__name__)


def finetune_eval(
    ev: Evaluator,
    train: str,
    val: str,
    epochs: int = 3,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    optim_name: str = "adamw",
    seed: int = 0,
) -> dict[str, Any]:
    """Train the backbone with a new linear head end to end (optimiser and schedule factories of
    pretraining, lsdr_repr.optim) for `epochs` over `train`; top-1/top-5 on `val`."""
    import kornia.augmentation as K

    from lsdr_repr.config import OptimConfig
    from lsdr_repr.optim import build_optimizer, build_scheduler

    t = ev.trained
    torch.manual_seed(seed)
    num_train, num_classes = count_labelled(train, t.image_size, ev)
    model = copy.deepcopy(t.backbone)
    model.reset_classifier(num_classes)
    model.to(ev.device).train().requires_grad_(True)
    steps_per_epoch = max(1, math.ceil(num_train / ev.batch_size))
    total = epochs * steps_per_epoch
    optim_cfg = OptimConfig(name=optim_name, lr=lr, lr_scaling="linear", base_batch_size=256,
                            weight_decay=weight_decay, warmup_steps=max(1, total // 10),
                            min_lr_ratio=0.01)
    optimizer = build_optimizer(model, optim_cfg, ev.batch_size)
    scheduler = build_scheduler(optimizer, optim_cfg, total)
    # Mild augmentation (scale and flip): fine-tuning for a few epochs, not pretraining.
    augment = nn.Sequential(
        K.RandomResizedCrop((t.image_size, t.image_size), scale=(0.35, 1.0)),
        K.RandomHorizontalFlip(),
    ).to(ev.device)
    from lsdr_repr.tracking import progress_bar

    losses = []
    batches = _train_batches(train, t.image_size, ev.batch_size, ev.num_workers, seed)
    with progress_bar(total, f"fine-tuning {epochs} epochs", "step", ev.progress) as bar:
        _finetune_steps(model, augment, optimizer, scheduler, batches, total, t, ev, losses, bar)
    model.eval()
    scores, labels = [], []
    with torch.no_grad(), progress_bar(count_images(val) if ev.progress else None,
                                       f"fine-tuned top-1 on {val}", "img", ev.progress) as bar:
        for images, y, _ in iter_images(val, t.image_size, ev.batch_size, ev.num_workers):
            scores.append(model(normalize_images(images.to(ev.device), t.image_size, t.mean,
                                                 t.std)).float().cpu())
            labels.append(y)
            bar.update(len(y))
    y = torch.cat(labels)
    if (y < 0).any():
        raise DataError(f"{val}: {int((y < 0).sum())} samples have no label (cls)")
    acc = probes.topk_accuracy(torch.cat(scores), y)
    return {"metrics": {**acc, "final_loss": sum(losses[-10:]) / len(losses[-10:])},
            "details": {"train": str(train), "val": str(val), "epochs": epochs, "steps": total,
                        "lr": lr, "optimizer": optim_name, "weight_decay": weight_decay,
                        "num_classes": num_classes}}


def _finetune_steps(model: nn.Module, augment: nn.Module, optimizer: Any, scheduler: Any,
                    batches: Iterator, total: int, t: TrainedBackbone, ev: Evaluator,
                    losses: list[float], bar: Any) -> None:
    for step in range(total):
        images, labels = next(batches)
        x = augment(images.to(ev.device).float().div(255.0))
        x = normalize_images(x, t.image_size, t.mean, t.std)
        loss = F.cross_entropy(model(x), labels.to(ev.device), label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise DataError(f"fine-tuning diverged at step {step} (loss {losses[-1]}): lower --lr")
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        bar.update(1)


def count_labelled(data: str, image_size: int, ev: Evaluator) -> tuple[int, int]:
    """(number of samples, number of classes) of a labelled set."""
    if is_image_folder(data):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(data))
        return len(ds), len(ds.classes)
    from data_pipelines.sources import resolve_source

    manifest = resolve_source(str(data)).manifest
    if manifest is not None and manifest.num_classes:
        return manifest.num_samples, manifest.num_classes
    # No manifest, or integer labels without names: one pass over the labels (tiny images)
    # counts the samples, and the classes are what the data holds.
    log.info("%s: counting the labelled samples (no manifest with class names)", data)
    labels = torch.cat([y for _, y, _ in iter_images(data, 8, 512, ev.num_workers)])
    if (labels < 0).any():
        raise DataError(f"{data}: {int((labels < 0).sum())} samples have no label (cls)")
    return len(labels), int(labels.max()) + 1


def _train_batches(data: str, image_size: int, batch_size: int, num_workers: int,
                   seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (uint8 images, labels) of a labelled set."""
    if is_image_folder(data):
        ds = image_folder_dataset(data, image_size)
        gen = torch.Generator().manual_seed(seed)
        while True:
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                                 generator=gen, num_workers=num_workers,
                                                 drop_last=len(ds) > batch_size,
                                                 collate_fn=collate_readable)
            served = 0
            for images, labels, _ in readable_batches(loader, image_size):
                if len(labels):
                    served += 1
                    yield images, labels
            if not served:  # an epoch of nothing: every image is unreadable
                raise DataError(f"{data}: no readable images to fine-tune on")
    from data_pipelines.reader import make_train_loader
    from lsdr_repr.config import DataConfig

    data_cfg = DataConfig(train_shards=str(data), image_size=image_size, batch_size=batch_size,
                          num_workers=num_workers, prefetch_factor=2, resampled=True,
                          pin_memory=torch.cuda.is_available())
    for batch in make_train_loader(data_cfg, seed=seed, rank=0, world_size=1):
        if (batch.labels < 0).any():
            raise DataError(f"{data}: samples without a label (cls) cannot be fine-tuned on")
        yield batch.images, batch.labels
