"""The shard manifest (`OUT/manifest.json`) and turning a shard spec into a list of shard URLs.

A manifest is optional: `lsdr shards write` writes one, `lsdr shards index` builds one for shards
written by another tool, and shards without one still train (no epoch accounting). It lists the
shards by file name, relative to the directory holding it, or to its `shard_root` when it names
one (a local manifest of shards kept on a server or in a bucket).

What a shard spec may be (directories, patterns, globs, URLs, `pipe:`, fsspec URLs) and how it is
resolved lives in `data_pipelines.sources`; `resolve_shards` and `read_manifest` here are the
entry points the rest of the project uses.
"""

from __future__ import annotations

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
    location: str = ""  # where the shards are when not in `root`: a URL or a directory


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
        """Paths (or URLs) of the shards, in manifest order."""
        if self.location:
            base = self.location.rstrip("/")
            return [f"{base}/{s.name}" for s in self.shards]
        return [str(self.root / s.name) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        extra = {"shard_root": self.location} if self.location else {}
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
            **extra,
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


def load_manifest_file(path: Path) -> Manifest:
    """Parse one manifest.json; `DataError` naming the file when it is missing or malformed."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no shard manifest here (write shards with `lsdr shards write`)") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable shard manifest ({exc})") from None
    return parse_manifest(raw, str(path), root=path.parent)


def parse_manifest(raw: Any, where: str, *, root: Path, location: str = "") -> Manifest:
    """A manifest from its parsed JSON; `where` names it in errors. `location`: where the
    shards are when the manifest was read from a URL (its own `shard_root` wins)."""
    path = where
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not an lsdr shard manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if raw.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest format_version {raw.get('format_version')!r} is not "
                        f"{MANIFEST_VERSION}")
    shard_root = raw.get("shard_root") or location
    if shard_root and not _is_url(shard_root) and not Path(shard_root).is_absolute():
        shard_root = str(root / shard_root)  # relative to the manifest's directory
    try:
        shards = tuple(
            ShardInfo(name=str(s["name"]), num_samples=int(s["num_samples"]), bytes=int(s["bytes"]),
                      sha256=str(s["sha256"]), plan=str(s.get("plan", "")))
            for s in raw["shards"]
        )
        manifest = Manifest(
            root=root, shards=shards,
            class_names=tuple(str(c) for c in raw.get("class_names", [])),
            labelled=bool(raw.get("labelled", False)), skipped=int(raw.get("skipped", 0)),
            writer=dict(raw.get("writer", {})), location=str(shard_root),
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


def _is_url(text: str) -> bool:
    return text.startswith("pipe:") or "://" in text


def is_remote(url: str) -> bool:
    """True for what webdataset opens itself (`pipe:`, `http://`, `s3://` ...), not a local path."""
    return _is_url(url)


def resolve_shards(spec: str | os.PathLike) -> tuple[list[str], Manifest | None]:
    """Shard URLs of a spec (see `data_pipelines.sources`) and its manifest when one exists.

    Raises `DataError` naming the spec when it names nothing or a local shard is missing.
    """
    from data_pipelines.sources import resolve_source

    source = resolve_source(spec)
    return list(source.urls), source.manifest


def read_manifest(shards: str | os.PathLike) -> Manifest:
    """The manifest describing a shard spec (a shard dir, its manifest.json, or tars inside it).

    Raises `DataError` with the path when there is none or it is invalid.
    """
    urls, manifest = resolve_shards(shards)
    if manifest is None:
        where = Path(urls[0]).parent / MANIFEST_NAME if urls and not is_remote(urls[0]) else shards
        raise DataError(f"{where}: no shard manifest describes {shards} (`lsdr shards index` "
                        f"writes one)")
    return manifest
