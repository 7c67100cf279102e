"""The ``metatrain`` stage: MetaPerturb's perturbation function meta-learned on class-disjoint source tasks
(``mpbench/metatrain/``); MetaPerturb runs read its ``phi.pt``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mpbench.config import AugmentConfig, DataConfig, check_choice, check_positive
from mpbench.jobs import JobKind, register_job_kind


@dataclass
class SelectionConfig:
    """Where the best of ``runs`` phis is chosen. ``dataset`` null: the source's test split (never seen by
    meta-training); else that dataset's training images after the first ``skip_per_class`` of each class (the
    paper: held-out CIFAR-100 disjoint from s-CIFAR100 = cifar100 with skip_per_class 50), at most ``per_class``
    of them per class. Either way halved per class: the first half trains a fresh network with phi frozen, the
    second half scores it."""

    dataset: Optional[str] = None
    skip_per_class: int = 0
    per_class: Optional[int] = None


@dataclass
class MetatrainStage:
    """Meta-training of MetaPerturb's perturbation function on class-disjoint source tasks."""

    file: Optional[str] = None          # use this phi file instead of meta-training (e.g. the official release)
    dataset: str = "mnist5k"
    model: str = "resnet20"
    split: str = "release"              # release (class groups halved into train/valid) | paper (class-wise splits)
    groups: int = 2                     # number of class-disjoint groups
    steps: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    clip: float = 100.0
    inner_steps: int = 1
    runs: int = 1                        # independent meta-training runs; the best phi on held-out data is kept
    select_steps: Optional[int] = None   # training steps of the held-out selection (None = min(steps, 200))
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 0            # meta-steps between resumable checkpoints; not identity
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@register_job_kind("metatrain", "MetaPerturb meta-training of the perturbation function on class-disjoint source "
                                "tasks; output: phi.pt (82 floats)")
class Metatrain(JobKind):
    config = MetatrainStage
    payload = "phi.pt"

    @classmethod
    def validate(cls, section: Any, prefix: str) -> None:
        check_choice(f"{prefix}.split", section.split, ("release", "paper"))
        for key in ("steps", "runs", "batch_size", "inner_steps", "groups", "lr"):
            check_positive(f"{prefix}.{key}", section[key])
        check_positive(f"{prefix}.checkpoint_every", section.checkpoint_every, allow_zero=True)
        check_positive(f"{prefix}.selection.skip_per_class", section.selection.skip_per_class, allow_zero=True)
        if section.selection.per_class is not None:
            check_positive(f"{prefix}.selection.per_class", section.selection.per_class)

    @classmethod
    def stage_spec(cls, section: dict[str, Any], run_spec: dict[str, Any], in_chans: int) -> dict[str, Any]:
        return dict(section)

    @classmethod
    def datasets(cls, spec: dict[str, Any]) -> list[str]:
        chosen_on = (spec.get("selection") or {}).get("dataset")
        return [spec["dataset"]] + ([chosen_on] if chosen_on and int(spec["runs"]) > 1 else [])

    @classmethod
    def steps(cls, spec: dict[str, Any]) -> int:
        return int(spec["steps"]) * int(spec["runs"])

    @classmethod
    def checkpoint_every(cls, spec: dict[str, Any]) -> int:
        return int(spec.get("checkpoint_every") or 0)

    @classmethod
    def check_file(cls, path: Path) -> None:
        from regularizers.metaperturb import load_phi_file

        load_phi_file(path)        # weights_only; a pickle payload or a wrong shape is a one-line UsageError

    @classmethod
    def execute(cls, spec: dict[str, Any], rd: Any, ex: Any) -> dict[str, Any]:
        from mpbench.metatrain import metatrain
        from mpbench.store import save_tensors

        out, phi = metatrain(spec, ex.data_root, ex.device, ex.hooks)
        save_tensors(Path(rd.path) / cls.payload, phi)
        return out
