"""A new evaluation, job kind, dataset and regularizer are each one file of their own: here, test plugins
registered through the public API only (no core module edited), used together by one suite end to end."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mpbench.data import DatasetSource, ImageData, register_dataset
from mpbench.evals import EVALS, EvalContext, Evaluation, Metric, register_eval
from mpbench.hparams import Hparam, at_least, between
from mpbench.jobs import JOB_KINDS, JobKind, register_job_kind
from mpbench.regularization import REGULARIZERS, Regularizer, register_regularizer
from mpbench.store import save_tensors

if True:  # the plugins: each would be one file of its own; registered by the fixture below
    class Blobs(DatasetSource):
        """Test plugin: 4 classes of constant-colour 8x8 images (learnable in a few steps)."""

        citation = "test fixture"
        how_to_get = "nothing to get: generated"
        num_classes, channels, image_size = 4, 3, 8
        sizes = {"train": 64, "test": 32}
        builtin = True

        def read(self, root: Path, split: str) -> ImageData:
            n = self.sizes[split]
            labels = np.arange(n) % self.num_classes
            images = np.repeat((labels * 60 + 20)[:, None, None, None], 3, 1) * np.ones((1, 1, 8, 8))
            return ImageData.from_numpy(images, labels, self.num_classes)

    @dataclass
    class ScaleStage:
        file: str | None = None
        scale: float = 2.0
        dataset: str = "plugin_blobs"

    class ScaleKind(JobKind):
        config = ScaleStage
        payload = "scale.pt"

        @classmethod
        def stage_spec(cls, section: dict[str, Any], run_spec: dict[str, Any], in_chans: int) -> dict[str, Any]:
            return dict(section)

        @classmethod
        def slug(cls, spec: dict[str, Any]) -> str:
            return f"{cls.name}-{spec['dataset']}"

        @classmethod
        def steps(cls, spec: dict[str, Any]) -> int:
            return 1

        @classmethod
        def checkpoint_every(cls, spec: dict[str, Any]) -> int:
            return 0

        @classmethod
        def execute(cls, spec: dict[str, Any], rd: Any, ex: Any) -> dict[str, Any]:
            save_tensors(rd.path / cls.payload, {"scale": torch.tensor(float(spec["scale"]))})
            return {"payload": cls.payload}

    class LogitScale(Regularizer):
        """Test plugin: multiplies the logits by the plugin_scale stage's number."""

        citation = "test fixture"
        requires = ("plugin_scale",)
        hparams = {"extra": Hparam(1.0, "extra factor", between(0, 10))}

        def attach(self, model):
            art = Path(self.ctx.artifacts["plugin_scale"]) / "scale.pt"
            scale = float(torch.load(art, weights_only=True)["scale"]) * float(self.hp["extra"])
            model.register_forward_hook(lambda m, i, out: out * scale)
            self.chosen_sites = ["logits"]

    class Margin(Evaluation):
        """Test plugin: mean top-1 logit margin."""

        citation = "test fixture"
        metrics = (Metric("margin", "logit margin", "", "higher", decimals=1),
                   Metric("margins", "margin per class", "", None, kind="array"))
        settings = {"batches": Hparam(1, "test batches", at_least(1, integer=True))}

        @torch.no_grad()
        def run(self, ctx: EvalContext) -> dict[str, Any]:
            x = (ctx.test_x.float() / 255 - 0.5) / 0.5
            logits = ctx.model.eval()(x.to(ctx.device))
            top2 = logits.topk(2, dim=1).values
            margin = (top2[:, 0] - top2[:, 1]).cpu()
            per = [float(margin[ctx.test_y == c].mean()) for c in range(int(ctx.test_y.max()) + 1)]
            return {"margin": float(margin.mean()), "margins": per}


@pytest.fixture(autouse=True)
def plugins():
    """Register the four plugins through the public decorators for this module's tests only."""
    from mpbench.data import DATASETS

    register_dataset("plugin_blobs")(Blobs)
    register_job_kind("plugin_scale", "test plugin: a stage that writes one number")(ScaleKind)
    register_regularizer("plugin_logit_scale")(LogitScale)
    register_eval("plugin_margin")(Margin)
    yield
    for registry, name in ((DATASETS, "plugin_blobs"), (JOB_KINDS, "plugin_scale"),
                           (REGULARIZERS, "plugin_logit_scale"), (EVALS, "plugin_margin")):
        registry.remove(name)


def _suite(tmp_path: Path) -> Path:
    suite = {
        "name": "plugins", "grid": {"regularizer": ["base", "plugin_logit_scale"], "model": ["conv4"],
                                    "dataset": ["plugin_blobs"], "seed": [0]},
        "train": {"steps": 3, "batch_size": 16, "eval_batch_size": 32},
        "model_kwargs": {"width": 8},
        "eval": ["classification", "plugin_margin"],
        "stages": {"plugin_scale": {"scale": 3.0}},
    }
    path = tmp_path / "plugins.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_each_plugin_kind_is_registered():
    from mpbench.data import DATASETS

    assert "plugin_blobs" in DATASETS
    assert "plugin_scale" in JOB_KINDS and JOB_KINDS.get("plugin_scale").is_stage()
    assert "plugin_logit_scale" in REGULARIZERS
    assert "plugin_margin" in EVALS


def test_plugins_run_end_to_end_and_report(cli, tmp_path):
    res = tmp_path / "res"
    code, out, err = cli("run", f"suite={_suite(tmp_path)}", "--results", res, "launcher.name=local")
    assert code == 0, err
    results = [json.loads(p.read_text()) for p in res.glob("runs/*/result.json")]
    assert len(results) == 2
    for r in results:
        assert {"acc", "nll", "ece", "margin", "margins"} <= set(r["final"])
        assert len(r["final"]["margins"]) == 4
    scaled = next(r for r in results if r["spec"]["regularizer"] == ["plugin_logit_scale"])
    stage = next(res.glob("artifacts/plugin_scale-*"))
    assert scaled["spec"]["artifacts"]["plugin_scale"] == stage.name and (stage / "scale.pt").is_file()
    code, out, _ = cli("report", "suite=plugins", "--results", res, "metric=margin", "--format", "csv")
    assert code == 0 and "margin" in out
    assert sum(1 for line in out.splitlines()[1:] if line.strip()) == 2


def test_plugin_settings_are_checked_before_training(cli, tmp_path):
    res = tmp_path / "res"
    suite = _suite(tmp_path)
    code, _, err = cli("run", f"suite={suite}", "--results", res, "eval_settings.plugin_margin.batches=0",
                       "reg.plugin_logit_scale.extra=11", "stages.plugin_scale.scale=oops")
    assert code == 2 and not res.exists()
    assert "stages.plugin_scale.scale" in err
    code, _, err = cli("run", f"suite={suite}", "--results", res, "eval_settings.plugin_margin.batches=0",
                       "reg.plugin_logit_scale.extra=11")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and not res.exists()
    assert any("eval_settings.plugin_margin.batches=0" in ln for ln in lines)
    assert any("reg.plugin_logit_scale.extra=11" in ln for ln in lines)
