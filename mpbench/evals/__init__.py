"""Evaluations as plugins: each module in ``mpbench/evals/`` registers an :class:`Evaluation` with
``@register_eval("name")`` and declares the metrics it produces (name, display name, unit, direction, kind), so
results, reports and figures read what a metric is from here and nowhere else.

A suite lists the evaluations it wants (``eval: [classification, ...]``, default ``[classification]``) and their
settings (``eval_settings.<name>.<key>``), checked at plan time like regularizer hyperparameters. Plugins from
other packages register under the entry-point group ``mpbench.evals``.
"""
from __future__ import annotations

import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from mpbench.hparams import Hparam, resolve
from mpbench.registry import Registry, import_plugins

DIRECTIONS = ("higher", "lower", None)
KINDS = ("scalar", "array")


@dataclass(frozen=True)
class Metric:
    """What one number (or array) in ``result.json``'s ``final`` means and how a table shows it."""

    name: str
    display: str
    unit: str = ""                  # "%": stored as a fraction in [0, 1], shown x100
    direction: str | None = None    # "higher" / "lower" is better; None = not ranked (no bold)
    kind: str = "scalar"            # scalar | array (e.g. reliability-diagram bins, accuracy per epsilon)
    decimals: int = 3

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS or self.kind not in KINDS:
            raise ValueError(f"metric {self.name}: direction must be one of {DIRECTIONS}, kind one of {KINDS}")

    @property
    def scale(self) -> float:
        return 100.0 if self.unit == "%" else 1.0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.unit})" if self.unit else self.name


@dataclass
class EvalContext:
    """What an evaluation may use: the trained model with its regularizers, the test split, and the protocol."""

    model: nn.Module
    stack: Any                      # mpbench.regularization.RegularizerStack (noise on/off, eval protocol)
    test_x: torch.Tensor            # uint8 (N, C, H, W)
    test_y: torch.Tensor
    batch_size: int
    passes: int                     # MC passes of this evaluation (1 = one deterministic pass)
    device: torch.device
    final: bool                     # the final evaluation (else a periodic one)


class Evaluation:
    """Base class. Subclasses set ``metrics`` (and ``settings``) and implement ``run``."""

    name: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()
    settings: ClassVar[dict[str, Hparam]] = {}
    periodic: ClassVar[bool] = False        # also run at periodic evaluations (else only at the final one)

    def __init__(self, **settings: Any):
        self.cfg = settings

    def run(self, ctx: EvalContext) -> dict[str, Any]:
        """Metric name -> value (a float, or a list for ``kind="array"``); other keys are recorded as they are."""
        raise NotImplementedError


def _load_plugins() -> None:
    import mpbench.evals as pkg

    import_plugins((f"mpbench.evals.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)), group="mpbench.evals")


EVALS: Registry[type[Evaluation]] = Registry("evaluation", loader=_load_plugins)

# what every run records besides its evaluations (result.json top level), for tables of cost
RUN_METRICS = (Metric("wall_time_s", "wall time", "s", "lower", decimals=1),
               Metric("images_per_s", "images/s", "", "higher", decimals=0),
               Metric("steps", "steps", "", None, decimals=0),
               Metric("transferred_params", "# transferred parameters", "", None, decimals=0))


def register_eval(name: str, description: str = "") -> Callable[[type], type]:
    """Class decorator: ``@register_eval("classification")``. The first docstring line is the description."""

    def deco(cls: type) -> type:
        cls.name = name
        return EVALS.register(name, description=description, citation=cls.citation)(cls)

    return deco


def all_metrics() -> dict[str, Metric]:
    """Every declared metric by name: the run's own statistics, then each evaluation's, in registration order."""
    out = {m.name: m for m in RUN_METRICS}
    for entry in EVALS.entries():
        for m in entry.obj.metrics:
            if m.name in out and out[m.name] != m:
                raise ValueError(f"metric {m.name!r} declared differently by two evaluations")
            out[m.name] = m
    return out


def metric_info(name: str) -> Metric:
    """The declared metric, or an unranked, unit-less description of an undeclared ``final`` key."""
    return all_metrics().get(name) or Metric(name, name)


def resolve_evals(names: list[str], settings: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{name: resolved settings}`` in the order given; unknown names and bad values are usage errors."""
    from mpbench.errors import UsageError, did_you_mean

    settings = dict(settings or {})
    for key in settings:
        if key not in names:
            raise UsageError(f"eval_settings.{key} is set but {key!r} is not in eval: add it to eval or remove "
                             f"the settings ({did_you_mean(key, names)})")
    if len(set(names)) != len(names):
        raise UsageError(f"eval lists an evaluation twice ({names}): name each once")
    return {n: resolve(f"eval_settings.{n}", EVALS.get(n).settings, settings.get(n)) for n in names}


def build_evals(spec_evals: dict[str, dict[str, Any]]) -> list[Evaluation]:
    return [EVALS.get(name)(**cfg) for name, cfg in spec_evals.items()]


DEFAULT_EVALS = ("classification",)
