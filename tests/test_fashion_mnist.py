"""data_pipelines.fashion_mnist: Debian's Fashion-MNIST idx files -> labelled shards (a slice)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipelines import fashion_mnist as fm
from data_pipelines.reader import make_eval_loader, read_manifest
from lsdr_repr.errors import DataError

if not all((fm.DEFAULT_DIR / n).is_file() for pair in fm.FILES.values() for n in pair):
    pytest.skip(f"Fashion-MNIST is not installed at {fm.DEFAULT_DIR}: "
                "apt-get install dataset-fashion-mnist (README command 2 does)",
                allow_module_level=True)


def test_idx_files_read_as_the_official_sets():
    data = fm.load_fashion_mnist()
    images, labels = data["train"]
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    assert data["test"][0].shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [6000] * 10  # the balanced official set


def test_a_slice_is_written_as_labelled_shards_by_the_real_writer(tmp_path):
    splits = fm.write_fashion_mnist_shards(tmp_path / "fm", limit=60, workers=1)
    counts = {name: read_manifest(path).num_samples for name, path in splits.items()}
    assert counts == {"train": 60, "val": 60, "test": 60}
    batch = next(iter(make_eval_loader(splits["test"], 32, batch_size=60)))
    assert tuple(batch.images.shape) == (60, 3, 32, 32)
    assert sorted(np.bincount(batch.labels.numpy()).tolist()) == [6] * 10
    assert int(batch.images[:, :, :2, :].max()) < 20  # the 2 px black padding (JPEG noise)
    # train and val are disjoint parts of the official train set
    train_idx, val_idx = fm.split_official(fm.load_fashion_mnist()["train"][1], 5000)
    assert len(set(train_idx) & set(val_idx)) == 0 and len(val_idx) == 5000
    again = fm.write_fashion_mnist_shards(tmp_path / "fm", limit=60, workers=1)
    assert again == splits  # intact shards of this recipe are reused


def test_missing_and_corrupt_idx_files_are_named(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found.*apt-get install"):
        fm.load_fashion_mnist(tmp_path)
    for name in (n for pair in fm.FILES.values() for n in pair):
        shutil.copy(fm.DEFAULT_DIR / name, tmp_path / name)
    bad = tmp_path / fm.FILES["test"][0]
    bad.write_bytes(gzip.compress(b"\0\0\x08\x03" + (5).to_bytes(4, "big") * 3 + b"\0" * 7))
    with pytest.raises(DataError, match=f"{bad.name}: 7 bytes of data"):
        fm.load_fashion_mnist(tmp_path)
    (tmp_path / "x.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="x.gz: cannot read the idx file"):
        fm.read_idx(Path(tmp_path / "x.gz"))
