"""Evaluation maths on frozen features: kNN, linear probe, invariance scores.

Pure functions on tensors (no I/O, no models): the other modules of `lsdr_repr.eval` compute
the features and call these; the online kNN calls `knn_accuracy` on the gathered features. The
effective rank and the covariance spectrum are `lsdr_repr.objectives`' (the trainer logs the
same quantities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Weight-decay grid of the linear probe (L2 on the weights of standardised features, per sample):
# wide enough to span "interpolate the training set" to "nearly class-prior only".
DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of class scores [M,C] against labels [M] -> {"top1": .., "top5": ..}.

    k larger than C counts as C (top-5 of a 3-class problem is 1.0).
    """
    if scores.shape[0] == 0:
        return {f"top{k}": float("nan") for k in ks}
    out = {}
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [M, kmax]
    hit = top == labels.view(-1, 1)
    for k in ks:
        out[f"top{k}"] = float(hit[:, :k].any(dim=1).float().mean())
    return out


def knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores [M,C] for queries [M,F] against a labelled bank [N,F].

    Cosine similarity, the k nearest bank entries each vote for their label with weight
    exp(sim / temperature) (Wu et al. 2018, as used by DINO and solo-learn). `exclude_self`
    (queries == bank, leave-one-out) removes each query's own entry from its neighbours.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0] - (1 if exclude_self else 0))
    if k < 1:
        raise ValueError("kNN needs at least one bank entry per query")
    out = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T  # [m, N]
        if exclude_self:
            idx = torch.arange(start, start + sim.shape[0], device=sim.device)
            sim[torch.arange(sim.shape[0], device=sim.device), idx] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / temperature).exp()
        votes = F.one_hot(bank_labels[top_idx], num_classes).float()  # [m, k, C]
        out[start:start + sim.shape[0]] = (votes * weights.unsqueeze(-1)).sum(dim=1)
    return out


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
    num_classes: int | None = None,
) -> dict[str, float]:
    """kNN top-1/top-5 of queries [M,F] (labels [M]) against the bank [N,F] (labels [N])."""
    if num_classes is None:
        num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = knn_scores(bank, bank_labels, queries, num_classes, k, temperature, exclude_self)
    return topk_accuracy(scores, query_labels.to(scores.device))


# ------------------------------------------------------------------------------- linear probe
@dataclass
class LinearProbeResult:
    top1: float
    top5: float
    weight_decay: float  # the one chosen on the held-out part of train
    train_top1: float
    val_top1: dict[str, float] = field(default_factory=dict)  # per weight decay (held-out)

    def metrics(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "weight_decay": self.weight_decay,
                "train_top1": self.train_top1}


def standardize(
    train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, ...]:
    """Standardise features [N,F] with the mean/std of `train` (applied to `others` as well)."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, keepdim=True).clamp_min(eps)
    return tuple((x - mean) / std for x in (train, *others))


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on x [N,F], y [N] by full-batch L-BFGS.

    Minimises mean cross-entropy + weight_decay/2 * ||W||^2 (bias not decayed); the problem is
    convex, so L-BFGS from zero is deterministic and reaches the optimum. Returns W [F,C], b [C].
    """
    x = x.float()
    w = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 200,
    on_fit: Callable[[str], None] | None = None,
) -> LinearProbeResult:
    """Linear probe on frozen features: train [N,F]/[N], test [M,F]/[M] -> top-1/top-5 on test.

    Features are standardised with train statistics; the weight decay is chosen on a seeded
    held-out `val_fraction` of train (per class, so every class is in both parts), then the probe
    is refitted on all of train with it. Reproducible: no randomness beyond the seeded split.
    `on_fit(what)` is called after each L-BFGS fit (one per weight decay, then the refit), for a
    progress bar: `linear_probe_fits(weight_decays)` of them in all.
    """
    on_fit = on_fit or (lambda what: None)
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = standardize(train_x.float(), test_x.float())
    fit_idx, val_idx = _stratified_split(train_y, val_fraction, seed)
    val_top1: dict[str, float] = {}
    best_wd, best_acc = weight_decays[-1], -1.0
    if len(val_idx) > 0 and len(weight_decays) > 1:
        # Refit the standardisation on the fitting part only, so the held-out part is unseen.
        fx, vx = standardize(train_x[fit_idx], train_x[val_idx])
        # Largest decay first: on ties the more regularised probe wins.
        for wd in sorted(weight_decays, reverse=True):
            w, b = fit_logistic(fx, train_y[fit_idx], num_classes, wd, max_iter)
            acc = topk_accuracy(vx @ w + b, train_y[val_idx], ks=(1,))["top1"]
            val_top1[f"{wd:g}"] = acc
            on_fit(f"wd {wd:g}")
            if acc > best_acc:
                best_wd, best_acc = wd, acc
    w, b = fit_logistic(train_x, train_y, num_classes, best_wd, max_iter)
    on_fit("refit")
    test = topk_accuracy(test_x @ w + b, test_y)
    train_acc = topk_accuracy(train_x @ w + b, train_y, ks=(1,))["top1"]
    return LinearProbeResult(test["top1"], test["top5"], best_wd, train_acc, val_top1)


def linear_probe_fits(weight_decays: Sequence[float], has_val: bool = True) -> int:
    """How many L-BFGS fits `linear_probe` runs (its `on_fit` calls)."""
    return (len(weight_decays) if has_val and len(weight_decays) > 1 else 0) + 1


def _stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held-out): about `fraction` of each class held out, at least one per class
    with >= 2 members."""
    gen = torch.Generator().manual_seed(seed)
    device = labels.device
    cpu_labels = labels.cpu()
    fit, held = [], []
    for c in cpu_labels.unique(sorted=True):
        idx = (cpu_labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if fraction > 0 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    fit_idx = torch.cat(fit).sort().values
    held_idx = torch.cat(held).sort().values
    return fit_idx.to(device), held_idx.to(device)


# --------------------------------------------------------------------------------- invariance
def invariance_scores(z: torch.Tensor, z_t: torch.Tensor) -> dict[str, float]:
    """How well embeddings survive a transformation: originals z [N,F], transformed z_t [N,F].

    cosine: mean cos(z_i, z_t_i) (1.0 = unchanged direction); cosine_centered: the same after
    subtracting the originals' mean embedding from both (pooled ReLU features share a large
    common component that keeps the raw cosine near 1 for any pair; a constant encoder scores
    0 here); retrieval_top1: fraction of transformed copies whose most similar original is their
    own image (chance = 1/N; ties, as for an encoder that ignores its input, go to the lowest
    index).
    """
    z, z_t = z.float(), z_t.float()
    zn = F.normalize(z, dim=1)
    ztn = F.normalize(z_t, dim=1)
    cosine = float((zn * ztn).sum(dim=1).mean())
    center = z.mean(dim=0, keepdim=True)
    centered = float(F.cosine_similarity(z - center, z_t - center, dim=1).mean())
    sim = ztn @ zn.T  # [N, N]: transformed i vs original j
    hits = sim.argmax(dim=1) == torch.arange(z.shape[0], device=z.device)
    return {"cosine": cosine, "cosine_centered": centered,
            "retrieval_top1": float(hits.float().mean())}
