"""Calibration data (reliability bins, ECE) and the paper figures of `mpbench report --plot DIR`."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mpbench.evals.classification import classification_metrics, ece_from_bins, reliability_bins

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _probs(n: int, k: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    labels = torch.where(torch.rand(n, generator=g) < 0.7, logits.argmax(1), torch.randint(0, k, (n,), generator=g))
    return logits.softmax(1), labels


def test_reliability_counts_sum_to_n_and_ece_is_their_weighted_gap():
    probs, labels = _probs(1000, 10, 0)
    out = classification_metrics(probs, labels, bins=15, reliability=True)
    bins = out["reliability"]
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 1000
    assert bins[0]["lo"] == 0.0 and bins[-1]["hi"] == 1.0
    assert all(math.isclose(a["hi"], b["lo"]) for a, b in zip(bins, bins[1:]))
    gap = sum(b["count"] / 1000 * abs(b["acc"] - b["conf"]) for b in bins if b["count"])
    assert out["ece"] == pytest.approx(gap, abs=1e-12)
    conf, pred = probs.max(1)
    for b in bins:                                 # conf and acc are the bin's own means; empty bins are null
        inside = (conf > b["lo"]) & (conf <= b["hi"])
        assert b["count"] == int(inside.sum())
        if b["count"]:
            assert b["lo"] < b["conf"] <= b["hi"]
            assert b["acc"] == pytest.approx((pred[inside] == labels[inside]).double().mean().item())
        else:
            assert b["conf"] is None and b["acc"] is None
    json.dumps(bins)                               # an array metric of result.json
    assert "reliability" not in classification_metrics(probs, labels)   # periodic rows stay scalar


def test_bin_edges_are_lower_open_upper_closed():
    conf = torch.tensor([0.2, 0.2000001, 1.0, 0.5], dtype=torch.float64)
    bins = reliability_bins(conf, torch.tensor([1.0, 0.0, 1.0, 1.0]), bins=5)
    assert [b["count"] for b in bins] == [1, 1, 1, 0, 1]  # 0.2 in (0, .2], 0.5 in (.4, .6], 1.0 in (.8, 1]
    assert ece_from_bins(bins) == pytest.approx(((1 - 0.2) + 0.2000001 + (1 - 0.5) + 0) / 4)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.filterwarnings("ignore:torch.searchsorted")
def test_ece_agrees_with_torchmetrics_on_random_data(seed):
    """mpbench keeps its own binning (see reliability_bins); away from bin edges it is torchmetrics' ECE."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    k = 2 + 7 * seed
    probs, labels = _probs(2000, k, seed, scale=1.0 + seed)
    probs = probs.float()                          # what both see: float32 softmax outputs, as a network gives
    edges = torch.linspace(0, 1, 16, dtype=torch.float64)
    away = (probs.max(1).values.double()[:, None] - edges).abs().min(1).values > 1e-6   # edges: conventions differ
    probs, labels = probs[away], labels[away]
    assert len(labels) > 1900
    ours = classification_metrics(probs, labels, bins=15)["ece"]
    theirs = tm.multiclass_calibration_error(probs, labels, num_classes=k, n_bins=15, norm="l1").item()
    assert ours == pytest.approx(theirs, abs=1e-6)


# ---------------------------------------------------------------- fixture results dirs (no training)

METHODS = ["base", "dropout", "metaperturb"]


def _run(res: Path, method: str, model: str, dataset: str, seed: int, *, robust: bool = True,
         new_rows: bool = True, stochastic: bool = False) -> str:
    slug = f"{method}-{model}-{dataset}-s{seed}"
    run_id = f"{slug}-{hashlib.md5(slug.encode()).hexdigest()[:8]}"
    d = res / "runs" / run_id
    d.mkdir(parents=True)
    spec = {"regularizer": [method], "model": model, "dataset": dataset, "seed": seed, "train": {"steps": 60}}
    (d / "config.yaml").write_text(yaml.safe_dump({"id": run_id, "slug": slug, "kind": "run", "spec": spec}))
    i = METHODS.index(method)
    probs, labels = _probs(300, 10, seed + 10 * i, scale=2.0 + i)
    final = classification_metrics(probs, labels, reliability=True)
    det = classification_metrics(_probs(300, 10, seed + 99, 4.0)[0], labels, reliability=True) if stochastic \
        else final
    final.update({f"{k}_det": v for k, v in det.items()}, passes=1)
    if robust:
        for norm, top in (("linf", 8 / 255), ("l2", 1.0), ("l1", 12.0)):
            final[f"robust_{norm}"] = [{"eps": top * j / 4, "acc": final["acc"] * (1 - j / (5 + i)) - 0.01 * seed}
                                       for j in range(1, 5)]             # eps > 0, as the robustness eval
        final["robust_clean_acc"] = final["acc"]
    (d / "result.json").write_text(json.dumps({"schema": 1, "id": run_id, "slug": slug, "kind": "run",
                                               "spec": spec, "final": final, "eval_protocol": "deterministic",
                                               "git": {"sha": "abc", "dirty": False}, "steps": 60}))
    (d / "status.json").write_text(json.dumps({"schema": 1, "state": "done"}))
    rows = []
    for step in range(10, 61, 10):
        acc = final["acc"] * (1 - math.exp(-step / 20)) + 0.01 * seed
        if new_rows:
            rows.append({"split": "train", "step": step, "loss": 2.3 * math.exp(-step / (30 + i)), "lr": 0.1})
        if step % 20 == 0 or step == 60:
            row = {"step": step, "acc": acc, "nll": 2 - acc, "ece": 0.1, "loss": 2.2 * math.exp(-step / (25 + i))}
            rows.append({"split": "eval", **row, **({"final": True} if step == 60 else {})} if new_rows else row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "done").write_text("")
    return run_id


def _suite(res: Path, name: str, runs: list[str], last: list[str] | None = None) -> None:
    (res / "suites").mkdir(parents=True, exist_ok=True)
    report = {"rows": ["regularizer"], "columns": ["model", "dataset"], "metric": "acc",
              "labels": {"dropout": "Dropout (fixture)"}}
    (res / "suites" / f"{name}.json").write_text(json.dumps({
        "name": name, "description": "fixture", "report": report, "defined": {"runs": runs, "artifacts": []},
        "runs": runs, "artifacts": [], "invocations": ["20250101-000000-1-aaaa"] if last else []}))
    if last:
        inv = res / "suites" / name / "invocations"
        inv.mkdir(parents=True)
        (inv / "20250101-000000-1-aaaa.json").write_text(json.dumps(
            {"id": "20250101-000000-1-aaaa", "when": 1.0, "overrides": ["grid.dataset=[cub200]"], "runs": last,
             "artifacts": []}))


def _written(err: str) -> list[Path]:
    return [Path(line) for line in err.splitlines() if line.endswith((".png", ".pdf"))]


def _check_files(files: list[Path]) -> None:
    for f in files:
        assert f.exists() and f.stat().st_size > 1000, f
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG_MAGIC
        else:
            assert f.read_bytes()[:5] == b"%PDF-"


def test_plot_fixture_results_writes_curves_reliability_and_robustness(cli, tmp_path):
    res, out = tmp_path / "res", tmp_path / "figs"
    runs = [_run(res, m, "resnet20", "cub200", s, stochastic=m == "metaperturb") for m in METHODS for s in (0, 1, 2)]
    runs += [_run(res, m, "conv4", "digits", s, robust=False, new_rows=False) for m in METHODS[:2] for s in (0, 1)]
    _suite(res, "fx", runs, last=runs[:9])
    code, _, err = cli("report", "suite=fx", "--results", res, "--plot", out)
    assert code == 0, err
    files = _written(err)
    names = {f.name for f in files}
    for stem in ("curves-acc-resnet20-cub200", "curves-loss-resnet20-cub200", "reliability-resnet20-cub200",
                 "reliability-det-resnet20-cub200", "robustness-resnet20-cub200",
                 "curves-acc-conv4-digits", "curves-loss-conv4-digits", "reliability-conv4-digits"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names, stem
    assert "robustness-conv4-digits.png" not in names       # no robustness arrays there: no empty figure
    assert "reliability-det-conv4-digits.png" not in names  # deterministic methods: same diagram, not repeated
    assert set(names) == {p.name for p in out.iterdir()}
    _check_files(files)

    code, _, err = cli("report", "suite=fx", "--results", res, "--only-last", "--plot", tmp_path / "last",
                       "metric=nll")
    assert code == 0, err
    names = {f.name for f in _written(err)}
    assert "curves-nll-resnet20-cub200.png" in names and not any("conv4" in n for n in names)


def test_figure_data_pools_seeds_and_keeps_table_order_and_colours(tmp_path):
    from mpbench.figures import Plot, band, pool_bins, read_rows, robust_series

    res = tmp_path / "res"
    runs = [_run(res, m, "resnet20", "cub200", s) for m in reversed(METHODS) for s in (0, 1)]
    _suite(res, "fx", runs)
    plot = Plot(res, "fx")
    assert [plot.name(m) for m, _ in plot.by_method(("resnet20", "cub200"))] == \
        ["MetaPerturb", "Dropout (fixture)", "Base"]         # table's row order, display names and report.labels
    assert len({c for c, _ in plot.style.values()}) == 3
    tables = [plot.done["reliability"].iloc[i] for i in range(2)]
    pooled = pool_bins(tables)
    assert sum(b["count"] for b in pooled) == 600
    assert ece_from_bins(pooled) <= sum(ece_from_bins(t) for t in tables) / 2 + 1e-9   # pooling never adds gap
    evals, train = read_rows(res / "runs" / runs[0])
    assert [r["step"] for r in evals] == [20, 40, 60] and len(train) == 6
    curve = robust_series(plot.done.iloc[0], "robust_l2")
    assert list(curve)[-1] == 0.0 and curve[0.0] == pytest.approx(plot.done.iloc[0]["acc"] * 100)   # clean acc
    assert len(curve) == 5 and robust_series(plot.done.iloc[0], "robust_l5") == {}
    x, mean, ci = band([{1.0: 1.0, 2.0: 2.0}, {1.0: 3.0, 2.0: 2.0}, {1.0: 2.0}])
    assert list(x) == [1.0, 2.0] and list(mean) == [2.0, 2.0] and ci[0] > 0 and ci[1] == 0


def test_tiny_suite_report_metrics_and_plot(cli, make_suite, tmp_path):
    """A 2-run suite as quickstart runs it: the report shows acc, nll and ece on request, result.json holds both
    reliability diagrams, and --plot draws the real metrics.jsonl."""
    suite = make_suite(grid={"regularizer": ["base", "dropout"], "seed": [0]})
    res = tmp_path / "res"
    code, _, err = cli("run", f"suite={suite}", "--results", res)
    assert code == 0, err
    for result in res.glob("runs/*/result.json"):
        final = json.loads(result.read_text())["final"]
        n = sum(b["count"] for b in final["reliability"])
        assert n == sum(b["count"] for b in final["reliability_det"]) and n > 0
        assert final["ece"] == pytest.approx(ece_from_bins(final["reliability"]))
    for metric, label in (("acc", "acc (%)"), ("nll", "nll (nats)"), ("ece", "ece (%)")):
        code, out, err = cli("report", "suite=tiny", "--results", res, f"metric={metric}")
        assert code == 0 and label in out and "base" in out.lower(), (metric, out, err)
    code, out, _ = cli("report", "suite=tiny", "--results", res, "metric=nll", "--format", "json")
    cells = json.loads(out)["cells"]
    assert json.loads(out)["metric"] == "nll" and all(c["mean"] > 0 for c in cells)
    code, _, err = cli("report", "suite=tiny", "--results", res, "metric=reliability")
    assert code == 2 and "not a scalar" in err
    code, _, err = cli("report", "suite=tiny", "--results", res, "--plot", tmp_path / "figs")
    assert code == 0, err
    names = {f.name for f in _written(err)}
    assert {"curves-acc-conv4-synthetic.png", "curves-loss-conv4-synthetic.pdf",
            "reliability-conv4-synthetic.png"} <= names
    _check_files(_written(err))
