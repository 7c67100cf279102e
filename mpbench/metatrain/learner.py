"""One source task's learner theta_k, with phi shared (``shared/design/metaperturb.md`` sections 1-2).

Each task has its own network (the stage's ``model``, built with ``timm.create_model``) with its own
:class:`~regularizers.metaperturb.PerturbFunction` at every ``"block"`` site, wired as the MetaPerturb regularizer
wires it (:func:`regularizers.metaperturb.attach_perturbation`: widest perturbed layer as ``channel_norm``, image
size as ``spatial_norm``): per-site running statistics are per task, as in the release where every task is its own
process, and the six parameters *are* the shared phi. Every random stream (initialisation, train and valid
batches, Gaussian draws) is a generator seeded from ``(run seed, task, purpose)``, so every execution mode draws
the same numbers. Train and valid batches are both augmented per ``augment`` (both are training images of the
source set).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mpbench.batches import BatchStream
from mpbench.data.base import ImageData
from mpbench.errors import RunFailed
from mpbench.sites import is_batchnorm

# purposes of the per-task random streams
INIT, TRAIN, VALID, EPS = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (independent streams for (run seed, task, purpose))."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def stream_seeds(*parts: int) -> tuple[int, int, int, int]:
    """The seeds of a learner's (init, train, valid, eps) streams, derived from ``parts``."""
    return tuple(derive_seed(*parts, p) for p in (INIT, TRAIN, VALID, EPS))


def new_phi(seed: int, device: torch.device):
    """A fresh phi (PerturbFunction parameters, N(0, 0.01) init) seeded by ``seed``."""
    from regularizers.metaperturb import PerturbFunction

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        phi = PerturbFunction(num_sites=1)
    return phi.to(device)


class Learner:
    """theta_k: a network with its own PerturbFunction (buffers: per-site running statistics) whose parameters are
    the shared phi, its Adam optimizer (theta only), its train/valid batch streams and its Gaussian generator."""

    def __init__(self, spec: dict[str, Any], train: ImageData, valid: ImageData | None, num_classes: int, phi,
                 seeds: tuple[int, int, int, int], device: torch.device, batch_size: int | None = None):
        import timm

        import mpbench.models  # noqa: F401  (registers the CIFAR networks into timm)
        from regularizers.metaperturb import attach_perturbation

        init, s_train, s_valid, s_eps = seeds
        self.device = device
        in_chans, size = int(train.images.shape[1]), int(train.images.shape[-1])
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(s_eps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init)
            net = timm.create_model(spec["model"], num_classes=num_classes, in_chans=in_chans,
                                    **dict(spec["model_kwargs"]))
            # phi shared (its requires_grad as the trainer sets it), each site's noise from this task's generator
            wired = attach_perturbation(net, size, phi=phi, trainable=None, generator=self.gen,
                                        owner=f"stages.metatrain.model={spec['model']}")
        self.net, self.fn = net.to(device), wired.fn
        self.sites = wired.sites
        fn = self.fn
        self.channel_norm, self.spatial_norm = fn.channel_norm, fn.spatial_norm
        phi_ids = {id(p) for p in phi.parameters()}
        self.phi_params = list(phi.parameters())
        self.theta = [p for p in net.parameters() if id(p) not in phi_ids]
        fn_prefix = next(n for n, m in net.named_modules() if m is fn)
        self.phi_keys = {f"{fn_prefix}.{k}" for k, _ in phi.named_parameters()}
        self.opt = torch.optim.Adam(self.theta, lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))
        bs = int(batch_size or spec["batch_size"])
        aug = spec["augment"]
        crop, flip = int(aug["crop_pad"]), bool(aug["flip"])
        self.train_stream = BatchStream(train.images, train.labels, bs, s_train, device, crop, flip)
        self.valid_stream = (BatchStream(valid.images, valid.labels, bs, s_valid, device, crop, flip)
                             if valid is not None else None)

    def inner(self, steps: int) -> float:
        """``steps`` steps of theta on train batches with phi frozen; returns the mean cross-entropy."""
        self.fn.phi_trainable = False
        self.net.train()
        total = 0.0
        for _ in range(steps):
            x, y = self.train_stream.next()
            loss = F.cross_entropy(self.net(x), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += float(loss.detach())
        return total / max(steps, 1)

    def phi_grad(self) -> tuple[list[torch.Tensor], float]:
        """BatchNorm in eval mode, perturbation in training mode: d CE(valid batch) / d phi (theta untouched)."""
        self.net.train()
        for m in self.net.modules():
            if is_batchnorm(m):
                m.eval()
        self.fn.phi_trainable = True
        try:
            x, y = self.valid_stream.next()
            loss = F.cross_entropy(self.net(x), y)
            grads = torch.autograd.grad(loss, self.phi_params)
        finally:
            self.fn.phi_trainable = False
            self.net.train()
        return [g.detach() for g in grads], float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        net = {k: v for k, v in self.net.state_dict().items() if k not in self.phi_keys}
        out = {"net": net, "opt": self.opt.state_dict(), "train_stream": self.train_stream.state_dict(),
               "eps_gen": self.gen.get_state()}
        if self.valid_stream is not None:
            out["valid_stream"] = self.valid_stream.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing, unexpected = self.net.load_state_dict(state["net"], strict=False)
        if set(missing) != self.phi_keys or unexpected:
            raise RunFailed(f"metatrain checkpoint does not match the network (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}): delete checkpoint.pt to restart")
        self.opt.load_state_dict(state["opt"])
        self.train_stream.load_state_dict(state["train_stream"])
        if self.valid_stream is not None:
            self.valid_stream.load_state_dict(state["valid_stream"])
        self.gen.set_state(state["eps_gen"])
