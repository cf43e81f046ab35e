"""Export a trained backbone (no projector, no optimiser state) in a form other tools load.

    lsdr export runs/demo runs/demo/export                 # timm: model.safetensors + config.json
    lsdr export runs/demo/checkpoints/step-00001000.pt out --format onnx

Formats (every one is checked numerically against the in-memory backbone before it is reported):

- `timm`: `OUT/model.safetensors` (timm's own state-dict keys: the checkpoint's "backbone.*" keys
  with the prefix stripped), `OUT/config.json` in timm's Hugging Face hub layout (written by
  timm's `save_config_for_hf`: architecture, num_classes 0, num_features, model_args, and a
  pretrained_cfg holding the input size, mean/std and interpolation used in training) and
  `OUT/README.md`. Two ways to load it:

      timm.create_model("local-dir:OUT", pretrained=True, num_classes=K)
      timm.create_model(ARCH, pretrained=True, num_classes=K, **MODEL_ARGS,
                        pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=0))

  `num_classes=0` in the overlay says the file has no classifier: timm's `load_pretrained` then
  drops the head for any K > 0 (a new, randomly initialised head) and loads strictly for K = 0.
  Without it the architecture's default cfg (num_classes 1000) makes K = 1000 fail on the missing
  head. MODEL_ARGS are the construction arguments (e.g. `img_size=32` for a ViT trained at
  32 px), stored in config.json["model_args"]; `local-dir:` applies them itself. Adding the
  preprocessing (input_size, mean, std, interpolation, crop_pct) to the overlay makes
  `timm.data.resolve_data_config(model=model)` right too: `timm_overlay_kwargs` builds the full
  set and README.md spells it out for the export at hand.
- `hf`: the same files (this *is* the layout of timm models on the Hugging Face hub), with the
  model card's YAML front matter (library_name: timm, tags, pipeline_tag) that the hub reads;
  `huggingface_hub.upload_folder(repo_id=..., folder_path=OUT)` publishes it as is.
- `onnx`: `OUT/model.onnx` (input "images" [B,3,R,R] normalised, output "embedding" [B,F], dynamic
  batch axis), checked with onnxruntime. The dynamo exporter is tried first, then the TorchScript
  one.
- `torchscript`: `OUT/model.pt` (`torch.jit.trace`), checked after `torch.jit.load`.
Both of the last two also get config.json (the preprocessing) and README.md.

The export is written into a hidden sibling folder and renamed to OUT only after it checked out,
so a failed export never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsdr_repr.backbone import WEIGHTS_NAME, TrainedBackbone, load_trained_backbone
from lsdr_repr.config import EXPORT_FORMATS as FORMATS
from lsdr_repr.errors import CheckpointError, ConfigError, LsdrError

log = logging.getLogger(__name__)

MAX_CARD_METRICS = 8  # per eval result file in README.md
# Every file an export of any format writes: what `--overwrite` may replace.
EXPORT_FILES = frozenset({WEIGHTS_NAME, "config.json", "README.md", "model.onnx", "model.onnx.data",
                          "model.pt"})
PREPROCESSING_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
# Outputs are compared with |a - b| <= ATOL + RTOL * |b|; float32 re-implementations (ONNX
# kernels, fused TorchScript ops) differ from eager PyTorch by ~1e-6 relative on these models.
ATOL = 1e-4
RTOL = 1e-3


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str]
    max_abs_diff: dict[str, float]  # per check (e.g. "timm overlay", "local-dir", "onnxruntime")


# ------------------------------------------------------------------------------------- export
def export_backbone(
    source: str | Path | TrainedBackbone,
    out_dir: str | Path | None = None,
    fmt: str | None = None,
    *,
    overwrite: bool = False,
) -> ExportResult:
    """Write the backbone of `source` to `out_dir` in format `fmt` and check it numerically.

    `source`: run directory, checkpoint file, or an already loaded `TrainedBackbone`.
    `out_dir` defaults to the run's `export.out_dir`, else RUN_DIR/export; `fmt` to the run's
    `export.format`. Raises `CheckpointError` if the written file does not reproduce the
    in-memory backbone (and removes what it wrote).
    """
    trained = source if isinstance(source, TrainedBackbone) else load_trained_backbone(source)
    cfg = trained.config
    fmt = fmt or (cfg.export.format if cfg is not None else "timm")
    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}' unknown (known: {', '.join(FORMATS)})")
    if fmt == "onnx":
        _require_onnx_packages()
    if out_dir is None:
        if cfg is not None and cfg.export.out_dir:
            out_dir = cfg.export.out_dir
        elif trained.run_dir is not None:
            out_dir = trained.run_dir / "export"
        else:
            raise ConfigError("export: no output folder given and the source has no run directory")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: export target exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        _check_replaceable(out)
        if not overwrite:
            raise ConfigError(f"{out}: export target holds an earlier export (use --overwrite "
                              "to replace it)")

    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden sibling (same file system, so the final rename is atomic); mkdir honours the umask,
    # unlike tempfile.mkdtemp's private 0700.
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        diffs = _write_and_check(trained, tmp, fmt, out)
        files = sorted(p.name for p in tmp.iterdir())
        if out.exists():
            _check_replaceable(out)  # again: the export took a while, the folder may have changed
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s) to %s: %s", trained.arch, fmt, out, ", ".join(files))
    return ExportResult(out_dir=out, format=fmt, files=files, max_abs_diff=diffs)


def _check_replaceable(out: Path) -> None:
    """`--overwrite` replaces an earlier export of ours only (its config.json carries the "lsdr"
    block), never a run directory or a folder of anything else: one line otherwise."""
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                     if not (p.is_file() and p.name in EXPORT_FILES))
    if not foreign and out.joinpath("config.json").is_file():
        try:
            ours = "lsdr" in json.loads(out.joinpath("config.json").read_text())
        except (OSError, ValueError):
            ours = False
        if not ours:
            foreign = ["config.json (not written by lsdr export)"]
    elif not foreign:
        foreign = ["no config.json of an lsdr export"]
    if foreign:
        raise ConfigError(
            f"{out}: export target holds files that are not an lsdr export "
            f"({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}); give an empty "
            "or new folder")


def _write_and_check(
    trained: TrainedBackbone, out: Path, fmt: str, final_dir: Path
) -> dict[str, float]:
    backbone = trained.backbone
    gen = torch.Generator().manual_seed(0)
    size = trained.image_size
    # Export at batch 2, check at batch 3: the check also proves the batch axis is dynamic.
    example = torch.randn(2, 3, size, size, generator=gen)
    probe = torch.randn(3, 3, size, size, generator=gen)
    with torch.no_grad():
        reference = backbone(probe)

    config = write_timm_config(trained, out / "config.json")
    diffs: dict[str, float] = {}
    if fmt in ("timm", "hf"):
        write_safetensors(backbone, out / WEIGHTS_NAME)
        for name, model in _reload_timm(trained, out):
            with torch.no_grad():
                diffs[name] = _check_close(name, model(probe), reference)
    elif fmt == "onnx":
        other = torch.randn(3, 3, _other_size(size), _other_size(size), generator=gen)
        other_reference = _runs_at(backbone, other)
        dynamic_hw = _export_onnx(backbone, example, out / "model.onnx",
                                  spatial=other_reference is not None)
        diffs["onnxruntime"] = _check_close("onnxruntime", _run_onnx(out / "model.onnx", probe),
                                            reference)
        if dynamic_hw:  # proves the spatial axes work, not only that they are declared
            try:
                diffs[f"onnxruntime {_other_size(size)}px"] = _check_close(
                    "onnxruntime at another size", _run_onnx(out / "model.onnx", other),
                    other_reference)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                # A graph that runs at the training size only (size-specific code traced into
                # it): export it with a fixed height and width rather than not at all.
                log.info("ONNX graph wrong at %d px (%s): exporting at %d px only",
                         _other_size(size), str(exc).splitlines()[0][:200], size)
                _export_onnx(backbone, example, out / "model.onnx", spatial=False)
                diffs["onnxruntime"] = _check_close(
                    "onnxruntime", _run_onnx(out / "model.onnx", probe), reference)
    elif fmt == "torchscript":
        _export_torchscript(trained, example, out / "model.pt")
        with _quiet():
            loaded = torch.jit.load(str(out / "model.pt"), map_location="cpu")
        with torch.no_grad():
            diffs["torchscript"] = _check_close("torchscript", loaded(probe), reference)
    (out / "README.md").write_text(model_card(trained, fmt, final_dir, config))
    return diffs


def write_safetensors(backbone: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # Contiguous copies: safetensors stores dense row-major data (channels_last weights are not),
    # and tied/shared tensors must be separate entries.
    state = {k: v.detach().contiguous().clone() for k, v in backbone.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    # safetensors writes through a private (0600) temporary file: give it the mode every other
    # file of the export has (0666 less the umask), so colleagues on a shared file system can
    # read the weights the README and config.json point them to.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_timm_config(trained: TrainedBackbone, path: Path) -> dict:
    """config.json in timm's hub layout, via timm's own writer, plus an "lsdr" provenance block."""
    from timm.models._hub import save_config_for_hf

    size = trained.image_size
    data_config = {
        "input_size": (3, size, size),
        "mean": tuple(trained.mean),
        "std": tuple(trained.std),
        "interpolation": trained.interpolation,
        "crop_pct": 1.0,  # the eval view: shorter side resized to R, centre crop R
        "crop_mode": "center",
    }
    save_config_for_hf(trained.backbone, str(path), data_config=data_config)
    config = json.loads(path.read_text())
    pcfg = config["pretrained_cfg"]
    # The architecture's default cfg describes timm's ImageNet weights (their tag, licence and
    # source): none of that is true of these weights.
    for key in ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes", "hf_hub_id",
                "url", "test_input_size", "test_crop_pct"):
        pcfg.pop(key, None)
    pcfg["tag"] = "lsdr"
    config["lsdr"] = {
        "step": trained.step,
        "samples_seen": trained.samples_seen,
        "checkpoint": trained.checkpoint.name if trained.checkpoint else None,
        "objective": trained.config.objective.name if trained.config is not None else None,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    return config


def timm_overlay_kwargs(config: dict, weights_file: str) -> dict[str, Any]:
    """`timm.create_model(ARCH, pretrained=True, num_classes=K, **these)` loads the export
    without `local-dir:`: its model_args (e.g. a ViT's img_size) and a `pretrained_cfg_overlay`
    with the weights file, num_classes=0 (the file has no head) and the preprocessing."""
    pcfg = config["pretrained_cfg"]
    overlay = {"file": weights_file, "num_classes": 0,
               **{k: pcfg[k] for k in PREPROCESSING_KEYS if k in pcfg}}
    args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
    return {**args, "pretrained_cfg_overlay": overlay}


def _reload_timm(trained: TrainedBackbone, out: Path) -> Iterator[tuple[str, nn.Module]]:
    import timm

    config = json.loads((out / "config.json").read_text())
    kwargs = timm_overlay_kwargs(config, str(out / WEIGHTS_NAME))
    try:
        with _quiet():
            yield "timm overlay", timm.create_model(
                trained.arch, pretrained=True, num_classes=0, **kwargs
            ).eval()
            yield "timm local-dir", timm.create_model(
                f"local-dir:{out.resolve()}", pretrained=True, num_classes=0
            ).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"export check failed: timm cannot load {out}: {first}") from None


def _export_onnx(backbone: nn.Module, example: torch.Tensor, path: Path,
                 spatial: bool = True) -> bool:
    """Write the ONNX graph with a dynamic batch axis and, if `spatial` and the exporters manage,
    dynamic height and width (a graph fixed at the training size refuses a 96 px input in
    onnxruntime). Returns whether the spatial axes are dynamic."""
    n_bytes = sum(p.numel() * p.element_size() for p in backbone.state_dict().values())
    errors = []
    attempts = [(True, True), (False, True)] if spatial else []
    attempts += [(True, False), (False, False)]
    for dynamo, dynamic_hw in attempts:
        try:
            with _quiet():
                if dynamo:
                    axes = {0: torch.export.Dim("batch", min=1)}
                    if dynamic_hw:
                        axes |= {2: torch.export.Dim("height", min=8),
                                 3: torch.export.Dim("width", min=8)}
                    torch.onnx.export(
                        backbone, (example,), str(path), dynamo=True, input_names=["images"],
                        output_names=["embedding"], dynamic_shapes=(axes,), verbose=False,
                        external_data=n_bytes > 1_800_000_000,  # protobuf's 2 GiB limit
                    )
                else:
                    images = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
                    torch.onnx.export(
                        backbone, (example,), str(path), dynamo=False, input_names=["images"],
                        output_names=["embedding"],
                        dynamic_axes={"images": images, "embedding": {0: "batch"}},
                    )
            log.info("ONNX graph from the %s exporter (%s)", "dynamo" if dynamo else "TorchScript",
                     "dynamic batch, height and width" if dynamic_hw else "dynamic batch")
            return dynamic_hw
        except Exception as exc:  # noqa: BLE001 - exporters raise many types; the message matters
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {first[:200]}")
            log.info("ONNX %s", errors[-1])
            for stale in path.parent.glob(path.name + "*"):
                stale.unlink()
    raise CheckpointError(f"ONNX export not possible for this architecture ({'; '.join(errors)})")


# What `--format onnx` imports: torch's dynamo exporter needs onnx and onnxscript, the check
# onnxruntime. Without them the exporters fail with messages about the architecture instead.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def _require_onnx_packages() -> None:
    """Fail before any work, naming the missing packages, when the onnx extra is not installed."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"export --format onnx needs {', '.join(missing)} (not installed): "
                          f"pip install 'lsdr-repr[onnx]'")


def _other_size(size: int) -> int:
    """A second input side for the export checks: 1.5x the training size (64 -> 96)."""
    return size + size // 2


def _runs_at(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The backbone's output for `x`, or None if it cannot take that size (a ViT built with a
    fixed img_size): such a backbone is exported at the training size only."""
    try:
        with torch.no_grad(), _quiet():
            return backbone(x)
    except Exception:  # noqa: BLE001 - shape errors come as RuntimeError, AssertionError, ...
        return None


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort  # present: export_backbone checked the onnx extra first

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, min(4, torch.get_num_threads()))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _export_torchscript(trained: TrainedBackbone, example: torch.Tensor, path: Path) -> None:
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(trained.backbone, example, check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:  # noqa: BLE001 - tracing fails with many error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"TorchScript export not possible for {trained.arch}: {first}")


def _check_close(name: str, out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().float().cpu()
    if out.shape != ref.shape:
        raise CheckpointError(f"export check failed ({name}): output shape {tuple(out.shape)} "
                              f"!= backbone's {tuple(ref.shape)}")
    diff = (out - ref).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if not bool((diff <= ATOL + RTOL * ref.abs()).all()):
        raise CheckpointError(f"export check failed ({name}): outputs differ from the trained "
                              f"backbone by up to {max_diff:.3g}")
    log.info("export check %s: max |diff| %.3g", name, max_diff)
    return max_diff


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The exporters and timm's loader warn at length about things that are expected here
    # (deprecated TorchScript exporter, tracer warnings, adapted heads).
    # onnxscript and onnx_ir log a score of INFO lines per ONNX export (passes, rewrites).
    loggers = [logging.getLogger(name) for name in ("timm", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --------------------------------------------------------------------------------- model card
def model_card(trained: TrainedBackbone, fmt: str, out_dir: str | Path = "OUT",
               config: dict | None = None) -> str:
    """README.md for the export: what was trained on what, how to load it, eval results.

    `config`: the export's config.json (for the timm/hf loading lines)."""
    cfg = trained.config
    size = trained.image_size
    lines: list[str] = []
    if fmt == "hf":
        lines += ["---", "library_name: timm", "pipeline_tag: image-feature-extraction",
                  "license: apache-2.0", "tags:", "- timm", "- image-feature-extraction",
                  "- self-supervised", "- lsdr", "---", ""]
    lines += [f"# {trained.arch} pretrained with lsdr-repr", ""]
    lines += [("Self-supervised backbone (no classifier head, no projector): `num_classes=0`, "
              f"{trained.num_features}-d embeddings from {size}x{size} images normalised with "
              f"mean {list(trained.mean)} and std {list(trained.std)}."), ""]
    lines += ["## Training", ""]
    if cfg is not None:
        obj = cfg.objective
        weights = _objective_weights(cfg)
        name = ("LSDR, Large Scale Data Representation: invariance and variance terms with "
                "decorrelation regularisation" if obj.name == "lsdr" else obj.name)
        lines += [
            f"- data: `{cfg.data.train_shards}`{_num_samples(cfg.data.train_shards)}",
            (f"- steps: {trained.step} ({trained.samples_seen} samples seen), global batch "
            f"{cfg.data.batch_size}"),
            f"- objective: {name} ({weights})",
            (f"- augmentation: preset {cfg.augment.preset or 'none'}, {cfg.augment.num_views} "
            f"views at {cfg.augment.crop_size}px"),
            (f"- optimiser: {cfg.optim.name}, lr {cfg.optim.lr} (at batch "
            f"{cfg.optim.base_batch_size}), weight decay {cfg.optim.weight_decay}"),
            f"- checkpoint: `{trained.checkpoint.name if trained.checkpoint else '?'}`",
        ]
    else:
        lines += [f"- steps: {trained.step}"]
    lines += ["", "## Evaluation", ""]
    lines += _metric_lines(trained.run_dir)
    lines += ["", "## Usage", ""]
    if fmt in ("timm", "hf") and config is not None:
        kwargs = timm_overlay_kwargs(config, f"{out_dir}/{WEIGHTS_NAME}")
        overlay = kwargs.pop("pretrained_cfg_overlay")
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        overlay_text = ",\n".join(f"        {k}={v!r}" for k, v in overlay.items())
        lines += [
            "```python",
            "import timm",
            f'model = timm.create_model("local-dir:{out_dir}", pretrained=True, num_classes=0)',
            "# or by architecture name (K: classes of a new, randomly initialised head; 0: none):",
            f'model = timm.create_model("{trained.arch}", pretrained=True, num_classes=K{args},',
            f"    pretrained_cfg_overlay=dict(\n{overlay_text}))",
            "data_cfg = timm.data.resolve_data_config(model=model)  # size, mean/std, interpolation",
            "```",
        ]
    elif fmt == "onnx":
        lines += [("`model.onnx`: input `images` float32 [B,3,H,W] (normalised; trained at "
                  f"{size}x{size}; H and W are fixed at {size} if the architecture needs it: see "
                  f"the input's shape), output `embedding` [B,{trained.num_features}]."),
                  "", "```python", "import onnxruntime as ort",
                  'session = ort.InferenceSession("model.onnx")',
                  'emb = session.run(None, {"images": x})[0]', "```"]
    else:
        lines += ["```python", "import warnings", "", "import torch", "",
                  "# torch >= 2.9 marks TorchScript deprecated; the file still loads and runs",
                  "with warnings.catch_warnings():",
                  ('    warnings.filterwarnings("ignore", message=r"`torch\\.jit\\.load` is '
                  'deprecated", category=FutureWarning)'),
                  '    model = torch.jit.load("model.pt")',
                  f"emb = model(x)  # x: [B,3,{size},{size}] normalised", "```"]
    return "\n".join(lines) + "\n"


def _objective_weights(cfg: Any) -> str:
    """Every weight of the objective the run trained with, stage lists included."""
    obj, stages = cfg.objective, list(cfg.model.stages)
    if obj.name == "barlow":
        return f"off-diagonal lambda {obj.barlow_lambda}"
    parts = [f"invariance {obj.invariance_weight}", (f"variance {obj.variance_weight} "
             f"(gamma {obj.gamma})"), f"decorrelation {obj.decorrelation_weight}"]
    for label, values in (
        (f"layer-wise decorrelation ({obj.layer_decorrelation})", obj.layer_weights),
        ("layer-wise invariance", obj.layer_invariance_weights),
        ("layer-wise variance floor", obj.layer_variance_weights),
    ):
        if any(values):
            parts.append(f"{label} {list(values)} on stages {stages}")
    return ", ".join(parts)


def _num_samples(shards: str) -> str:
    try:
        from data_pipelines.reader import read_manifest

        return f" ({read_manifest(shards).num_samples} images)"
    except (ImportError, LsdrError, OSError):
        return ""


def _metric_lines(run_dir: Path | None) -> list[str]:
    if run_dir is None or not (run_dir / "eval").is_dir():
        return ["No evaluation results were found in the run directory."]
    lines = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        flat = sorted((k, v) for k, v in result.get("metrics", {}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool))
        if flat:
            # The invariance table alone has dozens of cells: the card shows the first few.
            shown = ", ".join(f"{k} {v:.4g}" for k, v in flat[:MAX_CARD_METRICS])
            more = (f" (+{len(flat) - MAX_CARD_METRICS} more in eval/{path.name})"
                    if len(flat) > MAX_CARD_METRICS else "")
            lines.append(f"- {path.stem}: {shown}{more}")
    return lines or ["No evaluation results were found in the run directory."]
