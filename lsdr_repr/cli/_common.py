"""What every command group shares: the help layout, the parser factory, printed lines."""

from __future__ import annotations

import argparse
from pathlib import Path


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
