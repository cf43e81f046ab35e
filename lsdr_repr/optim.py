"""Optimiser and learning-rate schedule factories (timm's), shared by pretraining and fine-tuning."""

from __future__ import annotations

import logging
import math

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

from lsdr_repr.config import OptimConfig

log = logging.getLogger(__name__)


def scaled_lr(optim_cfg: OptimConfig, global_batch_size: int) -> float:
    """The base learning rate scaled from `base_batch_size` to the global batch size.

    Linear scaling as in SimCLR/VICReg (lr = base_lr * B / 256), or square-root scaling for
    adaptive optimisers at very large batches.
    """
    ratio = global_batch_size / optim_cfg.base_batch_size
    if optim_cfg.lr_scaling == "linear":
        return optim_cfg.lr * ratio
    if optim_cfg.lr_scaling == "sqrt":
        return optim_cfg.lr * math.sqrt(ratio)
    return optim_cfg.lr


def build_optimizer(
    model: torch.nn.Module, optim_cfg: OptimConfig, global_batch_size: int
) -> torch.optim.Optimizer:
    """LARS, AdamW or SGD from timm's factory.

    `filter_bias_and_bn` puts biases and normalisation weights (all 1-d parameters) in a group
    with weight decay 0; timm's LARS skips the trust-ratio adaptation for exactly those groups,
    which is the exclusion the VICReg and Barlow Twins papers use.
    """
    kwargs: dict = {}
    if optim_cfg.name == "lars":
        kwargs["trust_coeff"] = optim_cfg.lars_trust
    if optim_cfg.name == "adamw":
        kwargs["betas"] = tuple(optim_cfg.betas)
    kwargs.update(fast_step_kwargs(optim_cfg.name, model))
    return create_optimizer_v2(
        model,
        opt=optim_cfg.name,
        lr=scaled_lr(optim_cfg, global_batch_size),
        weight_decay=optim_cfg.weight_decay,
        momentum=optim_cfg.momentum,
        filter_bias_and_bn=True,
        **kwargs,
    )


def fast_step_kwargs(name: str, model: torch.nn.Module) -> dict:
    """The optimiser's fastest implementation for where the model lives: torch's fused AdamW /
    SGD kernels (one launch chain for all parameters instead of a loop; they also skip a step on
    the device, see lsdr_repr.guarded_step) on CUDA and CPU, timm's multi-tensor (foreach) LARS
    on CUDA. Other devices keep the defaults."""
    device = next((p.device.type for p in model.parameters()), "cpu")
    if name in ("adamw", "sgd") and device in ("cuda", "cpu"):
        return {"fused": True}
    if name == "lars" and device == "cuda":
        return {"foreach": True}
    return {}


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int
) -> CosineLRScheduler:
    """Linear warm-up then cosine decay, stepped per optimiser update (`step_update(step)`)."""
    base_lr = optimizer.param_groups[0]["lr"]
    if optim_cfg.warmup_steps >= total_steps > 0:
        log.warning("optim.warmup_steps=%d is not shorter than train.total_steps=%d: the "
                    "learning rate never reaches optim.lr (lower optim.warmup_steps for a short "
                    "run)", optim_cfg.warmup_steps, total_steps)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps),
        lr_min=base_lr * optim_cfg.min_lr_ratio,
        warmup_t=optim_cfg.warmup_steps,
        warmup_lr_init=base_lr * 1e-3 if optim_cfg.warmup_steps else 0.0,
        warmup_prefix=False,
        t_in_epochs=False,
    )
