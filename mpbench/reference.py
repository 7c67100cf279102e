"""A paper's own numbers beside ours: ``results/paper/<suite>.csv`` (or ``report --reference FILE``), typed from the
paper with page and table cited (``results/paper/README.md``). mpbench ships none; a report shows each cell's
difference to the reference when one is present."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pandas as pd

from mpbench.errors import UsageError

COLUMNS = ("row", "column", "value", "source")


def load(path: Path) -> dict[tuple[str, str], tuple[float, str]]:
    """``(row, column) -> (value, source)``; ``column`` joins the table's column keys with ``/`` (raw names, as in
    ``report --format csv``); values in the table's unit (accuracy in %)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"reference table {path} is unreadable ({type(e).__name__}): fix or remove it") from None
    if rows and not set(COLUMNS) <= set(rows[0]):
        raise UsageError(f"reference table {path} needs the columns {', '.join(COLUMNS)} (see results/paper/README.md)")
    out = {}
    for i, r in enumerate(rows, start=2):
        if not (r["source"] or "").strip():
            raise UsageError(f"{path} line {i}: every reference value needs its source (page and table of the paper)")
        try:
            out[(r["row"], r["column"])] = (float(r["value"]), r["source"].strip())
        except ValueError:
            raise UsageError(f"{path} line {i}: value {r['value']!r} is not a number") from None
    return out


def attach(agg: pd.DataFrame, ref: dict[tuple[str, str], tuple[float, str]]) -> int:
    """Add a ``ref`` column (NaN where the paper has no number); returns how many cells have one."""
    rows, columns = agg.attrs["rows"], agg.attrs["columns"]
    keys = agg.index.to_frame(index=False)
    values = []
    for _, k in keys.iterrows():
        row = "/".join(str(k[c]) for c in rows)
        col = "/".join(str(k[c]) for c in columns)
        values.append(ref.get((row, col), (math.nan, ""))[0])
    agg["ref"] = values
    return int(pd.Series(values).notna().sum())
