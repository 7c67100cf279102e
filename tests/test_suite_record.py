"""A suite's record never loses runs, and a report cell averages only runs that differ by seed."""
from __future__ import annotations

import json

import yaml


def _suite(make_suite, **kw):
    return make_suite("mine", grid={"regularizer": ["base", "dropout", "label_smoothing"], "model": ["conv4"],
                                    "dataset": ["synthetic"], "seed": [0]}, train={"steps": 2, "eval_every": 0}, **kw)


def _rows(out: str) -> list[str]:
    return [line.split(",")[0] for line in out.splitlines()[1:] if line.strip()]


def test_a_partial_invocation_never_drops_rows(cli, make_suite, tmp_path):
    suite, res = _suite(make_suite), tmp_path / "res"
    assert cli("run", f"suite={suite}", "--results", res)[0] == 0
    assert cli("run", f"suite={suite}", "--results", res, "grid.regularizer=[base]")[0] == 0
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "csv")
    assert code == 0 and _rows(out) == ["base", "dropout", "label_smoothing"]
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "markdown")
    assert "covers: the suite as defined (3 runs) + 2 invocation(s)" in out
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "csv", "--only-last")
    assert code == 0 and _rows(out) == ["base"]
    record = json.loads((res / "suites" / "mine.json").read_text())
    assert len(record["invocations"]) == 2
    first = json.loads((res / "suites" / "mine" / "invocations" / f"{record['invocations'][0]}.json").read_text())
    last = json.loads((res / "suites" / "mine" / "invocations" / f"{record['invocations'][1]}.json").read_text())
    assert first["overrides"] == [] and len(first["runs"]) == 3
    assert last["overrides"] == ["grid.regularizer=[base]"] and len(last["runs"]) == 1
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "csv", "--invocation",
                       record["invocations"][0])
    assert code == 0 and len(_rows(out)) == 3
    code, _, err = cli("report", "suite=mine", "--results", res, "--invocation", "nope")
    assert code == 2 and "no invocation 'nope'" in err


def test_cells_never_run_are_shown_missing(cli, make_suite, tmp_path):
    suite, res = _suite(make_suite), tmp_path / "res"
    assert cli("run", f"suite={suite}", "--results", res, "grid.regularizer=[dropout]")[0] == 0
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "markdown")
    assert code == 0
    assert "| Base " in out and "– (0/1)" in out and "| Dropout " in out
    assert "not finished: 2 missing" in out


def test_a_crossed_hparam_splits_rows_and_names(cli, make_suite, tmp_path):
    suite = make_suite("mine", grid={"regularizer": ["dropout"], "seed": [0, 1], "reg": {"dropout": {"p": [0.1, 0.5]}}},
                       train={"steps": 2, "eval_every": 0})
    res = tmp_path / "res"
    code, out, _ = cli("run", f"suite={suite}", "--results", res, "--dry-run")
    assert code == 0 and " p " in out and "0.5" in out                    # the dry-run shows the varying key
    assert cli("run", f"suite={suite}", "--results", res)[0] == 0
    code, out, _ = cli("report", f"suite={suite}", "--results", res, "--format", "csv")  # a path works too
    assert code == 0 and _rows(out) == ["dropout (p=0.1)", "dropout (p=0.5)"]
    import csv
    import io

    assert [r["n"] for r in csv.DictReader(io.StringIO(out))] == ["2", "2"]   # 2 seeds per row, never 4 pooled
    names = sorted(yaml.safe_load(p.read_text())["name"] for p in res.glob("runs/*/config.yaml"))
    assert names == ["dropout-conv4-synthetic-s0 (p=0.1)", "dropout-conv4-synthetic-s0 (p=0.5)",
                     "dropout-conv4-synthetic-s1 (p=0.1)", "dropout-conv4-synthetic-s1 (p=0.5)"]


def test_report_out_error_names_the_users_path(cli, make_suite, tmp_path):
    res = tmp_path / "res"
    assert cli("run", f"suite={make_suite()}", "--results", res)[0] == 0
    target = tmp_path / "missing" / "t.csv"
    code, _, err = cli("report", "suite=tiny", "--results", res, "--format", "csv", "--out", target)
    assert code == 2 and str(target) in err and ".tmp" not in err


def test_cfg_prints_the_resolved_suite(cli, make_suite):
    code, out, _ = cli("run", f"suite={make_suite()}", "train.lr=0.01", "--cfg")
    cfg = yaml.safe_load(out)
    assert code == 0 and cfg["train"]["lr"] == 0.01 and cfg["train"]["schedule"] == "multistep"
    assert cfg["stages"]["metatrain"]["split"] == "release" and cfg["eval"] == ["classification"]


def test_debug_is_accepted_after_the_subcommand(cli, make_suite):
    code, _, err = cli("run", f"suite={make_suite()}", "train.stpes=2", "--debug")
    assert code == 2 and "did you mean 'train.steps'" in err and "Traceback" in err


def test_a_reference_table_shows_differences_with_its_source(cli, make_suite, tmp_path):
    res = tmp_path / "res"
    assert cli("run", f"suite={_suite(make_suite)}", "--results", res, "grid.regularizer=[base,dropout]")[0] == 0
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "csv", "--only-last")
    import csv
    import io

    ours = {r["regularizer"]: float(r["mean"]) for r in csv.DictReader(io.StringIO(out))}
    (res / "paper").mkdir()
    (res / "paper" / "mine.csv").write_text('row,column,value,source\n'
                                            f'base,conv4/synthetic,{ours["base"] - 1.5},"test p. 1, Table 9"\n')
    code, out, _ = cli("report", "suite=mine", "--results", res, "--format", "markdown", "--only-last")
    assert code == 0 and "[+1.50]" in out and "test p. 1, Table 9" in out
    assert out.count("[+") == 1                                   # dropout: no paper value, no difference
    bad = tmp_path / "bad.csv"
    bad.write_text("row,column,value,source\nbase,conv4/synthetic,71,\n")
    code, _, err = cli("report", "suite=mine", "--results", res, "--reference", bad)
    assert code == 2 and "line 2" in err and "source" in err


def test_several_metrics_give_one_table_each(cli, make_suite, tmp_path):
    res = tmp_path / "res"
    assert cli("run", f"suite={make_suite()}", "--results", res)[0] == 0
    code, out, _ = cli("report", "suite=tiny", "--results", res, "--format", "markdown", "--metric", "acc",
                       "--metric", "nll", "--metric", "ece")
    assert code == 0 and out.count("| regularizer") == 3
    assert "metric: acc (%)" in out and "metric: nll (nats)" in out and "metric: ece (%)" in out
    code, out, _ = cli("report", "suite=tiny", "--results", res, "--format", "csv", "metric=acc,nll")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("regularizer") and len(lines) == 3 and ",nll," in lines[2]
