"""MetaPerturb's source tasks and the held-out selection data (``shared/design/metaperturb.md`` section 2).

Classes ``0..K-1`` of the source training split are cut into ``groups`` contiguous, near-equal, class-disjoint
blocks, each relabelled ``0..k-1``:

- ``split: release`` (the authors' code): each group's images are halved per class in file order (A: the first
  ceil(n/2), B: the rest), giving the tasks (train A, valid B) and (train B, valid A): ``2 * groups`` tasks;
- ``split: paper`` ("class-wisely split into N splits", Ryu et al., NeurIPS 2020): one task per group, validated
  on the last fifth of each class's images (file order). The paper gives no fraction; a fifth keeps most images
  for theta while giving phi a fresh batch each step.

Best-of-runs selection uses the source *test* split (never seen by meta-training), halved per class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpbench.data.base import ImageData, class_ranks
from mpbench.errors import UsageError

SCHEMES = ("release", "paper")
PAPER_VALID_FRACTION = 0.2


@dataclass
class Task:
    index: int
    name: str
    group: int
    classes: list[int]          # labels of the source data (after data.classes), in the task's label order
    train: ImageData
    valid: ImageData
    train_part: str = "all"
    valid_part: str = "all"

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "group": self.group, "classes": list(self.classes),
                "num_classes": len(self.classes), "train": len(self.train), "valid": len(self.valid),
                "train_part": self.train_part, "valid_part": self.valid_part}


def class_groups(num_classes: int, groups: int) -> list[list[int]]:
    """``groups`` class-disjoint groups: contiguous near-equal blocks of ``0..num_classes-1`` (>= 2 classes each)."""
    if groups < 1:
        raise UsageError(f"stages.metatrain.groups={groups} must be >= 1")
    if num_classes // groups < 2:
        raise UsageError(f"stages.metatrain.groups={groups} leaves fewer than 2 classes per task "
                         f"({num_classes} source classes): lower groups")
    return [[int(c) for c in g] for g in np.array_split(np.arange(num_classes), groups)]


def _subset(d: ImageData, keep: np.ndarray) -> ImageData:
    keep_t = torch.from_numpy(keep)
    return ImageData(d.images[keep_t], d.labels[keep_t], d.num_classes)


def _rank_counts(d: ImageData) -> tuple[np.ndarray, np.ndarray]:
    labels = d.labels.numpy()
    ranks = class_ranks(labels, d.num_classes)
    counts = np.bincount(labels, minlength=d.num_classes)[labels]
    return ranks, counts


def halves(d: ImageData) -> tuple[ImageData, ImageData]:
    """Per class, in file order: the first ceil(n/2) images (A) and the rest (B)."""
    ranks, counts = _rank_counts(d)
    first = ranks < (counts + 1) // 2
    return _subset(d, first), _subset(d, ~first)


def held_out_part(d: ImageData, fraction: float = PAPER_VALID_FRACTION) -> tuple[ImageData, ImageData]:
    """Per class, in file order: (the first images, the last ``fraction`` (at least one) of them)."""
    ranks, counts = _rank_counts(d)
    n_valid = np.maximum(1, np.rint(counts * fraction).astype(np.int64))
    valid = ranks >= counts - n_valid
    return _subset(d, ~valid), _subset(d, valid)


def make_tasks(data: ImageData, scheme: str, groups: int) -> list[Task]:
    """The source tasks of ``scheme`` (``release``: 2 * groups tasks; ``paper``: groups tasks)."""
    from mpbench.data import class_split

    if scheme not in SCHEMES:
        raise UsageError(f"stages.metatrain.split={scheme!r}: use one of {', '.join(SCHEMES)}")
    cg = class_groups(data.num_classes, groups)
    tasks: list[Task] = []
    for g, (classes, d) in enumerate(zip(cg, class_split(data, cg))):
        if scheme == "release":
            a, b = halves(d)
            tasks.append(Task(len(tasks), f"g{g}:A>B", g, classes, a, b, "A", "B"))
            tasks.append(Task(len(tasks), f"g{g}:B>A", g, classes, b, a, "B", "A"))
        else:
            tr, va = held_out_part(d)
            tasks.append(Task(len(tasks), f"g{g}", g, classes, tr, va, "first 4/5 per class",
                              "last 1/5 per class"))
    return tasks


def split_rule(scheme: str) -> str:
    """How ``scheme`` forms its tasks, in words (recorded in the artifact)."""
    if scheme == "release":
        return ("class groups halved per class into A/B (file order); tasks (train A, valid B) "
                "and (train B, valid A)")
    return "one task per class group; valid = last fifth of each class (file order)"


def load_source(spec: dict[str, Any], data_root: Path) -> tuple[ImageData, ImageData]:
    """The source dataset's train split (meta-training) and test split (held-out selection)."""
    from mpbench.train import load_data

    return load_data({"dataset": spec["dataset"], "data": dict(spec["data"])}, Path(data_root))


def source_tasks(spec: dict[str, Any], data_root: Path) -> tuple[list[Task], ImageData]:
    """The stage's source tasks and the source test split."""
    train, test = load_source(spec, data_root)
    return make_tasks(train, spec["split"], int(spec["groups"])), test


def selection_data(test: ImageData, spec: dict[str, Any] | None = None, data_root: Path | None = None
                   ) -> tuple[ImageData, ImageData]:
    """The held-out selection task, halved per class (train half, scoring half): the source test split, or the
    images of ``spec["selection"]["dataset"]``'s training split after the first ``skip_per_class`` of each class
    (at most ``per_class`` of them), at the stage's image size and channels."""
    chosen = (spec or {}).get("selection") or {}
    if not chosen.get("dataset"):
        return halves(test)
    from mpbench.train import load_data

    train, _ = load_data({"dataset": chosen["dataset"], "data": {**dict(spec["data"]), "per_class": None,
                                                                 "classes": None}}, Path(data_root))
    ranks, _ = _rank_counts(train)
    skip, take = int(chosen.get("skip_per_class") or 0), chosen.get("per_class")
    keep = (ranks >= skip) & ((ranks < skip + int(take)) if take is not None else True)
    if not keep.any():
        raise UsageError(f"stages.metatrain.selection: {chosen['dataset']} has no training image after the first "
                         f"{skip} of each class: lower selection.skip_per_class")
    return halves(_subset(train, np.asarray(keep)))
