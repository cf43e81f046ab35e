"""Write a folder of images (or a CSV list of them) as WebDataset tar shards plus a manifest.

    result = write_shards("~/photos", "data/photos", seed=0, max_side=512)

Each sample is `{key}.jpg` (the original bytes when the file already is an RGB JPEG of the right
size, otherwise converted to RGB and re-encoded), `{key}.cls` (ASCII integer, when labelled) and
`{key}.json` (source path, original size and format, label name, conversions applied).

Determinism and resume. The shard plan is a pure function of the source list: files are sorted by
their recorded path, shuffled with `seed`, and cut into shards greedily at `max_count` samples or
`max_bytes` of *source* bytes (known before encoding, so the plan does not depend on the encoder;
shards come out at or below the byte target unless images are re-encoded larger). Tar members
carry fixed metadata (mtime 0, uid 0, mode 0444), so the same inputs and options give
byte-identical shards, whatever the number of worker processes. A shard is written to a
temporary name, fsynced, then renamed; a record of it (plan digest, sha256) goes to
`OUT/.lsdr-write/` (moved into `write_report.json` when the write completes). A re-run keeps every shard whose plan digest and sha256 still match and
rewrites the rest, so an interrupted write finishes with the same shards as an uninterrupted one.
`manifest.json` is removed when a write starts and written last: a directory with a manifest is
complete.

Bad inputs never stop the write: unreadable, empty, non-image, truncated and oversized
(decompression-bomb) files are skipped with a reason in `OUT/write_report.json`.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import hashlib
import json
import logging
import os
import random
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipelines.images import DEFAULT_MAX_PIXELS, BadImage, pixel_limit, prepare_jpeg
from data_pipelines.manifest import (
    MANIFEST_NAME,
    REPORT_NAME,
    SHARD_RE,
    Manifest,
    ShardInfo,
    write_json_atomic,
    write_manifest,
)
from data_pipelines.progress import make_progress
from lsdr_repr import __version__
from lsdr_repr.errors import DataError
from lsdr_repr.files import fsync_dir, sha256_file

log = logging.getLogger(__name__)

STATE_DIR = ".lsdr-write"
SOURCE_RECORD = "source.json"  # in STATE_DIR: which source this directory is written from
WRITER_FORMAT = 1  # bump when the bytes written for the same inputs change
DEFAULT_MAX_COUNT = 10_000
DEFAULT_MAX_BYTES = 256 * 10**6
DEFAULT_QUALITY = 95
TAR_MTIME = 0  # fixed member metadata: identical inputs give identical tar bytes
CHUNK = 16  # source files per task sent to a worker process
Layout = Literal["auto", "imagefolder", "flat"]


@dataclass(frozen=True)
class SourceItem:
    path: str  # where to read the file
    rel: str  # the path recorded in the shard (relative to the source root, or as the CSV says)
    label: int | None
    size: int  # bytes, from stat (0 when it cannot be stat'ed: the read will report why)
    mtime_ns: int


@dataclass
class Source:
    kind: str  # imagefolder | flat | csv
    root: Path
    items: list[SourceItem]
    class_names: list[str] = field(default_factory=list)
    # entries left out while listing (symlink loops, links out of the source, duplicates):
    # {"path", "reason"}, reported with the files that could not be read
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return any(item.label is not None for item in self.items)


@dataclass
class WriteResult:
    out: Path
    manifest: Manifest
    manifest_path: Path
    report_path: Path
    written: int  # samples in the shards
    skipped: int  # source files left out (reasons in the report)
    shards_reused: list[str]  # kept from an earlier (interrupted or identical) run
    shards_written: list[str]


# ------------------------------------------------------------------------------------ sources
def scan_source(src: str | os.PathLike, layout: Layout = "auto",
                exclude: Path | None = None, follow_links: bool = False) -> Source:
    """List the files of an image source (see the module docstring). Raises `DataError`.

    `exclude`: a resolved folder left out of the listing (the output folder, when it lies inside
    the source: neither its files nor a class of its name).

    Symbolic links inside a folder source are followed while they stay inside it (unless
    `follow_links`), and each directory and file is listed once: a link back to an ancestor (a
    loop), a second link to a listed directory or file, and a link out of the source (say to
    /etc/passwd) are left out and reported, rather than multiplying samples under the wrong
    label or reading files the source does not hold.
    """
    root = Path(os.path.expanduser(str(src)))
    if not root.exists():
        raise DataError(f"{root}: no such source directory or file")
    if root.is_file():
        if root.suffix.lower() not in (".csv", ".tsv", ".txt"):
            raise DataError(f"{root}: a file source must be a .csv/.tsv list of path[,label]")
        return _scan_csv(root)
    # The output folder inside the source (`lsdr shards write imgs imgs/shards`) is not data:
    # as a class folder it would shift every label after it on a second run.
    def listed(entry: os.DirEntry) -> bool:
        return not entry.name.startswith(".") and not (
            exclude is not None and entry.is_dir() and Path(entry.path).resolve() == exclude)

    if layout == "auto":
        entries = [e for e in os.scandir(root) if listed(e)]
        has_dirs = any(e.is_dir() for e in entries)
        has_files = any(e.is_file() for e in entries)
        layout = "imagefolder" if has_dirs and not has_files else "flat"
    if layout == "imagefolder":
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and listed(e))
        if not classes:
            raise DataError(f"{root}: no class subfolders for an ImageFolder layout")
        walk = _Walk(root, exclude, follow_links)
        tops = [walk.top(root / name) for name in classes]  # a link into another class: refused
        items = []
        for label, top in enumerate(tops):
            if top is not None:
                items += [_item(p, root, label) for p in walk.files(top)]
        source = Source("imagefolder", root, items, classes, walk.skipped)
    elif layout == "flat":
        walk = _Walk(root, exclude, follow_links)
        top = walk.top(root)
        files = walk.files(top) if top is not None else iter(())
        source = Source("flat", root, [_item(p, root, None) for p in files], [], walk.skipped)
    else:
        raise DataError(f"{root}: unknown layout {layout!r} (auto | imagefolder | flat)")
    if not source.items:
        raise DataError(f"{root}: no files found")
    return source


class _Walk:
    """Lists the files of a source tree once each: every directory and file is identified by
    (device, inode), so a symlink loop or a second link to something already listed is left out;
    links that resolve outside the source root are left out unless `follow_links`. Sorted, so
    which of two names of one file is kept does not depend on the file system's order."""

    def __init__(self, root: Path, exclude: Path | None, follow_links: bool) -> None:
        self.root, self.exclude, self.follow_links = root, exclude, follow_links
        self.real_root = root.resolve()
        self.seen: dict[tuple[int, int], str] = {}
        self.skipped: list[dict[str, str]] = []
        self.top(root)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path != self.root else "."

    def _admit(self, path: Path) -> bool:
        """Record `path` (a directory or file) unless it is a repeat or an outside link."""
        rel = self._rel(path)
        try:
            st = path.stat()
        except OSError as exc:
            self._skip(rel, f"unreadable ({exc.strerror or exc})")
            return False
        if path.is_symlink() and not self.follow_links:
            real = path.resolve()
            if real != self.real_root and self.real_root not in real.parents:
                self._skip(rel, f"symbolic link to {real}, outside the source "
                                "(--follow-links to include it)")
                return False
        key = (st.st_dev, st.st_ino)
        first = self.seen.get(key)
        if first is not None:
            kind = "directory" if path.is_dir() else "file"
            self._skip(rel, f"the same {kind} as {first} (a symbolic link loop or a second "
                            "link to it): listed once")
            return False
        self.seen[key] = rel
        return True

    def _skip(self, rel: str, reason: str) -> None:
        self.skipped.append({"path": rel, "reason": reason})
        log.warning("leaving out %s: %s", rel, reason)

    def top(self, path: Path) -> Path | None:
        """Admit a directory to walk (the root, a class folder); None if refused."""
        if path == self.root and self.seen:
            return path
        return path if self._admit(path) else None

    def files(self, top: Path) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            here = Path(dirpath)
            keep = []
            for d in sorted(dirnames):
                path = here / d
                if d.startswith(".") or (self.exclude is not None
                                         and path.resolve() == self.exclude):
                    continue
                if self._admit(path):
                    keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                path = here / name
                if not name.startswith(".") and os.path.isfile(path) and self._admit(path):
                    yield path


def _item(path: Path, root: Path, label: int | None, rel: str | None = None) -> SourceItem:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size, mtime = 0, 0
    rel = rel if rel is not None else path.relative_to(root).as_posix()
    return SourceItem(str(path), rel, label, size, mtime)


def _scan_csv(path: Path) -> Source:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file list ({exc})") from None
    rows = []
    for lineno, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if lineno == 1 and cells[0].lower() in ("path", "file", "filename", "image"):
            continue  # a header row
        if not cells[0]:
            raise DataError(f"{path}:{lineno}: empty path")
        rows.append((lineno, cells[0], cells[1] if len(cells) > 1 and cells[1] else None))
    if not rows:
        raise DataError(f"{path}: lists no files")
    with_label = [r for r in rows if r[2] is not None]
    if with_label and len(with_label) != len(rows):
        first = next(r for r in rows if r[2] is None)
        raise DataError(f"{path}:{first[0]}: no label, while other rows have one")
    names: list[str] = []
    index: dict[str, int] = {}
    if with_label:
        values = [r[2] for r in rows]
        if all(re.fullmatch(r"\d+", v) for v in values):
            # integer labels are kept as they are; their names are the numbers
            names = [str(i) for i in range(max(int(v) for v in values) + 1)]
            index = {v: int(v) for v in values}
        else:
            names = sorted(set(values))
            index = {n: i for i, n in enumerate(names)}
    items = []
    for _, rel, label in rows:
        file = Path(os.path.expanduser(rel))
        file = file if file.is_absolute() else path.parent / file
        items.append(_item(file, path.parent, None if label is None else index[label], rel))
    return Source("csv", path.parent, items, names)


# --------------------------------------------------------------------------------------- plan
@dataclass
class PlannedShard:
    index: int
    name: str
    items: list[tuple[str, SourceItem]]  # (key, item)
    digest: str = ""


def plan_shards(items: Sequence[SourceItem], *, seed: int, prefix: str, max_count: int,
                max_bytes: int, encode_options: dict[str, Any]) -> list[PlannedShard]:
    """Sort by recorded path, shuffle with `seed`, cut greedily at max_count / max_bytes."""
    order = sorted(items, key=lambda it: (it.rel, it.path))
    random.Random(seed).shuffle(order)
    shards: list[PlannedShard] = []
    current: list[tuple[str, SourceItem]] = []
    current_bytes = 0
    for i, item in enumerate(order):
        if current and (len(current) >= max_count or current_bytes + item.size > max_bytes):
            shards.append(PlannedShard(len(shards), "", current))
            current, current_bytes = [], 0
        current.append((f"{i:09d}", item))
        current_bytes += item.size
    if current:
        shards.append(PlannedShard(len(shards), "", current))
    for shard in shards:
        shard.name = f"{prefix}-{shard.index:06d}.tar"
        shard.digest = _plan_digest(shard, encode_options)
    return shards


def _plan_digest(shard: PlannedShard, encode_options: dict[str, Any]) -> str:
    payload = {
        "writer_format": WRITER_FORMAT, "name": shard.name, "options": encode_options,
        "items": [[key, it.rel, it.path, it.label, it.size, it.mtime_ns] for key, it in shard.items],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------- encoding
def _encode_chunk(tasks: list[tuple[str, str, str, int | None, str | None]],
                  options: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker-process side: read and convert a few files. Never raises for a bad file."""
    out = []
    with pixel_limit(options["max_pixels"]):
        for key, path, rel, label, label_name in tasks:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                out.append({"ok": False, "rel": rel, "reason": f"unreadable ({exc.strerror or exc})"})
                continue
            try:
                prep = prepare_jpeg(data, max_side=options["max_side"], quality=options["quality"],
                                    min_side=options.get("min_side"))
            except BadImage as exc:
                out.append({"ok": False, "rel": rel, "reason": str(exc)})
                continue
            except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the write
                out.append({"ok": False, "rel": rel, "reason": f"{type(exc).__name__}: {exc}"})
                continue
            meta = {
                "key": key, "source": rel, "label": label, "label_name": label_name,
                "original_size": list(prep.original_size), "size": list(prep.size),
                "original_format": prep.original_format, "original_mode": prep.original_mode,
                "reencoded": prep.reencoded, "notes": prep.notes,
            }
            out.append({"ok": True, "rel": rel, "key": key, "jpg": prep.jpeg, "label": label,
                        "meta": meta, "notes": prep.notes, "reencoded": prep.reencoded})
    return out


class _HashingFile:
    """File wrapper that hashes what tarfile writes (tarfile needs write and tell)."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.pos = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.pos


class ShardTarWriter:
    """A tar written to `.NAME.tmp`, fsynced and renamed to NAME by `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        # Both stay open across add() calls; close() or abort() ends them.
        self._file = open(self.tmp, "wb")  # noqa: SIM115
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        import io

        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(members[ext])
            info.mtime = TAR_MTIME
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self.count += 1

    def close(self) -> tuple[str, int]:
        """Finish the tar, make it durable, give it its real name; returns (sha256, bytes)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent, "the shard rename")
        return self._hashing.sha.hexdigest(), self._hashing.pos

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------- write
def parse_size(text: str | int) -> int:
    """'256MB' -> 256e6, '1GiB' -> 2**30, '5000' -> 5000. Raises `DataError`."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise DataError(f"cannot read {text!r} as a size (e.g. 256MB, 1GiB, 5000000)")
    base = 1024 if m.group(3) else 1000
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * base**power)


def write_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    prefix: str = "shard",
    seed: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int | None = None,
    min_side: int | None = None,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    layout: Layout = "auto",
    workers: int | None = None,
    progress: bool = False,
    source_label: str | None = None,
    follow_links: bool = False,
    overwrite: bool = False,
) -> WriteResult:
    """Write `src` (ImageFolder dir, flat dir, or CSV/TSV of path[,label]) as shards in `out`.

    `workers`: encoding processes (None: all CPUs; 0 or 1: in this process). `source_label`:
    what the manifest records as the source (default: `src` as given). `follow_links`: also
    follow symbolic links that leave the source folder. `overwrite`: replace the shards of
    another source in `out` (refused otherwise). Raises `DataError` for a missing or empty
    source, an `out` holding another dataset, and when no file at all could be used.
    """
    if max_count < 1 or max_bytes < 1:
        raise DataError(f"shard limits must be positive (max_count={max_count}, "
                        f"max_bytes={max_bytes})")
    if max_side is not None and max_side < 1:
        raise DataError(f"--max-side must be positive, got {max_side}")
    if min_side is not None and min_side < 1:
        raise DataError(f"--min-side must be positive, got {min_side}")
    if not 1 <= quality <= 100:
        raise DataError(f"JPEG quality must be in 1..100, got {quality}")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", prefix):
        raise DataError(f"shard prefix {prefix!r}: use letters, digits, '_', '-', '.'")
    out = Path(os.path.expanduser(str(out)))
    out_resolved = out.resolve()
    source = scan_source(src, layout, exclude=out_resolved, follow_links=follow_links)
    if Path(source.root).resolve() == out_resolved:
        raise DataError(f"{out}: the output directory cannot be the source directory")
    identity = source_label if source_label is not None else str(_resolved(src))
    if not overwrite:
        _refuse_another_dataset(out, identity)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE_DIR).mkdir(exist_ok=True)
        write_json_atomic(out / STATE_DIR / SOURCE_RECORD, {"source": identity})
    except OSError as exc:
        raise DataError(f"{out}: cannot create the output directory ({exc})") from None

    encode_options = {"max_side": max_side, "quality": quality, "max_pixels": max_pixels}
    if min_side is not None:  # only when set: earlier writes keep their plan digests (resume)
        encode_options["min_side"] = min_side
    plan = plan_shards(source.items, seed=seed, prefix=prefix, max_count=max_count,
                       max_bytes=max_bytes, encode_options=encode_options)
    # From here on the directory is "being written": no manifest until the end.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    _remove_stale(out, prefix, {s.name for s in plan})

    records: dict[str, dict[str, Any]] = {}
    todo: list[PlannedShard] = []
    for shard in plan:
        record = _read_record(out, shard.name)
        if record is not None and _still_valid(out / shard.name, record, shard.digest):
            records[shard.name] = record
        else:
            todo.append(shard)
    reused = [s.name for s in plan if s.name in records]
    if reused:
        log.info("%s: keeping %d complete shard(s) from an earlier run", out, len(reused))

    names = source.class_names
    total = sum(len(s.items) for s in todo)
    bar = make_progress(total, f"writing {out}", "img", progress and total > 0,
                        dynamic_ncols=True, mininterval=0.5)
    results = _encoded_stream(todo, names, encode_options, workers)
    try:
        for shard in todo:
            records[shard.name] = _write_one(out, shard, results, bar)
    finally:
        results.close()  # stops the worker pool at once on an error or Ctrl-C
        bar.close()

    return _finish(out, plan, records, source, reused, [s.name for s in todo], prefix=prefix,
                   seed=seed, max_count=max_count, max_bytes=max_bytes,
                   encode_options=encode_options, layout=layout,
                   source_label=source_label if source_label is not None else str(src))


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


def _recorded_source(out: Path) -> str | None:
    """What source `out` was written from: the writer's record, else its manifest's."""
    for path, keys in ((out / STATE_DIR / SOURCE_RECORD, ("source",)),
                       (out / MANIFEST_NAME, ("writer", "options", "source"))):
        try:
            value: Any = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            return value
    return None


def _refuse_another_dataset(out: Path, identity: str) -> None:
    """`out` may be new, empty, or hold a (complete or interrupted) write of the same source;
    shards of another dataset are not replaced without `overwrite` (as `lsdr export`)."""
    if not out.is_dir():
        return
    shards = sorted(e.name for e in os.scandir(out) if SHARD_RE.match(e.name))
    recorded = _recorded_source(out)
    if recorded is None and not shards and not (out / MANIFEST_NAME).exists():
        return
    if recorded is not None and (recorded == identity or _resolved(recorded) == _resolved(identity)):
        return
    what = f"the shards of {recorded}" if recorded else f"{len(shards)} shards of unknown origin"
    raise DataError(f"{out}: holds {what}, not of {identity}; writing here would replace them "
                    "(use --overwrite, or another output directory)")


def _encoded_stream(todo: list[PlannedShard], class_names: list[str],
                    options: dict[str, Any], workers: int | None) -> Iterator[dict[str, Any]]:
    """Encoding results in plan order; a bounded window of chunks runs in worker processes."""
    tasks = [
        (key, it.path, it.rel, it.label,
         class_names[it.label] if it.label is not None and it.label < len(class_names) else None)
        for shard in todo for key, it in shard.items
    ]
    chunks = [tasks[i:i + CHUNK] for i in range(0, len(tasks), CHUNK)]
    workers = (os.cpu_count() or 1) if workers is None else workers
    workers = min(workers, len(chunks))
    if workers <= 1:
        for chunk in chunks:
            yield from _encode_chunk(chunk, options)
        return
    window = workers * 4  # chunks in flight: keeps workers busy, bounds memory
    pool = cf.ProcessPoolExecutor(max_workers=workers)
    try:
        pending: collections.deque[cf.Future] = collections.deque()
        it = iter(chunks)
        for chunk in it:
            pending.append(pool.submit(_encode_chunk, chunk, options))
            if len(pending) >= window:
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_encode_chunk, nxt, options))
            yield from done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_one(out: Path, shard: PlannedShard, results: Iterator[dict[str, Any]], bar) -> dict:
    writer = ShardTarWriter(out / shard.name)
    skipped: list[dict[str, str]] = []
    notes: collections.Counter[str] = collections.Counter()
    reencoded = 0
    try:
        for key, item in shard.items:
            r = next(results)
            if r["rel"] != item.rel:  # the stream and the plan must agree: a bug otherwise
                raise RuntimeError(f"writer out of step at {item.rel} / {r['rel']}")
            bar.update(1)
            if not r["ok"]:
                skipped.append({"path": item.rel, "reason": r["reason"]})
                log.debug("skipping %s: %s", item.rel, r["reason"])
                bar.set_postfix(skipped=len(skipped), refresh=False)
                continue
            members = {"jpg": r["jpg"], "json": json.dumps(r["meta"], sort_keys=True).encode()}
            if item.label is not None:
                members["cls"] = str(item.label).encode()
            writer.add(key, members)
            notes.update(r["notes"])
            reencoded += bool(r["reencoded"])
        sha, size = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = {"name": shard.name, "plan": shard.digest, "sha256": sha, "bytes": size,
              "num_samples": writer.count, "skipped": skipped, "notes": dict(sorted(notes.items())),
              "reencoded": reencoded}
    write_json_atomic(out / STATE_DIR / f"{shard.name}.json", record)
    return record


def _read_record(out: Path, name: str) -> dict[str, Any] | None:
    """The shard's record: from OUT/.lsdr-write/ during a write, else from the finished write's
    report (where `_finish` moves them, so a complete directory has no hidden state)."""
    path = out / STATE_DIR / f"{name}.json"
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        pass
    try:
        records = json.loads((out / REPORT_NAME).read_text()).get("shard_records", {})
    except (OSError, ValueError, AttributeError):
        return None
    record = records.get(name) if isinstance(records, dict) else None
    return record if isinstance(record, dict) else None


def _still_valid(path: Path, record: dict[str, Any], digest: str) -> bool:
    try:
        return (record.get("plan") == digest and path.stat().st_size == record.get("bytes")
                and sha256_file(path) == record.get("sha256"))
    except OSError:
        return False


def _remove_stale(out: Path, prefix: str, planned: set[str]) -> None:
    """Temp files of an interrupted write, and shards of this prefix the plan no longer has."""
    for entry in os.scandir(out):
        name = entry.name
        if name.startswith(".") and name.endswith(".tar.tmp"):
            Path(entry.path).unlink(missing_ok=True)
            continue
        m = SHARD_RE.match(name)
        if m and m.group("prefix") == prefix and name not in planned:
            log.info("%s: removing %s (not part of this write)", out, name)
            Path(entry.path).unlink(missing_ok=True)
            (out / STATE_DIR / f"{name}.json").unlink(missing_ok=True)


def _finish(out: Path, plan: list[PlannedShard], records: dict[str, dict[str, Any]],
            source: Source, reused: list[str], written: list[str], *, prefix: str, seed: int,
            max_count: int, max_bytes: int, encode_options: dict[str, Any], layout: str,
            source_label: str) -> WriteResult:
    ordered = [records[s.name] for s in plan]
    skipped_files = source.skipped + [s for r in ordered for s in r["skipped"]]
    notes: collections.Counter[str] = collections.Counter()
    for r in ordered:
        notes.update(r["notes"])
    total_written = sum(r["num_samples"] for r in ordered)
    report = {
        "source": source_label, "layout": source.kind, "total_files": len(source.items),
        "written": total_written, "skipped": len(skipped_files),
        "reencoded": sum(r["reencoded"] for r in ordered),
        "conversions": dict(sorted(notes.items())),
        "skipped_files": skipped_files,
        "shards_reused": reused, "shards_written": written,
        # what a re-run needs to keep these shards (checked against their sha256 again)
        "shard_records": {r["name"]: r for r in ordered},
    }
    report_path = out / REPORT_NAME
    write_json_atomic(report_path, report)
    if total_written == 0:
        raise DataError(f"{source_label}: none of its {len(source.items)} files could be used "
                        f"(reasons in {report_path})")
    manifest = Manifest(
        root=out,
        shards=tuple(ShardInfo(r["name"], r["num_samples"], r["bytes"], r["sha256"], r["plan"])
                     for r in ordered),
        class_names=tuple(source.class_names), labelled=source.labelled,
        skipped=len(skipped_files),
        writer={
            "name": "lsdr-repr data_pipelines.writer", "version": __version__,
            "writer_format": WRITER_FORMAT,
            "options": {"source": source_label, "layout": source.kind, "prefix": prefix,
                        "seed": seed, "max_count": max_count, "max_bytes": max_bytes,
                        **encode_options},
        },
    )
    manifest_path = write_manifest(manifest)
    # Complete: the manifest says which source this is and the report holds the shard records,
    # so the hidden work folder goes (a shard folder is often shared or copied as it is).
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    if skipped_files:
        log.warning("%s: skipped %d of %d files (reasons in %s)", out, len(skipped_files),
                    len(source.items), report_path)
    return WriteResult(out, manifest, manifest_path, report_path, total_written,
                       len(skipped_files), reused, written)


def is_image_folder(path: str | os.PathLike) -> bool:
    """A local class-per-subfolder image tree (ImageFolder), not a shard directory."""
    path = Path(os.path.expanduser(str(path)))
    return (path.is_dir() and not (path / MANIFEST_NAME).exists()
            and not any(path.glob("*.tar")) and any(p.is_dir() for p in path.iterdir()))


def shards_for_image_folder(src: str | os.PathLike, out: str | os.PathLike, *,
                            progress: bool = True) -> tuple[Path, bool]:
    """`out`, holding the shards of the ImageFolder `src`: written now (with a progress bar) if
    `out` has no manifest yet, else reused as it is. Returns (out, whether it was written).

    For `lsdr train` with `data.train_shards` naming an image folder: the shards are written
    once, into the run directory, and every later start (resume, requeue) streams them.
    """
    out = Path(out)
    if (out / MANIFEST_NAME).is_file():
        return out, False
    write_shards(src, out, layout="imagefolder", progress=progress)
    return out, True
