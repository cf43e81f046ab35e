"""Real timm backbones (tiny inputs on CPU): projector layout, stage features, errors, training."""

from __future__ import annotations

import pytest
import timm
import torch
from run_dirs import DEMO, tiny_overrides
from torch import nn

from lsdr_repr import distributed as dist
from lsdr_repr.builders.model import build_model
from lsdr_repr.builders.objective import build_objective
from lsdr_repr.config import ModelConfig, ObjectiveConfig, load_config
from lsdr_repr.models import ModelOutput, build_projector
from lsdr_repr.train import Trainer

VIT = {"arch": "vit_tiny_patch16_224", "timm_kwargs": {"img_size": 32, "patch_size": 8}}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; these models are tiny anyway
    yield
    torch.set_num_threads(threads)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_projector_is_vicregs_layout():
    p = build_projector(512, [64, 64, 32])
    kinds = [type(m) for m in p]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                     nn.Linear]
    assert [(m.in_features, m.out_features) for m in p if isinstance(m, nn.Linear)] == [
        (512, 64), (64, 64), (64, 32)]
    assert p[0].bias is not None and p[-1].bias is None
    no_bn = build_projector(16, [8, 4], batch_norm=False)
    assert [type(m) for m in no_bn] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(build_projector(16, []), nn.Identity)


@pytest.mark.parametrize(("view", "channels_last"), [(None, True), (64, True), (33, True),
                                                      (32, False), (16, False)])
def test_channels_last_is_off_where_the_last_stage_map_is_one_pixel(view, channels_last, caplog):
    # resnet10t reduces by 32: at 32 px and less its last stage runs on 1 x 1 maps, where
    # compiled channels_last convolutions fail on CUDA (pytorch/pytorch#171622)
    model = build_model(ModelConfig(arch="resnet10t", projector=[16]), smallest_view=view)
    assert model.channels_last is channels_last
    weight = model.backbone.conv1[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    assert ("171622" in caplog.text) is not channels_last


def test_trainer_builds_the_model_for_its_smallest_view(sample_shards, tmp_path):
    for local, channels_last in ((0, True), (2, False)):  # 64 px views; 16 px local crops
        cfg = load_config(DEMO, tiny_overrides(
            sample_shards, tmp_path / str(local), "data.image_size=64", "augment.crop_size=64",
            "model.channels_last=true", f"augment.local_crops={local}",
            "augment.local_crop_size=16", "log.wandb.mode=disabled", "data.num_workers=0"))
        trainer = Trainer(cfg, dist.read_dist_env({}), torch.device("cpu"))
        assert trainer.model.channels_last is channels_last
        assert trainer.staging.augment.channels_last is (None if channels_last else False)


def test_resnet_plain_forward_and_state_dict():
    model = build_model(ModelConfig(arch="resnet10t", projector=[64, 32], channels_last=False))
    out = model(_images())
    assert isinstance(out, ModelOutput)
    assert out.embedding.shape == (4, 512) and model.num_features == 512
    assert out.projection.shape == (4, 32) and out.stages == []
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"backbone", "projector"}
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    assert {k[len("backbone."):] for k in keys if k.startswith("backbone.")} == set(
        fresh.state_dict())


def test_resnet_stage_features_in_one_pass():
    model = build_model(ModelConfig(arch="resnet10t", projector=[32], stages=[3, 1, -1],
                                    channels_last=False)).eval()
    x = _images()
    calls = []
    model.backbone.layer1.register_forward_hook(lambda *a: calls.append(1))
    out = model(x)
    assert len(calls) == 1  # stages come out of the same forward as the embedding
    assert [tuple(s.shape) for s in out.stages] == [(4, 256), (4, 64), (4, 512)]
    with torch.no_grad():
        ref = model.backbone(x)
        feats = {}
        for name in ("layer1", "layer3", "layer4"):
            getattr(model.backbone, name).register_forward_hook(
                lambda m, i, o, name=name: feats.__setitem__(name, o.mean(dim=(2, 3))))
        model.backbone(x)
    torch.testing.assert_close(out.embedding, ref)
    for got, name in zip(out.stages, ("layer3", "layer1", "layer4")):
        torch.testing.assert_close(got, feats[name])


def test_vit_stage_features_are_patch_token_means():
    model = build_model(ModelConfig(projector=[16], stages=[5, 2], channels_last=False, **VIT))
    model.eval()
    x = _images(3)
    blocks = {}
    for i in (2, 5):
        model.backbone.blocks[i].register_forward_hook(
            lambda m, inp, o, i=i: blocks.__setitem__(i, o))
    out = model(x)
    prefix = model.backbone.num_prefix_tokens
    for got, i in zip(out.stages, (5, 2)):
        assert got.shape == (3, 192)
        torch.testing.assert_close(got, blocks[i][:, prefix:].mean(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(out.embedding, model.backbone(x))


def test_channels_last_and_grad_checkpointing_keep_the_maths():
    torch.manual_seed(0)
    base = build_model(ModelConfig(arch="resnet10t", projector=[16], stages=[2],
                                   channels_last=False))
    other = build_model(ModelConfig(arch="resnet10t", projector=[16], stages=[2],
                                    channels_last=True, grad_checkpointing=True))
    other.load_state_dict(base.state_dict())
    assert other.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert other.backbone.grad_checkpointing
    x = _images(4)
    grads = []
    for m in (base, other):
        out = m(x)
        (out.projection.square().mean() + out.stages[0].mean()).backward()
        grads.append(m.backbone.conv1[0].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_forward_and_float32_loss():
    model = build_model(ModelConfig(arch="resnet10t", projector=[32, 16], stages=[2]))
    loss_fn = build_objective(ObjectiveConfig(layer_weights=[0.1]), stages=[2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [model(_images(8, seed=s)) for s in range(2)]
        loss = loss_fn([o.projection for o in outs], [o.stages for o in outs])
    assert outs[0].projection.dtype == torch.bfloat16
    assert loss.total.dtype == torch.float32 and torch.isfinite(loss.total)
    loss.total.backward()
    assert model.backbone.conv1[0].weight.grad is not None


@pytest.mark.parametrize("cfg", [
    {"arch": "resnet10t", "stages": [2]},
    {"stages": [1], **VIT},
], ids=["resnet10t", "vit_tiny"])
def test_lsdr_trains_down(cfg):
    torch.manual_seed(0)
    model = build_model(ModelConfig(projector=[64, 64], **cfg))
    loss_fn = build_objective(ObjectiveConfig(layer_weights=[0.5]), stages=cfg["stages"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x = _images(16, seed=1)
    g = torch.Generator().manual_seed(2)
    # two "views": the same images under a random brightness/contrast change and a flip
    views = [x * (1 + 0.2 * torch.rand(16, 1, 1, 1, generator=g)) + 0.1, x.flip(-1) * 0.9]
    losses = []
    for _ in range(8):
        outs = [model(v) for v in views]
        out = loss_fn([o.projection for o in outs], [o.stages for o in outs])
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.8 * losses[0], losses
