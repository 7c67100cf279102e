"""``execution.seed_array`` in ``mpbench run``: runs that differ only by seed train as one array job
(mpbench/seed_groups.py, mpbench/jobs/array.py, mpbench/array_loop.py), each seed still its own run.

Tolerance: conv4 width 8, 6 steps, one thread: the array's metrics (final acc/nll/ece, every metrics.jsonl value
but timing) equal separate runs' to 1e-5 (measured: nll 1.6e-8, rows 4.8e-7); accuracies are equal.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from mpbench.config import load_suite
from mpbench.launchers import Request, run_plan
from mpbench.plan import expand
from mpbench.runner import Stopped
from mpbench.store import prepare_results_dir

TOL = 1e-5
SUITE = {"grid": {"regularizer": ["base"], "seed": [0, 1, 2]}, "train": {"checkpoint_every": 2}}
TIMING = ("images_per_s",)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _run(suite: Path, res: Path, *overrides: str) -> dict[str, str]:
    cfg = load_suite(str(suite), ["launcher.threads=1", *overrides])
    return run_plan(Request(expand(cfg), cfg, prepare_results_dir(res), res.parent / "data"))


def _results(res: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(res.glob("runs/*/result.json"))}


def _rows(res: Path, rid: str) -> list[dict]:
    return [json.loads(ln) for ln in (res / "runs" / rid / "metrics.jsonl").read_text().splitlines()]


def _close(a, b) -> None:
    """Equal, floats to TOL (relative above 1), timing aside."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            if k not in TIMING:
                _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert abs(a - b) <= TOL * max(1.0, abs(b)), (a, b)
    else:
        assert a == b


def test_seed_array_equals_separate_runs_each_its_own_run(make_suite, tmp_path, cli):
    suite = make_suite(**SUITE)
    alone, arr = tmp_path / "alone", tmp_path / "array"
    assert set(_run(suite, alone).values()) == {"done"}
    outcomes = _run(suite, arr, "execution.seed_array=true")
    ra, rb = _results(alone), _results(arr)
    assert set(outcomes) == set(ra) == set(rb) and set(outcomes.values()) == {"done"}   # same run ids, per run
    for rid, r in rb.items():
        d = arr / "runs" / rid
        assert (d / "done").exists() and (d / "status.json").exists() and not (d / "checkpoint.pt").exists()
        assert r["seed_array"]["size"] == 3 and sorted(r["seed_array"]["members"]) == sorted(rb)
        assert r["execution"]["applied"] == {"seed_array": 3} and not r["execution"]["fallbacks"]
        assert r["resumed"] is False and r["attempts"] == 1 and r["seed"] == ra[rid]["seed"]
        assert r["final"]["acc"] == ra[rid]["final"]["acc"]
        for k in ("nll", "ece"):
            assert abs(r["final"][k] - ra[rid]["final"][k]) <= TOL, k
        _close(_rows(arr, rid), _rows(alone, rid))
        assert json.loads((d / "status.json").read_text())["state"] == "done"
    arrays = list((arr / "artifacts").iterdir())
    assert len(arrays) == 1 and not (arrays[0] / "lock").exists()
    code, out, err = cli("report", "suite=tiny", "--results", arr, "--format", "csv")
    assert code == 0, err
    assert out.splitlines()[1].split(",")[8:10] == ["3", "3"]            # n, n_done: all three seeds
    code, out, _ = cli("status", "suite=tiny", "--results", arr)
    assert code == 0 and "done 3" in out
    assert set(_run(suite, arr, "execution.seed_array=true").values()) == {"skipped"}   # (d) a rerun: nothing
    assert {rid: r["wall_time_s"] for rid, r in _results(arr).items()} == {rid: r["wall_time_s"]
                                                                          for rid, r in rb.items()}


def test_unsupported_method_and_refused_model_train_alone_and_say_why(make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["dropout"], "seed": [0, 1]})
    assert set(_run(suite, tmp_path / "a", "execution.seed_array=true").values()) == {"done"}
    for r in _results(tmp_path / "a").values():
        assert "seed_array" not in r and r["execution"]["applied"] == {}
        assert "dropout" in r["execution"]["fallbacks"]["seed_array"]
    assert not (tmp_path / "a" / "artifacts").exists() or not any((tmp_path / "a" / "artifacts").iterdir())
    suite = make_suite(grid={"seed": [0, 1]}, model_kwargs={"width": 8, "drop_rate": 0.2})
    assert set(_run(suite, tmp_path / "b", "execution.seed_array=true").values()) == {"done"}
    for r in _results(tmp_path / "b").values():            # grouped, but SeedArray refused the model
        assert "drop_rate" in r["execution"]["fallbacks"]["seed_array"] and "seed_array" not in r


def _stop_at(monkeypatch, at: int) -> None:
    """Ctrl-C arrives during the array's step ``at`` (the array checkpoints every member at the next one)."""
    from mpbench.seed_array import SeedArray

    step = SeedArray.step

    def pressed(self, i):
        if i == at:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, i)

    monkeypatch.setattr(SeedArray, "step", pressed)


def test_interrupted_array_checkpoints_every_member_and_resumes_once(make_suite, tmp_path, monkeypatch):
    suite = make_suite(**{**SUITE, "train": {"steps": 8, "eval_every": 0}})
    res = tmp_path / "res"
    _stop_at(monkeypatch, 3)
    with pytest.raises(Stopped):
        _run(suite, res, "execution.seed_array=true")
    monkeypatch.undo()
    runs = sorted((res / "runs").iterdir())
    assert len(runs) == 3
    for d in runs:
        st = json.loads((d / "status.json").read_text())
        assert st["state"] == "pending" and st["checkpoint_step"] == 4 and (d / "checkpoint.pt").exists()
        assert not (d / "lock").exists() and not (d / "done").exists()
    assert set(_run(suite, res, "execution.seed_array=true").values()) == {"done"}
    _run(suite, tmp_path / "whole", "execution.seed_array=true")
    for rid, r in _results(res).items():
        assert r["resumed"] is True and r["resumed_from_step"] == 4 and r["attempts"] == 2
        assert r["seed_array"]["size"] == 3
        rows = _rows(res, rid)
        assert [x["step"] for x in rows if x["split"] == "train"] == list(range(1, 9))     # each step once
        assert len([x for x in rows if x.get("final")]) == 1
        _close(rows, _rows(tmp_path / "whole", rid))       # as if never stopped
        assert not (res / "runs" / rid / "checkpoint.pt").exists()


def test_members_checkpointed_at_different_steps_resume_alone(make_suite, tmp_path, monkeypatch):
    suite = make_suite(**{**SUITE, "grid": {"seed": [0, 1]}, "train": {"steps": 8, "eval_every": 0}})
    res = tmp_path / "res"
    _stop_at(monkeypatch, 3)
    with pytest.raises(Stopped):
        _run(suite, res, "execution.seed_array=true")
    monkeypatch.undo()
    first = sorted((res / "runs").iterdir())[0]
    (first / "checkpoint.pt").unlink()                      # this one restarts, the other resumes
    assert set(_run(suite, res, "execution.seed_array=true").values()) == {"done"}
    for rid, r in _results(res).items():
        assert "different steps" in r["execution"]["fallbacks"]["seed_array"] and "seed_array" not in r
        assert r["resumed"] is (rid != first.name)


def test_non_finite_loss_fails_its_seed_the_others_resume_alone(make_suite, tmp_path, monkeypatch):
    """Seed 1's loss turns NaN at step 2 (after the checkpoint at 2): seed 1 fails as a lone run would, seeds 0
    and 2 resume alone from their array checkpoints (Stepper layout) and end as separate runs do."""
    import torch

    from mpbench.seed_array import SeedArray

    losses, calls = SeedArray.losses, []

    def nan_at_step_2(self, x, y):
        calls.append(1)
        out = losses(self, x, y)
        return out * torch.tensor([1.0, float("nan"), 1.0]) if len(calls) == 3 else out

    suite = make_suite(**SUITE)
    monkeypatch.setattr(SeedArray, "losses", nan_at_step_2)
    outcomes = _run(suite, tmp_path / "res", "execution.seed_array=true")
    monkeypatch.undo()
    _run(suite, tmp_path / "alone")
    got = _results(tmp_path / "res")
    failed = [rid for rid, o in outcomes.items() if o == "failed"]
    assert len(failed) == 1 and "-s1-" in failed[0] and len(got) == 2
    st = json.loads((tmp_path / "res" / "runs" / failed[0] / "status.json").read_text())
    assert st["state"] == "failed" and "non-finite loss at step 2 in seed(s) [1]" in st["error"]
    for rid, r in got.items():
        assert "seed array stopped" in r["execution"]["fallbacks"]["seed_array"]
        assert r["resumed_from_step"] == 2 and r["attempts"] == 2
        _close(_rows(tmp_path / "res", rid), _rows(tmp_path / "alone", rid))


def test_pool_launcher_runs_an_array_beside_lone_runs(make_suite, tmp_path):
    """Launchers dispatch an array job by kind and id like any job: a pool worker trains it."""
    suite = make_suite(grid={"regularizer": ["base", "dropout"], "seed": [0, 1]})
    outcomes = _run(suite, tmp_path / "res", "execution.seed_array=true", "launcher.name=pool", "launcher.slots=2")
    assert len(outcomes) == 4 and set(outcomes.values()) == {"done"}
    got = _results(tmp_path / "res")
    assert sorted(r.get("seed_array", {}).get("size", 0) for r in got.values()) == [0, 0, 2, 2]
    arr = next((tmp_path / "res" / "artifacts").iterdir())
    assert (arr / "stdout.log").exists() and json.loads((arr / "status.json").read_text())["state"] == "done"
