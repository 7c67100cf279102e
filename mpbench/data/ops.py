"""Pure transforms of ``ImageData``: class subsets, first-n per class, class-disjoint tasks, channels, resizing.

None of them modifies its input in place (decoded arrays are cached and shared between callers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpbench.data.base import ImageData, class_ranks
from mpbench.errors import UsageError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's "L" mode and torchvision's rgb_to_grayscale
CHUNK = 2048  # images per float chunk, to bound memory when resizing large sets


def select_classes(data: ImageData, classes: list[int]) -> ImageData:
    """Keep the listed classes, relabelled ``0..k-1`` in the given order; images stay in file order."""
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes):
        raise UsageError(f"classes must be a non-empty list without repeats, got {classes}")
    bad = [c for c in classes if not 0 <= c < data.num_classes]
    if bad:
        raise UsageError(f"classes {bad} out of range 0..{data.num_classes - 1}")
    lut = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    new = lut[data.labels]
    keep = new >= 0
    return ImageData(data.images[keep], new[keep], len(classes))


def first_per_class(data: ImageData, n: int) -> ImageData:
    """Keep the first ``n`` images of each class (all of a class that has fewer), in file order."""
    if n < 1:
        raise UsageError(f"per_class must be >= 1, got {n}")
    keep = torch.from_numpy(class_ranks(data.labels.numpy(), data.num_classes) < n)
    return ImageData(data.images[keep], data.labels[keep], data.num_classes)


def held_out_per_class(data: ImageData, per_class: int, take: int) -> ImageData:
    """The images of each class that ``first_per_class(data, per_class)`` leaves out, at most ``take`` of them per
    class, in file order: the ``per_class``-th to ``per_class + take - 1``-th image of each class (0-based). Disjoint
    from the ``per_class`` subset, e.g. a validation set beside s-CIFAR100 (``per_class=50``). A class with at most
    ``per_class`` images contributes none; none left at all is a ``UsageError``."""
    if per_class < 0 or take < 1:
        raise UsageError(f"held-out images need per_class >= 0 and take >= 1, got per_class={per_class}, take={take}")
    ranks = torch.from_numpy(class_ranks(data.labels.numpy(), data.num_classes))
    keep = (ranks >= per_class) & (ranks < per_class + take)
    if not bool(keep.any()):
        raise UsageError(f"no class has more than {per_class} images, so none are held out: lower per_class")
    return ImageData(data.images[keep], data.labels[keep], data.num_classes)


def class_split(data: ImageData, groups: list[list[int]]) -> list[ImageData]:
    """Class-disjoint tasks, one per group of original labels, each relabelled ``0..k-1`` in the group's order."""
    seen: set[int] = set()
    for group in groups:
        overlap = seen.intersection(int(c) for c in group)
        if overlap:
            raise UsageError(f"class groups must be disjoint; {sorted(overlap)} appear twice")
        seen.update(int(c) for c in group)
    return [select_classes(data, group) for group in groups]


def to_channels(data: ImageData, channels: int) -> ImageData:
    """Grayscale -> RGB by repeating the channel; RGB -> grayscale by BT.601 luma."""
    have = data.images.shape[1]
    if channels == have:
        return data
    if (have, channels) == (1, 3):
        return ImageData(data.images.repeat(1, 3, 1, 1), data.labels, data.num_classes)
    if (have, channels) == (3, 1):
        weights = torch.tensor(LUMA).view(1, 3, 1, 1)
        out = torch.empty((len(data), 1, *data.images.shape[2:]), dtype=torch.uint8)
        for i in range(0, len(data), CHUNK):
            luma = (data.images[i:i + CHUNK].float() * weights).sum(1, keepdim=True)
            out[i:i + CHUNK] = luma.round_().clamp_(0, 255).to(torch.uint8)
        return ImageData(out, data.labels, data.num_classes)
    raise UsageError(f"cannot convert {have} channels to {channels} (supported: 1 <-> 3)")


def resize(data: ImageData, size: int) -> ImageData:
    """Resize to ``size`` x ``size``: bilinear with antialiasing, computed by torch's native uint8 kernel (the one
    torchvision's ``Resize`` uses on uint8 tensors; within 1 of the rounded float result)."""
    if size < 1:
        raise UsageError(f"image_size must be >= 1, got {size}")
    if tuple(data.images.shape[2:]) == (size, size):
        return data
    out = torch.empty((len(data), data.images.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(data), CHUNK):
        out[i:i + CHUNK] = F.interpolate(data.images[i:i + CHUNK], size=(size, size), mode="bilinear",
                                         antialias=True, align_corners=False)
    return ImageData(out, data.labels, data.num_classes)
