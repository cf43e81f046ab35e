"""The guarded optimiser step (lsdr_repr/guarded_step.py): a non-finite loss changes nothing
(weights, optimiser state, BatchNorm statistics), synchronously (LARS) or on the device (fused
AdamW / SGD, the deferred check), with and without the fp16 GradScaler; and fp16 in the real
Trainer: one step on CPU, the loss scale checkpointed and restored on resume."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from test_accumulate import trainer_for
from torch import nn

from lsdr_repr.config import OptimConfig
from lsdr_repr.guarded_step import GuardedStep, PendingFlag, autocast_dtype, make_scaler
from lsdr_repr.optim import build_optimizer

CPU = torch.device("cpu")


def make(name: str, precision: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=0.1, lars_trust=0.02), 256)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    backups = [b.detach().clone() for b in buffers]
    scaler = make_scaler(autocast_dtype(precision, CPU), CPU)
    stepper = GuardedStep(optimizer, model, clip_grad=1.0, scaler=scaler, buffers=buffers,
                          backups=backups, world_size=1)
    return model, optimizer, stepper, scaler


def one_step(model, stepper, scaler, *, poison: bool):
    torch._foreach_copy_(stepper.backups, stepper.buffers)  # as Trainer.train_step does
    x = torch.randn(32, 6)
    with torch.autocast("cpu", dtype=torch.float16, enabled=scaler is not None):
        loss = model(x).float().pow(2).mean()
    if poison:
        loss = loss * float("nan")
    stepper.backward(loss)
    return stepper.step(loss.detach())


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v.clone() for state in optimizer.state.values() for v in state.values()
            if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name,precision,deferred", [
    ("lars", "fp32", False), ("adamw", "fp32", True), ("sgd", "fp32", True),
    ("lars", "fp16", False), ("adamw", "fp16", True),
])
def test_a_nonfinite_loss_changes_nothing_and_a_finite_one_steps(name, precision, deferred):
    model, optimizer, stepper, scaler = make(name, precision)
    assert stepper.deferred is deferred
    for _ in range(3):  # optimiser state exists (momentum, Adam moments, step counts)
        one_step(model, stepper, scaler, poison=False)
    weights = copy.deepcopy(model.state_dict())
    state = optimizer_tensors(optimizer)
    scale = scaler.get_scale() if scaler else None

    applied = one_step(model, stepper, scaler, poison=True)
    # deferred: nothing waited for the backward; the flag is read when asked for
    assert isinstance(applied, PendingFlag) is deferred
    assert not bool(applied)
    for key, value in model.state_dict().items():  # BatchNorm statistics included (the
        if value.is_floating_point():               # counter is not: unused with momentum)
            assert torch.equal(value, weights[key]), key
    for a, b in zip(optimizer_tensors(optimizer), state):
        assert torch.equal(a, b)
    if scaler is not None:
        assert scaler.get_scale() == scale / 2  # the scaler saw the skip too

    assert bool(one_step(model, stepper, scaler, poison=False))
    # (an fp16 step may be skipped by the scaler's own overflow check while it calibrates;
    # a few more finite steps must then move the weights)
    for _ in range(4):
        one_step(model, stepper, scaler, poison=False)
    assert not torch.equal(model.state_dict()["0.weight"], weights["0.weight"])


def test_precision_maps_to_autocast_and_a_scaler_only_for_fp16():
    cuda = torch.device("cuda")
    assert autocast_dtype("auto", CPU) is torch.float32
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("fp16", CPU) is torch.float16
    assert make_scaler(torch.bfloat16, CPU) is None
    assert isinstance(make_scaler(torch.float16, CPU), torch.amp.GradScaler)


RESNET = ["model.arch=test_resnet", "model.timm_kwargs={}", "model.stages=[]",
          "objective.layer_weights=[]", "objective.layer_invariance_weights=[]",
          "objective.layer_variance_weights=[]", "model.projector_bn=true"]


def test_fp16_trains_on_cpu_and_resumes_its_loss_scale(sample_shards, tmp_path):
    from lsdr_repr.checkpoint import find_latest_valid, load_checkpoint

    args = ["train.precision=fp16", "train.total_steps=4", "train.checkpoint_every=4",
            "optim.name=adamw", *RESNET]
    trainer = trainer_for(sample_shards, tmp_path / "run", *args)
    assert trainer.autocast_dtype is torch.float16 and trainer.stepper.deferred
    before = copy.deepcopy(trainer.model.state_dict())
    result = trainer.run()
    assert result.exit_code == 0 and trainer.nonfinite_total == 0
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["metrics"]["amp/loss_scale"] == trainer.scaler.get_scale()
    saved = load_checkpoint(find_latest_valid(tmp_path / "run"))["scaler"]
    assert saved and saved["scale"] == trainer.scaler.get_scale() < 2.0**16  # it calibrated

    resumed = trainer_for(sample_shards, tmp_path / "run", *args, "train.total_steps=6")
    assert resumed.step == 4
    assert resumed.scaler.state_dict() == trainer.scaler.state_dict()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a stream to queue on)")
def test_reading_a_pending_flag_waits_for_its_own_step_only():
    """A flag read after more work was queued (the next step) must not wait for that work:
    `bool(tensor)` would (its copy joins the stream's tail)."""
    flag = PendingFlag(torch.isfinite(torch.ones((), device="cuda")))
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU spinning queued after the flag
    start = time.perf_counter()
    assert bool(flag)
    assert time.perf_counter() - start < 0.5
    torch.cuda.synchronize()


def test_a_pending_flag_on_the_cpu_reads_the_tensor():
    assert bool(PendingFlag(torch.tensor(True))) and not bool(PendingFlag(torch.tensor(False)))
