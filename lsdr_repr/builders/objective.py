"""`build_objective`: cfg.objective -> the loss module, its gather function injected."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lsdr_repr import distributed as dist
from lsdr_repr.config import ObjectiveConfig
from lsdr_repr.errors import ConfigError
from lsdr_repr.objectives import (
    OBJECTIVES,
    BarlowTwinsLoss,
    Gather,
    LSDRLoss,
    VICRegLoss,
)


def build_objective(
    objective_cfg: ObjectiveConfig,
    stages: Sequence[int] | None = None,
    *,
    global_views: int = 2,
    gather: Gather = dist.all_gather_with_grad,
) -> nn.Module:
    """The loss module for objective_cfg.name. With `stages` (model.stages) the layer weights are
    checked now and the stage terms are named after the stage indices. Every objective takes two or
    more views (augment.num_views + augment.local_crops); `global_views` (augment.num_views) are
    the first of them, which `objective.view_pairs: global` pairs every view with. `gather`: how
    each view's features become the global batch (the all-gather with gradient of
    lsdr_repr.distributed, the identity in one process)."""
    name = objective_cfg.name
    pairing = global_views if objective_cfg.view_pairs == "global" else None
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown objective '{name}' (known: "
                          f"{', '.join(OBJECTIVES)})")
    if name == "lsdr":
        weights = list(objective_cfg.layer_weights)
        if stages is not None and len(stages) != len(weights):
            raise ConfigError(f"objective.layer_weights has {len(weights)} entries but "
                              f"model.stages has {len(stages)}: give one weight per stage")
        try:
            return LSDRLoss(
                invariance_weight=objective_cfg.invariance_weight,
                variance_weight=objective_cfg.variance_weight,
                decorrelation_weight=objective_cfg.decorrelation_weight,
                gamma=objective_cfg.gamma,
                eps=objective_cfg.eps,
                layer_weights=weights,
                stage_labels=list(stages) if stages is not None else None,
                layer_decorrelation=objective_cfg.layer_decorrelation,
                layer_invariance_weights=list(objective_cfg.layer_invariance_weights),
                layer_variance_weights=list(objective_cfg.layer_variance_weights),
                global_views=pairing,
                gather=gather,
            )
        except ValueError as exc:  # the loss's own checks, which name the config keys
            raise ConfigError(str(exc)) from None
    if (objective_cfg.layer_weights or objective_cfg.layer_invariance_weights
            or objective_cfg.layer_variance_weights):
        raise ConfigError(f"objective.layer_weights, layer_invariance_weights and "
                          f"layer_variance_weights are only used by objective.name=lsdr, not "
                          f"{name}")
    if name == "vicreg":
        return VICRegLoss(
            sim_coeff=objective_cfg.invariance_weight,
            std_coeff=objective_cfg.variance_weight,
            cov_coeff=objective_cfg.decorrelation_weight,
            gamma=objective_cfg.gamma,
            eps=objective_cfg.eps,
            global_views=pairing,
            gather=gather,
        )
    return BarlowTwinsLoss(lambd=objective_cfg.barlow_lambda, global_views=pairing, gather=gather)

