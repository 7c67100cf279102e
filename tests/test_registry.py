"""Generic checks over the whole regularizer registry: a new method is covered by adding its file.

For every registered method and every paper architecture it accepts: it trains 2 steps on the CPU, its result
records its evaluation protocol and hyperparameters, and a deterministic protocol really is deterministic.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

import mpbench.models  # noqa: F401
from mpbench.errors import IncompatibleError
from mpbench.regularization import REGULARIZERS, resolve_hparams
from mpbench.store import save_tensors
from mpbench.evals.classification import predict_metrics
from mpbench.train import RunHooks, build, train_loop

PAPER_ARCHS = ["resnet20", "conv4", "vgg9", "wrn_28_2"]
METHODS = [n for n in REGULARIZERS.names() if not n.startswith("test_")]


def _spec(method: str, model: str) -> dict:
    return {"regularizer": [method], "model": model, "model_kwargs": {}, "dataset": "synthetic", "seed": 0,
            "data": {"image_size": 16, "channels": None, "per_class": None, "classes": None},
            "train": {"steps": 2, "batch_size": 8, "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4,
                      "momentum": 0.9, "schedule": "multistep", "milestones": [0.4, 0.7, 0.9], "gamma": 0.3,
                      "eval_every": 0, "eval_batch_size": 100, "eval_passes": 2, "final_eval_passes": 2,
                      "augment": {"crop_pad": 2, "flip": True}},
            "reg": {method: resolve_hparams(method, {})}, "artifacts": {}}


def _artifacts(kinds, model: str, tmp_path) -> dict:
    out = {}
    for kind in kinds:
        d = tmp_path / kind
        d.mkdir()
        if kind == "pretrain":
            src = timm.create_model(model, num_classes=5, in_chans=3)
            save_tensors(d / "model.pt", src.state_dict())
            (d / "artifact.json").write_text(json.dumps({"kind": "pretrain", "id": "fake", "num_classes": 5,
                                                         "spec": {"model": model, "dataset": "synthetic"}}))
        elif kind == "metatrain":
            from regularizers.metaperturb import PerturbFunction

            torch.manual_seed(0)
            save_tensors(d / "phi.pt", PerturbFunction(num_sites=1, channel_norm=64, spatial_norm=16).phi_state_dict())
        out[kind] = d
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", PAPER_ARCHS)
def test_trains_two_steps_and_records_protocol(method, model, tmp_path):
    torch.manual_seed(0)
    spec = _spec(method, model)
    cls = REGULARIZERS.get(method)
    arts = _artifacts(cls.requires_for(spec["reg"][method]), model, tmp_path)
    try:
        setup = build(spec, tmp_path, torch.device("cpu"), arts)
    except IncompatibleError as e:                     # declared incompatible: must say so in one line
        assert "\n" not in str(e) and str(e)
        pytest.skip(f"{method} rejects {model}: {e}")
    out = train_loop(setup, spec, torch.device("cpu"), RunHooks())
    assert 0.0 <= out["final"]["acc"] <= 1.0 and out["final"]["nll"] == out["final"]["nll"]
    desc = setup.stack.describe()[method]
    assert desc["eval"] == setup.stack.eval_protocol.describe()
    json.dumps(desc)                                   # recorded in result.json
    if not setup.stack.eval_protocol.stochastic:       # deterministic protocol: two evaluations agree exactly
        x, y = setup.test_x[:16], setup.test_y[:16]
        a = predict_metrics(setup.model, x, y, 16, 1, torch.device("cpu"))
        b = predict_metrics(setup.model, x, y, 16, 1, torch.device("cpu"))
        assert a == b


def test_every_method_documents_itself():
    for e in REGULARIZERS.entries():
        if e.name.startswith("test_"):
            continue
        assert e.description, e.name
        assert e.obj.citation, e.name
