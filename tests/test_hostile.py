"""A table of malformed inputs. Each must end with a one-line message naming the problem (and the fix), exit code
2 (usage) or 1 (runtime), no traceback, and no finished result lost or altered."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests_support import GOOD_SUITE

CASES: list[tuple[str, object, int, str]] = []


def case(name: str, code: int, message: str):
    def deco(fn):
        CASES.append((name, fn, code, message))
        return fn
    return deco


def suite_file(tmp: Path, text: str | None = None, **changes) -> str:
    data = json.loads(json.dumps(GOOD_SUITE))
    for k, v in changes.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp / "s.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(data))
    return f"suite={path}"


# --- suite files -------------------------------------------------------------------------------------------------
case("yaml-broken", 2, "not valid YAML")(lambda t, r: ["run", suite_file(t, "grid: [unclosed\n  - x: {")])
case("yaml-list", 2, "must be a YAML mapping")(lambda t, r: ["run", suite_file(t, "- a\n- b\n")])
case("yaml-scalar", 2, "must be a YAML mapping")(lambda t, r: ["run", suite_file(t, "just text\n")])
case("yaml-binary", 2, "not valid YAML")(lambda t, r: ["run", suite_file(t, "\x00\x01\x02: [")])
case("yaml-steps-str", 2, "train.steps")(lambda t, r: ["run", suite_file(t, train={"steps": "many"})])
case("yaml-batch-list", 2, "train.batch_size")(lambda t, r: ["run", suite_file(t, train={"batch_size": [1, 2]})])
case("yaml-unknown-top", 2, "did you mean 'train'")(lambda t, r: ["run", suite_file(t, trian={"steps": 3})])
case("yaml-unknown-nested", 2, "did you mean 'train.steps'")(lambda t, r: ["run", suite_file(t, train={"stpes": 3})])
case("yaml-grid-empty", 2, "empty list")(lambda t, r: ["run", suite_file(t, grid={"seed": []})])
case("suite-unknown", 2, "unknown suite")(lambda t, r: ["run", "suite=no_such_suite"])
case("suite-missing-file", 2, "not found")(lambda t, r: ["run", f"suite={t / 'missing.yaml'}"])
case("suite-directory", 2, "is a directory")(lambda t, r: ["run", f"suite={t}/"])
case("suite-name-escapes", 2, "invalid suite name")(lambda t, r: ["run", suite_file(t, name="../../etc/x")])
case("no-suite", 2, "no suite given")(lambda t, r: ["run"])
# --- overrides and registry names ----------------------------------------------------------------------------------
case("key-typo", 2, "did you mean 'train.steps'")(lambda t, r: ["run", suite_file(t), "train.stpes=2"])
case("not-key-value", 2, "not key=value")(lambda t, r: ["run", suite_file(t), "steps"])
case("steps-zero", 2, "train.steps must be > 0")(lambda t, r: ["run", suite_file(t), "train.steps=0"])
case("steps-negative", 2, "train.steps must be > 0")(lambda t, r: ["run", suite_file(t), "train.steps=-5"])
case("batch-zero", 2, "train.batch_size must be > 0")(lambda t, r: ["run", suite_file(t), "train.batch_size=0"])
case("lr-negative", 2, "train.lr must be > 0")(lambda t, r: ["run", suite_file(t), "train.lr=-1"])
case("eval-every-negative", 2, "train.eval_every")(lambda t, r: ["run", suite_file(t), "train.eval_every=-1"])
case("optimizer", 2, "did you mean 'adam'")(lambda t, r: ["run", suite_file(t), "train.optimizer=adma"])
case("schedule", 2, "train.schedule")(lambda t, r: ["run", suite_file(t), "train.schedule=linear"])
case("regularizer", 2, "did you mean 'dropout'")(lambda t, r: ["run", suite_file(t), "grid.regularizer=[dropot]"])
case("model", 2, "unknown model")(lambda t, r: ["run", suite_file(t), "grid.model=[resnet_twenty]"])
case("dataset", 2, "did you mean 'digits'")(lambda t, r: ["run", suite_file(t), "grid.dataset=[digit]"])
case("hparam", 2, "unknown hparam reg.dropout.q")(lambda t, r: ["run", suite_file(t), "reg.dropout.q=1"])
case("hparam-scalar", 2, "reg.dropout must map")(lambda t, r: ["run", suite_file(t, reg={"dropout": 0.3})])
case("grid-key", 2, "unknown grid key")(lambda t, r: ["run", suite_file(t), "grid.train.lrr=[1]"])
case("launcher-name", 2, "launcher.name")(lambda t, r: ["run", suite_file(t), "launcher.name=kubernetes"])
case("launcher-param", 2, "did you mean 'launcher.slots'")(lambda t, r: ["run", suite_file(t), "launcher.slotz=2"])
case("launcher-slots", 2, "launcher.slots must be > 0")(lambda t, r: ["run", suite_file(t), "launcher.slots=0"])
case("launcher-gpu", 2, "launcher.devices")(lambda t, r: ["run", suite_file(t), "launcher.name=pool",
                                                          "launcher.devices=[7]"])
case("wandb-mode", 2, "wandb.mode")(lambda t, r: ["run", suite_file(t), "wandb.mode=sometimes"])
case("two-mixers", 2, "one batch mixer")(lambda t, r: ["run", suite_file(t), "grid.regularizer=[[mixup,cutmix]]"])
case("twice", 2, "listed twice")(lambda t, r: ["run", suite_file(t), "grid.regularizer=[[dropout,dropout]]"])
case("incompatible-arch", 2, "drop_path")(lambda t, r: ["run", suite_file(t), "grid.regularizer=[drop_path]"])
case("model-kwarg", 2, "model_kwargs")(lambda t, r: ["run", suite_file(t), "model_kwargs.widht=3"])
case("stage-file-missing", 2, "not found")(lambda t, r: ["run", suite_file(t), "stages.pretrain.dataset=synthetic",
                                                         "grid.regularizer=[finetune]",
                                                         f"stages.pretrain.file={t}/nope.pt"])
# --- preflight: found before anything trains (exit 2, nothing written) ---------------------------------------------
case("dataset-files-missing", 2, "cifar100")(lambda t, r: ["run", suite_file(t), "grid.dataset=[cifar100]",
                                                           "--data", str(t / "empty")])
case("hparam-range", 2, "reg.dropblock.drop_prob=1.5")(
    lambda t, r: ["run", suite_file(t), "grid.regularizer=[dropblock]", "reg.dropblock.drop_prob=1.5"])
case("hparam-negative", 2, "reg.dropout.p=-0.2")(
    lambda t, r: ["run", suite_file(t), "grid.regularizer=[dropout]", "reg.dropout.p=-0.2"])
case("hparam-choice", 2, "one of head, blocks, both")(
    lambda t, r: ["run", suite_file(t), "grid.regularizer=[dropout]", "reg.dropout.where=everywhere"])
case("hparam-grid-value", 2, "reg.dropout.p=2")(
    lambda t, r: ["run", suite_file(t), "grid.regularizer=[dropout]", "grid.reg.dropout.p=[0.1,2]"])
case("eval-unknown", 2, "unknown evaluation")(lambda t, r: ["run", suite_file(t), "eval=[classifcation]"])
case("eval-setting", 2, "eval_settings.classification.bins")(
    lambda t, r: ["run", suite_file(t), "eval_settings.classification.bins=0"])
case("stage-dataset-missing", 2, "cifar100")(
    lambda t, r: ["run", suite_file(t), "grid.regularizer=[finetune]", "stages.pretrain.dataset=cifar100",
                  "--data", str(t / "empty")])
# --- runtime problems (exit 1, the run records why; nothing else is touched) ---------------------------------------
case("batch-larger-than-dataset", 1, "larger than the training set")(
    lambda t, r: ["run", suite_file(t), "train.batch_size=100000"])


def _corrupt_checkpoint(t: Path, r: Path) -> list[str]:
    """A run interrupted earlier left a checkpoint that is now garbage."""
    args = ["run", suite_file(t), "train.steps=7"]
    from mpbench.config import load_suite
    from mpbench.plan import expand

    job = expand(load_suite(args[1].split("=", 1)[1], ["train.steps=7"])).runs[0]
    job.dir(r).create(job.slug, job.spec)
    job.dir(r).checkpoint.write_bytes(b"PK\x03\x04 truncated")
    return args


def _corrupt_artifact(t: Path, r: Path) -> list[str]:
    bad = t / "model.pt"
    bad.write_bytes(b"\x80\x02 not a checkpoint")
    return ["run", suite_file(t), "grid.regularizer=[finetune]", f"stages.pretrain.file={bad}"]


class _Payload:
    """Unpickling this calls a function: what a hostile checkpoint does."""

    def __reduce__(self):
        return (print, ("payload ran",))


def _pickled_phi(t: Path, r: Path) -> list[str]:
    """A phi file that carries a pickle payload (code that would run on a plain torch.load)."""
    import torch

    bad = t / "phi.pt"
    torch.save({"kernel": _Payload()}, bad)
    return ["run", suite_file(t), "grid.regularizer=[metaperturb]", f"stages.metatrain.file={bad}"]


case("checkpoint-corrupt", 1, "delete it")(_corrupt_checkpoint)
case("artifact-not-a-checkpoint", 2, "stages.pretrain.file")(_corrupt_artifact)
case("phi-pickle-payload", 2, "cannot read MetaPerturb phi")(_pickled_phi)


# --- the results dir itself --------------------------------------------------------------------------------------
def _results_is_file(t: Path, r: Path) -> list[str]:
    f = t / "file"
    f.write_text("x")
    return ["run", suite_file(t), "--results", str(f)]


case("results-is-file", 2, "is a file")(_results_is_file)
case("results-unwritable", 2, "cannot create results dir")(
    lambda t, r: ["run", suite_file(t), "--results", "/proc/mpbench-results"])


def _newer_schema(t: Path, r: Path) -> list[str]:
    cfg = next(r.glob("runs/*/config.yaml"))
    data = yaml.safe_load(cfg.read_text())
    data["schema"] = 99
    cfg.write_text(yaml.safe_dump(data))
    (cfg.parent / "done").unlink()
    return ["run", suite_file(t)]


case("newer-schema", 2, "newer mpbench")(_newer_schema)
# --- other commands ----------------------------------------------------------------------------------------------
case("report-format", 2, "format")(lambda t, r: ["report", "--format", "pdf"])
case("report-key", 2, "report takes")(lambda t, r: ["report", "colour=red"])
case("status-unknown-suite", 2, "no results for suite")(lambda t, r: ["status", "suite=nothing"])
case("data-unknown", 2, "unknown dataset")(lambda t, r: ["data", "prepare", "imagenet"])
case("data-missing", 2, "cifar100")(lambda t, r: ["data", "verify", "cifar100", "--data", str(t / "empty")])
case("list-unknown", 2, "list")(lambda t, r: ["list", "optimizers"])
case("sites-unknown-model", 2, "unknown model")(lambda t, r: ["list", "regularizers", "--sites", "resnet_x"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A results dir holding one finished run (the thing that must never be lost or altered)."""
    from mpbench.cli import main  # noqa: F401
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("good")
    path = tmp / "good.yaml"
    path.write_text(yaml.safe_dump(GOOD_SUITE))
    res = tmp / "res"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    subprocess.run([sys.executable, "-m", "mpbench.cli", "run", f"suite={path}", "--results", str(res)],
                   check=True, capture_output=True, env=env, timeout=120)
    return res


def _snapshot(res: Path) -> dict[str, bytes]:
    return {str(p.relative_to(res)): p.read_bytes() for p in sorted(res.rglob("*"))
            if p.is_file() and p.name in ("result.json", "metrics.jsonl", "done", "config.yaml")}


@pytest.mark.parametrize("name, make_args, code, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(name, make_args, code, message, finished, tmp_path, cli, monkeypatch):
    res = tmp_path / "res"
    shutil.copytree(finished, res)
    monkeypatch.chdir(tmp_path)
    args = make_args(tmp_path, res)
    if "--results" not in args and args[0] in ("run", "report", "status"):
        args = [*args, "--results", str(res)]
    before = _snapshot(res)
    got, out, err = cli(*args)
    assert got == code, (out, err)
    assert "Traceback" not in out + err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert message in lines[0], lines[0]
    else:                                                 # the run failed and says why, on one line
        errors = [json.loads(p.read_text()).get("error") or "" for p in res.glob("runs/*/status.json")]
        assert any(message in e and "\n" not in e for e in errors), (errors, err)
    after = _snapshot(res)
    if name != "newer-schema":
        assert {k: v for k, v in after.items() if k in before} == before       # nothing finished was altered


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_report_skips_corrupt_run_dirs(finished, tmp_path, cli):
    res = tmp_path / "res"
    shutil.copytree(finished, res)
    good = next(res.glob("runs/*"))
    bad1 = res / "runs" / "base-conv4-synthetic-s9-deadbeef"
    shutil.copytree(good, bad1)
    (bad1 / "result.json").write_text("{ not json")
    bad2 = res / "runs" / "base-conv4-synthetic-s8-deadbee2"
    shutil.copytree(good, bad2)
    (bad2 / "status.json").write_text("\x00garbage")
    (bad2 / "result.json").write_text('{"schema": 99}')
    code, out, err = cli("report", "--results", res, "--format", "csv")
    assert code == 0
    assert "deadbeef" in err and "deadbee2" in err
