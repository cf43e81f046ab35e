"""Evaluate a trained backbone: kNN, linear probe, fine-tuning, invariance and effective rank.

    lsdr eval knn runs/demo --train data/sample/train --val data/sample/val
    lsdr eval linear runs/demo                      # shards default to the run's data.* entries
    lsdr eval invariance runs/demo --data data/sample/test
    lsdr eval rank runs/demo

SOURCE is a run directory (newest valid checkpoint), a checkpoint file or a timm export folder.
Images are read with the finite eval reader (`data_pipelines.reader.make_eval_loader`; a plain
ImageFolder tree works too) as the centre view at the train input size R, normalised with the run's
mean/std. Features are computed once per (weights, data, size) and cached under the results folder.
Every command prints a table, writes RESULTS/<name>.json (RESULTS = RUN_DIR/eval by default) and
logs to the run's W&B run when its id is stored in the checkpoint.

Library use: `online_knn` (the trainer's periodic kNN), `extract_features`, `invariance_table`,
`demo_report`/`format_report` (the end of `lsdr demo`); the maths lives in `lsdr_repr.probes`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsdr_repr import invariance, probes
from lsdr_repr.backbone import TrainedBackbone, load_trained_backbone, random_backbone
from lsdr_repr.errors import ConfigError, DataError, LsdrError

log = logging.getLogger(__name__)

# The invariance table's families (lsdr_repr.invariance: Kornia's transforms, two fills).
FAMILIES = tuple(invariance.LEVELS)
INVARIANCE_LEGEND = ("cosine(image, transformed) / the same centred / retrieval top-1 of the "
                     "transformed copy among the originals (Kornia's rotate, scale and "
                     "brightness; zero and reflection fill)")
CACHE_VERSION = 1


@dataclass
class Features:
    x: torch.Tensor  # [N, F] float32, CPU
    y: torch.Tensor  # [N] int64 (-1: unlabelled)
    skipped: int = 0  # samples the reader could not decode

    def labelled(self, what: str) -> Features:
        """Self, or a `DataError` naming `what` if any sample lacks a label."""
        if len(self.y) == 0:
            raise DataError(f"{what}: no images were read")
        missing = int((self.y < 0).sum())
        if missing:
            raise DataError(f"{what}: {missing} of {len(self.y)} samples have no label (cls)")
        return self


# ------------------------------------------------------------------------------------ reading
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_image_folder(path: str | Path) -> bool:
    """A class-per-subfolder image tree (torchvision ImageFolder) rather than a shard spec."""
    path = Path(path)
    return (path.is_dir() and not (path / "manifest.json").exists()
            and not any(path.glob("*.tar")) and any(p.is_dir() for p in path.iterdir()))


def iter_images(
    data: str | Path,
    image_size: int,
    batch_size: int = 128,
    num_workers: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(uint8 images [B,3,S,S], labels [B], skipped) of a shard spec or ImageFolder, in order."""
    if is_image_folder(data):
        yield from _iter_image_folder(Path(data), image_size, batch_size, num_workers)
        return
    from data_pipelines.reader import make_eval_loader

    loader = make_eval_loader(str(data), image_size, batch_size, num_workers)
    for batch in loader:
        yield batch.images, batch.labels, int(batch.skipped)


def _image_folder_transform(image_size: int) -> Callable:
    from torchvision import transforms

    # The eval reader's view: shorter side to S, centre crop S.
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR,
                          antialias=True),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


def _iter_image_folder(
    root: Path, image_size: int, batch_size: int, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    from torchvision.datasets import ImageFolder

    try:
        dataset = ImageFolder(str(root), transform=_image_folder_transform(image_size))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{root}: not a readable image folder ({exc})") from None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    for images, labels in loader:
        yield images, labels.long(), 0


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


# ---------------------------------------------------------------------------------- features
def normalize_images(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [B,3,S,S] (or float in [0,1]) -> float [B,3,size,size] normalised with mean/std."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 128,
    num_workers: int = 2,
    max_samples: int | None = None,
    progress: bool = False,
) -> Features:
    """Embeddings [N,F] and labels [N] of every image in `data` (centre view at image_size).

    The backbone is put in eval mode for the pass and given back in the mode it was in.
    `progress`: a tqdm bar on stderr (images; the total when a manifest or folder tells it).
    """
    from lsdr_repr.tracking import progress_bar

    device = resolve_device(device)
    was_training = backbone.training
    backbone.eval()
    xs, ys, skipped, seen = [], [], 0, 0
    total = _count_images(data) if progress else None
    if total is not None and max_samples is not None:
        total = min(total, max_samples)
    try:
        with progress_bar(total, f"features of {data}", "img", progress) as bar:
            for images, labels, skip in iter_images(data, image_size, batch_size, num_workers):
                skipped += skip
                if max_samples is not None:
                    images, labels = images[:max_samples - seen], labels[:max_samples - seen]
                x = normalize_images(images.to(device, non_blocking=True), image_size, mean, std)
                xs.append(backbone(x).float().cpu())
                ys.append(labels.long().cpu())
                seen += len(labels)
                bar.update(len(labels))
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        backbone.train(was_training)
    if not xs:
        raise DataError(f"{data}: no images were read")
    return Features(torch.cat(xs), torch.cat(ys), skipped)


def _count_images(data: str | Path) -> int | None:
    """How many images `data` holds, if that is cheap to know (a manifest, a local folder);
    None otherwise (the bar then counts without a total)."""
    try:
        if is_image_folder(data):
            return sum(1 for p in Path(data).rglob("*") if p.is_file())
        from data_pipelines.sources import resolve_source

        counts = [resolve_source(part).manifest for part in str(data).split("::")]
        return sum(m.num_samples for m in counts) if all(counts) else None
    except (OSError, LsdrError):
        return None


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
        self.progress = progress  # tqdm bars on stderr for each pass
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


# ------------------------------------------------------------------------------ evaluations
def knn_eval(ev: Evaluator, train: str, val: str, k: int = 20,
             temperature: float = 0.07) -> dict[str, Any]:
    tr = ev.features(train).labelled(train)
    va = ev.features(val).labelled(val)
    acc = probes.knn_accuracy(tr.x.to(ev.device), tr.y.to(ev.device), va.x.to(ev.device),
                              va.y.to(ev.device), k=k, temperature=temperature)
    return {"metrics": {**acc, "k": k, "temperature": temperature},
            "details": {"train": str(train), "val": str(val), "num_train": len(tr.y),
                        "num_val": len(va.y)}}


def linear_eval(ev: Evaluator, train: str, val: str,
                weight_decays: Sequence[float] = probes.DEFAULT_WEIGHT_DECAYS,
                seed: int = 0) -> dict[str, Any]:
    tr = ev.features(train).labelled(train)
    va = ev.features(val).labelled(val)
    res = _linear_probe(ev, tr, va, weight_decays=weight_decays, seed=seed)
    return {"metrics": res.metrics(),
            "details": {"train": str(train), "val": str(val), "num_train": len(tr.y),
                        "num_val": len(va.y), "val_top1_per_weight_decay": res.val_top1}}


def _linear_probe(ev: Evaluator, tr: Features, va: Features, **kwargs: Any
                  ) -> probes.LinearProbeResult:
    """`probes.linear_probe` on the evaluator's device, with a bar over its L-BFGS fits."""
    from lsdr_repr.tracking import progress_bar

    fits = probes.linear_probe_fits(kwargs.get("weight_decays", probes.DEFAULT_WEIGHT_DECAYS))
    with progress_bar(fits, "linear probe (L-BFGS fits)", "fit", ev.progress) as bar:
        def on_fit(what: str) -> None:
            bar.set_postfix_str(what, refresh=False)
            bar.update(1)

        return probes.linear_probe(tr.x.to(ev.device), tr.y.to(ev.device), va.x.to(ev.device),
                                   va.y.to(ev.device), on_fit=on_fit, **kwargs)


def embedding_rank(z: torch.Tensor) -> dict[str, Any]:
    """z [N,F] -> {"rankme", "numerical_rank", "eigenvalues" [F] (covariance, descending)}.

    RankMe and the spectrum are the trainer's own (lsdr_repr.objectives); numerical_rank counts
    eigenvalues above 1e-6 of the largest (float32 features carry ~1e-7 relative noise).
    """
    from lsdr_repr.objectives import covariance_spectrum, embedding_diagnostics

    eig = covariance_spectrum(z.float()).float().cpu()
    rank = embedding_diagnostics(z.float())["rankme"]
    top = float(eig[0]) if eig.numel() else 0.0
    numerical = int((eig > 1e-6 * top).sum()) if top > 0 else 0
    return {"rankme": float(rank), "numerical_rank": numerical, "eigenvalues": eig}


def rank_eval(ev: Evaluator, data: str, max_samples: int | None = None) -> dict[str, Any]:
    feats = ev.features(data, max_samples=max_samples)
    if feats.x.shape[0] < 2:
        raise DataError(f"{data}: the rank needs at least 2 images")
    result = embedding_rank(feats.x)
    eig, rank = result["eigenvalues"], result["rankme"]
    png = None
    if ev.results_dir is not None:
        png = plot_spectrum(eig, ev.results_dir / "rank_spectrum.png",
                            f"{ev.trained.arch} step {ev.trained.step}, {len(feats.x)} images",
                            num_samples=len(feats.x), rankme=rank)
    return {"metrics": {"rankme": rank, "numerical_rank": result["numerical_rank"],
                        "num_features": int(feats.x.shape[1]),
                        "num_samples": int(feats.x.shape[0])},
            "details": {"data": str(data), "eigenvalues": [float(v) for v in eig],
                        "plot": str(png) if png else None}}


def plot_spectrum(eigenvalues: torch.Tensor, path: Path, title: str,
                  num_samples: int | None = None, rankme: float | None = None) -> Path:
    """Log-scale eigenvalue spectrum [F] (descending) as a PNG: the trainer's plot
    (`tracking.spectrum_plot`: the resolvable eigenvalues, the rank marked, RankMe)."""
    from PIL import Image

    from lsdr_repr.tracking import spectrum_plot

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(spectrum_plot(eigenvalues, title, num_samples, rankme)).save(path)
    return path


def invariance_plot(tables: dict[str, dict[str, dict[str, dict[str, float]]]],
                    title: str = "") -> Any:
    """Retrieval top-1 against transform strength, one line per transform (and fill), one panel
    per backbone in `tables` ({"trained": table, "random_init": table}) -> uint8 [H,W,3]."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(tables) + 2.6, 4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        for row, cells in table.items():
            levels = list(cells)
            values = [cells[level]["retrieval_top1"] for level in levels]
            # the strengths differ per transform (degrees, factors): named in the legend
            ax.plot(range(1, len(levels) + 1), values, marker="o",
                    label=f"{row} ({', '.join(levels)})",
                    linestyle="--" if row.endswith("/reflection") else "-")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("strength (1 = mildest)")
        ax.set_xticks(range(1, max(len(c) for c in table.values()) + 1))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("retrieval top-1 (finds its original)")
    handles, labels = axes[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / fig.get_figwidth(), 1))
    # beside the panels, not over the lines
    fig.legend(handles, labels, loc="center right", fontsize=7, title="transform (strengths)",
               title_fontsize=7, frameon=False)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def invariance_table(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images01: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    families: Sequence[str] = FAMILIES,
    reference: torch.Tensor | None = None,
    batch_size: int = 128,
    on_cell: Callable[[str], None] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {level: scores}} for images [N,3,R,R] in [0,1] and an encoder of normalised
    images [B,3,R,R] -> [B,F]: `lsdr_repr.invariance.invariance_table` (Kornia's transforms,
    zero and reflection fill), features standardised by `reference` [M,F] when given."""
    size = images01.shape[-1]
    return invariance.invariance_table(
        lambda x01: encoder(normalize_images(x01, size, mean, std)), images01, families,
        reference, batch_size, on_cell)


def load_images01(data: str | Path, image_size: int, max_images: int,
                  batch_size: int = 128, num_workers: int = 2) -> torch.Tensor:
    """The first `max_images` images of `data` as float [N,3,S,S] in [0,1]."""
    chunks, seen = [], 0
    for images, _, _ in iter_images(data, image_size, batch_size, num_workers):
        chunks.append(images[:max_images - seen])
        seen += len(chunks[-1])
        if seen >= max_images:
            break
    if not chunks:
        raise DataError(f"{data}: no images were read")
    return torch.cat(chunks).float().div(255.0)


def invariance_eval(ev: Evaluator, data: str, families: Sequence[str] = FAMILIES,
                    max_images: int = 512, reference: str | torch.Tensor | None = None,
                    backbone: nn.Module | None = None) -> dict[str, Any]:
    """The invariance table of the first `max_images` images of `data`; features standardised
    by those of `reference`, the train split, when given: its features [M,F] already computed
    with this backbone, or its data (the first 4096 images are embedded)."""
    t = ev.trained
    unknown = [f for f in families if f not in invariance.LEVELS]
    if unknown:
        known = ", ".join(invariance.LEVELS)
        raise ConfigError(f"invariance: unknown family {unknown[0]!r} (known: {known})")
    images = load_images01(data, t.image_size, max_images, ev.batch_size, ev.num_workers)
    model = backbone if backbone is not None else t.backbone
    if reference is None or isinstance(reference, torch.Tensor):
        ref = reference
    else:
        ref = ev.features(reference, model, max_samples=4096).x
    from lsdr_repr.tracking import progress_bar

    was_training = model.training
    model.eval()
    try:
        with progress_bar(invariance.num_cells(families), f"invariance of {len(images)} images",
                          "transform", ev.progress) as bar:
            def on_cell(name: str) -> None:
                bar.set_postfix_str(name, refresh=False)
                bar.update(1)

            table = invariance_table(model, images.to(ev.device), t.mean, t.std, families,
                                     None if ref is None else ref.to(ev.device), ev.batch_size,
                                     on_cell=on_cell)
    finally:
        model.train(was_training)
    metrics = {f"{row}@{level}/{m}": v for row, cells in table.items()
               for level, cell in cells.items() for m, v in cell.items()}
    return {"metrics": metrics, "table": table,
            "details": {"data": str(data), "num_images": len(images),
                        "reference": reference if isinstance(reference, str) else None}}


def finetune_eval(
    ev: Evaluator,
    train: str,
    val: str,
    epochs: int = 3,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    optim_name: str = "adamw",
    seed: int = 0,
) -> dict[str, Any]:
    """Train the backbone with a new linear head end to end (optimiser and schedule factories of
    pretraining, lsdr_repr.optim) for `epochs` over `train`; top-1/top-5 on `val`."""
    import kornia.augmentation as K

    from lsdr_repr.config import OptimConfig
    from lsdr_repr.optim import build_optimizer, build_scheduler

    t = ev.trained
    torch.manual_seed(seed)
    num_train, num_classes = _count_labelled(train, t.image_size, ev)
    model = copy.deepcopy(t.backbone)
    model.reset_classifier(num_classes)
    model.to(ev.device).train().requires_grad_(True)
    steps_per_epoch = max(1, math.ceil(num_train / ev.batch_size))
    total = epochs * steps_per_epoch
    optim_cfg = OptimConfig(name=optim_name, lr=lr, lr_scaling="linear", base_batch_size=256,
                            weight_decay=weight_decay, warmup_steps=max(1, total // 10),
                            min_lr_ratio=0.01)
    optimizer = build_optimizer(model, optim_cfg, ev.batch_size)
    scheduler = build_scheduler(optimizer, optim_cfg, total)
    # Mild augmentation (scale and flip): fine-tuning for a few epochs, not pretraining.
    augment = nn.Sequential(
        K.RandomResizedCrop((t.image_size, t.image_size), scale=(0.35, 1.0)),
        K.RandomHorizontalFlip(),
    ).to(ev.device)
    from lsdr_repr.tracking import progress_bar

    losses = []
    batches = _train_batches(train, t.image_size, ev.batch_size, ev.num_workers, seed)
    with progress_bar(total, f"fine-tuning {epochs} epochs", "step", ev.progress) as bar:
        _finetune_steps(model, augment, optimizer, scheduler, batches, total, t, ev, losses, bar)
    model.eval()
    scores, labels = [], []
    with torch.no_grad(), progress_bar(_count_images(val) if ev.progress else None,
                                       f"fine-tuned top-1 on {val}", "img", ev.progress) as bar:
        for images, y, _ in iter_images(val, t.image_size, ev.batch_size, ev.num_workers):
            scores.append(model(normalize_images(images.to(ev.device), t.image_size, t.mean,
                                                 t.std)).float().cpu())
            labels.append(y)
            bar.update(len(y))
    y = torch.cat(labels)
    if (y < 0).any():
        raise DataError(f"{val}: {int((y < 0).sum())} samples have no label (cls)")
    acc = probes.topk_accuracy(torch.cat(scores), y)
    return {"metrics": {**acc, "final_loss": sum(losses[-10:]) / len(losses[-10:])},
            "details": {"train": str(train), "val": str(val), "epochs": epochs, "steps": total,
                        "lr": lr, "optimizer": optim_name, "weight_decay": weight_decay,
                        "num_classes": num_classes}}


def _finetune_steps(model: nn.Module, augment: nn.Module, optimizer: Any, scheduler: Any,
                    batches: Iterator, total: int, t: TrainedBackbone, ev: Evaluator,
                    losses: list[float], bar: Any) -> None:
    for step in range(total):
        images, labels = next(batches)
        x = augment(images.to(ev.device).float().div(255.0))
        x = normalize_images(x, t.image_size, t.mean, t.std)
        loss = F.cross_entropy(model(x), labels.to(ev.device), label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise DataError(f"fine-tuning diverged at step {step} (loss {losses[-1]}): lower --lr")
        bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
        bar.update(1)


def _count_labelled(data: str, image_size: int, ev: Evaluator) -> tuple[int, int]:
    """(number of samples, number of classes) of a labelled set."""
    if is_image_folder(data):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(data))
        return len(ds), len(ds.classes)
    from data_pipelines.sources import resolve_source

    manifest = resolve_source(str(data)).manifest
    if manifest is not None and manifest.num_classes:
        return manifest.num_samples, manifest.num_classes
    # No manifest, or integer labels without names: one pass over the labels (tiny images)
    # counts the samples, and the classes are what the data holds.
    log.info("%s: counting the labelled samples (no manifest with class names)", data)
    labels = torch.cat([y for _, y, _ in iter_images(data, 8, 512, ev.num_workers)])
    if (labels < 0).any():
        raise DataError(f"{data}: {int((labels < 0).sum())} samples have no label (cls)")
    return len(labels), int(labels.max()) + 1


def _train_batches(data: str, image_size: int, batch_size: int, num_workers: int,
                   seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (uint8 images, labels) of a labelled set."""
    if is_image_folder(data):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(str(data), transform=_image_folder_transform(image_size))
        gen = torch.Generator().manual_seed(seed)
        while True:
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                                 generator=gen, num_workers=num_workers,
                                                 drop_last=len(ds) > batch_size)
            for images, labels in loader:
                yield images, labels.long()
    from data_pipelines.reader import make_train_loader
    from lsdr_repr.config import DataConfig

    data_cfg = DataConfig(train_shards=str(data), image_size=image_size, batch_size=batch_size,
                          num_workers=num_workers, prefetch_factor=2, resampled=True,
                          pin_memory=torch.cuda.is_available())
    for batch in make_train_loader(data_cfg, seed=seed, rank=0, world_size=1):
        if (batch.labels < 0).any():
            raise DataError(f"{data}: samples without a label (cls) cannot be fine-tuned on")
        yield batch.images, batch.labels


# ------------------------------------------------------------------------- library for others
def online_knn(
    backbone: nn.Module,
    data: str | Path,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: str | torch.device = "auto",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 128,
    num_workers: int = 2,
    max_samples: int | None = None,
) -> dict[str, float]:
    """Leave-one-out kNN top-1/top-5 on one labelled set (the trainer's periodic check).

    Each image is classified by its k nearest *other* images of the same set, so one labelled
    split (data.val_shards) is enough. Run it on rank 0; the backbone's mode is restored.
    """
    feats = extract_features(backbone, data, image_size, mean, std, device=device,
                             batch_size=batch_size, num_workers=num_workers,
                             max_samples=max_samples).labelled(str(data))
    dev = resolve_device(device)
    return probes.knn_accuracy(feats.x.to(dev), feats.y.to(dev), feats.x.to(dev), feats.y.to(dev),
                               k=k, temperature=temperature, exclude_self=True)


def demo_report(
    run_dir: str | Path,
    train_shards: str,
    eval_shards: str,
    *,
    device: str = "auto",
    max_invariance_images: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear probe of the trained backbone vs the same architecture at random init, and the
    invariance table of both, on the held-out `eval_shards` (written to RUN_DIR/eval/demo.json)."""
    trained = load_trained_backbone(run_dir)
    results = results_dir_for(trained, None)
    ev = Evaluator(trained, results, device, batch_size=128, num_workers=2, progress=progress)
    baseline = random_backbone(trained, seed=0).to(ev.device)
    random_key = f"random-init:{trained.arch}:seed0:{trained.cache_key()}"
    report: dict[str, Any] = {"arch": trained.arch, "step": trained.step,
                              "checkpoint": str(trained.checkpoint), "linear": {},
                              "invariance": {}}
    for name, model, key in (("trained", trained.backbone, None),
                             ("random_init", baseline, random_key)):
        tr = ev.features(train_shards, model, key).labelled(train_shards)
        te = ev.features(eval_shards, model, key).labelled(eval_shards)
        res = _linear_probe(ev, tr, te)
        report["linear"][name] = res.metrics()
        # labels are 0..K-1: K is what a classifier head on this data needs
        report["num_classes"] = int(max(tr.y.max(), te.y.max())) + 1
        report["invariance"][name] = invariance_eval(
            ev, eval_shards, max_images=max_invariance_images, reference=tr.x,
            backbone=model)["table"]
    plot = invariance_plot(report["invariance"], f"{trained.arch} after {trained.step} steps: "
                           "retrieval under Kornia's transforms")
    write_result(results, "demo", {"metrics": {
        "linear_top1_trained": report["linear"]["trained"]["top1"],
        "linear_top1_random_init": report["linear"]["random_init"]["top1"]}, **report}, trained,
        plots={"invariance": plot})
    if results is not None:
        report["invariance_plot"] = str(results / "demo_invariance.png")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The demo report as text tables."""
    lines = [(f"{report['arch']} after {report['step']} steps"
             f" ({Path(str(report['checkpoint'])).name})"), ""]
    rows = [[name, f"{m['top1']:.3f}", f"{m['top5']:.3f}", f"{m['weight_decay']:g}"]
            for name, m in report["linear"].items()]
    lines += ["linear probe on the held-out split",
              format_table(["backbone", "top1", "top5", "weight decay"], rows), ""]
    for name, table in report["invariance"].items():
        lines += [f"invariance ({name}): {INVARIANCE_LEGEND}",
                  format_invariance(table), ""]
    if report.get("invariance_plot"):
        lines.append(f"invariance plot (retrieval against strength): {report['invariance_plot']}")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------ output
def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*map(str, row)) for row in rows]
    return "\n".join(out)


def format_invariance(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows: transform/fill; columns: its strengths, cells "cosine / centred / retrieval"."""
    width = max((len(cells) for cells in table.values()), default=0)
    rows = []
    for name, cells in table.items():
        row = [name] + [f"{level}: {c['cosine']:.3f} / {c['cosine_centered']:.3f} / "
                        f"{c['retrieval_top1']:.2f}" for level, c in cells.items()]
        rows.append(row + [""] * (width + 1 - len(row)))
    return format_table(["transform"] + [f"strength {i + 1}" for i in range(width)], rows)


def format_metrics(name: str, metrics: dict[str, Any]) -> str:
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in metrics.items()]
    return format_table([name, "value"], rows)


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
