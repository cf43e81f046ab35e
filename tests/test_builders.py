"""lsdr_repr.builders: every value a user can get wrong is a one-line ConfigError naming its key,
raised before anything is built (the modules' own behaviour is in test_models, test_objectives and
test_augment)."""

from __future__ import annotations

import pytest

from lsdr_repr.builders.augment import build_augment
from lsdr_repr.builders.model import build_model
from lsdr_repr.builders.objective import build_objective
from lsdr_repr.config import ModelConfig, ObjectiveConfig
from lsdr_repr.errors import ConfigError
from lsdr_repr.objectives import LSDRLoss
from tests.test_augment import make_cfg
from tests.test_objectives import _rand


def test_model_config_errors():
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet_18' \(close: resnet18"):
        build_model(ModelConfig(arch="resnet_18"))
    with pytest.raises(ConfigError, match="index 5 is out of range for 'resnet10t', which has 5"):
        build_model(ModelConfig(arch="resnet10t", projector=[8], stages=[1, 5]))
    with pytest.raises(ConfigError, match="index -6 is out of range"):
        build_model(ModelConfig(arch="resnet10t", projector=[8], stages=[-6]))
    with pytest.raises(ConfigError, match="stage 4 is listed twice"):
        build_model(ModelConfig(arch="resnet10t", projector=[8], stages=[4, -1]))
    with pytest.raises(ConfigError, match="'resnet10t' rejects its arguments"):
        build_model(ModelConfig(arch="resnet10t", projector=[8], timm_kwargs={"bogus": 1}))


def test_layer_option_errors():
    with pytest.raises(ConfigError, match="layer_decorrelation: expected one of"):
        build_objective(ObjectiveConfig(layer_decorrelation="whitening"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer_decorrelation: expected one of"):
        LSDRLoss(layer_decorrelation="whitening")  # the module itself: a programming error
    with pytest.raises(ConfigError, match="layer_invariance_weights has 1 entries but "
                                          "objective.layer_weights has 2"):
        build_objective(ObjectiveConfig(layer_weights=[1.0, 1.0], layer_invariance_weights=[1.0]))
    with pytest.raises(ConfigError, match="layer_variance_weights has 3 entries but "
                                          "objective.layer_weights has 2"):
        build_objective(ObjectiveConfig(layer_weights=[1.0, 1.0],
                                        layer_variance_weights=[1.0, 1.0, 1.0]))
    with pytest.raises(ConfigError, match="only used by objective.name=lsdr, not barlow"):
        build_objective(ObjectiveConfig(name="barlow", layer_variance_weights=[1.0]))
    with pytest.raises(ConfigError, match="only used by objective.name=lsdr, not vicreg"):
        build_objective(ObjectiveConfig(name="vicreg", layer_invariance_weights=[1.0]))


def test_layer_weights_must_match_stages():
    cfg = ObjectiveConfig(layer_weights=[1.0])
    with pytest.raises(ConfigError, match="layer_weights has 1 entries but model.stages has 2"):
        build_objective(cfg, stages=[1, 2])
    loss_fn = build_objective(cfg)
    z = [_rand(8, 4, seed=i) for i in range(2)]
    # a mismatch found in forward is the caller's bug (the builder checked the config): ValueError
    with pytest.raises(ValueError, match="layer_weights has 1 entries but the model gives 0"):
        loss_fn(z, [[], []])
    with pytest.raises(ConfigError, match="layer_weights"):
        build_objective(ObjectiveConfig(name="vicreg", layer_weights=[1.0]))
    # every objective takes multi-crop views; fewer than two is the caller's bug
    for name in ("lsdr", "vicreg", "barlow"):
        assert build_objective(ObjectiveConfig(name=name))([*z, z[0]]).total.isfinite()
    with pytest.raises(ValueError, match="barlow: needs at least two views, got 1"):
        build_objective(ObjectiveConfig(name="barlow"))(z[:1])
    with pytest.raises(ConfigError, match="unknown objective 'simclr'"):
        build_objective(ObjectiveConfig(name="simclr"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"num_views": 1}, r"augment\.num_views: need at least 2"),
        ({"blur": {"p": [1.0, 1.5]}}, r"augment\.blur\.p\[1\]: probability 1\.5"),
        ({"blur": {"kernel_size": 8}}, r"augment\.blur\.kernel_size: must be odd"),
        ({"scale": {"area": [0.5, 0.1]}}, r"augment\.scale\.area"),
        ({"lighting": {"hue": 0.7}}, r"augment\.lighting\.hue"),
    ],
)
def test_bad_config_raises_one_line_config_error(augment, message):
    with pytest.raises(ConfigError, match=message):
        build_augment(make_cfg(**augment))


@pytest.mark.parametrize(("warmup", "warned"), [(20, True), (6, True), (5, False)])
def test_a_warmup_as_long_as_the_run_is_warned_about(caplog, warmup, warned):
    import logging

    import torch

    from lsdr_repr.config import OptimConfig
    from lsdr_repr.optim import build_optimizer, build_scheduler

    cfg = OptimConfig(warmup_steps=warmup)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg, 16)
    caplog.set_level(logging.WARNING, logger="lsdr_repr.optim")
    build_scheduler(optimizer, cfg, total_steps=6)
    assert ("optim.warmup_steps" in caplog.text) == warned
