"""Shared test setup: offline, no W&B network, small thread counts, tiny suites on synthetic data."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MPBENCH_OFFLINE"] = "1"          # assets are never downloaded by a test
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import yaml  # noqa: E402

import torch  # noqa: E402

from mpbench.regularization import REGULARIZERS, Regularizer, register_regularizer  # noqa: E402

if "test_nan" not in REGULARIZERS:
    @register_regularizer("test_nan")
    class NanAt(Regularizer):
        """Test-only: a NaN penalty at step 2 (in-process launchers only)."""

        citation = "test fixture"

        def begin_step(self, step):
            self.step = step

        def penalty(self, model, x, target, logits):
            return torch.tensor(float("nan")) if self.step == 2 else None


TINY = {
    "name": "tiny",
    "description": "test suite",
    "grid": {"regularizer": ["base"], "model": ["conv4"], "dataset": ["synthetic"], "seed": [0]},
    "train": {"steps": 6, "batch_size": 32, "eval_every": 3, "eval_batch_size": 100},
    "model_kwargs": {"width": 8},
}


@pytest.fixture
def make_suite(tmp_path: Path):
    """Write a suite YAML (TINY updated with the given sections) and return its path."""

    def make(name: str = "tiny", **sections) -> Path:
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
        data["name"] = name
        for k, v in sections.items():
            data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``mpbench ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from mpbench.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["mpbench", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (exact numbers do not depend on the thread count), put back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
