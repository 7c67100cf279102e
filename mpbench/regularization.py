"""The regularizer plugin interface.

A regularizer is one class in ``regularizers/<name>.py`` decorated with ``@register_regularizer("<name>")``.
It may use any of these hooks; every one has a no-op default, so a method implements only what it needs:

- plan time:      ``check(model, ctx)`` rejects an architecture it cannot handle (raise ``IncompatibleError``);
- build time:     ``attach(model)`` inserts modules at sites / loads weights from an artifact;
                  ``param_groups(model, groups)`` edits optimizer groups (e.g. no weight decay on shared layers);
- every step:     ``begin_step(step)`` (schedules), ``transform_batch(x, y)`` (batch mixing, soft targets),
                  ``penalty(model, x, target, logits)`` (loss terms);
- evaluation:     ``eval_protocol`` (deterministic, or MC average of k stochastic passes),
                  ``deterministic()`` context (noise off), ``before_eval(model, batches)`` (e.g. BN re-estimation);
- resume:         ``state_dict`` / ``load_state_dict`` (schedules and statistics not held by the model).

Composition rules (checked at plan time by ``RegularizerStack``): at most one batch mixer, and ``claims`` (named
exclusive resources such as ``"init"`` for weight initialisation) may not overlap.
"""
from __future__ import annotations

import contextlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.hparams import Hparam, resolve
from mpbench.registry import Registry, import_plugins


def _load_plugins() -> None:
    import regularizers

    import_plugins((f"regularizers.{m.name}" for m in pkgutil.iter_modules(regularizers.__path__)
                    if not m.name.startswith("_")), group="mpbench.regularizers")


REGULARIZERS: Registry[type["Regularizer"]] = Registry("regularizer", loader=_load_plugins)


def register_regularizer(name: str, description: str = "") -> Callable[[type], type]:
    """Class decorator: ``@register_regularizer("dropblock")``. The first docstring line is the description."""

    def deco(cls: type) -> type:
        cls.name = name
        return REGULARIZERS.register(name, description=description, citation=cls.citation)(cls)

    return deco


@dataclass(frozen=True)
class EvalProtocol:
    """How a method is evaluated. ``passes == 1`` is one deterministic pass; ``passes > 1`` averages the softmax
    of that many stochastic passes (noise on at evaluation), as MetaPerturb's release does."""

    passes: int = 1
    final_passes: int = 1

    @property
    def stochastic(self) -> bool:
        return self.passes > 1 or self.final_passes > 1

    def describe(self) -> str:
        if not self.stochastic:
            return "deterministic"
        return f"mc{self.passes}/mc{self.final_passes}"


@dataclass
class RunContext:
    """What a regularizer may know about the run it is part of."""

    spec: dict[str, Any]                      # the fully resolved run spec
    model_name: str
    num_classes: int
    in_chans: int
    image_size: int
    total_steps: int
    num_train: int                            # N_train (e.g. information dropout's KL scaling)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    artifacts: dict[str, Path] = field(default_factory=dict)   # stage kind -> artifact directory


class Regularizer:
    """Base class: every hook is a no-op. Subclasses set the class attributes below."""

    name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    display: ClassVar[str] = ""                 # how tables name it ("DropBlock"); "" = its registry name
    hparams: ClassVar[dict[str, Hparam]] = {}
    requires: ClassVar[tuple[str, ...]] = ()    # artifact kinds this method needs: "pretrain", "metatrain"
    mixes_batch: ClassVar[bool] = False         # at most one batch mixer per run
    claims: ClassVar[tuple[str, ...]] = ()      # exclusive resources, e.g. ("init",)
    # True: the training step of this method can be captured in a CUDA graph (execution.cuda_graph) and replayed:
    # no host sync (.item(), float(tensor), bool(tensor)), no numpy / Python randomness, no per-step Python value
    # read inside the step (a schedule's coefficient would be frozen at its capture-time value), no shape that
    # changes from step to step. False: runs with this method execute eagerly, and result.json says why.
    graph_safe: ClassVar[bool] = True

    def __init__(self, ctx: RunContext, **hp: Any):
        self.ctx = ctx
        self.hp = {k: v.default for k, v in self.hparams.items()}
        self.hp.update(hp)
        self.chosen_sites: list[str] = []

    # plan time ------------------------------------------------------------------------------------------------
    @classmethod
    def requires_for(cls, hp: dict[str, Any]) -> tuple[str, ...]:
        """Artifact kinds needed with these hparams (default: ``requires``)."""
        return cls.requires

    @classmethod
    def check_hparams(cls, hp: dict[str, Any]) -> None:
        """Raise UsageError for a combination of values that each ``Hparam.check`` accepts alone (plan time)."""

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        """Raise IncompatibleError if this method cannot work on ``model``."""

    # build time -----------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Insert modules / hooks / weights into ``model`` (still on the CPU). Record sites in ``chosen_sites``."""

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return groups

    # training -------------------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Called before each training step (0-based); update schedules here."""

    def transform_batch(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x, target); target is int labels (B,) or soft targets (B, K)."""
        return x, target

    def penalty(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def end_forward(self) -> None:
        """Called after the loss of a step; clear per-step state held by hooks."""

    # evaluation -----------------------------------------------------------------------------------------------
    @property
    def eval_protocol(self) -> EvalProtocol:
        return EvalProtocol()

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Within this context the method's noise is off at evaluation."""
        yield

    def before_eval(self, model: nn.Module, train_batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        """Called before each evaluation with a function yielding normalised training images."""

    # resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def scalars(self) -> dict[str, float]:
        """The method's own numbers worth a curve (a schedule's current value), logged with the training rows."""
        return {}

    def transferred(self) -> int:
        """How many numbers this method carries over from a source stage into the run (after ``attach``): the
        paper's "# transferred parameters" (MetaPerturb's phi, a fine-tuned network's weights; 0 for the rest)."""
        return 0

    def describe(self) -> dict[str, Any]:
        """What the result records about this method."""
        return {"hparams": dict(self.hp), "sites": list(self.chosen_sites), "eval": self.eval_protocol.describe()}


def resolve_hparams(name: str, given: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of ``name`` updated with ``given``, every value checked; a bad name or value is a usage error."""
    cls = REGULARIZERS.get(name)
    out = resolve(f"reg.{name}", cls.hparams, given, noun="hparam")
    cls.check_hparams(out)
    return out


class RegularizerStack:
    """The regularizers of one run, applied in the order given."""

    def __init__(self, members: list[Regularizer]):
        self.members = members

    @staticmethod
    def check_composition(names: list[str]) -> None:
        classes = [REGULARIZERS.get(n) for n in names]
        if len(set(names)) != len(names):
            raise IncompatibleError(f"regularizer listed twice in {names}: name each method once")
        mixers = [c.name for c in classes if c.mixes_batch]
        if len(mixers) > 1:
            raise IncompatibleError(f"{' and '.join(mixers)} both mix the batch: use one batch mixer per run")
        seen: dict[str, str] = {}
        for c in classes:
            for claim in c.claims:
                if claim in seen:
                    raise IncompatibleError(f"{seen[claim]} and {c.name} both claim {claim!r}: use only one of them")
                seen[claim] = c.name

    def attach(self, model: nn.Module) -> None:
        for m in self.members:
            m.attach(model)

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for m in self.members:
            groups = m.param_groups(model, groups)
        return groups

    def begin_step(self, step: int) -> None:
        for m in self.members:
            m.begin_step(step)

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for m in self.members:
            x, y = m.transform_batch(x, y)
        return x, y

    def penalty(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for m in self.members:
            p = m.penalty(model, x, target, logits)
            if p is not None:
                out[m.name] = p
        return out

    def end_forward(self) -> None:
        for m in self.members:
            m.end_forward()

    @property
    def graph_safe(self) -> bool:
        """Every member's training step can be captured in a CUDA graph (``Regularizer.graph_safe``)."""
        return all(m.graph_safe for m in self.members)

    @property
    def eval_protocol(self) -> EvalProtocol:
        protos = [m.eval_protocol for m in self.members] or [EvalProtocol()]
        return EvalProtocol(max(p.passes for p in protos), max(p.final_passes for p in protos))

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for m in self.members:
                stack.enter_context(m.deterministic())
            yield

    def before_eval(self, model: nn.Module, train_batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        for m in self.members:
            m.before_eval(model, train_batches)

    def state_dict(self) -> dict[str, Any]:
        return {m.name: m.state_dict() for m in self.members}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.members:
            m.load_state_dict(state.get(m.name, {}))

    def transferred(self) -> int:
        return sum(m.transferred() for m in self.members)

    def scalars(self) -> dict[str, float]:
        return {f"reg/{m.name}/{k}": float(v) for m in self.members for k, v in m.scalars().items()}

    def describe(self) -> dict[str, Any]:
        return {m.name: m.describe() for m in self.members}


def build_stack(names: list[str], hparams: dict[str, dict[str, Any]], ctx: RunContext) -> RegularizerStack:
    RegularizerStack.check_composition(names)
    return RegularizerStack([REGULARIZERS.get(n)(ctx, **resolve_hparams(n, hparams.get(n))) for n in names])
