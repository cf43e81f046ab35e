"""Representation quality: LSDR against VICReg, Barlow Twins and a random-init floor.

    python benchmarks/quality.py --split val --out bench_out/quality_val        # tuning
    python benchmarks/quality.py --split test --out bench_out/quality_test      # the report
    python benchmarks/quality.py --image-folder ~/my_images --steps 2000 ...    # a larger run

Every arm trains the same backbone (configs/demo.yaml: resnet18, projector 512-512-512, 48 px
views) with the same data, augmentations (`--augment`, default the `lsdr-invariance` preset with
demo.yaml's data-specific keys), optimiser (LARS with the small-data settings of RECIPE below),
steps, batch size and seed through the real trainer (`lsdr_repr.train.train(cfg)`, W&B disabled), then
runs the real evaluation functions on the held-out split: linear probe (`probes.linear_probe`) and
weighted kNN (`probes.knn_accuracy`) on frozen backbone features (`eval.features.extract_features`),
the invariance table (`eval.invariance.backbone_invariance_table`: retrieval of a transformed copy among the
originals under lighting, rotation, zoom in, zoom out and all at once) and the effective rank
(`eval.frozen.embedding_rank`). The random-init arm evaluates the same architecture untrained
(`backbone.random_backbone`). Several seeds; the report gives mean and sample std over seeds.

Arms (`--arms`, comma separated; `NAME@PRESET` trains NAME with another augmentation preset):
  lsdr          LSDR with its defaults (configs/demo.yaml's objective and model.stages)
  lsdr-nolayer  LSDR without the layer-wise terms (model.stages: [])
  vicreg        VICReg, the reference coefficients (25, 25, 1)
  barlow        Barlow Twins (lambda 0.0051)
  random        the untrained backbone (the floor)
`--arm "LABEL=BASE[@PRESET] key=value ..."` adds an arm with config overrides (tuning variants).
By default the augmentation study arms `vicreg@vicreg` and `lsdr@vicreg` run too: with the arms
at `lsdr-invariance` they separate what the objective and what the preset contribute.

Data (`--data`): `digits` (default) are scikit-learn's 1797 8x8 handwritten digits, coloured
and upscaled (data_pipelines/sample.py), split 1078 / 359 / 360 (train / val / test);
`digits-grey` leaves them grey as scanned, `digits-photos` puts them on crops of
scikit-image's photos; `--image-folder ROOT` (one
subfolder per class) is split 60 / 20 / 20 the same way and sharded; `--train/--val/--test`
take existing labelled shard directories. Tune with `--split val`; `--split test` is for the
reported configurations only.

With `--jobs N` the (arm, seed) runs go N at a time, each in its own process (a small model
leaves a GPU mostly idle, so several runs share it). Writes OUT/quality_<split>.json (every
run and the aggregates), OUT/quality_<split>.md (the tables) and OUT/*.png (plots).

Default size: 1600 steps x batch 256 per run (at 400 steps VICReg's probe was still 5-6 points
below its 1600-step value); the reported table (5 arms x 3 seeds) took 238 s on one H100 with
--jobs 15, about 3 minutes per run with 15 sharing the GPU (benchmarks/RESULTS.md,
"Representation quality"). What the embedded data can show: 1078 training images of 10 digit
classes at 48 px, a few minutes of training: differences of a few points between objectives are
within the seed spread, and nothing here speaks for natural images at ImageNet scale; use
--image-folder for that.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

log = logging.getLogger("quality")

# Every product arm trains with the config's recipe (optimiser, augmentations, model), so the
# arms differ only in their objective unless an arm's overrides say otherwise.
NO_STAGES = ["model.stages=[]", "objective.layer_weights=[]",
             "objective.layer_invariance_weights=[]", "objective.layer_variance_weights=[]"]
# Built-in arms: objective name and overrides on top of the base config. The baselines pin their
# published coefficients, so a change of LSDR's defaults never changes them.
ARMS: dict[str, tuple[str | None, list[str]]] = {
    "lsdr": ("lsdr", []),
    "lsdr-nolayer": ("lsdr", NO_STAGES),
    "vicreg": ("vicreg", NO_STAGES + ["objective.invariance_weight=25.0",
                                      "objective.variance_weight=25.0",
                                      "objective.decorrelation_weight=1.0",
                                      "objective.gamma=1.0", "objective.eps=0.0001"]),
    "barlow": ("barlow", NO_STAGES + ["objective.barlow_lambda=0.0051"]),
    "random": (None, []),
    # external references (benchmarks/references.py): no product code trains them
    "pixels": ("ref:pixels", []),
    "supervised": ("ref:supervised", []),
    "plain-vicreg": ("ref:plain-vicreg", []),
}
DEFAULT_ARMS = "lsdr,vicreg,barlow,plain-vicreg,pixels,supervised,random"
# Columns of the summary table: (key in a run's metrics, header).
SUMMARY = [("linear_top1", "linear"), ("knn_top1", "kNN"),
           ("retrieval/brightness@0.6", "bright x0.6"),
           ("retrieval/rotate/zeros@30", "rot 30 zeros"),
           ("retrieval/rotate/reflection@30", "rot 30 refl"),
           ("retrieval/zoom_out/zeros@0.7", "zoom-out 0.7 zeros"),
           ("retrieval/zoom_out/reflection@0.7", "zoom-out 0.7 refl"),
           ("retrieval/combined/zeros@30/0.7/0.6", "combined zeros"),
           ("retrieval/combined/reflection@30/0.7/0.6", "combined refl"),
           ("rankme", "RankMe")]


@dataclass
class Arm:
    label: str
    objective: str | None  # None: the untrained backbone
    preset: str | None  # augmentation preset (None: --augment)
    overrides: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--arms", default=DEFAULT_ARMS, help="comma-separated NAME[@PRESET]")
    p.add_argument("--arm", action="append", default=[],
                   help='extra arm "LABEL=BASE[@PRESET] key=value ..." (repeatable)')
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--split", default="val",
                   help="held-out split(s) evaluated: val, test or val,test (the same trained "
                   "backbones on both); tune on val, read test once per reported configuration")
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=256, help="global batch (images)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps/10)")
    p.add_argument("--augment", default="lsdr-invariance",
                   help="augmentation preset of every arm without @PRESET")
    p.add_argument("--image-size", type=int, default=64, help="side S of the loader's images")
    p.add_argument("--crop", type=int, default=48,
                   help="side R of the views and the evaluation, for every arm: the reference "
                   "scripts train at this side too (the issue's plain row is --crop 32)")
    p.add_argument("--data", choices=("digits", "digits-grey", "digits-photos", "fashion-mnist"),
                   default="digits")
    p.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist",
                   help="Fashion-MNIST idx files (apt-get install dataset-fashion-mnist)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N images of each Fashion-MNIST split (smoke runs)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the shards")
    p.add_argument("--image-folder", default=None, help="class-per-subfolder images to use")
    p.add_argument("--train", default=None, help="labelled train shards (with --val/--test)")
    p.add_argument("--val", default=None)
    p.add_argument("--test", default=None)
    p.add_argument("--data-dir", default=None, help="where data is written (default WORK/data)")
    p.add_argument("--out", required=True, help="reports and plots")
    p.add_argument("--work", default=None, help="run folders and job files (default OUT)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=3, help="train loader workers per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    p.add_argument("--max-invariance-images", type=int, default=2000,
                   help="first N held-out images: the originals retrieval searches among")
    p.add_argument("--knn-k", type=int, default=5)
    p.add_argument("--max-eval-samples", type=int, default=None,
                   help="first N images of each split for the probes (smoke runs)")
    p.add_argument("--weight-decays", default=None,
                   help="linear-probe weight-decay grid (default probes.DEFAULT_WEIGHT_DECAYS)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm")
    p.add_argument("--keep-runs", action="store_true", help="keep the run folders (checkpoints)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: one run
    return p.parse_args(argv)


def parse_arms(args: argparse.Namespace) -> list[Arm]:
    """The arms of --arms and --arm, each with its augmentation preset resolved."""
    arms = [_arm(spec.strip(), spec.strip(), []) for spec in args.arms.split(",") if spec.strip()]
    for text in args.arm:
        label, sep, rest = text.partition("=")
        parts = rest.split()
        if not sep or not label.strip() or not parts:
            raise SystemExit(f"--arm {text!r}: expected 'LABEL=BASE[@PRESET] key=value ...'")
        arms.append(_arm(label.strip(), parts[0], parts[1:]))
    for arm in arms:
        product = arm.objective is not None and not arm.objective.startswith("ref:")
        arm.preset = (arm.preset or args.augment) if product else None
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--arms/--arm: duplicate labels in {labels}")
    return arms


def _arm(label: str, base_spec: str, extra: list[str]) -> Arm:
    base, _, preset = base_spec.partition("@")
    if base not in ARMS:
        raise SystemExit(f"arm {label!r}: unknown base {base!r} (known: {', '.join(ARMS)})")
    objective, overrides = ARMS[base]
    if (objective is None or objective.startswith("ref:")) and (preset or extra):
        raise SystemExit(f"arm {label!r}: {base} takes no preset or overrides")
    return Arm(label, objective, preset or None, [*overrides, *extra])


# ---------------------------------------------------------------------------------------- data
def prepare_data(args: argparse.Namespace, work: Path) -> tuple[dict[str, str], str]:
    """{train, val, test} shard specs and a one-line description of the data."""
    if args.train or args.val or args.test:
        if not (args.train and args.val and args.test):
            raise SystemExit("--train, --val and --test go together")
        return {"train": args.train, "val": args.val, "test": args.test}, "given shards"
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    if args.data == "fashion-mnist":
        from data_pipelines.fashion_mnist import write_fashion_mnist_shards

        splits = write_fashion_mnist_shards(
            data_dir / f"fashion-mnist-q{args.jpeg_quality}", root=Path(args.fashion_dir),
            limit=args.limit, quality=args.jpeg_quality)
        what = ("Fashion-MNIST (Debian dataset-fashion-mnist: 28x28 grey product photos padded "
                f"to 32x32 RGB, JPEG q{args.jpeg_quality}); train 55,000 / val 5,000 carved "
                "from the official train set / test = the official 10,000"
                + (f", first {args.limit} of each" if args.limit else ""))
        return {k: str(v) for k, v in splits.items()}, what
    if args.image_folder:
        return folder_shards(Path(args.image_folder), data_dir / "folder"), (
            f"image folder {args.image_folder}")
    from data_pipelines.sample import write_sample_shards

    photos, grey = args.data == "digits-photos", args.data == "digits-grey"
    splits = write_sample_shards(data_dir / args.data, image_size=args.image_size, photos=photos,
                                 grey=grey)
    what = (f"scikit-learn digits (1797 real 8x8 scans, {'grey' if grey else 'coloured'}, "
            "upscaled to "
            f"{args.image_size} px{', on scikit-image photo crops' if photos else ''}); "
            "1078 train / 359 val / 360 test")
    return {k: str(v) for k, v in splits.items()}, what


def folder_shards(root: Path, out: Path) -> dict[str, str]:
    """A class-per-subfolder tree split 60/20/20 (stratified, seeded) and written as shards."""
    import numpy as np

    from data_pipelines.sample import split_indices
    from data_pipelines.writer import write_shards

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file():
                files.append(f.resolve())
                labels.append(c)
    if not files:
        raise SystemExit(f"--image-folder {root}: no class subfolders with files")
    parts = split_indices(np.array(labels))
    splits = {}
    for split, index in parts.items():
        target = out / split
        if not (target / "manifest.json").is_file():
            lst = out / f"{split}.csv"
            lst.parent.mkdir(parents=True, exist_ok=True)
            with lst.open("w", newline="") as fh:
                csv.writer(fh).writerows((str(files[i]), labels[i]) for i in index)
            write_shards(lst, target, prefix=split, max_count=256, workers=None)
        splits[split] = str(target)
    return splits


# ------------------------------------------------------------------------------------ one run
def job_overrides(job: dict[str, Any]) -> list[str]:
    steps = job["steps"]
    warmup = job["warmup"] if job["warmup"] is not None else max(1, steps // 10)
    over = [
        f"train.run_dir={job['run_dir']}", f"data.train_shards={job['splits']['train']}",
        f"data.val_shards={job['splits']['val']}", f"data.test_shards={job['splits']['test']}",
        f"data.image_size={job['image_size']}", f"data.batch_size={job['batch']}",
        f"data.num_workers={job['workers']}", f"augment.crop_size={job['crop']}",
        # a --crop above --image-size is the measured small-image recipe, not a slip
        f"augment.upscale={str(job['crop'] > job['image_size']).lower()}",
        f"train.total_steps={steps}",
        f"train.seed={job['seed']}", f"train.device={job['device']}",
        f"optim.warmup_steps={warmup}", f"train.checkpoint_every={steps}",
        "train.keep_checkpoints=1", "train.eval_every=0", "train.image_grid_every=0",
        "train.spectrum_every=0", f"train.log_every={max(1, min(50, steps))}",
        "log.wandb.mode=disabled", "log.progress=false",
    ]
    if job["preset"] is not None:
        over.append(f"augment.preset={job['preset']}")
    if job["objective"] is not None and not job["objective"].startswith("ref:"):
        over.append(f"objective.name={job['objective']}")
    return over + job["set"] + job["overrides"]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (arm, seed) with the real trainer (or take the random init) and evaluate it."""
    import torch

    from lsdr_repr.backbone import TrainedBackbone, load_trained_backbone, random_backbone
    from lsdr_repr.config import config_to_dict, load_config
    from lsdr_repr.eval.features import resolve_device
    from lsdr_repr.train import EXIT_OK, train

    cfg = load_config(job["config"], job_overrides(job))
    result: dict[str, Any] = {"arm": job["label"], "seed": job["seed"],
                              "config": config_to_dict(cfg)}
    device = resolve_device(job["device"])
    started = time.perf_counter()
    if job["objective"] is not None and job["objective"].startswith("ref:"):
        backbone, result["train_s"] = train_reference(job, cfg, device)
    elif job["objective"] is None:
        shell = TrainedBackbone(backbone=None, arch=cfg.model.arch, image_size=cfg.augment.crop_size,
                                mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std),
                                config=cfg)
        backbone = random_backbone(shell, seed=job["seed"])
    else:
        res = train(cfg)
        result["train_s"] = time.perf_counter() - started
        result["exit_code"] = res.exit_code
        result["final_losses"] = last_losses(Path(cfg.train.run_dir))
        if res.exit_code != EXIT_OK:
            result["error"] = f"training ended with exit code {res.exit_code}"
            return result
        backbone = load_trained_backbone(cfg.train.run_dir).backbone
    backbone.to(device)
    eval_started = time.perf_counter()
    result["splits"] = evaluate(backbone, cfg, job["splits"], job["eval_splits"], device, job)
    result["eval_s"] = time.perf_counter() - eval_started
    if not job["keep_runs"]:
        shutil.rmtree(cfg.train.run_dir, ignore_errors=True)
    del backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def train_reference(job: dict[str, Any], cfg, device) -> tuple[Any, float]:
    """A reference row's feature module (benchmarks/references.py), trained on the train split
    held in memory at the view size."""
    import torch

    from lsdr_repr.eval.features import iter_images, normalize_images

    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    from references import build_reference

    xs, ys = [], []
    size = cfg.augment.crop_size
    for images, labels, _ in iter_images(job["splits"]["train"], cfg.data.image_size, 512, 0):
        x01 = normalize_images(images, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        xs.append((x01.clamp(0, 1) * 255).round().to(torch.uint8))
        ys.append(labels.long())
    images, labels = torch.cat(xs).to(device), torch.cat(ys).to(device)
    return build_reference(job["objective"][4:], images, labels, arch=cfg.model.arch,
                           steps=job["steps"], batch=job["batch"], seed=job["seed"],
                           mean=tuple(cfg.augment.mean), std=tuple(cfg.augment.std))


def last_losses(run_dir: Path) -> dict[str, Any]:
    """The loss terms and diagnostics of the last logged step (tracking.read_run_log)."""
    from lsdr_repr.tracking import read_run_log

    records = [r for r in read_run_log(run_dir)
               if any(k.startswith("loss/") for k in r.get("metrics", {}))]
    if not records:
        return {}
    last = records[-1]
    return {"step": last["step"], **{k: v for k, v in last["metrics"].items()
                                     if k.startswith(("loss/", "diag/", "nonfinite"))}}


def evaluate(backbone, cfg, splits: dict[str, str], eval_splits: list[str], device,
             job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{split: {"metrics", "invariance"}}: linear probe, kNN, effective rank and the invariance
    table on each held-out split (probes fitted on the train split)."""
    from lsdr_repr.eval.features import extract_features

    size, mean, std = cfg.augment.crop_size, cfg.augment.mean, cfg.augment.std
    kw = {"device": device, "num_workers": 2, "max_samples": job["max_eval_samples"]}
    tr = extract_features(backbone, splits["train"], size, mean, std, **kw).labelled("train")
    return {split: _evaluate_split(backbone, tr, splits[split], split, size, mean, std, device,
                                   job) for split in eval_splits}


def _evaluate_split(backbone, tr, data: str, split: str, size: int, mean, std, device,
                    job: dict[str, Any]) -> dict[str, Any]:
    from lsdr_repr.eval import invariance, probes
    from lsdr_repr.eval.features import extract_features, load_images01
    from lsdr_repr.eval.frozen import embedding_rank

    kw = {"device": device, "num_workers": 2, "max_samples": job["max_eval_samples"]}
    ev = extract_features(backbone, data, size, mean, std, **kw).labelled(split)
    num_classes = int(max(tr.y.max(), ev.y.max())) + 1
    wds = job["weight_decays"] or probes.DEFAULT_WEIGHT_DECAYS
    # The probes run on the GPU when there is one (a [55000, 512] problem), else on the CPU.
    dev = device if str(device).startswith("cuda") else "cpu"
    lin = probes.linear_probe(tr.x.to(dev), tr.y.to(dev), ev.x.to(dev), ev.y.to(dev),
                              num_classes=num_classes, weight_decays=wds)
    knn = probes.knn_accuracy(tr.x.to(dev), tr.y.to(dev), ev.x.to(dev), ev.y.to(dev),
                              k=job["knn_k"], num_classes=num_classes)
    rank = embedding_rank(ev.x)
    images = load_images01(data, size, job["max_invariance_images"], num_workers=0)
    backbone.eval()
    # Kornia's transforms, zero and reflection fill; features standardised by the train split's
    table = invariance.backbone_invariance_table(backbone, images.to(device), mean, std,
                                                 reference=tr.x[:20000].to(device))
    metrics = {"linear_top1": lin.top1, "linear_weight_decay": lin.weight_decay,
               "knn_top1": knn["top1"], "rankme": rank["rankme"],
               "numerical_rank": rank["numerical_rank"], "num_train": len(tr.y),
               "num_eval": len(ev.y), "num_invariance_images": len(images),
               **invariance.headline(table)}
    return {"metrics": metrics, "invariance": table}


# ---------------------------------------------------------------------------------- scheduling
def parse_splits(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in ("val", "test") for n in names) or len(set(names)) < len(names):
        raise SystemExit(f"--split {text!r}: expected val, test or val,test")
    return names


def make_jobs(args: argparse.Namespace, arms: list[Arm], splits: dict[str, str],
              work: Path) -> list[dict[str, Any]]:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    wds = [float(s) for s in args.weight_decays.split(",")] if args.weight_decays else None
    config = str(Path(args.config).resolve())
    eval_splits = parse_splits(args.split)
    jobs = []
    # seed-major order: a run cut short still holds whole seeds of every arm
    for seed in seeds:
        for arm in arms:
            name = f"{arm.label}-s{seed}".replace("@", "_at_")
            jobs.append({
                "label": arm.label, "objective": arm.objective,
                "preset": arm.preset, "overrides": arm.overrides,
                "seed": seed, "config": config, "run_dir": str(work / "runs" / name),
                "splits": splits, "eval_splits": eval_splits, "steps": args.steps,
                "batch": args.batch, "warmup": args.warmup, "image_size": args.image_size,
                "crop": args.crop, "workers": args.workers, "device": args.device,
                "set": list(args.set), "knn_k": args.knn_k,
                "max_invariance_images": args.max_invariance_images,
                "max_eval_samples": args.max_eval_samples, "weight_decays": wds,
                "keep_runs": args.keep_runs, "name": name,
            })
    return jobs


def run_all(jobs: list[dict[str, Any]], parallel: int, work: Path,
            partial: Path | None = None) -> list[dict[str, Any]]:
    """Every job, in this process (parallel 1) or `parallel` subprocesses at a time. After each
    run the results so far are written to `partial` (a time-limited call keeps them)."""
    from data_pipelines.manifest import write_json_atomic

    done: dict[str, dict] = {}

    def finished(job: dict[str, Any], res: dict[str, Any]) -> None:
        done[job["name"]] = res
        log.info("%s", _one_line(res))
        if partial is not None:
            write_json_atomic(partial, list(done.values()))

    if parallel <= 1:
        for job in jobs:
            finished(job, _guarded(job))
        return [done[j["name"]] for j in jobs]
    job_dir = work / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, dict, Path]] = []
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            spec = job_dir / f"{job['name']}.json"
            spec.write_text(json.dumps(job))
            logf = (job_dir / f"{job['name']}.log").open("w")
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--out",
                                     str(work), "--job", str(spec)], stdout=logf,
                                    stderr=subprocess.STDOUT, env=env)
            running.append((proc, job, spec))
        time.sleep(0.5)
        for item in list(running):
            proc, job, spec = item
            if proc.poll() is None:
                continue
            running.remove(item)
            res_path = spec.with_suffix(".result.json")
            if res_path.is_file():
                res = json.loads(res_path.read_text())
            else:
                tail = (job_dir / f"{job['name']}.log").read_text()[-2000:]
                res = {"arm": job["label"], "seed": job["seed"],
                       "error": f"process exited with {proc.returncode}: {tail}"}
            finished(job, res)
    return [done[j["name"]] for j in jobs]


def _guarded(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_job(job)
    except Exception as exc:  # one failing arm must not lose the others' results
        log.exception("run %s failed", job["name"])
        return {"arm": job["label"], "seed": job["seed"], "error": f"{type(exc).__name__}: {exc}"}


def _one_line(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"{res['arm']} seed {res['seed']}: ERROR {res['error'][:300]}"
    split, scores = next(iter(res["splits"].items()))
    m = scores["metrics"]
    losses = " ".join(f"{k[5:]}={v:.4g}" for k, v in res.get("final_losses", {}).items()
                      if k.startswith("loss/") and isinstance(v, float))
    cells = " ".join(f"{name}={m[key]:.3f}" for key, name in SUMMARY if key in m)
    return (f"{res['arm']} seed {res['seed']} ({split}): {cells} (train "
            f"{res.get('train_s', 0):.0f}s, eval {res.get('eval_s', 0):.0f}s) {losses}")


# ---------------------------------------------------------------------------------- reporting
def aggregate(results: list[dict[str, Any]], arms: list[Arm]) -> dict[str, dict[str, Any]]:
    """{arm: {metric: {"mean", "std" (sample std over seeds, 0 for one), "min", "max",
    "values"}, "seeds": [...], "errors": [...]}}."""
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm.label]
        ok = [r for r in runs if "error" not in r]
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in ok],
                                 "errors": [r["error"] for r in runs if "error" in r]}
        keys = sorted({k for r in ok for k in r["metrics"]})
        for key in keys:
            values = [float(r["metrics"][key]) for r in ok if key in r["metrics"]]
            entry[key] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                          "min": min(values), "max": max(values), "values": values}
        curves: dict[str, dict[str, float]] = {}
        for r in ok:
            for family, row in r["invariance"].items():
                for s, cell in row.items():
                    curves.setdefault(family, {}).setdefault(s, []).append(cell["retrieval_top1"])
        entry["retrieval_curves"] = {f: {s: statistics.fmean(v) for s, v in row.items()}
                                     for f, row in curves.items()}
        out[arm.label] = entry
    return out


def markdown_table(agg: dict[str, dict[str, Any]], arms: list[Arm], view_size: int) -> str:
    """One row per arm; the views column says the side every arm trained and was evaluated at
    (`--crop`: the references too, whose recipe is otherwise their own)."""
    header = ["arm", "objective", "augmentations", "views", "seeds"] + [h for _, h in SUMMARY]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        entry = agg[arm.label]
        kind = arm.objective or "(untrained)"
        own = kind.startswith("ref:") or arm.objective is None
        cells = [arm.label, kind.replace("ref:", "reference: "),
                 "-" if own else (arm.preset or "config"), f"{view_size} px",
                 str(len(entry["seeds"]))]
        for key, _ in SUMMARY:
            if key not in entry:
                cells.append("n/a")
            elif key == "rankme":
                cells.append(f"{entry[key]['mean']:.1f} ± {entry[key]['std']:.1f}")
            else:
                cells.append(f"{100 * entry[key]['mean']:.1f} ± {100 * entry[key]['std']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(agg: dict[str, dict[str, Any]], arms: list[Arm], out: Path, split: str) -> list[Path]:
    """Retrieval top-1 against strength per family, and the probe accuracies, as small PNGs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    families = list(next((agg[a.label]["retrieval_curves"] for a in arms
                          if agg[a.label]["retrieval_curves"]), {}))
    if not families:
        return paths
    fig = Figure(figsize=(2.2 * len(families), 3.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(families), sharey=True)
    for ax, family in zip(axes, families):
        for arm in arms:
            curve = agg[arm.label]["retrieval_curves"].get(family)
            if not curve:
                continue
            ax.plot(list(curve), list(curve.values()), marker="o", ms=3, label=arm.label,
                    ls="-" if arm.preset else "--")
        ax.set_title(family, fontsize=9)
        ax.set_xlabel("strength", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel(f"retrieval top-1 ({split})", fontsize=8)
    axes[-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    path = out / f"quality_{split}_invariance.png"
    fig.savefig(path, dpi=80)
    paths.append(path)

    fig = Figure(figsize=(7, 3.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [a.label for a in arms]
    for i, (key, name) in enumerate([("linear_top1", "linear"), ("knn_top1", "kNN")]):
        means = [agg[label].get(key, {}).get("mean", math.nan) for label in labels]
        stds = [agg[label].get(key, {}).get("std", 0.0) for label in labels]
        ax.bar([j + 0.4 * i for j in range(len(labels))], means, 0.4, yerr=stds, label=name,
               capsize=2)
    ax.set_xticks([j + 0.2 for j in range(len(labels))], labels, rotation=30, ha="right",
                  fontsize=7)
    ax.set_ylabel(f"top-1 ({split})", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"quality_{split}_probes.png"
    fig.savefig(path, dpi=80)
    paths.append(path)
    return paths


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", datefmt="%H:%M:%S")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    out = Path(args.out)
    if args.job:  # one run in its own process (--jobs N)
        job = json.loads(Path(args.job).read_text())
        res = _guarded(job)
        Path(args.job).with_suffix(".result.json").write_text(json.dumps(res))
        return 0 if "error" not in res else 1
    import torch

    work = Path(args.work) if args.work else out
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    arms = parse_arms(args)
    splits, data_what = prepare_data(args, work)
    jobs = make_jobs(args, arms, splits, work)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    log.info("%d runs (%d arms x %d seeds) on %s, %d at a time", len(jobs), len(arms),
             len(jobs) // max(1, len(arms)), device, args.jobs)
    started = time.perf_counter()
    results = run_all(jobs, args.jobs, work, partial=out / "quality.partial.json")
    wall = time.perf_counter() - started
    for split in parse_splits(args.split):
        write_report(args, split, arms, results, data_what, splits, device, wall, out)
    errors = [r for r in results if "error" in r]
    return 1 if errors else 0


def split_view(results: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The runs with `metrics` and `invariance` of one evaluated split."""
    out = []
    for r in results:
        view = {k: v for k, v in r.items() if k != "splits"}
        if "error" not in r:
            view.update(r["splits"][split])
        out.append(view)
    return out


def write_report(args: argparse.Namespace, split: str, arms: list[Arm],
                 results: list[dict[str, Any]], data_what: str, splits: dict[str, str],
                 device: str, wall: float, out: Path) -> None:
    """OUT/quality_<split>.json, .md and the plots of one evaluated split."""
    import torch

    runs = split_view(results, split)
    agg = aggregate(runs, arms)
    table = markdown_table(agg, arms, args.crop)
    report = {
        "split": split, "data": data_what, "splits": splits, "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__, "wall_s": wall, "args": vars(args),
        "arms": [vars(a) for a in arms], "aggregate": agg, "runs": runs, "table": table,
    }
    (out / f"quality_{split}.json").write_text(json.dumps(report, indent=1) + "\n")
    legend = (f"linear / {args.knn_k}-NN: top-1 on the {split} split (probes fitted on train); "
              "the other columns: retrieval top-1 of a transformed copy among the first "
              f"{args.max_invariance_images} {split} originals (cosine of train-standardised "
              "features; Kornia's rotate / scale / brightness, zero or reflection fill); "
              f"mean ± sample std over seeds {args.seeds}")
    (out / f"quality_{split}.md").write_text(
        f"data: {data_what}; split: {split}; {args.steps} steps x batch {args.batch}\n\n"
        f"{legend}\n\n{table}\n")
    plot(agg, arms, out, split)
    print(f"{split}:\n{table}")
    print(f"wrote {out / f'quality_{split}.json'} ({wall:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
