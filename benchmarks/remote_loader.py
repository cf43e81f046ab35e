"""Loader throughput from local disk against a loopback HTTP server (and `pipe:cat`), one run.

    python benchmarks/remote_loader.py --images 1536 --workers 2 --out bench_out/remote.json

Writes `--images` photo-like JPEGs (benchmarks/throughput.py's `synth_jpeg`) as shards with the
real `lsdr shards write`, serves that directory with `python -m http.server` on 127.0.0.1 in
its own process (so the server does not share the loader's interpreter), and times the real
training loader (`make_train_loader`: resampled shards, shuffle buffer, CPU decode and resize to
`--image-size`) on each source kind: the local directory, the same shards as
`http://127.0.0.1:PORT/train-{...}.tar` (webdataset's curl handler) and `pipe:cat`. The kinds
run in turn, `--reps` times each (A B C A B C ...), so load from other users of a shared
machine falls on all of them; the report gives every rep, the median and the ratio to local.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128, help="loader output side S")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=40, help="timed batches per rep")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kinds", default="local,http,pipe")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/lsdr_remote_bench"))
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> Path:
    """DATA/shards written once by the writer behind `lsdr shards write` (reused while the spec
    is the same)."""
    from throughput import _write_images

    from data_pipelines.writer import write_shards

    shards, stamp = args.data_dir / "shards", args.data_dir / "spec.json"
    spec = {"images": args.images, "per_shard": args.per_shard, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return shards
    src = args.data_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    _write_images((src, list(range(args.images)), (380, 620), (300, 480)))
    write_shards(src, shards, prefix="train", max_count=args.per_shard, progress=False,
                 workers=2)
    stamp.write_text(json.dumps(spec))
    return shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1", "--directory", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the HTTP server did not start")


def measure(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from throughput import close_loader

    from data_pipelines.reader import make_train_loader
    from lsdr_repr.config import DataConfig

    cfg = DataConfig(train_shards=spec, image_size=args.image_size, batch_size=args.batch,
                     num_workers=args.workers, prefetch_factor=4, shuffle_buffer=500,
                     pin_memory=False)
    start = time.perf_counter()
    loader = make_train_loader(cfg, seed=0)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    images = sum(len(next(it).labels) for _ in range(args.batches))
    wall = time.perf_counter() - start
    close_loader(loader)
    return {"images_per_s": images / wall, "wall_s": wall, "startup_and_warmup_s": first_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shards = prepare(args)
    names = sorted(p.name for p in shards.glob("train-*.tar"))
    last = names[-1].split("-")[1].split(".")[0]
    server, base = start_server(shards)
    kinds = args.kinds.split(",")
    specs = {"local": str(shards), "http": f"{base}/train-{{000000..{last}}}.tar",
             "pipe": f"pipe:cat {shards}/train-{{000000..{last}}}.tar"}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    try:
        for rep in range(args.reps):
            for kind in kinds:
                result = measure(specs[kind], args)
                runs[kind].append(result)
                print(f"rep {rep} {kind:5s} {result['images_per_s']:8.1f} images/s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    median = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    report = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "shards": len(names), "bytes": sum((shards / n).stat().st_size for n in names),
        "runs": runs, "median_images_per_s": median,
        "ratio_to_local": {k: median[k] / median["local"] for k in median} if "local" in median
        else {},
        # each rep's kinds ran back to back: their ratio is less exposed to other users' load
        "paired_ratio_median": {
            k: statistics.median(r["images_per_s"] / loc["images_per_s"]
                                 for r, loc in zip(runs[k], runs["local"]))
            for k in kinds} if "local" in runs else {},
    }
    print(f"\n{'kind':6s} {'images/s (median)':>18s} {'vs local':>9s} {'paired':>7s}")
    for kind in kinds:
        ratio = report["ratio_to_local"].get(kind, float("nan"))
        paired = report["paired_ratio_median"].get(kind, float("nan"))
        print(f"{kind:6s} {median[kind]:18.1f} {ratio:9.2f} {paired:7.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
