"""Seed arrays: K runs that differ only by seed, trained as one (model ensembling with torch.func).

The K models' parameters and buffers are stacked along a new leading dimension (``torch.func.stack_module_state``)
and one vmapped ``functional_call`` runs all K forwards at once, each model on its own batch, as in PyTorch's
"Model ensembling" tutorial (https://pytorch.org/tutorials/intermediate/ensembling.html; API:
https://pytorch.org/docs/stable/func.api.html). What stays per model:

- gradients: the loss is the sum of the K models' losses, and model k's loss depends only on slice k;
- BatchNorm statistics: the buffers are stacked and vmapped too, so train-mode BatchNorm updates slice k of
  ``running_mean`` / ``running_var`` / ``num_batches_tracked`` from model k's batch only;
- optimizer state: one Adam/SGD (``train.make_optimizer``, as a run builds it) over the stacked tensors; both are
  element-wise (L2 weight decay, moments, momentum), so slice k of every state tensor is model k's state;
- batches: one :class:`mpbench.batches.BatchStream` per seed, as each run's ``Stepper`` builds it.

Shared, hence required equal (``seed_only``): the learning-rate schedule and every other spec value but the seed.
train.py has no other cross-element operation (no gradient clipping). Methods: only those verified against separate
runs (``VERIFIED``, tests/test_seed_array.py); ``supports`` says why any other is refused. A model that draws
dropout masks is refused too: under vmap (``randomness="different"``) each model gets its own draws, but from the
global generator, not from its seed's. The step runs eagerly (no execution options).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from mpbench.batches import BatchStream
from mpbench.errors import RunFailed, UsageError
from mpbench.regularization import REGULARIZERS, Regularizer, RegularizerStack
from mpbench.train import Setup, lr_factor, make_optimizer, soft_cross_entropy

# methods whose seed array equals separate runs (tests/test_seed_array.py): no hook besides a per-sample,
# deterministic transform_batch
VERIFIED = ("base", "label_smoothing")
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_HOOKS = ("attach", "param_groups", "begin_step", "transform_batch", "penalty", "end_forward", "state_dict")


def supports(methods: RegularizerStack | Sequence[str]) -> str | None:
    """None if a run of ``methods`` can train in a seed array, else why not (one line)."""
    names = [m.name for m in methods.members] if isinstance(methods, RegularizerStack) else list(methods)
    refused = [n for n in names if n not in VERIFIED]
    if not refused:
        return None
    why = []
    for n in refused:
        cls = REGULARIZERS.get(n)
        hooks = [h for h in _HOOKS if getattr(cls, h) is not getattr(Regularizer, h)]
        why.append(f"{n} (hooks: {', '.join(hooks) or 'none'})")
    return (f"not verified in a seed array: {'; '.join(why)}; verified: {', '.join(VERIFIED)} (random, stateful or "
            f"model-reading hooks need their own equality test under vmap)")


def why_alone(spec: dict[str, Any]) -> str:
    """Why a run trained alone although ``execution.seed_array`` was asked (the reason recorded in its result)."""
    return supports(spec["regularizer"]) or "no other seed of this run was due in the same wave"


def seed_only(specs: Sequence[dict[str, Any]]) -> str | None:
    """None if ``specs`` are runs (one or more) with distinct seeds and otherwise equal, else why not."""
    if not specs:
        return "a seed array needs at least one run"
    seeds = [s["seed"] for s in specs]
    if len(set(seeds)) != len(seeds):
        return f"seeds repeat: {seeds}"
    rest = [{k: v for k, v in s.items() if k != "seed"} for s in specs]
    for s, r in zip(seeds[1:], rest[1:]):
        diff = sorted(k for k in set(r) | set(rest[0]) if r.get(k) != rest[0].get(k))
        if diff:
            return f"seed {s} differs from seed {seeds[0]} in more than the seed: {', '.join(diff)}"
    return None


class SeedArray:
    """K seeds of one run trained in lockstep: ``step(i)`` is every seed's ``Stepper.step(i)`` in one vmapped step.

    ``setups`` and ``specs``: each seed's ``train.build`` output and spec (the models are copied into the array;
    ``sync_models`` writes them back, e.g. to evaluate each seed with ``train.evaluate``)."""

    def __init__(self, setups: Sequence[Setup], specs: Sequence[dict[str, Any]], device: torch.device):
        why = seed_only(specs) or supports(setups[0].stack)
        if why:
            raise UsageError(why)
        models = [s.model for s in setups]
        if any(not m.training for m in models):
            raise UsageError("a seed array trains models in train mode: call model.train() first")
        drops = [n for n, m in models[0].named_modules() if isinstance(m, DROPOUTS) and m.p > 0]
        if drops or getattr(models[0], "drop_rate", 0):
            raise UsageError(f"the model draws dropout masks ({', '.join(drops) or 'drop_rate'}): under vmap they come "
                             f"from the global generator, not each seed's, so the array would not equal separate runs")
        self.setups, self.specs = list(setups), list(specs)
        self.stack = setups[0].stack          # equal hparams in every seed (seed_only); no per-run state (VERIFIED)
        params, self.buffers = stack_module_state(models)
        self.params = {n: nn.Parameter(p, requires_grad=p.requires_grad) for n, p in params.items()}
        self.keys = list(models[0].state_dict())
        missing = [n for n in self.keys if n not in self.params and n not in self.buffers]
        if missing:
            raise UsageError(f"state_dict entries that are neither parameters nor buffers: {missing[:3]}")
        self.base = copy.deepcopy(models[0]).to("meta")
        t = specs[0]["train"]
        self.opt = make_optimizer(nn.ParameterList(self.params.values()), self.stack, t)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(t))
        aug = t.get("augment", {})
        self.streams = [BatchStream(s.train_x, s.train_y, t["batch_size"], spec["seed"], device,
                                    crop_pad=aug.get("crop_pad", 0), flip=aug.get("flip", False))
                        for s, spec in zip(setups, specs)]

    def _loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
        """One model's loss (a run's ``Stepper.forward_loss`` for the VERIFIED methods: they add no penalty)."""
        x, target = self.stack.transform_batch(x, y)
        logits = functional_call(self.base, (params, buffers), (x,))
        return soft_cross_entropy(logits.float(), target)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each model's loss on its own batch: ``x`` is [K, B, C, H, W], ``y`` [K, B]; returns [K] (graph kept)."""
        return vmap(self._loss, randomness="different")(self.params, self.buffers, x, y)

    def train_on(self, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        """One optimisation step of every model on its batch; returns the K losses (detached)."""
        losses = self.losses(x, y)
        self.stack.end_forward()
        bad = [int(s["seed"]) for s, ok in zip(self.specs, torch.isfinite(losses).tolist()) if not ok]
        if bad:
            e = RunFailed(f"non-finite loss at step {step} in seed(s) {bad}: lower train.lr or check the "
                          f"regularizer's hparams")
            e.seeds = bad                     # type: ignore[attr-defined]  (which seeds: the others can go on)
            raise e
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.opt.step()
        self.sched.step()
        return losses.detach()

    def step(self, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """``Stepper.step`` of every seed: the K totals, the batch size and the K cross-entropies."""
        self.stack.begin_step(step)
        batches = [s.next() for s in self.streams]
        x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        losses = self.train_on(x, y, step)
        return losses, x.shape[1], {"cross_entropy": losses}

    def unstack(self, k: int) -> dict[str, torch.Tensor]:
        """Model k's state_dict (copies, the keys in the model's own order)."""
        return {n: self._slot(n)[k].detach().clone() for n in self.keys}

    def sync_models(self) -> None:
        """Load each seed's model (``setups[k].model``) with its slice of the array."""
        for k, s in enumerate(self.setups):
            s.model.load_state_dict(self.unstack(k))

    def _slot(self, name: str) -> torch.Tensor:
        return self.params[name] if name in self.params else self.buffers[name]

    def state_dict(self, k: int) -> dict[str, Any]:
        """Seed k as its own run: ``Stepper.state_dict``'s layout (a separate run's Stepper can load and resume it)."""
        opt = self.opt.state_dict()
        state = {i: {n: (v[k] if v.dim() else v).clone() if torch.is_tensor(v) else v for n, v in st.items()}
                 for i, st in opt["state"].items()}
        return {"model": self.unstack(k), "optimizer": {"state": state, "param_groups": opt["param_groups"]},
                "scheduler": self.sched.state_dict(), "regularizers": self.setups[k].stack.state_dict(),
                "stream": self.streams[k].state_dict()}

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Resume every seed from its ``state_dict(k)`` (or a separate run's ``Stepper.state_dict`` at the same
        step): the K states are stacked back into the array."""
        if len({int(st["scheduler"]["last_epoch"]) for st in states}) != 1 or len(states) != len(self.streams):
            raise UsageError(f"a seed array resumes {len(self.streams)} seeds from states at one and the same step")
        with torch.no_grad():
            for k, st in enumerate(states):
                for n, v in st["model"].items():
                    self._slot(n)[k].copy_(v)
        opt = [st["optimizer"] for st in states]
        stacked = {i: {n: torch.stack([o["state"][i][n] for o in opt]) if torch.is_tensor(v) and v.dim() else v
                       for n, v in st.items()} for i, st in opt[0]["state"].items()}
        self.opt.load_state_dict({"state": stacked, "param_groups": opt[0]["param_groups"]})
        self.sched.load_state_dict(states[0]["scheduler"])
        for k, st in enumerate(states):
            self.setups[k].stack.load_state_dict(st["regularizers"])
            self.streams[k].load_state_dict(st["stream"])
