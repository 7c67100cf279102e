"""Training curves: metrics.jsonl holds training rows (window-mean loss and each term, lr, images/s, the methods'
own scalars) beside evaluation rows, and W&B gets the same series against the run's step."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_metrics_hold_training_rows_with_terms_and_scalars(cli, make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["dropblock", "info_dropout"]},
                       train={"steps": 12, "eval_every": 6, "log_every": 3})
    res = tmp_path / "res"
    assert cli("run", f"suite={suite}", "--results", res, "reg.info_dropout.bn_batches=1")[0] == 0
    for run in res.glob("runs/*"):
        rows = _rows(run)
        train = [r for r in rows if r["split"] == "train"]
        evals = [r for r in rows if r["split"] == "eval"]
        assert [r["step"] for r in train] == [3, 6, 9, 12]
        assert [r["step"] for r in evals] == [6, 12] and evals[-1]["final"] is True and "loss" in evals[-1]
        for r in train:
            assert r["lr"] > 0 and r["images_per_s"] > 0 and r["loss/cross_entropy"] > 0
        name = json.loads((run / "result.json").read_text())["spec"]["regularizer"][0]
        if name == "dropblock":                   # its ramp as a curve
            probs = [r["reg/dropblock/drop_prob"] for r in train]
            assert probs == sorted(probs) and probs[0] < probs[-1]
            assert all(r["loss"] == pytest.approx(r["loss/cross_entropy"]) for r in train)
        else:                                     # its KL penalty as its own term
            assert all(r["loss"] == pytest.approx(r["loss/cross_entropy"] + r["loss/info_dropout"]) for r in train)


@pytest.mark.skipif(shutil.which("wandb", path=str(Path(sys.executable).parent)) is None, reason="no wandb CLI")
def test_offline_wandb_run_holds_the_series(cli, make_suite, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    suite = make_suite(train={"steps": 8, "eval_every": 4, "log_every": 2})
    res = tmp_path / "res"
    assert cli("run", f"suite={suite}", "--results", res, "wandb.mode=offline")[0] == 0
    run = next(res.glob("runs/*"))
    log = next(run.glob("wandb/offline-run-*/run-*.wandb"))
    wandb_cli = str(Path(sys.executable).parent / "wandb")
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(log)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]
    text = json.dumps([r for r in records if "history" in json.dumps(r)])
    assert text.count("train/loss") > 1 and text.count("eval/acc") > 1
    summary = subprocess.run([wandb_cli, "leet", "inspect", "--summary", "--json", str(log)], capture_output=True,
                             text=True, timeout=120)
    assert summary.returncode == 0 and "acc" in summary.stdout
    code, _, err = cli("report", "suite=tiny", "--results", res, "--wandb")
    assert code == 0 and "W&B: the table is in run" in err
    report_log = next((res / "wandb-reports").glob("wandb/offline-run-*/run-*.wandb"))
    out = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(report_log)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "table-file" in out.stdout.replace("_", "-")
