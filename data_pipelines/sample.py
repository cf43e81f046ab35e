"""The embedded default data set: real handwritten digits shipped with scikit-learn, as shards.

    splits = write_sample_shards(Path("data/sample"))   # {"train": ..., "val": ..., "test": ...}

What the images are (so nobody mistakes them for more): scikit-learn's `load_digits()`, 1797
real 8x8 greyscale scans of handwritten digits (UCI optdigits, 10 classes, 4-bit intensities),
upscaled bicubically to `image_size` (64 by default). To give the lighting augmentations
something to act on, each image is coloured: a random ink colour over a random darker background
with a random linear brightness gradient; with `photos=True` the background is instead a random
crop of one of scikit-image's bundled photos, dimmed. Colours, gradients and backgrounds are
drawn per image from a seeded generator, independently of the label: they are nuisance factors,
the digit's shape is the only signal about its class. With `grey=True` the digits are left as
scanned, white ink on black in all three channels (the plain setting other benchmarks use).
Nothing is downloaded.

Split: stratified 60 / 20 / 20 (1078 / 359 / 360 images) with a fixed seed; each split is a shard
directory (`train-000000.tar` ... + manifest.json) written by the ordinary shard writer.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.manifest import MANIFEST_NAME, load_manifest_file
from data_pipelines.writer import write_shards
from lsdr_repr.errors import DataError
from lsdr_repr.files import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SAMPLE_VERSION = 1  # bump when the images change
SHARD_COUNT = 128  # samples per shard: several shards per split, so splitting by worker is real
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry")


def sample_source_label(image_size: int, photos: bool, seed: int, grey: bool = False) -> str:
    style = ", grey" if grey else ""
    return (f"sklearn.datasets.load_digits (lsdr sample v{SAMPLE_VERSION}, size {image_size}, "
            f"photos {photos}{style}, seed {seed})")


def write_sample_shards(out: Path, *, image_size: int = 64, photos: bool = False,
                        grey: bool = False, seed: int = 0) -> dict[str, Path]:
    """Write OUT/train, OUT/val, OUT/test shard dirs; skipped when OUT already holds them intact.

    Returns {split: shard directory}. Raises `DataError` if OUT cannot be written.
    """
    out = Path(out)
    if image_size < 8:
        raise DataError(f"sample image size must be at least 8, got {image_size}")
    if photos and grey:
        raise DataError("sample digits: photos and grey exclude each other")
    label = sample_source_label(image_size, photos, seed, grey)
    splits = {name: out / name for name in SPLITS}
    if all(_intact(path, label) for path in splits.values()):
        log.info("%s: sample shards already there", out)
        return splits
    images, labels = make_digit_images(image_size, photos=photos, grey=grey, seed=seed)
    parts = split_indices(labels, seed=seed)
    tmp = scratch_dir(out, ".sample-src-", "the sample shards")
    try:
        for name, index in parts.items():
            src = tmp / name
            for i in index:
                folder = src / str(labels[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(folder / f"digit-{i:04d}.png", compress_level=0)
            write_shards(src, splits[name], prefix=name, seed=seed, max_count=SHARD_COUNT,
                         workers=1, layout="imagefolder", source_label=f"{label} {name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits


def scratch_dir(out: Path, prefix: str, what: str) -> Path:
    """A fresh folder inside OUT for the source images of a write (the caller removes it), or a
    `DataError` naming OUT and `what` would have been written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    except OSError as exc:
        raise DataError(f"{out}: cannot write {what} ({exc})") from None


def _intact(path: Path, label: str) -> bool:
    """A split dir whose manifest was written from this exact recipe and whose shards match."""
    try:
        manifest = load_manifest_file(path / MANIFEST_NAME)
    except DataError:
        return False
    if not str(manifest.writer.get("options", {}).get("source", "")).startswith(label):
        return False
    for shard in manifest.shards:
        file = manifest.root / shard.name
        if not file.is_file() or file.stat().st_size != shard.bytes:
            return False
        if sha256_file(file) != shard.sha256:
            return False
    return True


def split_indices(labels: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Stratified 60/20/20 split of range(len(labels)), sorted within each split."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, rest = train_test_split(index, test_size=0.4, stratify=labels, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def make_digit_images(image_size: int = 64, *, photos: bool = False, grey: bool = False,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 RGB [N, S, S, 3] and their labels [N] (see module docstring)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if grey:
        return _grey_digits(digits.images, image_size), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    n, s = len(digits.images), image_size
    backgrounds = _photo_crops(n, s, rng) if photos else None
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    ramp = np.linspace(-0.5, 0.5, s, dtype=np.float32)
    for i, digit in enumerate(digits.images):
        alpha = np.clip(_ink(digit, s), 0.0, 1.0)[..., None]
        ink = _hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0), rng.uniform(0.75, 1.0))
        if backgrounds is not None:
            background = backgrounds[i] * rng.uniform(0.25, 0.5)
        else:
            tint = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.05, 0.35))
            background = np.broadcast_to(tint, (s, s, 3))
        # A linear brightness gradient in a random direction: "lighting" varies within an image.
        angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.5)
        gradient = 1.0 + strength * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
        image = (background * (1 - alpha) + ink * alpha) * gradient[..., None]
        out[i] = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return out, digits.target.astype(np.int64)


def _ink(scan: np.ndarray, size: int) -> np.ndarray:
    """One [8, 8] scan in 0..16 -> float [size, size] ink in about 0..1 (bicubic: rings a little)."""
    return np.asarray(Image.fromarray((scan / 16.0).astype(np.float32))
                      .resize((size, size), Image.Resampling.BICUBIC))


def _grey_digits(scans: np.ndarray, size: int) -> np.ndarray:
    """[N, 8, 8] scans in 0..16 -> uint8 [N, size, size, 3], the same in each channel."""
    out = np.empty((len(scans), size, size, 3), dtype=np.uint8)
    for i, scan in enumerate(scans):
        out[i] = np.clip(np.rint(_ink(scan, size) * 255.0), 0, 255).astype(np.uint8)[..., None]
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _photo_crops(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n random square crops of scikit-image's bundled photos, float [n, size, size, 3] in 0..1."""
    import skimage.data

    photos = [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]
    out = np.empty((n, size, size, 3), dtype=np.float32)
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).convert("RGB")
        out[i] = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR)) / 255.0
    return out
