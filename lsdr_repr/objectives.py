"""The LSDR objective and the VICReg / Barlow Twins baselines, as pure tensor functions.

LSDR, Large Scale Data Representation: representations learned from large image collections that
stay the same under lighting, rotation and scale. An invariance term between the views of one
image and a variance term against collapse, combined with decorrelation regularisation (the
squared off-diagonal covariance of the embedding, also applied layer-wise on pooled stages).

    loss_fn = LSDRLoss(layer_weights=[1.0], gather=all_gather_with_grad)  # or, from a config,
    loss_fn = build_objective(cfg.objective, stages=cfg.model.stages)      # lsdr_repr.builders
    out = loss_fn([z1, z2], [stages1, stages2])   # LossOutput(total, terms)

The loss modules hold only coefficients and the gather function they are given; this module
imports neither the config nor `distributed`. They compute in float32 (autocast off, inputs
cast up), and under DDP on the global batch: every view goes through the injected all-gather
with gradient first, so the loss and its gradient do not change with the number of processes at
a fixed global batch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LossOutput:
    """total: scalar to backpropagate; terms: each (unweighted) term, detached, for logging."""

    total: Tensor
    terms: dict[str, Tensor]


# ------------------------------------------------------------------------------ pure functions
def off_diagonal(m: Tensor) -> Tensor:
    """[D, D] -> [D * (D - 1)]: the off-diagonal entries, row by row."""
    n, k = m.shape
    if n != k:
        raise ValueError(f"off_diagonal needs a square matrix, got {tuple(m.shape)}")
    return m.masked_select(~torch.eye(n, dtype=torch.bool, device=m.device))


def off_diagonal_sq_sum(m: Tensor) -> Tensor:
    """[D, D] -> scalar: sum_{i != j} m_ij^2. The diagonal is zeroed, not subtracted: sum(m^2) -
    sum(diag^2) would cancel catastrophically in float32 when the diagonal dominates."""
    return (m - torch.diag_embed(torch.diagonal(m))).pow(2).sum()


def covariance(z: Tensor, correction: int = 0) -> Tensor:
    """z [N, D] -> [D, D] covariance over the batch; correction 0 divides by N (LSDR's
    Cov(z_i, z_j) = E[z_i z_j] - E[z_i] E[z_j]), 1 by N - 1 (VICReg)."""
    zc = z - z.mean(dim=0)
    return zc.T @ zc / (z.shape[0] - correction)


def view_pairs(num_views: int, global_views: int | None = None) -> list[tuple[int, int]]:
    """The view pairs (i, j), i < j, that the invariance compares: all V (V - 1) / 2 of them, or
    with `global_views` G (the first G views are the global ones) only the pairs that hold a
    global view, G (G - 1) / 2 + G (V - G): two local crops are not compared with each other, as
    in DINO's and SwAV's multi-crop."""
    return [(i, j) for i, j in itertools.combinations(range(num_views), 2)
            if global_views is None or i < global_views]


def invariance_loss(views: Sequence[Tensor],
                    pairs: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """V x [N, D] -> scalar: mean squared difference (mean over N and D, F.mse_loss), averaged
    over the view pairs (`view_pairs`; default all V (V - 1) / 2)."""
    pairs = view_pairs(len(views)) if pairs is None else pairs
    if not pairs:
        raise ValueError("the invariance term needs at least two views")
    return torch.stack([F.mse_loss(views[i], views[j]) for i, j in pairs]).mean()


def variance_loss(z: Tensor, gamma: float = 1.0, eps: float = 1e-4, correction: int = 0) -> Tensor:
    """z [N, D] -> scalar: mean_j relu(gamma - sqrt(Var(z_j) + eps)) (hinge on each feature's std);
    Var divides by N - correction."""
    std = torch.sqrt(z.var(dim=0, correction=correction) + eps)
    return F.relu(gamma - std).mean()


def decorrelation_loss(z: Tensor, correction: int = 0) -> Tensor:
    """z [N, D] -> scalar: sum_{i != j} Cov(z_i, z_j)^2 / D."""
    return off_diagonal_sq_sum(covariance(z, correction)) / z.shape[1]


# The layer-wise terms standardise with an eps relative to the stage's own scale (a fraction of
# its mean feature variance, so scaling a stage changes neither value nor gradient): with an
# absolute eps a network met both standardised terms for free by driving a whole stage's batch
# variance below eps (benchmarks/RESULTS.md, attempt 4). What stays open: features far below the
# stage's mean variance (under ~1e-4 of it) still standardise towards 0, so the stage's
# decorrelation must keep its variance spread over many features.
STAGE_EPS = 1e-4


def correlation_decorrelation_loss(z: Tensor, eps: float = STAGE_EPS) -> Tensor:
    """z [N, D] -> scalar: sum_{i != j} Corr(z_i, z_j)^2 / D, the decorrelation term on batch-
    standardised features (eps relative to the mean variance). Scale-free: a network cannot meet
    it by shrinking z (the raw covariance form can, when a BatchNorm after z undoes the scale)."""
    return decorrelation_loss(batch_standardize(z, eps, relative=True))


def standardized_invariance_loss(views: Sequence[Tensor], eps: float = STAGE_EPS,
                                 pairs: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """V x [N, D] -> scalar: the invariance term on batch-standardised views (each view with its
    own batch statistics, eps relative to its mean variance) over `pairs` (default all); for two
    views it is 2 - 2 * mean_j Corr(z_j, z'_j) for features whose variance is well above eps x
    the mean."""
    return invariance_loss([batch_standardize(z, eps, relative=True) for z in views], pairs)


def relative_variance_loss(z: Tensor, eps: float = STAGE_EPS) -> Tensor:
    """z [N, D] -> scalar: mean_j relu(1 - std_j / rms_std), a variance hinge relative to the
    stage's own scale (rms_std = sqrt(mean_j Var(z_j))): zero when every feature's std reaches the
    stage's rms, so the variance cannot pile up in a few features while the scale-free terms
    ignore the rest. Scale-free like them; an all-zero z gives 0 (nothing to compare)."""
    floored = _relative_floor(_biased_variance(z - z.mean(dim=0)), eps)
    return F.relu(1 - torch.sqrt(floored / floored.mean())).mean()


def _biased_variance(centred: Tensor) -> Tensor:
    """centred [N, D] (batch mean already subtracted) -> [D]: the 1/N variance of each feature."""
    return centred.square().mean(dim=0)


def _relative_floor(var: Tensor, eps: float) -> Tensor:
    """var [D] -> [D]: var + eps x mean(var), plus the dtype's smallest normal so an all-zero stage
    gives 0 / tiny = 0, not NaN."""
    return var + eps * var.mean() + torch.finfo(var.dtype).tiny


def batch_standardize(z: Tensor, eps: float = 1e-5, relative: bool = False) -> Tensor:
    """z [N, D] -> [N, D]: (z - mean) / sqrt(biased var + eps), i.e. BatchNorm1d(D, affine=False)
    in training mode. relative: eps becomes eps x the mean feature variance (+ the dtype's
    smallest normal, so an all-zero z gives 0, not NaN): scaling z does not change the result and
    a shrinking z does not standardise to zero.

    The variance is taken from the same centred tensor that is divided, so a constant feature
    (exactly zero variance, a rounding remainder after centring) stays bounded by sqrt(N)."""
    centred = z - z.mean(dim=0)
    var = _biased_variance(centred)
    return centred / torch.sqrt(_relative_floor(var, eps) if relative else var + eps)


def cross_correlation(z1: Tensor, z2: Tensor, eps: float = 1e-5) -> Tensor:
    """z1, z2 [N, D] -> [D, D]: Barlow Twins' empirical cross-correlation bn(z1)^T bn(z2) / N."""
    return batch_standardize(z1, eps).T @ batch_standardize(z2, eps) / z1.shape[0]


# ---------------------------------------------------------------------------------- modules
@contextlib.contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    """Autocast off: the statistics (squares of covariances) lose too much in bf16/fp16."""
    if torch.amp.is_autocast_available(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


# How a loss turns one rank's [N, D] into the global batch's [N_global, D], differentiably:
# `lsdr_repr.distributed.all_gather_with_grad` under DDP (the builder injects it), else the
# identity. The statistics are then over the global batch whatever the number of GPUs.
Gather = Callable[[Tensor], Tensor]


def _no_gather(z: Tensor) -> Tensor:
    return z


def _global(z: Tensor, gather: Gather) -> Tensor:
    """Cast up to float32 (float64 stays, for gradcheck) and gather the global batch."""
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return gather(z)


def _mean_over_views(term: Callable[[Tensor], Tensor], views: Sequence[Tensor]) -> Tensor:
    """term: [N, D] -> scalar; views: V x [N, D] -> the mean of the term over the views."""
    return torch.stack([term(z) for z in views]).mean()


def _mean_over_pairs(term: Callable[[Tensor], Tensor], views: Sequence[Tensor],
                     pairs: Sequence[tuple[int, int]]) -> Tensor:
    """The mean over `pairs` of (term(view i) + term(view j)) / 2: each view's term weighted by
    the pairs it is in (with all pairs, the plain mean over the views)."""
    counts = [0] * len(views)
    for i, j in pairs:
        counts[i] += 1
        counts[j] += 1
    return sum(c * term(z) for c, z in zip(counts, views) if c) / (2 * len(pairs))


def _check_views(projections: Sequence[Tensor], name: str) -> None:
    if len(projections) < 2:
        raise ValueError(f"{name}: needs at least two views, got {len(projections)}")
    shape = projections[0].shape
    for z in projections:
        if z.ndim != 2 or z.shape != shape:
            raise ValueError(f"{name}: every view must be [N, D] of one shape, got "
                             f"{[tuple(p.shape) for p in projections]}")


# The objectives by `objective.name`; each takes two or more views (multi-crop).
OBJECTIVES = ("lsdr", "vicreg", "barlow")

# How the layer-wise decorrelation measures a stage (objective.layer_decorrelation).
LAYER_DECORRELATION = {
    "covariance": decorrelation_loss,
    "correlation": correlation_decorrelation_loss,
}


class LSDRLoss(nn.Module):
    """LSDR (README, "The objective"): inv_w * invariance + var_w * variance + dec_w * decorrelation
    + sum_k w_k * layer_decorrelation(stage k) + sum_k u_k * layer_invariance(stage k)
    + sum_k r_k * layer_variance(stage k).

    invariance: mean over view pairs of the MSE; variance and decorrelation: mean over views of
    the per-view term, with the biased (1/N) statistics of the formulas; stage terms: the
    decorrelation on each pooled stage, mean over views, on the raw covariance
    (layer_decorrelation="covariance") or on batch-standardised features ("correlation", which
    a network cannot meet by shrinking the stage); layer invariance (option, weights u_k, empty =
    off): the invariance term on the batch-standardised pooled stage, which needs that stage's
    decorrelation beside it (alone, every feature copies one invariant direction); layer variance
    (option, weights r_k): `relative_variance_loss`, the floor that keeps the scale-free terms
    from being met by piling the variance into a few features.
    (VICReg sums its covariance term over its two branches: at V = 2, LSDR's
    decorrelation_weight 2 weighs it as VICReg's 1 does.)"""

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        decorrelation_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        layer_weights: Sequence[float] = (),
        stage_labels: Sequence[int] | None = None,
        layer_decorrelation: str = "covariance",
        layer_invariance_weights: Sequence[float] = (),
        layer_variance_weights: Sequence[float] = (),
        global_views: int | None = None,
        gather: Gather = _no_gather,
    ) -> None:
        super().__init__()
        self.global_views = global_views
        if layer_decorrelation not in LAYER_DECORRELATION:
            raise ValueError(f"objective.layer_decorrelation: expected one of "
                             f"{' | '.join(LAYER_DECORRELATION)}, got {layer_decorrelation!r}")
        self.gather = gather
        self.layer_decorrelation = layer_decorrelation
        self.layer_invariance_weights = list(layer_invariance_weights)
        self.layer_variance_weights = list(layer_variance_weights)
        self.layer_weights = list(layer_weights)
        for key, weights in (("layer_invariance_weights", self.layer_invariance_weights),
                             ("layer_variance_weights", self.layer_variance_weights)):
            if weights and len(weights) != len(self.layer_weights):
                raise ValueError(f"objective.{key} has {len(weights)} entries but "
                                 f"objective.layer_weights has {len(self.layer_weights)}: give "
                                 f"one per stage (or none)")
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.decorrelation_weight = decorrelation_weight
        self.gamma = gamma
        self.eps = eps
        labels = range(len(self.layer_weights)) if stage_labels is None else stage_labels
        self.stage_labels = list(labels)

    def _stage_terms(self, pairs: list[tuple[int, int]]
                     ) -> list[tuple[str, list[float], Callable[[list[Tensor]], Tensor]]]:
        """(name, one weight per stage, V x [N, C] -> scalar) for each layer-wise term in use."""
        layer_dec = LAYER_DECORRELATION[self.layer_decorrelation]
        stage_terms = [("decorrelation", self.layer_weights,
                        lambda hs: _mean_over_views(layer_dec, hs))]
        if self.layer_invariance_weights:
            stage_terms.append(("invariance", self.layer_invariance_weights,
                                lambda hs: standardized_invariance_loss(hs, pairs=pairs)))
        if self.layer_variance_weights:
            stage_terms.append(("variance", self.layer_variance_weights,
                                lambda hs: _mean_over_views(relative_variance_loss, hs)))
        return stage_terms

    def forward(
        self, projections: Sequence[Tensor], stages: Sequence[Sequence[Tensor]] | None = None
    ) -> LossOutput:
        """projections: V x [N, D]; stages: V x K x [N, C_k] (K = len(layer_weights)) or None."""
        _check_views(projections, "lsdr")
        per_view = [list(s) for s in stages] if stages else []
        num_stages = len(per_view[0]) if per_view else 0
        if num_stages != len(self.layer_weights):
            raise ValueError(f"objective.layer_weights has {len(self.layer_weights)} entries but "
                             f"the model gives {num_stages} stages (model.stages)")
        if per_view and (len(per_view) != len(projections)
                         or any(len(v) != num_stages for v in per_view)):
            raise ValueError("lsdr: stages must hold the same number of stages for every view")
        with _float32(projections[0].device):
            zs = [_global(z, self.gather) for z in projections]
            pairs = view_pairs(len(zs), self.global_views)
            inv = invariance_loss(zs, pairs)
            var = _mean_over_views(lambda z: variance_loss(z, self.gamma, self.eps), zs)
            dec = _mean_over_views(decorrelation_loss, zs)
            total = (self.invariance_weight * inv + self.variance_weight * var
                     + self.decorrelation_weight * dec)
            terms = {"invariance": inv, "variance": var, "decorrelation": dec}
            stage_terms = self._stage_terms(pairs)
            for k, label in zip(range(len(self.layer_weights)), self.stage_labels):
                hs = [_global(v[k], self.gather) for v in per_view]
                for name, weights, term in stage_terms:
                    value = term(hs)
                    total = total + weights[k] * value
                    terms[f"{name}_stage{label}"] = value
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})


class VICRegLoss(nn.Module):
    """VICReg as in facebookresearch/vicreg main_vicreg.py (commit b42aa23): sim * MSE(x, y)
    + std * [mean(relu(gamma - std_x)) / 2 + mean(relu(gamma - std_y)) / 2]
    + cov * [sum offdiag(cov_x)^2 / D + sum offdiag(cov_y)^2 / D], var and cov with N - 1.
    With V > 2 views (multi-crop): the mean of that two-view loss over the view pairs
    (`view_pairs`: all V (V - 1) / 2, or those with a global view), computed as the MSE averaged
    over the pairs and each view's std and covariance terms weighted by the pairs it is in (with
    all pairs: the std term's mean over the views, the covariance term 2 x its mean). Under
    DDP the MSE is on the gathered batch (the reference takes it per rank; its DDP-averaged
    gradient is the same)."""

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 gamma: float = 1.0, eps: float = 1e-4, global_views: int | None = None,
                 gather: Gather = _no_gather) -> None:
        super().__init__()
        self.global_views = global_views
        self.gather = gather
        self.sim_coeff = sim_coeff
        self.std_coeff = std_coeff
        self.cov_coeff = cov_coeff
        self.gamma = gamma
        self.eps = eps

    def forward(
        self, projections: Sequence[Tensor], stages: Sequence[Sequence[Tensor]] | None = None
    ) -> LossOutput:
        """projections: V x [N, D] (V >= 2); stages are not used by VICReg."""
        _check_views(projections, "vicreg")
        with _float32(projections[0].device):
            zs = [_global(z, self.gather) for z in projections]
            pairs = view_pairs(len(zs), self.global_views)
            sim = invariance_loss(zs, pairs)
            std = _mean_over_pairs(
                lambda z: variance_loss(z, self.gamma, self.eps, correction=1), zs, pairs)
            cov = 2 * _mean_over_pairs(lambda z: decorrelation_loss(z, correction=1), zs, pairs)
            total = self.sim_coeff * sim + self.std_coeff * std + self.cov_coeff * cov
        terms = {"invariance": sim, "variance": std, "decorrelation": cov}
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins as in facebookresearch/barlowtwins main.py (commit 046eec3, the published
    code without the early `scale-loss` 1/32 factor): c = bn(z1)^T bn(z2) / N with an affine-free
    BatchNorm over the global batch, loss = sum_i (c_ii - 1)^2 + lambda * sum_{i != j} c_ij^2.
    With V > 2 views (multi-crop): the mean of that loss (and of each sum) over the view pairs
    (`view_pairs`), so V = 2 is the reference exactly."""

    def __init__(self, lambd: float = 0.0051, global_views: int | None = None,
                 gather: Gather = _no_gather) -> None:
        super().__init__()
        self.global_views = global_views
        self.gather = gather
        self.lambd = lambd

    def forward(
        self, projections: Sequence[Tensor], stages: Sequence[Sequence[Tensor]] | None = None
    ) -> LossOutput:
        """projections: V x [N, D] (V >= 2); stages are not used by Barlow Twins."""
        _check_views(projections, "barlow")
        with _float32(projections[0].device):
            zs = [_global(z, self.gather) for z in projections]
            on_diags, off_diags = [], []
            for i, j in view_pairs(len(zs), self.global_views):
                c = cross_correlation(zs[i], zs[j])
                on_diags.append((torch.diagonal(c) - 1).pow(2).sum())
                off_diags.append(off_diagonal_sq_sum(c))
            on_diag = torch.stack(on_diags).mean()
            off_diag = torch.stack(off_diags).mean()
            total = on_diag + self.lambd * off_diag
        terms = {"on_diagonal": on_diag, "off_diagonal": off_diag}
        return LossOutput(total, {k: v.detach() for k, v in terms.items()})


# ------------------------------------------------------------------------------ diagnostics
@torch.no_grad()
def embedding_diagnostics(z: Tensor) -> dict[str, float]:
    """z [N, D] (N >= 2) -> {"std_mean", "std_min": per-feature std (1/N) over the batch,
    "corr_offdiag_abs": mean |off-diagonal correlation|, "rankme": exp of the entropy of the
    normalised singular values of z (Garrido et al. 2023, RankMe; eps 1e-7)}; NaN for a
    non-finite z (a diverging run is reported, not crashed on)."""
    stats = embedding_statistics(z)
    return diagnostics_from_statistics({k: v.cpu() for k, v in stats.items()})


@torch.no_grad()
def embedding_statistics(z: Tensor) -> dict[str, Tensor]:
    """z [N, D] (N >= 2) -> the device half of `embedding_diagnostics`, with no host sync (the
    trainer reads them a step later): 0-d "std_mean", "std_min", "corr_offdiag_abs" (NaN when z
    is not finite), "finite" (bool), and "gram" [M, M] float64, M = min(N, D): z z^T or z^T z,
    whose eigenvalues are z's squared singular values (RankMe's input)."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_diagnostics needs [N >= 2, D], got {tuple(z.shape)}")
    z = z.detach().float()
    finite = torch.isfinite(z).all()
    z = torch.where(finite, z, torch.zeros((), device=z.device))
    std = z.std(dim=0, correction=0)
    inv_std = 1.0 / std.clamp_min(1e-12)
    corr = covariance(z) * inv_std[:, None] * inv_std[None, :]
    d = z.shape[1]
    # the diagonal zeroed in place, not selected out: masked_select waits for the device, and
    # corr is D x D (256 MiB at D = 8192)
    corr.diagonal().zero_()
    corr_abs = corr.abs_().sum() / (d * (d - 1)) if d > 1 else torch.zeros((), device=z.device)
    nan = torch.full((), math.nan, device=z.device)
    zd = z.double()  # float64: the smallest singular values are square roots of eigenvalues
    gram = zd @ zd.T if z.shape[0] <= z.shape[1] else zd.T @ zd
    return {"std_mean": torch.where(finite, std.mean(), nan),
            "std_min": torch.where(finite, std.min(), nan),
            "corr_offdiag_abs": torch.where(finite, corr_abs, nan),
            "finite": finite, "gram": gram}


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Torch's CPU operations on one thread inside the block, the caller's count restored after.

    For RankMe's eigendecomposition of an M x M Gram matrix (M <= per-rank batch): with one
    thread per core, LAPACK's threads meet at a barrier for each of its many small steps, and
    while a data loader's workers hold every core those barriers wait for threads that are not
    running. On two saturated cores: 2-10 ms at M = 256 on one thread, 45-70 ms on 16, once
    2.1 s on two; very likely the cause of the deferred log's 1.5-2 s per record on an H100
    (benchmarks/RESULTS.md, issue 18, sixteenth and seventeenth sessions)."""
    threads = torch.get_num_threads()
    if threads == 1:  # torchrun's and SLURM's usual setting: each change rebuilds the pool
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def diagnostics_from_statistics(stats: Mapping[str, Tensor | float]) -> dict[str, float]:
    """`embedding_statistics` (on the CPU; the 0-d ones may be numbers) -> `embedding_diagnostics`'s
    floats."""
    keys = ("std_mean", "std_min", "corr_offdiag_abs", "rankme")
    if not bool(stats["finite"]):
        return dict.fromkeys(keys, math.nan)
    with one_intra_op_thread():
        eig = torch.linalg.eigvalsh(stats["gram"].double())
    s = eig.clamp_min(0).sqrt()
    p = s / s.sum().clamp_min(1e-12) + 1e-7
    rankme = torch.exp(-(p * torch.log(p)).sum())
    return {"std_mean": float(stats["std_mean"]), "std_min": float(stats["std_min"]),
            "corr_offdiag_abs": float(stats["corr_offdiag_abs"]), "rankme": float(rankme)}


@torch.no_grad()
def covariance_spectrum(z: Tensor) -> Tensor:
    """z [N, D] -> [D] eigenvalues of the (1/N) covariance, descending, float64 on z's device.

    From the singular values of the centred batch (O(N^2 D), not an eigendecomposition of the
    D x D matrix): eig_k = s_k^2 / N; the D - N eigenvalues beyond the batch's rank are 0."""
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"covariance_spectrum needs [N, D], got {tuple(z.shape)}")
    z = z.detach().double()
    n, d = z.shape
    if not bool(torch.isfinite(z).all()):
        return z.new_full((d,), math.nan)
    s = torch.linalg.svdvals(z - z.mean(dim=0))
    eig = s.pow(2) / n
    if eig.numel() < d:
        eig = torch.cat([eig, eig.new_zeros(d - eig.numel())])
    return eig.sort(descending=True).values

