"""data_pipelines.sources + the reader on every source kind: foreign shards (webdataset's own
TarWriter, no manifest) from a local directory, a glob, a loopback HTTP server, `pipe:cat`,
fsspec's file:// and memory:// filesystems and a weighted mixture; exact resume on each; start-up
errors through `lsdr train`; `lsdr shards index`."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_dirs import DEMO, TINY
from webdataset import TarWriter

from data_pipelines.images import decode_to_square
from data_pipelines.index import build_index
from data_pipelines.manifest import MANIFEST_NAME, read_manifest
from data_pipelines.reader import (
    make_eval_loader,
    make_train_loader,
    resolve_train_data,
    worker_shards,
)
from data_pipelines.sources import resolve_source
from data_pipelines.verify import verify_shards
from lsdr_repr.cli import main
from lsdr_repr.config import DataConfig, SourceConfig
from lsdr_repr.errors import ConfigError, DataError
from lsdr_repr.files import sha256_file

SIZE = 16  # decode side of the tests' loaders
FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode(seed: int, ext: str) -> bytes:
    """A small noise image (unique per seed, so its decoded pixels identify its sample)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(
        buf, format=FORMATS[ext], **({"lossless": True} if ext == "webp" else {}))
    return buf.getvalue()


def write_foreign(root: Path, prefix: str, shards: int = 4, per_shard: int = 6,
                  seed: int = 0) -> dict[bytes, str]:
    """Shards as another tool writes them (img2dataset-like keys, .jpg/.png/.webp, .txt and
    .json members, the last shard without labels), no manifest. Returns pixels -> key."""
    root.mkdir(parents=True, exist_ok=True)
    keys = {}
    for s in range(shards):
        with TarWriter(str(root / f"{prefix}-{s:05d}.tar")) as sink:
            for i in range(per_shard):
                key, ext = f"{s:05d}{i:04d}", list(FORMATS)[i % 3]
                data = encode(seed * 1000 + s * 100 + i, ext)
                sample = {"__key__": key, ext: data, "txt": b"a caption",
                          "json": json.dumps({"key": key}).encode()}
                if s < shards - 1:
                    sample["cls"] = str(s * per_shard + i).encode()
                sink.write(sample)
                keys[decode_to_square(data, SIZE).tobytes()] = f"{prefix}/{key}"
    return keys


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, dict[bytes, str]]:
    root = tmp_path_factory.mktemp("foreign")
    keys = write_foreign(root / "a", "f")
    keys.update(write_foreign(root / "b", "g", shards=2, seed=7))
    return root, keys


class LoopbackServer:
    """An in-process HTTP server on the loopback interface serving `directory`; `stop()` takes it
    down (a source that stops answering)."""

    def __init__(self, directory: Path) -> None:
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            # stop() must not wait for a handler still sending to a reader that paused
            daemon_threads, block_on_close = True, False

        handler = functools.partial(Quiet, directory=str(directory))
        self.server = Server(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def http_base(foreign) -> Iterator[str]:
    """The foreign shards over loopback HTTP."""
    server = LoopbackServer(foreign[0])
    yield server.base
    server.stop()


@pytest.fixture
def memory_shards(foreign) -> Iterator[str]:
    """The foreign shards of `a` copied into fsspec's in-process memory filesystem."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in sorted((foreign[0] / "a").glob("*.tar")):
        fs.pipe(f"/lsdr-test/a/{path.name}", path.read_bytes())
    yield "memory://lsdr-test/a"
    fs.rm("/lsdr-test", recursive=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg(shards: str = "", **kw) -> DataConfig:
    base = {"train_shards": shards, "image_size": SIZE, "batch_size": 4, "num_workers": 0,
            "prefetch_factor": 2, "shuffle_buffer": 8, "pin_memory": False}
    return DataConfig(**{**base, **kw})


def keys_of(batch, keys: dict[bytes, str]) -> list[str]:
    """The sample keys of a batch, found by the decoded pixels of each image."""
    pixels = batch.images.permute(0, 2, 3, 1).numpy()
    return [keys[np.ascontiguousarray(img).tobytes()] for img in pixels]


def spec_of(kind: str, root: Path, base: str, memory: str) -> str:
    return {
        "directory": str(root / "a"),
        "glob": str(root / "a" / "f-*.tar"),
        "http": f"{base}/a/f-{{00000..00003}}.tar",
        "pipe": f"pipe:cat {root}/a/f-{{00000..00003}}.tar",
        "file": f"file://{root}/a",
        "memory": memory,
    }[kind]


# ------------------------------------------------------------------------- every source kind
@pytest.mark.parametrize("kind", ["directory", "glob", "http", "pipe", "file", "memory"])
def test_every_source_kind_streams_the_same_samples(kind, foreign, http_base, memory_shards):
    root, keys = foreign
    spec = spec_of(kind, root, http_base, memory_shards)
    source = resolve_source(spec)
    assert len(source.urls) == 4 and source.manifest is None
    got = [k for b in make_eval_loader(spec, SIZE, batch_size=5) for k in keys_of(b, keys)]
    local = [k for b in make_eval_loader(str(root / "a"), SIZE, 5) for k in keys_of(b, keys)]
    assert got == local and len(got) == 24  # every sample, in shard order, whatever the kind
    labels = torch.cat([b.labels for b in make_eval_loader(spec, SIZE, 24)]).tolist()
    assert labels == list(range(18)) + [-1] * 6  # the last shard has no labels


@pytest.mark.parametrize("kind,num_workers", [
    ("directory", 0), ("glob", 0), ("http", 2), ("pipe", 0), ("file", 0), ("memory", 2)])
def test_every_source_kind_resumes_exactly(kind, num_workers, foreign, http_base,
                                           memory_shards):
    root, keys = foreign
    config = cfg(spec_of(kind, root, http_base, memory_shards), num_workers=num_workers)
    assert_exact_resume(config, keys, before=5, after=8)


def test_a_source_that_goes_away_ends_the_stream_with_one_clear_error(foreign, tmp_path):
    """The shards vanish after the first batches (`pipe:cat` of files moved away: every shard
    then fails at once, as an http server that went down does): the loader's worker backs off,
    logs at most every 30 s, and after `stall_timeout_s` without a usable sample the main
    process gets one `DataError` naming the source, instead of a stream that retries for
    ever. (Over http, curl's own retries come first: `HTTP_RETRIES`.)"""
    shutil.copytree(foreign[0] / "a", tmp_path / "a")
    spec = f"pipe:cat {tmp_path}/a/f-{{00000..00003}}.tar"
    loader = iter(make_train_loader(cfg(spec, num_workers=1, stall_timeout_s=3.0), seed=0))
    for _ in range(3):
        assert len(next(loader).labels) == 4
    (tmp_path / "a").rename(tmp_path / "gone")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        for _ in range(10_000):
            next(loader)
    message = str(info.value)
    assert "\n" not in message and spec in message and "data.stall_timeout_s=3" in message
    assert "no usable sample for" in message and "last error" in message, message
    assert 3 <= time.monotonic() - start < 60


def test_an_http_server_that_never_answers_is_one_line_not_a_hang(monkeypatch):
    """A server that accepts the connection (the kernel's listen backlog does) and never sends
    a byte: curl gives up after `HTTP_STALL_S` of no transfer (here 2 s, no retries) instead of
    waiting for ever, and start-up says which URL and why."""
    from data_pipelines import sources

    monkeypatch.setattr(sources, "HTTP_STALL_S", 2)
    monkeypatch.setattr(sources, "HTTP_RETRIES", 0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # never accept(): connections complete, nothing is ever sent
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x-00000.tar"
        start = time.monotonic()
        with pytest.raises(DataError, match="curl exit 28: timed out") as info:
            sources.check_readable(url, url)
    assert url in str(info.value) and time.monotonic() - start < 20


def test_a_weighted_mixture_resumes_exactly(foreign, http_base):
    root, keys = foreign
    config = cfg(sources=[SourceConfig(f"{http_base}/a/f-{{00000..00003}}.tar", 0.7),
                          SourceConfig(str(root / "b"), 0.3)], num_workers=2)
    seen = assert_exact_resume(config, keys, before=7, after=10)
    assert {k.split("/")[0] for k in seen} == {"f", "g"}  # both sources are drawn from


def assert_exact_resume(config: DataConfig, keys: dict[bytes, str], before: int, after: int
                        ) -> list[str]:
    """Kill the stream after `before` batches (keep only its state), restore it in a fresh
    loader, and compare the next `after` batches' sample keys with an uninterrupted stream."""
    loader = make_train_loader(config, seed=3, rank=0, world_size=1)
    it = iter(loader)
    first = [keys_of(next(it), keys) for _ in range(before)]
    state = loader.state_dict()
    expected = [keys_of(next(it), keys) for _ in range(after)]
    del it, loader
    restored = make_train_loader(config, seed=3, rank=0, world_size=1)
    restored.load_state_dict(state)
    rit = iter(restored)
    got = [keys_of(next(rit), keys) for _ in range(after)]
    assert got == expected
    assert first != expected[:before]  # the stream moved on: the comparison is not trivial
    return [k for batch in first + expected for k in batch]


def test_mixture_weights_set_each_sources_share_of_the_draws():
    # source A: 2 shards, weight 0.8; source B: 8 shards, weight 0.2 (per-shard 0.4 / 0.025)
    weights = [0.4] * 2 + [0.025] * 8
    draws = Counter()
    for epoch in range(400):
        shards, _ = worker_shards(10, epoch=epoch, seed=0, rank=0, world_size=1, worker=0,
                                  num_workers=1, weights=weights)
        draws.update("A" if s < 2 else "B" for s in shards)
    share = draws["A"] / sum(draws.values())
    assert 0.77 < share < 0.83, share  # 4000 draws: 3 standard deviations ~ 0.019


def test_mixture_config_is_checked(foreign):
    root, _ = foreign
    data = resolve_train_data(cfg(sources=[SourceConfig(str(root / "a"), 3.0),
                                           SourceConfig(str(root / "b"), 1.0)]))
    assert data.shares == (0.75, 0.25) and data.num_samples is None
    assert data.shard_weights == [0.75 / 4] * 4 + [0.25 / 2] * 2
    with pytest.raises(ConfigError, match="not both"):
        resolve_train_data(cfg(str(root / "a"), sources=[SourceConfig(str(root / "b"))]))
    with pytest.raises(ConfigError, match=r"sources\[1\]\.weight must be a positive"):
        resolve_train_data(cfg(sources=[SourceConfig(str(root / "a")),
                                        SourceConfig(str(root / "b"), 0.0)]))
    with pytest.raises(ConfigError, match=r"sources\[0\]\.shards is not set"):
        resolve_train_data(cfg(sources=[SourceConfig(""), SourceConfig(str(root / "b"))]))
    with pytest.raises(ConfigError, match="need data.resampled: true"):
        resolve_train_data(cfg(resampled=False, sources=[SourceConfig(str(root / "a"), 2.0),
                                                         SourceConfig(str(root / "b"))]))


# --------------------------------------------------------------------- errors at start-up
def start_errors(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """spec -> (kind, what its one-line error must say)."""
    port = closed_port()
    return {
        f"http://127.0.0.1:{port}/x-{{000..001}}.tar": ("unreachable", "curl exit 7"),
        f"pipe:cat {tmp_path}/missing-{{0..1}}.tar": ("failing pipe", "exited with status 1"),
        "s3://lsdr-no-bucket/train-{000..001}.tar": ("missing extra", "pip install 'lsdr-repr[s3]'"),
        f"{tmp_path}/nothing-*.tar": ("empty pattern", "matches nothing"),
    }


@pytest.mark.parametrize("kind", ["unreachable", "failing pipe", "missing extra",
                                  "empty pattern"])
def test_unreadable_sources_fail_at_start_up_in_one_line(kind, tmp_path, capfd):
    if kind == "missing extra":
        pytest.importorskip("fsspec")
        try:
            import s3fs  # noqa: F401
            pytest.skip("s3fs is installed: the missing-extra error cannot happen")
        except ImportError:
            pass
    spec, (_, says) = next((s, v) for s, v in start_errors(tmp_path).items() if v[0] == kind)
    run_dir = tmp_path / "run"
    code = main(["train", str(DEMO), f"data.train_shards={spec}", "data.val_shards=null",
                 "data.test_shards=null", f"train.run_dir={run_dir}", *TINY,
                 "log.wandb.mode=disabled"])
    assert code == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "lsdr: error:" in line]
    assert len(errors) == 1, errors
    assert spec in errors[0] and says in errors[0], errors[0]
    assert errors[0].startswith("lsdr: error: data.train_shards: "), errors[0]
    assert not (run_dir / "checkpoints").exists()  # at start-up: nothing was trained


# ------------------------------------------------------------------ no manifest, index
def test_training_without_a_manifest_logs_samples_not_epochs(foreign, tmp_path, caplog):
    root, _ = foreign
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lsdr_repr.train")
    code = main(["train", str(DEMO), f"data.train_shards={root / 'a'}", "data.val_shards=null",
                 "data.test_shards=null", f"train.run_dir={run_dir}", *TINY,
                 "train.total_steps=2", "train.log_every=1", "log.wandb.mode=disabled"])
    assert code == 0
    assert caplog.text.count("no shard manifest: logging steps and samples seen") == 1
    rows = [json.loads(line)["metrics"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "samples_seen" in r]
    assert [r["samples_seen"] for r in logged] == [16, 32]
    assert not any("epoch" in r for r in rows)


def test_index_builds_a_manifest_that_verify_and_training_accept(foreign, tmp_path, capsys):
    root, _ = foreign
    shards = tmp_path / "copy"
    shards.mkdir()
    for path in (root / "a").glob("*.tar"):
        (shards / path.name).write_bytes(path.read_bytes())
    assert main(["shards", "index", str(shards), "--no-progress"]) == 0
    assert f"manifest: {shards / MANIFEST_NAME}" in capsys.readouterr().out
    manifest = read_manifest(shards)
    assert manifest.num_samples == 24 and [s.num_samples for s in manifest.shards] == [6] * 4
    assert not manifest.labelled  # the last shard has no cls
    for info in manifest.shards:
        assert info.sha256 == sha256_file(shards / info.name)
        assert info.bytes == (shards / info.name).stat().st_size
    report = verify_shards(shards)
    assert report.ok and report.good == 24
    assert make_train_loader(cfg(str(shards)), seed=0).num_samples == 24


def test_index_of_http_shards_to_a_local_manifest(foreign, http_base, tmp_path):
    spec = f"{http_base}/a/f-{{00000..00003}}.tar"
    with pytest.raises(DataError, match="pass --out"):
        build_index(spec, progress=False)
    out = tmp_path / "laion.json"
    result = build_index(spec, out=str(out), progress=False)
    assert json.loads(out.read_text())["shard_root"] == f"{http_base}/a"
    source = resolve_source(str(out))  # a local manifest of remote shards
    assert list(source.urls) == [f"{http_base}/a/f-{i:05d}.tar" for i in range(4)]
    assert source.manifest.num_samples == result.manifest.num_samples == 24
    assert sum(len(b.labels) for b in make_eval_loader(str(out), SIZE, 10)) == 24


def test_index_writes_next_to_fsspec_shards_and_is_found_there(memory_shards):
    import fsspec

    result = build_index(memory_shards, progress=False)
    # fsspec spells the URLs it lists memory:///lsdr-test/...: the same place
    assert result.written_to.replace(":///", "://") == f"{memory_shards}/{MANIFEST_NAME}"
    raw = json.loads(fsspec.filesystem("memory").cat(f"/lsdr-test/a/{MANIFEST_NAME}"))
    assert "shard_root" not in raw  # next to the shards: the folder can move with it
    source = resolve_source(memory_shards)
    assert source.manifest is not None and source.manifest.num_samples == 24
    assert all(u.startswith("memory://") for u in source.urls)
    digest = hashlib.sha256(fsspec.filesystem("memory").cat(source.urls[0])).hexdigest()
    assert source.manifest.shards[0].sha256 == digest
    # a brace pattern of some of those shards finds the sibling manifest, restricted to them
    some = resolve_source(f"{memory_shards}/f-{{00001..00002}}.tar")
    assert some.manifest is not None and some.manifest.num_samples == 12


def test_an_unfinished_write_is_not_read_as_shards_without_a_manifest(tmp_path):
    (tmp_path / ".lsdr-write").mkdir()
    (tmp_path / "shard-000000.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(DataError, match="has not finished here"):
        resolve_source(str(tmp_path))


def test_a_manifest_next_to_http_shards_is_found_and_used(foreign, http_base):
    root, _ = foreign
    copy = root / "indexed"  # served by the loopback server like the others
    copy.mkdir(exist_ok=True)
    for path in (root / "a").glob("*.tar"):
        (copy / path.name).write_bytes(path.read_bytes())
    build_index(str(copy), progress=False)
    whole = resolve_source(f"{http_base}/indexed/")  # a folder URL: its manifest.json
    assert list(whole.urls) == [f"{http_base}/indexed/f-{i:05d}.tar" for i in range(4)]
    assert whole.manifest.num_samples == 24
    some = resolve_source(f"{http_base}/indexed/f-{{00001..00002}}.tar")
    assert some.manifest.num_samples == 12  # the sibling manifest, restricted to these shards
    loader = make_train_loader(cfg(f"{http_base}/indexed/"), seed=0)
    assert loader.num_samples == 24 and len(next(iter(loader)).labels) == 4
    with pytest.raises(DataError, match=r"/a/: an http:// folder cannot be listed"):
        resolve_source(f"{http_base}/a/")  # no manifest there, and http cannot list


def test_directories_and_patterns_joined_with_double_colons(foreign):
    root, _ = foreign
    source = resolve_source(f"{root / 'a'}::{root / 'b' / 'g-*.tar'}")
    assert [Path(u).name for u in source.urls] == [f"f-{i:05d}.tar" for i in range(4)] + [
        "g-00000.tar", "g-00001.tar"]
    assert source.manifest is None  # two directories: no one manifest describes them


def test_http_urls_with_a_query_string_are_not_globs(foreign, http_base):
    # presigned object-store URLs carry `?X-Amz-...`: a query, not a glob character
    url = f"{http_base}/a/f-00001.tar?X-Amz-Signature=abc"
    assert list(resolve_source(url).urls) == [url]
    assert sum(len(b.labels) for b in make_eval_loader(url, SIZE, 4)) == 6
    with pytest.raises(DataError, match="cannot be globbed: use a brace pattern"):
        resolve_source(f"{http_base}/a/*.tar")


def test_the_missing_sample_data_says_how_to_write_it(tmp_path):
    """`lsdr train configs/demo.yaml` on a fresh clone, before `lsdr demo` wrote data/sample."""
    with pytest.raises(DataError, match=rf"no such shard file or directory \(the embedded "
                                        rf"sample data: `lsdr shards sample {tmp_path}/sample`"):
        resolve_source(str(tmp_path / "sample" / "train"))
    with pytest.raises(DataError, match=r"directory$"):
        resolve_source(str(tmp_path / "mine" / "train"))
