"""lsdr_repr.staging.feed: the trainer's feed on a fake loader (the real one is exercised by the
training tests, exact resume included)."""

from __future__ import annotations

import torch
from torch import nn

from data_pipelines.reader import Batch
from lsdr_repr.staging.feed import Staging


class CountingLoader:
    """Batches whose images are filled with their index; the state is the next index."""

    def __init__(self, batch: int = 4) -> None:
        self.batch, self.next = batch, 0

    def __iter__(self):
        while True:
            i = self.next
            self.next += 1
            yield Batch(torch.full((self.batch, 3, 2, 2), i, dtype=torch.uint8),
                        torch.zeros(self.batch, dtype=torch.long), 1)

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]


class TwoViews(nn.Module):
    """Two views: the images as floats, and the same plus one uniform draw per sample."""

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        u = torch.rand(images.shape[0], 1, 1, 1, generator=generator)
        return [images.float(), images.float() + u]


def staging(micro_batches: int = 1, ahead: bool = True) -> Staging:
    gen = torch.Generator().manual_seed(0)
    return Staging(CountingLoader(), TwoViews(), gen, torch.device("cpu"),
                   micro_batches=micro_batches, ahead=ahead)


def test_views_of_each_micro_batch_and_the_skipped_count():
    s = staging(micro_batches=2)
    staged = next(s)
    chunks, skipped = staged.value
    assert skipped == 1 and len(chunks) == 2 and all(len(views) == 2 for views in chunks)
    assert [tuple(v.shape) for v in chunks[0]] == [(2, 3, 2, 2), (2, 3, 2, 2)]
    assert float(chunks[0][0].max()) == 0.0  # batch 0


def test_state_is_that_of_the_next_batch_a_step_takes_even_with_one_staged_ahead():
    s = staging()
    next(s)
    before = s.state_dict()
    assert before["data"] == {"next": 1}
    s.prefetch()  # batch 1 is fetched and augmented now: the loader and generator moved on
    assert s.state_dict()["data"] == {"next": 1}
    assert torch.equal(s.state_dict()["augment"], before["augment"])
    batch1 = next(s).value[0][0]

    # a fresh staging restored from that state stages the same batch 1, views included
    other = staging()
    other.load_state_dict(before)
    again = next(other).value[0][0]
    assert all(torch.equal(a, b) for a, b in zip(batch1, again, strict=True))


def test_reset_drops_the_staged_batch():
    s = staging()
    next(s)
    s.prefetch()
    s.reset()
    assert s.state_dict()["data"] == {"next": 2}  # batch 1 was fetched: a fresh iterator follows
