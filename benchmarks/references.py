"""External reference rows of the quality benchmark: code that shares nothing with the product.

- `plain_vicreg`: the hundred-line recipe a user could write instead of using lsdr-repr: the
  reference VICReg loss (facebookresearch/vicreg main_vicreg.py: 25 / 25 / 1, std floor 1,
  eps 1e-4), a 3 x 1024 projector, Adam 1e-3, `kornia.augmentation` RandomResizedCrop
  (0.5-1) + RandomRotation(30) + ColorJitter(0.4, 0.4), on a timm backbone, its own loop over
  images held in memory.
- `supervised`: the same backbone trained on the labels (cross-entropy, random resized crop and
  flip): the ceiling a self-supervised backbone is measured against.
- `pixels`: the raw pixels as features (logistic regression on them is Fashion-MNIST's own
  benchmark row).

Each returns a module mapping normalised images [B,3,R,R] to features [B,F], evaluated by the
benchmark exactly like the product's backbones.
"""

from __future__ import annotations

import time

import kornia.augmentation as K
import timm
import torch
import torch.nn.functional as F
from torch import nn


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, n, (batch,), generator=generator)


# Steps whose views one kornia call draws, at 32 px (fewer for larger images: the chunk's
# views stay about as large as 16 steps' at 32 px). With one call per step the eager loop ran
# about 3 steps/s on a shared H200: at 32 px a call's pixel work is small beside its fixed work
# (parameter sampling in Python, dozens of small launches), which a 16-step call pays once:
# 22.5 steps/s alone on an H100 (benchmarks/RESULTS.md, thirteenth session). Every sample
# still gets its own crop, angle and jitter strengths; what a call shares is ColorJitter's
# order of its four operations (one permutation per call), and torch's random stream is drawn
# in another order than with one call per step, so earlier rows are reproduced in
# distribution, not bit for bit.
AUGMENT_CHUNK = 16


def _chunk_steps(size: int) -> int:
    return max(1, AUGMENT_CHUNK * 32 * 32 // (size * size))


def _chunks(n: int, batch: int, steps: int, generator: torch.Generator, chunk: int):
    """Lists of up to `chunk` consecutive steps' index tensors (the same draws as _batches)."""
    draws = _batches(n, batch, steps, generator)
    for start in range(0, steps, chunk):
        yield [next(draws) for _ in range(min(chunk, steps - start))]


def _normalize(x01: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x01.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x01.device).view(1, 3, 1, 1)
    return (x01 - m) / s


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """facebookresearch/vicreg's loss for one pair of projections [N,D] (coefficients 25/25/1)."""
    n, d = z1.shape
    repr_loss = F.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(dim=0), z2 - z2.mean(dim=0)
    std1, std2 = torch.sqrt(z1.var(dim=0) + 1e-4), torch.sqrt(z2.var(dim=0) + 1e-4)
    std_loss = (F.relu(1 - std1).mean() + F.relu(1 - std2).mean()) / 2
    cov1, cov2 = (z1.T @ z1) / (n - 1), (z2.T @ z2) / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool, device=z1.device)
    cov_loss = cov1[off].pow(2).sum() / d + cov2[off].pow(2).sum() / d
    return 25.0 * repr_loss + 25.0 * std_loss + 1.0 * cov_loss


def plain_vicreg(images: torch.Tensor, *, arch: str, steps: int, batch: int, seed: int,
                 mean, std, lr: float = 1e-3) -> nn.Module:
    """images uint8 [N,3,S,S] on the training device -> the trained backbone (eval mode)."""
    torch.manual_seed(seed)
    device = images.device
    size = images.shape[-1]
    backbone = timm.create_model(arch, pretrained=False, num_classes=0).to(device)
    dim = backbone.num_features
    projector = nn.Sequential(
        nn.Linear(dim, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
        nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(True), nn.Linear(1024, 1024),
    ).to(device)
    augment = nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.5, 1.0)), K.RandomRotation(30.0),
        K.ColorJitter(0.4, 0.4, p=1.0),
    ).to(device)
    params = list(backbone.parameters()) + list(projector.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    amp = device.type == "cuda"
    backbone.train()
    projector.train()
    for group in _chunks(len(images), batch, steps, gen, _chunk_steps(size)):
        x = images[torch.cat(group).to(device)].float() / 255.0
        with torch.no_grad():
            # one call draws independent parameters for both views of every image of the
            # chunk's steps (see AUGMENT_CHUNK)
            first, second = _normalize(augment(torch.cat([x, x])), mean, std).chunk(2)
        for v1, v2 in zip(first.split(batch), second.split(batch), strict=True):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z1, z2 = projector(backbone(v1)), projector(backbone(v2))
            loss = vicreg_loss(z1.float(), z2.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"plain VICReg diverged (loss {float(loss)})")
    return backbone.eval()


def supervised(images: torch.Tensor, labels: torch.Tensor, *, arch: str, steps: int,
               batch: int, seed: int, mean, std, lr: float = 1e-3) -> nn.Module:
    """A backbone trained on the labels (AdamW, cosine schedule, crop + flip): the ceiling."""
    torch.manual_seed(seed)
    device = images.device
    size = images.shape[-1]
    num_classes = int(labels.max()) + 1
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes).to(device)
    augment = nn.Sequential(K.RandomResizedCrop((size, size), scale=(0.5, 1.0)),
                            K.RandomHorizontalFlip()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    amp = device.type == "cuda"
    model.train()
    for index in _batches(len(images), batch, steps, gen):
        index = index.to(device)
        with torch.no_grad():
            x = _normalize(augment(images[index].float() / 255.0), mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), labels[index].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.reset_classifier(0)
    return model.eval()


class Pixels(nn.Module):
    """Raw (normalised) pixels as the feature vector: [B,3,R,R] -> [B, 3 R R]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def build_reference(kind: str, train_images: torch.Tensor, train_labels: torch.Tensor, *,
                    arch: str, steps: int, batch: int, seed: int, mean, std
                    ) -> tuple[nn.Module, float]:
    """(feature module, training seconds) of one reference row."""
    started = time.perf_counter()
    if kind == "pixels":
        return Pixels(), 0.0
    if kind == "plain-vicreg":
        model = plain_vicreg(train_images, arch=arch, steps=steps, batch=batch, seed=seed,
                             mean=mean, std=std)
    elif kind == "supervised":
        model = supervised(train_images, train_labels, arch=arch, steps=steps, batch=batch,
                           seed=seed, mean=mean, std=std)
    else:
        raise ValueError(f"unknown reference {kind!r}")
    return model, time.perf_counter() - started
