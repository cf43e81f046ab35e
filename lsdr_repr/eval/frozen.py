"""Evaluations of a frozen backbone: weighted kNN, linear probe, effective rank (RankMe)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lsdr_repr.errors import DataError
from lsdr_repr.eval import probes
from lsdr_repr.eval.cache import Evaluator
from lsdr_repr.eval.features import Features
from lsdr_repr.eval.plots import plot_spectrum


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
    res = linear_probe(ev, tr, va, weight_decays=weight_decays, seed=seed)
    return {"metrics": res.metrics(),
            "details": {"train": str(train), "val": str(val), "num_train": len(tr.y),
                        "num_val": len(va.y), "val_top1_per_weight_decay": res.val_top1}}


def linear_probe(ev: Evaluator, tr: Features, va: Features, **kwargs: Any
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
