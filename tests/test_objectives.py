"""Loss terms against float64 re-derivations, the baselines against their reference code, the
global-batch equality across real gloo processes, gradients, precision and diagnostics."""

from __future__ import annotations

import itertools
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsdr_repr.builders.objective import build_objective
from lsdr_repr.config import ObjectiveConfig
from lsdr_repr.objectives import (
    STAGE_EPS,
    BarlowTwinsLoss,
    LossOutput,
    LSDRLoss,
    VICRegLoss,
    batch_standardize,
    correlation_decorrelation_loss,
    covariance,
    covariance_spectrum,
    cross_correlation,
    decorrelation_loss,
    embedding_diagnostics,
    invariance_loss,
    off_diagonal,
    relative_variance_loss,
    standardized_invariance_loss,
    variance_loss,
    view_pairs,
)


def _rand(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------- float64 re-derivations from the formulas
def _np_cov(z: np.ndarray) -> np.ndarray:
    """Cov(z_i, z_j) = E[z_i z_j] - E[z_i] E[z_j], written out with loops (the README formula)."""
    n, d = z.shape
    out = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            out[i, j] = (z[:, i] * z[:, j]).sum() / n - z[:, i].sum() * z[:, j].sum() / n**2
    return out


def _np_dec(z: np.ndarray) -> float:
    c = _np_cov(z)
    d = z.shape[1]
    return sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d


def _np_var(z: np.ndarray, gamma: float, eps: float) -> float:
    var = ((z - z.mean(0)) ** 2).mean(0)
    return float(np.maximum(0.0, gamma - np.sqrt(var + eps)).mean())


def _np_inv(views: list[np.ndarray]) -> float:
    pairs = list(itertools.combinations(views, 2))
    return float(np.mean([((a - b) ** 2).mean() for a, b in pairs]))


def test_covariance_is_expectation_form():
    z = _rand(9, 5, seed=1, dtype=torch.float64) * 3 + 1
    np.testing.assert_allclose(covariance(z).numpy(), _np_cov(z.numpy()), rtol=1e-12, atol=1e-12)
    unbiased = covariance(z, correction=1).numpy()
    np.testing.assert_allclose(unbiased, np.cov(z.numpy().T), rtol=1e-12)


def test_terms_match_formulas():
    views = [_rand(10, 6, seed=s, dtype=torch.float64) * (0.3 + s) for s in range(3)]
    nv = [v.numpy() for v in views]
    assert invariance_loss(views).item() == pytest.approx(_np_inv(nv), rel=1e-12)
    for z, zn in zip(views, nv):
        # gamma 2 makes the hinge active for some features and not others
        assert variance_loss(z, 2.0, 1e-4).item() == pytest.approx(_np_var(zn, 2.0, 1e-4),
                                                                   rel=1e-12)
        assert decorrelation_loss(z).item() == pytest.approx(_np_dec(zn), rel=1e-12)
    m = torch.arange(16.0).view(4, 4)
    assert off_diagonal(m).tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14]


def test_lsdr_total_with_views_and_stages():
    v = 3
    projections = [_rand(12, 6, seed=10 + i, dtype=torch.float64) * 0.7 for i in range(v)]
    stages = [[_rand(12, 4, seed=20 + i, dtype=torch.float64),
               _rand(12, 3, seed=30 + i, dtype=torch.float64) * 2] for i in range(v)]
    loss_fn = LSDRLoss(3.0, 5.0, 7.0, gamma=1.0, eps=1e-4, layer_weights=[0.5, 0.25],
                       stage_labels=[2, 4])
    out = loss_fn(projections, stages)
    assert isinstance(out, LossOutput)
    pn = [p.numpy() for p in projections]
    inv = _np_inv(pn)
    var = np.mean([_np_var(z, 1.0, 1e-4) for z in pn])
    dec = np.mean([_np_dec(z) for z in pn])
    s2 = np.mean([_np_dec(s[0].numpy()) for s in stages])
    s4 = np.mean([_np_dec(s[1].numpy()) for s in stages])
    expected = 3 * inv + 5 * var + 7 * dec + 0.5 * s2 + 0.25 * s4
    assert out.total.item() == pytest.approx(expected, rel=1e-12)
    assert set(out.terms) == {"invariance", "variance", "decorrelation",
                              "decorrelation_stage2", "decorrelation_stage4"}
    assert out.terms["decorrelation_stage4"].item() == pytest.approx(s4, rel=1e-12)
    assert out.terms["variance"].item() == pytest.approx(var, rel=1e-12)
    assert all(not t.requires_grad for t in out.terms.values())


def _np_standardize(z: np.ndarray, rel_eps: float = 1e-4) -> np.ndarray:
    var = ((z - z.mean(0)) ** 2).mean(0)
    return (z - z.mean(0)) / np.sqrt(var + rel_eps * var.mean())


def test_scale_free_layer_terms_match_formulas():
    a, b = (_rand(16, 5, seed=s, dtype=torch.float64) * (1 + s) + s for s in (3, 4))
    an, bn = a.numpy(), b.numpy()
    assert correlation_decorrelation_loss(a).item() == pytest.approx(
        _np_dec(_np_standardize(an)), rel=1e-12)
    expected_inv = _np_inv([_np_standardize(an), _np_standardize(bn)])
    assert standardized_invariance_loss([a, b]).item() == pytest.approx(expected_inv, rel=1e-12)
    # two views: 2 - 2 * mean Pearson correlation of matching features (up to eps)
    corr = np.mean([np.corrcoef(an[:, j], bn[:, j])[0, 1] for j in range(5)])
    assert standardized_invariance_loss([a, b]).item() == pytest.approx(2 - 2 * corr, rel=1e-3)


def test_relative_variance_matches_formula_and_is_scale_free():
    # mean_j relu(1 - std_j / rms_std): features at the stage's rms scale cost nothing, a feature
    # at a tenth of it costs about 0.9 / D, whatever the overall scale of the stage.
    z = _rand(128, 6, seed=8, dtype=torch.float64) * torch.tensor(
        [1.0, 1.0, 1.0, 1.0, 0.1, 3.0], dtype=torch.float64)
    zn = z.numpy()
    var = ((zn - zn.mean(0)) ** 2).mean(0)
    std = np.sqrt(var + 1e-4 * var.mean())
    expected = np.maximum(0.0, 1 - std / np.sqrt(var.mean() * (1 + 1e-4))).mean()
    assert relative_variance_loss(z).item() == pytest.approx(expected, rel=1e-12)
    assert expected > 0.1
    for shrink in (1e-4, 1e3):
        assert relative_variance_loss(z * shrink).item() == pytest.approx(expected, rel=1e-9)
    equal = _rand(128, 6, seed=9, dtype=torch.float64)
    equal = (equal - equal.mean(0)) / equal.std(0, correction=0)  # every feature at the rms
    assert relative_variance_loss(equal).item() < 1e-4
    assert relative_variance_loss(torch.zeros(8, 3)).item() == 0.0
    # the gradient raises the small feature and has no component along the overall scale
    w = torch.ones(6, dtype=torch.float64, requires_grad=True)
    relative_variance_loss(z * w).backward()
    assert w.grad[4].item() < 0
    assert abs((w.grad * w.detach()).sum().item()) < 1e-12


@pytest.mark.parametrize("shrink", [1e-2, 1e-4])
def test_covariance_layer_term_vanishes_by_shrinking_scale_free_terms_do_not(shrink):
    # Why the scale-free stage terms exist: a stage scaled down (which the next BatchNorm undoes)
    # takes the covariance term down shrink^4 times; the correlation term and both stage
    # invariance terms do not move, and their gradient has no scale component. 1e-4 puts the
    # batch variance (~1e-8) below the absolute eps 1e-5 these terms once had, where they were
    # met for free (the collapse in benchmarks/RESULTS.md, attempt 4).
    h = _rand(64, 8, seed=5, dtype=torch.float64) @ _rand(8, 8, seed=6, dtype=torch.float64)
    assert decorrelation_loss(h * shrink).item() == pytest.approx(
        decorrelation_loss(h).item() * shrink ** 4, rel=1e-9)
    assert correlation_decorrelation_loss(h * shrink).item() == pytest.approx(
        correlation_decorrelation_loss(h).item(), rel=1e-9)
    h2 = h + 0.3 * _rand(64, 8, seed=7, dtype=torch.float64)
    unscaled = standardized_invariance_loss([h, h2]).item()
    assert unscaled > 0.01
    assert standardized_invariance_loss([h * shrink, h2 * shrink]).item() == pytest.approx(
        unscaled, rel=1e-9)
    for term in (correlation_decorrelation_loss,
                 lambda z: standardized_invariance_loss([z, h2 * (z[0, 0] / h[0, 0])])):
        scale = torch.full((), shrink, dtype=torch.float64, requires_grad=True)
        term(h * scale).backward()  # both views scaled by `scale`, as one network scales them
        assert abs(scale.grad.item()) * shrink < 1e-9
    zero = torch.zeros(8, 4, dtype=torch.float64)  # a dead stage: zero, not NaN
    assert correlation_decorrelation_loss(zero).item() == 0.0
    # A constant (not zero) stage: centring leaves a rounding remainder that must not be divided
    # by ~sqrt(tiny) (it gave 1e26 in float32); bounded by sqrt(N) per entry instead.
    const = torch.full((64, 8), 1.7)
    assert batch_standardize(const, relative=True).abs().max().item() <= 8.0
    assert standardized_invariance_loss([const, const * 1.01]).item() <= 4 * 64
    assert standardized_invariance_loss([zero, zero]).item() == 0.0


def test_lsdr_correlation_stages_and_layer_invariance():
    v = 2
    projections = [_rand(12, 6, seed=40 + i, dtype=torch.float64) for i in range(v)]
    stages = [[_rand(12, 4, seed=50 + i, dtype=torch.float64) * 3,
               _rand(12, 3, seed=60 + i, dtype=torch.float64) + 1] for i in range(v)]
    loss_fn = LSDRLoss(3.0, 5.0, 7.0, layer_weights=[0.5, 0.25], stage_labels=[2, 4],
                       layer_decorrelation="correlation", layer_invariance_weights=[0.0, 2.0])
    out = loss_fn(projections, stages)
    pn = [p.numpy() for p in projections]
    sn = [[_np_standardize(t.numpy()) for t in view] for view in stages]
    dec2 = np.mean([_np_dec(view[0]) for view in sn])
    dec4 = np.mean([_np_dec(view[1]) for view in sn])
    inv2 = _np_inv([view[0] for view in sn])
    inv4 = _np_inv([view[1] for view in sn])
    expected = (3 * _np_inv(pn) + 5 * np.mean([_np_var(z, 1.0, 1e-4) for z in pn])
                + 7 * np.mean([_np_dec(z) for z in pn]) + 0.5 * dec2 + 0.25 * dec4 + 2.0 * inv4)
    assert out.total.item() == pytest.approx(expected, rel=1e-10)
    assert out.terms["invariance_stage2"].item() == pytest.approx(inv2, rel=1e-10)
    assert out.terms["invariance_stage4"].item() == pytest.approx(inv4, rel=1e-10)
    assert out.terms["decorrelation_stage4"].item() == pytest.approx(dec4, rel=1e-10)
    with_floor = LSDRLoss(3.0, 5.0, 7.0, layer_weights=[0.5, 0.25], stage_labels=[2, 4],
                          layer_decorrelation="correlation", layer_invariance_weights=[0.0, 2.0],
                          layer_variance_weights=[0.0, 4.0])
    out_floor = with_floor(projections, stages)
    var4 = np.mean([relative_variance_loss(view[1]).item() for view in stages])
    assert var4 > 0
    assert out_floor.terms["variance_stage4"].item() == pytest.approx(var4, rel=1e-12)
    assert out_floor.total.item() == pytest.approx(expected + 4.0 * var4, rel=1e-10)
    cfg = ObjectiveConfig(layer_weights=[0.5], layer_decorrelation="correlation",
                          layer_invariance_weights=[1.5], layer_variance_weights=[2.5])
    built = build_objective(cfg, stages=[4])
    assert built.layer_decorrelation == "correlation" and built.layer_invariance_weights == [1.5]
    assert built.layer_variance_weights == [2.5]


def test_build_objective_dispatch():
    cfg = ObjectiveConfig(invariance_weight=2.0, variance_weight=3.0, decorrelation_weight=4.0)
    assert isinstance(build_objective(cfg), LSDRLoss)
    v = build_objective(ObjectiveConfig(name="vicreg", invariance_weight=2.0))
    assert isinstance(v, VICRegLoss) and v.sim_coeff == 2.0
    b = build_objective(ObjectiveConfig(name="barlow", barlow_lambda=0.01))
    assert isinstance(b, BarlowTwinsLoss) and b.lambd == 0.01
    for m in (build_objective(cfg), v, b):  # coefficients only
        assert not list(m.parameters()) and not list(m.buffers())


# ----------------------------------------------------------- baselines vs their reference code
# Transcribed from facebookresearch/vicreg, main_vicreg.py at commit
# b42aa2327afe19773b4fbd7d3bcb46a9af1e4367 (VICReg.forward after the projector; one process, so
# FullGatherLayer is the identity and args.batch_size is the batch).
def _vicreg_reference(x, y, batch_size, num_features, sim_coeff=25.0, std_coeff=25.0,
                      cov_coeff=1.0):
    def off_diagonal_ref(m):
        n, k = m.shape
        assert n == k
        return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = off_diagonal_ref(cov_x).pow_(2).sum().div(num_features) + off_diagonal_ref(
        cov_y).pow_(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


# Transcribed from facebookresearch/barlowtwins, main.py at commit
# 046eec3c7f5c098b42cdf43e04df332957637d6a (BarlowTwins.forward after the projector; one process,
# so the all_reduce of c is the identity). This is the published code with lambd=0.0051 and no
# scale-loss factor (an early version multiplied both sums by 1/32 with lambd=3.9e-3).
def _barlow_reference(z1, z2, batch_size, lambd=0.0051):
    def off_diagonal_ref(m):
        n, k = m.shape
        assert n == k
        return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()

    bn = nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.dtype)
    c = bn(z1).T @ bn(z2)
    c.div_(batch_size)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal_ref(c).pow_(2).sum()
    return on_diag + lambd * off_diag


@pytest.mark.parametrize("scale", [0.3, 2.0])  # hinge active / inactive
def test_vicreg_matches_reference(scale):
    n, d = 32, 16
    x = (_rand(n, d, seed=3, dtype=torch.float64) * scale).requires_grad_()
    y = (x.detach() + 0.3 * _rand(n, d, seed=4, dtype=torch.float64)).requires_grad_()
    ref = _vicreg_reference(x, y, n, d)
    gx_ref, gy_ref = torch.autograd.grad(ref, [x, y])
    out = VICRegLoss()([x, y])
    gx, gy = torch.autograd.grad(out.total, [x, y])
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gy, gy_ref, rtol=1e-10, atol=1e-12)
    assert set(out.terms) == {"invariance", "variance", "decorrelation"}


def _pairs(views: list, global_views: int | None) -> list:
    """The view pairs written out: all, or those holding one of the first `global_views`."""
    g = len(views) if global_views is None else global_views
    return [(a, b) for (i, a), (j, b) in itertools.combinations(enumerate(views), 2)
            if i < g or j < g]


@pytest.mark.parametrize("num_views,global_views", [(3, None), (4, None), (5, 2), (4, 1)])
def test_vicreg_with_more_views_is_the_reference_averaged_over_view_pairs(num_views,
                                                                          global_views):
    # Multi-crop VICReg (e.g. V = 4: two global views and two local ones) is the mean of the
    # published two-view loss over the view pairs: all V (V - 1) / 2, or (view_pairs: global)
    # those holding a global view; so V = 2 stays exactly the reference.
    n, d = 32, 16
    views = [(_rand(n, d, seed=10 + i, dtype=torch.float64) * (0.4 + 0.3 * i)).requires_grad_()
             for i in range(num_views)]
    ref = torch.stack([_vicreg_reference(a, b, n, d)
                       for a, b in _pairs(views, global_views)]).mean()
    out = VICRegLoss(global_views=global_views)(views)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, g_ref in zip(torch.autograd.grad(out.total, views), torch.autograd.grad(ref, views)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_barlow_matches_reference():
    n, d = 32, 16
    z1 = _rand(n, d, seed=5, dtype=torch.float64).requires_grad_()
    z2 = (z1.detach() * 1.5 + 0.5 * _rand(n, d, seed=6, dtype=torch.float64)).requires_grad_()
    ref = _barlow_reference(z1, z2, n)
    g_ref = torch.autograd.grad(ref, [z1, z2])
    out = BarlowTwinsLoss(lambd=0.0051)([z1, z2])
    g = torch.autograd.grad(out.total, [z1, z2])
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    c = cross_correlation(z1.detach(), z2.detach())
    assert out.terms["on_diagonal"].item() == pytest.approx(((c.diagonal() - 1) ** 2).sum().item())


@pytest.mark.parametrize("num_views,global_views", [(3, None), (4, 2)])
def test_barlow_with_more_views_is_the_reference_averaged_over_view_pairs(num_views,
                                                                          global_views):
    n, d = 32, 16
    views = [(_rand(n, d, seed=20 + i, dtype=torch.float64) * (0.5 + 0.5 * i)).requires_grad_()
             for i in range(num_views)]
    ref = torch.stack([_barlow_reference(a, b, n)
                       for a, b in _pairs(views, global_views)]).mean()
    out = BarlowTwinsLoss(lambd=0.0051, global_views=global_views)(views)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-10)
    cs = [cross_correlation(a.detach(), b.detach()) for a, b in _pairs(views, global_views)]
    on_diag = torch.stack([((c.diagonal() - 1) ** 2).sum() for c in cs]).mean()
    assert out.terms["on_diagonal"].item() == pytest.approx(on_diag.item(), rel=1e-10)
    for g, g_ref in zip(torch.autograd.grad(out.total, views), torch.autograd.grad(ref, views)):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)

# ------------------------------------------------------------------------- gradients, precision
def test_gradcheck_float64():
    torch.manual_seed(0)
    n, d = 6, 4
    a, b, c = (torch.randn(n, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    # gamma 3 keeps every feature inside the hinge (relu is not differentiable at its kink)
    lsdr = LSDRLoss(2.0, 3.0, 1.5, gamma=3.0, layer_weights=[0.7])
    assert torch.autograd.gradcheck(lambda x, y, z, t: lsdr([x, y, z], [[t], [t * 2], [t]]).total,
                                    (a, b, c, s))
    vic = VICRegLoss(gamma=3.0)
    assert torch.autograd.gradcheck(lambda x, y: vic([x, y]).total, (a, b))
    bt = BarlowTwinsLoss(lambd=0.1)
    assert torch.autograd.gradcheck(lambda x, y: bt([x, y]).total, (a, b))


@pytest.mark.parametrize("name", ["lsdr", "vicreg", "barlow"])
def test_float32_under_bf16_autocast(name):
    loss_fn = build_objective(ObjectiveConfig(name=name))
    z = [_rand(64, 32, seed=i).bfloat16() for i in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(z)
    # Same bf16 values cast up outside autocast: equal only if no op ran in bf16 inside.
    ref = loss_fn([t.float() for t in z])
    assert out.total.dtype == torch.float32
    assert out.total.item() == ref.total.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_mm = (z[0].float().T @ z[0].float()).dtype
    assert bf16_mm == torch.bfloat16  # autocast really is on for matmuls out there


# ------------------------------------------- global batch: 1 process x 2N == 2 gloo processes x N
class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 5)

    def forward(self, views: list[torch.Tensor]):
        hs = [torch.tanh(self.a(x)) for x in views]
        return [self.b(h) for h in hs], [[h] for h in hs]


def _objectives() -> dict[str, nn.Module]:
    """The losses with the all-gather injected (the identity in one process)."""
    from lsdr_repr.distributed import all_gather_with_grad as gather

    return {
        "lsdr": LSDRLoss(25.0, 25.0, 1.0, gamma=1.0, layer_weights=[0.5], gather=gather),
        "vicreg": VICRegLoss(gather=gather),
        "barlow": BarlowTwinsLoss(gather=gather),
    }


def _run(net: nn.Module, loss_fn: nn.Module, views: list[torch.Tensor], name: str):
    projections, stages = net(views)
    if name != "lsdr":
        projections, stages = projections[:2], None
    out = loss_fn(projections, stages)
    out.total.backward()
    return out


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from lsdr_repr.distributed import cleanup, init_distributed, read_dist_env

    torch.set_num_threads(1)
    env = read_dist_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    init_distributed(env, "cpu", connect_timeout_s=60)
    inputs = torch.load(f"{folder}/inputs.pt")
    n = inputs["views"][0].shape[0] // 2
    local = [v[rank * n:(rank + 1) * n] for v in inputs["views"]]
    results = {}
    for name, loss_fn in _objectives().items():
        net = _TinyNet().double()
        net.load_state_dict(inputs["state"])
        ddp = DistributedDataParallel(net)
        out = _run(ddp, loss_fn, local, name)
        results[name] = {"total": out.total.item(),
                         "terms": {k: v.item() for k, v in out.terms.items()},
                         "grads": {k: p.grad.clone() for k, p in net.named_parameters()}}
    torch.save(results, f"{folder}/out{rank}.pt")
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_global_batch_loss_and_gradients_equal_across_world_sizes(tmp_path):
    torch.manual_seed(0)
    views = [torch.randn(16, 6, dtype=torch.float64) for _ in range(3)]
    net = _TinyNet().double()
    torch.save({"views": views, "state": net.state_dict()}, tmp_path / "inputs.pt")
    torch.multiprocessing.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)),
                                          nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    for name, loss_fn in _objectives().items():
        single = _TinyNet().double()
        single.load_state_dict(net.state_dict())
        out = _run(single, loss_fn, views, name)
        for res in ranks:
            assert res[name]["total"] == pytest.approx(out.total.item(), rel=1e-12), name
            for k, v in out.terms.items():
                assert res[name]["terms"][k] == pytest.approx(v.item(), rel=1e-12), (name, k)
            for k, p in single.named_parameters():
                torch.testing.assert_close(res[name]["grads"][k], p.grad, rtol=1e-10,
                                           atol=1e-12, msg=f"{name} {k}")


# ------------------------------------------------------------------------------ diagnostics
def test_embedding_diagnostics():
    z = _rand(40, 6, seed=7) * torch.tensor([1.0, 2.0, 3.0, 0.5, 1.0, 1.0])
    z[:, 5] = z[:, 4] * -2 + 0.1 * z[:, 5]  # one strongly correlated pair
    d = embedding_diagnostics(z)
    zn = z.double().numpy()
    std = zn.std(0)
    assert d["std_mean"] == pytest.approx(std.mean(), rel=1e-5)
    assert d["std_min"] == pytest.approx(std.min(), rel=1e-5)
    corr = np.corrcoef(zn.T)
    assert d["corr_offdiag_abs"] == pytest.approx(np.abs(corr[~np.eye(6, dtype=bool)]).mean(),
                                                  rel=1e-4)
    s = np.linalg.svd(zn, compute_uv=False)
    p = s / s.sum() + 1e-7
    assert d["rankme"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
    # RankMe counts directions: a rank-2 embedding in 6 dims has an effective rank <= 2.
    low = _rand(40, 2, seed=8) @ _rand(2, 6, seed=9)
    assert embedding_diagnostics(low)["rankme"] <= 2.0 + 1e-3
    assert embedding_diagnostics(_rand(400, 6, seed=10))["rankme"] > 5.5


def test_covariance_spectrum():
    z = _rand(30, 5, seed=11) * torch.tensor([3.0, 1.0, 0.5, 2.0, 0.1])
    eig = covariance_spectrum(z)
    ref = np.sort(np.linalg.eigvalsh(np.cov(z.double().numpy().T, bias=True)))[::-1]
    np.testing.assert_allclose(eig.numpy(), ref, rtol=1e-9, atol=1e-12)
    wide = covariance_spectrum(_rand(4, 10, seed=12))  # N < D: the rest of the spectrum is 0
    assert wide.shape == (10,) and (wide[:3] > 0).all() and wide[3:].abs().max() < 1e-12
    assert (wide[:-1] >= wide[1:]).all()


def test_view_pairs_all_or_those_with_a_global_view():
    assert view_pairs(2) == [(0, 1)] and view_pairs(2, 2) == [(0, 1)]
    assert len(view_pairs(6)) == 15
    # two global views and four local crops: the global pair and 2 x 4 global-local pairs
    assert view_pairs(6, 2) == [(0, 1), *[(g, v) for g in (0, 1) for v in range(2, 6)]]


def test_lsdr_with_global_pairs_compares_no_two_local_views():
    """The invariance (and the stage invariance) over the pairs with a global view; the per-view
    variance and decorrelation over every view, as with all pairs."""
    n, d = 24, 8
    zs = [_rand(n, d, seed=40 + i, dtype=torch.float64) * (0.5 + 0.2 * i) for i in range(5)]
    hs = [[_rand(n, 6, seed=50 + i, dtype=torch.float64)] for i in range(5)]
    kw = {"layer_weights": [0.3], "layer_invariance_weights": [0.7],
          "layer_decorrelation": "correlation"}
    every, global_only = LSDRLoss(**kw)(zs, hs), LSDRLoss(global_views=2, **kw)(zs, hs)
    pairs = view_pairs(5, 2)
    mse = np.mean([((zs[i] - zs[j]) ** 2).mean().item() for i, j in pairs])
    assert global_only.terms["invariance"].item() == pytest.approx(mse, rel=1e-12)
    assert every.terms["invariance"].item() == pytest.approx(_np_inv([z.numpy() for z in zs]))
    staged = [batch_standardize(h[0], STAGE_EPS, relative=True) for h in hs]
    stage_mse = np.mean([((staged[i] - staged[j]) ** 2).mean().item() for i, j in pairs])
    assert global_only.terms["invariance_stage0"].item() == pytest.approx(stage_mse, rel=1e-9)
    for term in ("variance", "decorrelation", "decorrelation_stage0"):
        assert global_only.terms[term].item() == every.terms[term].item()


@pytest.mark.parametrize("name", ["lsdr", "vicreg", "barlow"])
def test_view_pairs_config_reaches_every_objective(name):
    assert build_objective(ObjectiveConfig(name=name)).global_views is None
    built = build_objective(ObjectiveConfig(name=name, view_pairs="global"), global_views=3)
    assert built.global_views == 3
