"""The `lsdr` command: a thin argparse front over the library.

Each handler parses, calls one library function and prints its result; library errors
(`LsdrError`) become one line on stderr and exit status 2. Heavy imports happen inside the
handlers so `lsdr --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lsdr_repr.errors import LsdrError

log = logging.getLogger("lsdr_repr")

EXIT_USAGE_ERROR = 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help_text, description=f"{help_text}\n\nexample:\n  {example}",
        formatter_class=_formatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsdr",
        description="lsdr-repr: pretrain image backbones invariant to lighting, rotation and scale.",
        formatter_class=_formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add(sub, "demo", "Write the embedded sample shards, train, export and evaluate.",
             "lsdr demo runs/demo")
    p.add_argument("run_dir", nargs="?", default="runs/demo",
                   help="run directory: checkpoints, W&B files, eval and export (default: "
                        "%(default)s)")
    p.add_argument("--data", default="data/sample", help="where the sample shards live")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    p.set_defaults(handler=_cmd_demo)

    p = _add(sub, "train", "Train (or resume) a run from a YAML config with key=value overrides.",
             "lsdr train configs/demo.yaml optim.lr=0.1 data.batch_size=64")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.1")
    p.set_defaults(handler=_cmd_train)

    p = _add(sub, "config", "Print the resolved config as YAML (after preset and overrides).",
             "lsdr config configs/resnet50_imagenet.yaml optim.lr=0.3")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=0.1")
    p.set_defaults(handler=_cmd_config)

    shards = _add(sub, "shards", "Write, index, verify and sample WebDataset shards.",
                  "lsdr shards write ~/images data/shards --max-side 512")
    ssub = shards.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    from data_pipelines.cli import add_shard_commands

    add_shard_commands(ssub, _add)

    for register in _extension_registrars():
        register(sub, _add)
    return parser


def _extension_registrars():
    """Subcommands owned by other modules (submit/status, export, eval), added as they exist."""
    import importlib

    for module_name in ("lsdr_repr.submit", "lsdr_repr.export", "lsdr_repr.evaluate"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        register = getattr(module, "add_cli_commands", None)
        if register is not None:
            yield register


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from lsdr_repr.config import config_to_dict, load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from lsdr_repr.config import check_required, load_config
    from lsdr_repr.preemption import PreemptionFlag

    # `main` installed the handlers before the parser's imports; this adds the config's signal.
    preempt = getattr(args, "preempt", None) or PreemptionFlag("SIGUSR2")
    try:
        cfg = load_config(args.config, args.overrides)
        check_required(cfg, args.config)
        preempt.watch(cfg.train.preempt_signal)
        log.info("train: %s stop the run with a checkpoint and exit status 3",
                 " or ".join(sorted(s.name for s in preempt.signals)))
        from lsdr_repr.train import train

        result = train(cfg, preempt=preempt)
    finally:
        preempt.close()
    from lsdr_repr.distributed import read_dist_env

    if read_dist_env().rank != 0:  # every rank returns here; one summary, not one per GPU
        return result.exit_code
    print(f"step {result.step}/{cfg.train.total_steps}; checkpoint: {result.checkpoint}; "
          f"W&B run: {result.wandb_path}")
    sync = wandb_sync_line(result.run_dir)
    if sync:
        print(sync)
    return result.exit_code


def wandb_sync_line(run_dir) -> str | None:
    """"upload: wandb sync ..." covering every offline piece of the run (None: nothing offline)."""
    from lsdr_repr.tracking import offline_run_dirs, wandb_sync_command

    command = wandb_sync_command(run_dir)
    if command is None:
        return None
    pieces = len(offline_run_dirs(run_dir))
    return f"upload all {pieces} piece{'s' if pieces != 1 else ''} of the W&B run: {command}"


def _cmd_demo(args: argparse.Namespace) -> int:
    from lsdr_repr.demo import run_demo

    result = run_demo(args.run_dir, args.data, args.overrides)
    if not result.is_main:
        return result.exit_code
    if result.report:
        print(result.report)
    print(f"run directory:   {result.run_dir}")
    print(f"checkpoint:      {result.checkpoint}")
    sync = wandb_sync_line(result.run_dir)
    if sync:
        print(f"W&B offline run: {result.run_dir / 'wandb'}; {sync}")
    elif result.wandb_path:
        print(f"W&B run:         {result.wandb_path}")
    if result.export_dir:
        print(f"exported backbone: {result.export_dir}")
        print("load it with:\n  " + load_snippet(result.export_dir, result.num_classes))
    return result.exit_code


def load_snippet(export_dir, num_classes: int | None = None) -> str:
    """The timm line that loads an export; `num_classes` of the data (a placeholder if unknown)."""
    classes = num_classes if num_classes is not None else "NUM_CLASSES"
    return f'timm.create_model("local-dir:{export_dir}", pretrained=True, num_classes={classes})'


def _early_preemption_flag(argv: Sequence[str]):
    """For `lsdr train`: the preemption handlers, installed before anything heavy is imported.

    Building the parser imports torch (export and evaluation register subcommands), seconds on a
    loaded node; SLURM's SIGTERM or SIGUSR2 in those seconds would kill the job with 143/140,
    which the sbatch script does not requeue. Caught here, it ends the run with exit 3.
    """
    positional = [a for a in argv if not a.startswith("-")]
    if not positional or positional[0] != "train":
        return None
    from lsdr_repr.preemption import PreemptionFlag

    return PreemptionFlag("SIGUSR2")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    preempt = _early_preemption_flag(argv)
    try:
        return _main(argv, preempt)
    finally:
        if preempt is not None:
            preempt.close()


def _main(argv: list[str], preempt) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.preempt = preempt
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.handler(args) or 0)
    except LsdrError as exc:
        print(f"lsdr: error: {exc}", file=sys.stderr)
        return EXIT_USAGE_ERROR
    except KeyboardInterrupt:
        print("lsdr: interrupted", file=sys.stderr)
        return 130
