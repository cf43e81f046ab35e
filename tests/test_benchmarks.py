"""CPU smoke test of benchmarks/throughput.py: tiny model, few images, few steps. It checks that
every row is measured through the real components and the report is well formed; it asserts
nothing about speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import throughput  # benchmarks/ is a folder of scripts, not a package


def test_throughput_script_measures_every_row_on_cpu(tmp_path, capsys):
    out = tmp_path / "out"
    code = throughput.main([
        "--config", str(REPO / "configs" / "demo.yaml"), "--device", "cpu", "--compile", "off",
        "--batch", "8", "--image-size", "32", "--crop", "24", "--images", "24",
        "--source-width", "40,72", "--source-height", "32,56", "--max-side", "40",
        "--per-shard", "8", "--workers", "1", "--steps", "2", "--warmup", "1",
        "--variants", "cpu:full:off:eager,cpu:shrunk:on:eager",
        "--loader-rows", "cpu:full,cpu:shrunk", "--profile-variants", "-1",
        "--profile-steps", "1", "--out", str(out), "--accumulation", "2",
        "--set", "model.projector=[32,32]", "augment.blur.kernel_size=3",
    ])
    assert code == 0
    report = json.loads((out / "throughput_resnet18_b8_x1.json").read_text())
    rows = {f"{r['kind']} {r['name']}": r for r in report["rows"]}
    assert not [r for r in rows.values() if "error" in r], rows
    assert set(rows) == {
        "model-only eager", "model-only eager:accum2", "loader cpu:full:w1", "loader cpu:shrunk:w1", "augment eager",
        "end-to-end cpu:full:off:eager:w1", "end-to-end cpu:shrunk:on:eager:w1",
    }
    assert report["ceiling_row"] == "model-only eager"  # --compile off: the eager step
    for r in rows.values():
        assert r["pairs_per_s"] > 0 and r["pct_of_ceiling"] > 0
    e2e = rows["end-to-end cpu:shrunk:on:eager:w1"]
    assert 0.0 <= e2e["data_wait_frac"] <= 1.0
    assert e2e["profile"]["steps"] == 1
    # the pre-shrunk copy was written by `lsdr shards write --min-side S --max-side N`
    assert report["shards"]["full"]["samples"] == report["shards"]["shrunk"]["samples"] == 24
    manifest = json.loads((out / "data" / "shrunk" / "manifest.json").read_text())
    assert manifest["writer"]["options"]["max_side"] == 40
    assert manifest["writer"]["options"]["min_side"] == 32  # --image-size
    table = capsys.readouterr().out
    assert "end-to-end cpu:shrunk:on:eager:w1" in table and "% ceil" in table


class AutoResetEpochs:
    """DALIGenericIterator's protocol with auto_reset=True (DALI is not installed here): its own
    iterator; StopIteration at the end of each epoch, then the next epoch on the next call."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch, self.served, self.epoch = per_epoch, 0, 0

    def __iter__(self) -> AutoResetEpochs:
        return self

    def __next__(self) -> tuple[int, int]:
        if self.served == self.per_epoch:
            self.served, self.epoch = 0, self.epoch + 1  # reset, as auto_reset does
            raise StopIteration
        self.served += 1
        return self.epoch, self.served


def test_the_dali_iterator_runs_on_past_its_epoch_boundary():
    it = throughput.endless_batches(AutoResetEpochs(per_epoch=3))
    batches = [next(it) for _ in range(8)]
    assert batches[2] == (0, 3) and batches[3] == (1, 1) and batches[7] == (2, 2)
