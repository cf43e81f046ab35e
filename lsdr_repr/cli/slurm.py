"""`lsdr submit` and `lsdr status` (SLURM), and the batch script's internal `lsdr _job-plan`."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from lsdr_repr.cli._common import IntermixedParser
from lsdr_repr.cli._common import add_command as add


def register(sub) -> None:
    p = add(sub, "submit", "Submit a training run to SLURM (renders RUN_DIR/train.sbatch).",
            "lsdr submit configs/resnet50_imagenet.yaml optim.lr=0.3 --nodes 4 --gpus-per-node 8 "
            "--partition gpu --time 48:00:00")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, help="0: CPU-only job (gloo), see --tasks-per-node")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: one per GPU)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--mem", help="memory per node, e.g. 480G")
    p.add_argument("--exclusive", action="store_true", default=None)
    p.add_argument("--array", help="array spec, e.g. 0-3: task i trains with train.seed + i")
    p.add_argument("--job-name")
    p.add_argument("--python", help="interpreter on the compute nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    p.add_argument("--watch", action="store_true", help="follow the job until it finishes")
    p.add_argument("--interval", type=float, default=10.0, help="--watch poll interval (s)")
    p.set_defaults(handler=cmd_submit)
    # Flags and key=value overrides in any order (`... --nodes 2 optim.lr=0.1`), which a plain
    # argparse parser refuses once the overrides' positional has been consumed.
    p.__class__ = IntermixedParser

    p = add(sub, "status", "Show a run's SLURM jobs, step/total, loss, throughput, ETA, last kNN and RankMe, "
            "checkpoints and the W&B upload command.",
            "lsdr status runs/resnet50")
    p.add_argument("run_dir", help="the run directory (train.run_dir)")
    p.add_argument("--watch", action="store_true", help="poll until the jobs finish")
    p.add_argument("--interval", type=float, default=10.0)
    p.set_defaults(handler=cmd_status)

    # Used by the batch script itself; not listed in `lsdr --help`.
    p = sub.add_parser("_job-plan", description="internal: arguments for the batch script")
    p.add_argument("--array-task", default="")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_job_plan)


def cmd_submit(args: argparse.Namespace) -> int:
    from lsdr_repr.submit import SubmitOptions, submit

    names = {f.name for f in dataclasses.fields(SubmitOptions)}
    options = SubmitOptions(**{k: v for k, v in vars(args).items() if k in names})
    result = submit(args.config, args.overrides, options, dry_run=args.dry_run)
    if args.dry_run:
        print(result.script, end="")
        # on stderr: stdout stays the script alone (`lsdr submit ... --dry-run > job.sh`)
        print(f"dry run: nothing written or submitted; a submit would write the resolved "
              f"config to {result.config_path} (see `lsdr config`) and run: "
              f"{shlex.join(result.sbatch_command)}", file=sys.stderr)
        return 0
    print(result.describe())
    return _watch(result.run_dir, args.interval) if args.watch else 0


def cmd_status(args: argparse.Namespace) -> int:
    from lsdr_repr.submit import format_status, run_status

    if args.watch:
        return _watch(args.run_dir, args.interval)
    print(format_status(run_status(args.run_dir)))
    return 0


def _watch(run_dir, interval_s: float) -> int:
    """Print the status at every change until the jobs finish; 0 if all of them completed."""
    from lsdr_repr.submit import format_status, watch

    final = watch(run_dir, lambda s: print(format_status(s), flush=True), interval_s=interval_s)
    return 0 if all(j.state == "COMPLETED" for j in final.jobs) else 1


def cmd_job_plan(args: argparse.Namespace) -> int:
    from lsdr_repr.submit import job_plan

    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    fields = job_plan(rest, array_task=args.array_task)
    sys.stdout.write("".join(f + "\0" for f in fields))
    return 0
