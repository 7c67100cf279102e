"""Device-resident training batches: the whole (small) dataset lives on the device as uint8 and each batch is
shuffled, randomly cropped, flipped and normalised there, so CPU and CUDA runs share one fast path."""
from __future__ import annotations

from typing import Any, Iterator

import torch

MEAN, STD = 0.5, 0.5        # MetaPerturb's release normalises every dataset with mean 0.5 / std 0.5


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    return standardise(images_u8.float() / 255.0)


def standardise(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - MEAN) / STD


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, per sample, vectorised."""
    b, _, h, w = x.shape
    if pad > 0:
        shifts = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).to(x.device)
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (shifts[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (shifts[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None, None],
               torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


class BatchStream:
    """An endless stream of shuffled training batches (last partial batch of an epoch dropped).

    Its position and RNG are part of ``state_dict`` so a resumed run sees exactly the same batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 device: torch.device, crop_pad: int = 0, flip: bool = False):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.crop_pad, self.flip = crop_pad, flip
        self.gen = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.order):
            self.order = torch.randperm(len(self.labels), generator=self.gen)
            self.pos = 0
            self.epoch += 1
        idx = self.order[self.pos:self.pos + self.batch_size].to(self.device)
        self.pos += self.batch_size
        x = self.images[idx].float() / 255.0
        if self.crop_pad or self.flip:    # pad with black before normalising, as torchvision's RandomCrop does
            x = random_crop_flip(x, self.crop_pad, self.flip, self.gen)
        return standardise(x), self.labels[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "order": self.order, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.pos, self.epoch = state["order"], int(state["pos"]), int(state["epoch"])


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every test image once, in order (no partial batch is dropped)."""
    for i in range(0, len(labels), batch_size):
        yield normalise(images[i:i + batch_size].to(device)), labels[i:i + batch_size].to(device)
