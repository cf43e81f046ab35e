"""The trainer's feed: loader batches -> views of each micro-batch on the device, one batch ahead.

    staging = Staging(loader, augment, generator, device, micro_batches=2)
    staged = next(staging)          # Staged(value=(views of each micro-batch, skipped), ...)
    ...queue step k...
    staging.prefetch()              # batch k+1: copy (or GPU decode), augmentation, side stream
    state = staging.state_dict()    # loader and augmentation RNG as of the next batch a step takes

It owns everything between the loader and the model: the host-to-device copy or GPU decode
(`staging.device`), the augmentation with its per-rank generator, the prefetch (`staging.
prefetch`), and the state that makes resume exact. The trainer asks it for the next batch and
for its state; nothing reaches back into the trainer.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from torch import nn

from lsdr_repr.staging.device import to_device
from lsdr_repr.staging.prefetch import Prefetcher, Staged, Wait

Views = list[list[torch.Tensor]]  # the views of each micro-batch


class Staging:
    """Batches of `loader` staged into augmented views on `device` (see the module docstring).

    augment(images, generator=...) -> views; `generator` is the augmentation's random generator
    (per rank, checkpointed); micro_batches: optim.accumulation_steps (the batch is split before
    it is augmented); ahead=False stages each batch only when it is asked for (the synchronous
    baseline of the benchmarks: same results).
    """

    def __init__(self, loader: Any, augment: nn.Module, generator: torch.Generator,
                 device: torch.device, *, micro_batches: int = 1, ahead: bool = True) -> None:
        self.loader, self.augment, self.generator = loader, augment, generator
        self.device, self.micro_batches, self.ahead = device, micro_batches, ahead
        self._feed: Prefetcher[tuple[Views, int]] | None = None
        # Entered around the loader's wait for a batch staged ahead (`prefetch`) and for one
        # fetched when asked for (`next`): the trainer's `PreemptionFlag.waiting`, so a stop
        # signal cuts a stalled wait short (`StopWhileWaiting`); nothing by default.
        self.wait_ahead: Wait = contextlib.nullcontext
        self.wait_on_demand: Wait = contextlib.nullcontext

    # ------------------------------------------------------------------------- the batches
    def __iter__(self) -> Staging:
        return self

    def __next__(self) -> Staged[tuple[Views, int]]:
        """The next staged batch: ((views of each micro-batch, skipped samples), snapshot,
        host seconds waited for the loader)."""
        if self._feed is None:
            # iter() draws the loader's base seed from the global generator (unused: the
            # reader seeds itself), which a resumed run would then draw at another point of
            # the stream than an uninterrupted one: drop-path masks would differ.
            rng = torch.get_rng_state()
            batches = iter(self.loader)
            torch.set_rng_state(rng)
            self._feed = Prefetcher(batches, self.stage, self.device, snapshot=self._snapshot)
        self._feed.ahead = self.ahead
        return self._feed.take(self.wait_on_demand)

    def prefetch(self) -> None:
        """Fetch and stage the next batch now (call it once the step's kernels are queued)."""
        if self._feed is not None:
            self._feed.prefetch(self.wait_ahead)

    def reset(self) -> None:
        """Drop the staged batch and the loader's iterator (the run ended, or the loader or the
        augmentation changed): the next batch starts a fresh iterator."""
        self._feed = None

    def stage(self, batch: Any) -> tuple[Views, int]:
        """A loader `Batch` -> (views of each micro-batch, skipped count): the device copy (or
        GPU decode) and the augmentation, run by the prefetcher on its side stream."""
        images, _ = to_device(batch, self.device)
        return self.views(images), int(batch.skipped)

    def views(self, images: torch.Tensor) -> Views:
        """uint8 images [B,3,S,S] on the device -> the views of each micro-batch."""
        with torch.no_grad():
            return [self.augment(chunk, generator=self.generator)
                    for chunk in images.chunk(self.micro_batches)]

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """{"data": loader state, "augment": generator state} as of the next batch a step will
        take: with a batch staged ahead, the state from before it was fetched."""
        if self._feed is not None:
            return self._feed.resume_snapshot()
        return self._snapshot()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["augment"].to(self.generator.get_state().device))
        self.loader.load_state_dict(state["data"])
        self.reset()

    def _snapshot(self) -> dict[str, Any]:
        return {"data": copy.deepcopy(self.loader.state_dict()),
                "augment": self.generator.get_state().cpu()}
