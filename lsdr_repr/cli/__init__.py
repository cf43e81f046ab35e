"""The `lsdr` command: the only place that parses arguments and prints.

One module per command group (`train`, `demo`, `shards`, `slurm`, `export`, `eval`), each with a
`register(sub)` that adds its argparse parsers and handlers that call one library function and
print the result object it returns. Library errors (`LsdrError`) become one line on stderr and
exit status 2.

Nothing here or in the group modules imports torch at module level: the library is imported
inside the handlers, so `lsdr --help`, `lsdr X --help` and config errors answer at Python's own
start-up time (tests/test_cli.py pins that).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence

from lsdr_repr.cli import demo, export, shards, slurm, train
from lsdr_repr.cli import eval as evaluation
from lsdr_repr.cli._common import VERBOSE_HELP, formatter
from lsdr_repr.errors import LsdrError
from lsdr_repr.launch_env import DistEnv, read_dist_env
from lsdr_repr.preemption import EXIT_BAD_INPUT, EXIT_INTERRUPTED

# In `lsdr --help` order; each module's `register(sub)` adds its commands.
GROUPS = (demo, train, shards, slurm, export, evaluation)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsdr",
        description="lsdr-repr: pretrain image backbones invariant to lighting, rotation and scale.",
        formatter_class=formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    preempt = train.early_preemption_flag(argv)
    try:
        return _main(argv, preempt)
    finally:
        if preempt is not None:
            preempt.close()


def _job(environ: Mapping[str, str] | None = None) -> DistEnv:
    try:
        return read_dist_env(environ, quiet=True)
    except LsdrError:  # a malformed launch is the command's own one-line error, a moment later
        return DistEnv()


def rank_tag(environ: Mapping[str, str] | None = None) -> str:
    """'[rank R] ' under torchrun or srun (which of 64 processes said it), else ''."""
    job = _job(environ)
    return f"[rank {job.rank}] " if job.is_distributed else ""


def configure_logging(verbose: bool, environ: Mapping[str, str] | None = None) -> None:
    """INFO (DEBUG with -v) on stderr. Under torchrun or srun each line names its rank, and the
    ranks other than 0 log only warnings and errors unless -v: a 64-GPU job prints one progress
    stream, not 64 interleaved copies of it (as Lightning's rank-zero logging does)."""
    job = _job(environ)
    level = logging.DEBUG if verbose else logging.INFO
    where = rank_tag(environ)
    if job.is_distributed and job.rank != 0 and not verbose:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """argv -> the parsed command; key=value overrides may also follow the options.

    argparse fills a command's `overrides` only from the positionals before its first option,
    so `lsdr demo runs/x --data d train.seed=1` would be refused; the key=value words it leaves
    over join the command's overrides instead. Anything else left over is the usual usage
    error (exit 2).
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    extra = [word for word in rest if "=" in word and not word.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        command = getattr(args, "command_parser", None) or parser
        command.error(f"unrecognized arguments: {' '.join(rest)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def _main(argv: list[str], preempt) -> int:
    args = parse_command_line(argv)
    args.preempt = preempt
    configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except LsdrError as exc:
        print(f"lsdr: error: {rank_tag()}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"lsdr: {rank_tag()}interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
