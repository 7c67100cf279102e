"""Reliability diagrams: ``reliability[-det]-<cell>``, one panel per method, accuracy per confidence bin."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from mpbench.evals import metric_info
from mpbench.figures.common import Plot, figure, save


def pool_bins(tables: list[list[dict]]) -> list[dict]:
    """Reliability bins of several runs pooled: counts added, mean confidence and accuracy weighted by count."""
    pooled: dict[tuple, list[float]] = {}
    for table in tables:
        for b in table:
            acc = pooled.setdefault((round(b["lo"], 9), round(b["hi"], 9)), [0, 0.0, 0.0])
            if b.get("count"):
                acc[0] += b["count"]
                acc[1] += b["count"] * b["conf"]
                acc[2] += b["count"] * b["acc"]
    return [{"lo": lo, "hi": hi, "count": n, "conf": c / n if n else None, "acc": a / n if n else None}
            for (lo, hi), (n, c, a) in sorted(pooled.items())]


def reliability(plot: Plot, cell: tuple, out: Path, det: bool = False) -> list[Path]:
    """``reliability[-det]-<cell>``: one panel per method, accuracy per confidence bin vs the diagonal."""
    key, ece_key = ("reliability_det", "ece_det") if det else ("reliability", "ece")
    panels = []
    for method, runs in plot.by_method(cell):
        tables = [t for t in runs.get(key, pd.Series(dtype=object)) if isinstance(t, list) and t]
        if tables:
            ece = runs[ece_key].dropna() if ece_key in runs else pd.Series(dtype=float)
            panels.append((method, pool_bins(tables), float(ece.mean()) if len(ece) else math.nan, len(tables)))
    if not panels:
        return []
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = figure(0.35 + 1.1 * nrows, ncols, nrows, sharex=True, sharey=True)
    for ax, (method, bins, ece, n) in zip(axes.ravel(), panels):
        colour, _ = plot.style[method]
        full = [b for b in bins if b["count"]]
        lo = np.array([b["lo"] for b in full])
        width = np.array([b["hi"] - b["lo"] for b in full])
        acc, conf = np.array([b["acc"] for b in full]), np.array([b["conf"] for b in full])
        ax.bar(lo, acc, width=width, align="edge", color=colour, edgecolor="#333333", linewidth=0.3,
               label=plot.name(method))
        ax.bar(lo, conf - acc, bottom=acc, width=width, align="edge", color="none", edgecolor="#888888",
               hatch="/////", linewidth=0.3)
        ax.plot([0, 1], [0, 1], color="#444444", linestyle="--", linewidth=0.6)
        text = [f"ECE {ece * metric_info(ece_key).scale:.1f}%"] if math.isfinite(ece) else []
        text += [f"{n} run{'s' if n > 1 else ''}"] if len({p[3] for p in panels}) > 1 else []
        ax.set_title("\n".join([textwrap.fill(plot.name(method), 17), ", ".join(text)]), pad=2)  # never over bars
        ax.set(xlim=(0, 1), ylim=(0, 1), xticks=[0, 0.5, 1], yticks=[0, 0.5, 1], aspect="equal")
        ax.set_xticklabels(["0", ".5", "1"])
        ax.set_yticklabels(["0", ".5", "1"])
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.supxlabel("confidence")
    fig.supylabel("accuracy")
    seeds = {p[3] for p in panels}
    fig.suptitle(plot.title(cell) + (", deterministic pass" if det else "") +
                 (f": {seeds.pop()} runs pooled" if len(seeds) == 1 else ": runs pooled"))
    return save(fig, out, f"reliability{'-det' if det else ''}-{plot.slug(cell)}")


def differs(plot: Plot, cell: tuple) -> bool:
    runs = plot.done[plot.done["_cell"] == cell]
    if "reliability_det" not in runs or "reliability" not in runs:
        return False
    return any(isinstance(a, list) and isinstance(b, list) and a != b
               for a, b in zip(runs["reliability"], runs["reliability_det"]))
