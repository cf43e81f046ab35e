"""The end of `lsdr demo`: linear probe and invariance table of the trained backbone against the
same architecture at random initialisation; and the text tables the CLI prints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lsdr_repr.backbone import load_trained_backbone, random_backbone
from lsdr_repr.eval.cache import Evaluator
from lsdr_repr.eval.frozen import linear_probe
from lsdr_repr.eval.invariance import invariance_eval
from lsdr_repr.eval.plots import invariance_plot
from lsdr_repr.eval.results import results_dir_for, write_result

INVARIANCE_LEGEND = ("cosine(image, transformed) / the same centred / retrieval top-1 of the "
                     "transformed copy among the originals (Kornia's rotate, scale and "
                     "brightness; zero and reflection fill)")


def demo_report(
    run_dir: str | Path,
    train_shards: str,
    eval_shards: str,
    *,
    device: str = "auto",
    max_invariance_images: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear probe of the trained backbone vs the same architecture at random init, and the
    invariance table of both, on the held-out `eval_shards` (written to RUN_DIR/eval/demo.json)."""
    trained = load_trained_backbone(run_dir)
    results = results_dir_for(trained, None)
    ev = Evaluator(trained, results, device, batch_size=128, num_workers=2, progress=progress)
    baseline = random_backbone(trained, seed=0).to(ev.device)
    random_key = f"random-init:{trained.arch}:seed0:{trained.cache_key()}"
    report: dict[str, Any] = {"arch": trained.arch, "step": trained.step,
                              "checkpoint": str(trained.checkpoint), "linear": {},
                              "invariance": {}}
    for name, model, key in (("trained", trained.backbone, None),
                             ("random_init", baseline, random_key)):
        tr = ev.features(train_shards, model, key).labelled(train_shards)
        te = ev.features(eval_shards, model, key).labelled(eval_shards)
        res = linear_probe(ev, tr, te)
        report["linear"][name] = res.metrics()
        # labels are 0..K-1: K is what a classifier head on this data needs
        report["num_classes"] = int(max(tr.y.max(), te.y.max())) + 1
        report["invariance"][name] = invariance_eval(
            ev, eval_shards, max_images=max_invariance_images, reference=tr.x,
            backbone=model)["table"]
    plot = invariance_plot(report["invariance"], f"{trained.arch} after {trained.step} steps: "
                           "retrieval under Kornia's transforms")
    write_result(results, "demo", {"metrics": {
        "linear_top1_trained": report["linear"]["trained"]["top1"],
        "linear_top1_random_init": report["linear"]["random_init"]["top1"]}, **report}, trained,
        plots={"invariance": plot})
    if results is not None:
        report["invariance_plot"] = str(results / "demo_invariance.png")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The demo report as text tables."""
    lines = [(f"{report['arch']} after {report['step']} steps"
             f" ({Path(str(report['checkpoint'])).name})"), ""]
    rows = [[name, f"{m['top1']:.3f}", f"{m['top5']:.3f}", f"{m['weight_decay']:g}"]
            for name, m in report["linear"].items()]
    lines += ["linear probe on the held-out split",
              format_table(["backbone", "top1", "top5", "weight decay"], rows), ""]
    for name, table in report["invariance"].items():
        lines += [f"invariance ({name}): {INVARIANCE_LEGEND}",
                  format_invariance(table), ""]
    if report.get("invariance_plot"):
        lines.append(f"invariance plot (retrieval against strength): {report['invariance_plot']}")
    return "\n".join(lines).rstrip() + "\n"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*map(str, row)) for row in rows]
    return "\n".join(out)


def format_invariance(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows: transform/fill; columns: its strengths, cells "cosine / centred / retrieval"."""
    width = max((len(cells) for cells in table.values()), default=0)
    rows = []
    for name, cells in table.items():
        row = [name] + [f"{level}: {c['cosine']:.3f} / {c['cosine_centered']:.3f} / "
                        f"{c['retrieval_top1']:.2f}" for level, c in cells.items()]
        rows.append(row + [""] * (width + 1 - len(row)))
    return format_table(["transform"] + [f"strength {i + 1}" for i in range(width)], rows)


def format_metrics(name: str, metrics: dict[str, Any]) -> str:
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in metrics.items()]
    return format_table([name, "value"], rows)
