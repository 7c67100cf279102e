"""Accuracy vs eps (MetaPerturb's Figure 6 layout): ``robustness-<cell>``, one panel per norm."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mpbench.figures.common import Plot, band, band_alpha, figure, legend, legend_height, limits, line, save, seeds_note

NORMS = (("robust_linf", r"$\ell_\infty$"), ("robust_l2", r"$\ell_2$"), ("robust_l1", r"$\ell_1$"))


def robust_series(run: pd.Series, key: str) -> dict[float, float]:
    """``{eps: accuracy in %}`` of one run's ``key`` array, starting at eps = 0 with the clean accuracy of the same
    images (``robust_clean_acc``) when the array has no eps = 0 of its own; {} when the run has no such array."""
    arr = run.get(key)
    s = {float(p["eps"]): float(p["acc"]) * 100 for p in arr if isinstance(p, dict)
         and isinstance(p.get("eps"), (int, float)) and isinstance(p.get("acc"), (int, float))} \
        if isinstance(arr, list) else {}
    clean = run.get("robust_clean_acc")
    if s and 0.0 not in s and isinstance(clean, (int, float)) and math.isfinite(clean):
        s[0.0] = float(clean) * 100
    return s


def robustness(plot: Plot, cell: tuple, out: Path) -> list[Path]:
    """``robustness-<cell>``: accuracy vs eps, one panel per recorded norm, one line per method."""
    norms, counts = [], []
    for key, norm in NORMS:
        lines = []
        for method, runs in plot.by_method(cell):
            series = [s for _, run in runs.iterrows() if (s := robust_series(run, key))]
            if series:
                lines.append((method, *band(series)))
                counts.append(len(series))
        if lines:
            norms.append((norm, lines))
    if not norms:
        return []
    methods = sorted({m for _, lines in norms for m, *_ in lines}, key=plot.order.get)
    fig, axes = figure(1.6 + legend_height([plot.name(m) for m in methods]), len(norms), 1, sharey=True)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    for ax, (norm, lines) in zip(axes[0], norms):
        for method, x, mean, ci in lines:
            line(ax, plot, method, x, mean, ci, True, (0.0, 100.0), band_alpha(len(lines)))
        ax.set_title(norm, pad=2)
        ax.set_xlabel(r"$\epsilon$", labelpad=1)
        ax.xaxis.set_major_locator(MaxNLocator(3, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}".replace("0.", ".", 1) if 0 < abs(v) < 1
                                                   else f"{v:.3g}"))
        ax.grid(True, alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (%)")
    limits(axes[0, 0], [line for _, lines in norms for line in lines], (0.0, 100.0))
    fig.suptitle(f"{plot.title(cell)}: {seeds_note(counts)}")
    legend(fig, axes)
    return save(fig, out, f"robustness-{plot.slug(cell)}")
