"""What a test reads from a run directory the trainer wrote."""

from __future__ import annotations

from pathlib import Path


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of RUN_DIR/checkpoints/step-*.pt, ascending ([] before the first is written)."""
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
