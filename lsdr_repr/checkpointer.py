"""The trainer's checkpoint component: when to write one, and which one is good.

    checkpointer = Checkpointer(writer, every=cfg.train.checkpoint_every,
                                total_steps=cfg.train.total_steps, good=resumed_from)
    checkpointer.note_nonfinite(step)                # the loss was not finite at `step`
    if checkpointer.due(step):
        checkpointer.save(step, state_fn, weights_finite_fn, final=step == total_steps)
    checkpointer.good                                # the last good checkpoint (or None)

The "last good" rule (divergence guard): no checkpoint is written within `every` steps of a
non-finite step, nor of weights that are not finite, so the keep-last-k rotation never removes
the checkpoints from before a divergence (whose last finite steps may already have blown the
weights up while they stayed finite). `good` is the newest checkpoint written (or resumed from)
under that rule: the one a diverged run tells the user to resume from.

The files themselves (atomic writes, sha256, rotation, reading) are `lsdr_repr.checkpoint`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lsdr_repr.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpointer:
    """Cadence and the last-good rule around a checkpoint writer (a no-op twin off rank 0)."""

    def __init__(self, writer: Any, every: int, total_steps: int,
                 good: Path | None = None) -> None:
        self.writer, self.every, self.total_steps = writer, every, total_steps
        self.good = good
        self._last_nonfinite: int | None = None
        self._failing = False  # report a failing periodic save once, not at every interval

    def due(self, step: int) -> bool:
        """Every `every` steps and at the end of the run."""
        return step % self.every == 0 or step == self.total_steps

    def note_nonfinite(self, step: int) -> None:
        self._last_nonfinite = step

    def save(self, step: int, state: Callable[[], dict], weights_finite: Callable[[], bool], *,
             final: bool) -> Path | None:
        """Write `state()` (a collective: every rank calls this with the same verdicts) unless
        the rule forbids it; the path written, or None. A failing write raises on the `final`
        save (the run cannot end without it) and is logged once otherwise (the next interval
        retries)."""
        if self._last_nonfinite is not None and step - self._last_nonfinite < self.every:
            log.warning("step %d: checkpoint not written: the loss was non-finite at step %d, "
                        "less than train.checkpoint_every=%d steps ago; the last good checkpoint "
                        "%s is kept", step, self._last_nonfinite, self.every,
                        self.good or "(none yet)")
            return None
        if not weights_finite():
            log.error("step %d: weights are not finite; checkpoint not written, the last good "
                      "one is kept", step)
            return None
        try:
            path = self.writer.save(state())
        except CheckpointError as exc:
            if final:
                raise
            if not self._failing:
                log.error("%s (training continues; will retry at the next interval)", exc)
            self._failing = True
            return None
        self._failing = False
        self.good = path
        return path
