"""Fill robustness of the demo backbone: does a fill mixture in training buy invariance under
every border fill at test time?

    python benchmarks/fill_robustness.py --seeds 0,1,2,3 --jobs 10 --out OUT

For each training fill set (`--fills`, NAME=fill,fill,...) and seed, runs the real `lsdr demo`
(configs/demo.yaml on the embedded digits: 300 steps of 64, 48 px views, the small-images preset
with `augment.fill` overridden) in its own process, then reads the demo's own evaluation
(RUN/eval/demo.json: retrieval of a transformed test image among the test originals, transforms
by Kornia's `rotate` / `scale` with zero and with reflection fill, `lsdr_repr.eval.invariance`,
which shares no code with the training augmentation).

The issue-13 criterion, checked per column: the mixture's retrieval under rotation-30 and
zoom-out-0.7 with zero fill and with reflection fill is at least what the single-fill training
reaches on its own fill (zeros-only on the zero-fill columns, reflection-only on the reflection
columns), mean over seeds. Writes OUT/fill_robustness.json (every run) and OUT/fill_robustness.md;
while it runs, OUT/fill_robustness.partial.json holds every finished run's row, so a call cut
short by a time limit keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_FILLS = ("mixture=zeros,reflection,replicate,random", "zeros=zeros",
                 "reflection=reflection")
# (key in the demo's invariance table: row, level) -> column header
COLUMNS = {("rotate/zeros", "30"): "rot 30 zeros", ("rotate/reflection", "30"): "rot 30 refl",
           ("zoom_out/zeros", "0.7"): "zoom-out 0.7 zeros",
           ("zoom_out/reflection", "0.7"): "zoom-out 0.7 refl"}
# column -> the single-fill arm whose own fill it is
OWN_FILL = {"rot 30 zeros": "zeros", "zoom-out 0.7 zeros": "zeros",
            "rot 30 refl": "reflection", "zoom-out 0.7 refl": "reflection"}


def parse_fills(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, sep, fills = spec.partition("=")
        if not sep or not fills:
            raise SystemExit(f"--fills {spec!r}: expected NAME=fill[,fill...]")
        out[name] = fills.split(",")
    return out


def run_one(name: str, fills: list[str], seed: int, work: Path, data: Path,
            extra: list[str]) -> subprocess.Popen:
    run_dir = work / f"{name}-s{seed}"
    log = open(work / f"{name}-s{seed}.log", "w")  # noqa: SIM115 (closed with the process)
    cmd = [sys.executable, "-m", "lsdr_repr", "demo", "--data", str(data), str(run_dir),
           f"augment.fill=[{','.join(fills)}]", f"train.seed={seed}", "log.wandb.mode=disabled",
           *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)


def read_run(run_dir: Path) -> dict[str, float]:
    report = json.loads((run_dir / "eval" / "demo.json").read_text())
    table = report["invariance"]["trained"]
    row = {header: table[r][level]["retrieval_top1"] for (r, level), header in COLUMNS.items()}
    row["linear"] = report["linear"]["trained"]["top1"]
    return row


def write_partial(path: Path, rows: dict[tuple[str, int], dict[str, float]]) -> None:
    """The finished runs' rows as {"NAME-sSEED": row}, replaced atomically (readable at any time)."""
    from data_pipelines.manifest import write_json_atomic

    write_json_atomic(path, {f"{name}-s{seed}": row for (name, seed), row in rows.items()})


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for name, rows in runs.items():
        out[name] = {}
        for key in rows[0]:
            vals = [r[key] for r in rows]
            out[name][key] = (statistics.mean(vals),
                              statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def criterion(summary: dict, mixture: str) -> dict[str, dict[str, float | bool]]:
    verdict = {}
    for col, own in OWN_FILL.items():
        if own in summary and mixture in summary:
            m, o = summary[mixture][col][0], summary[own][col][0]
            verdict[col] = {"mixture": m, own: o, "met": m >= o}
    return verdict


def markdown(summary: dict, verdicts: dict, seeds: list[int], fills: dict) -> str:
    cols = ["linear", *COLUMNS.values()]
    lines = [f"Seeds {','.join(map(str, seeds))}; mean ± sample std over seeds.", "",
             "| training fill | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in summary.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in cols]
        lines.append(f"| {name} ({', '.join(fills[name])}) | " + " | ".join(cells) + " |")
    for mixture, verdict in verdicts.items():
        lines += ["", (f"Criterion for `{mixture}` (its mean >= the single-fill arm's on that "
                       "arm's own fill):")]
        for col, v in verdict.items():
            own = OWN_FILL[col]
            lines.append(f"- {col}: {v['mixture']:.3f} vs {own}-only {v[own]:.3f}: "
                         f"{'met' if v['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fills", nargs="*", default=list(DEFAULT_FILLS),
                   help="training fill sets NAME=fill,fill,... (need 'zeros' and 'reflection')")
    p.add_argument("--mixtures", default=None,
                   help="comma-separated names checked against the criterion (default: every "
                   "set with more than one fill)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--set", nargs="*", default=[], help="extra demo config overrides")
    args = p.parse_args(argv)
    fills = parse_fills(args.fills)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    work = out / "runs"
    work.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    # write the sample shards once, before the jobs race on them
    subprocess.run([sys.executable, "-m", "lsdr_repr", "shards", "sample", str(data)], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    todo = [(n, s) for s in seeds for n in fills]
    running: dict[tuple[str, int], subprocess.Popen] = {}
    finished: dict[tuple[str, int], dict[str, float]] = {}
    failed = []
    t0 = time.time()
    while todo or running:
        while todo and len(running) < args.jobs:
            n, s = todo.pop(0)
            running[(n, s)] = run_one(n, fills[n], s, work, data, args.set)
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                if proc.returncode != 0:
                    failed.append(key)
                else:
                    finished[key] = read_run(work / f"{key[0]}-s{key[1]}")
                    write_partial(out / "fill_robustness.partial.json", finished)
                print(f"{key[0]} seed {key[1]}: exit {proc.returncode} "
                      f"({time.time() - t0:.0f} s)", flush=True)
        time.sleep(1.0)
    if failed:
        print(f"failed runs: {failed} (logs in {work})", file=sys.stderr)
        return 1
    runs = {n: [finished[(n, s)] for s in seeds] for n in fills}
    summary = summarise(runs)
    mixtures = (args.mixtures.split(",") if args.mixtures
                else [n for n, f in fills.items() if len(f) > 1])
    verdicts = {m: criterion(summary, m) for m in mixtures}
    (out / "fill_robustness.json").write_text(json.dumps(
        {"fills": fills, "seeds": seeds, "runs": runs, "summary": summary,
         "criterion": verdicts, "seconds": time.time() - t0}, indent=1))
    text = markdown(summary, verdicts, seeds, fills)
    (out / "fill_robustness.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
