"""`lsdr demo`: the main job on the embedded data; prints the report and where things are."""

from __future__ import annotations

import argparse
from pathlib import Path

from lsdr_repr.cli._common import add_command, wandb_sync_line


def register(sub) -> None:
    p = add_command(sub, "demo", "Write the embedded sample shards, train, export and evaluate.",
                    "lsdr demo runs/demo")
    p.add_argument("run_dir", nargs="?", default="runs/demo",
                   help="run directory: checkpoints, W&B files, eval and export (default: "
                        "%(default)s)")
    p.add_argument("--data", default="data/sample", help="where the sample shards live")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
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


def load_snippet(export_dir: str | Path, num_classes: int | None = None) -> str:
    """The timm line that loads an export; `num_classes` of the data (a placeholder if unknown)."""
    classes = num_classes if num_classes is not None else "NUM_CLASSES"
    return f'timm.create_model("local-dir:{export_dir}", pretrained=True, num_classes={classes})'
