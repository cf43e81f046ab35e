"""A training log record read a step late: its device values (loss terms, the embedding's
statistics) are copied to the host behind the step that computed them, and the record is
finished (RankMe on the host) once the next step is queued, so logging never drains the GPU.

Why: reading the values at once (`float(loss)`, an SVD on the device) blocks the host until the
GPU has finished the step; the GPU then idles while the host launches the next one. Every
`train.log_every` steps that cost a drained GPU (issue 18: about 84 ms of one 30-step window
for ViT-S/16 on an H100, 2.8 ms per step on average).

The host's part is an eigendecomposition of the M x M Gram matrix, M = min(per-rank batch, D),
on one thread (`objectives.one_intra_op_thread` says why): 2-10 ms at M = 256 on a loaded 2-core
machine. It runs while the next step's kernels are queued, whose GPU time grows with the batch
too.
"""

from __future__ import annotations

import torch

from lsdr_repr.host_copy import HostCopy
from lsdr_repr.objectives import diagnostics_from_statistics, embedding_statistics

__all__ = ["PendingMetrics"]


class PendingMetrics:
    """One step's log record: `host` values known now, `device` 0-d tensors and the diagnostics
    of `projection` [N, D] (`diag/...`, `embedding_diagnostics`) read later by `metrics()`."""

    def __init__(self, step: int, host: dict[str, float], device: dict[str, torch.Tensor],
                 projection: torch.Tensor) -> None:
        self.step = step
        self._host = dict(host)
        stats = embedding_statistics(projection)
        self._gram = HostCopy(stats.pop("gram"))
        scalars = {**device, **{f"diag/{k}": v for k, v in stats.items()}}
        self._keys = list(scalars)
        # one copy for all scalars: one event, one transfer
        packed = torch.stack([v.detach().reshape(()).to(torch.float64) for v in scalars.values()])
        self._scalars = HostCopy(packed)

    def ready(self) -> bool:
        """Whether `metrics` would not wait for the device."""
        return self._scalars.ready() and self._gram.ready()

    def metrics(self) -> dict[str, float]:
        """The whole record (waits for the step's device values if they are not in yet)."""
        values = dict(zip(self._keys, self._scalars.get().tolist(), strict=True))
        stats = {k.removeprefix("diag/"): values.pop(k)
                 for k in list(values) if k.startswith("diag/")}
        diag = diagnostics_from_statistics({**stats, "gram": self._gram.get()})
        return {**values, **self._host, **{f"diag/{k}": v for k, v in diag.items()}}
