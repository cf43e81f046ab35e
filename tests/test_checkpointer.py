"""lsdr_repr.checkpointer: the cadence and the last-good rule, on a fake writer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lsdr_repr.checkpointer import Checkpointer
from lsdr_repr.errors import CheckpointError


class FakeWriter:
    def __init__(self) -> None:
        self.saved: list[int] = []
        self.fail = False

    def save(self, state: dict) -> Path:
        if self.fail:
            raise CheckpointError("disk full")
        self.saved.append(state["step"])
        return Path(f"step-{state['step']:08d}.pt")


def save(c: Checkpointer, step: int, finite: bool = True, final: bool = False) -> Path | None:
    return c.save(step, lambda: {"step": step}, lambda: finite, final=final)


def test_cadence_every_interval_and_at_the_end():
    c = Checkpointer(FakeWriter(), every=4, total_steps=10)
    assert [s for s in range(1, 11) if c.due(s)] == [4, 8, 10]


def test_no_checkpoint_within_an_interval_of_a_nonfinite_step(caplog):
    writer = FakeWriter()
    c = Checkpointer(writer, every=4, total_steps=40, good=Path("step-00000004.pt"))
    assert save(c, 8) == Path("step-00000008.pt") and c.good == Path("step-00000008.pt")
    c.note_nonfinite(10)
    with caplog.at_level(logging.WARNING):
        assert save(c, 12) is None
    assert "non-finite at step 10" in caplog.text and "step-00000008.pt is kept" in caplog.text
    assert save(c, 16) == Path("step-00000016.pt")  # a whole interval finite again
    assert save(c, 20, finite=False) is None and c.good == Path("step-00000016.pt")
    assert writer.saved == [8, 16]


def test_a_failing_write_is_reported_once_and_raises_when_final(caplog):
    writer = FakeWriter()
    c = Checkpointer(writer, every=2, total_steps=8)
    writer.fail = True
    with caplog.at_level(logging.ERROR):
        assert save(c, 2) is None and save(c, 4) is None
    assert caplog.text.count("disk full") == 1
    with pytest.raises(CheckpointError, match="disk full"):
        save(c, 8, final=True)
    writer.fail = False
    assert save(c, 8, final=True) == Path("step-00000008.pt")
