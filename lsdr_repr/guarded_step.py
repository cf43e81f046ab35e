"""The optimiser step after the backward: skipped when the loss is non-finite, fp16 loss scaling,
and (where the optimiser can skip on the device) no host synchronisation.

    stepper = GuardedStep(optimizer, model, clip_grad=None, scaler=make_scaler("fp16", device),
                          buffers=bn_buffers, world_size=1)
    stepper.backward(loss)          # scaled when fp16
    applied = stepper.step(loss)    # bool, or a PendingFlag when deferred: bool(applied) later

Why deferred: reading the finite flag (`bool(isfinite(loss))`) blocks the host until the GPU has
finished the backward; the GPU then idles while the host launches the optimiser and the next
forward. Torch's fused optimisers (AdamW/Adam/SGD with `fused=True`, `_step_supports_amp_scaling`)
take a `found_inf` tensor and skip the whole update on the device (weights, moments, step
counts), so the flag can stay there and the host reads it a step later (`Trainer` resolves it
with a lag, and at every log, checkpoint and exit boundary before it acts on it). Other
optimisers (timm's LARS) keep the synchronous check.

Reading a flag later must not wait for the work queued after it: a `PendingFlag` copies the flag
to the host as soon as it is computed (`lsdr_repr.host_copy.HostCopy`), so reading step k-1's
flag once step k is queued waits for step k-1 only.

fp16: a `torch.amp.GradScaler` scales the loss; a step whose scaled gradients overflow is skipped
by the scaler and its scale lowered (its normal calibration, not a divergence: the loss was
finite). A non-finite loss poisons one gradient with NaN before the scaler's inf check, so the
scaler skips that step too and both rules agree on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from lsdr_repr import distributed as dist
from lsdr_repr.host_copy import HostCopy

__all__ = ["GuardedStep", "PendingFlag", "autocast_dtype", "make_scaler", "select_"]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    """train.precision -> the autocast dtype: auto is bf16 on CUDA, fp32 elsewhere."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def make_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast (bf16 and fp32 have fp32's exponent range: none needed)."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def select_(flag: torch.Tensor, targets: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    """targets[i] = targets[i] if flag else backups[i], in place, on the device (flag: 0-d bool).

    torch.where rather than arithmetic: a NaN target times 0 is still NaN."""
    for t, b in zip(targets, backups):
        t.copy_(torch.where(flag, t, b))


class PendingFlag:
    """A 0-d bool computed on the device, read later with `bool(flag)`: the read waits for the
    kernels queued before the flag, not for those queued after it (`HostCopy`)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self._copy = HostCopy(flag)

    def __bool__(self) -> bool:
        return bool(self._copy.get())


def _supports_device_skip(optimizer: torch.optim.Optimizer) -> bool:
    # Set by torch's fused optimisers: step() honours `found_inf` / `grad_scale` on the device.
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class GuardedStep:
    """Backward (scaled for fp16) and the optimiser step, skipped when the loss is non-finite on
    any rank; BatchNorm running statistics restored from `backups` on a skipped step."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *,
                 clip_grad: float | None, scaler: torch.amp.GradScaler | None,
                 buffers: list[torch.Tensor], backups: list[torch.Tensor],
                 world_size: int, defer: bool = True) -> None:
        self.optimizer, self.model, self.clip_grad, self.scaler = optimizer, model, clip_grad, scaler
        self.buffers, self.backups, self.world_size = buffers, backups, world_size
        self.deferred = defer and _supports_device_skip(optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _finite(self, loss: torch.Tensor) -> torch.Tensor:
        # every rank skips the same steps
        return dist.all_true_on_device(torch.isfinite(loss))

    def step(self, loss: torch.Tensor) -> bool | PendingFlag:
        """After the backward of `loss` (detached, the step's total): the optimiser step unless it
        is non-finite. Returns whether it was applied: a bool (synchronous), or a `PendingFlag`
        (deferred: `bool()` it later)."""
        finite = self._finite(loss)
        if self.deferred:
            if self.buffers:
                select_(finite, self.buffers, self.backups)
            applied: bool | PendingFlag = PendingFlag(finite)
        else:
            applied = bool(finite)  # the host waits for the backward here
            if not applied and self.buffers:
                torch._foreach_copy_(self.buffers, self.backups)
        if self.scaler is not None:
            self._scaled_step(finite)
        elif self.deferred:
            self._clip()
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif applied:
            self._clip()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def _scaled_step(self, finite: torch.Tensor) -> None:
        grad = next((p.grad for g in self.optimizer.param_groups for p in g["params"]
                     if p.grad is not None), None)
        if grad is not None:
            # NaN into one gradient when the loss is not finite (0 otherwise): the scaler's own
            # inf check then skips the step, without a host sync for fused optimisers.
            grad.add_(torch.where(finite, 0.0, float("nan")).to(grad.dtype))
        self.scaler.unscale_(self.optimizer)
        self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _clip(self) -> None:
        if self.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
