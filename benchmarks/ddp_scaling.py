"""DDP scaling in one call: the same `benchmarks/throughput.py` command at 1, 2, 4 ... GPUs
(`torchrun --standalone --nproc_per_node N`, the per-GPU batch fixed), then per-GPU efficiency.

    python benchmarks/ddp_scaling.py --gpus 1,2,4 --out bench_out/scaling -- \
        --config configs/resnet50_imagenet.yaml --batch 256 --workers 12 --order abba

Everything after `--` goes to throughput.py unchanged (its --batch is per GPU); this script adds
--out OUT/xN and a shared --data-dir, so the shards are written once, by the first size. The
scaling efficiency per GPU of a row at N GPUs is its pairs/s per GPU at N over its pairs/s at 1,
rows matched by name. The model-only ceiling isolates what the collectives cost (the all-gather
of projections for the global-batch loss, SyncBatchNorm, the gradient all-reduce); the
end-to-end rows add the rank-sharded loader and the CPU cores the ranks share. Where a row falls
short, throughput.py's --profile-variants (passed after `--`) shows where the step time goes.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 unless set): the lent machines' guidance.

Writes OUT/ddp_scaling.json (every size's rows and the table) and OUT/ddp_scaling.md; each
size's own report stays in OUT/xN/. Exit 1 if any size failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT = REPO / "benchmarks" / "throughput.py"
GOAL_PCT = 90.0  # issue 20: per-GPU scaling efficiency at 2 and 4 GPUs


def throughput_command(gpus: int, passthrough: list[str], out: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={gpus}", str(THROUGHPUT), *passthrough,
            "--out", str(out), "--data-dir", str(data_dir)]


def read_report(out: Path, gpus: int) -> dict:
    """The throughput.py report of one size (OUT/xN/throughput_<arch>_b<batch>_x<N>.json)."""
    found = sorted(out.glob(f"throughput_*_x{gpus}.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{out}: expected one throughput_*_x{gpus}.json, found "
                                f"{[p.name for p in found]}")
    return json.loads(found[0].read_text())


def scaling_rows(reports: dict[int, dict]) -> list[dict]:
    """Rows measured at every size -> {row, sizes: {N: {pairs_per_s, per_gpu, efficiency_pct}}}.

    reports: {N: throughput.py report at N GPUs}; needs N=1 (the baseline). A row missing at some
    size (e.g. the eager and CUDA-graph model rows, measured on one GPU only) is left out."""
    if 1 not in reports:
        raise ValueError("the 1-GPU report is the baseline: --gpus must include 1")
    by_size = {n: {f"{r['kind']} {r['name']}": r for r in rep["rows"] if r.get("pairs_per_s")}
               for n, rep in reports.items()}
    table = []
    for name, base in by_size[1].items():
        if not all(name in rows for rows in by_size.values()):
            continue
        sizes = {}
        for n in sorted(by_size):
            total = by_size[n][name]["pairs_per_s"]
            per_gpu = total / n
            sizes[n] = {"pairs_per_s": total, "per_gpu": per_gpu,
                        "efficiency_pct": 100.0 * per_gpu / base["pairs_per_s"]}
        table.append({"row": name, "sizes": sizes})
    return table


def markdown(table: list[dict], reports: dict[int, dict], failed: dict[int, str]) -> str:
    sizes = sorted(reports)
    first = reports[sizes[0]]
    title = (f"{first['arch']}, {first['args']['batch']} pairs per GPU, "
             f"{first['env'].get('device', '?')}; efficiency = pairs/s per GPU at N / at 1 GPU "
             f"(goal >= {GOAL_PCT:.0f} %)")
    lines = [title, "",
             "| row | " + " | ".join(f"{n} GPU: pairs/s per GPU (eff.)" for n in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for entry in table:
        cells = [f"{s['per_gpu']:.0f} ({s['efficiency_pct']:.1f} %)"
                 for s in (entry["sizes"][n] for n in sizes)]
        lines.append(f"| {entry['row']} | " + " | ".join(cells) + " |")
    for n, why in sorted(failed.items()):
        lines.append(f"\n{n} GPUs: failed: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2,4", help="comma-separated process counts (with 1)")
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None, help="shards shared by the sizes (default OUT/data)")
    args = p.parse_args(own)
    for flag in ("--out", "--data-dir"):
        if flag in passthrough:
            p.error(f"{flag} after `--`: this script sets it for each size (use its own {flag})")
    try:
        sizes = sorted({int(n) for n in args.gpus.split(",")})
    except ValueError:
        p.error(f"--gpus {args.gpus!r}: expected comma-separated process counts, e.g. 1,2,4")
    if 1 not in sizes:
        p.error("--gpus must include 1: the 1-GPU run is the baseline")
    out = Path(args.out)
    data_dir = Path(args.data_dir) if args.data_dir else out / "data"
    env = {**os.environ}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    reports: dict[int, dict] = {}
    failed: dict[int, str] = {}
    for n in sizes:  # 1 first: it writes the shared shards
        size_out = out / f"x{n}"
        for stale in size_out.glob(f"throughput_*_x{n}.json"):  # an earlier run's report
            stale.unlink()
        cmd = throughput_command(n, passthrough, size_out, data_dir)
        print(f"== {n} GPU(s): {' '.join(cmd)}", flush=True)
        code = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
        try:
            if code != 0:
                raise RuntimeError(f"throughput.py exited {code}")
            reports[n] = read_report(size_out, n)
        except (RuntimeError, FileNotFoundError) as exc:
            failed[n] = str(exc)
            print(f"{n} GPU(s): {exc}", file=sys.stderr)
    if 1 not in reports:
        print("the 1-GPU run failed: no baseline, no table", file=sys.stderr)
        return 1
    table = scaling_rows(reports)
    (out / "ddp_scaling.json").write_text(json.dumps(
        {"sizes": sorted(reports), "failed": failed, "table": table, "goal_pct": GOAL_PCT,
         "reports": {str(n): r for n, r in reports.items()}}, indent=1))
    text = markdown(table, reports, failed)
    (out / "ddp_scaling.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
