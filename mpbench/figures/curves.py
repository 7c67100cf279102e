"""Learning curves: ``curves-<metric>-<cell>`` (test accuracy, training loss, the report's metric) vs step."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mpbench.evals import metric_info
from mpbench.figures.common import Plot, band, band_alpha, figure, legend, legend_height, limits, line, save, seeds_note


def read_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(evaluation rows, training rows) of a run's ``metrics.jsonl``; rows without ``split`` are evaluation rows
    (runs written before training rows existed); unreadable lines are skipped."""
    path, evals, train = run_dir / "metrics.jsonl", [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError):
        return [], []
    for text in lines:
        try:
            row = json.loads(text)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            {"eval": evals, None: evals, "train": train}.get(row.get("split"), []).append(row)
    return evals, train


def smooth(s: dict[float, float], points: int = 50) -> dict[float, float]:
    """A dense series (more than ``2 * points`` rows, e.g. a training row per step) as its centred moving average
    over ``len // points`` rows (odd), at the same steps; shorter series are returned as they are."""
    xs = sorted(x for x in s if math.isfinite(s[x]))
    if len(xs) <= 2 * points:
        return s
    half = (len(xs) // points) // 2
    total = np.concatenate([[0.0], np.cumsum([s[x] for x in xs])])
    return {x: (total[min(len(xs), i + half + 1)] - total[max(0, i - half)]) /
            (min(len(xs), i + half + 1) - max(0, i - half)) for i, x in enumerate(xs)}


def curves(plot: Plot, cell: tuple, out: Path, metric: str) -> list[Path]:
    """``curves-<metric>-<cell>``: the metric vs step, mean over seeds with a 95 % band, one line per method."""
    info = metric_info(metric) if metric != "loss" else None
    lines, counts, dense = [], [], False
    for method, runs in plot.by_method(cell):
        series = []
        for run_id in runs["id"]:
            evals, train = read_rows(plot.results / "runs" / run_id)
            rows = (train or evals) if metric == "loss" else evals
            s = {float(r["step"]): float(r[metric]) * (info.scale if info else 1.0) for r in rows
                 if isinstance(r.get(metric), (int, float))}
            if s:
                series.append(s)
        if series:
            dense = dense or max(map(len, series)) > 100
            lines.append((method, *band([smooth(x) for x in series])))
            counts.append(len(series))
    if not lines:
        return []
    bounds = (0.0, 100.0) if info and info.unit == "%" else (0.0, np.inf) if metric in ("loss", "nll") else \
        (-np.inf, np.inf)
    fig, axes = figure(1.75 + legend_height([plot.name(m) for m, *_ in lines]))
    ax = axes[0, 0]
    for method, x, mean, ci in lines:
        line(ax, plot, method, x, mean, ci, len(x) <= 25, bounds, band_alpha(len(lines)))
    limits(ax, lines, bounds)
    ax.set_xlabel("training step")
    ax.set_ylabel(("training loss" + (" (moving average)" if dense else "")) if info is None else
                  f"test {info.display}" + (f" ({info.unit})" if info.unit else ""))
    ax.set_title(f"{plot.title(cell)}: {seeds_note(counts)}")
    ax.grid(True, alpha=0.3)
    legend(fig, axes)
    return save(fig, out, f"curves-{metric}-{plot.slug(cell)}")
