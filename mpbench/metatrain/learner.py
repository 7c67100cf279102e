"""One source task's learner theta_k, with phi shared (``shared/design/metaperturb.md`` sections 1-2).

Each task has its own network (the stage's ``model``, built with ``timm.create_model``) with its own
:class:`~regularizers._perturb.PerturbFunction` at every ``"block"`` site: per-site running statistics are per
task, as in the release where every task is its own process, and the six parameters *are* the shared phi.
``channel_norm`` / ``spatial_norm`` follow the MetaPerturb regularizer (widest perturbed layer, image size).
Every random stream (initialisation, train and valid batches, Gaussian draws) is a generator seeded from
``(run seed, task, purpose)``, so every execution mode draws the same numbers. Train and valid batches are both
augmented per ``augment`` (both are training images of the source set).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpbench.batches import BatchStream
from mpbench.data.base import ImageData
from mpbench.errors import RunFailed, UsageError

# purposes of the per-task random streams
INIT, TRAIN, VALID, EPS = 0, 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (independent streams for (run seed, task, purpose))."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def stream_seeds(*parts: int) -> tuple[int, int, int, int]:
    """The seeds of a learner's (init, train, valid, eps) streams, derived from ``parts``."""
    return tuple(derive_seed(*parts, p) for p in (INIT, TRAIN, VALID, EPS))


class TaskSite(nn.Module):
    """``out = fn(h, site=index, eps=<draw from this task's generator>)`` at one insertion site, noise coefficient 1.

    The first site registers ``fn`` as its submodule; the others hold a plain reference (one module per net)."""

    def __init__(self, fn, index: int, gen: torch.Generator, register: bool):
        super().__init__()
        if register:
            self.fn = fn
        else:
            self.__dict__["fn"] = fn
        self.__dict__["gen"] = gen
        self.index = int(index)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        fn = self.fn
        eps = None if fn.deterministic else torch.randn(h.shape, generator=self.gen, device=h.device, dtype=h.dtype)
        return fn(h, site=self.index, noise_coeff=1.0, eps=eps)


def new_phi(seed: int, device: torch.device):
    """A fresh phi (PerturbFunction parameters, N(0, 0.01) init) seeded by ``seed``."""
    from regularizers._perturb import PerturbFunction

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        phi = PerturbFunction(num_sites=1)
    return phi.to(device)


def _share_phi(fn: nn.Module, phi: nn.Module) -> None:
    """Make ``fn``'s six parameters the very Parameter objects of ``phi``."""
    for name, p in phi.named_parameters():
        mod, _, attr = name.rpartition(".")
        setattr(fn.get_submodule(mod) if mod else fn, attr, p)


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class Learner:
    """theta_k: a network with its own PerturbFunction (buffers: per-site running statistics) whose parameters are
    the shared phi, its Adam optimizer (theta only), its train/valid batch streams and its Gaussian generator."""

    def __init__(self, spec: dict[str, Any], train: ImageData, valid: ImageData | None, num_classes: int, phi,
                 seeds: tuple[int, int, int, int], device: torch.device, batch_size: int | None = None):
        import timm

        import mpbench.models  # noqa: F401  (registers the CIFAR networks into timm)
        from mpbench.sites import insert, list_sites
        from regularizers._perturb import PerturbFunction
        from regularizers.metaperturb import default_channel_norm

        init, s_train, s_valid, s_eps = seeds
        self.device = device
        in_chans, size = int(train.images.shape[1]), int(train.images.shape[-1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init)
            net = timm.create_model(spec["model"], num_classes=num_classes, in_chans=in_chans,
                                    **dict(spec["model_kwargs"]))
            sites = list_sites(net, "block")
            if not sites:
                raise UsageError(f"stages.metatrain.model={spec['model']} has no block sites to perturb")
            channels = [s.channels for s in sites]
            fn = PerturbFunction(num_sites=len(sites), channel_norm=default_channel_norm(channels),
                                 spatial_norm=size, channels=channels)
        _share_phi(fn, phi)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(s_eps)
        for i, s in enumerate(sites):
            insert(net, s.name, TaskSite(fn, i, self.gen, register=(i == 0)), key="metaperturb")
        self.net, self.fn = net.to(device), fn
        self.sites = [s.name for s in sites]
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
            if _is_bn(m):
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
