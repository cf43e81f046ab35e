"""Where a profiled step's time goes, from a torch.profiler Chrome trace (no GPU needed to read it).

    summary = timeline_summary(json.load(gzip.open("trace.json.gz", "rt"))["traceEvents"], steps=4)

Per step: the GPU's busy time (the union of kernels, copies and memsets over every stream), each
stream's, the main stream's idle time split into "another stream was running" (work that does
not overlap, e.g. the augmentation on the staging stream) and "the whole GPU was idle"; and the
host's time blocked in synchronising calls (a `.item()`, `bool(tensor)`, a stream, event or
device synchronise), which is what leaves the GPU idle when the host then has to launch the next
kernels. The largest whole-GPU gaps name the op that ended them and how long before it ran the
host launched it (launched late: the host was the limit; launched early: a dependency was).

The numbers that located the ViT-S/16 gap of issue 18 (benchmarks/RESULTS.md, fourteenth session)
were read this way from the trace that `benchmarks/throughput.py --profile-variants` writes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
# Host calls that wait for the GPU (the outermost one is counted, so nesting is not doubled).
SYNC_OPS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense",
            "cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize",
            "cudaMemcpy", "cuStreamSynchronize", "cuEventSynchronize", "cuCtxSynchronize")


def _merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """[start, end) intervals -> their union as disjoint intervals, in time order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds in, microseconds out)."""
    return sum((end - start for start, end in _merged(intervals)), 0.0)


def _gaps(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The gaps between the merged intervals, in time order."""
    return [(a[1], b[0]) for a, b in pairwise(_merged(intervals))]


def _overlap_us(gap: tuple[float, float], intervals: Sequence[tuple[float, float]]) -> float:
    return union_us((max(s, gap[0]), min(e, gap[1])) for s, e in intervals
                    if s < gap[1] and e > gap[0])


def _outermost(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events not nested inside another of the list (per thread)."""
    out, by_thread = [], {}
    for e in sorted(events, key=lambda e: (e["tid"], e["ts"], -e["dur"])):
        last = by_thread.get(e["tid"])
        if last is not None and e["ts"] < last["ts"] + last["dur"]:
            continue
        by_thread[e["tid"]] = e
        out.append(e)
    return out


def timeline_summary(events: Sequence[dict[str, Any]], steps: int, top_gaps: int = 5,
                     min_gap_us: float = 50.0) -> dict[str, Any]:
    """Chrome-trace events of `steps` profiled steps -> per-step milliseconds (see the module
    docstring). Streams are named by their id; the main stream is the one with the most busy
    time. Empty GPU sections when the trace has no GPU events (a CPU run)."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in complete if e.get("cat") in GPU_CATEGORIES]
    host = [e for e in complete if e.get("cat") in HOST_CATEGORIES]
    per_step = 1000.0 * max(1, steps)
    syncs = _outermost([e for e in host if e.get("name") in SYNC_OPS])
    blocked = Counter()
    for e in syncs:
        blocked[e["name"]] += e["dur"]
    summary: dict[str, Any] = {
        "host_blocked_ms_per_step": sum(blocked.values()) / per_step,
        "host_blocked_by_op_ms_per_step": {k: v / per_step for k, v in blocked.most_common()},
    }
    if not gpu:
        return summary
    streams: dict[Any, list[tuple[float, float]]] = {}
    for e in gpu:
        streams.setdefault(e.get("args", {}).get("stream"), []).append(
            (e["ts"], e["ts"] + e["dur"]))
    busy = {s: union_us(iv) for s, iv in streams.items()}
    main = max(busy, key=busy.get)
    everything = [iv for ivs in streams.values() for iv in ivs]
    others = [iv for s, ivs in streams.items() if s != main for iv in ivs]
    span = max(e for _, e in everything) - min(s for s, _ in everything)
    busy_all = union_us(everything)
    main_idle = span - busy[main]
    while_others = sum(_overlap_us(g, others) for g in _gaps(streams[main]))
    # the whole-GPU gaps, the op that ends each, and when the host launched it
    launches = {e["args"]["correlation"]: e for e in host
                if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    starts = sorted(gpu, key=lambda e: e["ts"])
    gaps = []
    for a, b in _gaps(everything):
        if b - a < min_gap_us:
            continue
        after = next(e for e in starts if e["ts"] >= b)
        launch = launches.get(after.get("args", {}).get("correlation"))
        gaps.append({"at_ms": (a - starts[0]["ts"]) / 1000, "us": b - a,
                     "ended_by": after["name"][:80],
                     "launched_us_before": None if launch is None else b - launch["ts"]})
    gaps.sort(key=lambda g: -g["us"])
    summary.update({
        "span_ms_per_step": span / per_step,
        "gpu_busy_ms_per_step": busy_all / per_step,
        "stream_busy_ms_per_step": {str(s): v / per_step for s, v in busy.items()},
        "main_stream": str(main),
        "main_idle_ms_per_step": main_idle / per_step,
        "main_idle_while_other_streams_ms_per_step": while_others / per_step,
        "gpu_idle_ms_per_step": (span - busy_all) / per_step,
        "largest_gpu_gaps": gaps[:top_gaps],
    })
    return summary
