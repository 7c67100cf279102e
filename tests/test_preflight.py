"""Preflight: every problem of a plan is found before the first job starts, reported at once, exit code 2,
nothing written; ``--dry-run`` runs the same checks."""
from __future__ import annotations

import time

import pytest


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_quickstart_with_missing_data_and_bad_values_fails_at_once(cli, tmp_path, dry):
    res = tmp_path / "res"
    args = ["run", "suite=quickstart", "grid.dataset=[digits,cifar100]", "reg.dropblock.drop_prob=1.5",
            "reg.dropout.p=-0.2", "--results", res, "--data", tmp_path / "empty"] + (["--dry-run"] if dry else [])
    tic = time.perf_counter()
    code, out, err = cli(*args)
    took = time.perf_counter() - tic
    lines = _lines(err)
    assert code == 2, err
    assert not res.exists(), "preflight wrote into the results dir"
    assert any("reg.dropblock.drop_prob=1.5" in ln and "[0, 1)" in ln for ln in lines), lines
    assert any("reg.dropout.p=-0.2" in ln for ln in lines), lines
    assert any("cifar100" in ln and "to get it" in ln for ln in lines), lines
    assert all(ln.startswith("error: ") for ln in lines) and len(lines) <= 11
    assert took < 60, f"preflight took {took:.0f} s"          # generous: it trains nothing


def test_stage_dataset_missing_is_found_before_runs_train(cli, tmp_path):
    res = tmp_path / "res"
    code, _, err = cli("run", "suite=quickstart", "stages.metatrain.dataset=cifar100", "--results", res,
                       "--data", tmp_path / "empty")
    assert code == 2 and not res.exists()
    assert "cifar100" in err and "stages" not in err.split("cifar100")[0][-5:]


def test_many_problems_are_capped_with_a_count(cli, tmp_path):
    code, _, err = cli("run", "suite=quickstart", "grid.dataset=[cifar100,svhn,stl10]",
                       "reg.dropout.p=7", "reg.dropblock.drop_prob=9", "reg.manifold_mixup.alpha=-1",
                       "reg.metaperturb.anneal=-1", "reg.finetune_bnreset.nope=1", "eval=[classification,foo]",
                       "--results", tmp_path / "res", "--data", tmp_path / "empty")
    lines = _lines(err)
    assert code == 2
    assert len(lines) >= 6
    assert len(lines) <= 11


def test_help_documents_exit_codes(cli):
    code, out, _ = cli("run", "--help")
    assert code == 0
    for text in ("0 every job done", "1 some job failed", "2 usage or preflight error", "130 interrupted"):
        assert text in " ".join(out.split()), text
