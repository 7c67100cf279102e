"""What every figure shares: the report's runs with their labels, colours and markers, the paper style (3.25 in,
7 pt), mean and 95 % CI bands over seeds, the legend under the panels, and saving as PNG and PDF."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpbench.display import display, registry_labels
from mpbench.errors import UsageError, did_you_mean
from mpbench.record import report_selection
from mpbench.report import grouped, ci95, split_variants
from mpbench.results import load_runs

WIDTH = 3.25                       # inches: one column of a two-column paper
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")  # Okabe & Ito
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "figure.titlesize": 7, "lines.linewidth": 1.0, "lines.markersize": 3,
         "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "grid.linewidth": 0.4,
         "axes.spines.top": False, "axes.spines.right": False, "pdf.fonttype": 42, "ps.fonttype": 42,
         "savefig.dpi": 300, "legend.frameon": False}


class Plot:
    """The done runs of a report, labelled and coloured as the table shows them."""

    def __init__(self, results_dir: Path, suite: str | None = None, rows: list[str] | None = None,
                 columns: list[str] | None = None, only_last: bool = False, invocation: str | None = None):
        run_ids, layout, _ = report_selection(results_dir, suite, only_last, invocation)
        self.rows = list(rows or layout.get("rows") or ["regularizer"])
        self.columns = list(columns if columns is not None else layout.get("columns", ["model", "dataset"]))
        self.results = Path(results_dir)
        df, _ = load_runs(self.results, run_ids)
        for key in (*self.rows, *self.columns):
            if key not in df.columns:
                raise UsageError(f"unknown report key {key!r}: {did_you_mean(key, df.columns)}")
        df, _ = split_variants(df, self.rows, self.columns)
        self.labels = {**registry_labels(), **(layout.get("labels") or {})}
        df = df.assign(_method=[tuple(r) for r in df[self.rows].astype(str).itertuples(index=False)],
                       _cell=[tuple(r) for r in df[self.columns].astype(str).itertuples(index=False)])
        methods = grouped(list(dict.fromkeys(df["_method"]))) if len(df) else []
        self.style = {m: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}
        self.order = {m: i for i, m in enumerate(methods)}
        self.cells = grouped(list(dict.fromkeys(df["_cell"]))) if len(df) else []
        self.done = df[df["state"] == "done"]

    def name(self, method: tuple) -> str:
        return " / ".join(display(v, self.labels) for v in method)

    def title(self, cell: tuple) -> str:
        return ", ".join(display(v, self.labels) for v in cell) if cell else "all runs"

    @staticmethod
    def slug(cell: tuple) -> str:
        return "-".join(re.sub(r"[^A-Za-z0-9_.+=-]+", "_", v) for v in cell) or "all"

    def by_method(self, cell: tuple) -> list[tuple[tuple, pd.DataFrame]]:
        runs = self.done[self.done["_cell"] == cell]
        return sorted(((m, g) for m, g in runs.groupby("_method", sort=False)), key=lambda mg: self.order[mg[0]])


def band(series: list[dict[float, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, 95 % CI half-width, NaN where fewer than 2 runs) over runs' ``{x: y}`` at each x any run has."""
    xs = np.array(sorted({x for s in series for x in s}), dtype=float)
    vals = [np.array([s[x] for s in series if x in s and math.isfinite(s[x])], dtype=float) for x in xs]
    keep = np.array([len(v) > 0 for v in vals], dtype=bool)
    mean = np.array([v.mean() if len(v) else math.nan for v in vals])
    ci = np.array([ci95(v) if len(v) else math.nan for v in vals])
    return xs[keep], mean[keep], ci[keep]


def figure(height: float, ncols: int = 1, nrows: int = 1, **kw: Any):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def line(ax, plot: Plot, method: tuple, x, mean, ci, markers: bool, bounds=(-np.inf, np.inf),
          alpha: float = 0.15) -> None:
    """The method's mean line (its colour and marker) and its 95 % band, clipped to the quantity's range."""
    colour, marker = plot.style[method]
    ax.plot(x, mean, color=colour, marker=marker, label=plot.name(method),
            markevery=None if markers else max(1, len(x) // 8))
    if np.isfinite(ci).any():
        ax.fill_between(x, np.clip(mean - ci, *bounds), np.clip(mean + ci, *bounds), color=colour, alpha=alpha,
                        linewidth=0)


def limits(ax, lines: list[tuple], bounds: tuple[float, float]) -> None:
    """y range of the means, widened to their bands by at most 30 % of their spread (two seeds' t-interval is
    12.7 standard errors wide: it must not flatten the lines), within the quantity's range."""
    means = np.concatenate([m for _, _, m, _ in lines])
    lows = np.concatenate([m - np.nan_to_num(c) for _, _, m, c in lines])
    highs = np.concatenate([m + np.nan_to_num(c) for _, _, m, c in lines])
    lo, hi = float(np.nanmin(means)), float(np.nanmax(means))
    span = hi - lo or max(abs(hi), 1.0) * 0.05
    ymin = max(min(float(np.nanmin(lows)), lo - 0.05 * span), lo - 0.3 * span, bounds[0])
    ymax = min(max(float(np.nanmax(highs)), hi + 0.05 * span), hi + 0.3 * span, bounds[1])
    ax.set_ylim(ymin, ymax)


def band_alpha(n_lines: int) -> float:
    """Band opacity: overlapping bands of many methods stay see-through."""
    return min(0.18, 0.5 / max(1, n_lines))


def seeds_note(counts: list[int]) -> str:
    lo, hi = min(counts), max(counts)
    return f"mean, 95% CI band over {lo if lo == hi else f'{lo}-{hi}'} seed{'s' if hi > 1 else ''}"


def legend_cols(names: list[str]) -> int:
    return 3 if max(map(len, names), default=0) <= 14 else 2


def legend_height(names: list[str]) -> float:
    """Inches a legend of ``names`` takes under the panels (7 pt rows)."""
    return 0.05 + 0.135 * math.ceil(len(names) / legend_cols(names))


def legend(fig, axes) -> None:
    """One legend under the panels: every method once, in the table's order."""
    handles = {}
    for ax in np.ravel(axes):
        for h, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=legend_cols(list(handles)),
                   handlelength=1.8, columnspacing=1.0, borderaxespad=0.1, labelspacing=0.3)


def save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    return paths
