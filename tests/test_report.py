"""Results loading and report rendering over the handwritten fixture in tests/fixtures/results.

Golden files live in tests/golden/fixture.{txt,tex,md,csv}. After an intended output change, regenerate
them with ``MPBENCH_UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_report.py`` and review the diff.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from mpbench.errors import UsageError
from mpbench.report import aggregate, best_mask, build_report, prepare_report, render, render_rich
from mpbench.results import load_runs, load_suite

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "results"
GOLDEN = HERE / "golden"
EXT = {"table": "txt", "latex": "tex", "markdown": "md", "csv": "csv"}
T_975_2 = 4.302652729911275  # Student t quantile t(0.975, df=2), from any t table
CORRUPT = "dropout-wrn16_4-digits-s1-204bcbff"
NEWER = "dropout-wrn16_4-digits-s2-f4f74686"
FAILED = "metaperturb-resnet20-digits-s2-cea443f5"


def frame(values: dict[tuple[str, str], list[float | None]], metric: str = "acc") -> pd.DataFrame:
    """Synthetic runs frame: {(regularizer, model): [value per seed; None = failed run]}."""
    rows = []
    for (reg, model), vals in values.items():
        for seed, v in enumerate(vals):
            rows.append({"id": f"{reg}-{model}-digits-s{seed}", "regularizer": reg, "model": model,
                         "dataset": "digits", "seed": seed, "state": "failed" if v is None else "done",
                         metric: math.nan if v is None else v})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fmt", list(EXT))
def test_golden(fmt: str) -> None:
    text, skipped = build_report(FIXTURE, "fixture", fmt)
    path = GOLDEN / f"fixture.{EXT[fmt]}"
    if os.environ.get("MPBENCH_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
    assert sorted(name for name, _ in skipped) == [CORRUPT, NEWER]


def test_ci_matches_hand_computation() -> None:
    agg = aggregate(frame({("base", "m"): [0.70, 0.72, 0.74]}), ["regularizer"], ["model"], "acc", None)
    cell = agg.iloc[0]
    assert cell["mean"] == pytest.approx(72.0)
    assert cell["ci"] == pytest.approx(T_975_2 * 2.0 / math.sqrt(3), rel=1e-9)
    assert cell["ci"] == pytest.approx(4.968275, abs=1e-6)
    assert (cell["n"], cell["n_done"], cell["n_failed"], cell["n_expected"]) == (3, 3, 0, 3)
    assert "72.00 ± 4.97" in render(agg, "markdown", metric="acc", footer={})


def test_single_seed_has_no_ci_and_shows_count() -> None:
    agg = aggregate(frame({("base", "m"): [0.83]}), ["regularizer"], ["model"], "acc", 3)
    assert math.isnan(agg.iloc[0]["ci"])
    assert "83.00 (1/3)" in render(agg, "markdown", metric="acc", footer={})


@pytest.mark.parametrize("metric,values,best", [
    ("acc", {"a": 0.095, "b": 0.101, "c": 0.099}, "b"),   # 9.50 % vs 10.10 %: "9.50" > "10.10" as strings
    ("nll", {"a": 9.5, "b": 10.1, "c": 11.0}, "a"),       # lower is better; "10.1" < "9.5" as strings
])
def test_bold_is_numeric_best(metric: str, values: dict[str, float], best: str) -> None:
    df = frame({(reg, "m"): [v, v] for reg, v in values.items()}, metric)
    agg = aggregate(df, ["regularizer"], ["model"], metric, None)
    mask = best_mask(agg, metric)
    assert mask["m"].to_dict() == {reg: reg == best for reg in values}
    md = render(agg, "markdown", metric=metric, footer={})
    bold = [line for line in md.splitlines() if "**" in line]
    assert len(bold) == 1 and bold[0].startswith(f"| {best} ")
    assert "\\textbf{" in render(agg, "latex", metric=metric, footer={})


def test_failed_runs_are_counted_not_averaged() -> None:
    agg = aggregate(frame({("mp", "m"): [0.78, 0.80, None], ("all", "m"): [None, None, None]}),
                    ["regularizer"], ["model"], "acc", None)
    mp, dead = agg.loc[("mp", "m")], agg.loc[("all", "m")]
    assert mp["mean"] == pytest.approx(79.0) and (mp["n"], mp["n_failed"], mp["n_expected"]) == (2, 1, 3)
    assert math.isnan(dead["mean"]) and dead["n_failed"] == 3
    md = render(agg, "markdown", metric="acc", footer={})
    assert "79.00 ± 12.71 (2/3)" in md and "– (0/3)" in md


def test_fixture_aggregate_and_footer() -> None:
    agg, footer, skipped = prepare_report(FIXTURE, "fixture")
    cell = agg.loc[("metaperturb", "resnet20", "digits")]
    assert (cell["n"], cell["n_failed"], cell["n_expected"], cell["failed_ids"]) == (2, 1, 3, [FAILED])
    assert agg.loc[("dropout", "wrn16_4", "digits"), "n"] == 1      # corrupt + newer-schema dirs not counted
    assert footer["failed runs"] == f"1: {FAILED}"
    assert footer["eval protocol"] == "deterministic, mc1/mc30"
    assert "9b8c7d6e5f (dirty)" in footer["git"] and footer["suite"] == "fixture"
    assert "final" in footer["metric"] and "95% CI" in footer["metric"]
    assert render_rich(agg, "acc", footer).row_count == 2
    by_lr, footer, _ = prepare_report(FIXTURE, "fixture", rows=["regularizer", "train.lr"], columns=[])
    assert by_lr.loc[("metaperturb (model=wrn16_4)", "?"), "n_expected"] == 1   # listed run without dir: lr unknown
    # model left out of the layout: never averaged across models, the rows are split by it instead
    assert by_lr.loc[("metaperturb (model=resnet20)", 0.001), "n"] == 2
    assert by_lr.loc[("metaperturb (model=wrn16_4)", 0.001), "n"] == 2
    assert footer["rows split by"].startswith("model") and "warning" not in footer


def test_load_runs_states_and_unreadable_dirs() -> None:
    ids = load_suite(FIXTURE, "fixture")["runs"]
    df, skipped = load_runs(FIXTURE, ids)
    assert list(df["id"]) == ids                                     # suite order, other suites' runs left out
    reasons = dict(skipped)
    assert set(reasons) == {CORRUPT, NEWER}
    assert "result.json" in reasons[CORRUPT] and "schema 99" in reasons[NEWER]
    assert all("\n" not in r for r in reasons.values())
    state = df.set_index("id")["state"]
    assert state.value_counts().to_dict() == {"done": 13, "missing": 3, "failed": 1, "running": 1}
    assert df.set_index("id").loc[FAILED, "error"] == "RunFailed: loss is NaN at step 120"
    missing = df[df["id"].str.startswith("metaperturb-wrn16_4-digits-s2")].iloc[0]
    assert (missing["state"], missing["model"], missing["seed"]) == ("missing", "wrn16_4", 2)
    done = df[df["state"] == "done"]
    assert set(done["train.lr"]) == {0.001} and done["acc"].notna().all()
    assert set(df["regularizer"]) == {"base", "dropout", "metaperturb"}
    assert len(load_runs(FIXTURE)[0]) == 18                          # every run dir when no ids are given


def test_done_needs_marker_and_result(tmp_path: Path) -> None:
    src = FIXTURE / "runs" / "base-resnet20-digits-s0-e0ad1119"
    run = tmp_path / "runs" / src.name
    shutil.copytree(src, run)
    (run / "done").unlink()
    df, skipped = load_runs(tmp_path)
    assert df.iloc[0]["state"] == "pending" and not skipped and math.isnan(df.iloc[0]["acc"])
    (run / "done").write_text("")
    (run / "status.json").write_text("{not json")
    df, skipped = load_runs(tmp_path)
    assert skipped[0][0] == src.name and df.iloc[0]["state"] == "missing"


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no results for suite nope: run `mpbench run suite=nope` first"):
        load_suite(FIXTURE, "nope")
    with pytest.raises(UsageError, match="did you mean 'model'"):
        build_report(FIXTURE, "fixture", "csv", rows=["modle"])
    with pytest.raises(UsageError, match="unknown report format"):
        build_report(FIXTURE, "fixture", "html")
    with pytest.raises(UsageError, match="no runs"):
        build_report(tmp_path, None, "table")


def test_csv_is_long_and_numeric() -> None:
    text, _ = build_report(FIXTURE, "fixture", "csv")
    import io
    df = pd.read_csv(io.StringIO(text))
    assert {"mean", "ci", "n", "n_done", "n_failed", "n_expected", "best"} <= set(df.columns)
    assert len(df) == 6 and df["mean"].dtype == float
    assert df.loc[(df.regularizer == "base") & (df.model == "resnet20"), "ci"].item() == pytest.approx(4.96828)


def test_latex_compiles(tmp_path: Path) -> None:
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not on PATH (install texlive-latex-base + texlive-latex-recommended to run this)")
    tables = [build_report(FIXTURE, "fixture", "latex")[0],
              build_report(FIXTURE, "fixture", "latex", rows=["model", "regularizer"], columns=["dataset"],
                           metric="ece")[0]]
    doc = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + "\n".join(tables) + \
        "\n\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / "t.pdf").exists()
