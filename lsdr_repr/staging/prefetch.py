"""Stage batch k+1 (host-to-device copy, GPU decode, augmentation) while step k runs.

    feed = Prefetcher(iter(loader), stage=prepare, device=device, snapshot=take_state)
    item = next(feed)            # Staged(value=prepare(batch), snapshot, wait_s) of batch k
    ...launch step k's forward and backward...
    feed.prefetch()              # fetch batch k+1 and launch its staging now, on a side stream
    ...synchronise on step k (the GPU is busy: the staging hides behind it)...
    state = feed.resume_snapshot()   # loader/RNG state as if batch k+1 had not been fetched

Why: the training step synchronises once (the finite-loss check before the optimiser step), so
any host work between two steps (waiting for the loader, the copy, launching the augmentation
kernels, nvJPEG's host-side parsing) leaves the GPU idle. `prefetch()` is called after the step's
kernels are queued and before that synchronisation: the host work of batch k+1 then runs while
the GPU is still busy with step k, and its GPU work runs on a side stream, concurrently with the
tail of step k's backward (and, for nvJPEG, on the hardware JPEG engines).

Exact resume: fetching a batch early moves the loader's position and the augmentation generator
one batch ahead of the step counter. `snapshot()` is taken before each fetch; a checkpoint written
after step k uses the snapshot taken before batch k+1 (`resume_snapshot`), so a resumed run reads
and augments exactly the batches an uninterrupted one would. A fetch that raises (a stop signal
while the loader stalls) leaves its snapshot as the one to checkpoint.

Stream safety (CUDA): the consumer's stream waits for the staging stream's event, and every
tensor in the staged value is marked as used by the consumer's stream (`record_stream`), so the
caching allocator does not hand its memory back to the staging stream while the step still reads
it. On other devices staging runs inline and the class only changes *when* it runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, NamedTuple, TypeVar

import torch

__all__ = ["Prefetcher", "Staged"]

T = TypeVar("T")
Wait = Callable[[], contextlib.AbstractContextManager]


class Staged(NamedTuple, Generic[T]):
    """One staged batch: `value` is what `stage` returned, `snapshot` what `snapshot()` returned
    just before the batch was fetched, `wait_s` the host time spent waiting for the loader."""

    value: T
    snapshot: Any
    wait_s: float


class Prefetcher(Generic[T]):
    """Iterator of `Staged` items, one batch staged ahead (see the module docstring).

    batches: the loader's iterator; stage(batch) -> value does the device work (any nesting of
    tuples, lists, dicts and tensors); snapshot() -> state of the data stream and random
    generators (None: not needed); ahead=False stages each batch only when it is asked for (the
    synchronous baseline, same results).
    """

    def __init__(
        self,
        batches: Iterator[Any],
        stage: Callable[[Any], T],
        device: torch.device,
        *,
        snapshot: Callable[[], Any] | None = None,
        ahead: bool = True,
    ) -> None:
        self._batches = batches
        self._stage = stage
        self._snapshot = snapshot
        self.device = device
        self.ahead = ahead
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None
        self._pending: tuple[T, Any, float, Any] | None = None  # value, snapshot, wait, event
        # The snapshot from before a fetch that raised (a stop signal during a stalled read, the
        # end of the stream): that batch was not consumed, and the loader's own state may be
        # half-updated by the interrupted call.
        self._unconsumed: Any = None
        self._exhausted = False

    def __iter__(self) -> Prefetcher[T]:
        return self

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    def prefetch(self, wait: Wait = contextlib.nullcontext) -> None:
        """Fetch the next batch and launch its staging now (no-op if one is already staged, or
        when `ahead` is off). Call it while the device is busy. `wait()` is entered around the
        loader's `next()` alone (`PreemptionFlag.waiting`: a stop signal may cut it short)."""
        if self.ahead and self._pending is None and not self._exhausted:
            try:
                self._pending = self._fetch_and_stage(wait)
            except StopIteration:  # reported by the next __next__, not by this call
                self._exhausted = True

    def __next__(self) -> Staged[T]:
        return self.take()

    def take(self, wait: Wait = contextlib.nullcontext) -> Staged[T]:
        """The next staged batch (`next(feed)`); `wait` as in `prefetch`, for a batch that was
        not staged ahead."""
        pending, self._pending = self._pending, None
        if pending is None:
            if self._exhausted:
                raise StopIteration
            pending = self._fetch_and_stage(wait)
        value, snap, wait_s, event = pending
        if self._cuda:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(event)
            _record_stream(value, consumer)
        return Staged(value, snap, wait_s)

    def resume_snapshot(self) -> Any:
        """The snapshot to checkpoint now: taken before the staged batch if one is waiting
        (its fetch must not count as consumed), else a fresh one."""
        if self._pending is not None:
            return self._pending[1]
        if self._unconsumed is not None:
            return self._unconsumed
        return self._snapshot() if self._snapshot is not None else None

    def _fetch_and_stage(self, wait: Wait) -> tuple[T, Any, float, Any]:
        snap = self._snapshot() if self._snapshot is not None else None
        try:
            staged = self._fetch_and_stage_from(snap, wait)
        except BaseException:
            self._unconsumed = snap
            raise
        self._unconsumed = None
        return staged

    def _fetch_and_stage_from(self, snap: Any, wait: Wait) -> tuple[T, Any, float, Any]:
        start = time.perf_counter()
        # Only the loader's own wait may be cut short: never the staging below (a CUDA stream
        # context or no_grad left half-entered would outlive the exception).
        with wait():
            batch = next(self._batches)  # StopIteration ends the iteration as usual
        wait_s = time.perf_counter() - start
        if not self._cuda:
            return self._stage(batch), snap, wait_s, None
        assert self._stream is not None
        # No wait on the consumer's stream: staging reads only the new batch and constants, and
        # the caching allocator gives the staging stream only memory freed on that stream.
        with torch.cuda.stream(self._stream):
            value = self._stage(batch)
            event = torch.cuda.Event()
            event.record(self._stream)
        return value, snap, wait_s, event


def _record_stream(value: Any, stream: torch.cuda.Stream) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_cuda:
            value.record_stream(stream)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _record_stream(v, stream)
    elif isinstance(value, dict):
        for v in value.values():
            _record_stream(v, stream)
