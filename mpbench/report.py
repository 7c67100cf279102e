"""Aggregate runs into ``mean ± 95 % CI`` cells and render them as text, LaTeX, Markdown or CSV."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mpbench.display import display, registry_labels
from mpbench.errors import UsageError, did_you_mean
from mpbench.evals import metric_info
from mpbench.plan import NOT_IDENTITY, label_with
from mpbench.record import report_selection
from mpbench.reference import attach as attach_reference, load as load_reference
from mpbench.results import load_runs, metric_columns

FORMATS = ("table", "latex", "markdown", "csv", "json")
DASH = "–"
MAX_LISTED = 10


def label(metric: str) -> str:
    return metric_info(metric).label


def ci95(values: np.ndarray) -> float:
    """Half-width of the 95 % CI of the mean: t(0.975, n-1) * s / sqrt(n); NaN when n < 2."""
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def aggregate(df: pd.DataFrame, rows: list[str], columns: list[str], metric: str,
              expected_seeds: int | None) -> pd.DataFrame:
    """One row per (rows + columns) cell: mean, ci, std, n (values), n_done, n_failed, n_expected.

    Only ``done`` runs are averaged; failed ones are counted. ``n_expected`` is ``expected_seeds`` or the
    number of runs (any state, including ``missing``) in the cell. Cells keep first-appearance order.
    """
    rows, columns = list(rows), list(columns)
    if not rows:
        raise UsageError("report needs at least one row key (e.g. rows=regularizer)")
    for key in [*rows, *columns, metric]:
        if key not in df.columns:
            raise UsageError(f"unknown report key {key!r}: {did_you_mean(key, df.columns)}")
    if not pd.api.types.is_numeric_dtype(df[metric]):
        raise UsageError(f"metric {metric!r} is not a scalar: pick one of {', '.join(metric_columns())}")
    scale = metric_info(metric).scale
    df = df.copy()
    for key in [*rows, *columns]:  # unknown key values (e.g. a missing run without a spec) group as "?"
        if df[key].isna().any():
            df[key] = df[key].astype(object).where(df[key].notna(), "?")
    records = []
    for key, g in df.groupby([*rows, *columns], sort=False, dropna=False):
        done = g["state"] == "done"
        vals = (g.loc[done, metric].dropna().to_numpy(dtype=float)) * scale
        failed = g.loc[g["state"] == "failed", "id"].tolist()
        records.append({
            **dict(zip([*rows, *columns], key)),
            "mean": float(vals.mean()) if len(vals) else math.nan, "ci": ci95(vals),
            "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, "n": len(vals),
            "n_done": int(done.sum()), "n_failed": len(failed),
            "n_expected": int(expected_seeds) if expected_seeds else len(g),
            "failed_ids": failed, "pooled": bool(g["seed"].dropna().duplicated().any()),
        })
    agg = pd.DataFrame(records, columns=[*rows, *columns, "mean", "ci", "std", "n", "n_done", "n_failed",
                                         "n_expected", "failed_ids", "pooled"])
    agg["best"] = _best(agg, columns, metric)
    agg = agg.set_index([*rows, *columns])
    agg.attrs.update(rows=rows, columns=columns, metric=metric)
    return agg


def _best(agg: pd.DataFrame, columns: list[str], metric: str) -> pd.Series:
    """True where the mean is the numerically best of its table column (ties all True; unranked metric: none)."""
    direction = metric_info(metric).direction
    if direction is None or agg.empty:
        return pd.Series(False, index=agg.index)
    means = agg["mean"].astype(float)
    groups = means.groupby([agg[c] for c in columns], sort=False, dropna=False) if columns else means.groupby(
        lambda _: 0)
    best = groups.transform("max" if direction == "higher" else "min")
    return means.eq(best) & means.notna()


def grouped(keys: list[tuple]) -> list[tuple]:
    """``keys`` stably sorted by the first appearance of each level's value, outer level first."""
    order = [{v: i for i, v in enumerate(dict.fromkeys(k[lvl] for k in keys))} for lvl in range(len(keys[0]))] \
        if keys else []
    return sorted(keys, key=lambda k: tuple(order[lvl][v] for lvl, v in enumerate(k)))


def _wide(agg: pd.DataFrame, field: str, metric: str) -> pd.DataFrame:
    """Pivot ``field`` to rows x columns: labels in first-appearance order, grouped level by level (all columns of
    the first dataset, then the next, when ``columns`` is [dataset, model])."""
    rows, columns = agg.attrs["rows"], agg.attrs["columns"]
    flat = agg.reset_index()
    rkeys = grouped(list(dict.fromkeys(map(tuple, flat[rows].itertuples(index=False)))))
    ckeys = grouped(list(dict.fromkeys(map(tuple, flat[columns].itertuples(index=False))))) if columns else \
        [(label(metric),)]
    lookup = {(tuple(r[: len(rows)]), tuple(r[len(rows):-1]) if columns else (label(metric),)): r[-1]
              for r in flat[[*rows, *columns, field]].itertuples(index=False)}
    data = [[lookup.get((rk, ck), math.nan) for ck in ckeys] for rk in rkeys]
    index = pd.MultiIndex.from_tuples(rkeys, names=rows) if len(rows) > 1 else \
        pd.Index([k[0] for k in rkeys], name=rows[0])
    cols = pd.MultiIndex.from_tuples(ckeys, names=columns) if len(columns) > 1 else \
        pd.Index([k[0] for k in ckeys], name=columns[0] if columns else None)
    return pd.DataFrame(data, index=index, columns=cols, dtype=object)


def best_mask(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Wide boolean frame of the ``best`` cells."""
    return _wide(agg, "best", metric).fillna(False).astype(bool)


def cell_text(mean: float, ci: float, n: int, expected: int, dec: int, *, pm: str = "±", dash: str = DASH) -> str:
    """``72.00 ± 4.97``, ``71.20 ± 3.10 (2/3)``, ``72.00 (1/3)`` (n=1: no CI) or ``– (0/3)``."""
    count = f" ({n}/{expected})" if n < expected else ""
    if math.isnan(mean):
        return f"{dash} (0/{expected})"
    text = f"{mean:.{dec}f}" + (f" {pm} {ci:.{dec}f}" if not math.isnan(ci) else "")
    return text + count


def cells(agg: pd.DataFrame, metric: str, **kw: str) -> pd.DataFrame:
    """Wide frame of formatted cell strings (with ``[+1.23]``, the difference to the paper, where one is given)."""
    fields = ("mean", "ci", "n", "n_expected", "ref") if "ref" in agg.columns else ("mean", "ci", "n", "n_expected")
    parts = [_wide(agg, f, metric) for f in fields]
    dec = metric_info(metric).decimals
    out = parts[0].copy()
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            mean, ci, n, exp, *ref = (float(p.iat[i, j]) for p in parts)
            text = kw.get("dash", DASH) if math.isnan(exp) else cell_text(mean, ci, int(n), int(exp), dec, **kw)
            if ref and not math.isnan(ref[0]) and not math.isnan(mean):
                text += f" [{mean - ref[0]:+.{dec}f}]"
            out.iat[i, j] = text
    return out


def displayed(agg: pd.DataFrame, metric: str, **kw: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(cell strings, best mask) as a reader sees them: display names (``agg.attrs["labels"]``) and the per-row
    statistics (``agg.attrs["row_info"]``: column -> {row key: text}) in front of the metric columns."""
    disp, mask = cells(agg, metric, **kw), best_mask(agg, metric)
    for pos, (col, by_row) in enumerate(agg.attrs.get("row_info", {}).items()):
        key = col if disp.columns.nlevels == 1 else (col, *[""] * (disp.columns.nlevels - 1))
        keys = [k if isinstance(k, tuple) else (k,) for k in disp.index]
        disp.insert(pos, key, [by_row.get(k, kw.get("dash", DASH)) for k in keys])
        mask.insert(pos, key, False)
    labels = agg.attrs.get("labels") or {}
    rename = lambda v: display(v, labels)  # noqa: E731
    disp, mask = (f.rename(index=rename, columns=rename) for f in (disp, mask))
    return disp, mask


def _flat(frame: pd.DataFrame) -> pd.DataFrame:
    """Row keys become ordinary columns; multi-level column labels are joined with ' / '."""
    flat = frame.copy()
    flat.columns = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in flat.columns]
    names = [str(n) for n in frame.index.names]
    flat.index = frame.index.set_names(names)
    return flat.reset_index()


def latex_escape(text: Any) -> str:
    """Escape LaTeX specials in a label."""
    out = str(text).replace("\\", r"\textbackslash{}")
    for ch in "&%$#_{}":
        out = out.replace(ch, "\\" + ch)
    return out.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}").replace("–", "--")


def _to_latex(agg: pd.DataFrame, metric: str, footer: dict[str, str]) -> str:
    disp, mask = displayed(agg, metric, pm=r"$\pm$", dash="--")
    disp.index = disp.index.set_names([latex_escape(n) for n in disp.index.names])
    disp.columns = disp.columns.set_names([latex_escape(n) if n is not None else None for n in disp.columns.names])
    styler = disp.style.format_index(latex_escape, axis=0).format_index(latex_escape, axis=1)
    styler = styler.apply(lambda _: np.where(mask.to_numpy(), "textbf:--rwrap;", ""), axis=None)
    fmt = "l" * disp.index.nlevels + "r" * disp.shape[1]
    body = styler.to_latex(hrules=True, column_format=fmt, multirow_align="naive", multicol_align="c")
    notes = [f"% {k}: {v}".replace("±", "+/-").replace("–", "--") for k, v in footer.items()]
    return "".join(n + "\n" for n in notes) + body


def render(agg: pd.DataFrame, fmt: str, *, metric: str, footer: dict[str, str]) -> str:
    """The table as ``table`` (plain text), ``latex`` (booktabs), ``markdown``, ``csv`` (long form) or ``json``."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown report format {fmt!r}: {did_you_mean(fmt, FORMATS)}")
    if fmt == "csv":
        long = agg.drop(columns=["failed_ids", "pooled"])
        long.insert(0, "unit", metric_info(metric).unit)
        long.insert(0, "metric", metric)
        return long.reset_index().to_csv(index=False, float_format="%.6g", lineterminator="\n")
    if fmt == "latex":
        return _to_latex(agg, metric, footer)
    if fmt == "json":
        info = metric_info(metric)
        cells_ = json.loads(agg.drop(columns=["pooled"]).reset_index().to_json(orient="records", double_precision=6))
        return json.dumps({"metric": metric, "display": info.display, "unit": info.unit, "direction": info.direction,
                           "rows": agg.attrs["rows"], "columns": agg.attrs["columns"], "cells": cells_,
                           "footer": footer}, indent=1)
    disp, mask = displayed(agg, metric)
    if fmt == "markdown":
        disp = disp.mask(mask, "**" + disp.astype(str) + "**")
        notes = "".join(f"- {k}: {v}\n" for k, v in footer.items())
        return _flat(disp).to_markdown(index=False, disable_numparse=True) + "\n" + ("\n" + notes if notes else "")
    disp = disp.mask(mask, disp.astype(str) + " *")
    notes = "".join(f"{k}: {v}\n" for k, v in {**footer, "*": "best mean per column"}.items())
    return _flat(disp).to_markdown(index=False, tablefmt="simple", disable_numparse=True) + "\n\n" + notes


def render_rich(agg: pd.DataFrame, metric: str, footer: dict[str, str]):
    """A ``rich.table.Table`` grid: the table (best mean per column in bold) above the footer lines."""
    from rich.table import Table
    from rich.text import Text

    disp, mask = displayed(agg, metric)
    flat, mask = _flat(disp), _flat(mask)
    nkeys = len(agg.attrs["rows"]) + len(agg.attrs.get("row_info", {}))
    table = Table()
    for j, col in enumerate(flat.columns):
        table.add_column(Text(col), justify="left" if j < nkeys else "right")
    for i in range(len(flat)):
        table.add_row(*(Text(str(flat.iat[i, j]), style="bold" if j >= nkeys and bool(mask.iat[i, j]) else "")
                        for j in range(flat.shape[1])))
    grid = Table.grid()
    grid.add_row(table)
    if footer:
        grid.add_row(Text("\n".join(f"{k}: {v}" for k, v in footer.items()), style="dim"))
    return grid


def _listed(items: list[str]) -> str:
    more = f", ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def make_footer(df: pd.DataFrame, agg: pd.DataFrame, metric: str, suite: str | None,
                skipped: list[tuple[str, str]]) -> dict[str, str]:
    """Provenance lines: metric and selection rule, protocols, seeds per cell, failures, git SHAs, suite."""
    done = df[df["state"] == "done"]
    lo, hi = int(agg["n_expected"].min()), int(agg["n_expected"].max())
    incomplete = int((agg["n"] < agg["n_expected"]).sum())
    seeds = (f"{lo}" if lo == hi else f"{lo}-{hi}") + " expected per cell"
    if incomplete:
        seeds += f"; {incomplete} of {len(agg)} cells incomplete (shown as done/expected)"
    failed = df.loc[df["state"] == "failed", "id"].tolist()
    shas = []
    for sha, g in done.groupby("git_sha", sort=True):
        shas.append(str(sha)[:10] + (" (dirty)" if g["git_dirty"].fillna(False).astype(bool).any() else ""))
    footer = {
        "metric": f"{label(metric)} at the final step (selection: final), mean ± 95% CI (Student t, n-1 dof); "
                  "no CI when n=1",
        "eval protocol": ", ".join(sorted(map(str, done["eval_protocol"].dropna().unique()))) or "none",
        "seeds": seeds,
        "failed runs": f"{len(failed)}" + (f": {_listed(failed)}" if failed else ""),
    }
    other = {s: int((df["state"] == s).sum()) for s in ("running", "pending", "missing")}
    if any(other.values()):
        footer["not finished"] = ", ".join(f"{v} {s}" for s, v in other.items() if v)
    if skipped:
        footer["unreadable run dirs"] = f"{len(skipped)} (counted as missing): {_listed([s[0] for s in skipped])}"
    footer["git"] = ", ".join(shas) or "none"
    footer["suite"] = suite or "none (all runs under results/runs)"
    if agg["pooled"].any():
        footer["warning"] = "some cells pool runs that share a seed: add the varying keys to rows/columns"
    return footer


def _varying(df: pd.DataFrame, keys: list[str], by: list[str]) -> list[str]:
    """Those ``keys`` whose value differs between runs of one cell (runs without a spec are unknown, not different)."""
    known = df[df["has_spec"]] if "has_spec" in df.columns else df
    cells = known.groupby([known[c].astype(str) for c in by], sort=False, dropna=False)
    return [k for k in keys if (cells[k].nunique(dropna=False) > 1).any()]


def split_variants(df: pd.DataFrame, rows: list[str], columns: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Runs of one cell must differ by seed only: every spec key that varies within a cell (a crossed
    hyperparameter, or a spec difference between runs) is appended to the first row label, ``dropout (p=0.1)``.
    Stage artifacts are named only where the other keys do not already tell the runs apart. Returns the
    relabelled frame and the keys."""
    layout = {*rows, *columns, "seed"}
    keys = [k for k in df.attrs.get("spec_keys", []) if k in df.columns and k not in layout
            and k.split(".")[-1] not in NOT_IDENTITY]
    if not keys or df.empty or any(k not in df.columns for k in [*rows, *columns]):
        return df, []                                    # (a bad layout key is aggregate's one-line error)
    by, first, varying = [*rows, *columns], rows[0], []
    for group in ([k for k in keys if not k.startswith("artifacts.")], [k for k in keys if k.startswith("artifacts.")]):
        found = _varying(df, group, by)
        if found:
            df = df.copy()
            df[first] = [label_with(str(base), {k: r[k] for k in found})
                         for base, (_, r) in zip(df[first], df[found].iterrows())]
            varying += found
    return df, varying


def _row_info(df: pd.DataFrame, rows: list[str], names: list[str]) -> dict[str, dict[tuple, str]]:
    """Per row label, the distinct values of each run statistic in ``names`` (``82``; ``0-269,034`` if several)."""
    out = {}
    for name in names:
        if name not in df.columns:
            raise UsageError(f"report.row_info names {name!r}, not a column: {did_you_mean(name, df.columns)}")
        info, by_row = metric_info(name), {}
        for key, g in df[df["state"] == "done"].groupby(rows, sort=False):
            vals = sorted(set(g[name].dropna().astype(float)))
            text = [f"{v * info.scale:,.{info.decimals}f}" for v in vals]
            by_row[key if isinstance(key, tuple) else (key,)] = "-".join(text[:: max(1, len(text) - 1)]) or DASH
        out[info.display] = by_row
    return out


def prepare_report(results_dir: Path, suite: str | None = None, rows: list[str] | None = None,
                   columns: list[str] | None = None, metric: str | None = None, only_last: bool = False,
                   invocation: str | None = None, reference: Path | None = None
                   ) -> tuple[pd.DataFrame, dict[str, str], list[tuple[str, str]]]:
    """(aggregate, footer, skipped dirs) using the suite's ``report`` block for unset layout keys."""
    run_ids, layout, covers = report_selection(results_dir, suite, only_last, invocation)
    rows = list(rows or layout.get("rows") or ["regularizer"])
    columns = list(columns if columns is not None else layout.get("columns", ["model", "dataset"]))
    metric = metric or layout.get("metric") or "acc"
    df, skipped = load_runs(Path(results_dir), run_ids)
    if df.empty:
        raise UsageError(f"no runs under {Path(results_dir) / 'runs'}: run `mpbench run suite=<name>` first")
    df, varying = split_variants(df, rows, columns)
    agg = aggregate(df, rows, columns, metric, None)
    agg.attrs["labels"] = {**registry_labels(), **(layout.get("labels") or {})}
    agg.attrs["row_info"] = _row_info(df, rows, list(layout.get("row_info") or []))
    footer = make_footer(df, agg, metric, suite, skipped)
    if covers:
        footer["covers"] = covers
    ref_file = reference or (Path(results_dir) / "paper" / f"{suite}.csv" if suite else None)
    if ref_file is not None and (reference is not None or ref_file.is_file()):
        ref = load_reference(ref_file)
        n = attach_reference(agg, ref)
        sources = sorted({src for _, src in ref.values()})
        footer["reference"] = f"{ref_file}: [±x] = our mean - the paper's, {n} cell(s); from {'; '.join(sources)}"
    if varying:
        footer["rows split by"] = ", ".join(varying) + " (runs of a cell differ by seed only)"
    return agg, footer, skipped


def build_report(results_dir: Path, suite: str | None, fmt: str, rows: list[str] | None = None,
                 columns: list[str] | None = None, metric: str | None = None, only_last: bool = False,
                 invocation: str | None = None, reference: Path | None = None) -> tuple[str, list[tuple[str, str]]]:
    """Rendered report text and the unreadable run dirs that were skipped."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown report format {fmt!r}: {did_you_mean(fmt, FORMATS)}")
    agg, footer, skipped = prepare_report(results_dir, suite, rows, columns, metric, only_last, invocation,
                                          reference)
    return render(agg, fmt, metric=agg.attrs["metric"], footer=footer), skipped
