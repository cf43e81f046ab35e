"""data_pipelines.reader on real shards: batches, decode, corrupt data, splits, exact resume."""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bomb_header
from PIL import Image
from torch.utils.data._utils.collate import default_convert

from data_pipelines import reader
from data_pipelines.images import decode_to_square, fit_square
from data_pipelines.manifest import read_manifest
from data_pipelines.reader import (
    Batch,
    JpegList,
    make_eval_loader,
    make_train_loader,
    worker_shards,
)
from data_pipelines.writer import write_shards
from lsdr_repr.config import DataConfig
from lsdr_repr.errors import ConfigError, DataError
from lsdr_repr.staging.device import decode_jpeg_batch, to_device


def cfg(shards, **kw) -> DataConfig:
    base = {"train_shards": str(shards), "image_size": 16, "batch_size": 4, "num_workers": 0,
            "prefetch_factor": 2, "shuffle_buffer": 16, "pin_memory": False}
    return DataConfig(**{**base, **kw})


def labels_in(*shards: Path) -> list[int]:
    """The cls values stored in tar shards, in file order."""
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            out += [int(tar.extractfile(m).read()) for m in tar.getmembers()
                    if m.name.endswith(".cls")]
    return out


def take(loader, n: int) -> list[Batch]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def jpeg_bytes(colour=(200, 30, 60), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A shard of hand-made samples: [{"__key__": b"k", "jpg": ..., "cls": ...}, ...]."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- batches, decode
def test_train_batches_have_the_contract_shapes(image_folder, tmp_path):
    write_shards(image_folder, tmp_path / "s", max_count=5, workers=1)
    loader = make_train_loader(cfg(tmp_path / "s", batch_size=6), seed=0, rank=0, world_size=1)
    assert loader.manifest.num_samples == 24 and loader.per_rank_batch == 6
    for batch in take(loader, 5):  # more batches than one pass: the stream is endless
        assert isinstance(batch, Batch) and batch.skipped == 0
        assert batch.images.shape == (6, 3, 16, 16) and batch.images.dtype == torch.uint8
        assert batch.images.is_contiguous()
        assert batch.labels.dtype == torch.int64 and set(batch.labels.tolist()) <= {0, 1, 2}
    images, labels = to_device(batch, "cpu")
    assert torch.equal(images, batch.images) and torch.equal(labels, batch.labels)


def test_decode_resizes_shorter_side_and_centre_crops(tmp_path):
    stripes = np.zeros((30, 60, 3), dtype=np.uint8)
    stripes[:, :15] = (255, 0, 0)
    stripes[:, 15:45] = (0, 255, 0)
    stripes[:, 45:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(stripes).save(buf, format="PNG")
    out = decode_to_square(buf.getvalue(), 30)
    assert out.shape == (30, 30, 3) and (out == (0, 255, 0)).all()  # exactly the centre
    tall = decode_to_square(jpeg_bytes(size=(10, 40)), 8)
    assert tall.shape == (8, 8, 3)


@pytest.mark.parametrize("shape, size", [((300, 420, 3), 128), ((37, 23, 3), 64)])
def test_fit_square_matches_pil_on_the_same_crop(shape, size):
    """torch's uint8 resize (downscale of a photo-sized image, upscale of a small one) against
    PIL's antialiased bilinear resize of the same whole-pixel centre square."""
    rng = np.random.default_rng(1)
    smooth = Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).resize(
        shape[1::-1], Image.Resampling.BICUBIC)
    rgb = np.asarray(smooth)
    side = min(shape[:2])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    ref = np.asarray(smooth.resize((size, size), Image.Resampling.BILINEAR,
                                   box=(left, top, left + side, top + side)), np.int16)
    out = fit_square(rgb, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"] and out.flags["WRITEABLE"]
    diff = np.abs(out.astype(np.int16) - ref)
    # rounding differences only (a one-pixel crop offset gives a mean of 1.3 down, 15 up); when
    # upsampling, the outermost output pixels weigh the image's edge differently (up to 9 levels)
    assert diff.mean() < 0.2 and diff[2:-2, 2:-2].max() <= 2


def test_large_jpeg_reduced_decode_matches_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8)).resize(
        (1024, 768), Image.Resampling.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    fast = decode_to_square(buf.getvalue(), 32).astype(np.int16)  # draft: 1/8 scale decode
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    from PIL import ImageOps

    ref = np.asarray(ImageOps.fit(full, (32, 32), Image.Resampling.BILINEAR), np.int16)
    assert np.abs(fast - ref).mean() < 4


# ------------------------------------------------------------------------- corrupt samples
@pytest.fixture
def corrupt_shards(tmp_path) -> Path:
    """Two hand-made shards: 9 good samples, 6 bad ones, and a tar cut short."""
    good = [{"__key__": f"g{i}".encode(), "jpg": jpeg_bytes((20 * i, 100, 50)),
             "cls": str(i).encode()} for i in range(9)]
    first = [good[0], {"__key__": b"garbage", "jpg": b"\xff\xd8 not really", "cls": b"1"},
             good[1], {"__key__": b"zero", "jpg": b"", "cls": b"2"},
             good[2], {"__key__": b"noimage", "cls": b"3", "json": b"{}"},
             good[3], {"__key__": b"badcls", "jpg": jpeg_bytes(), "cls": b"seven"},
             good[4], {"__key__": b"notjpeg", "jpg": b"GIF89a......", "cls": b"1"},
             {"__key__": b"bomb", "png": png_bomb_header(50000, 50000), "cls": b"1"}]
    write_tar(tmp_path / "c-000000.tar", first)
    whole = write_tar(tmp_path / "c-000001.tar", good[5:]).read_bytes()
    # cut inside the last sample's jpg: that member fails, the three before it are fine
    last_jpg = whole.rfind(jpeg_bytes((160, 100, 50))[:64])
    (tmp_path / "c-000001.tar").write_bytes(whole[: last_jpg + 100])
    return tmp_path


def test_corrupt_samples_are_skipped_and_counted(corrupt_shards, caplog):
    spec = str(corrupt_shards / "c-{000000..000001}.tar")
    with caplog.at_level(logging.WARNING, logger="data_pipelines.reader"):
        batches = list(make_eval_loader(spec, 8, batch_size=3))
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [0, 1, 2, 3, 4, 5, 6, 7]  # in order, the cut-off 9th lost
    skipped = sum(b.skipped for b in batches)
    assert skipped >= 7  # 6 bad samples + at least one read error for the cut tar
    assert "garbage" in caplog.text and "zero" in caplog.text and "no image member" in caplog.text
    assert "decompression bomb" in caplog.text

    # the training stream skips the same samples and reports them in its batches
    train = make_train_loader(cfg(spec, batch_size=4, resampled=False), seed=0)
    batches = take(train, 4)  # 16 good samples: two passes
    assert all(b.images.shape == (4, 3, 16, 16) for b in batches)
    assert sum(b.skipped for b in batches) >= 7


def test_a_stream_of_only_corrupt_data_is_a_data_error(tmp_path):
    write_tar(tmp_path / "bad-000000.tar", [{"__key__": b"a", "jpg": b"junk"}])
    (tmp_path / "bad-000001.tar").write_bytes(b"this is not a tar file at all" * 40)
    spec = str(tmp_path / "bad-{000000..000001}.tar")
    with pytest.raises(DataError, match=r"no usable sample in 3 epochs .*bad-000000\.tar, "
                       r".*bad-000001\.tar \(\d+ samples read, \d+ skipped as corrupt\)"):
        take(make_train_loader(cfg(spec), seed=0), 1)
    with pytest.raises(DataError) as info:  # from a worker process: still one line
        take(make_train_loader(cfg(spec, num_workers=1), seed=0), 1)
    assert "\n" not in str(info.value) and "bad-00000" in str(info.value)
    with pytest.raises(DataError, match="no usable sample in the shards"):
        list(make_eval_loader(spec, 8, batch_size=2))


def test_missing_shards_and_bad_batch_size_fail_at_construction(unique_label_shards, tmp_path):
    with pytest.raises(DataError, match="nowhere: no such shard"):
        make_train_loader(cfg(tmp_path / "nowhere"), seed=0)
    with pytest.raises(DataError, match=r"a shard that does not exist: .*u-000008\.tar"):
        make_eval_loader(str(unique_label_shards / "u-{000007..000008}.tar"), 8, 2)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        make_train_loader(cfg(unique_label_shards, batch_size=4), seed=0, rank=0, world_size=3)


# ------------------------------------------------------------------------ splits and order
def test_plans_split_shards_disjointly_and_exactly_once():
    for num_shards, world, workers in [(8, 2, 2), (9, 2, 2), (3, 2, 2), (1, 2, 2), (5, 1, 3)]:
        seen = Counter()
        for rank in range(world):
            for worker in range(workers):
                shards, filt = worker_shards(num_shards, epoch=3, seed=1, rank=rank,
                                             world_size=world, worker=worker,
                                             num_workers=workers, resampled=False)
                for s in shards:
                    for j in range(7):  # 7 samples per shard
                        if filt is None or (s + j) % filt[0] == filt[1]:
                            seen[(s, j)] += 1
        assert set(seen.values()) == {1} and len(seen) == num_shards * 7
    a = worker_shards(8, epoch=0, seed=1, rank=0, world_size=2, worker=0, num_workers=2,
                      resampled=False)
    b = worker_shards(8, epoch=1, seed=1, rank=0, world_size=2, worker=0, num_workers=2,
                      resampled=False)
    assert a != b  # shard order reshuffled per epoch


def test_two_ranks_two_workers_read_disjoint_shards(unique_label_shards):
    """8 shards, 2 ranks x 2 workers, resampled off: within an epoch no shard is read twice."""
    shard_of = {}
    for s in read_manifest(unique_label_shards).shards:
        with tarfile.open(unique_label_shards / s.name) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    shard_of[int(tar.extractfile(m).read())] = s.name
    seen: dict[tuple[int, int], set[str]] = {}
    for rank in range(2):
        loader = make_train_loader(cfg(unique_label_shards, batch_size=8, num_workers=2,
                                       resampled=False), seed=3, rank=rank, world_size=2)
        for i, batch in enumerate(take(loader, 6)):  # 3 batches (12 samples) per worker < 16
            worker = i % 2  # StatefulDataLoader takes batches from workers in turn
            seen.setdefault((rank, worker), set()).update(shard_of[y] for y in batch.labels.tolist())
    assert len(seen) == 4 and all(len(s) == 2 for s in seen.values())
    union = [name for names in seen.values() for name in names]
    assert len(union) == len(set(union)) == 8


def test_resampled_streams_are_seeded_per_rank(unique_label_shards):
    def first(seed, rank):
        loader = make_train_loader(cfg(unique_label_shards, batch_size=8), seed=seed,
                                   rank=rank, world_size=2)
        return torch.cat([b.labels for b in take(loader, 3)]).tolist()

    assert first(0, 0) == first(0, 0)
    assert first(0, 0) != first(0, 1) and first(0, 0) != first(1, 0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_reads_every_sample_exactly_once_over_ranks(unique_label_shards, num_workers):
    labels = []
    for rank in range(2):
        loader = make_eval_loader(str(unique_label_shards), 12, batch_size=5,
                                  num_workers=num_workers, rank=rank, world_size=2)
        labels += torch.cat([b.labels for b in loader]).tolist()
    assert sorted(labels) == list(range(64))

    def in_order():
        loader = make_eval_loader(str(unique_label_shards), 12, 5, num_workers)
        return [y for b in loader for y in b.labels.tolist()]

    first = in_order()
    assert sorted(first) == list(range(64)) and in_order() == first  # ordered, repeatable
    if num_workers == 0:
        shards = [unique_label_shards / s.name for s in read_manifest(unique_label_shards).shards]
        assert first == labels_in(*shards)  # one reader: exactly the file order


def test_eval_loader_with_fewer_shards_than_ranks(unique_label_shards):
    one = unique_label_shards / "u-000003.tar"
    labels = []
    for rank in range(3):
        labels += [y for b in make_eval_loader(str(one), 8, 2, rank=rank, world_size=3)
                   for y in b.labels.tolist()]
    assert sorted(labels) == sorted(labels_in(one)) and len(labels) == 8


# ------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("num_workers,resampled,chunk", [
    (0, True, 1), (0, False, 4), (2, True, 4), (2, False, 1)])
def test_restored_loader_continues_exactly(unique_label_shards, num_workers, resampled, chunk,
                                           monkeypatch):
    # chunk=1: the shuffle buffer restarts at every shard, so resumes land in later chunks too
    monkeypatch.setattr(reader, "SHARDS_PER_CHUNK", chunk)
    config = cfg(unique_label_shards, batch_size=6, num_workers=num_workers,
                 shuffle_buffer=20, resampled=resampled)

    def fresh(state=None):
        loader = make_train_loader(config, seed=5, rank=1, world_size=2)
        if state is not None:
            loader.load_state_dict(state)
        return loader, iter(loader)

    loader, it = fresh()
    for _ in range(7):  # past several shards, chunks and worker epochs (16 samples each)
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(8)]
    restored, rit = fresh(state)
    got = [next(rit) for _ in range(4)]
    state2 = restored.state_dict()  # a second checkpoint, taken after a resume
    got += [next(rit) for _ in range(4)]
    for a, b in zip(got, expected):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    _, again = fresh(state2)
    for b in expected[4:]:
        a = next(again)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    # the state survives a checkpoint round trip (weights_only load)
    buf = io.BytesIO()
    torch.save({"data_state": [state]}, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["data_state"][0] == state


def test_state_taken_before_a_worker_has_yielded_still_resumes_exactly(unique_label_shards):
    config = cfg(unique_label_shards, batch_size=4, num_workers=2, shuffle_buffer=10)
    loader = make_train_loader(config, seed=2)
    it = iter(loader)
    next(it)  # only worker 0 has delivered: worker 1's state is its initial one
    state = loader.state_dict()
    expected = [next(it) for _ in range(4)]
    restored = make_train_loader(config, seed=2)
    restored.load_state_dict(state)
    got = take(restored, 4)
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, expected))


# ---------------------------------------------------------------------------------- GPU path
def test_gpu_decode_falls_back_to_cpu_without_cuda(unique_label_shards, caplog):
    if torch.cuda.is_available():
        pytest.skip("the fallback only happens without CUDA")
    with caplog.at_level(logging.WARNING, logger="data_pipelines.reader"):
        loader = make_train_loader(cfg(unique_label_shards, decode="gpu"), seed=0)
    assert "decoding on the CPU workers" in caplog.text
    batch = take(loader, 1)[0]
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (4, 3, 16, 16)


def test_raw_jpeg_batches_decode_like_the_cpu_path(unique_label_shards):
    """The decode: gpu batch format, decoded by to_device (on the CPU device here)."""
    from data_pipelines.reader import ShardStream

    urls = read_manifest(unique_label_shards).urls()
    raw = next(iter(ShardStream(urls, image_size=12, batch_size=5, mode="eval",
                                resampled=False, output="jpeg")))
    assert isinstance(raw.images, JpegList) and raw.images.image_size == 12
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in raw.images)
    kept = default_convert(pickle.loads(pickle.dumps(raw)))  # what workers + DataLoader do
    assert isinstance(kept.images, JpegList) and kept.images.image_size == 12
    images, labels = to_device(kept, "cpu")
    assert images.shape == (5, 3, 12, 12) and images.dtype == torch.uint8
    assert torch.equal(labels, raw.labels)
    cpu = torch.stack([torch.from_numpy(decode_to_square(t.numpy().tobytes(), 12).copy())
                       .permute(2, 0, 1) for t in raw.images])
    assert (images.float() - cpu.float()).abs().mean() < 6
    mixed = [raw.images[0], torch.frombuffer(bytearray(b"\xff\xd8junk"), dtype=torch.uint8)]
    out = decode_jpeg_batch(mixed, 12, "cpu")  # an undecodable one repeats its neighbour
    assert torch.equal(out[1], out[0])


def test_brace_pattern_and_single_tar_specs(unique_label_shards, tmp_path):
    spec = str(unique_label_shards / "u-{000002..000003}.tar")
    assert read_manifest(spec).num_samples == 16
    labels = [y for b in make_eval_loader(spec, 8, 4) for y in b.labels.tolist()]
    assert labels == labels_in(unique_label_shards / "u-000002.tar",
                               unique_label_shards / "u-000003.tar")
    single = unique_label_shards / "u-000000.tar"
    assert read_manifest(single).num_samples == 8
    lone = tmp_path / "lone.tar"
    lone.write_bytes(single.read_bytes())
    with pytest.raises(DataError, match=r"manifest\.json: no shard manifest describes"):
        read_manifest(lone)
    assert sum(len(b.labels) for b in make_eval_loader(str(lone), 8, 4)) == 8
    piped = make_eval_loader(f"pipe:cat {lone}", 8, 4)  # anything webdataset's gopen opens
    assert [y for b in piped for y in b.labels.tolist()] == labels_in(lone)


EXIT_WITH_LIVE_WORKERS = """
import gc, sys
from pathlib import Path
from data_pipelines.reader import make_train_loader
from lsdr_repr.config import DataConfig
gc.disable()  # only a reference cycle keeps the iterator: nothing shuts its workers down
cfg = DataConfig(train_shards=sys.argv[1], image_size=32, batch_size=8, num_workers=2)
it = iter(make_train_loader(cfg, seed=0))
next(it)
cycle = {"it": it}
cycle["self"] = cycle
del it, cycle
"""


def test_interpreter_exits_with_loader_workers_still_running(sample_shards, tmp_path):
    # Workers ignore SIGTERM (SLURM preemption); multiprocessing's exit handler would SIGTERM and
    # then join them forever. The reader's exit handler must end them first.
    script = tmp_path / "exit_with_workers.py"
    script.write_text(EXIT_WITH_LIVE_WORKERS)
    proc = subprocess.run([sys.executable, str(script), str(sample_shards["train"])],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------- lost samples counted exactly (issue 15)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_broken_shard_counts_exactly_the_samples_it_lost_once_naming_it(
        unique_label_shards, tmp_path, caplog, num_workers):
    shards = tmp_path / "shards"
    shutil.copytree(unique_label_shards, shards)  # 8 shards of 8 samples, labels 0..63
    names = sorted(p.name for p in shards.glob("*.tar"))
    garbage, cut = shards / names[2], shards / names[5]
    garbage.write_bytes(os.urandom(garbage.stat().st_size))  # all 8 samples lost
    whole = cut.read_bytes()
    with tarfile.open(cut) as tar:
        members = tar.getmembers()
    # cut inside the 4th sample's image: 3 samples read, 5 lost
    fourth_jpg = next(m for m in members if m.name.endswith(".jpg")
                      and sorted({x.name.split(".")[0] for x in members}).index(
                          m.name.split(".")[0]) == 3)
    cut.write_bytes(whole[: fourth_jpg.offset_data + 10])
    with caplog.at_level(logging.WARNING, logger="data_pipelines.reader"):
        batches = list(make_eval_loader(shards, 8, batch_size=5, num_workers=num_workers))
    seen = sum(len(b.labels) for b in batches)
    skipped = sum(b.skipped for b in batches)
    assert (seen, skipped) == (64 - 8 - 5, 8 + 5)  # the old reader: 1 + 2 (or 3)
    lines = [r.getMessage() for r in caplog.records]
    # the pass ends with one line (in this process) saying what it left out
    assert sum("read 51 samples, skipped 13" in line for line in lines) == 1, lines
    if num_workers:
        return  # the per-shard lines are logged in the worker processes
    assert sum(names[2] in line for line in lines) == 1, lines
    assert sum(names[5] in line for line in lines) == 1, lines
    assert any("8 sample(s) lost" in line and names[2] in line for line in lines)
    assert any("5 sample(s) lost" in line and names[5] in line for line in lines)
