"""Read back what a W&B offline run logged, for tests (wandb 0.31 has no public reader).

    rows = read_wandb_history(run_dir)      # RUN_DIR, RUN_DIR/wandb, an offline-run dir or a file
    assert rows[-1]["loss"] == pytest.approx(0.5) and rows[-1]["_step"] == 99

A `.wandb` file is a LevelDB-log-framed stream of `wandb_internal_pb2.Record` messages: a 7-byte
header (b":W&B", magic 0xBEE1 little-endian, a version byte), then 32 KiB blocks; each fragment has
a 7-byte header (CRC-32 of type byte + data: 4 bytes LE, length: 2 bytes LE, type: 1 byte;
FULL=1, FIRST=2, MIDDLE=3, LAST=4). A block tail shorter than a header is zero padding.
A resumed run writes a new `offline-run-<time>-<id>[-<n>]` directory with the same id; all of
them are read, oldest first. A finished run's file ends with an `exit` record, written a moment
after `run.finish()` returns: the readers wait for it (`wait_s`, see `wandb_files`).
"""

from __future__ import annotations

import json
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = struct.Struct("<4sHB")
_MAGIC = (b":W&B", 0xBEE1)
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
# offline-run-20261124_031349-abc123 or ...-abc123-1 (W&B's suffix when the second is taken)
_RUN_DIR = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+?)(?:-(\d+))?$")


def wandb_files(path: str | Path, wait_s: float = 10.0) -> list[Path]:
    """The `.wandb` files under RUN_DIR, RUN_DIR/wandb, a run dir (or the file), oldest first.

    `run.finish()` returns before W&B's service process has written the file (it may still hold
    only its header), so each file is waited for, up to `wait_s` seconds in all, until it holds
    the run's `exit` record; a run that crashed never writes one: pass `wait_s=0` for those.
    """
    path = Path(path)
    if path.is_file():
        _wait_for_exit_records([path], wait_s)
        return [path]
    if (path / "wandb").is_dir():
        path = path / "wandb"
    candidates = sorted(path.glob("run-*.wandb"))
    if candidates:
        _wait_for_exit_records(candidates, wait_s)
        return candidates
    found = []
    for run_dir in path.iterdir():
        match = _RUN_DIR.match(run_dir.name)
        # `latest-run` is a symlink to one of the others: skipped by the pattern and the check
        if match and run_dir.is_dir() and not run_dir.is_symlink():
            found += [(match, file) for file in run_dir.glob("run-*.wandb")]
    _wait_for_exit_records([file for _, file in found], wait_s)
    # Directory names resolve only to the second; the run record's start time to the
    # microsecond orders runs started within one second (a quick requeue, tests).
    keys = [(_start_time(file), m.group(1), int(m.group(3) or 0), file) for m, file in found]
    return [key[-1] for key in sorted(keys)]


def _wait_for_exit_records(files: list[Path], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    for file in files:
        while not _has_exit_record(file) and time.monotonic() < deadline:
            time.sleep(0.05)


def _has_exit_record(file: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in read_records(file))
    except (OSError, ValueError):
        return False


def _start_time(file: Path) -> float:
    for record in read_records(file):
        if record.WhichOneof("record_type") == "run":
            return record.run.start_time.seconds + record.run.start_time.nanos * 1e-9
    return float("inf")


def read_records(file: str | Path) -> Iterator[pb.Record]:
    """Every record of one `.wandb` file; an incomplete record at the end (a live run) is left."""
    data = Path(file).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{file}: too short for a W&B file header")
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    if (ident, magic) != _MAGIC:
        raise ValueError(f"{file}: not a W&B transaction log (header {data[:7]!r})")
    pos = _FILE_HEADER.size
    pending = bytearray()
    while True:
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER.size:
            pos += left_in_block  # zero padding at the end of a block
            continue
        if pos + _RECORD_HEADER.size > len(data):
            return
        crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        start = pos + _RECORD_HEADER.size
        if start + length > len(data):
            return  # torn tail
        payload = data[start:start + length]
        pos = start + length
        if crc == 0 and length == 0 and kind == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0  # padding record
            continue
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{file}: CRC mismatch in the record at byte {start - 7}")
        if kind == _FULL:
            pending = bytearray(payload)
        elif kind == _FIRST:
            pending = bytearray(payload)
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        elif kind == _LAST:
            pending += payload
        else:
            raise ValueError(f"{file}: unknown fragment type {kind} at byte {start - 7}")
        record = pb.Record()
        record.ParseFromString(bytes(pending))
        pending = bytearray()
        yield record


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _set_item(target: dict[str, Any], item: Any) -> None:
    """Put one history/summary item in place: logged dicts and media (wandb.Image) arrive
    flattened into `nested_key` parts and are rebuilt as nested dicts."""
    parts = [item.key] if item.key else list(item.nested_key)
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = json.loads(item.value_json)


def read_wandb_history(path: str | Path, wait_s: float = 10.0) -> list[dict[str, Any]]:
    """History rows of all runs under `path`, in order: {key: JSON-decoded value}, with `_step`,
    `_timestamp`, `_runtime`; an image is a dict ({"_type": "image-file", "path": ...})."""
    rows = []
    for file in wandb_files(path, wait_s):
        for record in read_records(file):
            if record.WhichOneof("record_type") == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:
                    _set_item(row, item)
                rows.append(row)
    return rows


def read_wandb_config(path: str | Path, wait_s: float = 10.0) -> dict[str, Any]:
    """The run config (top-level keys, JSON-decoded; later updates win), W&B's `_wandb` left out."""
    config: dict[str, Any] = {}
    for file in wandb_files(path, wait_s):
        for record in read_records(file):
            kind = record.WhichOneof("record_type")
            updates = (record.run.config.update if kind == "run"
                       else record.config.update if kind == "config" else [])
            for item in updates:
                key = _item_key(item)
                if key != "_wandb":
                    config[key] = json.loads(item.value_json)
    return config


def read_wandb_summary(path: str | Path, wait_s: float = 10.0) -> dict[str, Any]:
    """The final summary values (later updates win), W&B's internal keys left out."""
    summary: dict[str, Any] = {}
    for file in wandb_files(path, wait_s):
        for record in read_records(file):
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    if not _item_key(item).startswith("_"):
                        _set_item(summary, item)
    return summary


def read_wandb_run_ids(path: str | Path, wait_s: float = 10.0) -> list[str]:
    """The run id of each `.wandb` file under `path`, oldest first."""
    ids = []
    for file in wandb_files(path, wait_s):
        for record in read_records(file):
            if record.WhichOneof("record_type") == "run":
                ids.append(record.run.run_id)
                break
    return ids
