"""A trained backbone from a run directory, a checkpoint file or an export folder.

    trained = load_trained_backbone("runs/demo")       # newest valid checkpoint of the run
    trained.backbone(images)                            # timm model, num_classes=0, eval, CPU
    random_backbone(trained)                            # same architecture, random init

What export, evaluation and the benchmarks share: they need the backbone and what is known of
its run (input size, mean/std, step, W&B run), never the trainer. Checkpoints are read with
`torch.load(weights_only=True)` (lsdr_repr.checkpoint), exports with safetensors: no arbitrary
object is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsdr_repr.errors import CheckpointError, ConfigError

WEIGHTS_NAME = "model.safetensors"  # of an export folder (timm's hub layout)
BACKBONE_PREFIX = "backbone."  # of the backbone's keys in an SSLModel state dict


@dataclass
class TrainedBackbone:
    """A backbone rebuilt from a checkpoint (or an export) with what is known about its run."""

    backbone: nn.Module  # timm model, num_classes=0, eval mode, float32, CPU
    arch: str
    image_size: int  # the train crop size R: the input side the backbone was trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    config: Any = None  # lsdr_repr.config.Config when the source is a checkpoint
    checkpoint: Path | None = None
    run_dir: Path | None = None
    step: int | None = None
    samples_seen: int | None = None
    wandb_run_id: str | None = None
    weights_file: Path | None = None  # model.safetensors when the source is an export folder

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def cache_key(self) -> str:
        """Identifies these weights for the feature cache (path, size and mtime of the file)."""
        src = self.checkpoint or self.weights_file
        if src is None:
            return f"{self.arch}:unsaved:{id(self.backbone)}"
        stat = Path(src).stat()
        return f"{Path(src).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"



def backbone_state_dict(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys of the backbone: the "backbone.*" entries of an SSLModel state dict, unprefixed."""
    out = {
        k[len(BACKBONE_PREFIX):]: v for k, v in model_state.items() if k.startswith(BACKBONE_PREFIX)
    }
    if not out:
        raise CheckpointError("checkpoint 'model' has no 'backbone.*' keys (not an SSLModel state)")
    return out


def read_checkpoint(source: str | Path) -> tuple[Path, Path | None, dict]:
    """(checkpoint file, run dir or None, state) for a run directory or a checkpoint file.

    A run directory gives its newest checkpoint that verifies and loads (lsdr_repr.checkpoint).
    """
    from lsdr_repr.checkpoint import MODEL_KEYS, load_checkpoint, load_latest

    path = Path(source)
    if path.is_dir():
        found = load_latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint in {path / 'checkpoints'}")
        return found[0], path, found[1]
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run_dir, load_checkpoint(path, required=MODEL_KEYS)
    raise CheckpointError(f"{path}: no such run directory or checkpoint file")


def is_export_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / WEIGHTS_NAME).is_file()


def load_trained_backbone(source: str | Path) -> TrainedBackbone:
    """The backbone of a run directory (newest valid checkpoint), a checkpoint file or an export.

    Checkpoints are read with `torch.load(weights_only=True)` (lsdr_repr.checkpoint), exports with
    safetensors: no arbitrary object is ever unpickled.
    """
    if Path(source).is_dir() and is_export_dir(source):
        return _load_export_dir(Path(source))

    from lsdr_repr.builders.model import build_model
    from lsdr_repr.config import config_from_dict

    ckpt_path, run_dir, ckpt = read_checkpoint(source)
    try:
        cfg = config_from_dict(ckpt["config"], source=str(ckpt_path))
    except ConfigError as exc:
        raise CheckpointError(f"{ckpt_path}: stored config is invalid: {exc}") from None
    # Build the architecture exactly as the trainer did (same factory, same config), then load the
    # backbone strictly: a missing or extra key means the checkpoint is not for this model.
    model = build_model(cfg.model)
    backbone = model.backbone
    state = backbone_state_dict(ckpt["model"])
    mismatch = _state_mismatch(backbone.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{ckpt_path}: backbone weights do not fit {cfg.model.arch}: "
                              f"{mismatch}")
    backbone.load_state_dict(state, strict=True)
    _prepare_for_inference(backbone)
    return TrainedBackbone(
        backbone=backbone,
        arch=cfg.model.arch,
        image_size=int(cfg.augment.crop_size),
        mean=tuple(float(v) for v in cfg.augment.mean),
        std=tuple(float(v) for v in cfg.augment.std),
        interpolation=_reader_interpolation(),
        config=cfg,
        checkpoint=ckpt_path,
        run_dir=run_dir,
        step=_int_or_none(ckpt.get("step")),
        samples_seen=_int_or_none(ckpt.get("samples_seen")),
        wandb_run_id=ckpt.get("wandb_run_id") or None,
    )


def _state_mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """'' when `given` has exactly the keys and shapes of `expected`, else what differs."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    shapes = sorted(k for k in set(expected) & set(given) if expected[k].shape != given[k].shape)
    parts = []
    for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {what} key(s) {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def random_backbone(trained: TrainedBackbone, seed: int = 0) -> nn.Module:
    """The same architecture at random initialisation (the baseline a probe should beat)."""
    import timm

    from lsdr_repr.builders.model import build_model

    # A seeded initialisation that leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if trained.config is not None:
            backbone = build_model(trained.config.model).backbone
        else:
            # The construction arguments timm recorded for the loaded model (img_size, ...).
            args = _model_args(trained.backbone)
            args["num_classes"] = 0
            backbone = timm.create_model(trained.arch, pretrained=False, **args)
    _prepare_for_inference(backbone)
    return backbone


def _load_export_dir(path: Path) -> TrainedBackbone:
    import timm

    try:
        backbone = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True, num_classes=0)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable timm export: {first}") from None
    _prepare_for_inference(backbone)
    pcfg = backbone.pretrained_cfg
    config = json.loads((path / "config.json").read_text())
    meta = config.get("lsdr") or {}
    return TrainedBackbone(
        backbone=backbone,
        arch=config["architecture"],
        image_size=int(pcfg["input_size"][-1]),
        mean=tuple(float(v) for v in pcfg["mean"]),
        std=tuple(float(v) for v in pcfg["std"]),
        interpolation=str(pcfg.get("interpolation", "bilinear")),
        step=_int_or_none(meta.get("step")),
        samples_seen=_int_or_none(meta.get("samples_seen")),
        weights_file=path / WEIGHTS_NAME,
    )


def _prepare_for_inference(backbone: nn.Module) -> None:
    backbone.float().eval()
    backbone.to(memory_format=torch.contiguous_format)
    if hasattr(backbone, "set_grad_checkpointing"):
        # Checkpointing only matters for training; traced exports must not contain it.
        backbone.set_grad_checkpointing(False)
    backbone.requires_grad_(False)


def _reader_interpolation() -> str:
    """The resampling filter of the reader (recorded in the export's pretrained_cfg)."""
    from data_pipelines.reader import INTERPOLATION

    return INTERPOLATION


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _model_args(backbone: nn.Module) -> dict:
    from timm.models._input import get_model_args

    return dict(get_model_args(backbone, {}))
