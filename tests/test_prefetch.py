"""Prefetcher: order, staging ahead, and the resume snapshot taken before a staged batch."""

from __future__ import annotations

import pytest
import torch

from lsdr_repr.preemption import StopWhileWaiting
from lsdr_repr.staging.prefetch import Prefetcher


class Source:
    """Batches 0, 1, 2, ...; `position` is how many were fetched (the loader's state)."""

    def __init__(self, n: int) -> None:
        self.n, self.position = n, 0

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.position >= self.n:
            raise StopIteration
        self.position += 1
        return self.position - 1


def staged_values(ahead: bool) -> tuple[list[int], list[int]]:
    src = Source(5)
    feed = Prefetcher(src, lambda b: torch.tensor([b * 10]), torch.device("cpu"),
                      snapshot=lambda: src.position, ahead=ahead)
    values, snaps = [], []
    for item in feed:
        values.append(int(item.value))
        snaps.append(item.snapshot)
        feed.prefetch()  # where the trainer calls it: after the step's kernels are queued
    return values, snaps


def test_staging_ahead_yields_the_same_batches_in_order():
    assert staged_values(ahead=True) == staged_values(ahead=False) == (
        [0, 10, 20, 30, 40], [0, 1, 2, 3, 4])


def test_resume_snapshot_is_taken_before_the_staged_batch():
    src = Source(10)
    feed = Prefetcher(src, lambda b: b, torch.device("cpu"), snapshot=lambda: src.position)
    assert next(feed).value == 0
    assert feed.resume_snapshot() == 1  # nothing staged: the live state
    feed.prefetch()
    assert src.position == 2 and feed.has_pending
    assert feed.resume_snapshot() == 1  # batch 1 was fetched but not consumed
    feed.prefetch()  # already staged: no second fetch
    assert src.position == 2
    item = next(feed)
    assert (item.value, item.snapshot) == (1, 1)
    assert feed.resume_snapshot() == 2


class StallingSource(Source):
    """A `Source` whose second fetch moves the position, then is cut short by a stop signal
    (what `PreemptionFlag.waiting()` raises in a loader blocked on a stalled source)."""

    def __next__(self) -> int:
        batch = super().__next__()
        if batch == 1:
            raise StopWhileWaiting
        return batch


def test_a_fetch_cut_short_leaves_its_snapshot_to_resume_from():
    """The loader's state may already have moved when its wait is cut short: the checkpoint
    takes the snapshot from before that fetch (nothing of the batch was consumed), and a later
    fetch that succeeds clears it."""
    src = StallingSource(10)
    feed = Prefetcher(src, lambda b: b, torch.device("cpu"), snapshot=lambda: src.position)
    assert next(feed).value == 0
    with pytest.raises(StopWhileWaiting):
        feed.prefetch()
    assert src.position == 2 and not feed.has_pending
    assert feed.resume_snapshot() == 1  # from before the interrupted fetch, not the live 2
    assert next(feed).value == 2
    assert feed.resume_snapshot() == 3


def test_without_ahead_prefetch_does_nothing():
    src = Source(3)
    feed = Prefetcher(src, lambda b: b, torch.device("cpu"), snapshot=lambda: src.position,
                      ahead=False)
    next(feed)
    feed.prefetch()
    assert src.position == 1 and not feed.has_pending


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_staging_runs_on_a_side_stream_and_is_safe_to_consume():
    device = torch.device("cuda")
    streams = []

    def stage(b: int) -> list[torch.Tensor]:
        streams.append(torch.cuda.current_stream(device))
        return [torch.full((1024,), float(b), device=device)]

    feed = Prefetcher(iter(range(3)), stage, device)
    first = next(feed).value[0]
    feed.prefetch()
    assert streams[-1] != torch.cuda.current_stream(device)
    assert float(first.sum()) == 0.0
    assert float(next(feed).value[0][0]) == 1.0
