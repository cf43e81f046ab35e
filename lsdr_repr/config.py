"""The typed run configuration: one dataclass tree, loaded from YAML plus dotted overrides.

    cfg = load_config("configs/demo.yaml", ["optim.lr=0.1", "data.batch_size=64"])

Every value is checked against its annotation (dacite builds the tree); unknown keys, wrong types
and missing required values raise one-line `ConfigError`s naming the key and the file, or the
command-line override when that is where the unknown key is. `config_to_dict` gives the plain
(YAML/JSON-able) form that is saved in checkpoints and logged to W&B; `config_from_dict` turns it back
into the identical tree.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dacite
import yaml

from lsdr_repr.errors import ConfigError

_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _required(default: Any = "", unless: str = "") -> Any:
    """A field the user must set (checked by `check_required`, not at load: `shards` needs no run);
    `unless`: a sibling field that, when set, stands in for it."""
    return field(default=default, metadata={"required": True, "unless": unless})


# --------------------------------------------------------------------------------------- data
@dataclass
class SourceConfig:
    """One source of a weighted mixture (`data.sources`)."""

    shards: str = ""  # any shard spec, as data.train_shards
    weight: float = 1.0  # share of the shard draws (normalised over the sources)


@dataclass
class DataConfig:
    # dir (with or without manifest.json), manifest, .tar, brace pattern or glob, http(s)://,
    # pipe:, s3:// / gs:// / other fsspec URLs (README "Data sources")
    train_shards: str = _required(unless="sources")
    # a weighted mixture instead of train_shards: [{shards: ..., weight: 0.7}, ...]
    sources: list[SourceConfig] = field(default_factory=list)
    val_shards: str | None = None  # labelled held-out shards (online kNN, eval, tuning)
    test_shards: str | None = None  # read once per reported configuration
    image_size: int = 256  # S: side of the uint8 batch the loader produces
    batch_size: int = 256  # global batch (all ranks together), in images (pairs of views)
    num_workers: int = 8
    prefetch_factor: int = 4
    shuffle_buffer: int = 2000
    # "gpu" (nvJPEG) is slower end to end than CPU decode wherever it was measured (H200:
    # 79-82 % of the model-only ceiling against 90-91 %; H100: 74-75 %; benchmarks/RESULTS.md):
    # keep "cpu" unless the CPUs, not the GPU, are what a profile shows waiting.
    decode: Literal["cpu", "gpu"] = "cpu"
    pin_memory: bool = True
    resampled: bool = True  # infinite stream of shards sampled with replacement
    # a stream that gave samples and then none for this long (a source that stopped answering:
    # an http server down, a revoked credential) stops the run with an error; 0: retry for ever
    stall_timeout_s: float = 600.0


# ------------------------------------------------------------------------------------ augment
@dataclass
class ScaleAug:
    p: float = 1.0
    area: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area fraction
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    zoom_out_p: float = 0.0  # probability of shrinking the image inside the view instead
    zoom_out: tuple[float, float] = (1.0, 1.0)  # shrink factor range (>1: image smaller)


@dataclass
class RotationAug:
    p: float = 0.0
    degrees: float = 0.0  # uniform in [-degrees, degrees]
    # fill: rotated corners show augment.fill; crop: the view shrinks until no corner leaves
    # the image. "reflection" is the older name of "fill" (configs written before `fill`).
    border: Literal["fill", "crop", "reflection"] = "fill"


@dataclass
class LightingAug:
    p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gamma: float = 0.0  # log-uniform gamma in [1/(1+g), 1+g]
    temperature: float = 0.0  # white-balance shift strength (red/blue gains)


@dataclass
class BlurAug:
    p: list[float] = field(default_factory=lambda: [1.0, 0.1])  # per view, cycled
    sigma: tuple[float, float] = (0.1, 2.0)  # uniform, in pixels of the view (as PIL's radius)
    kernel_size: int = 23  # odd; taps beyond kernel_size // 2 pixels are cut off


@dataclass
class SolarizeAug:
    p: list[float] = field(default_factory=lambda: [0.0, 0.2])  # per view, cycled
    threshold: float = 0.5


@dataclass
class AugmentConfig:
    preset: str | None = None  # vicreg | barlow | lsdr-invariance: base values under the file's
    num_views: int = 2
    crop_size: int = 224  # R
    # views larger than the stored images (data.image_size < crop_size) only when asked for:
    # deliberate for tiny images (configs/small_images.yaml), a forgotten override otherwise
    upscale: bool = False
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # resampling of the crop warp
    # the dtype the views are rendered in before they are normalised (float32 out either way):
    # fp16 made the ViT-S/16 preset 0.76 ms per step faster on an H100 (4.39 -> 3.63 ms;
    # benchmarks/RESULTS.md, "Issue 18, thirteenth session"), not yet run end to end
    precision: Literal["fp32", "fp16"] = "fp32"
    local_crops: int = 0  # multi-crop: extra small views
    local_crop_size: int = 96
    local_area: tuple[float, float] = (0.05, 0.3)
    scale: ScaleAug = field(default_factory=ScaleAug)
    rotation: RotationAug = field(default_factory=RotationAug)
    lighting: LightingAug = field(default_factory=LightingAug)
    flip_p: float = 0.5
    grayscale_p: float = 0.2
    blur: BlurAug = field(default_factory=BlurAug)
    solarize: SolarizeAug = field(default_factory=SolarizeAug)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # what a view shows outside the image (rotated corners, zoom-out), drawn per sample:
    # zeros | reflection | replicate (= border) | random (a colour per sample) | a gray level
    fill: list[str | float] = field(default_factory=lambda: ["reflection"])
    # kornia.augmentation modules after the built-in ops: [{op: ClassName, <kwargs>, views: [0]}]
    kornia: list[dict[str, Any]] = field(default_factory=list)

    @property
    def smallest_view(self) -> int:
        """Side in pixels of the smallest built-in view (a local crop when multi-crop is on;
        `augment.kornia` modules that resize are not counted)."""
        return min(self.crop_size, self.local_crop_size) if self.local_crops else self.crop_size


# The presets are data: `augment.preset: vicreg` starts from these values; keys written in the
# file or on the command line override them.
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    # VICReg as released (facebookresearch/vicreg augmentations.py, the BYOL recipe): bicubic
    # RRC(0.08, 1), flip 0.5, jitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur sigma 0.1-2
    # with p=1.0 / 0.1 and solarize p=0.0 / 0.2 for the first / second view.
    "vicreg": {
        "interpolation": "bicubic",
        "scale": {"p": 1.0, "area": [0.08, 1.0]},
        "lighting": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1},
        "flip_p": 0.5,
        "grayscale_p": 0.2,
        "blur": {"p": [1.0, 0.1]},
        "solarize": {"p": [0.0, 0.2]},
    },
    # The three invariance families stronger: zoom in and out, full rotations, gamma and
    # white balance on top of colour jitter.
    "lsdr-invariance": {
        "scale": {"p": 1.0, "area": [0.08, 1.0], "zoom_out_p": 0.3, "zoom_out": [1.0, 2.0]},
        "rotation": {"p": 0.8, "degrees": 180.0, "border": "fill"},
        # a mixture, so the learned invariance does not depend on one kind of border
        "fill": ["zeros", "reflection", "replicate", "random"],
        "lighting": {
            "p": 0.9, "brightness": 0.5, "contrast": 0.5, "saturation": 0.3, "hue": 0.1,
            "gamma": 0.5, "temperature": 0.3,
        },
        "flip_p": 0.5,
        "grayscale_p": 0.2,
        "blur": {"p": [1.0, 0.1]},
        "solarize": {"p": [0.0, 0.2]},
    },
    # Small images (28-64 px: Fashion-MNIST, digits): crops of half the image or more, rotation
    # +-30 degrees with a fill mixture, brightness and contrast; no blur, solarize, grayscale,
    # hue or flip. The best measured recipe on Fashion-MNIST (benchmarks/RESULTS.md,
    # "Representation quality on Fashion-MNIST"): the BYOL-style presets destroy 28 px images.
    # configs/small_images.yaml adds zoom-out; the preset leaves it out because the 300-step CPU
    # demo lost 7 points of linear probe with it (0.70 against 0.77).
    "small-images": {
        "scale": {"p": 1.0, "area": [0.5, 1.0], "zoom_out_p": 0.0},
        "rotation": {"p": 1.0, "degrees": 30.0, "border": "fill"},
        "fill": ["zeros", "reflection", "replicate", "random"],
        "lighting": {
            "p": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.0, "hue": 0.0,
            "gamma": 0.0, "temperature": 0.0,
        },
        "flip_p": 0.0,
        "grayscale_p": 0.0,
        "blur": {"p": [0.0]},
        "solarize": {"p": [0.0]},
    },
}


# Barlow Twins (facebookresearch/barlowtwins main.py `Transform`) uses the same BYOL recipe.
AUGMENT_PRESETS["barlow"] = copy.deepcopy(AUGMENT_PRESETS["vicreg"])


# -------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any timm model name
    projector: list[int] = field(default_factory=lambda: [8192, 8192, 8192])  # VICReg's
    projector_bn: bool = True
    stages: list[int] = field(default_factory=list)  # backbone stages for the layer-wise terms
    grad_checkpointing: bool = False
    channels_last: bool = True
    drop_path_rate: float = 0.0
    sync_bn: bool = True  # SyncBatchNorm under multi-GPU DDP (as VICReg); gloo/CPU keeps per-rank BN
    # extra timm.create_model arguments, e.g. {img_size: 96, dynamic_img_size: true} for a ViT
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- objective
@dataclass
class ObjectiveConfig:
    name: Literal["lsdr", "vicreg", "barlow"] = "lsdr"
    invariance_weight: float = 25.0
    variance_weight: float = 25.0
    decorrelation_weight: float = 1.0
    gamma: float = 1.0  # variance hinge target std
    eps: float = 1e-4
    layer_weights: list[float] = field(default_factory=list)  # one per model.stages entry
    # stage decorrelation on the raw covariance, or scale-free on batch-standardised features
    layer_decorrelation: Literal["covariance", "correlation"] = "covariance"
    # invariance on the standardised pooled stages, one weight per model.stages entry ([] = off)
    layer_invariance_weights: list[float] = field(default_factory=list)
    # scale-free variance hinge on the pooled stages (each feature's std vs the stage's rms)
    layer_variance_weights: list[float] = field(default_factory=list)
    barlow_lambda: float = 0.0051  # Barlow Twins off-diagonal weight
    # With multi-crop (augment.local_crops): compare every pair of views (all), or only pairs
    # that hold one of the augment.num_views global views (global: DINO / SwAV's pairing)
    view_pairs: Literal["all", "global"] = "all"


# -------------------------------------------------------------------------------------- optim
@dataclass
class OptimConfig:
    name: Literal["lars", "adamw", "sgd"] = "lars"
    lr: float = 0.2  # base learning rate at `base_batch_size`, scaled with the global batch
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    base_batch_size: int = 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    lars_trust: float = 0.001
    warmup_steps: int = 0
    min_lr_ratio: float = 0.002  # cosine decays to lr * min_lr_ratio
    clip_grad: float | None = None
    # k micro-batches per step, exactly the k-times larger batch for the loss (feature caching,
    # lsdr_repr/accumulate.py: one extra forward per micro-batch, memory of one micro-batch).
    # BatchNorm still normalises each micro-batch on its own (as DDP without SyncBN): exact for
    # LayerNorm/GroupNorm networks (ViTs) or projector_bn=false, an approximation with BN.
    accumulation_steps: int = 1


# -------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    run_dir: str = _required()
    total_steps: int = 1000
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on GPU, fp32 on CPU; fp16 (GPUs without bf16: V100, T4) adds a GradScaler,
    # checkpointed; its overflow-skipped steps are calibration, not non-finite steps
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    # torch.compile mode of the model. auto: CUDA graphs ("reduce-overhead") on one GPU (+10
    # points end to end for ViT-S, benchmarks/RESULTS.md; losses, eval, logging and resume as
    # without them, tests/test_cuda_graphs.py on an H200), "default" on CPU and under DDP (not
    # measured there yet). Their memory pools are reserved, not allocated: watch
    # gpu_mem_reserved_gb.
    compile_mode: Literal[
        "auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = "auto"
    compile_augment: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 20
    image_grid_every: int = 1000  # 0 disables
    spectrum_every: int = 1000  # embedding covariance spectrum plot; 0 disables
    eval_every: int = 0  # online kNN on data.val_shards; 0 disables
    max_nonfinite_steps: int = 10
    preempt_signal: str = "SIGUSR2"


# ---------------------------------------------------------------------------------------- log
@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "lsdr-repr"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True


# -------------------------------------------------------------------------------------- slurm
@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # ranks per node; None: one per GPU (1 if gpus_per_node 0)
    cpus_per_task: int = 16
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mem: str | None = None
    exclusive: bool = False
    signal_seconds: int = 120  # preemption signal this long before the time limit
    max_requeues: int = 20
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ...)
    extra_sbatch: list[str] = field(default_factory=list)  # raw "#SBATCH" options


# ------------------------------------------------------------------------------------- export
@dataclass
class ExportConfig:
    format: Literal["timm", "hf", "onnx", "torchscript"] = "timm"
    out_dir: str | None = None  # default: RUN_DIR/export


# What `lsdr export` writes, read off the annotation so the list is written once.
EXPORT_FORMATS: tuple[str, ...] = typing.get_args(typing.get_type_hints(ExportConfig)["format"])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ------------------------------------------------------------------------------------ loading
def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config, apply the augment preset and `a.b=value` overrides, type-check it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_error_line(exc)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(raw, overrides, source=str(path))
    try:
        return config_from_dict(raw, source=str(path))
    except ConfigError as exc:
        raise _blame_override(exc, str(path), overrides) from None


def _blame_override(exc: ConfigError, source: str, overrides: typing.Sequence[str]
                    ) -> ConfigError:
    """An error about a key the command line set names that override, not the YAML file
    (`data.batch_size=-4` is not in configs/demo.yaml)."""
    message = str(exc)
    for item in reversed(overrides):  # the last override of a key is the one that holds
        key = item.split("=", 1)[0].strip()
        for prefix in (f"{source}: {key}: ", f"{source}: {key}[", f"{source}: {key}."):
            if message.startswith(prefix):
                rest = message[len(source) + 2:]
                return ConfigError(f"override '{item}': {rest}")
    return exc


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """The parser's reason and both of its places, in one line: where it gave up, and where the
    construct it was inside began (an unclosed bracket on line 4 is only noticed on line 5)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    text = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}" \
        if mark else f"not valid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        text += f" ({context} that began at line {context_mark.line + 1})"
    return text


def apply_overrides(raw: dict, overrides: typing.Sequence[str], source: str) -> None:
    """Set `a.b.c=value` entries into the nested dict `raw` (values parsed as YAML scalars)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if "#" in text and "#" not in repr(value):
            # YAML read " #..." as a comment and dropped it: never change a value silently.
            raise ConfigError(f"{source}: override '{item}': YAML reads ' #' as the start of a "
                              f"comment, which would leave {key}={value!r}; quote the value "
                              f"({key}='\"...\"') to keep the '#'")
        _check_override_key(item, key)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override '{key}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value


def _check_override_key(item: str, key: str) -> None:
    """An override naming no config key is refused naming the override, not the file it would
    have been merged into (the file is not where the typo is)."""
    cls: Any = Config
    prefix = ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return  # below a free-form mapping (model.timm_kwargs) or a value: checked later
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(f"override '{item}': {_unknown_key(prefix, part, names)}")
        cls = typing.get_type_hints(cls)[part]
        prefix += part + "."


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build and type-check a `Config` from plain data (the inverse of `config_to_dict`)."""
    raw = copy.deepcopy(raw)
    augment = raw.get("augment")
    if isinstance(augment, dict) and augment.get("preset") is not None:
        name = augment["preset"]
        if name not in AUGMENT_PRESETS:
            known = ", ".join(AUGMENT_PRESETS)
            raise ConfigError(f"{source}: augment.preset: unknown preset '{name}' (known: {known})")
        raw["augment"] = _deep_merge(AUGMENT_PRESETS[name], augment)
    cfg = _build(Config, raw, source)
    _check_values(cfg, source)
    return cfg


def _check_values(cfg: Config, source: str) -> None:
    """Values of the right type that cannot work, refused here so the message names the key and
    the file (rather than a traceback from deep inside the run)."""
    if cfg.data.batch_size < 2:
        # BatchNorm in training mode, and the variance and covariance terms, need two images.
        raise ConfigError(f"{source}: data.batch_size: must be at least 2 (the global batch; "
                          f"BatchNorm and the variance terms need 2 images), got "
                          f"{cfg.data.batch_size}")
    if cfg.data.image_size < cfg.augment.crop_size and not cfg.augment.upscale:
        # The crops are cut from the loader's S x S images: a larger crop would be an upscale
        # of every view, which no one means (usually a forgotten data.image_size override).
        raise ConfigError(f"{source}: data.image_size={cfg.data.image_size} is smaller than "
                          f"augment.crop_size={cfg.augment.crop_size}; raise data.image_size, lower "
                          f"augment.crop_size, or set augment.upscale=true to upscale on purpose")
    if cfg.augment.kornia:  # kornia loads only for configs that name its modules
        from lsdr_repr.kornia_ops import check_specs

        check_specs(cfg.augment.kornia, source, cfg.augment.num_views + cfg.augment.local_crops)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, JSON, W&B and checkpoints."""
    return _plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def check_required(cfg: Config, source: str = "config") -> None:
    """Raise a `ConfigError` naming the first required value left unset."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        for f in dataclasses.fields(value):
            if f.metadata.get("required") and getattr(value, f.name) in ("", None):
                unless = f.metadata.get("unless")
                if unless and getattr(value, unless):
                    continue
                alternative = f" (or {section.name}.{unless})" if unless else ""
                raise ConfigError(f"{source}: {section.name}.{f.name}{alternative} is required "
                                  f"but not set")


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# The YAML-to-dataclass conversion is dacite's; these hooks keep YAML's scalars honest: a bool
# is neither an int nor a float (Python says it is both), an int is a float, and YAML 1.1's
# `1e-4` (no dot), which PyYAML reads as a string, is the float users mean.
class _Rejected:
    """A value that fits no annotation, so dacite reports it (with its path) as a wrong type."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _float(value: Any) -> Any:
    if isinstance(value, bool):
        return _Rejected(value)
    if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)
    return float(value) if isinstance(value, int) else value


def _int(value: Any) -> Any:
    return _Rejected(value) if isinstance(value, bool) else value


_DACITE = dacite.Config(strict=True, cast=[tuple], type_hooks={float: _float, int: _int})


def _build(cls: type, raw: dict, source: str) -> Any:
    """`cls` from plain data: our pass for what dacite cannot say in one line (unknown keys with
    the close names, a value where a section belongs), then dacite's typed construction."""
    _check_keys(cls, raw, "", source)
    try:
        return dacite.from_dict(cls, raw, config=_DACITE)
    except dacite.WrongTypeError as exc:
        raise _type_error(exc.field_type, exc.value, exc.field_path, source) from None
    except dacite.DaciteError as exc:  # a bug in the dataclasses, not in the user's file
        raise ConfigError(f"{source}: {exc}") from None


def _check_keys(cls: type, raw: Any, prefix: str, source: str) -> None:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where}: expected a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: {_unknown_key(prefix, str(key), names)}")
    hints = typing.get_type_hints(cls)
    for name in names & set(raw):
        if dataclasses.is_dataclass(hints[name]):
            _check_keys(hints[name], raw[name], f"{prefix}{name}.", source)
        else:
            _check_list(hints[name], raw[name], f"{prefix}{name}", source)


def _check_list(tp: Any, value: Any, key: str, source: str) -> None:
    """A list field given a string or a mapping (dacite would iterate over its characters or
    keys and report a generator object), or list items of the wrong shape: one line."""
    if typing.get_origin(tp) is not list:
        return
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: {key}: expected a list, got {value!r} (write [{value!r}] "
                          "for one item)" if isinstance(value, (str, int, float))
                          else f"{source}: {key}: expected a list, got {value!r}")
    (item_type,) = typing.get_args(tp) or (Any,)
    if typing.get_origin(item_type) is dict:
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{source}: {key}[{i}]: expected a mapping such as "
                                  f"{{op: ..., ...}}, got {item!r}")


def _unknown_key(prefix: str, key: str, names: set[str]) -> str:
    known = ", ".join(sorted(names))
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return f"unknown key '{prefix}{key}'{hint} (known here: {known})"


def _type_error(tp: Any, value: Any, key: str, source: str) -> ConfigError:
    value = value.value if isinstance(value, _Rejected) else value
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        choices = " | ".join(map(str, args))
        return ConfigError(f"{source}: {key}: expected one of {choices}, got {value!r}")
    if typing.get_origin(tp) is tuple and isinstance(value, (list, tuple)) and \
            Ellipsis not in args and len(value) != len(args):
        return ConfigError(f"{source}: {key}: expected {len(args)} values, got {len(value)}: "
                           f"{list(value)!r}")
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return ConfigError(f"{source}: {key}: expected {name}, got {value!r}")
