"""Streaming shard reader: fixed-size uint8 batches with exact resume, for training and evaluation.

    loader = make_train_loader(cfg.data, seed=0, rank=rank, world_size=world_size)
    for batch in loader:                        # Batch(images uint8 [B,3,S,S], labels, skipped)
        images, labels = to_device(batch, device)   # lsdr_repr.staging.device
    state = loader.state_dict()                 # later: a fresh loader + load_state_dict(state)

Pipeline per (rank, dataloader worker), built from webdataset's pieces (`tarfile_samples` opens
local paths, `pipe:`, URLs and fsspec URLs through `gopen`, see `data_pipelines.sources`; its
`_shuffle` buffer; a counting handler in the place of open_clip's `log_and_continue`):

  shard list of the epoch -> chunks of SHARDS_PER_CHUNK shards -> tar members grouped by key
  -> sample shuffle buffer (seeded, reset at each chunk) -> decode + resize -> batch.

Which shards a (rank, worker) reads is a pure function of (seed, epoch, rank, world_size, worker,
num_workers) (`worker_shards`):
  - `resampled: true`: each worker epoch draws ceil(num_shards / (world_size * num_workers))
    shards with replacement, seeded by (seed, rank, worker, epoch): an endless stream, every
    reader independent, as webdataset's ResampledShards with a deterministic worker seed. A
    weighted mixture (`data.sources`) draws shard s with probability weights[s] (open_clip's
    ResampledShards2 with `random.choices`);
  - `resampled: false`: the shard list is shuffled with (seed, epoch) and split by rank and then
    by worker (webdataset's split_by_node / split_by_worker, with the rank passed in rather than
    read from the environment), so in one epoch every shard is read by exactly one worker. With
    fewer shards than readers the split falls back to samples: every reader of a shard keeps
    sample j of shard s iff (s + j) % readers == reader.
  - evaluation: the same split without shuffling and without resampling, read once.

Exact resume. A worker's position is (epoch, chunk, raw samples consumed in the chunk); the
stream from the start of a chunk is deterministic (its shards, its shuffle seed), so
`load_state_dict` replays the chunk's raw samples up to the position without decoding them
(tar reading and the shuffle buffer only; at most SHARDS_PER_CHUNK shards) and continues. With
the same shards, seed, rank, world_size, num_workers and batch size, the batches after a restore
equal those of an uninterrupted run; torchdata's StatefulDataLoader keeps the per-worker states
and which worker's batch comes next. Evaluation loaders are finite and restart from the start.

Corrupt data never stops a stream: read errors, members that are empty, missing or do not
decode are logged and counted; each Batch carries the count since the previous batch of its
worker (`skipped`, summed by the caller). A stream that finds nothing usable raises `DataError`
naming its shards.

Decode: `decode: cpu` decodes in the workers with PIL (libjpeg DCT scaling via `draft` for large
JPEGs), then crops the centre square and resizes it to S with torch's uint8 antialiased kernel
(`data_pipelines.images.fit_square`, about 4x faster than PIL's resize) and copies it into the
batch. `decode: gpu` has the workers ship the JPEG bytes (a `JpegList`) and the trainer's staging
(`lsdr_repr.staging.device.to_device`) decodes the batch with nvJPEG in the trainer process,
resizing the whole batch at once on the GPU. In that mode members must be JPEGs (the writer only
writes JPEGs); PNG or WebP members of other shards are skipped and counted.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import math
import os
import random
import signal
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from data_pipelines.images import (
    DEFAULT_MAX_PIXELS,
    BadImage,
    decode_to_square,
    jpeg_header_size,
    pixel_limit,
)
from data_pipelines.manifest import Manifest, is_remote, read_manifest, resolve_shards
from data_pipelines.sources import (
    Source,
    readable_source,
    register_openers,
)
from lsdr_repr.errors import ConfigError, DataError

__all__ = [
    "INTERPOLATION", "Batch", "JpegList", "ShardStream", "TrainData", "make_eval_loader",
    "make_train_loader", "read_manifest", "resolve_shards", "resolve_train_data", "worker_shards",
]

log = logging.getLogger(__name__)

INTERPOLATION = "bilinear"  # resize filter of both decode paths (recorded by exports)
SHARDS_PER_CHUNK = 4  # shuffle-buffer reset interval; bounds the replay on resume
EMPTY_EPOCHS_BEFORE_ERROR = 3  # consecutive worker epochs with no usable sample
LOGGED_SKIPS = 10  # per worker at WARNING; the rest at DEBUG (all are counted)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WANTED_EXTS = frozenset((*IMAGE_KEYS, "cls"))
STATE_VERSION = 1


class JpegList(list):
    """B 1-D uint8 tensors of JPEG bytes (`decode: gpu`), plus the side S to decode them to.

    A list subclass so DataLoader's conversion step (which copies mutable sequences with
    `copy.copy`) keeps `image_size`. Made by `pack`, the items are views of one buffer, and a
    JpegList crosses process boundaries as that one buffer plus the sizes: one shared-memory
    tensor per batch instead of one per image (at 256 images per batch the per-tensor transfer,
    under the GIL of the loader's pin-memory thread, cost about 90 ms per batch). Pinning is a
    no-op: nvJPEG reads the bytes on the host.
    """

    def __init__(self, items: Sequence[torch.Tensor] = (), image_size: int = 0) -> None:
        super().__init__(items)
        self.image_size = image_size
        self._packed: tuple[torch.Tensor, list[int], list[torch.Tensor]] | None = None

    @classmethod
    def pack(cls, arrays: Sequence[Any], image_size: int) -> JpegList:
        """JPEG byte arrays (numpy uint8 or 1-D tensors) -> JpegList of views of one buffer."""
        sizes = [len(a) for a in arrays]
        data = (torch.from_numpy(np.concatenate([np.asarray(a, np.uint8) for a in arrays]))
                if arrays else torch.empty(0, dtype=torch.uint8))
        return cls._from_buffer(data, sizes, image_size)

    @classmethod
    def _from_buffer(cls, data: torch.Tensor, sizes: list[int], image_size: int) -> JpegList:
        views = list(torch.split(data, sizes)) if sizes else []
        out = cls(views, image_size)
        out._packed = (data, sizes, views)
        return out

    def __reduce__(self) -> tuple:
        packed = self._packed
        if packed is None or len(packed[2]) != len(self) or any(
                a.data_ptr() != b.data_ptr() or a.numel() != b.numel()
                for a, b in zip(self, packed[2])):  # items replaced: pack them again
            packed = JpegList.pack(list(self), self.image_size)._packed
        data, sizes, _ = packed
        return (JpegList._from_buffer, (data, sizes, self.image_size))

    def pin_memory(self, device: Any = None) -> JpegList:
        return self


class Batch(NamedTuple):
    """One batch of one rank. `images` is uint8 [B,3,S,S] (CPU; pinned when CUDA is there), or
    with `decode: gpu` a `JpegList` of B 1-D uint8 JPEG tensors (`to_device` decodes them)."""

    images: torch.Tensor | JpegList
    labels: torch.Tensor  # int64 [B], -1 where a sample has no cls
    skipped: int  # corrupt samples / read errors this worker skipped since its previous batch


# ------------------------------------------------------------------------------- shard plans
def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    text = "/".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def worker_shards(
    num_shards: int, *, epoch: int, seed: int, rank: int, world_size: int, worker: int,
    num_workers: int, mode: str = "train", resampled: bool = True,
    weights: Sequence[float] | None = None,
) -> tuple[list[int], tuple[int, int] | None]:
    """Shard indices one (rank, worker) reads in `epoch`, in order, and its sample filter.

    The filter is None (keep every sample of those shards) or (n, p): keep sample j of shard s
    iff (s + j) % n == p (used when there are fewer shards than readers). `weights` (one per
    shard, resampled training only): draw shard s with probability weights[s] / sum(weights).
    """
    if num_shards < 1:
        return [], None
    readers = world_size * num_workers
    if mode == "train" and resampled:
        rng = random.Random(derive_seed(seed, "resampled", rank, worker, epoch))
        draws = max(1, math.ceil(num_shards / readers))
        if weights is not None:
            return rng.choices(range(num_shards), weights=weights, k=draws), None
        return [rng.randrange(num_shards) for _ in range(draws)], None
    order = list(range(num_shards))
    if mode == "train":
        random.Random(derive_seed(seed, "shard-order", epoch)).shuffle(order)
    if num_shards < world_size:
        return order, (readers, rank * num_workers + worker)
    mine = order[rank::world_size]
    if len(mine) < num_workers:
        return mine, (num_workers, worker)
    return mine[worker::num_workers], None


# ---------------------------------------------------------------------------------- the stream
class _Stall:
    """The clock of a stream that stopped giving samples: how long it has been dry, how many
    empty epochs, when to log, how long to back off (0.5 s doubling to 10 s)."""

    LOG_EVERY_S = 30.0

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._last_sample = time.monotonic()
        self._epochs = 0
        self._last_log = -math.inf

    def sample(self) -> None:
        self._last_sample = time.monotonic()
        self._epochs = 0

    def empty_epoch(self) -> tuple[float, int]:
        """-> (seconds since the last usable sample, empty epochs since it)."""
        self._epochs += 1
        return time.monotonic() - self._last_sample, self._epochs

    def timed_out(self) -> bool:
        return self.timeout_s > 0 and time.monotonic() - self._last_sample > self.timeout_s

    def should_log(self) -> bool:
        now = time.monotonic()
        if now - self._last_log < self.LOG_EVERY_S:
            return False
        self._last_log = now
        return True

    def backoff_s(self) -> float:
        wait = min(10.0, 0.5 * 2 ** (self._epochs - 1))
        if self.timeout_s > 0:  # never sleep past the time limit
            wait = min(wait, max(0.0, self.timeout_s - (time.monotonic() - self._last_sample)))
        return wait + 0.01


class ShardStream(IterableDataset):
    """Per-worker stream of `Batch`es of one rank; `state_dict`/`load_state_dict` for resume."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        image_size: int,
        batch_size: int,
        mode: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = True,
        shuffle_buffer: int = 2000,
        output: str = "decoded",
        name: str = "",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        shard_samples: Sequence[int | None] | None = None,
        weights: Sequence[float] | None = None,
        stall_timeout_s: float = 0.0,
    ) -> None:
        """`shard_samples`: how many samples each shard holds (the manifest's counts, aligned
        with `urls`; None where unknown), so a shard that breaks off counts the samples it lost
        rather than one per read error. `stall_timeout_s` (train mode, > 0): a stream that gave
        samples before and then none for this long (a source that stopped answering) raises
        `DataError` instead of retrying for ever."""
        super().__init__()
        if mode not in ("train", "eval") or output not in ("decoded", "jpeg"):
            raise ValueError(f"mode={mode!r}, output={output!r}")
        if not urls:
            raise DataError(f"{name or 'shards'}: no shards to read")
        if image_size < 1 or batch_size < 1:
            raise ConfigError(f"image_size and batch_size must be positive "
                              f"(got {image_size}, {batch_size})")
        self.urls = list(urls)
        if weights is not None and len(weights) != len(self.urls):
            raise ValueError(f"{len(weights)} weights for {len(self.urls)} shards")
        # per-shard draw weights of a mixture; its digest in the state guards exact resume
        self.weights = None if weights is None else [float(w) for w in weights]
        self._weights_id = None if weights is None else derive_seed(*self.weights)
        self.image_size, self.batch_size = image_size, batch_size
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.output, self.name, self.max_pixels = output, name or self.urls[0], max_pixels
        self._epoch = self._chunk = self._consumed = 0
        self._resume: dict[str, Any] | None = None
        self._pending_skips = self._skip_total = self._logged_skips = 0
        self._replaying = False
        self._url_set = set(self.urls)
        self.shard_samples = list(shard_samples) if shard_samples else [None] * len(self.urls)
        self._shard_errors: list[str] | None = None  # read errors of the shard being read
        self.stall_timeout_s = float(stall_timeout_s)
        self._last_error = ""  # the newest read error, for the stall message

    # -- state (called by StatefulDataLoader inside the worker, between batches)
    def state_dict(self) -> dict[str, Any]:
        info = get_worker_info()  # asked here too: a worker's first state predates its __iter__
        return {
            "version": STATE_VERSION, "epoch": self._epoch, "chunk": self._chunk,
            "consumed": self._consumed, "seed": self.seed, "rank": self.rank,
            "world_size": self.world_size, "num_workers": info.num_workers if info else 1,
            "num_shards": len(self.urls), "batch_size": self.batch_size,
            "resampled": self.resampled, "weights": self._weights_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"{self.name}: data-loader state of an unknown version: {state!r:.200}")
        self._resume = dict(state)

    def _start_position(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        state, self._resume = self._resume, None
        if state is None:
            return 0, 0, 0
        same = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_workers": num_workers, "num_shards": len(self.urls),
                "batch_size": self.batch_size, "resampled": self.resampled,
                "weights": self._weights_id}
        changed = {k: (state.get(k), v) for k, v in same.items() if state.get(k) != v}
        if changed:
            # Not the same stream any more: resume at the next epoch rather than mid-way.
            log.warning("%s: worker %d: the saved data state was made with %s; continuing at "
                        "epoch %d from its start (not an exact resume)", self.name, worker,
                        ", ".join(f"{k}={a} (now {b})" for k, (a, b) in changed.items()),
                        int(state.get("epoch", 0)) + 1)
            return int(state.get("epoch", 0)) + 1, 0, 0
        return int(state["epoch"]), int(state["chunk"]), int(state["consumed"])

    # -- iteration
    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        register_openers(self.urls)  # a worker process may not share the parent's gopen table
        epoch, chunk, consumed = self._start_position(worker, num_workers)
        self._pending_skips = 0
        images: list[Any] = []
        labels: list[int] = []
        held: Batch | None = None  # eval: one batch held back to carry the trailing skip count
        # A stream that never produced a sample fails after a few empty epochs; once it has,
        # empty epochs (a resampled draw of only corrupt shards) are just logged.
        ever_good = False
        empty: dict[str, Any] = {"epochs": 0, "raw": 0, "skips": 0, "shards": set()}
        stall = _Stall(self.stall_timeout_s)
        while True:
            chunks, sample_filter = self._epoch_chunks(epoch, worker, num_workers)
            good = raw_total = 0
            skips_before = self._skip_total
            for ci in range(chunk, len(chunks)):
                self._epoch, self._chunk, self._consumed = epoch, ci, 0
                raw = self._raw_samples(chunks[ci], sample_filter, epoch, ci, worker)
                if consumed:
                    # Exact resume: replay the chunk's raw samples, no decoding, then drop the
                    # skips seen while replaying (they were reported before the checkpoint).
                    self._replaying = True
                    self._consumed = sum(1 for _ in itertools.islice(raw, consumed))
                    self._replaying = False
                    self._pending_skips = 0
                    consumed = 0
                for sample in raw:
                    self._consumed += 1
                    raw_total += 1
                    item = self._decode(sample)
                    if item is None:
                        continue
                    good += 1
                    stall.sample()
                    images.append(item[0])
                    labels.append(item[1])
                    if len(images) == self.batch_size:
                        batch = self._make_batch(images, labels)
                        images, labels = [], []
                        if self.mode == "train":
                            yield batch
                        else:
                            if held is not None:
                                yield held
                            held = batch
            chunk = 0
            if self.mode == "eval":
                if images:
                    if held is not None:
                        yield held
                    held = self._make_batch(images, labels)
                if held is not None:
                    yield held._replace(skipped=held.skipped + self._pending_skips)
                elif self._pending_skips:
                    log.warning("%s: worker %d of rank %d: all %d samples it read were skipped",
                                self.name, worker, self.rank, self._pending_skips)
                return
            ever_good = ever_good or good > 0
            if good or ever_good:
                if not good:
                    self._wait_after_empty_epoch(stall, worker, num_workers, epoch)
            else:
                empty["epochs"] += 1
                empty["raw"] += raw_total
                empty["skips"] += self._skip_total - skips_before
                empty["shards"].update(s for c in chunks for s in c)
                if empty["epochs"] >= EMPTY_EPOCHS_BEFORE_ERROR:
                    raise DataError(self._empty_message(empty, worker, num_workers))
            epoch += 1

    def _wait_after_empty_epoch(self, stall: _Stall, worker: int, num_workers: int,
                                epoch: int) -> None:
        """An epoch without a usable sample after good ones (a source gone, or a resampled draw
        of only corrupt shards): back off before the next, log at most every 30 s, and give up
        with `DataError` once the stream has been dry for `stall_timeout_s`."""
        dry_s, epochs = stall.empty_epoch()
        where = f"rank {self.rank} worker {worker}/{num_workers}"
        last = f"; last error: {self._last_error}" if self._last_error else ""
        if stall.timed_out():
            raise DataError(
                f"{self.name}: no usable sample for {dry_s:.0f} s on {where} ({epochs} epochs "
                f"read nothing{last}): the source stopped answering? (data.stall_timeout_s="
                f"{self.stall_timeout_s:g}; the checkpoints written so far are intact)")
        if stall.should_log():
            log.warning("%s: %s: %d epoch(s) up to %d gave no usable sample in %.0f s%s; "
                        "retrying", self.name, where, epochs, epoch, dry_s, last)
        time.sleep(stall.backoff_s())

    def _epoch_chunks(self, epoch: int, worker: int, num_workers: int
                      ) -> tuple[list[list[int]], tuple[int, int] | None]:
        """This worker's shards of `epoch`, cut into shuffle chunks, and its sample filter."""
        shard_ids, sample_filter = worker_shards(
            len(self.urls), epoch=epoch, seed=self.seed, rank=self.rank,
            world_size=self.world_size, worker=worker, num_workers=num_workers,
            mode=self.mode, resampled=self.resampled, weights=self.weights)
        per_chunk = SHARDS_PER_CHUNK if self.mode == "train" else max(1, len(shard_ids))
        chunks = [shard_ids[i:i + per_chunk] for i in range(0, len(shard_ids), per_chunk)]
        return chunks, sample_filter

    def _empty_message(self, empty: dict[str, Any], worker: int, num_workers: int) -> str:
        shards = sorted(self.urls[i] for i in empty["shards"])
        listed = ", ".join(shards[:3]) + (f" (+{len(shards) - 3} more)" if len(shards) > 3 else "")
        if empty["raw"] == 0 and empty["skips"] == 0:
            why = "they hold no samples for this reader"
        else:
            why = f"{empty['raw']} samples read, {empty['skips']} skipped as corrupt"
        return (f"{self.name}: no usable sample in {empty['epochs']} epochs of rank {self.rank} "
                f"worker {worker}/{num_workers}, from {listed} ({why})")

    def _raw_samples(self, shard_ids: list[int], sample_filter: tuple[int, int] | None,
                     epoch: int, chunk: int, worker: int) -> Iterator[dict[str, Any]]:
        from webdataset.filters import _shuffle
        from webdataset.tariterators import tarfile_samples

        def samples() -> Iterator[dict[str, Any]]:
            for s in shard_ids:
                stream = tarfile_samples([{"url": self.urls[s]}], handler=self._on_read_error,
                                         select_files=_wanted_member)
                self._shard_errors = []
                read = mine = 0
                held = None  # one sample held back: the one a break cut short is dropped
                for j, sample in enumerate(stream):
                    if held is not None:
                        mine += 1
                        yield held
                    read, held = j + 1, None
                    if sample_filter is None or (s + j) % sample_filter[0] == sample_filter[1]:
                        held = sample
                errors, self._shard_errors = self._shard_errors, None
                if held is not None and errors and not any(k in held for k in IMAGE_KEYS):
                    read, held = read - 1, None  # its image was cut off: one of the lost
                if held is not None:
                    mine += 1
                    yield held
                if errors:
                    self._count_lost(s, errors, read, mine, sample_filter)

        it = samples()
        if self.mode == "train" and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, "samples", self.rank, worker, epoch, chunk))
            it = _shuffle(it, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
        return it

    # -- decoding and skipping
    def _on_read_error(self, exn: Exception) -> bool:
        """webdataset handler: note the error, carry on with the next member or shard. Counted
        once per shard when it ends (`_count_lost`): webdataset may report one break twice."""
        # webdataset appends (stream, url) to the exception's args; keep the message and the url
        args = getattr(exn, "args", ())
        # webdataset may add " @ <stream>" to the message of an error it re-raises
        text = f"{type(exn).__name__}: {str(args[0]).split(' @ ')[0] if args else ''}"
        self._last_error = text
        if self._shard_errors is not None:
            if text not in self._shard_errors:
                self._shard_errors.append(text)
            return True
        url = next((a for a in reversed(args) if isinstance(a, str) and a in self._url_set),
                   self.name)
        self._skip(f"read error: {text}", None, where=url)
        return True

    def _count_lost(self, shard: int, errors: list[str], read: int, mine: int,
                    sample_filter: tuple[int, int] | None) -> None:
        """One skip entry for a shard that broke off: the samples of this reader it lost."""
        expected = self.shard_samples[shard]
        if expected is None:
            lost, known = 1, False  # no manifest: at least the sample being read
        else:
            lost = _reader_share(shard, expected, sample_filter) - mine
            known = True
        how = f"{lost} sample(s) lost" if known else "samples after it lost (count unknown)"
        reason = f"read error after {read} sample(s): {'; '.join(errors)} ({how})"
        self._skip(reason, None, where=self.urls[shard], count=max(0, lost))

    def _skip(self, reason: str, sample: dict[str, Any] | None, where: str = "",
              count: int = 1) -> None:
        self._pending_skips += count
        self._skip_total += count
        self._logged_skips += not self._replaying
        if sample:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        where = where or self.name
        quiet = self._replaying or self._logged_skips > LOGGED_SKIPS  # replays were logged before
        level = logging.DEBUG if quiet else logging.WARNING
        log.log(level, "skipping %s: %s", where, reason)
        if self._logged_skips == LOGGED_SKIPS and not self._replaying:
            log.warning("%s: further skipped samples are logged at DEBUG level", self.name)

    def _decode(self, sample: dict[str, Any]) -> tuple[Any, int] | None:
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            keys = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
            self._skip(f"no image member (has {keys})", sample)
            return None
        label = -1
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode().strip())
            except (UnicodeDecodeError, ValueError):
                self._skip(f"cls is not an integer: {sample['cls'][:20]!r}", sample)
                return None
        data = sample[ext]
        try:
            with pixel_limit(self.max_pixels):
                if self.output == "jpeg":
                    jpeg_header_size(data)  # header check only: nvJPEG decodes the pixels
                    return np.frombuffer(data, dtype=np.uint8), label
                return decode_to_square(data, self.image_size), label
        except BadImage as exc:
            self._skip(f"{ext}: {exc}", sample)
            return None

    def _make_batch(self, images: list[Any], labels: list[int]) -> Batch:
        skipped, self._pending_skips = self._pending_skips, 0
        label_t = torch.tensor(labels, dtype=torch.int64)
        if self.output == "jpeg":
            jpegs = JpegList.pack(images, self.image_size)
            return Batch(jpegs, label_t, skipped)
        # one transposing copy per image into the batch: a third of the time of stacking
        # [B,S,S,3] and then transposing the whole batch, which misses the caches
        batch = torch.empty((len(images), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for slot, image in zip(batch, images, strict=True):
            slot.copy_(torch.from_numpy(image).permute(2, 0, 1))
        return Batch(batch, label_t, skipped)


def _reader_share(shard: int, num_samples: int, sample_filter: tuple[int, int] | None) -> int:
    """How many of a shard's `num_samples` samples one reader keeps under its sample filter."""
    if sample_filter is None:
        return num_samples
    n, p = sample_filter
    first = (p - shard) % n  # the smallest j with (shard + j) % n == p
    return 0 if first >= num_samples else (num_samples - 1 - first) // n + 1


def shard_sample_counts(urls: Sequence[str], manifest: Manifest | None) -> list[int | None]:
    """The manifest's sample count of each url (None for shards it does not list)."""
    if manifest is None:
        return [None] * len(urls)
    counts = {str((Path(manifest.root) / s.name).resolve()): s.num_samples
              for s in manifest.shards}
    return [None if is_remote(u) else counts.get(str(Path(u).resolve())) for u in urls]


def _wanted_member(name: str) -> bool:
    """Tar members the reader needs (the json metadata is left unread)."""
    return name.rpartition(".")[2].lower() in WANTED_EXTS


# ---------------------------------------------------------------------------------- loaders
class ShardLoader(StatefulDataLoader):
    """StatefulDataLoader of `Batch`es whose worker errors surface as one-line `DataError`s."""

    manifest: Manifest | None = None
    num_samples: int | None = None  # samples per epoch when manifests say so
    per_rank_batch: int = 0

    def __init__(self, dataset: ShardStream, *, empty_is_error: bool, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # torchdata 0.11 calls a deprecated torch API on every construction; not ours to fix
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            super().__init__(dataset, batch_size=None, **kwargs)
        self._empty_is_error = empty_is_error

    def __iter__(self) -> Iterator[Batch]:
        it = super().__iter__()
        _LIVE_WORKERS.update(getattr(it, "_workers", ()))
        return _CleanErrors(it, self.dataset, self._empty_is_error)


# Worker processes of every loader iterator. Workers ignore SIGTERM (see `_ignore_termination`),
# so multiprocessing's exit handler, which terminates daemonic children with SIGTERM and then
# joins them, would wait forever for an iterator that was not shut down before exit (torch skips
# its graceful shutdown once the interpreter is exiting). This exit handler, registered after
# multiprocessing's and so run before it, kills them: they hold no state worth saving.
_LIVE_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    workers = [w for w in list(_LIVE_WORKERS) if w.is_alive()]
    if not workers:
        return
    # torch's SIGCHLD handler raises when a worker dies by a signal; at exit that is expected.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(timeout=5)


class _CleanErrors:
    def __init__(self, it: Iterator[Batch], dataset: ShardStream, empty_is_error: bool) -> None:
        self._it, self._dataset, self._empty_is_error = it, dataset, empty_is_error
        self._batches = self._samples = self._skipped = 0

    def __iter__(self) -> _CleanErrors:
        return self

    def __next__(self) -> Batch:
        message = None
        try:
            batch = next(self._it)
        except StopIteration:
            if self._batches == 0 and self._empty_is_error:
                message = (f"{self._dataset.name}: no usable sample in the shards (all skipped "
                           f"or empty: see the warnings above)")
            else:
                if self._skipped:  # a finite (evaluation) pass: say what it left out
                    log.warning("%s: read %d samples, skipped %d (corrupt or lost to read "
                                "errors: see the warnings above)", self._dataset.name,
                                self._samples, self._skipped)
                raise
        except DataError as exc:
            message = _worker_message(str(exc))
            # Stop the workers now, while their queues are intact: left to the traceback's
            # garbage collection, torch's shutdown waits 5 s per worker for them to exit.
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if message is not None:
            raise DataError(message)
        self._batches += 1
        self._samples += len(batch.labels)
        self._skipped += batch.skipped
        return batch


def _worker_message(text: str) -> str:
    """The original one-line message of an error re-raised from a DataLoader worker."""
    if "Original Traceback" not in text:
        return text
    for line in reversed(text.strip().splitlines()):
        head, sep, message = line.partition("DataError: ")
        if sep and not head.startswith(" "):
            return message
    return text.strip().splitlines()[-1]


# SLURM signals every process of a job step (SIGTERM, and --signal's SIGUSR1/2 without B:), and
# Ctrl-C every process of the terminal's foreground group.
_MAIN_PROCESS_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def _ignore_termination(worker_id: int) -> None:
    """Workers ignore the signals that stop a run: a worker that died of one would crash the
    main process before it can write its checkpoint, and one that inherited the trainer's
    handler would report the signal again. The main process ends its workers itself."""
    for sig in _MAIN_PROCESS_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _loader(dataset: ShardStream, *, num_workers: int, prefetch_factor: int, pin_memory: bool,
            empty_is_error: bool) -> ShardLoader:
    if num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {"num_workers": num_workers,
                              "pin_memory": pin_memory and torch.cuda.is_available()}
    if num_workers > 0:
        kwargs["prefetch_factor"] = max(1, prefetch_factor)
        kwargs["worker_init_fn"] = _ignore_termination
    return ShardLoader(dataset, empty_is_error=empty_is_error, **kwargs)


class TrainData(NamedTuple):
    """The training sources, resolved and checked: what `make_train_loader` streams."""

    sources: tuple[Source, ...]
    shares: tuple[float, ...]  # each source's share of the shard draws (sums to 1)
    name: str  # for messages: the spec, or the mixture's specs with their weights

    @property
    def urls(self) -> list[str]:
        return [u for s in self.sources for u in s.urls]

    @property
    def shard_weights(self) -> list[float] | None:
        """Per-shard draw weights of a mixture (a source's share split over its shards)."""
        if len(self.sources) == 1:
            return None
        return [share / len(s.urls) for s, share in zip(self.sources, self.shares)
                for _ in s.urls]

    @property
    def manifest(self) -> Manifest | None:
        return self.sources[0].manifest if len(self.sources) == 1 else None

    @property
    def num_samples(self) -> int | None:
        """Samples in all sources when every one has a manifest (epoch accounting), else None."""
        if any(s.manifest is None for s in self.sources):
            return None
        return sum(s.manifest.num_samples for s in self.sources)


def resolve_train_data(data_cfg: Any) -> TrainData:
    """`data.train_shards` or the `data.sources` mixture, resolved; the first shard of every
    source is opened here, so a source that cannot be read fails at start-up in one line."""
    mixture = list(getattr(data_cfg, "sources", None) or [])
    if mixture and data_cfg.train_shards:
        raise ConfigError("set data.train_shards or data.sources, not both")
    specs = ([(str(m.shards), float(m.weight)) for m in mixture] if mixture
             else [(str(data_cfg.train_shards), 1.0)])
    for i, (spec, weight) in enumerate(specs):
        if mixture and not spec.strip():
            raise ConfigError(f"data.sources[{i}].shards is not set")
        if not weight > 0 or not math.isfinite(weight):
            raise ConfigError(f"data.sources[{i}].weight must be a positive number, got {weight}")
    if len(specs) > 1 and not data_cfg.resampled and any(w != 1.0 for _, w in specs):
        # Without resampling every shard is read once per epoch: there is nothing to weight.
        raise ConfigError("data.sources weights need data.resampled: true (without resampling "
                          "the sources are read in full, once per epoch)")
    keys = ([f"data.sources[{i}].shards" for i in range(len(specs))] if mixture
            else ["data.train_shards"])
    sources = tuple(readable_source(spec, key) for key, (spec, _) in zip(keys, specs))
    total = sum(w for _, w in specs)
    name = specs[0][0] if len(specs) == 1 else " + ".join(f"{s} (x{w:g})" for s, w in specs)
    return TrainData(sources, tuple(w / total for _, w in specs), name)


def make_train_loader(data_cfg: Any, *, seed: int, rank: int = 0, world_size: int = 1,
                      data: TrainData | None = None) -> ShardLoader:
    """Endless shuffled `Batch`es of `data_cfg.train_shards` (or the `data_cfg.sources`
    mixture) for one rank (a DataConfig); `data`: those already resolved.

    Per-rank batch = data_cfg.batch_size // world_size (`ConfigError` unless it divides).
    `loader.manifest` is the shards' manifest (None for specs without one and for mixtures);
    `loader.num_samples` the samples of all sources when each has a manifest, else None.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
    if data_cfg.batch_size % world_size:
        raise ConfigError(f"data.batch_size={data_cfg.batch_size} (the global batch) is not "
                          f"divisible by the world size {world_size}")
    per_rank = data_cfg.batch_size // world_size
    data = data if data is not None else resolve_train_data(data_cfg)
    output = "decoded"
    if data_cfg.decode == "gpu":
        if torch.cuda.is_available():
            output = "jpeg"
        else:
            log.warning("data.decode=gpu but CUDA is not available: decoding on the CPU workers")
    dataset = ShardStream(
        data.urls, image_size=data_cfg.image_size, batch_size=per_rank, mode="train", seed=seed,
        rank=rank, world_size=world_size, resampled=data_cfg.resampled,
        shuffle_buffer=data_cfg.shuffle_buffer, output=output, name=data.name,
        shard_samples=shard_sample_counts(data.urls, data.manifest), weights=data.shard_weights,
        stall_timeout_s=getattr(data_cfg, "stall_timeout_s", 0.0))
    loader = _loader(dataset, num_workers=data_cfg.num_workers,
                     prefetch_factor=data_cfg.prefetch_factor, pin_memory=data_cfg.pin_memory,
                     empty_is_error=True)
    loader.manifest, loader.per_rank_batch = data.manifest, per_rank
    loader.num_samples = data.num_samples
    return loader


def make_eval_loader(shards: str | os.PathLike, image_size: int, batch_size: int,
                     num_workers: int = 0, rank: int = 0, world_size: int = 1, *,
                     pin_memory: bool = True) -> ShardLoader:
    """Finite, ordered `Batch`es (batch_size per rank); over all ranks every sample exactly once.

    Shards are split between ranks, then workers (samples when there are fewer shards than
    readers); the last batch of each worker may be smaller. Decoding is on the CPU.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
    source = readable_source(str(shards))
    urls, manifest = list(source.urls), source.manifest
    dataset = ShardStream(urls, image_size=image_size, batch_size=batch_size, mode="eval",
                          rank=rank, world_size=world_size, resampled=False, shuffle_buffer=0,
                          name=str(shards), shard_samples=shard_sample_counts(urls, manifest))
    loader = _loader(dataset, num_workers=num_workers, prefetch_factor=2, pin_memory=pin_memory,
                     empty_is_error=world_size == 1)
    loader.manifest, loader.per_rank_batch = manifest, batch_size
    loader.num_samples = manifest.num_samples if manifest is not None else None
    return loader
