"""Features computed once per (weights, data, view) and stored as safetensors; `Evaluator`, a
loaded backbone with its results folder and feature cache (one per `lsdr eval` command)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipelines.writer import is_image_folder
from lsdr_repr.backbone import TrainedBackbone
from lsdr_repr.eval.features import Features, extract_features, resolve_device

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _data_identity(data: str | Path) -> str:
    """What the feature cache keys on for a data source (content digests where recorded)."""
    if is_image_folder(data):
        files = sorted(p for p in Path(data).rglob("*") if p.is_file())
        return json.dumps([str(Path(data).resolve())] +
                          [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    from data_pipelines.manifest import is_remote, resolve_shards

    urls, manifest = resolve_shards(str(data))
    if manifest is not None:
        return json.dumps([str(manifest.root.resolve())] + [s.sha256 for s in manifest.shards])
    ids = []
    for url in urls:
        if is_remote(url):
            ids.append(url)
        else:
            st = os.stat(url)
            ids.append(f"{Path(url).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return json.dumps(ids)


def cached_features(
    backbone: nn.Module,
    weights_key: str,
    data: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    cache_dir: Path | None,
    **kwargs: Any,
) -> Features:
    """`extract_features`, stored as safetensors in `cache_dir` keyed by weights, data and view."""
    if cache_dir is None:
        return extract_features(backbone, data, image_size, mean, std, **kwargs)
    from safetensors.torch import load_file, save_file

    key = json.dumps([CACHE_VERSION, weights_key, _data_identity(data), image_size, list(mean),
                      list(std), kwargs.get("max_samples")])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"features-{digest}.safetensors"
    if path.is_file():
        try:
            stored = load_file(str(path))
            log.info("features of %s from cache %s", data, path.name)
            return Features(stored["x"], stored["y"], int(stored["skipped"]))
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            log.warning("feature cache %s unreadable (%s): recomputing", path, exc)
    started = time.perf_counter()
    feats = extract_features(backbone, data, image_size, mean, std, **kwargs)
    log.info("features of %s: %d x %d in %.1fs", data, *feats.x.shape,
             time.perf_counter() - started)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"x": feats.x.contiguous(), "y": feats.y.contiguous(),
               "skipped": torch.tensor(feats.skipped)}, str(tmp))
    os.replace(tmp, path)
    return feats


class Evaluator:
    """A loaded backbone with its results folder and feature cache (one per CLI command)."""

    def __init__(self, trained: TrainedBackbone, results_dir: Path | None, device: str,
                 batch_size: int, num_workers: int, progress: bool = False) -> None:
        self.trained = trained
        self.progress = progress  # each pass: a bar on a terminal, log lines elsewhere
        self.results_dir = results_dir
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        trained.backbone.to(self.device)

    def features(self, data: str | Path, backbone: nn.Module | None = None,
                 weights_key: str | None = None, max_samples: int | None = None) -> Features:
        t = self.trained
        cache = self.results_dir / "cache" if self.results_dir is not None else None
        return cached_features(
            backbone if backbone is not None else t.backbone,
            weights_key or t.cache_key(), data, t.image_size, t.mean, t.std, cache,
            device=self.device, batch_size=self.batch_size, num_workers=self.num_workers,
            max_samples=max_samples, progress=self.progress,
        )
