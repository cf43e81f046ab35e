"""CPU smoke run of benchmarks/quality.py: tiny images, a few steps, two seeds. It checks that every
arm goes through the real trainer and evaluation and that the report is well formed; it asserts
nothing about quality."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quality  # benchmarks/ is a folder of scripts, not a package


def test_quality_script_reports_every_arm_on_cpu(tmp_path, sample_shards, capsys):
    out = tmp_path / "out"
    code = quality.main([
        "--train", str(sample_shards["train"]), "--val", str(sample_shards["val"]),
        "--test", str(sample_shards["test"]), "--out", str(out), "--work", str(tmp_path / "w"),
        "--device", "cpu", "--split", "val,test", "--seeds", "0,1", "--steps", "2", "--batch", "16",
        "--image-size", "24", "--crop", "16", "--workers", "0", "--jobs", "1",
        "--arms", "lsdr,random,vicreg@vicreg",
        "--arm", ("lsdr-s23=lsdr model.stages=[2,3] objective.layer_weights=[0.5,0.5] "
                  "objective.layer_invariance_weights=[] objective.layer_variance_weights=[]"),
        "--max-invariance-images", "24", "--max-eval-samples", "64",
        "--weight-decays", "1e-3", "--set", "model.projector=[32,32]",
        "augment.blur.kernel_size=3",
    ])
    assert code == 0
    report = json.loads((out / "quality_val.json").read_text())
    labels = ["lsdr", "random", "vicreg@vicreg", "lsdr-s23"]
    assert [a["label"] for a in report["arms"]] == labels
    assert len(report["runs"]) == 8 and not [r for r in report["runs"] if "error" in r]
    for run in report["runs"]:
        m = run["metrics"]
        assert 0.0 <= m["linear_top1"] <= 1.0 and 0.0 <= m["knn_top1"] <= 1.0
        assert m["num_eval"] == 64 and m["num_invariance_images"] == 24
        assert {"brightness", "rotate/zeros", "rotate/reflection", "zoom_out/zeros",
                "combined/reflection"} <= set(run["invariance"])
        assert set(run["invariance"]["rotate/zeros"]) == {"15", "30", "60"}
        assert 0.0 <= m["retrieval/rotate/zeros@30"] <= 1.0
        cfg = run["config"]
        assert cfg["train"]["seed"] == run["seed"] and cfg["train"]["total_steps"] == 2
        if run["arm"] != "random":  # trained by the real trainer: its metrics log was read
            assert run["final_losses"]["step"] == 2 and run["exit_code"] == 0
    by_arm = {run["arm"]: run for run in report["runs"]}
    # every arm shares data, steps, batch, optimiser; the augmentations differ only where asked
    assert by_arm["lsdr"]["config"]["augment"]["preset"] == "lsdr-invariance"
    assert by_arm["vicreg@vicreg"]["config"]["augment"]["preset"] == "vicreg"
    vicreg = by_arm["vicreg@vicreg"]["config"]
    assert vicreg["objective"]["name"] == "vicreg" and vicreg["model"]["stages"] == []
    assert vicreg["objective"]["decorrelation_weight"] == 1.0  # the reference, whatever LSDR's
    assert {"loss/invariance_stage4", "loss/variance_stage4"} <= set(by_arm["lsdr"]["final_losses"])
    assert "loss/decorrelation_stage2" in by_arm["lsdr-s23"]["final_losses"]
    assert "loss/invariance_stage2" not in by_arm["lsdr-s23"]["final_losses"]
    assert by_arm["lsdr"]["config"]["optim"] == vicreg["optim"]
    agg = report["aggregate"]
    for label in labels:
        assert agg[label]["seeds"] == [0, 1]
        cell = agg[label]["retrieval/combined/zeros@30/0.7/0.6"]
        assert cell["min"] <= cell["mean"] <= cell["max"] and cell["std"] >= 0.0
    for name in ("quality_val.md", "quality_val_invariance.png", "quality_val_probes.png",
                 "quality_test.md", "quality_test_invariance.png", "quality_test_probes.png"):
        assert (out / name).stat().st_size > 0
    test = json.loads((out / "quality_test.json").read_text())
    assert test["split"] == "test" and [r["seed"] for r in test["runs"]] == [0] * 4 + [1] * 4
    # the same trained backbones are evaluated on both splits
    assert [r.get("final_losses") for r in test["runs"]] == [
        r.get("final_losses") for r in report["runs"]]
    assert not (tmp_path / "w" / "runs").exists() or not any((tmp_path / "w" / "runs").iterdir())
    printed = capsys.readouterr().out
    assert "val:" in printed and "test:" in printed
    assert "| vicreg@vicreg | vicreg | vicreg | 16 px | 2 |" in printed


def test_quality_rejects_bad_arms(tmp_path):
    with pytest.raises(SystemExit, match="unknown base 'simclr'"):
        quality.main(["--out", str(tmp_path), "--arms", "simclr"])
    with pytest.raises(SystemExit, match="random takes no preset"):
        quality.main(["--out", str(tmp_path), "--arms", "random@vicreg"])


def test_image_folder_is_split_and_sharded(tmp_path, image_folder):
    from data_pipelines.reader import read_manifest

    splits = quality.folder_shards(image_folder, tmp_path / "folder")
    counts = {name: read_manifest(path).num_samples for name, path in splits.items()}
    assert set(counts) == {"train", "val", "test"} and sum(counts.values()) == 24
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert quality.folder_shards(image_folder, tmp_path / "folder") == splits  # reused


def test_reference_rows_train_outside_the_product(tmp_path, sample_shards):
    """The external references (benchmarks/references.py) run through the same evaluation."""
    out = tmp_path / "out"
    code = quality.main([
        "--train", str(sample_shards["train"]), "--val", str(sample_shards["val"]),
        "--test", str(sample_shards["test"]), "--out", str(out), "--work", str(tmp_path / "w"),
        "--device", "cpu", "--split", "val", "--seeds", "0", "--steps", "2", "--batch", "16",
        "--image-size", "24", "--crop", "16", "--workers", "0", "--jobs", "1",
        "--arms", "plain-vicreg,supervised,pixels", "--max-invariance-images", "16",
        "--max-eval-samples", "48", "--weight-decays", "1e-3",
    ])
    assert code == 0
    report = json.loads((out / "quality_val.json").read_text())
    assert [r["arm"] for r in report["runs"]] == ["plain-vicreg", "supervised", "pixels"]
    for run in report["runs"]:
        assert "error" not in run and 0.0 <= run["metrics"]["linear_top1"] <= 1.0
        assert "final_losses" not in run  # not the product's trainer
    # 768 raw pixel features of 48 images: close to the full rank the 48 samples allow
    assert report["runs"][2]["metrics"]["rankme"] > 20
    # the view side every row trained at, the reference included
    assert "| plain-vicreg | reference: plain-vicreg | - | 16 px | 1 |" in report["table"]


def test_plain_script_chunks_draw_the_steps_batches_in_order():
    """The plain script augments several steps per kornia call; the steps still see the same
    index draws, in order, and the last chunk holds the remainder."""
    import torch
    from references import _batches, _chunks

    def draws(n_steps: int, chunk: int) -> list[list[torch.Tensor]]:
        return list(_chunks(100, 8, n_steps, torch.Generator().manual_seed(3), chunk))

    plain = list(_batches(100, 8, 37, torch.Generator().manual_seed(3)))
    groups = draws(37, 16)
    assert [len(g) for g in groups] == [16, 16, 5]
    assert all(torch.equal(a, b) for a, b in zip([t for g in groups for t in g], plain, strict=True))


def test_plain_script_takes_one_optimiser_step_per_step_across_chunks(monkeypatch):
    """5 steps in chunks of 2 (2 + 2 + 1): five updates, a loss per step, a backbone back."""
    import references
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    monkeypatch.setattr(references, "_chunk_steps", lambda size: 2)
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
        backbone = references.plain_vicreg(images, arch="resnet10t", steps=5, batch=4, seed=0,
                                           mean=(0.5,) * 3, std=(0.5,) * 3)
    finally:
        handle.remove()
    assert len(steps) == 5
    assert not backbone.training and backbone(torch.zeros(2, 3, 16, 16)).shape[0] == 2
