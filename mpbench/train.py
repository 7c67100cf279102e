"""One training run: a pure function of its resolved spec (plus where to find data and artifacts).

The loop is device-agnostic (CPU and CUDA alike), checkpoints everything needed to resume bitwise (model,
optimizer, schedule, regularizer state, data stream, all RNG states), and stops cleanly when asked to.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mpbench.batches import BatchStream
from mpbench.errors import RunFailed, UsageError
from mpbench.evals import DEFAULT_EVALS, EvalContext, Evaluation, build_evals, resolve_evals
from mpbench.regularization import RegularizerStack, RunContext, build_stack


class Interrupted(Exception):
    """Training stopped on request (SIGTERM/SIGUSR, preemption) after writing a checkpoint."""


@dataclass
class RunHooks:
    """Side channels of a run; none of them influences the numbers."""

    on_step: Callable[[int, int, float], None] | None = None          # (step, total, loss)
    on_row: Callable[[dict[str, Any]], None] | None = None            # a metrics row (split: train | eval)
    should_stop: Callable[[], bool] = lambda: False
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None   # atomically persist a state dict
    load_checkpoint: Callable[[], dict[str, Any] | None] = lambda: None
    checkpoint_every: int = 0
    # how the steps execute (suite section `execution`, mpbench/execution.py); of these only autocast=bf16 changes the
    # numbers' distribution, the others fp32 rounding at most
    execution: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setup:
    """Everything built from a spec before the first step."""

    model: nn.Module
    stack: RegularizerStack
    ctx: RunContext
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    evals: list[Evaluation] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_data(spec: dict[str, Any], data_root: Path) -> tuple[Any, Any]:
    from mpbench.data import load_dataset

    d = spec["data"]
    kw = dict(image_size=d.get("image_size"), channels=d.get("channels"), classes=d.get("classes"))
    train = load_dataset(spec["dataset"], data_root, "train", per_class=d.get("per_class"), **kw)
    test = load_dataset(spec["dataset"], data_root, "test", **kw)
    return train, test


def build(spec: dict[str, Any], data_root: Path, device: torch.device, artifacts: dict[str, Path]) -> Setup:
    """Data, model and regularizers of a run, seeded from the spec."""
    import mpbench.models  # noqa: F401  (registers the CIFAR networks into timm)

    seed_everything(spec["seed"])
    train, test = load_data(spec, data_root)
    t = spec["train"]
    if t["batch_size"] > len(train.labels):
        raise UsageError(f"train.batch_size={t['batch_size']} is larger than the training set of {spec['dataset']} "
                         f"({len(train.labels)} images): lower train.batch_size")
    model = timm.create_model(spec["model"], num_classes=train.num_classes, in_chans=train.images.shape[1],
                              **spec.get("model_kwargs", {}))
    ctx = RunContext(spec=spec, model_name=spec["model"], num_classes=train.num_classes,
                     in_chans=train.images.shape[1], image_size=train.images.shape[-1], total_steps=t["steps"],
                     num_train=len(train.labels), device=device, artifacts=artifacts)
    stack = build_stack(spec["regularizer"], spec.get("reg", {}), ctx)
    for m in stack.members:
        m.check(model, ctx)
    stack.attach(model)
    model.to(device)
    evals = build_evals(spec.get("eval") or resolve_evals(list(DEFAULT_EVALS), {}))
    return Setup(model, stack, ctx, train.images, train.labels, test.images, test.labels, train.num_classes, evals)


def make_optimizer(model: nn.Module, stack: RegularizerStack, t: dict[str, Any],
                   adam_kwargs: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """Adam or SGD over the trainable parameters; ``adam_kwargs``: kernel flags of Adam (``fused``, ``foreach``,
    ``capturable``: mpbench.execution)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = stack.param_groups(model, [{"params": params, "weight_decay": t["weight_decay"]}])
    if t["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=t["lr"], weight_decay=t["weight_decay"], **(adam_kwargs or {}))
    return torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])


def lr_factor(t: dict[str, Any]) -> Callable[[int], float]:
    """MultiStepLR at fractions of the steps (MetaPerturb: 40/70/90 %, gamma 0.3), cosine, or constant."""
    steps = t["steps"]
    if t["schedule"] == "multistep":
        marks = [int(round(m * steps)) for m in t["milestones"]]
        return lambda s: t["gamma"] ** sum(s >= m for m in marks)
    if t["schedule"] == "cosine":
        return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    return lambda s: 1.0


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE with int labels, or with soft targets (B, K) for batch-mixing methods (never BCE)."""
    if target.dtype.is_floating_point:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target)


def evaluate(s: Setup, t: dict[str, Any], final: bool, device: torch.device) -> dict[str, Any]:
    """Run the spec's evaluations (periodic ones only, unless ``final``) after the methods' ``before_eval``."""
    proto = s.stack.eval_protocol
    passes = (t.get("final_eval_passes") or proto.final_passes) if final else (t.get("eval_passes") or proto.passes)

    def train_images():
        stream = BatchStream(s.train_x, s.train_y, t["batch_size"], 0, device)
        return (stream.next()[0] for _ in range(min(len(stream), 20)))

    s.stack.before_eval(s.model, train_images)
    ctx = EvalContext(s.model, s.stack, s.test_x, s.test_y, t["eval_batch_size"], passes, device, final)
    out: dict[str, Any] = {}
    for ev in s.evals:
        if final or ev.periodic:
            out.update(ev.run(ctx))
    s.model.train()
    return out


class Stepper:
    """One optimisation step at a time: optimizer, schedule and batch stream of a run (their state is resumable).

    ``options``: the run's execution options (mpbench.execution; none = eager, exactly the plain step); what was
    applied, and what fell back and why, is ``self.execution.record()``."""

    def __init__(self, s: Setup, spec: dict[str, Any], device: torch.device,
                 options: dict[str, Any] | None = None):
        from mpbench.execution import GraphStep, StepExecution

        t = spec["train"]
        self.s, self.device = s, device
        self.execution = StepExecution(options, device, s.stack, t)
        self.execution.prepare_model(s.model)
        self.opt = make_optimizer(s.model, s.stack, t, self.execution.optimizer_kwargs())
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(t))
        self._opt_flags = {k: v for k, v in self.opt.defaults.items() if k in ("foreach", "fused", "capturable")}
        self.execution.fit_optimizer(self.opt, self._opt_flags)
        aug = t.get("augment", {})
        self.stream = BatchStream(s.train_x, s.train_y, t["batch_size"], spec["seed"], device,
                                  crop_pad=aug.get("crop_pad", 0), flip=aug.get("flip", False))
        self.forward = self.execution.forward(s.model)
        self.graph = GraphStep(self) if self.execution.graph else None

    def step(self, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """Train on one batch; returns the total loss, the batch size and each loss term (all detached)."""
        if self.graph is not None:
            out = self.graph.step(step)
            if out is not None:
                return out
        return self.eager_step(step)

    def eager_step(self, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        self.s.stack.begin_step(step)
        x, y = self.stream.next()
        return self.train_on(x, y, step)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, capturing: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(total, cross-entropy, penalties, the transformed batch) of one batch, graph built for backward."""
        model, stack, ex = self.s.model, self.s.stack, self.execution
        x, target = stack.transform_batch(ex.batch(x), y)
        with ex.autocast(capturing):
            logits = self.forward(x)
            loss = soft_cross_entropy(logits.float(), target)     # float32 logits: a no-op without autocast
            penalties = stack.penalty(model, x, target, logits)
        total = loss + sum(penalties.values()) if penalties else loss
        stack.end_forward()
        return total, loss, penalties, x

    def update(self, total: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()

    def train_on(self, x: torch.Tensor, y: torch.Tensor, step: int
                 ) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        total, loss, penalties, x = self.forward_loss(x, y)
        if not torch.isfinite(total):
            bad = [k for k, v in {"cross-entropy": loss, **penalties}.items() if not torch.isfinite(v)]
            raise RunFailed(f"non-finite loss ({', '.join(bad)} = {total.item()}) at step {step}: "
                            f"lower train.lr or check the regularizer's hparams")
        self.update(total)
        self.sched.step()
        return total.detach(), x.shape[0], {"cross_entropy": loss.detach(), **{k: v.detach() for k, v in penalties.items()}}

    def state_dict(self) -> dict[str, Any]:
        from mpbench.execution import optimizer_state_for_checkpoint

        sched = self.sched.state_dict()
        if "_last_lr" in sched:                    # device tensors when the learning rate is one (CUDA graphs)
            sched["_last_lr"] = [float(v) for v in sched["_last_lr"]]
        return {"model": self.s.model.state_dict(), "optimizer": optimizer_state_for_checkpoint(self.opt.state_dict()),
                "scheduler": sched, "regularizers": self.s.stack.state_dict(),
                "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from mpbench.execution import GraphStep

        self.s.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.execution.fit_optimizer(self.opt, self._opt_flags)    # this run's kernels, not the saving run's
        self.sched.load_state_dict(state["scheduler"])
        self.s.stack.load_state_dict(state["regularizers"])
        self.stream.load_state_dict(state["stream"])
        if self.graph is not None:                                 # new optimizer state: capture afresh
            self.graph = GraphStep(self)


class TrainLog:
    """Training rows of ``metrics.jsonl``: every ``every`` steps the window's mean loss (total and each term), the
    learning rate, images/s and the methods' own scalars. Sums stay on the device (no sync per step); the window
    is part of the checkpoint, so a resumed run writes exactly the rows an uninterrupted one does."""

    def __init__(self, every: int, steps: int):
        self.every = every or max(1, steps // 200)
        self.sums: dict[str, torch.Tensor] = {}
        self.n, self.images, self.seconds = 0, 0, 0.0

    def add(self, total: torch.Tensor, terms: dict[str, torch.Tensor], batch: int, seconds: float) -> None:
        for k, v in {"loss": total, **{f"loss/{k}": t for k, t in terms.items()}}.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n, self.images, self.seconds = self.n + 1, self.images + batch, self.seconds + seconds

    def row(self, step: int, lr: float, scalars: dict[str, float]) -> dict[str, Any]:
        """The window's row (then a new window)."""
        row = {"split": "train", "step": step, **{k: float(v) / self.n for k, v in self.sums.items()}, "lr": lr,
               "images_per_s": self.images / self.seconds if self.seconds else float("nan"), **scalars}
        self.sums, self.n, self.images, self.seconds = {}, 0, 0, 0.0
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "n": self.n, "images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.n = dict(state["sums"]), int(state["n"])
        self.images, self.seconds = int(state["images"]), float(state["seconds"])


def loop_state(stepper_state: dict[str, Any], step: int, history: list[dict[str, Any]], train_time: float,
               images: int, log: TrainLog) -> dict[str, Any]:
    """A checkpoint: the Stepper's state, the RNGs and the loop's counters at ``step``."""
    return {**stepper_state, "rng": rng_state(), "step": step, "history": history, "train_time": train_time,
            "images": images, "log": log.state_dict()}


def resume_counters(state: dict[str, Any], log: TrainLog) -> tuple[int, list[dict[str, Any]], float, int]:
    """The loop's counters of a checkpoint (step, history, train time, images); ``log`` gets its window."""
    if "log" in state:
        log.load_state_dict(state["log"])
    return int(state["step"]), list(state["history"]), float(state["train_time"]), int(state["images"])


def train_loop(s: Setup, spec: dict[str, Any], device: torch.device, hooks: RunHooks) -> dict[str, Any]:
    """Train for ``spec.train.steps`` with training rows and periodic evaluation; returns the final metrics."""
    t = spec["train"]
    stepper, log = Stepper(s, spec, device, hooks.execution), TrainLog(int(t.get("log_every") or 0), t["steps"])
    start, history, train_time, images = 0, [], 0.0, 0
    last_loss = next((r["loss"] for r in reversed(history) if r.get("split") == "train"), float("nan"))
    state = hooks.load_checkpoint()
    if state is not None:
        stepper.load_state_dict(state)
        set_rng_state(state["rng"])
        start, history, train_time, images = resume_counters(state, log)
        last_loss = next((r["loss"] for r in reversed(history) if r.get("split") == "train"), float("nan"))

    def emit(row: dict[str, Any]) -> None:
        history.append(row)
        if hooks.on_row:
            hooks.on_row(row)

    def checkpoint(step: int) -> None:
        if hooks.save_checkpoint is not None:
            hooks.save_checkpoint(loop_state(stepper.state_dict(), step, history, train_time, images, log))

    s.model.train()
    for step in range(start, t["steps"]):
        if hooks.should_stop():
            checkpoint(step)
            raise Interrupted(f"stopped at step {step}")
        tic = time.perf_counter()
        total, batch, terms = stepper.step(step)
        if device.type == "cuda" and hooks.on_step is not None and step % 50 == 0:
            torch.cuda.synchronize()
        took = time.perf_counter() - tic
        train_time, images, done = train_time + took, images + batch, step + 1
        log.add(total, terms, batch, took)
        if hooks.on_step is not None:
            hooks.on_step(done, t["steps"], float(total))
        if done % log.every == 0 or done == t["steps"]:
            emit(log.row(done, float(stepper.sched.get_last_lr()[0]), s.stack.scalars()))
            last_loss = history[-1]["loss"]
        if t["eval_every"] and done % t["eval_every"] == 0 and done < t["steps"]:
            emit({"split": "eval", "step": done, **evaluate(s, t, final=False, device=device)})
        if hooks.checkpoint_every and done % hooks.checkpoint_every == 0 and done < t["steps"]:
            checkpoint(done)
    stepper.execution.close()                      # process-wide settings back (cuDNN autotuner)
    final = evaluate(s, t, final=True, device=device)
    emit({"split": "eval", "final": True, "step": t["steps"], "loss": last_loss, **final})
    return {"final": {k: v for k, v in final.items()}, "history": history, "train_time_s": train_time,
            "images_per_s": images / train_time if train_time else float("nan"),
            "execution": stepper.execution.record()}
