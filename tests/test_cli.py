"""The `lsdr` command (lsdr_repr/cli/): help text, start-up cost, where printing happens."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsdr_repr.cli import build_parser, parse_command_line

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "kornia", "wandb", "webdataset")


def _walk(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                if not sub_name.startswith("_"):  # internal commands, not in --help
                    yield from _walk(sub, f"{name} {sub_name}")
        elif not action.option_strings:
            yield name, action


def test_every_positional_argument_has_help_text():
    """`lsdr X --help` explains CONFIG, OVERRIDES, RUN_DIR ... not only the flags."""
    positionals = list(_walk(build_parser(), "lsdr"))
    assert {(n, a.dest) for n, a in positionals} >= {("lsdr train", "config"),
                                                     ("lsdr train", "overrides"),
                                                     ("lsdr demo", "run_dir"),
                                                     ("lsdr status", "run_dir")}
    missing = [f"{n} {a.dest}" for n, a in positionals if not a.help]
    assert not missing


def _heavy_modules_after(argv: list[str]) -> tuple[int, list[str], str]:
    """(exit status, heavy modules imported, stderr) of `lsdr ARGV` in a fresh interpreter."""
    code = (
        "import json, sys\n"
        "from lsdr_repr.cli import main\n"
        "try:\n"
        f"    status = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"print(json.dumps({{'status': status, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["status"], result["heavy"], proc.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["train", "--help"], ["eval", "linear", "--help"], ["export", "--help"],
    ["submit", "--help"], ["shards", "write", "--help"],
])
def test_help_imports_no_heavy_library(argv):
    """`lsdr --help` answers at Python's start-up time: torch, timm, kornia and wandb load only
    inside the handler that needs them."""
    status, heavy, _ = _heavy_modules_after(argv)
    assert status == 0 and heavy == []


def test_a_config_typo_is_reported_before_any_heavy_import(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 0.1\n")
    status, heavy, err = _heavy_modules_after(["train", str(cfg), "optim.lrr=0.2"])
    assert status == 2 and heavy == []
    assert "unknown key 'optim.lrr' (did you mean 'optim.lr'?)" in err


def _calls(path: Path, name: str) -> list[int]:
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name) and node.func.id == name]


def test_only_the_cli_prints():
    """Library code returns result objects (and logs); lsdr_repr/cli/ prints them."""
    offenders = {}
    for package in ("lsdr_repr", "data_pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "cli" in path.relative_to(ROOT).parts:
                continue
            lines = _calls(path, "print")
            if lines:
                offenders[str(path.relative_to(ROOT))] = lines
    assert offenders == {}


def test_benchmarks_do_not_drive_the_cli():
    """Benchmarks call the library: what they time must not depend on argument parsing."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(m and m.startswith("lsdr_repr.cli") for m in imported), path.name


def test_overrides_may_follow_the_options():
    args = parse_command_line(["demo", "runs/x", "--data", "d", "train.seed=1", "optim.lr=0.1"])
    assert (args.run_dir, args.data) == ("runs/x", "d")
    assert args.overrides == ["train.seed=1", "optim.lr=0.1"]
    args = parse_command_line(["demo", "runs/x", "train.seed=1", "--data", "d", "optim.lr=0.1"])
    assert args.overrides == ["train.seed=1", "optim.lr=0.1"]


def test_a_stray_word_after_the_options_is_still_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["demo", "runs/x", "--data", "d", "stray"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without overrides takes no key=value
        parse_command_line(["shards", "verify", "d", "a=b"])


@pytest.mark.parametrize(("argv", "usage", "unknown"), [
    (["train", "configs/demo.yaml", "--resume", "runs/x"], "usage: lsdr train ", "--resume runs/x"),
    (["shards", "write", "src", "out", "--bogus"], "usage: lsdr shards write ", "--bogus"),
    (["submit", "configs/demo.yaml", "--gpu-per-node", "4"], "usage: lsdr submit ",
     "--gpu-per-node 4"),
])
def test_an_unknown_option_shows_the_commands_own_usage(capsys, argv, usage, unknown):
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(usage), err
    assert f"unrecognized arguments: {unknown}" in err


LOG_BOTH = ("import logging, sys; from lsdr_repr.cli import configure_logging; "
            "configure_logging('-v' in sys.argv); log = logging.getLogger('lsdr_repr.x'); "
            "log.info('progress'); log.warning('trouble')")


@pytest.mark.parametrize("rank, verbose, shown", [
    (None, False, ["INFO lsdr_repr.x: progress", "WARNING lsdr_repr.x: trouble"]),
    ("0", False, ["[rank 0] INFO lsdr_repr.x: progress", "[rank 0] WARNING lsdr_repr.x: trouble"]),
    ("3", False, ["[rank 3] WARNING lsdr_repr.x: trouble"]),
    ("3", True, ["[rank 3] INFO lsdr_repr.x: progress", "[rank 3] WARNING lsdr_repr.x: trouble"]),
])
def test_under_torchrun_only_rank_0_logs_progress(rank, verbose, shown):
    """A 64-GPU job prints one progress stream: the other ranks log warnings and errors (all of
    it with -v), and every line under torchrun names its rank."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_JOB_ID")}
    if rank is not None:
        env.update(RANK=rank, WORLD_SIZE="4", LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                   MASTER_PORT="29500")
    proc = subprocess.run([sys.executable, "-c", LOG_BOTH, *(["-v"] if verbose else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    lines = [line.split(" ", 1)[1] for line in proc.stderr.splitlines()]  # drop the clock
    assert lines == shown


@pytest.mark.parametrize("argv, complaint", [
    (["eval", "knn", "runs/x", "--k", "0"], "--k: must be at least 1, got 0"),
    (["eval", "knn", "runs/x", "--temperature", "0"], "--temperature: must be positive"),
    (["eval", "knn", "runs/x", "--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
    (["eval", "linear", "runs/x", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "rank", "runs/x", "--workers", "-1"], "--workers: must be at least 0"),
])
def test_eval_arguments_out_of_range_are_usage_errors(argv, complaint, capsys):
    """Before: `--k 0` was a ValueError traceback (exit 1) after the features were computed,
    `--temperature 0` printed a top-1, `--device gpu` was torch's list of device types."""
    with pytest.raises(SystemExit) as info:
        parse_command_line(argv)
    assert info.value.code == 2 and complaint in capsys.readouterr().err


def test_a_gpu_that_is_not_there_is_one_line():
    import torch

    from lsdr_repr.errors import ConfigError
    from lsdr_repr.eval.features import resolve_device

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last, or cuda:0 without any
    with pytest.raises(ConfigError, match=rf"device '{missing}': this machine has \d CUDA"):
        resolve_device(missing)
    assert resolve_device("cpu").type == "cpu"


def test_an_error_line_under_torchrun_names_its_rank():
    from lsdr_repr.cli import rank_tag

    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert rank_tag(torchrun) == "[rank 1] " and rank_tag({}) == ""


@pytest.mark.parametrize("argv, verbose", [
    (["train", "c.yaml", "-v"], True), (["-v", "train", "c.yaml"], True),
    (["train", "c.yaml"], False), (["eval", "knn", "runs/x", "--verbose"], True),
])
def test_verbose_goes_before_or_after_the_command(argv, verbose):
    assert parse_command_line(argv).verbose is verbose
