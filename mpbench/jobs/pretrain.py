"""The ``pretrain`` stage: supervised training of the target architecture on a source dataset; fine-tuning
baselines start from its ``model.pt``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mpbench.config import DataConfig, TrainConfig, validate_train
from mpbench.errors import UsageError
from mpbench.jobs import JobKind, register_job_kind


@dataclass
class PretrainStage:
    """Supervised training of the target architecture on a source dataset (for fine-tuning baselines)."""

    file: Optional[str] = None          # use this model.pt (a state_dict of the target architecture) instead
    dataset: str = "mnist5k"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@register_job_kind("pretrain", "supervised training on a source dataset; output: model.pt (same architecture)")
class Pretrain(JobKind):
    config = PretrainStage
    payload = "model.pt"

    @classmethod
    def validate(cls, section: Any, prefix: str) -> None:
        validate_train(section.train, f"{prefix}.train")

    @classmethod
    def stage_spec(cls, section: dict[str, Any], run_spec: dict[str, Any], in_chans: int) -> dict[str, Any]:
        data = dict(section["data"], channels=section["data"]["channels"] or in_chans)  # same architecture
        return {"regularizer": ["base"], "model": run_spec["model"], "model_kwargs": run_spec["model_kwargs"],
                "dataset": section["dataset"], "data": data, "seed": section["seed"], "train": section["train"],
                "reg": {}, "artifacts": {}}

    @classmethod
    def check_file(cls, path: Path) -> None:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file
            raise UsageError(f"stages.pretrain.file {path} is not a weights-only torch checkpoint "
                             f"({type(e).__name__}): give a model.pt state dict") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UsageError(f"stages.pretrain.file {path} is not a state dict of tensors: give a model.pt")

    @classmethod
    def execute(cls, spec: dict[str, Any], rd: Any, ex: Any) -> dict[str, Any]:
        from mpbench.store import save_tensors
        from mpbench.train import build, train_loop

        setup = build(spec, ex.data_root, ex.device, {})
        out = train_loop(setup, spec, ex.device, ex.hooks)
        save_tensors(rd.path / cls.payload, {k: v.cpu() for k, v in setup.model.state_dict().items()})
        return {**out, "num_classes": setup.num_classes, "payload": cls.payload}
