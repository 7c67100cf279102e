"""A seeded, learnable toy dataset for tests and smoke runs: no files, decoded in milliseconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpbench.data.base import DatasetSource, ImageData, register_dataset


@register_dataset("synthetic")
class Synthetic(DatasetSource):
    """Toy 3x16x16 images: 10 classes of smooth colour patterns, randomly shifted, plus Gaussian noise."""

    citation = "mpbench synthetic data (no publication)."
    how_to_get = "nothing to get: generated from a fixed seed"
    num_classes, channels, image_size = 10, 3, 16
    default_image_size = image_size  # native
    sizes = {"train": 600, "test": 200}
    builtin = True
    seed, noise, max_shift = 0, 48.0, 3

    def read(self, root: Path, split: str) -> ImageData:
        k, s, pad = self.num_classes, self.image_size, self.max_shift
        rng = np.random.default_rng(self.seed)
        coarse = torch.from_numpy(rng.uniform(0.0, 255.0, (k, 3, 5, 5)))
        protos = F.interpolate(coarse, size=(s + pad, s + pad), mode="bilinear", align_corners=True).numpy()
        n = self.sizes[split]
        labels = np.arange(n) % k  # classes interleaved, so "first n per class" is a real choice
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
        dy, dx = rng.integers(0, pad + 1, (2, n))
        rows = (dy[:, None] + np.arange(s))[:, None, :, None]
        cols = (dx[:, None] + np.arange(s))[:, None, None, :]
        images = protos[labels[:, None, None, None], np.arange(3)[None, :, None, None], rows, cols]
        images = images + rng.normal(0.0, self.noise, images.shape)
        return ImageData.from_numpy(np.clip(np.rint(images), 0, 255), labels, k)
