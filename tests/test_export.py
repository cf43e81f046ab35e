"""`lsdr export`: checkpoints of the real SSLModel exported as timm/hf safetensors, ONNX and
TorchScript, reloaded (timm in a fresh process) and compared with the in-memory backbone."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lsdr_repr import export
from lsdr_repr.backbone import load_trained_backbone
from lsdr_repr.builders.model import build_model
from lsdr_repr.checkpoint import CheckpointWriter, capture_rng_state
from lsdr_repr.cli import main
from lsdr_repr.config import IMAGENET_MEAN, config_from_dict, config_to_dict
from lsdr_repr.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]
MEAN = (0.5, 0.4, 0.3)
WEIGHTS = "model.safetensors"


pytestmark = pytest.mark.usefixtures("one_torch_thread")
STD = (0.2, 0.25, 0.3)

# Tiny backbones at 32 px: a ConvNet with BatchNorm and a ViT whose img_size is not timm's
# default (so the export must carry it in model_args).
ARCHS = {
    "resnet": ("resnet10t", {}),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32}),
}


def make_run(run_dir: Path, arch: str, timm_kwargs: dict, crop: int = 32, step: int = 7,
             seed: int = 0, wandb_run_id: str | None = None,
             **sections) -> tuple[Path, torch.nn.Module]:
    """A run directory with one checkpoint of the real SSLModel in the documented layout.

    The weights and BatchNorm statistics are perturbed away from their initial values, so a
    key that failed to load would show in the outputs. Returns (checkpoint, in-memory backbone).
    """
    raw = {
        "data": {"train_shards": "unused", "image_size": crop},
        "augment": {"crop_size": crop, "mean": list(MEAN), "std": list(STD)},
        "model": {"arch": arch, "timm_kwargs": timm_kwargs, "projector": [32, 16],
                  "channels_last": False},
        "train": {"run_dir": str(run_dir), "seed": seed},
        "log": {"wandb": {"mode": "disabled"}},
        **sections,
    }
    cfg = config_from_dict(raw)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            else:
                t.add_(torch.randn(t.shape, generator=gen) * 0.02)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = {
        "step": step, "samples_seen": step * 16, "model": model.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": {}, "scaler": None,
        "rng": [capture_rng_state()], "data_state": [{}], "config": config_to_dict(cfg),
        "world_size": 1, "wandb_run_id": wandb_run_id,
    }
    path = CheckpointWriter(run_dir, keep=3).save(state)
    return path, model.backbone.eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("runs")
    return {key: make_run(root / key, arch, kw) for key, (arch, kw) in ARCHS.items()}


@pytest.fixture(scope="module")
def timm_exports(runs, tmp_path_factory) -> dict[str, tuple[Path, export.ExportResult]]:
    root = tmp_path_factory.mktemp("exports")
    return {key: (root / key, export.export_backbone(ckpt.parent.parent, root / key, "timm"))
            for key, (ckpt, _) in runs.items()}


def _probe_input(size: int = 32, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> Path:
    """A run of the real trainer (`lsdr train configs/demo.yaml`, a few steps on tiny shards), with
    the layer-wise terms on the last stage turned on so the model card must name them."""
    from data_pipelines.writer import write_shards
    from tests.test_eval import write_image_folder

    root = tmp_path_factory.mktemp("trainer")
    shards = write_shards(write_image_folder(root / "images", 8, seed=0), root / "shards",
                          workers=0).out
    run = root / "run"
    code = main(["train", str(REPO / "configs" / "demo.yaml"), f"data.train_shards={shards}",
                 f"train.run_dir={run}", "data.image_size=32", "data.batch_size=16",
                 "data.num_workers=0", "data.shuffle_buffer=16", "augment.crop_size=24",
                 "model.projector=[64, 64]", "model.stages=[4]", "objective.layer_weights=[0.5]",
                 "objective.layer_invariance_weights=[16.0]",
                 "objective.layer_variance_weights=[25.0]",
                 "train.total_steps=3", "train.checkpoint_every=3", "train.eval_every=0",
                 "train.device=cpu", "train.image_grid_every=0", "train.spectrum_every=0",
                 "log.progress=false", "log.wandb.mode=disabled"])
    assert code == 0
    return run


def test_timm_export_round_trip_in_a_fresh_process(runs, timm_exports, trainer_run, tmp_path):
    cases, expect = {}, {}
    for key, (arch, _) in ARCHS.items():
        _, backbone = runs[key]
        out, result = timm_exports[key]
        assert result.out_dir == out and set(result.files) == {
            "config.json", "model.safetensors", "README.md"}
        assert set(result.max_abs_diff) == {"timm overlay", "timm local-dir"}
        # Plain timm keys, no projector, nothing but tensors.
        weights = load_file(out / "model.safetensors")
        assert set(weights) == set(backbone.state_dict())
        config = json.loads((out / "config.json").read_text())
        assert config["architecture"] == arch and config["num_classes"] == 0
        assert config["num_features"] == backbone.num_features
        pcfg = config["pretrained_cfg"]
        assert pcfg["input_size"] == [3, 32, 32]
        assert pcfg["mean"] == list(MEAN) and pcfg["std"] == list(STD)
        assert "license" not in pcfg and pcfg["tag"] == "lsdr"  # not timm's ImageNet weights
        assert config["lsdr"]["step"] == 7
        x = _probe_input()
        with torch.no_grad():
            ref = backbone(x)
        torch.save({"x": x, "ref": ref}, tmp_path / f"{key}.pt")
        cases[key] = {"arch": arch, "out": str(out), "io": str(tmp_path / f"{key}.pt"),
                      "kwargs": export.timm_overlay_kwargs(config, str(out / "model.safetensors"))}
        expect[key] = {"features": backbone.num_features, "mean": list(MEAN),
                       "head": {"resnet": "fc", "vit": "head"}[key]}

    # The real trainer's checkpoint: newest of the run, demo config (resnet18, ImageNet stats).
    trained = load_trained_backbone(trainer_run)
    assert trained.step == 3 and trained.arch == "resnet18" and trained.image_size == 24
    out = tmp_path / "export-trainer"
    export.export_backbone(trained, out)
    x = _probe_input(size=24)
    with torch.no_grad():
        torch.save({"x": x, "ref": trained.backbone(x)}, tmp_path / "trainer.pt")
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 24, 24]
    cases["trainer"] = {"arch": "resnet18", "out": str(out), "io": str(tmp_path / "trainer.pt"),
                        "kwargs": export.timm_overlay_kwargs(config, str(out / WEIGHTS))}
    expect["trainer"] = {"features": 512, "mean": list(IMAGENET_MEAN), "head": "fc"}
    assert json.loads((timm_exports["vit"][0] / "config.json").read_text())[
        "model_args"]["img_size"] == [32, 32]
    # Every file of the export readable by others (the umask's mode), the weights included:
    # safetensors alone would leave model.safetensors 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ("config.json", "model.safetensors", "README.md"), 0o666 & ~umask)
    # The model card names every weight of the objective, the layer-wise ones included.
    card = (out / "README.md").read_text()
    objective = trained.config.objective
    for text in (f"invariance {objective.invariance_weight}",
                 f"variance {objective.variance_weight} (gamma {objective.gamma})",
                 f"decorrelation {objective.decorrelation_weight}",
                 (f"layer-wise decorrelation ({objective.layer_decorrelation}) "
                 f"{objective.layer_weights}"),
                 f"layer-wise invariance {objective.layer_invariance_weights}",
                 f"layer-wise variance floor {objective.layer_variance_weights}",
                 f"on stages {trained.config.model.stages}"):
        assert text in card, text

    # A fresh interpreter: only timm, torch and the exported files (no lsdr_repr import).
    script = textwrap.dedent("""
        import json, sys, torch, timm
        from safetensors.torch import load_file
        torch.set_num_threads(1)
        cases = json.loads(sys.argv[1])
        report = {}
        for key, c in cases.items():
            io = torch.load(c["io"], weights_only=True)
            stored = load_file(c["out"] + "/model.safetensors")
            for k in (0, 5, 1000):
                for how, model in (
                    ("overlay", timm.create_model(c["arch"], pretrained=True, num_classes=k,
                                                  **c["kwargs"])),
                    ("local-dir", timm.create_model("local-dir:" + c["out"], pretrained=True,
                                                    num_classes=k)),
                ):
                    model.eval()
                    state = model.state_dict()
                    head = set(state) - set(stored)
                    # every stored tensor loaded, and only the new head is extra
                    loaded = all(torch.equal(state[n], t) for n, t in stored.items())
                    with torch.no_grad():
                        feats = model.forward_head(model.forward_features(io["x"]),
                                                   pre_logits=True)
                        out = model(io["x"])
                    report[f"{key}/{how}/{k}"] = dict(
                        diff=float((feats - io["ref"]).abs().max()), loaded=loaded,
                        extra=sorted(head), out_shape=list(out.shape),
                        mean=list(model.pretrained_cfg["mean"]))
        print(json.dumps(report))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 3 * 2 * 3
    for name, r in report.items():
        key, _, k = name.split("/")
        e = expect[key]
        assert r["loaded"], name
        assert r["diff"] < 1e-5, (name, r["diff"])
        assert r["out_shape"] == [4, int(k) if int(k) else e["features"]], name
        head = [f"{e['head']}.bias", f"{e['head']}.weight"]
        assert r["extra"] == (head if int(k) else []), name
        assert r["mean"] == pytest.approx(e["mean"])  # the preprocessing travels with both


def test_hf_format_has_hub_metadata_and_model_card(runs, timm_exports, tmp_path):
    ckpt, _ = runs["resnet"]
    run_dir = ckpt.parent.parent
    # Eval results in the run directory appear in the model card.
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "linear.json").write_text(json.dumps({"metrics": {"top1": 0.875}}))
    out = tmp_path / "hf"
    export.export_backbone(ckpt, out, "hf")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "linear: top1 0.875" in card
    assert f'local-dir:{out}' in card and "resnet10t" in card and "steps: 7" in card
    assert f"file='{out}/model.safetensors'" in card and "num_classes=0" in card
    assert set(os.listdir(out)) == {"config.json", "model.safetensors", "README.md"}
    plain = timm_exports["resnet"][0]
    assert not (plain / "README.md").read_text().startswith("---")


def test_onnx_export_matches_with_onnxruntime(runs, tmp_path, caplog, capfd):
    import onnxruntime as ort

    ckpt, backbone = runs["resnet"]
    out = tmp_path / "onnx"
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        result = export.export_backbone(ckpt, out, "onnx")
    # the exporters' chatter (onnxscript / onnx_ir passes, "[torch.onnx] ..." steps) is silenced
    noisy = [r for r in caplog.records if r.name.startswith(("onnxscript", "onnx_ir"))]
    assert not noisy, [r.getMessage() for r in noisy]
    printed = capfd.readouterr()
    assert "[torch.onnx]" not in printed.out + printed.err
    assert "model.onnx" in result.files and result.max_abs_diff["onnxruntime"] < 1e-4
    assert result.max_abs_diff["onnxruntime 48px"] < 1e-4  # checked at a second size too
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images"
    # trained at 32 px: a batch size and input sides the export never saw (96 px, as from the
    # demo's 64 px), also non-square: batch, height and width are all dynamic
    for batch, height, width in ((5, 32, 32), (2, 96, 96), (1, 40, 56)):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = backbone(x)
        assert got.shape == (batch, backbone.num_features)
        assert float((torch.from_numpy(got) - ref).abs().max()) < 1e-4, (height, width)


@pytest.mark.parametrize("key", ["resnet", "vit"])
def test_torchscript_export_matches(runs, tmp_path, key):
    ckpt, backbone = runs[key]
    out = tmp_path / f"ts-{key}"
    export.export_backbone(ckpt, out, "torchscript")
    # The model card's loading lines run as written, with warnings made errors: no
    # deprecation warning reaches the user who copies them.
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"model.pt"',
                                                                          repr(str(out / "model.pt")))
    snippet = snippet.split("emb = ")[0]
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(snippet, scope)  # noqa: S102 - the card's own code, the thing under test
    loaded = scope["model"]
    x = _probe_input(batch=3)
    with torch.no_grad():
        assert float((loaded(x) - backbone(x)).abs().max()) < 1e-4


def test_failed_check_leaves_nothing_that_looks_complete(runs, tmp_path, monkeypatch):
    ckpt, _ = runs["resnet"]
    out = tmp_path / "bad"
    # A tolerance nothing can meet: the check must fail, and the export must vanish.
    monkeypatch.setattr(export, "ATOL", -1.0)
    with pytest.raises(CheckpointError, match="export check failed"):
        export.export_backbone(ckpt, out, "timm")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder either


def test_export_errors_and_cli(runs, tmp_path, capsys, monkeypatch):
    ckpt, _ = runs["resnet"]
    with pytest.raises(CheckpointError, match="no such run directory"):
        export.export_backbone(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        export.export_backbone(tmp_path / "empty-run", tmp_path / "o")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        export.export_backbone(garbage, tmp_path / "o")

    # A checkpoint whose config names another architecture than its weights.
    from lsdr_repr.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    state["config"]["model"]["arch"] = "resnet14t"
    other = CheckpointWriter(tmp_path / "wrong-arch", keep=1).save(state)
    with pytest.raises(CheckpointError, match=r"do not fit resnet14t: .*missing key"):
        export.export_backbone(other, tmp_path / "o")

    out = tmp_path / "cli"
    assert main(["export", str(ckpt.parent.parent), str(out)]) == 0
    assert "wrote timm export" in capsys.readouterr().out
    # A second export into the same non-empty folder needs --overwrite.
    assert main(["export", str(ckpt), str(out), "--format", "torchscript"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds an earlier export (use --overwrite" in err
    with pytest.raises(ConfigError):
        export.export_backbone(ckpt, out, "torchscript")
    # Without the onnx extra (onnxscript missing here), one line naming it, before any work.
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` raise ImportError
        assert main(["export", str(ckpt), str(tmp_path / "no-onnx"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs onnxscript (not installed)" in err
    assert "lsdr-repr[onnx]" in err and not (tmp_path / "no-onnx").exists()
    assert main(["export", str(ckpt), str(out), "--format", "torchscript", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.pt"]

    # --overwrite replaces an earlier export only: never the run directory itself (a user's
    # `lsdr export RUN RUN --overwrite` deleted its checkpoints), nor a folder of other files.
    run_dir = ckpt.parent.parent
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "thesis.tex").write_text("keep me")
    lookalike = tmp_path / "project"  # export-like names, not our export
    lookalike.mkdir()
    (lookalike / "README.md").write_text("my project")
    (lookalike / "config.json").write_text('{"lr": 0.1}')
    for target in (run_dir, notes, lookalike):
        assert main(["export", str(ckpt), str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds files that are not an lsdr export" in err, err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert (notes / "thesis.tex").read_text() == "keep me"
    assert (lookalike / "README.md").read_text() == "my project"


def test_export_dir_is_a_source_for_evaluation(runs, timm_exports):
    _, backbone = runs["vit"]
    loaded = load_trained_backbone(timm_exports["vit"][0])
    assert loaded.arch == "vit_tiny_patch16_224" and loaded.image_size == 32
    assert loaded.mean == MEAN and loaded.step == 7
    x = _probe_input()
    with torch.no_grad():
        assert torch.allclose(loaded.backbone(x), backbone(x), atol=1e-5)


def test_eval_on_an_export_checks_out_and_val_before_any_work(timm_exports, tmp_path, capsys):
    """An export folder has no run directory: a missing --out, or a --val that is not there, is
    one line and exit 2 before the model is loaded. The proof: weights made unloadable, whose
    error would come first if the model were loaded before the arguments were checked."""
    import shutil

    broken = tmp_path / "broken-export"
    shutil.copytree(timm_exports["resnet"][0], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    data = tmp_path / "images" / "class0"
    data.mkdir(parents=True)
    cases = [
        (["eval", "knn", str(broken), "--train", str(data.parent), "--val", str(data.parent)],
         "give a results folder with --out"),
        (["eval", "linear", str(broken), "--out", str(tmp_path / "res"), "--train",
          str(data.parent), "--val", str(tmp_path / "nope")],
         f"--val {tmp_path / 'nope'}: no such file or directory"),
        (["eval", "invariance", str(broken), "--out", str(tmp_path / "res"), "--data",
          f"{data.parent}::{tmp_path / 'gone'}"], f"--data {tmp_path / 'gone'}: no such file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "res").exists()  # nothing computed, no results folder made
