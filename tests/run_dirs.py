"""The tiny runs the trainer tests start, and what a test reads from the run directory they
write (no W&B import: the GPU tests run where wandb is not installed)."""

from __future__ import annotations

from pathlib import Path

import torch

from lsdr_repr.checkpoint import find_latest_valid, load_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

# A run small enough for seconds on 2 cores, large enough to exercise every component.
TINY = [
    "data.image_size=32", "data.batch_size=16", "data.num_workers=1", "data.prefetch_factor=2",
    "data.shuffle_buffer=64", "augment.crop_size=24", "model.projector=[64, 64, 64]",
    "train.total_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=3",
    "train.log_every=2", "train.image_grid_every=4", "train.spectrum_every=4",
    "train.device=cpu", "log.progress=false",
]


def tiny_overrides(sample_shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train_shards={sample_shards['train']}",
        f"data.val_shards={sample_shards['val']}",
        f"data.test_shards={sample_shards['test']}",
        f"train.run_dir={run_dir}",
        *TINY,
        *extra,
    ]


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of RUN_DIR/checkpoints/step-*.pt, ascending ([] before the first is written)."""
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(find_latest_valid(run_dir))["model"]
