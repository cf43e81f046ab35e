"""data_pipelines.sample and `lsdr shards sample`: the embedded digits data set."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from data_pipelines.manifest import read_manifest
from data_pipelines.reader import make_eval_loader
from data_pipelines.sample import make_digit_images, split_indices, write_sample_shards
from data_pipelines.verify import verify_shards
from lsdr_repr.cli import main as lsdr_main


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    start = time.perf_counter()
    splits = write_sample_shards(out)
    return out, splits, time.perf_counter() - start


def test_sample_splits_are_stratified_labelled_shards(sample_dir):
    out, splits, seconds = sample_dir
    assert seconds < 30  # the spec is < 10 s on an idle 2-core machine; CI shares its cores
    assert splits == {"train": out / "train", "val": out / "val", "test": out / "test"}
    sizes = {name: read_manifest(path).num_samples for name, path in splits.items()}
    assert sizes == {"train": 1078, "val": 359, "test": 360}
    for name, path in splits.items():
        manifest = read_manifest(path)
        assert manifest.class_names == tuple(str(i) for i in range(10))
        assert len(manifest.shards) == -(-sizes[name] // 128)
        assert manifest.shards[0].name == f"{name}-000000.tar"
        assert verify_shards(path).ok
    labels = [y for b in make_eval_loader(str(splits["val"]), 64, 100) for y in b.labels.tolist()]
    counts = Counter(labels)
    assert len(labels) == 359 and set(counts) == set(range(10))
    assert max(counts.values()) - min(counts.values()) <= 2  # stratified: ~36 per class


def test_sample_images_are_the_digits_coloured(sample_dir):
    images, labels = make_digit_images(32, seed=0)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # colour varies between images of one class (a nuisance), the digit shape does not vanish
    zeros = images[labels == 0].astype(np.float32)
    assert zeros.reshape(len(zeros), -1, 3).mean(1).std(0).min() > 10
    batch = next(iter(make_eval_loader(str(sample_dir[1]["train"]), 64, 16)))
    assert batch.images.shape == (16, 3, 64, 64)
    assert batch.images.float().std() > 20  # not blank
    first, second = split_indices(labels), split_indices(labels)
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert sum(len(v) for v in first.values()) == 1797
    assert not set(first["train"]) & set(first["test"])


def test_existing_sample_is_reused_and_damage_is_repaired(sample_dir):
    out = sample_dir[0]
    shard = out / "val" / "val-000001.tar"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    start = time.perf_counter()
    write_sample_shards(out)
    assert time.perf_counter() - start < 5
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # nothing rewritten
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    write_sample_shards(out)
    assert verify_shards(out / "val").ok


def test_cli_sample(sample_dir, capsys):
    out, _, _ = sample_dir
    assert lsdr_main(["shards", "sample", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train: 1078 images, 10 classes, 9 shards" in printed
    assert str(out / "test" / "manifest.json") in printed


def test_grey_digits_are_the_scans_in_every_channel():
    images, labels = make_digit_images(16, grey=True)
    coloured, _ = make_digit_images(16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 1])
    assert np.array_equal(images[..., 0], images[..., 2])
    assert images[:, 0, 0].max() <= 4 and images.max() == 255  # black (bicubic rings), white ink
    assert not np.array_equal(images, coloured)
    assert np.bincount(labels).tolist()[:2] == [178, 182]
