"""`lsdr eval knn | linear | finetune | invariance | rank`: check the arguments, run one
evaluation of `lsdr_repr.eval`, print its table and where its result file went.

    lsdr eval knn runs/demo --train data/sample/train --val data/sample/val
    lsdr eval linear runs/demo                      # shards default to the run's data.* entries
    lsdr eval invariance runs/demo --data data/sample/test
    lsdr eval rank runs/demo

SOURCE is a run directory (newest valid checkpoint), a checkpoint file or a timm export folder.
Every command prints a table, writes RESULTS/<name>.json (RESULTS = RUN_DIR/eval by default) and
logs to the run's W&B run when its id is stored in the checkpoint.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lsdr_repr.cli._common import add_command as add
from lsdr_repr.cli._common import at_least, device_name, positive_float
from lsdr_repr.errors import ConfigError


def register(sub) -> None:
    p = add(sub, "eval", "Evaluate a backbone: knn, linear, finetune, invariance, rank.",
            "lsdr eval linear runs/demo --train data/sample/train --val data/sample/val")
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="SUBCOMMAND")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("source", help="run directory, checkpoint file or timm export folder")
        q.add_argument("--out", default=None, help="results folder (default RUN_DIR/eval)")
        q.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda | cuda:N")
        q.add_argument("--batch-size", type=at_least(1), default=128)
        q.add_argument("--workers", type=at_least(0), default=2, help="reader worker processes")
        q.add_argument("--no-progress", action="store_true",
                       help="no progress bars (off a terminal: no progress lines)")

    def labelled(q: argparse.ArgumentParser) -> None:
        q.add_argument("--train", default=None, help="labelled shards or ImageFolder "
                       "(default: the run's data.train_shards)")
        q.add_argument("--val", default=None, help="labelled shards or ImageFolder "
                       "(default: the run's data.val_shards)")

    q = add(esub, "knn", "Weighted kNN (cosine, temperature voting) on frozen features.",
            "lsdr eval knn runs/demo --train data/sample/train --val data/sample/val --k 20")
    common(q)
    labelled(q)
    q.add_argument("--k", type=at_least(1), default=20)
    q.add_argument("--temperature", type=positive_float, default=0.07)
    q.set_defaults(handler=cmd_knn)

    q = add(esub, "linear", "Linear probe (L-BFGS logistic regression, weight decay chosen on a "
            "held-out part of train).", "lsdr eval linear runs/demo --val data/sample/test")
    common(q)
    labelled(q)
    q.add_argument("--weight-decays", type=_floats, default=None,
                   help="comma-separated grid (default: the probe's own)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(handler=cmd_linear)

    q = add(esub, "finetune", "Fine-tune end to end with a new head for a few epochs.",
            "lsdr eval finetune runs/demo --epochs 3 --lr 1e-3")
    common(q)
    labelled(q)
    q.add_argument("--epochs", type=at_least(1), default=3)
    q.add_argument("--lr", type=positive_float, default=1e-3,
                   help="at batch 256, scaled linearly")
    q.add_argument("--weight-decay", type=at_least(0.0, float), default=0.05)
    q.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "lars"))
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(handler=cmd_finetune)

    q = add(esub, "invariance", "Embedding cosine and retrieval under lighting, rotation, scale "
            "(Kornia's transforms, zero and reflection fill).",
            "lsdr eval invariance runs/demo --data data/sample/test --families rotate,zoom_out")
    common(q)
    q.add_argument("--data", default=None, help="images (default: the run's data.val_shards)")
    q.add_argument("--families", type=lambda s: tuple(s.split(",")), default=None,
                   help="comma-separated families of `lsdr_repr.eval.invariance` (default: all)")
    q.add_argument("--reference", default=None,
                   help="images whose features standardise both sides (default: the run's "
                   "data.train_shards; 'none' for raw features)")
    q.add_argument("--max-images", type=at_least(1), default=512,
                   help="first N images of --data")
    q.set_defaults(handler=cmd_invariance)

    q = add(esub, "rank", "Effective rank (RankMe) and eigenvalue spectrum of the embeddings.",
            "lsdr eval rank runs/demo --data data/sample/val")
    common(q)
    q.add_argument("--data", default=None, help="images (default: the run's data.val_shards)")
    q.add_argument("--max-samples", type=at_least(1), default=None)
    q.set_defaults(handler=cmd_rank)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _setup(args: argparse.Namespace) -> Any:
    """Check every argument that can be checked, then load: a typo in --val must not cost the
    model load and the train split's features first."""
    from lsdr_repr.backbone import is_export_dir

    if args.out is None and is_export_dir(args.source):
        raise ConfigError(f"{args.source}: an export folder has no run directory for the "
                          "results; give a results folder with --out")
    for flag in ("train", "val", "data", "reference"):
        value = getattr(args, flag, None)
        if value and value != "none":
            _check_data_exists(value, f"--{flag}")
    from lsdr_repr.backbone import load_trained_backbone
    from lsdr_repr.eval.cache import Evaluator
    from lsdr_repr.eval.results import results_dir_for

    trained = load_trained_backbone(args.source)
    results = results_dir_for(trained, args.out)
    if results is None:
        raise ConfigError(f"{args.source}: not a run; give a results folder with --out")
    return Evaluator(trained, results, args.device, args.batch_size, args.workers,
                     progress=not args.no_progress)


_DATA_FLAGS = {"train_shards": "--train", "val_shards": "--val/--data"}


def _default_data(ev: Any, given: str | None, field: str) -> str | None:
    """The flag's value, else the run config's data.FIELD, else None."""
    if given:
        return given
    cfg = ev.trained.config
    return getattr(cfg.data, field, None) if cfg is not None else None


def _data_args(ev: Any, *given: tuple[str | None, str]) -> list[str]:
    """`_default_data` for each (flag value, config field), then every default taken from the
    run's config checked to exist, all before the first feature is computed. Every missing
    flag is named in the one error line."""
    values = [_default_data(ev, value, field) for value, field in given]
    missing = [field for (_, field), value in zip(given, values, strict=True) if not value]
    if missing:
        flags = " and ".join(_DATA_FLAGS[field] for field in missing)
        fields = ", ".join(f"data.{field}" for field in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"{flags} {verb} required (the source has no {fields})")
    for (value, field), resolved in zip(given, values, strict=True):
        if not value:
            _check_data_exists(resolved, f"the source's data.{field}")
    return values


def _check_data_exists(spec: str, what: str) -> None:
    """A local path in a data argument that is not there, named before any work starts.
    Remote URLs, `pipe:` commands, globs and brace patterns are left to the readers."""
    from data_pipelines.sources import is_remote

    for part in str(spec).split("::"):
        part = part.strip()
        if not part or is_remote(part) or part.startswith("pipe:") or any(c in part for c in "*?[{"):
            continue
        if not Path(os.path.expanduser(part)).exists():
            raise ConfigError(f"{what} {part}: no such file or directory")


def _finish(ev: Any, name: str, result: dict[str, Any], text: str) -> int:
    from lsdr_repr.eval.results import write_result

    path = write_result(ev.results_dir, name, result, ev.trained)
    print(text)
    if path is not None:
        print(f"wrote {path}")
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from lsdr_repr.eval.frozen import knn_eval
    from lsdr_repr.eval.report import format_metrics

    ev = _setup(args)
    train, val = _data_args(ev, (args.train, "train_shards"), (args.val, "val_shards"))
    res = knn_eval(ev, train, val, args.k, args.temperature)
    return _finish(ev, "knn", res, format_metrics("knn", res["metrics"]))


def cmd_linear(args: argparse.Namespace) -> int:
    from lsdr_repr.eval.frozen import linear_eval
    from lsdr_repr.eval.report import format_metrics

    ev = _setup(args)
    train, val = _data_args(ev, (args.train, "train_shards"), (args.val, "val_shards"))
    grid = {} if args.weight_decays is None else {"weight_decays": args.weight_decays}
    res = linear_eval(ev, train, val, seed=args.seed, **grid)
    return _finish(ev, "linear", res, format_metrics("linear probe", res["metrics"]))


def cmd_finetune(args: argparse.Namespace) -> int:
    from lsdr_repr.eval.finetune import finetune_eval
    from lsdr_repr.eval.report import format_metrics

    ev = _setup(args)
    train, val = _data_args(ev, (args.train, "train_shards"), (args.val, "val_shards"))
    res = finetune_eval(ev, train, val, args.epochs, args.lr,
                        args.weight_decay, args.optimizer, args.seed)
    return _finish(ev, "finetune", res, format_metrics("fine-tuning", res["metrics"]))


def cmd_invariance(args: argparse.Namespace) -> int:
    from lsdr_repr.eval.invariance import invariance_eval
    from lsdr_repr.eval.report import INVARIANCE_LEGEND, format_invariance

    ev = _setup(args)
    reference = None if args.reference == "none" else (
        args.reference or ev.trained.config.data.train_shards or None)
    (data,) = _data_args(ev, (args.data, "val_shards"))
    families = {} if args.families is None else {"families": args.families}
    res = invariance_eval(ev, data, max_images=args.max_images, reference=reference, **families)
    text = f"{INVARIANCE_LEGEND}\n{format_invariance(res['table'])}"
    return _finish(ev, "invariance", res, text)


def cmd_rank(args: argparse.Namespace) -> int:
    from lsdr_repr.eval.frozen import rank_eval
    from lsdr_repr.eval.report import format_metrics

    ev = _setup(args)
    (data,) = _data_args(ev, (args.data, "val_shards"))
    res = rank_eval(ev, data, args.max_samples)
    text = format_metrics("rank", res["metrics"])
    if res["details"]["plot"]:
        text += f"\nspectrum plot: {res['details']['plot']}"
    return _finish(ev, "rank", res, text)
