"""Check a shard directory against its manifest: checksums, sample counts, every image decodes.

    report = verify_shards("data/train")
    report.ok  # False when any shard is missing, altered, unreadable or holds a bad sample
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from data_pipelines.images import DEFAULT_MAX_PIXELS, BadImage, open_image, pixel_limit
from data_pipelines.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest_file
from data_pipelines.progress import make_progress
from lsdr_repr.errors import DataError
from lsdr_repr.files import sha256_file

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_PROBLEMS = 20  # per shard, listed; the counts stay exact


@dataclass
class ShardCheck:
    name: str
    expected_samples: int
    good: int = 0
    bad: int = 0
    sha256_ok: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.sha256_ok and self.bad == 0 and not self.problems
                and self.good == self.expected_samples)


@dataclass
class VerifyReport:
    root: Path
    manifest: Manifest
    shards: list[ShardCheck]
    extra_files: list[str]  # shard-like tars in the directory the manifest does not list

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    @property
    def good(self) -> int:
        return sum(s.good for s in self.shards)

    @property
    def bad(self) -> int:
        return sum(s.bad for s in self.shards)

    @property
    def bad_shards(self) -> list[ShardCheck]:
        return [s for s in self.shards if not s.ok]


def verify_shards(path: str | os.PathLike, workers: int = 1,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = False) -> VerifyReport:
    """Re-read every shard listed in the manifest of `path` (a shard dir or its manifest.json).

    Raises `DataError` only when there is no such directory or no readable manifest; everything
    else is reported. `progress`: one tick per shard, a bar on a terminal and a log line at most
    every 30 s elsewhere (`data_pipelines.progress`).
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise DataError(f"{path}: no such directory")
    if path.suffix != ".json" and not path.is_dir():
        raise DataError(f"{path}: not a directory (give the shard directory or its manifest.json)")
    manifest = load_manifest_file(path if path.suffix == ".json" else path / MANIFEST_NAME)
    jobs = [(str(manifest.root / s.name), s, manifest.labelled, max_pixels)
            for s in manifest.shards]
    bar = make_progress(len(jobs), f"verifying {manifest.root}", "shard", progress and bool(jobs),
                        dynamic_ncols=True, mininterval=0.5)
    checks: list[ShardCheck] = []
    try:
        if workers > 1 and len(jobs) > 1:
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                for check in pool.map(_check_shard, jobs):
                    checks.append(_tick(bar, check, checks))
        else:
            for job in jobs:
                checks.append(_tick(bar, _check_shard(job), checks))
    finally:
        bar.close()
    listed = {s.name for s in manifest.shards}
    extra = sorted(e.name for e in os.scandir(manifest.root)
                   if e.name.endswith(".tar") and e.name not in listed)
    for check in checks:
        if not check.ok:
            log.warning("%s: %s", check.name, "; ".join(check.problems[:3]) or "bad samples")
    return VerifyReport(manifest.root, manifest, checks, extra)


def _tick(bar: Any, check: ShardCheck, done: list[ShardCheck]) -> ShardCheck:
    """One shard done: advance the bar, with the sample counts so far (kept on the bar, not
    summed over `done` again, which would be quadratic in the number of shards)."""
    counts = getattr(bar, "lsdr_counts", [0, 0])
    counts[0] += check.good
    counts[1] += check.bad
    bar.lsdr_counts = counts
    bar.update(1)
    bar.set_postfix(good=counts[0], bad=counts[1], refresh=False)
    return check


def _check_shard(job: tuple[str, ShardInfo, bool, int]) -> ShardCheck:
    path, info, labelled, max_pixels = job
    check = ShardCheck(info.name, info.num_samples)

    def problem(text: str) -> None:
        if len(check.problems) < MAX_PROBLEMS:
            check.problems.append(text)

    try:
        digest, size = sha256_file(path), os.path.getsize(path)
    except OSError as exc:
        problem(f"cannot read the shard ({exc.strerror or exc})")
        return check
    check.sha256_ok = digest == info.sha256
    if not check.sha256_ok:
        problem(f"sha256 differs from the manifest ({size} bytes, manifest says {info.bytes})")
    with pixel_limit(max_pixels):
        try:
            for key, members in _samples(path):
                reason = _check_sample(members, labelled)
                if reason is None:
                    check.good += 1
                else:
                    check.bad += 1
                    problem(f"sample {key}: {reason}")
        except (tarfile.TarError, OSError, EOFError) as exc:
            check.bad += 1
            problem(f"tar read error after {check.good + check.bad - 1} samples: {exc}")
    if check.good + check.bad != info.num_samples:
        problem(f"{check.good + check.bad} samples, the manifest says {info.num_samples}")
    return check


def _samples(path: str):
    """(key, {ext: bytes}) per sample, grouped like webdataset groups members (by key)."""
    key, members = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            base, ext = base_plus_ext(member.name)
            if base is None:
                continue
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if key is not None and base != key:
                yield key, members
                members = {}
            key = base
            members[ext.lower()] = data
    if key is not None:
        yield key, members


def _check_sample(members: dict[str, bytes], labelled: bool) -> str | None:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        return f"no image member (has {', '.join(sorted(members)) or 'nothing'})"
    try:
        open_image(members[ext]).convert("RGB")
    except BadImage as exc:
        return f"{ext}: {exc}"
    if labelled:
        try:
            int(members.get("cls", b"").decode().strip())
        except (UnicodeDecodeError, ValueError):
            return "missing or non-integer cls"
    if "json" in members:
        try:
            json.loads(members["json"])
        except (UnicodeDecodeError, ValueError):
            return "json member is not valid JSON"
    return None
