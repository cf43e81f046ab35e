"""A device tensor copied to the host without stopping the host: the copy is queued now and read
later, and reading it waits only for the work queued before the copy.

    flag = HostCopy(torch.isfinite(loss))   # queued behind the step that computes it
    ...                                     # the host queues the next step meanwhile
    bool(flag.get())                        # waits for that step only, not for the next one

Why not `tensor.item()` later: it queues its copy at the tail of the stream at the time of the
call, so once the next step is queued it waits for that step too, and the GPU then idles while
the host launches the one after (benchmarks/RESULTS.md, issue 18: ~1.2 ms per step for ViT-S/16
on an H100). `Trainer` reads its deferred finite flags and its logged metrics this way.
"""

from __future__ import annotations

import torch

__all__ = ["HostCopy"]


class HostCopy:
    """`tensor` (any device) copied to pinned host memory on the current stream of its device,
    with an event recorded after the copy; a CPU tensor is held as it is (nothing to wait for)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._ready: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(tensor.device))
        else:
            self._host = tensor.detach()

    def ready(self) -> bool:
        """Whether `get` would return at once (the work queued before the copy has finished)."""
        return self._ready is None or self._ready.query()

    def get(self) -> torch.Tensor:
        """The host copy, once the work queued before it has finished."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host
