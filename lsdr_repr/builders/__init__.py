"""Builders: one config section in, one module out (as timm's `create_model`).

    from lsdr_repr.builders.model import build_model            # cfg.model -> SSLModel
    from lsdr_repr.builders.objective import build_objective    # cfg.objective -> loss module
    from lsdr_repr.builders.augment import build_augment        # cfg.augment -> GpuAugment

The one place where the tensor modules meet the config tree: `models`, `objectives` and
`augment` take plain arguments (the loss its gather function), raise ValueError for misuse and
import neither the config, `distributed` nor the error types; every value a user can get wrong
is checked here first, as a one-line ConfigError naming its key. One module per builder, and
nothing imported here, so building a model (export, evaluation) loads no augmentation code.
"""
