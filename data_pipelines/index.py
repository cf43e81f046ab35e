"""`lsdr shards index`: a manifest for shards that some other tool wrote (img2dataset, any
WebDataset writer), local or remote, so training gets sample counts and checksums for them.

Every shard is streamed once through webdataset's `gopen` (the same opener the reader uses):
its bytes are hashed as they pass and its tar members grouped into samples by key, as
webdataset groups them. The manifest goes next to the shards (a local directory or an fsspec
URL), or to `out`; a manifest that is not in the shards' directory records it as `shard_root`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from data_pipelines.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    write_json_atomic,
)
from data_pipelines.progress import make_progress
from data_pipelines.sources import (
    filesystem,
    is_remote,
    list_shards,
    register_openers,
    scheme,
    uses_fsspec,
)
from lsdr_repr import __version__
from lsdr_repr.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexResult:
    manifest: Manifest
    written_to: str  # path or URL of the manifest.json


class _HashingReader:
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.sha, self.bytes = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (end-of-archive padding): the hash covers the file."""
        while self.read(1 << 20):
            pass


def index_shard(url: str) -> tuple[ShardInfo, int]:
    """(ShardInfo of one shard, how many of its samples have a cls label), streamed once."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    register_openers([url])
    samples = labelled = 0
    try:
        stream = gopen(url)
        reader = _HashingReader(stream)
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for exts in _sample_exts(tar, base_plus_ext):
                samples += 1
                labelled += "cls" in exts
        reader.drain()
        stream.close()
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        raise DataError(f"{url}: cannot be indexed after {samples} samples "
                        f"({type(exc).__name__}: {exc})") from None
    name = posixpath.basename(url) if is_remote(url) else Path(url).name
    return ShardInfo(name, samples, reader.bytes, reader.sha.hexdigest()), labelled


def _sample_exts(tar: tarfile.TarFile, keys: Any) -> Iterator[set[str]]:
    """The member extensions of each sample (members grouped by key, as webdataset does)."""
    key, exts = None, set()
    for member in tar:
        tar.members = []  # a streamed tar keeps every member it has seen otherwise
        if not member.isreg():
            continue
        base, ext = keys(member.name)
        if base is None:
            continue
        if key is not None and base != key:
            yield exts
            exts = set()
        key = base
        exts.add(ext.lower())
    if key is not None:
        yield exts


def build_index(spec: str, out: str | None = None, workers: int = 4, progress: bool = True
                ) -> IndexResult:
    """Stream every shard `spec` names (ignoring any manifest there) and write a manifest.

    `out`: where to write it (default: `manifest.json` in the shards' directory, which must be a
    local directory or an fsspec URL; http(s) shards need `out`). Raises `DataError`.
    """
    urls = list_shards(spec)
    if any(scheme(u) == "pipe" for u in urls):
        raise DataError(f"{spec}: `lsdr shards index` reads files and URLs, not pipe: commands")
    dirs = {_parent(u) for u in urls}
    if len(dirs) != 1:
        raise DataError(f"{spec}: the shards are in {len(dirs)} directories; a manifest "
                        f"describes one directory (index each on its own)")
    shard_dir = dirs.pop()
    target = out or _join(shard_dir, MANIFEST_NAME)
    if not out and scheme(shard_dir) in ("http", "https"):
        raise DataError(f"{spec}: cannot write next to http(s) shards: pass --out PATH (and "
                        f"copy the manifest there to have it found next to them)")
    names = [posixpath.basename(u) if is_remote(u) else Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise DataError(f"{spec}: two shards have the same file name")

    # a bar on a terminal, a log line at most every 30 s elsewhere
    bar = make_progress(len(urls), f"indexing {spec}", "shard", progress, leave=False)
    results: list[tuple[ShardInfo, int]] = []
    try:
        with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(urls)))) as pool:
            for result in pool.map(index_shard, urls):  # in order; I/O-bound, so threads
                results.append(result)
                bar.update(1)
                bar.set_postfix(samples=sum(r[0].num_samples for r in results), refresh=False)
    finally:
        bar.close()
    shards = tuple(info for info, _ in results)
    total = sum(s.num_samples for s in shards)
    if total == 0:
        raise DataError(f"{spec}: the shards hold no samples")
    # A manifest kept elsewhere records where the shards are (`shard_root`); next to them it
    # does not, so the directory can be copied or mirrored with its manifest.
    beside = _same_dir(_parent(target), shard_dir)
    location = "" if beside and not is_remote(shard_dir) else _absolute(shard_dir)
    manifest = Manifest(
        root=Path(_parent(target)) if not is_remote(target) else Path(shard_dir),
        shards=shards, labelled=all(n == s.num_samples for (s, n) in results),
        writer={"name": "lsdr-repr data_pipelines.index", "version": __version__,
                "options": {"source": spec}},
        location=location,
    )
    data = manifest.to_json()
    if beside:
        data.pop("shard_root", None)
    _write(target, data)
    return IndexResult(manifest, target)


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).resolve().parent)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else str(Path(base) / name)


def _absolute(path: str) -> str:
    return path if is_remote(path) else str(Path(path).resolve())


def _same_dir(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def _write(target: str, data: dict[str, Any]) -> None:
    if not is_remote(target):
        path = Path(os.path.expanduser(target))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, data)
        except OSError as exc:
            raise DataError(f"{target}: cannot write the manifest ({exc})") from None
        return
    if not uses_fsspec(target) and scheme(target) != "file":
        raise DataError(f"{target}: cannot write a manifest to a {scheme(target)}:// URL "
                        f"(use a local path or an fsspec URL)")
    fs, path = filesystem(target)
    try:
        with fs.open(path, "w") as f:
            f.write(json.dumps(data, indent=1) + "\n")
    except Exception as exc:  # noqa: BLE001 (each fsspec filesystem raises its own types)
        raise DataError(f"{target}: cannot write the manifest ({exc})") from None

