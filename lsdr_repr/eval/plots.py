"""Figures of the evaluations: the eigenvalue spectrum and retrieval against strength."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def plot_spectrum(eigenvalues: torch.Tensor, path: Path, title: str,
                  num_samples: int | None = None, rankme: float | None = None) -> Path:
    """Log-scale eigenvalue spectrum [F] (descending) as a PNG: the trainer's plot
    (`tracking.spectrum_plot`: the resolvable eigenvalues, the rank marked, RankMe)."""
    from PIL import Image

    from lsdr_repr.tracking import spectrum_plot

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(spectrum_plot(eigenvalues, title, num_samples, rankme)).save(path)
    return path


def invariance_plot(tables: dict[str, dict[str, dict[str, dict[str, float]]]],
                    title: str = "") -> Any:
    """Retrieval top-1 against transform strength, one line per transform (and fill), one panel
    per backbone in `tables` ({"trained": table, "random_init": table}) -> uint8 [H,W,3]."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(tables) + 2.6, 4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(tables), sharey=True, squeeze=False)[0]
    for ax, (name, table) in zip(axes, tables.items(), strict=True):
        for row, cells in table.items():
            levels = list(cells)
            values = [cells[level]["retrieval_top1"] for level in levels]
            # the strengths differ per transform (degrees, factors): named in the legend
            ax.plot(range(1, len(levels) + 1), values, marker="o",
                    label=f"{row} ({', '.join(levels)})",
                    linestyle="--" if row.endswith("/reflection") else "-")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("strength (1 = mildest)")
        ax.set_xticks(range(1, max(len(c) for c in table.values()) + 1))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("retrieval top-1 (finds its original)")
    handles, labels = axes[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.5 / fig.get_figwidth(), 1))
    # beside the panels, not over the lines
    fig.legend(handles, labels, loc="center right", fontsize=7, title="transform (strengths)",
               title_fontsize=7, frameon=False)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
