"""Expand a suite into fully resolved run specs and the stage artifacts they need.

A run's identity is a hash of its resolved spec (not of the suite), so runs shared by suites train once.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mpbench.config import grid_of
from mpbench.errors import UsageError, did_you_mean
from mpbench.regularization import REGULARIZERS, RegularizerStack, resolve_hparams
from mpbench.store import RunDir, check_id


@dataclass
class Job:
    """One unit of work: a target run, or a stage whose output (artifact) target runs use."""

    id: str
    slug: str
    kind: str                                   # run | pretrain | metatrain
    spec: dict[str, Any]
    deps: list[str] = field(default_factory=list)   # artifact ids this job needs

    def dir(self, results: Path) -> RunDir:
        return RunDir(results, self.kind, self.id)


@dataclass
class Plan:
    suite: str
    description: str
    artifacts: list[Job]
    runs: list[Job]
    report: dict[str, Any]

    @property
    def jobs(self) -> list[Job]:
        """Stages first, then the runs that need them."""
        return self.artifacts + self.runs


NOT_IDENTITY = ("checkpoint_every",)   # (train.)keys that change how a run executes, not what it computes


def spec_hash(spec: dict[str, Any]) -> str:
    spec = {k: v for k, v in spec.items() if k not in NOT_IDENTITY}
    if isinstance(spec.get("train"), dict):
        spec["train"] = {k: v for k, v in spec["train"].items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def _check_model(name: str) -> None:
    import timm

    import mpbench.models  # noqa: F401  (registers the CIFAR networks)

    if not timm.is_model(name):
        raise UsageError(f"unknown model {name!r}: {did_you_mean(name, timm.list_models())}")


def _check_dataset(name: str):
    from mpbench.data import DATASETS

    return DATASETS.get(name)


@functools.lru_cache(maxsize=64)
def _probe_model(name: str, kwargs_json: str, in_chans: int, num_classes: int):
    import timm

    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **json.loads(kwargs_json))


def check_compatibility(spec: dict[str, Any], source) -> None:
    """Each method checks the architecture at plan time, not after an hour of training."""
    from mpbench.regularization import RunContext

    in_chans = spec["data"].get("channels") or source.channels
    num_classes = len(spec["data"]["classes"]) if spec["data"].get("classes") else source.num_classes
    model = _probe_model(spec["model"], json.dumps(spec.get("model_kwargs", {}), sort_keys=True), in_chans, num_classes)
    ctx = RunContext(spec=spec, model_name=spec["model"], num_classes=num_classes, in_chans=in_chans,
                     image_size=spec["data"].get("image_size") or source.image_size,
                     total_steps=spec["train"]["steps"], num_train=1)
    for name in spec["regularizer"]:
        REGULARIZERS.get(name).check(model, ctx)


def _stage_job(kind: str, spec: dict[str, Any]) -> Job:
    slug = f"{kind}-{spec['model']}-{spec['dataset']}"
    return Job(f"{slug}-{spec_hash(spec)[:8]}", slug, kind, spec)


def pretrain_spec(cfg: DictConfig, run: dict[str, Any], in_chans: int) -> dict[str, Any]:
    st = OmegaConf.to_container(cfg.stages.pretrain, resolve=True)
    st.pop("file")
    _check_dataset(st["dataset"])
    st["data"]["channels"] = st["data"]["channels"] or in_chans   # same architecture: same input channels
    return {"regularizer": ["base"], "model": run["model"], "model_kwargs": run["model_kwargs"],
            "dataset": st["dataset"], "data": st["data"], "seed": st["seed"], "train": st["train"], "reg": {},
            "artifacts": {}}


def metatrain_spec(cfg: DictConfig) -> dict[str, Any]:
    st = OmegaConf.to_container(cfg.stages.metatrain, resolve=True)
    st.pop("file")
    _check_dataset(st["dataset"])
    _check_model(st["model"])
    return st


def artifact_file_ref(path: str) -> str:
    """A stage output given as a file: ``file:<absolute path>#<sha256 prefix>`` (content is part of the identity)."""
    from mpbench.config import suites_dir

    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists():          # relative paths: to the working dir, else the project root
        p = suites_dir().parent / p
    p = p.resolve()
    if not p.is_file():
        raise UsageError(f"stage file {path} not found: fix stages.<kind>.file (absolute, or relative to the "
                         f"working dir or the project root)")
    return f"file:{p}#{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"


def artifact_path(results: Path, kind: str, ref: str) -> Path:
    """Where a run finds the artifact ``ref`` (an artifact id or a ``file:`` reference)."""
    if ref.startswith("file:"):
        return Path(ref[5:].rsplit("#", 1)[0])
    return RunDir(results, kind, ref).path


def expand(cfg: DictConfig) -> Plan:
    """Cross the grid into run specs, validate every registry name, and attach stage artifacts."""
    grid = grid_of(cfg)
    base = {
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model_kwargs": OmegaConf.to_container(cfg.model_kwargs, resolve=True),
    }
    reg_cfg = OmegaConf.to_container(cfg.reg, resolve=True)
    for name, given in reg_cfg.items():
        if not isinstance(given, dict):
            raise UsageError(f"reg.{name} must map hparams to values (e.g. reg.{name}.p=0.1), got {given!r}")
        resolve_hparams(name, given)              # unknown method or hparam: usage error now, not mid-sweep
    keys = list(grid)
    excludes = OmegaConf.to_container(cfg.exclude, resolve=True)
    for ex in excludes:
        unknown = [k for k in ex if k not in grid]
        if unknown:
            raise UsageError(f"exclude names {unknown[0]!r}, which is not a grid key: {did_you_mean(unknown[0], grid)}")
    artifacts: dict[str, Job] = {}
    runs: dict[str, Job] = {}
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        if any(all(point[k] == v for k, v in ex.items()) for ex in excludes):
            continue
        spec = copy.deepcopy(base)
        reg_over = copy.deepcopy(reg_cfg)
        for k, v in zip(keys, values):
            if k.startswith("reg."):
                _set_dotted(reg_over, k[4:], v)
            else:
                _set_dotted(spec, k, v)
        names = spec["regularizer"]
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            REGULARIZERS.entry(n)
        RegularizerStack.check_composition(names)
        _check_model(spec["model"])
        source = _check_dataset(spec["dataset"])
        spec["regularizer"] = names
        spec["seed"] = int(spec["seed"])
        spec["reg"] = {n: resolve_hparams(n, reg_over.get(n)) for n in names}
        spec["artifacts"] = {}
        needs = sorted({k for n in names for k in REGULARIZERS.get(n).requires_for(spec["reg"][n])})
        for kind in needs:
            given = cfg.stages[kind].get("file") if kind in cfg.stages else None
            if given:
                spec["artifacts"][kind] = artifact_file_ref(given)
                continue
            if kind == "pretrain":
                job = _stage_job(kind, pretrain_spec(cfg, spec, spec["data"]["channels"] or source.channels))
            elif kind == "metatrain":
                job = _stage_job(kind, metatrain_spec(cfg))
            else:
                raise UsageError(f"regularizer needs unknown stage {kind!r}")
            artifacts.setdefault(job.id, job)
            spec["artifacts"][kind] = job.id
        spec = {k: spec[k] for k in sorted(spec)}
        check_compatibility(spec, source)
        slug = f"{'+'.join(names)}-{spec['model']}-{spec['dataset']}-s{spec['seed']}"
        deps = [a for a in spec["artifacts"].values() if not a.startswith("file:")]
        job = Job(f"{slug}-{spec_hash(spec)[:8]}", slug, "run", spec, deps=deps)
        runs.setdefault(job.id, job)
    report = OmegaConf.to_container(cfg.report, resolve=True)
    check_id(cfg.name, "suite name")
    return Plan(cfg.name, cfg.description, list(artifacts.values()), list(runs.values()), report)
