"""Expand a suite into fully resolved run specs and the stage artifacts they need.

A run's identity is a hash of its resolved spec (not of the suite), so runs shared by suites train once.
"""
from __future__ import annotations

import contextlib
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
from mpbench.errors import DataMissingError, PreflightError, UsageError, did_you_mean
from mpbench.evals import resolve_evals
from mpbench.jobs import JOB_KINDS, JobKind, stage_kinds
from mpbench.regularization import REGULARIZERS, RegularizerStack, resolve_hparams
from mpbench.store import RunDir, check_id


@dataclass
class Job:
    """One unit of work: a target run, or a stage whose output (artifact) target runs use."""

    id: str
    slug: str
    kind: str                                   # a registered job kind: run | pretrain | metatrain | ...
    spec: dict[str, Any]
    deps: list[str] = field(default_factory=list)   # artifact ids this job needs
    name: str = ""                                  # display name (W&B): the slug + the keys that vary, if any

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


NOT_IDENTITY = ("checkpoint_every", "log_every")   # (train.)keys that change how a run executes or logs, not what
                                                    # it computes


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``spec`` without execution keys; a stage file counts by its content hash
    only (``file:<path>#<sha>`` -> ``file#<sha>``), so the same file at another path is the same run."""
    spec = {k: v for k, v in spec.items() if k not in NOT_IDENTITY}
    if isinstance(spec.get("artifacts"), dict):
        spec["artifacts"] = {k: ("file#" + v.rsplit("#", 1)[-1]) if str(v).startswith("file:") else v
                             for k, v in spec["artifacts"].items()}
    if isinstance(spec.get("train"), dict):
        spec["train"] = {k: v for k, v in spec["train"].items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def flatten(spec: dict, prefix: str = "", keep_lists: bool = False) -> dict[str, Any]:
    """Nested spec -> ``{"train.lr": 0.001, ...}``; lists become comma-joined strings (hashable) unless kept."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + ".", keep_lists))
        elif isinstance(value, (list, tuple)) and not keep_lists:
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


IN_SLUG = ("regularizer", "model", "dataset", "seed")      # what a run's slug already says


def varying_keys(jobs: list[Job], skip: tuple[str, ...] = IN_SLUG) -> list[str]:
    """Flattened spec keys whose value differs between ``jobs`` (missing counts as a value), ``skip`` aside; a
    method's hyperparameter (``reg.<method>.<hp>``) counts only where it differs between runs of the same method."""
    flat = [flatten(j.spec) for j in jobs]
    keys = dict.fromkeys(k for f in flat for k in f)

    def varies(k: str) -> bool:
        if k.startswith("reg."):
            by_method: dict[str, set[str]] = {}
            for f in flat:
                by_method.setdefault(str(f.get("regularizer")), set()).add(repr(f.get(k)))
            return any(len(v) > 1 for v in by_method.values())
        return len({repr(f.get(k)) for f in flat}) > 1

    return [k for k in keys if k not in skip and k.split(".")[-1] not in NOT_IDENTITY and varies(k)]


def short_key(key: str) -> str:
    """How a varying key reads in a label: ``reg.dropout.p`` -> ``p``, others in full (``train.lr``)."""
    return key.split(".", 2)[2] if key.startswith("reg.") and key.count(".") >= 2 else key


def label_with(base: str, values: dict[str, Any]) -> str:
    """``dropout (p=0.1, train.lr=0.01)``: ``base`` and the keys set in ``values`` (None and NaN left out)."""
    shown = [f"{short_key(k)}={v:g}" if isinstance(v, float) else f"{short_key(k)}={v}"
             for k, v in values.items() if v is not None and v == v]
    return f"{base} ({', '.join(shown)})" if shown else base


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


def _default_image_size(spec: dict[str, Any]) -> None:
    """``data.image_size`` unset: the dataset's ``default_image_size`` (what the CIFAR-style nets should see)."""
    data = spec.get("data")
    if isinstance(data, dict) and data.get("image_size") is None and "dataset" in spec:
        data["image_size"] = getattr(_check_dataset(spec["dataset"]), "default_image_size", None)


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


def artifact_file_ref(path: str, suite_dir: Path | str | None = None, data_root: Path | str | None = None,
                      key: str = "stages.<kind>.file") -> str:
    """A stage output given as a file: ``file:<absolute path>#<sha256 prefix>`` (content is part of the identity).

    ``path`` is an asset name (``mpbench data prepare NAME`` stores it under ``data_root``), an absolute path, or a
    path relative to ``suite_dir`` (the suite file's directory), then to the working directory."""
    from mpbench.assets import resolve_stage_file

    p = resolve_stage_file(str(path), Path(suite_dir) if suite_dir is not None else None,
                           Path(data_root) if data_root is not None else None, key=key)
    return f"file:{p}#{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}"


def artifact_path(results: Path, kind: str, ref: str) -> Path:
    """Where a run finds the artifact ``ref`` (an artifact id or a ``file:`` reference)."""
    if ref.startswith("file:"):
        return Path(ref[5:].rsplit("#", 1)[0])
    return RunDir(results, kind, ref).path


def _stage_job(kind: type[JobKind], spec: dict[str, Any]) -> Job:
    slug = kind.slug(spec)
    return Job(f"{slug}-{spec_hash(spec)[:8]}", slug, kind.name, spec)


class _Problems:
    """Usage errors collected over the whole plan (one line each, first occurrence order)."""

    def __init__(self) -> None:
        self.lines: dict[str, None] = {}

    @contextlib.contextmanager
    def collect(self):
        try:
            yield
        except (UsageError, DataMissingError) as e:
            self.lines.setdefault(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def raise_if_any(self) -> None:
        if self.lines:
            raise PreflightError(list(self.lines))


def _stage_refs(cfg: DictConfig, data_root: Path | None, problems: _Problems) -> dict[str, str]:
    """``stages.<kind>.file`` given: kind -> ``file:`` reference, the file checked as that kind's payload."""
    suite_dir = Path(cfg.source).parent if cfg.get("source") else None
    refs = {}
    for kind in stage_kinds():
        given = cfg.stages[kind.name].get("file")
        if given:
            with problems.collect():
                ref = artifact_file_ref(given, suite_dir, data_root, key=f"stages.{kind.name}.file")
                kind.check_file(artifact_path(Path("."), kind.name, ref))
                refs[kind.name] = ref
    return refs


def _run_spec(cfg: DictConfig, base: dict[str, Any], reg_cfg: dict[str, Any], point: dict[str, Any]
              ) -> tuple[dict[str, Any], Any]:
    """The resolved spec of one grid point (artifacts not attached yet) and its dataset source."""
    spec = copy.deepcopy(base)
    reg_over = copy.deepcopy(reg_cfg)
    dataset = point.get("dataset")
    if dataset in cfg.per_dataset:               # what differs for this dataset; a grid value still wins
        for k, v in flatten(OmegaConf.to_container(cfg.per_dataset[dataset], resolve=True), keep_lists=True).items():
            _set_dotted(spec, k, v)
    for k, v in point.items():
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
    _default_image_size(spec)
    spec["regularizer"] = names
    spec["seed"] = int(spec["seed"])
    spec["reg"] = {n: resolve_hparams(n, reg_over.get(n)) for n in names}
    spec["artifacts"] = {}
    return spec, source


def _attach_stages(cfg: DictConfig, spec: dict[str, Any], source, refs: dict[str, str],
                   artifacts: dict[str, Job]) -> None:
    """Fill ``spec["artifacts"]`` with the stage outputs its methods need (a stage job, or a given file)."""
    needs = sorted({k for n in spec["regularizer"] for k in REGULARIZERS.get(n).requires_for(spec["reg"][n])})
    for name in needs:
        if name in refs:
            spec["artifacts"][name] = refs[name]
            continue
        if name not in JOB_KINDS or not JOB_KINDS.get(name).is_stage():
            raise UsageError(f"a regularizer of {spec['regularizer']} needs unknown stage {name!r}: "
                             f"{did_you_mean(name, [k.name for k in stage_kinds()])}")
        kind = JOB_KINDS.get(name)
        section = OmegaConf.to_container(cfg.stages[name], resolve=True)
        section.pop("file", None)
        stage = kind.stage_spec(section, spec, spec["data"]["channels"] or source.channels)
        for dataset in kind.datasets(stage):
            _check_dataset(dataset)
        _default_image_size(stage)
        for model in kind.models(stage):
            _check_model(model)
        job = _stage_job(kind, stage)
        artifacts.setdefault(job.id, job)
        spec["artifacts"][name] = job.id


def expand(cfg: DictConfig, data_root: Path | None = None, problems: list[str] | None = None) -> Plan:
    """Cross the grid into run specs, validate every name and value, and attach stage artifacts.

    Every problem of the whole plan is collected: raised at once (``PreflightError``, one line each), or, when
    a ``problems`` list is given, appended to it (the plan then holds the jobs that did resolve)."""
    found = _Problems()
    plan = _expand(cfg, data_root, found)
    if problems is None:
        found.raise_if_any()
    else:
        problems.extend(found.lines)
    return plan


def _expand(cfg: DictConfig, data_root: Path | None, problems: _Problems) -> Plan:
    grid = grid_of(cfg)
    base = {
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "model_kwargs": OmegaConf.to_container(cfg.model_kwargs, resolve=True),
    }
    with problems.collect():
        base["eval"] = resolve_evals(list(cfg.eval), OmegaConf.to_container(cfg.eval_settings, resolve=True))
    reg_cfg = OmegaConf.to_container(cfg.reg, resolve=True)
    for name, given in reg_cfg.items():
        with problems.collect():
            if not isinstance(given, dict):
                raise UsageError(f"reg.{name} must map hparams to values (e.g. reg.{name}.p=0.1), got {given!r}")
            resolve_hparams(name, given)              # unknown method, hparam or bad value: now, not mid-sweep
    keys = list(grid)
    excludes = OmegaConf.to_container(cfg.exclude, resolve=True)
    for ex in excludes:
        unknown = [k for k in ex if k not in grid]
        if unknown:
            problems.lines.setdefault(f"exclude names {unknown[0]!r}, which is not a grid key: "
                                      f"{did_you_mean(unknown[0], grid)}")
    with problems.collect():
        check_id(cfg.name, "suite name")
    for name in cfg.per_dataset:
        with problems.collect():
            _check_dataset(name)
    refs = _stage_refs(cfg, data_root, problems)
    artifacts: dict[str, Job] = {}
    runs: dict[str, Job] = {}
    run_kind = JOB_KINDS.get("run")
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        if any(all(point[k] == v for k, v in ex.items()) for ex in excludes):
            continue
        with problems.collect():
            spec, source = _run_spec(cfg, base, reg_cfg, point)
            _attach_stages(cfg, spec, source, refs, artifacts)
            spec = {k: spec[k] for k in sorted(spec)}
            check_compatibility(spec, source)
            slug = run_kind.slug(spec)
            deps = [a for a in spec["artifacts"].values() if not a.startswith("file:")]
            job = Job(f"{slug}-{spec_hash(spec)[:8]}", slug, "run", spec, deps=deps)
            runs.setdefault(job.id, job)
    for group in (list(artifacts.values()), list(runs.values())):
        keys = [k for k in varying_keys(group) if not k.startswith("artifacts.")]
        for job in group:
            flat = flatten(job.spec)
            job.name = label_with(job.slug, {k: flat.get(k) for k in keys})
    report = OmegaConf.to_container(cfg.report, resolve=True)
    return Plan(cfg.name, cfg.description, list(artifacts.values()), list(runs.values()), report)
