"""benchmarks/timeline.py: the per-step accounting of a profiled timeline, on a hand-made trace
whose answer is known (two streams, a host sync, one late launch) and on a real CPU profile."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from timeline import timeline_summary, union_us  # benchmarks/ is a folder of scripts


def _gpu(name, ts, dur, stream, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "tid": stream,
            "args": {"stream": stream, "correlation": corr}}


def _host(name, ts, dur, cat="cpu_op", corr=None):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1,
            "args": {} if corr is None else {"correlation": corr}}


def test_union_merges_overlaps():
    assert union_us([(0, 10), (5, 15), (20, 25)]) == 20
    assert union_us([]) == 0


def test_a_hand_made_step_is_accounted_exactly():
    # Main stream 7: 0-100 and 400-1000 (700 us). Stream 58: 150-350 (the augmentation, while the
    # main stream waits). The whole GPU idles 100-150 and 350-400; the kernel at 400 was launched
    # at 390 (late: the host sat in .item() from 120 to 385, itself inside a larger cpu op).
    events = [
        _gpu("fwd", 0, 100, 7, 1), _gpu("aug", 150, 200, 58, 2), _gpu("bwd", 400, 600, 7, 3),
        _host("cudaLaunchKernel", 395, 5, cat="cuda_runtime", corr=3),
        _host("step", 110, 280), _host("aten::item", 120, 265),
        _host("aten::_local_scalar_dense", 121, 263),
    ]
    s = timeline_summary(events, steps=1, min_gap_us=10)
    assert s["span_ms_per_step"] == pytest.approx(1.0)
    assert s["stream_busy_ms_per_step"] == {"7": pytest.approx(0.7), "58": pytest.approx(0.2)}
    assert s["main_stream"] == "7"
    assert s["main_idle_ms_per_step"] == pytest.approx(0.3)
    assert s["main_idle_while_other_streams_ms_per_step"] == pytest.approx(0.2)
    assert s["gpu_idle_ms_per_step"] == pytest.approx(0.1)
    # the outermost sync only (item, not the scalar read nested in it)
    assert s["host_blocked_by_op_ms_per_step"] == {"aten::item": pytest.approx(0.265)}
    first, second = s["largest_gpu_gaps"]
    assert (first["us"], first["ended_by"]) == (50, "aug")  # 100-150, its launch not traced
    assert first["launched_us_before"] is None
    assert (second["us"], second["ended_by"], second["launched_us_before"]) == (50, "bwd", 5)


def test_a_real_cpu_profile_reports_the_host_side(tmp_path):
    x = torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            (x @ x).sum().item()
    path = tmp_path / "trace.json.gz"
    prof.export_chrome_trace(str(path))
    with gzip.open(path, "rt") as f:
        s = timeline_summary(json.load(f)["traceEvents"], steps=2)
    assert "aten::item" in s["host_blocked_by_op_ms_per_step"]
    assert "gpu_busy_ms_per_step" not in s  # no GPU events, no GPU section
