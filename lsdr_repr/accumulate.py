"""Exact gradient accumulation by feature caching (open_clip's `accum_freq`), for batch statistics.

The variance, covariance and stage terms are statistics of the whole batch, so summing the
gradients of k micro-batch losses is not the gradient of the k-times larger batch. Instead:

1. pass 1, no grad: each micro-batch through the model; its projections and pooled stage
   features are cached (a few [n, D] tensors, no activations);
2. pass 2, for each micro-batch i: the same micro-batch again with grad (same random state as
   in pass 1, so drop-path masks match); its fresh features replace slice i of the cached
   full-batch tensors; the full-batch loss is computed and backpropagated. Only slice i carries
   grad, so backward i adds exactly d loss / d features_i through micro-batch i's graph, and
   the sum over i is the gradient of the full-batch loss.

Each pass-2 loss is the full-batch loss (up to summation order), the value logged is the last.
Under DDP the loss all-gathers the (spliced) full local batch as usual, so every rank still
sees the global batch; `no_sync` is held for all but the last micro-batch.

BatchNorm normalises each micro-batch with its own statistics (like DDP without SyncBN), so
with BatchNorm in training mode the features, and hence the loss, depend on the split: exact
only for batch-independent networks (LayerNorm / GroupNorm, BatchNorm in eval mode). Running
statistics are restored after pass 1, so each micro-batch updates them once, as without caching.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["CachedFeatures", "exact_accumulation_step", "splice"]


def splice(cached: Sequence[Tensor], fresh: Tensor, index: int) -> Tensor:
    """k x [n_j, ...] cached micro-batch features, fresh [n_index, ...] -> [sum_j n_j, ...]: the
    concatenation with slice `index` replaced by `fresh` (differentiable in `fresh` only)."""
    if not 0 <= index < len(cached):
        raise IndexError(f"micro-batch {index} of {len(cached)}")
    if fresh.shape != cached[index].shape:
        raise ValueError(f"fresh features {tuple(fresh.shape)} do not match the cached "
                         f"{tuple(cached[index].shape)} of micro-batch {index}")
    return torch.cat([*cached[:index], fresh, *cached[index + 1:]], dim=0)


class CachedFeatures(NamedTuple):
    """projections[v][j]: view v of micro-batch j, [n_j, D]; stages[v][s][j]: stage s, [n_j, C_s]."""

    projections: list[list[Tensor]]
    stages: list[list[list[Tensor]]]

    @classmethod
    def from_outputs(cls, per_chunk: Sequence[Sequence[Any]]) -> CachedFeatures:
        """per_chunk[j][v]: the ModelOutput of view v of micro-batch j (copied here: under CUDA
        graphs the next replay of the same graph overwrites its outputs)."""
        views = len(per_chunk[0])
        num_stages = len(per_chunk[0][0].stages)
        projections = [[chunk[v].projection.detach().clone() for chunk in per_chunk]
                       for v in range(views)]
        stages = [[[chunk[v].stages[s].detach().clone() for chunk in per_chunk]
                   for s in range(num_stages)] for v in range(views)]
        return cls(projections, stages)

    def with_fresh(self, fresh: Sequence[Any], index: int
                   ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """The full-batch loss inputs (V x [N, D], V x K x [N, C]) with micro-batch `index`
        taken from `fresh` (its ModelOutputs, one per view, with grad)."""
        projections = [splice(self.projections[v], out.projection, index)
                       for v, out in enumerate(fresh)]
        stages = [[splice(self.stages[v][s], stage, index) for s, stage in enumerate(out.stages)]
                  for v, out in enumerate(fresh)]
        return projections, stages


def _rng_state(device: torch.device) -> list[Tensor]:
    """The global generators' state: CPU, and the device's on CUDA."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return [torch.get_rng_state(), *cuda]


def _set_rng_state(state: list[Tensor], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def exact_accumulation_step(
    chunks: Sequence[list[Tensor]],
    *,
    forward: Callable[[list[Tensor]], list],
    forward_no_grad: Callable[[list[Tensor]], list],
    loss_fn: Callable[[list[Tensor], list[list[Tensor]]], Any],
    backward: Callable[[Tensor], None],
    sync_context: Callable[[bool], contextlib.AbstractContextManager],
    restore_buffers: Callable[[], None],
    device: torch.device,
) -> tuple[Tensor, Any, Tensor]:
    """One accumulated step over micro-batches (chunks[j]: the views of micro-batch j); returns
    (full-batch loss, detached, the last LossOutput, the full batch's first-view projections).

    forward: views -> ModelOutputs with grad (the DDP module); forward_no_grad: the same model
    for pass 1 (the module inside DDP: no reducer bookkeeping); backward(loss) runs the backward
    (loss scaling goes there); sync_context(last) is `no_sync` unless last; restore_buffers()
    puts the BatchNorm running statistics back as they were before pass 1.
    """
    # The pass-2 forward of a micro-batch draws the random numbers its pass-1 forward drew
    # (drop path, dropout): otherwise the cached features belong to a different network.
    states: list[list[Tensor]] = []
    with torch.no_grad():
        per_chunk = []
        for views in chunks:
            states.append(_rng_state(device))
            per_chunk.append(forward_no_grad(views))
    cache = CachedFeatures.from_outputs(per_chunk)
    del per_chunk
    restore_buffers()
    out = None
    for j, views in enumerate(chunks):
        last = j == len(chunks) - 1
        with sync_context(last):
            _set_rng_state(states[j], device)
            fresh = forward(views)
            projections, stages = cache.with_fresh(fresh, j)
            out = loss_fn(projections, stages)
            # Not divided by k: backward j adds the part of the full-batch gradient that flows
            # through micro-batch j; the k parts sum to the whole gradient.
            backward(out.total)
    assert out is not None
    z0 = torch.cat(cache.projections[0], dim=0)
    return out.total.detach(), out, z0
