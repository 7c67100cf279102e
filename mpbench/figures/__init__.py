"""Paper figures of a suite's runs (``mpbench report suite=NAME --plot DIR``), each as PNG and PDF at paper column
width (3.25 in, fonts of 7 pt), one set per report cell (the report's ``columns``, by default model x dataset):

- ``curves-acc-<cell>``: test accuracy vs step (every evaluation row of ``metrics.jsonl``), one line per method,
  mean over seeds with its 95 % CI band (Student t, as the table); ``curves-loss-<cell>``: training loss vs step
  from the training rows (``split: train``), or, for runs written before those rows existed, the training loss
  that each evaluation row carries; ``curves-<metric>-<cell>`` too when the report's ``metric=`` is another
  scalar of the evaluation rows (nll, ece).
- ``reliability-<cell>``: one panel per method, accuracy per confidence bin (bars as wide as the bins) against
  the diagonal, the gap to each bin's mean confidence hatched; the bins of all the cell's seeds pooled (counts
  added), the panel's ECE the mean over seeds as in the table. ``reliability-det-<cell>``: the same for the
  deterministic pass, written when a stochastic method makes it differ.
- ``robustness-<cell>``: Figure 6's layout, one panel per norm (l_inf, l_2, l_1; those recorded), accuracy vs
  eps, one line per method, mean with its 95 % CI band over seeds.

Runs are selected as the report selects them (``--only-last``, ``--invocation``), only ``done`` runs are drawn,
rows are labelled as in the table (display names, ``report.labels``, variant keys), and each method keeps one
colour (and marker) in every figure: the table's row order through a colour-blind-safe palette (Okabe & Ito).
"""
from __future__ import annotations

from pathlib import Path

from mpbench.errors import UsageError
from mpbench.evals import metric_info
from mpbench.figures.common import STYLE, Plot, band
from mpbench.figures.curves import curves, read_rows, smooth
from mpbench.figures.reliability import differs, pool_bins, reliability
from mpbench.figures.robustness import robust_series, robustness

__all__ = ["Plot", "band", "curves", "pool_bins", "read_rows", "reliability", "robust_series", "robustness",
           "smooth", "write_figures"]


def write_figures(results_dir: Path, out_dir: Path, suite: str | None = None, rows: list[str] | None = None,
                  columns: list[str] | None = None, metric: str | None = None, only_last: bool = False,
                  invocation: str | None = None) -> list[Path]:
    """Every figure of the report's runs under ``out_dir`` (created); returns the files written, PNG and PDF."""
    import matplotlib

    plot = Plot(Path(results_dir), suite, rows, columns, only_last, invocation)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {out}: {e.strerror or e}") from None
    quantities = ["acc", "loss"] + ([metric] if metric and metric not in ("acc", "loss")
                                   and metric_info(metric).kind == "scalar" else [])
    written: list[Path] = []
    with matplotlib.rc_context(STYLE):
        for cell in plot.cells:
            for q in quantities:
                written += curves(plot, cell, out, q)
            written += reliability(plot, cell, out)
            if differs(plot, cell):
                written += reliability(plot, cell, out, det=True)
            written += robustness(plot, cell, out)
    return written
