"""The shard manifest (`OUT/manifest.json`) and turning a shard spec into a list of shard URLs.

A shard spec (what `data.train_shards` holds) is one of:
  - a directory written by `lsdr shards write` (holds `manifest.json` and the tars);
  - the path of a `manifest.json`;
  - one local `.tar`, or a brace pattern `dir/train-{000000..000127}.tar`;
  - anything webdataset can open: `pipe:curl -s https://host/train-{000..009}.tar`, `https://...`,
    several specs joined with `::`.
Local paths are checked up front (a missing shard is a `DataError` naming it); remote ones are
opened by webdataset's `gopen` when the stream reaches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsdr_repr.errors import DataError

MANIFEST_NAME = "manifest.json"
REPORT_NAME = "write_report.json"
MANIFEST_FORMAT = "lsdr-shards"
MANIFEST_VERSION = 1
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{6})\.tar$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str  # file name inside the shard directory
    num_samples: int
    bytes: int
    sha256: str
    plan: str = ""  # digest of the sources planned into this shard (lets a re-run keep it)


@dataclass(frozen=True)
class Manifest:
    """What a shard directory holds; training reads its epoch length (`num_samples`) from here."""

    root: Path  # the directory holding the shards
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...] = ()  # label i is class_names[i]; () when unlabelled or int labels
    labelled: bool = False
    skipped: int = 0  # source files the writer could not use (see write_report.json)
    writer: dict[str, Any] = field(default_factory=dict)  # writer version and options

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def urls(self) -> list[str]:
        """Paths of the shards, in manifest order."""
        return [str(self.root / s.name) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "labelled": self.labelled,
            "class_names": list(self.class_names),
            "skipped": self.skipped,
            "writer": self.writer,
            "shards": [
                {"name": s.name, "num_samples": s.num_samples, "bytes": s.bytes,
                 "sha256": s.sha256, "plan": s.plan}
                for s in self.shards
            ],
        }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, fsync, rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(manifest: Manifest) -> Path:
    path = manifest.root / MANIFEST_NAME
    write_json_atomic(path, manifest.to_json())
    return path


def _manifest_path(spec: Path) -> Path:
    return spec / MANIFEST_NAME if spec.is_dir() or spec.suffix != ".json" else spec


def load_manifest_file(path: Path) -> Manifest:
    """Parse one manifest.json; `DataError` naming the file when it is missing or malformed."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no shard manifest here (write shards with `lsdr shards write`)") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable shard manifest ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not an lsdr shard manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if raw.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest format_version {raw.get('format_version')!r} is not "
                        f"{MANIFEST_VERSION}")
    try:
        shards = tuple(
            ShardInfo(name=str(s["name"]), num_samples=int(s["num_samples"]), bytes=int(s["bytes"]),
                      sha256=str(s["sha256"]), plan=str(s.get("plan", "")))
            for s in raw["shards"]
        )
        manifest = Manifest(
            root=path.parent, shards=shards,
            class_names=tuple(str(c) for c in raw.get("class_names", [])),
            labelled=bool(raw.get("labelled", False)), skipped=int(raw.get("skipped", 0)),
            writer=dict(raw.get("writer", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed shard manifest ({type(exc).__name__}: {exc})") from None
    for s in shards:
        if "/" in s.name or s.name in ("", ".", ".."):
            raise DataError(f"{path}: malformed shard manifest (bad shard name {s.name!r})")
    if "num_samples" in raw and raw["num_samples"] != manifest.num_samples:
        raise DataError(f"{path}: manifest num_samples {raw['num_samples']} is not the sum over its "
                        f"shards ({manifest.num_samples})")
    return manifest


def is_remote(url: str) -> bool:
    """True for what webdataset opens itself (`pipe:`, `http://`, `s3://` ...), not a local path."""
    return url.startswith("pipe:") or "://" in url


def expand_spec(spec: str | os.PathLike) -> list[str]:
    """Brace and `::` expansion exactly as webdataset does it (its `expand_urls`)."""
    from webdataset.shardlists import expand_urls

    return [os.path.expanduser(u) if not is_remote(u) else u for u in expand_urls(str(spec))]


def resolve_shards(spec: str | os.PathLike) -> tuple[list[str], Manifest | None]:
    """Shard URLs of a spec (see the module docstring) and its manifest when one exists.

    Raises `DataError` naming the path when a local directory, manifest or shard is missing.
    """
    text = str(spec).strip()
    if not text:
        raise DataError("no shards given (an empty shard spec)")
    path = Path(os.path.expanduser(text))
    if not is_remote(text) and "{" not in text and "::" not in text:
        if path.is_dir() or path.suffix == ".json":
            manifest = load_manifest_file(_manifest_path(path))
            urls = manifest.urls()
            _check_local(urls, f"{_manifest_path(path)} lists")
            return urls, manifest
        if not path.exists():
            raise DataError(f"{path}: no such shard file or directory")
        return [str(path)], _sibling_manifest([str(path)])
    urls = expand_spec(text)
    if not urls:
        raise DataError(f"{text}: the shard pattern expands to nothing")
    local = [u for u in urls if not is_remote(u)]
    _check_local(local, f"{text}: the pattern names")
    return urls, _sibling_manifest(urls) if len(local) == len(urls) else None


def _check_local(urls: list[str], what: str) -> None:
    for url in urls:
        if not is_remote(url) and not os.path.isfile(url):
            raise DataError(f"{what} a shard that does not exist: {url}")


def _sibling_manifest(urls: list[str]) -> Manifest | None:
    """The manifest of the directory holding local shards, restricted to those shards."""
    parents = {Path(u).resolve().parent for u in urls}
    if len(parents) != 1:
        return None
    root = parents.pop()
    if not (root / MANIFEST_NAME).is_file():
        return None
    full = load_manifest_file(root / MANIFEST_NAME)
    wanted = {Path(u).name for u in urls}
    shards = tuple(s for s in full.shards if s.name in wanted)
    if len(shards) != len(wanted):
        return None  # the manifest does not describe these files: do not guess
    return Manifest(root=root, shards=shards, class_names=full.class_names,
                    labelled=full.labelled, skipped=full.skipped, writer=full.writer)


def read_manifest(shards: str | os.PathLike) -> Manifest:
    """The manifest describing a shard spec (a shard dir, its manifest.json, or tars inside it).

    Raises `DataError` with the path when there is none or it is invalid.
    """
    urls, manifest = resolve_shards(shards)
    if manifest is None:
        where = Path(urls[0]).parent / MANIFEST_NAME if urls and not is_remote(urls[0]) else shards
        raise DataError(f"{where}: no shard manifest describes {shards}")
    return manifest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
