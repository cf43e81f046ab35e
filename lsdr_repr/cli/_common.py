"""What every command group shares: the help layout, the parser factory, printed lines."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

VERBOSE_HELP = "debug logging; under torchrun or srun, every rank's INFO lines too"


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_command(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser whose `--help` ends with an example. It records itself in the parsed
    namespace (`command_parser`; the innermost command's wins), so a usage error names the
    command's own usage, not the top-level one."""
    parser = sub.add_parser(
        name, help=help_text, description=f"{help_text}\n\nexample:\n  {example}",
        formatter_class=formatter,
    )
    parser.set_defaults(command_parser=parser)
    # Also after the command (`lsdr train CONFIG -v`); SUPPRESS keeps `lsdr -v train` set.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=VERBOSE_HELP)
    return parser


class IntermixedParser(argparse.ArgumentParser):
    """A sub-command parser that lets optionals and positionals interleave
    (`lsdr submit CONFIG --nodes 2 optim.lr=0.1`), which a plain parser refuses once the
    overrides' positional has been consumed."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def wandb_sync_line(run_dir: str | Path) -> str | None:
    """"upload: wandb sync ..." covering every offline piece of the run (None: nothing offline)."""
    from lsdr_repr.tracking import offline_run_dirs, wandb_sync_command

    command = wandb_sync_command(run_dir)
    if command is None:
        return None
    pieces = len(offline_run_dirs(run_dir))
    return f"upload all {pieces} piece{'s' if pieces != 1 else ''} of the W&B run: {command}"


def at_least(low: float, kind: type = int) -> Callable[[str], float]:
    """argparse type: a number of `kind` >= `low` (`--k 0` is a usage error, not a traceback)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= low or value == float("inf"):  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def positive_float(text: str) -> float:
    """argparse type: a float > 0 (a temperature, a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def device_name(text: str) -> str:
    """argparse type: auto | cpu | cuda | cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def count(n: int, noun: str) -> str:
    """'1 shard', '4 shards'."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
