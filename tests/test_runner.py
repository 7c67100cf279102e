"""One run's lifecycle: atomic files, failures recorded with their reason, resume, the pool launcher."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mpbench.config import load_suite
from mpbench.launchers import Request, run_plan
from mpbench.plan import expand
from mpbench.store import atomic_write, prepare_results_dir


def _run(suite: Path, tmp_path: Path, *overrides: str, **kw) -> tuple[dict, Path]:
    cfg = load_suite(str(suite), list(overrides))
    res = prepare_results_dir(tmp_path / "res")
    req = Request(expand(cfg), cfg, res, tmp_path / "data", **kw)
    return run_plan(req), res


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    atomic_write(path, "old")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)   # fails after the new bytes were written, before the rename
    with pytest.raises(OSError):
        atomic_write(path, "new content")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]    # no temp file left behind


def test_nan_loss_fails_that_run_with_reason_and_others_finish(make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["base", "test_nan"]})
    outcomes, res = _run(suite, tmp_path)
    assert sorted(outcomes.values()) == ["done", "failed"]
    failed = next(p for p in res.glob("runs/test_nan*"))
    status = json.loads((failed / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite loss" in status["error"] and "step 2" in status["error"]
    assert "Traceback" in (failed / "error.txt").read_text()
    assert not (failed / "done").exists()


@pytest.mark.parametrize("method", ["dropout", "metaperturb"])
def test_interrupted_run_resumes_to_identical_metrics(make_suite, tmp_path, method):
    """A run stopped mid-way (checkpoint) and resumed ends with the same numbers as an uninterrupted one (MetaPerturb:
    its noise, drawn by the native kernels from a seed that torch's checkpointed generator supplies, too)."""
    from mpbench.train import Interrupted, RunHooks, build, train_loop
    from regularizers.metaperturb import PerturbFunction

    torch.set_num_threads(1)
    overrides = ["train.steps=8", "train.eval_every=4"]
    if method == "metaperturb":
        PerturbFunction().save_phi(tmp_path / "phi.pt")
        overrides += [f"reg.metaperturb.phi={tmp_path / 'phi.pt'}", "reg.metaperturb.final_eval_passes=3"]
    cfg = load_suite(str(make_suite(grid={"regularizer": [method]})), overrides)
    spec = expand(cfg).runs[0].spec
    dev = torch.device("cpu")
    ref = train_loop(build(spec, tmp_path, dev, {}), spec, dev, RunHooks())
    saved = {}
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == 6                    # stop before step 5

    with pytest.raises(Interrupted):
        train_loop(build(spec, tmp_path, dev, {}), spec, dev,
                   RunHooks(should_stop=stop, save_checkpoint=lambda s: saved.update(s)))
    import io
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)   # the checkpoint is weights_only-loadable
    assert state["step"] == 5
    resumed = train_loop(build(spec, tmp_path, dev, {}), spec, dev, RunHooks(load_checkpoint=lambda: state))
    assert resumed["final"] == ref["final"]

    def rows(history):                              # every row but the wall-clock speed, in order
        return [(h["split"], h["step"], {k: v for k, v in h.items() if k != "images_per_s"}) for h in history]

    assert rows(resumed["history"]) == rows(ref["history"])        # one row per step, the same numbers
    assert [h["step"] for h in ref["history"] if h["split"] == "train"] == list(range(1, 9))


def test_pool_launcher_two_slots(make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["base", "dropout"], "seed": [0, 1]})
    outcomes, res = _run(suite, tmp_path, "launcher.name=pool", "launcher.slots=2", "launcher.threads=1")
    assert sorted(outcomes.values()) == ["done"] * 4
    for d in res.glob("runs/*"):
        r = json.loads((d / "result.json").read_text())
        assert r["device"].startswith("cpu") and "x1 threads" in r["device"]
        assert r["malloc_tuned"] is True           # every training process keeps its freed memory (mpbench.malloc)
        assert (d / "stdout.log").exists()
        assert not (d / "lock").exists()


def test_failed_stage_fails_its_dependants_with_reason(make_suite, tmp_path):
    suite = make_suite(grid={"regularizer": ["finetune"]},
                       stages={"pretrain": {"dataset": "synthetic", "train": {"steps": 2, "batch_size": 5000}}})
    outcomes, res = _run(suite, tmp_path)
    assert set(outcomes.values()) == {"failed"}
    run = next(res.glob("runs/*"))
    assert "stage pretrain" in json.loads((run / "status.json").read_text())["error"]


def test_runs_without_a_stage_share_the_first_wave_with_the_stages(make_suite, tmp_path):
    """base and dropout need no stage: they train while the pretrain stage does (no idle slot), finetune waits for
    it; once the stage is done, a rerun puts everything in one wave."""
    from mpbench.launchers import waves

    suite = make_suite(grid={"regularizer": ["base", "finetune", "dropout"]},
                       stages={"pretrain": {"dataset": "synthetic", "train": {"steps": 2, "batch_size": 32}}})
    cfg = load_suite(str(suite), [])
    req = Request(expand(cfg), cfg, prepare_results_dir(tmp_path / "res"), tmp_path / "data")
    first, second = waves(req)

    def name(job) -> str:
        return job.kind if job.kind != "run" else "+".join(job.spec["regularizer"])

    assert name(first[0]) == "pretrain" and sorted(map(name, first[1:])) == ["base", "dropout"]
    assert list(map(name, second)) == ["finetune"]
    outcomes = run_plan(req)
    assert set(outcomes.values()) == {"done"}
    started = {name(j): json.loads((j.dir(req.results).path / "status.json").read_text())["started"]
               for j in req.plan.jobs}
    assert started["pretrain"] < started["base"] < started["finetune"]      # the local launcher: in wave order
    assert started["dropout"] < started["finetune"]
    again = Request(expand(cfg), cfg, req.results, tmp_path / "data")
    assert waves(again)[1] == [] and len(waves(again)[0]) == 4
