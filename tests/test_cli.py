"""The CLI contract: run / status / report / list / data, exit codes, one-line errors, idempotent reruns."""
from __future__ import annotations

import json

import pytest


def test_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and "mpbench" in out
    for cmd in ("run", "status", "report", "list", "data", "bench"):
        code, out, _ = cli(cmd, "--help")
        assert code == 0 and "Usage" in out, cmd


def test_run_report_status_and_idempotent_rerun(cli, make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["base", "dropout"], "seed": [0, 1]})
    res = tmp_path / "res"
    code, _, err = cli("run", f"suite={suite}", "--results", res)
    assert code == 0, err
    results = sorted(res.glob("runs/*/result.json"))
    assert len(results) == 4
    r = json.loads(results[0].read_text())
    assert r["git"]["sha"] and r["versions"]["torch"] and r["spec"]["train"]["steps"] == 6
    assert {"acc", "nll", "ece", "acc_det"} <= set(r["final"])
    assert r["eval_protocol"] == "deterministic"
    metrics = (results[0].parent / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(m) for m in metrics]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [3, 6]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 7))
    mtimes = {p: p.stat().st_mtime_ns for p in results}
    code, _, err = cli("run", f"suite={suite}", "--results", res)     # rerun: nothing trains
    assert code == 0 and "0 trained, 4 already done" in err
    assert {p: p.stat().st_mtime_ns for p in results} == mtimes
    code, out, _ = cli("status", "suite=tiny", "--results", res)
    assert code == 0 and "done 4" in out
    code, out, _ = cli("report", "suite=tiny", "--results", res, "--format", "csv")
    assert code == 0 and "base" in out and "dropout" in out
    code, out, _ = cli("run", f"suite={suite}", "--results", res, "--dry-run")
    assert code == 0 and out.count("done") >= 4


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "did you mean 'train.steps'"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps must be > 0"),
    ("grid.regularizer=[base,dropuot]", "did you mean 'dropout'"),
    ("grid.model=[resnet2O]", "unknown model"),
    ("grid.dataset=[digitz]", "did you mean 'digits'"),
    ("launcher.name=slrm", "did you mean"),
    ("reg.dropout.pp=0.2", "unknown hparam reg.dropout.pp"),
    ("grid.train.stepz=[1]", "unknown grid key"),
    ("nonsense", "not key=value"),
])
def test_bad_overrides_are_one_line_usage_errors(cli, make_suite, tmp_path, override, message):
    suite = make_suite()
    res = tmp_path / "res"
    code, out, err = cli("run", f"suite={suite}", override, "--results", res)
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err
    assert not res.exists()                                    # nothing written


def test_unknown_suite_and_missing_suite_argument(cli, tmp_path):
    code, _, err = cli("run", "suite=quikstart", "--results", tmp_path / "r")
    assert code == 2 and "did you mean 'quickstart'" in err
    code, _, err = cli("run", "--results", tmp_path / "r")
    assert code == 2 and "no suite given" in err


def test_list_commands(cli):
    code, out, _ = cli("list", "regularizers")
    assert code == 0 and "dropout" in out and "base" in out
    code, out, _ = cli("list", "datasets")
    assert code == 0 and "synthetic" in out and "fashion_mnist" in out
    code, out, _ = cli("list", "suites")
    assert code == 0 and "quickstart" in out
    code, out, _ = cli("list", "models")
    assert code == 0 and "resnet20" in out
    code, out, _ = cli("list", "regularizers", "--sites", "resnet20")
    assert code == 0 and out.count("block") >= 9


def test_report_without_results_is_a_clear_error(cli, tmp_path):
    code, _, err = cli("report", "suite=nothing", "--results", tmp_path / "none")
    assert code == 2 and "mpbench run" in err


def test_bench_commands_report_ratios(cli):
    code, out, err = cli("bench", "loop", "--steps", "2", "--batch", "8", "--size", "16", "--threads", "1")
    assert code == 0, err
    assert "bare ms/step" in out and "ratio" in out
    from mpbench.bench_loop import bench_regularizers

    r = bench_regularizers(batch=8, size=16, threads=1, steps=1, warmup=1, methods=["base", "dropout", "drop_path"],
                           model="conv4")
    assert "ratio 1.00x" in r["base"] and "ratio" in r["dropout"] and r["drop_path"].startswith("skipped:")
