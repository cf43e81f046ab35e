"""Fashion-MNIST as labelled shards: the real-image benchmark of `benchmarks/quality.py`.

    splits = write_fashion_mnist_shards(Path("data/fashion-mnist"))  # {"train", "val", "test"}

The images come from Debian's `dataset-fashion-mnist` package (`apt-get install
dataset-fashion-mnist`): four gzipped idx files under `/usr/share/datasets/fashion-mnist/`,
60,000 train and 10,000 test 28x28 grey product photos in 10 classes. Each image is padded with
black to 32x32 (the background of the photos is black) and stored as RGB through the ordinary
shard writer (an ImageFolder of PNGs -> JPEG shards at `quality`). Split: val is a stratified,
seeded carve-out of `val_size` images from the official train set, train the rest; test is the
official 10k, read once per reported configuration. `limit` keeps the first N images of each
split (stratified), for CPU tests.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.sample import _intact, scratch_dir
from data_pipelines.writer import write_shards
from lsdr_repr.errors import DataError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
VERSION = 1  # bump when the written images change
SHARD_COUNT = 2048


def read_idx(path: Path) -> np.ndarray:
    """A (gzipped) idx file -> uint8 array: [N,28,28] for images, [N] for labels."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the idx file ({exc})") from None
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: {body.size} bytes of data for dimensions {dims}")
    return body.reshape(dims)


def load_fashion_mnist(root: Path = DEFAULT_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images [60000,28,28], labels), "test": (images [10000,28,28], labels)}."""
    root = Path(root)
    missing = [n for pair in FILES.values() for n in pair if not (root / n).is_file()]
    if missing:
        raise DataError(f"{root / missing[0]}: Fashion-MNIST not found "
                        "(apt-get install dataset-fashion-mnist, or pass its folder)")
    return {split: (read_idx(root / img), read_idx(root / lab))
            for split, (img, lab) in FILES.items()}


def split_official(labels: np.ndarray, val_size: int, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices of the official train set, each sorted."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=val_size, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def _first_stratified(index: np.ndarray, labels: np.ndarray, limit: int | None) -> np.ndarray:
    """The first `limit` entries of index, about equally many per class (all when None)."""
    if limit is None or limit >= len(index):
        return index
    per_class = max(1, limit // len(CLASSES))
    keep = [index[labels[index] == c][:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(keep))


def to_rgb32(image: np.ndarray) -> np.ndarray:
    """[28,28] grey -> [32,32,3] RGB, padded with 2 black pixels on each side."""
    padded = np.pad(image, 2)
    return np.repeat(padded[..., None], 3, axis=2)


def write_fashion_mnist_shards(
    out: Path, *, root: Path = DEFAULT_DIR, val_size: int = 5000, seed: int = 0,
    limit: int | None = None, quality: int = 95, workers: int | None = None,
) -> dict[str, Path]:
    """Write OUT/{train,val,test} shard dirs (skipped when already written by this recipe)."""
    out = Path(out)
    label = (f"fashion-mnist (lsdr v{VERSION}, val {val_size}, seed {seed}, limit {limit}, "
             f"quality {quality})")
    splits = {name: out / name for name in ("train", "val", "test")}
    if all(_intact(path, label) for path in splits.values()):
        return splits
    data = load_fashion_mnist(root)
    train_images, train_labels = data["train"]
    train_idx, val_idx = split_official(train_labels, val_size, seed)
    test_images, test_labels = data["test"]
    parts = {
        "train": (train_images, train_labels, _first_stratified(train_idx, train_labels, limit)),
        "val": (train_images, train_labels, _first_stratified(val_idx, train_labels, limit)),
        "test": (test_images, test_labels,
                 _first_stratified(np.arange(len(test_labels)), test_labels, limit)),
    }
    tmp = scratch_dir(out, ".fashion-src-", "the Fashion-MNIST shards")
    try:
        for name, (images, labels, index) in parts.items():
            src = tmp / name
            for c in range(len(CLASSES)):
                (src / f"{c}").mkdir(parents=True, exist_ok=True)
            for i in index:
                Image.fromarray(to_rgb32(images[i])).save(
                    src / f"{labels[i]}" / f"{name}-{i:05d}.png", compress_level=1)
            write_shards(src, splits[name], prefix=name, seed=seed, max_count=SHARD_COUNT,
                         quality=quality, workers=workers, layout="imagefolder",
                         source_label=f"{label} {name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits
