"""DDP under torchrun with real gloo processes: 2 ranks x 8 images give the same loss and the same
updated weights as 1 process x 16 images (global-batch statistics, gradient averaging, lr scaling).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Deterministic views (no random augmentation) and no BatchNorm (SyncBatchNorm needs GPUs), so
# the only difference between the two runs is how the batch is split over processes.
IDENTITY_AUGMENT = [
    "augment.preset=null", "augment.crop_size=32", "augment.scale.area=[1.0, 1.0]",
    "augment.scale.aspect=[1.0, 1.0]", "augment.flip_p=0.0", "augment.grayscale_p=0.0",
    "augment.lighting.p=0.0", "augment.blur.p=[0.0]", "augment.solarize.p=[0.0]",
]
VIT = [
    "model.arch=vit_tiny_patch16_224", "model.timm_kwargs={img_size: 32, patch_size: 8}",
    "model.projector=[64, 64]", "model.projector_bn=false", "model.stages=[1, 2]",
    "objective.layer_weights=[0.5, 0.5]", "objective.layer_invariance_weights=[0.0, 1.0]",
    "objective.layer_variance_weights=[0.0, 1.0]",
]


def run_worker(nproc: int, out: Path, overrides: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(REPO / "tests" / "ddp_step_worker.py"),
           str(REPO / "configs" / "demo.yaml"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def ddp_common(sample_shards) -> list[str]:
    return [
        f"data.train_shards={sample_shards['train']}", "data.image_size=32",
        "data.batch_size=16", "data.num_workers=0", "train.device=cpu",
        "log.wandb.mode=disabled", "log.progress=false", "optim.warmup_steps=0",
        # LARS, not the demo's AdamW: Adam divides by sqrt(v), so a parameter whose gradient is
        # ~0 moves by ~lr whatever the sign of its float rounding, which differs between 1 and
        # 2 processes summing the same batch; LARS keeps the comparison about DDP itself
        "optim.name=lars", "optim.lr=0.3", "optim.lars_trust=0.02",
        *IDENTITY_AUGMENT, *VIT,
    ]


@pytest.mark.distributed
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_gloo_ranks_match_one_process_with_the_global_batch(sample_shards, tmp_path,
                                                                accumulation):
    """accumulation 2: each rank splits its 8 images into 2 micro-batches (features cached,
    all-gathered in the loss, no_sync on the first): still the one-process 16-image step."""
    common = ddp_common(sample_shards)
    results = {}
    for nproc, k in ((1, 1), (2, accumulation)):
        out = tmp_path / f"world{nproc}.pt"
        run_worker(nproc, out, [*common, f"train.run_dir={tmp_path / f'run{nproc}'}",
                                f"optim.accumulation_steps={k}"])
        results[nproc] = torch.load(out, weights_only=True)
    one, two = results[1], results[2]
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    assert one["terms"] == pytest.approx(two["terms"], rel=1e-4, abs=1e-6)
    assert one["losses"][1] != one["losses"][0]  # the step changed the weights
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
