"""Exact gradient accumulation (lsdr_repr/accumulate.py): k micro-batches give the loss and the
gradients of one batch k times larger, on a real timm ViT (LayerNorm: batch-independent) with
the LSDR loss and its layer-wise terms; drop path draws the same masks in both passes; the
Trainer's accumulated step and its exact resume."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lsdr_repr import distributed as dist
from lsdr_repr.accumulate import exact_accumulation_step, splice
from lsdr_repr.builders.model import build_model
from lsdr_repr.builders.objective import build_objective
from lsdr_repr.config import load_config
from lsdr_repr.train import MultiView, Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"

VIT = [
    "model.arch=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 32, patch_size: 8, depth: 3}",
    "model.projector=[64, 64]", "model.projector_bn=false", "model.stages=[1, 2]",
    "objective.layer_weights=[0.5, 0.5]", "objective.layer_invariance_weights=[0.0, 1.0]",
    "objective.layer_variance_weights=[0.0, 1.0]",
]
# Deterministic views: the micro-batches of a step differ only in how the batch is split.
IDENTITY_AUGMENT = [
    "augment.preset=null", "augment.crop_size=32", "augment.scale.area=[1.0, 1.0]",
    "augment.scale.aspect=[1.0, 1.0]", "augment.flip_p=0.0", "augment.grayscale_p=0.0",
    "augment.lighting.p=0.0", "augment.blur.p=[0.0]", "augment.solarize.p=[0.0]",
]


def vit_parts(*extra: str):
    cfg = load_config(DEMO, ["train.run_dir=unused", *VIT, *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model).double()
    loss_fn = build_objective(cfg.objective, stages=cfg.model.stages)
    return model, MultiView(model), loss_fn


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def accumulated(model, multiview, loss_fn, views, k: int):
    chunks = [list(c) for c in zip(*(v.chunk(k) for v in views))]
    model.zero_grad(set_to_none=True)
    loss, _, z0 = exact_accumulation_step(
        chunks, forward=multiview, forward_no_grad=multiview, loss_fn=loss_fn,
        backward=lambda t: t.backward(), sync_context=lambda last: contextlib.nullcontext(),
        restore_buffers=lambda: None, device=torch.device("cpu"))
    return loss, gradients(model), z0


def per_chunk_reference(model, multiview, loss_fn, views, k: int):
    """The large batch as the accumulated step defines it: every micro-batch forward with grad
    (in the same order, so the same random numbers), features concatenated, one loss."""
    chunks = [list(c) for c in zip(*(v.chunk(k) for v in views))]
    model.zero_grad(set_to_none=True)
    outs = [multiview(c) for c in chunks]
    projections = [torch.cat([o[v].projection for o in outs]) for v in range(len(views))]
    stages = [[torch.cat([o[v].stages[s] for o in outs]) for s in range(len(outs[0][v].stages))]
              for v in range(len(views))]
    out = loss_fn(projections, stages)
    out.total.backward()
    return out.total.detach(), gradients(model)


def random_views(n: int = 16, views: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(views)]


def test_splice_replaces_one_slice_and_only_it_carries_grad():
    cached = [torch.zeros(2, 3), torch.ones(3, 3), torch.full((2, 3), 2.0)]
    fresh = torch.full((3, 3), 5.0, requires_grad=True)
    out = splice(cached, fresh, 1)
    assert out.shape == (7, 3) and torch.equal(out[2:5], fresh.detach())
    assert torch.equal(out[:2], cached[0]) and torch.equal(out[5:], cached[2])
    out.sum().backward()
    assert torch.equal(fresh.grad, torch.ones(3, 3))
    with pytest.raises(ValueError):
        splice(cached, torch.zeros(2, 3), 1)


@pytest.mark.parametrize("k", [2, 4])
def test_k_micro_batches_give_the_loss_and_gradients_of_the_whole_batch(k):
    model, multiview, loss_fn = vit_parts()
    views = random_views()
    model.zero_grad(set_to_none=True)
    outputs = multiview(views)  # one batch of 16: the reference
    ref = loss_fn([o.projection for o in outputs], [o.stages for o in outputs])
    ref.total.backward()
    ref_grads = gradients(model)

    loss, grads, z0 = accumulated(model, multiview, loss_fn, views, k)
    torch.testing.assert_close(loss, ref.total.detach(), rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(z0, outputs[0].projection.detach(), rtol=1e-12, atol=1e-12)

    # Summing micro-batch losses (the old accumulation) is a different gradient: the test can
    # tell the two apart.
    model.zero_grad(set_to_none=True)
    for chunk in zip(*(v.chunk(k) for v in views)):
        outs = multiview(list(chunk))
        (loss_fn([o.projection for o in outs], [o.stages for o in outs]).total / k).backward()
    old = gradients(model)
    assert any(not torch.allclose(old[n], g, rtol=1e-3) for n, g in ref_grads.items())


def test_drop_path_draws_the_same_masks_in_both_passes():
    model, multiview, loss_fn = vit_parts("model.drop_path_rate=0.3")
    views = random_views()
    torch.manual_seed(11)
    ref_loss, ref_grads = per_chunk_reference(model, multiview, loss_fn, views, 2)
    torch.manual_seed(11)
    loss, grads, _ = accumulated(model, multiview, loss_fn, views, 2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=name)


def trainer_for(sample_shards, run_dir: Path, *extra: str) -> Trainer:
    overrides = [
        f"data.train_shards={sample_shards['train']}", "data.val_shards=null",
        "data.test_shards=null", f"train.run_dir={run_dir}", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=64", "train.device=cpu",
        "log.wandb.mode=disabled", "log.progress=false", "optim.warmup_steps=0",
        "train.image_grid_every=0", "train.spectrum_every=0", "train.eval_every=0",
        "train.log_every=1", *IDENTITY_AUGMENT, *VIT, *extra,
    ]
    cfg = load_config(DEMO, overrides)
    return Trainer(cfg, dist.read_dist_env({}), torch.device("cpu"))


# SGD (fused: the deferred finite check) and LARS (synchronous), not Adam: its first update is
# ~lr x sign(g), so gradients ~0 flip with float rounding whatever the accumulation.
@pytest.mark.parametrize("optim", [["optim.name=sgd", "optim.lr=0.3"],
                                   ["optim.name=lars", "optim.lr=0.3"]])
def test_trainer_step_with_accumulation_equals_the_large_batch(sample_shards, tmp_path, optim):
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(3))
    results = {}
    for k in (1, 4):
        trainer = trainer_for(sample_shards, tmp_path / f"k{k}", f"optim.accumulation_steps={k}",
                              *optim)
        losses = []
        for _ in range(2):  # the second step sees the weights the first one updated
            loss, _, _, applied = trainer.train_step(images)
            assert bool(applied)
            losses.append(float(loss))
        results[k] = losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    (l1, w1), (l4, w4) = results[1], results[4]
    assert l4 == pytest.approx(l1, rel=1e-5) and l1[0] != l1[1]
    for name, value in w1.items():
        torch.testing.assert_close(w4[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_must_leave_two_images_per_micro_batch(sample_shards, tmp_path):
    from lsdr_repr.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.accumulation_steps=16"):
        trainer_for(sample_shards, tmp_path / "run", "optim.accumulation_steps=16")


def test_accumulated_run_resumes_to_the_same_weights(sample_shards, tmp_path):
    # drop path: the global generator's stream must resume exactly too (it failed before the
    # loader's iter() stopped drawing from it)
    common = ["optim.accumulation_steps=2", "train.total_steps=4", "train.checkpoint_every=2",
              "model.drop_path_rate=0.1", "augment.preset=small-images"]
    straight = trainer_for(sample_shards, tmp_path / "straight", *common)
    assert straight.run().exit_code == 0
    first = trainer_for(sample_shards, tmp_path / "resumed", *common)
    first.run(max_steps=2)
    first.tracker.finish()
    resumed = trainer_for(sample_shards, tmp_path / "resumed", *common)
    assert resumed.step == 2
    assert resumed.run().exit_code == 0
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
