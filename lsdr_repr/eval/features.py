"""Images of a shard spec or ImageFolder as the centre view at the train input size, and their
embeddings by a frozen backbone.

Images are read with the finite eval reader (`data_pipelines.reader.make_eval_loader`; a plain
ImageFolder tree works too), resized to R, normalised with the run's mean/std.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets import ImageFolder

from data_pipelines.writer import is_image_folder
from lsdr_repr.errors import ConfigError, DataError, LsdrError

log = logging.getLogger(__name__)


@dataclass
class Features:
    x: torch.Tensor  # [N, F] float32, CPU
    y: torch.Tensor  # [N] int64 (-1: unlabelled)
    skipped: int = 0  # samples the reader could not decode

    def labelled(self, what: str) -> Features:
        """Self, or a `DataError` naming `what` if any sample lacks a label."""
        if len(self.y) == 0:
            raise DataError(f"{what}: no images were read")
        missing = int((self.y < 0).sum())
        if missing:
            raise DataError(f"{what}: {missing} of {len(self.y)} samples have no label (cls)")
        return self


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N -> the device; one line (`ConfigError`) for a GPU that is not
    there, instead of torch's "Found no NVIDIA driver" traceback at the first copy."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {str(device)!r}: expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count or count == 0:
            raise ConfigError(f"device {str(device)!r}: this machine has {count} CUDA device(s)")
    return resolved


def iter_images(
    data: str | Path,
    image_size: int,
    batch_size: int = 128,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(uint8 images [B,3,S,S], labels [B], skipped) of a shard spec or ImageFolder, in order;
    with `world_size` > 1 this rank's share (over all ranks, every image exactly once)."""
    if is_image_folder(data):
        yield from _iter_image_folder(Path(data), image_size, batch_size, num_workers, rank,
                                      world_size)
        return
    from data_pipelines.reader import make_eval_loader

    loader = make_eval_loader(str(data), image_size, batch_size, num_workers, rank, world_size)
    for batch in loader:
        yield batch.images, batch.labels, int(batch.skipped)


def _image_folder_transform(image_size: int) -> Callable:
    from torchvision import transforms

    # The eval reader's view: shorter side to S, centre crop S.
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR,
                          antialias=True),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


def _iter_image_folder(
    root: Path, image_size: int, batch_size: int, num_workers: int, rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    dataset = image_folder_dataset(root, image_size)
    if world_size > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate_readable)
    yield from readable_batches(loader, image_size)


def image_folder_dataset(root: str | Path, image_size: int) -> ReadableImageFolder:
    """An ImageFolder tree as (uint8 [3,S,S] or None for an unreadable image, label) items."""
    try:
        return ReadableImageFolder(str(root), transform=_image_folder_transform(image_size))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{root}: not a readable image folder ({exc})") from None


class ReadableImageFolder(ImageFolder):
    """torchvision's ImageFolder whose unreadable images (truncated, corrupt) come back as None,
    each logged with its path, so that the loader skips and counts them, as the shard reader
    does, instead of ending the evaluation with a worker's traceback."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, SyntaxError) as exc:  # what PIL raises for a bad file
            path = self.samples[index][0]
            log.warning("%s: unreadable image skipped (%s)", path, exc)
            return None, self.samples[index][1]


def collate_readable(
    items: list[tuple[torch.Tensor | None, int]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images [B,3,S,S], labels [B], skipped) of the readable items of one batch (B may be 0:
    `readable_batches` drops such batches)."""
    kept = [(image, label) for image, label in items if image is not None]
    images = [image for image, _ in kept]
    return (torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
            torch.tensor([label for _, label in kept], dtype=torch.long),
            len(items) - len(kept))


def readable_batches(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, int]], image_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """A `collate_readable` loader's batches without the empty ones: their skipped count goes
    with the next batch, and a count left at the end with an empty [0,3,S,S] batch."""
    pending = 0
    for images, labels, skipped in loader:
        pending += skipped
        if len(labels):
            yield images, labels, pending
            pending = 0
    if pending:
        yield (torch.empty(0, 3, image_size, image_size, dtype=torch.uint8),
               torch.empty(0, dtype=torch.long), pending)


def normalize_images(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [B,3,S,S] (or float in [0,1]) -> float [B,3,size,size] normalised with mean/std."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 128,
    num_workers: int = 2,
    max_samples: int | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Features:
    """Embeddings [N,F] and labels [N] of every image in `data` (centre view at image_size).

    The backbone is put in eval mode for the pass and given back in the mode it was in.
    `progress`: a bar on a terminal, a log line at most every 30 s elsewhere (images; the total
    when a manifest or folder tells it).
    `rank`/`world_size`: this rank's share only (`max_samples` then caps the share), which may
    be empty: the caller gathers the shares.
    """
    from lsdr_repr.tracking import progress_bar

    device = resolve_device(device)
    was_training = backbone.training
    backbone.eval()
    xs, ys, skipped, seen = [], [], 0, 0
    total = count_images(data) if progress else None
    if total is not None and max_samples is not None:
        total = min(total, max_samples)
    try:
        with progress_bar(total, f"features of {data}", "img", progress) as bar:
            for images, labels, skip in iter_images(data, image_size, batch_size, num_workers,
                                                    rank, world_size):
                skipped += skip
                if len(images) == 0:  # every image of this batch was unreadable
                    continue
                if max_samples is not None:
                    images, labels = images[:max_samples - seen], labels[:max_samples - seen]
                x = normalize_images(images.to(device, non_blocking=True), image_size, mean, std)
                xs.append(backbone(x).float().cpu())
                ys.append(labels.long().cpu())
                seen += len(labels)
                bar.update(len(labels))
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        backbone.train(was_training)
    if not xs:
        if world_size == 1:
            raise DataError(f"{data}: no images were read")
        return Features(torch.empty(0, int(backbone.num_features)),
                        torch.empty(0, dtype=torch.long), skipped)
    return Features(torch.cat(xs), torch.cat(ys), skipped)


def check_readable_data(data: str | Path, key: str = "") -> None:
    """Open what an evaluation of `data` reads first (an ImageFolder, or the first shard of
    each `::`-joined shard spec), so a set that cannot be read fails in one line (`LsdrError`,
    led by the config `key`) when a run starts, not at its first evaluation."""
    if is_image_folder(data):
        return
    from data_pipelines.sources import readable_source

    for part in str(data).split("::"):
        readable_source(part, key)


def count_images(data: str | Path) -> int | None:
    """How many images `data` holds, if that is cheap to know (a manifest, a local folder);
    None otherwise (the bar then counts without a total)."""
    try:
        if is_image_folder(data):
            return sum(1 for p in Path(data).rglob("*") if p.is_file())
        from data_pipelines.sources import resolve_source

        counts = [resolve_source(part).manifest for part in str(data).split("::")]
        return sum(m.num_samples for m in counts) if all(counts) else None
    except (OSError, LsdrError):
        return None


def load_images01(data: str | Path, image_size: int, max_images: int,
                  batch_size: int = 128, num_workers: int = 2) -> torch.Tensor:
    """The first `max_images` images of `data` as float [N,3,S,S] in [0,1]."""
    chunks, seen = [], 0
    for images, _, _ in iter_images(data, image_size, batch_size, num_workers):
        chunks.append(images[:max_images - seen])
        seen += len(chunks[-1])
        if seen >= max_images:
            break
    if seen == 0:
        raise DataError(f"{data}: no images were read")
    return torch.cat(chunks).float().div(255.0)
