"""CUDA graphs (`train.compile_mode=reduce-overhead`) through the real trainer: the logged losses,
the online kNN, the spectrum and image logging, and resume give what the compiled run without
graphs gives. Needs a GPU (skipped on the CPU-only CI machine); run on one with
`pytest tests/test_cuda_graphs.py`.

What CUDA graphs can break: a replay writes its outputs into the same memory as the one before,
so a tensor kept past the next step (a deferred loss, the last projection kept for the spectrum,
the finite flag read late) would silently read the next step's values; and the graph pools must
survive an eval pass and a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_dirs import DEMO, final_weights, tiny_overrides

from lsdr_repr.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ON_GPU = ["train.device=cuda", "train.compile=true", "train.total_steps=8",
          "train.checkpoint_every=4", "train.log_every=1", "train.eval_every=4",
          "train.spectrum_every=4", "train.image_grid_every=4", "log.wandb.mode=disabled",
          "data.batch_size=32"]


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of KEY in RUN_DIR/metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record["metrics"]:
            out[record["step"]] = record["metrics"][key]
    return out


def train(sample_shards, run_dir: Path, mode: str, *extra: str) -> None:
    args = tiny_overrides(sample_shards, run_dir, *ON_GPU, f"train.compile_mode={mode}", *extra)
    assert main(["train", str(DEMO), *args]) == 0


def test_cuda_graph_run_logs_evaluates_and_resumes_like_the_compiled_run(sample_shards,
                                                                         tmp_path):
    torch.backends.cudnn.deterministic = True
    reference, graphs, resumed = tmp_path / "compiled", tmp_path / "graphs", tmp_path / "resumed"
    train(sample_shards, reference, "default")
    train(sample_shards, graphs, "reduce-overhead")
    train(sample_shards, resumed, "reduce-overhead", "train.total_steps=4")
    train(sample_shards, resumed, "reduce-overhead")  # resumes from step 4 to 8

    # Every step's loss as the compiled run without graphs logged it (bf16 tolerance): a value
    # read after the next replay would be the next step's, off by far more.
    for key in ("loss/total", "loss/invariance", "diag/std_mean"):  # diag: the kept projection
        expected = logged(reference, key)
        assert sorted(expected) == list(range(1, 9)), key
        for run in (graphs, resumed):
            got = logged(run, key)
            assert sorted(got) == sorted(expected), (run.name, key)
            for step in expected:
                assert got[step] == pytest.approx(expected[step], rel=2e-2), (run.name, key, step)
    for run in (graphs, resumed):
        # the online kNN ran between graph replays, and the memory counter counts the pools
        assert sorted(logged(run, "knn/top1")) == [4, 8], run
        assert all(v > 0 for v in logged(run, "gpu_mem_reserved_gb").values()), run
    # Resume restored the optimiser and the augmentation state: the resumed run ends where the
    # uninterrupted one does.
    a, b = final_weights(graphs), final_weights(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=2e-2, atol=2e-3, msg=key)
    c = final_weights(reference)
    floating = [k for k in a if a[k].is_floating_point()]
    worst = max(float((a[k].float() - c[k].float()).abs().max()) for k in floating)
    assert worst < 0.05, worst


@pytest.mark.parametrize("channels_last", [True, False])
def test_views_come_in_the_models_memory_format(sample_shards, tmp_path, channels_last):
    # model.channels_last=false is the workaround for PyTorch's compiled channels_last bug at
    # 1 x 1 maps (README): channels_last views would still run channels_last convolutions.
    from lsdr_repr import distributed as dist
    from lsdr_repr.config import load_config
    from lsdr_repr.train import Trainer

    # 64 px views: ResNet-18's last stage map is 2 x 2, so build_model keeps channels_last
    cfg = load_config(DEMO, tiny_overrides(sample_shards, tmp_path, "train.device=cuda",
                                           "log.wandb.mode=disabled", "data.image_size=64",
                                           "augment.crop_size=64",
                                           f"model.channels_last={str(channels_last).lower()}"))
    trainer = Trainer(cfg, dist.read_dist_env({}), torch.device("cuda"))
    assert trainer.model.channels_last is channels_last
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, device="cuda")
    views = trainer.staging.augment(images)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert views and all(v.is_contiguous(memory_format=fmt) for v in views)


def test_compiled_resnet_trains_on_views_whose_last_stage_map_is_one_pixel(sample_shards,
                                                                           tmp_path):
    # 24 px views: ResNet-18's last stage sees 1 x 1 maps, where compiled channels_last
    # convolutions crashed in their first backward (pytorch/pytorch#171622); build_model turns
    # channels_last off there (the rule and the trainer's use of it are CPU tests in
    # test_models.py; this one fails only on a torch that has the bug, if the rule is lost).
    train(sample_shards, tmp_path / "run", "default", "model.channels_last=true",
          "train.total_steps=2", "train.eval_every=0")
    assert sorted(logged(tmp_path / "run", "loss/total")) == [1, 2]
