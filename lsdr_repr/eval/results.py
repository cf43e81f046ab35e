"""Where an evaluation's result goes: RESULTS/<name>.json (atomic), its plots as PNG, and the
metrics into the run's own W&B run when its id is stored in the checkpoint."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lsdr_repr.backbone import TrainedBackbone

log = logging.getLogger(__name__)


def results_dir_for(trained: TrainedBackbone, out: str | Path | None) -> Path | None:
    if out is not None:
        return Path(out)
    if trained.run_dir is not None:
        return trained.run_dir / "eval"
    return None


def write_result(results_dir: Path | None, name: str, payload: dict[str, Any],
                  trained: TrainedBackbone, plots: dict[str, Any] | None = None) -> Path | None:
    """RESULTS/<name>.json (atomic) and the metrics to the run's W&B run."""
    payload = {"name": name, "arch": trained.arch, "step": trained.step,
               "checkpoint": str(trained.checkpoint or trained.weights_file),
               **payload}
    path = None
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    if results_dir is not None:
        from PIL import Image

        for key, image in (plots or {}).items():  # RESULTS/<name>_<key>.png, also to W&B
            Image.fromarray(image).save(results_dir / f"{name}_{key}.png")
    _log_to_wandb(trained, name, payload, plots)
    return path


def _log_to_wandb(trained: TrainedBackbone, name: str, payload: dict[str, Any],
                  plots: dict[str, Any] | None = None) -> None:
    """Metrics (and the spectrum) into the run's own W&B run, resumed by its stored id."""
    from lsdr_repr.tracking import read_run_id

    run_id = trained.wandb_run_id
    if run_id is None and trained.run_dir is not None:
        run_id = read_run_id(trained.run_dir)
    if trained.config is None or trained.run_dir is None or not run_id:
        log.info("eval %s: no W&B run recorded for this source: not logging to W&B", name)
        return
    from lsdr_repr.config import config_to_dict
    from lsdr_repr.tracking import make_tracker

    step = trained.step or 0
    metrics = {f"eval/{name}/{k}": v for k, v in payload.get("metrics", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracker = make_tracker(trained.config.log, config_to_dict(trained.config), trained.run_dir,
                           0, run_id=run_id)
    try:
        tracker.log(metrics, step)
        eig = payload.get("details", {}).get("eigenvalues")
        if eig:
            m = payload.get("metrics", {})
            tracker.log_spectrum(torch.tensor(eig), step, key=f"eval/{name}/spectrum",
                                 num_samples=m.get("num_samples"), rankme=m.get("rankme"))
        for key, image in (plots or {}).items():
            tracker.log_plot(f"eval/{name}/{key}", image, step)
    finally:
        tracker.finish()
