"""What a run directory (`train.run_dir`) holds, named once for every module that reads or
writes one: the trainer, the checkpoint writer, tracking, `lsdr submit` and `lsdr status`.

    RUN_DIR/config.yaml                     the resolved config (also in every checkpoint)
    RUN_DIR/metrics.jsonl                   every logged metric, one JSON record a line
    RUN_DIR/checkpoints/step-00001000.pt    checkpoints (+ .sha256 sidecars)

No imports beyond the standard library, so `lsdr status` can use it without torch.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_FILE = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-*.pt` file in RUN_DIR/checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _CHECKPOINT_FILE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)
