"""`lsdr train` and `lsdr config`."""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence

from lsdr_repr.cli._common import add_command, wandb_sync_line

log = logging.getLogger("lsdr_repr")


def register(sub) -> None:
    p = add_command(sub, "train", "Train (or resume) a run from a YAML config with key=value "
                    "overrides.", "lsdr train configs/demo.yaml optim.lr=0.1 data.batch_size=64")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.1")
    p.set_defaults(handler=cmd_train)

    p = add_command(sub, "config", "Print the resolved config as YAML (after preset and "
                    "overrides).", "lsdr config configs/resnet50_imagenet.yaml optim.lr=0.3")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.1")
    p.set_defaults(handler=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from lsdr_repr.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lsdr_repr.config import check_required, load_config
    from lsdr_repr.preemption import PreemptionFlag

    # `main` installed the handlers before anything heavy; this adds the config's signal.
    preempt = getattr(args, "preempt", None) or PreemptionFlag("SIGUSR2", interrupt=True)
    try:
        # The config is read and checked before torch loads: a typo answers at once.
        cfg = load_config(args.config, args.overrides)
        check_required(cfg, args.config)
        preempt.watch(cfg.train.preempt_signal)
        requeue = sorted(s.name for s in preempt.signals if s != signal.SIGINT)
        ctrl_c = ("; Ctrl-C, once training runs, with a checkpoint and exit status 130"
                  if signal.SIGINT in preempt.signals else "")
        log.info("train: %s stop the run with a checkpoint and exit status 3 (requeued under "
                 "SLURM)%s", " or ".join(requeue), ctrl_c)
        from lsdr_repr.eval.online import online_validator
        from lsdr_repr.train import train

        result = train(cfg, preempt=preempt, validator=online_validator(cfg))
    finally:
        preempt.close()
    from lsdr_repr.distributed import read_dist_env

    if read_dist_env().rank != 0:  # every rank returns here; one summary, not one per GPU
        return result.exit_code
    print(f"step {result.step}/{cfg.train.total_steps}; checkpoint: {result.checkpoint}; "
          f"W&B run: {result.wandb_path or 'none'}")
    sync = wandb_sync_line(result.run_dir)
    if sync:
        print(sync)
    return result.exit_code


def early_preemption_flag(argv: Sequence[str]):
    """For `lsdr train`: the preemption handlers, installed before anything heavy is imported.

    The trainer's imports (torch, timm, kornia, wandb) take seconds on a loaded node; SLURM's
    SIGTERM or SIGUSR2 in those seconds would kill the job with 143/140, which the sbatch script
    does not requeue. Caught here, it ends the run with exit 3.
    """
    positional = [a for a in argv if not a.startswith("-")]
    if not positional or positional[0] != "train":
        return None
    from lsdr_repr.preemption import PreemptionFlag

    return PreemptionFlag("SIGUSR2", interrupt=True)
