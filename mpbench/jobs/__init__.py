"""Job kinds as plugins: a target ``run`` and the stages whose outputs (artifacts) runs use.

Each kind is one class in ``mpbench/jobs/<kind>.py`` registered with ``@register_job_kind("<kind>")``. It says
how its spec is built (stage kinds: from the suite's ``stages.<kind>`` section, declared by ``config``), its slug,
how many steps it has (for progress), which datasets and files it reads (for preflight), how it executes, and
which file of its directory target runs use (``payload``). The planner, the runner, ``mpbench status`` and every
launcher go through this registry; none parses ids or sniffs spec shapes. Plugins from other packages register
under the entry-point group ``mpbench.jobs``.
"""
from __future__ import annotations

import pkgutil
from pathlib import Path
from typing import Any, Callable, ClassVar

from mpbench.registry import Registry, import_plugins


class JobKind:
    """Base class; a subclass overrides what differs. Class methods only: a kind holds no state."""

    name: ClassVar[str] = ""
    config: ClassVar[type | None] = None     # dataclass of its ``stages.<name>`` section (stage kinds only)
    payload: ClassVar[str | None] = None     # the file of its directory that target runs use (stage kinds only)
    wandb: ClassVar[bool] = False            # log the job to Weights & Biases

    @classmethod
    def is_stage(cls) -> bool:
        return cls.config is not None

    @classmethod
    def validate(cls, section: Any, prefix: str) -> None:
        """Semantic checks of the ``stages.<name>`` section beyond types (raise UsageError)."""

    @classmethod
    def stage_spec(cls, section: dict[str, Any], run_spec: dict[str, Any], in_chans: int) -> dict[str, Any]:
        """The artifact spec that ``run_spec`` needs (``section``: the resolved ``stages.<name>``, without
        ``file``; ``in_chans``: the run's input channels)."""
        raise NotImplementedError

    @classmethod
    def slug(cls, spec: dict[str, Any]) -> str:
        return f"{cls.name}-{spec['model']}-{spec['dataset']}"

    @classmethod
    def steps(cls, spec: dict[str, Any]) -> int:
        return int(spec["train"]["steps"])

    @classmethod
    def checkpoint_every(cls, spec: dict[str, Any]) -> int:
        return int(spec["train"].get("checkpoint_every") or 0)

    @classmethod
    def datasets(cls, spec: dict[str, Any]) -> list[str]:
        """Datasets this job reads (preflight checks their files)."""
        return [spec["dataset"]]

    @classmethod
    def models(cls, spec: dict[str, Any]) -> list[str]:
        """Architectures this job builds (the planner checks their names)."""
        return [spec["model"]] if "model" in spec else []

    @classmethod
    def check_file(cls, path: Path) -> None:
        """A stage given as a file (``stages.<name>.file``): raise UsageError unless it is this kind's payload."""

    @classmethod
    def execute(cls, spec: dict[str, Any], rd: Any, ex: Any) -> dict[str, Any]:
        """Train in run directory ``rd`` (``ex``: the ``runner.Execution``); returns what the result records
        (``final`` metrics, ``history``, timing, and for stages the artifact's provenance). Stages write
        ``payload`` into ``rd.path``."""
        raise NotImplementedError


def _load_plugins() -> None:
    import mpbench.jobs as pkg

    import_plugins((f"mpbench.jobs.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)), group="mpbench.jobs")


JOB_KINDS: Registry[type[JobKind]] = Registry("job kind", loader=_load_plugins)


def register_job_kind(name: str, description: str = "") -> Callable[[type], type]:
    """Class decorator: ``@register_job_kind("pretrain")``. The first docstring line is the description."""

    def deco(cls: type) -> type:
        cls.name = name
        return JOB_KINDS.register(name, description=description)(cls)

    return deco


def stage_kinds() -> list[type[JobKind]]:
    return [e.obj for e in JOB_KINDS.entries() if e.obj.is_stage()]
