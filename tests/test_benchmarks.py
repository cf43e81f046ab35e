"""CPU smoke test of benchmarks/throughput.py: tiny model, few images, few steps. It checks that
every row is measured through the real components and the report is well formed; it asserts
nothing about speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
        "--profile-steps", "1", "--out", str(out), "--accumulation", "2", "--order", "abba",
        "--set", "model.projector=[32,32]", "augment.blur.kernel_size=3",
    ])
    assert code == 0
    report = json.loads((out / "throughput_resnet18_b8_x1.json").read_text())
    rows = {f"{r['kind']} {r['name']}": r for r in report["rows"]}
    assert not [r for r in rows.values() if "error" in r], rows
    assert set(rows) == {
        "model-only eager", "model-only eager:accum2", "loader cpu:full:w1", "loader cpu:shrunk:w1", "augment eager",
        "end-to-end cpu:full:off:eager:w1#1", "end-to-end cpu:shrunk:on:eager:w1#1",
        "end-to-end cpu:shrunk:on:eager:w1#2", "end-to-end cpu:full:off:eager:w1#2",
        # NVIDIA DALI in its CPU-only mode (a dev dependency on Linux x86-64) on the same shards,
        # feeding the same model step: 2 x (1 warm-up + 2 timed) batches of 8 from 24 images
        # cross its epoch boundary (3 batches), where DALIGenericIterator raises StopIteration
        *(["dali cpu:full"] if throughput.dali_available() else []),
    }
    # A B B A: the second pass runs the variants in reverse
    e2e_order = [r["name"] for r in report["rows"] if r["kind"] == "end-to-end"]
    assert e2e_order == ["cpu:full:off:eager:w1#1", "cpu:shrunk:on:eager:w1#1",
                         "cpu:shrunk:on:eager:w1#2", "cpu:full:off:eager:w1#2"]
    assert report["ceiling_row"] == "model-only eager"  # --compile off: the eager step
    for r in rows.values():
        assert r["pairs_per_s"] > 0 and r["pct_of_ceiling"] > 0
    e2e = rows["end-to-end cpu:shrunk:on:eager:w1#1"]
    assert 0.0 <= e2e["data_wait_frac"] <= 1.0
    assert e2e["profile"]["steps"] == 1
    # each timed window says how many log steps it held (their cost is in its rate)
    assert all(isinstance(r["log_steps"], int) and 0 <= r["log_steps"] <= 2
               for r in report["rows"] if r["kind"] == "end-to-end")
    # the timeline is written and summarised (host side only on a CPU)
    assert (out / "trace_cpu-shrunk-on-eager-w1.json.gz").stat().st_size > 0
    assert e2e["profile"]["timeline"]["host_blocked_ms_per_step"] >= 0.0
    # the pre-shrunk copy was written by `lsdr shards write --min-side S --max-side N`
    assert report["shards"]["full"]["samples"] == report["shards"]["shrunk"]["samples"] == 24
    manifest = json.loads((out / "data" / "shrunk" / "manifest.json").read_text())
    assert manifest["writer"]["options"]["max_side"] == 40
    assert manifest["writer"]["options"]["min_side"] == 32  # --image-size
    table = capsys.readouterr().out
    assert "end-to-end cpu:shrunk:on:eager:w1#2" in table and "% ceil" in table


def test_fill_robustness_criterion_compares_each_fill_with_its_own_single_fill_arm():
    import fill_robustness as fr

    assert fr.parse_fills(["mix=zeros,reflection", "zeros=zeros"]) == {
        "mix": ["zeros", "reflection"], "zeros": ["zeros"]}
    with pytest.raises(SystemExit, match="NAME=fill"):  # a fill set without a name
        fr.parse_fills(["zeros"])

    def row(rz, rr, zz, zr):
        return {"rot 30 zeros": rz, "rot 30 refl": rr, "zoom-out 0.7 zeros": zz,
                "zoom-out 0.7 refl": zr, "linear": 0.5}

    runs = {"mix": [row(0.2, 0.5, 0.3, 0.6), row(0.4, 0.5, 0.3, 0.6)],
            "zeros": [row(0.35, 0.1, 0.2, 0.1)] * 2,
            "reflection": [row(0.1, 0.5, 0.1, 0.7)] * 2}
    summary = fr.summarise(runs)
    assert abs(summary["mix"]["rot 30 zeros"][0] - 0.3) < 1e-9
    assert summary["mix"]["rot 30 zeros"][1] > 0 and summary["zeros"]["linear"][1] == 0
    verdict = fr.criterion(summary, "mix")
    assert [c for c, v in verdict.items() if not v["met"]] == ["rot 30 zeros", "zoom-out 0.7 refl"]
    text = fr.markdown(summary, {"mix": verdict}, [0, 1], fr.parse_fills(
        ["mix=zeros,reflection", "zeros=zeros", "reflection=reflection"]))
    assert "rot 30 zeros: 0.300 vs zeros-only 0.350: NOT met" in text
    assert "rot 30 refl: 0.500 vs reflection-only 0.500: met" in text


def test_fill_robustness_keeps_each_finished_run_while_the_others_run(tmp_path):
    import fill_robustness as fr

    path = tmp_path / "fill_robustness.partial.json"
    finished = {("mix", 0): {"rot 30 zeros": 0.2, "linear": 0.7}}
    fr.write_partial(path, finished)
    finished[("zeros", 1)] = {"rot 30 zeros": 0.3, "linear": 0.6}
    fr.write_partial(path, finished)
    assert json.loads(path.read_text()) == {"mix-s0": {"rot 30 zeros": 0.2, "linear": 0.7},
                                            "zeros-s1": {"rot 30 zeros": 0.3, "linear": 0.6}}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.distributed
def test_ddp_scaling_runs_throughput_under_torchrun_at_each_size(tmp_path, capsys):
    """benchmarks/ddp_scaling.py at 1 and 2 real gloo processes: each size's throughput report,
    rows matched by name, per-GPU rates against the 1-process run (CPU: no speed asserted)."""
    import ddp_scaling

    out = tmp_path / "scaling"
    code = ddp_scaling.main([
        "--gpus", "1,2", "--out", str(out), "--",
        "--config", str(REPO / "configs" / "demo.yaml"), "--device", "cpu", "--compile", "off",
        "--batch", "4", "--image-size", "32", "--crop", "24", "--images", "8",
        "--source-width", "40,72", "--source-height", "32,56", "--max-side", "40",
        "--per-shard", "8", "--workers", "1", "--steps", "1", "--warmup", "1",
        "--variants", "cpu:full:on:eager", "--loader-rows", "", "--augment-rows", "",
        "--cudagraphs", "off", "--no-dali", "--cudnn-benchmark", "off",
        "--set", "model.projector=[32,32]", "augment.blur.kernel_size=3",
    ])
    assert code == 0
    result = json.loads((out / "ddp_scaling.json").read_text())
    assert result["sizes"] == [1, 2] and result["failed"] == {}
    assert result["reports"]["2"]["world_size"] == 2
    rows = {entry["row"]: entry["sizes"] for entry in result["table"]}
    assert set(rows) == {"model-only eager", "end-to-end cpu:full:on:eager:w1"}
    for sizes in rows.values():
        assert sizes["1"]["efficiency_pct"] == pytest.approx(100.0)
        two = sizes["2"]
        assert two["per_gpu"] == pytest.approx(two["pairs_per_s"] / 2)
        assert two["efficiency_pct"] == pytest.approx(
            100 * two["per_gpu"] / sizes["1"]["pairs_per_s"])
    assert "| end-to-end cpu:full:on:eager:w1 |" in (out / "ddp_scaling.md").read_text()
    with pytest.raises(ValueError, match="baseline"):
        ddp_scaling.scaling_rows({2: result["reports"]["2"]})
    with pytest.raises(SystemExit) as exc:  # the script owns --out: one clear usage error
        ddp_scaling.main(["--out", str(out), "--", "--out", "elsewhere"])
    assert exc.value.code == 2 and "--out after `--`" in capsys.readouterr().err


@pytest.mark.parametrize(("first", "steps", "log_every", "expected"), [
    (31, 30, 50, 1),   # steps 31-60 hold step 50 (the fifteenth session's windows)
    (51, 50, 50, 1),   # one whole period always holds exactly one
    (1, 49, 50, 0),
    (50, 1, 50, 1),
    (1, 100, 50, 2),
    (7, 5, 1, 5),
])
def test_log_steps_in_a_timed_window(first, steps, log_every, expected):
    assert throughput.log_steps_in(first, steps, log_every) == expected


def test_the_step_spread_finds_one_slow_step_in_a_window():
    # ten steps of 80 ms, one of them 1.5 s (a log record written the slow way)
    stamps = [0.0]
    for i in range(10):
        stamps.append(stamps[-1] + (1.5 if i == 4 else 0.08))
    spread = throughput.step_spread(stamps)
    assert spread["step_ms_median"] == pytest.approx(80.0)
    assert spread["step_ms_max"] == pytest.approx(1500.0)
