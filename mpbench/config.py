"""Suites: YAML files validated against a typed schema, with ``key=value`` overrides (OmegaConf dotlist)."""
from __future__ import annotations

import importlib.resources
import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpbench.errors import UsageError, did_you_mean


@dataclass
class AugmentConfig:
    crop_pad: int = 4          # random crop with this zero padding (0 = off)
    flip: bool = True          # random horizontal flip


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 64
    optimizer: str = "adam"            # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 5e-4          # L2 through the optimizer (Adam, not AdamW), as in MetaPerturb's release
    momentum: float = 0.9               # sgd only
    schedule: str = "multistep"         # multistep | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.4, 0.7, 0.9])   # fractions of steps
    gamma: float = 0.3
    eval_every: int = 0                 # 0 = final evaluation only
    log_every: int = 0                  # steps per training row in metrics.jsonl / W&B (0 = about 200 rows a run)
    eval_batch_size: int = 500
    eval_passes: Optional[int] = None   # MC passes of periodic evals (None = the method's protocol)
    final_eval_passes: Optional[int] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    checkpoint_every: int = 0           # steps between resumable checkpoints (0 = only on SIGTERM/SIGUSR); not identity


@dataclass
class DataConfig:
    image_size: Optional[int] = None    # None = the dataset's native size
    channels: Optional[int] = None      # None = native; 3 makes grayscale sets 3-channel
    per_class: Optional[int] = None     # first N training images of each class (s-CIFAR100 = 50)
    classes: Optional[list[int]] = None  # class subset, relabelled in this order


@dataclass
class LauncherConfig:
    name: str = "local"                 # local | pool | slurm
    devices: Any = "cpu"                # cpu | auto | [0, 1] (GPU ids)
    slots: int = 1                      # concurrent runs per device
    threads: int = 0                    # torch threads per run (0 = cores / concurrent runs)
    max_retries: int = 1                # retries of transient failures
    heartbeat_s: float = 30.0
    stale_after_s: float = 300.0
    # slurm (submitit)
    partition: Optional[str] = None
    time_min: int = 60
    gpus_per_task: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 8
    array_parallelism: int = 16
    jobs_per_task: int = 1               # jobs one array element runs in sequence, in one process
    folder: Optional[str] = None         # submitit logs (default <results>/slurm)
    sbatch: dict[str, Any] = field(default_factory=dict)   # extra sbatch parameters, validated by name


AUTOCAST_MODES = ("none", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ExecutionConfig:
    """How each run's training step executes (``mpbench/execution.py``): not part of a run's identity, recorded in
    result.json (``execution``) with any fallback and its reason. All off by default; only ``autocast=bf16`` changes
    the numbers' distribution (the others change fp32 rounding at most)."""

    channels_last: bool = False         # model and training batches in NHWC
    cudnn_benchmark: bool = False       # cuDNN autotuner (CUDA only)
    fused_adam: bool = False            # torch's fused Adam kernel (Adam only; CPU and CUDA)
    autocast: str = "none"              # none | bf16 (BatchNorm and MetaPerturb's perturbation stay float32)
    compile: bool = False               # torch.compile of the model's training forward
    compile_mode: str = "default"       # default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    cuda_graph: bool = False            # the whole step in one CUDA graph (CUDA, graph-safe methods, Adam)
    # runs of a wave that differ only by seed train as one vmapped model (mpbench/seed_array.py), each still its own
    # run; not part of a run's identity: equal to separate runs to float tolerance (tests/test_seed_array.py)
    seed_array: bool = False
    seed_array_max: int = 16            # seeds per array at most


@dataclass
class WandbConfig:
    mode: str = "auto"                  # auto | online | offline | disabled
    project: str = "mpbench"
    entity: Optional[str] = None


@dataclass
class ReportConfig:
    rows: list[str] = field(default_factory=lambda: ["regularizer"])
    columns: list[str] = field(default_factory=lambda: ["model", "dataset"])
    metric: str = "acc"
    labels: dict[str, str] = field(default_factory=dict)     # value -> display name, over the registries' own
    row_info: list[str] = field(default_factory=list)        # per-row run statistics shown beside the labels


@dataclass
class SuiteConfig:
    name: str = "unnamed"
    description: str = ""
    grid: dict[str, Any] = field(default_factory=dict)          # crossed lists; see GRID_DEFAULTS
    exclude: list[dict[str, Any]] = field(default_factory=list)  # grid points matching all keys of an entry are dropped
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reg: dict[str, Any] = field(default_factory=dict)           # reg.<name>.<hparam>
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    per_dataset: dict[str, Any] = field(default_factory=dict)   # per_dataset.<dataset>.{train,data}: what differs
    eval: list[str] = field(default_factory=lambda: ["classification"])   # evaluations (mpbench/evals/), in order
    eval_settings: dict[str, Any] = field(default_factory=dict)  # eval_settings.<evaluation>.<setting>
    stages: Any = None                                           # stages.<kind>: one section per stage job kind
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)   # how steps run; not identity
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    source: Optional[str] = None        # the suite file, set by mpbench


GRID_DEFAULTS: dict[str, Any] = {"regularizer": ["base"], "model": ["resnet20"], "dataset": ["synthetic"], "seed": [0]}
# keys of a run spec a grid may cross besides the four above (dotted paths into these sections)
GRID_SECTIONS = ("train", "data", "reg", "model_kwargs")


def source_checkout() -> Path | None:
    """The source tree the imported ``mpbench`` package lives in (its parent directory holds the ``pyproject.toml``
    of project ``mpbench``), or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    try:
        meta = tomllib.loads((root / "pyproject.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    project = meta.get("project")
    return root if isinstance(project, dict) and project.get("name") == "mpbench" else None


def suites_dir() -> Path:
    """Where suite names are looked up: ``$MPBENCH_SUITES``, else the suites shipped in the package (``mpbench.suites``,
    which the build maps to the top-level ``suites/`` directory of the source tree)."""
    env = os.environ.get("MPBENCH_SUITES")
    if env:
        return Path(env).expanduser()
    try:
        shipped = importlib.resources.files("mpbench.suites")
    except ModuleNotFoundError:        # a source tree run without (re)installing: its suites/ directory
        checkout = source_checkout()
        if checkout is None:
            raise UsageError("mpbench's suites are not installed (no package mpbench.suites): reinstall mpbench, "
                             "or set MPBENCH_SUITES to a directory of suite files") from None
        return checkout / "suites"
    return Path(str(shipped))


def cache_dir() -> Path:
    """mpbench's cache (compiled kernels, step-time probes): ``$MPBENCH_CACHE``, else ``~/.cache/mpbench``."""
    return Path(os.environ.get("MPBENCH_CACHE") or Path.home() / ".cache" / "mpbench")


def env_opted_out(name: str) -> bool:
    """An on-by-default feature switched off by its environment variable (``0``, ``false``, ``no`` or ``off``)."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")


def suite_schema() -> type:
    """``SuiteConfig`` with ``stages`` typed by the registered stage job kinds (``stages.<kind>`` sections)."""
    from mpbench.jobs import stage_kinds

    stages = make_dataclass("StagesConfig", [(k.name, k.config, field(default_factory=k.config))
                                             for k in stage_kinds()])
    return make_dataclass("Suite", [("stages", stages, field(default_factory=stages))], bases=(SuiteConfig,))


def schema_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema (for 'did you mean')."""
    cls = cls or suite_schema()
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            out += schema_keys(type(default), key + ".")
    return out


def _explain(exc: OmegaConfBaseException, source: str) -> UsageError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Missing key" in msg or "Key '" in msg:
        return UsageError(f"{source}: unknown key {key!r}: {did_you_mean(key, schema_keys())}")
    return UsageError(f"{source}: bad value for {key!r}: {msg}")


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"suite file {path} not found: check the path or run `mpbench list suites`") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UsageError(f"{path}{where}: not valid YAML ({str(e).splitlines()[0]}): fix the file") from None
    except IsADirectoryError:
        raise UsageError(f"suite {path} is a directory: give a YAML file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a suite must be a YAML mapping (name, grid, train, ...), got {type(data).__name__}")
    return data


def find_suite(name: str) -> Path:
    """A suite name (a file in :func:`suites_dir`) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name)
    path = suites_dir() / f"{name}.yaml"
    if not path.exists():
        known = [p.stem for p in suites_dir().glob("*.yaml")]
        raise UsageError(f"unknown suite {name!r}: {did_you_mean(name, known)} (or give a path to a YAML file)")
    return path


def suite_name(suite: str) -> str:
    """The name a suite's results are recorded under, from ``suite=`` in any form ``mpbench run`` takes: a name,
    or a path to a YAML file (its ``name:``, else its stem)."""
    from mpbench.store import check_id

    if not suite.endswith((".yaml", ".yml")) and os.sep not in suite and "/" not in suite:
        return check_id(suite, "suite name")
    path, name = Path(suite), Path(suite).stem
    try:
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"].strip():
            name = data["name"].strip()
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass                                       # no readable file: its stem names the suite, as `run` does
    return check_id(name, "suite name")


def parse_overrides(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Split ``suite=NAME`` from the other ``key=value`` overrides."""
    suite, rest = None, []
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r} is not key=value (e.g. train.steps=200)")
        key, value = item.split("=", 1)
        if key == "suite":
            suite = value
        else:
            rest.append(item)
    return suite, rest


def load_suite(name: str, overrides: list[str] = ()) -> DictConfig:
    """Load, merge overrides and validate; returns a read-only config."""
    path = find_suite(name)
    raw = load_yaml(path)
    raw.setdefault("name", path.stem)
    schema = OmegaConf.structured(suite_schema())
    try:
        cfg = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as e:
        raise _explain(e, str(path)) from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _explain(e, "override") from None
    except Exception as e:  # the dotlist grammar
        raise UsageError(f"override: cannot parse {list(overrides)}: {e}") from None
    cfg.source = str(path.resolve())
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check_choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UsageError(f"{key}={value!r} is not valid: {did_you_mean(value, options)}")


def check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate_train(t: Any, prefix: str = "train") -> None:
    check_positive(f"{prefix}.steps", t.steps)
    check_positive(f"{prefix}.batch_size", t.batch_size)
    check_positive(f"{prefix}.lr", t.lr)
    check_positive(f"{prefix}.eval_every", t.eval_every, allow_zero=True)
    check_positive(f"{prefix}.log_every", t.log_every, allow_zero=True)
    check_positive(f"{prefix}.eval_batch_size", t.eval_batch_size)
    check_positive(f"{prefix}.weight_decay", t.weight_decay, allow_zero=True)
    check_choice(f"{prefix}.optimizer", t.optimizer, ("adam", "sgd"))
    check_choice(f"{prefix}.schedule", t.schedule, ("multistep", "cosine", "constant"))
    check_positive(f"{prefix}.checkpoint_every", t.checkpoint_every, allow_zero=True)
    for p in ("eval_passes", "final_eval_passes"):
        if t[p] is not None:
            check_positive(f"{prefix}.{p}", t[p])


def validate_per_dataset(cfg: DictConfig) -> None:
    """``per_dataset.<dataset>`` may set only ``train`` and ``data`` keys, each checked against the schema."""
    train_data = OmegaConf.structured({"train": TrainConfig(), "data": DataConfig()})
    for name, section in cfg.per_dataset.items():
        if not isinstance(section, DictConfig) or any(k not in ("train", "data") for k in section):
            raise UsageError(f"per_dataset.{name} may set train.* and data.* keys only "
                             f"(e.g. per_dataset.{name}.data.image_size=84)")
        try:
            merged = OmegaConf.merge(train_data, section)
        except OmegaConfBaseException as e:
            raise _explain(e, f"per_dataset.{name}") from None
        validate_train(merged.train, f"per_dataset.{name}.train")


def grid_of(cfg: DictConfig) -> dict[str, list[Any]]:
    """The grid with nested sections flattened to dotted keys and scalars made 1-lists."""
    flat: dict[str, Any] = dict(GRID_DEFAULTS)

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, (dict, DictConfig)) and key.split(".")[0] in GRID_SECTIONS:
                walk(v, key + ".")
            else:
                flat[key] = v

    walk(OmegaConf.to_container(cfg.grid, resolve=True) if isinstance(cfg.grid, DictConfig) else cfg.grid, "")
    out = {}
    for k, v in flat.items():
        out[k] = list(v) if isinstance(v, (list, tuple)) else [v]
        if not out[k]:
            raise UsageError(f"grid.{k} is an empty list: give at least one value")
    return out


def validate(cfg: DictConfig) -> None:
    """Semantic checks beyond types; registry names are checked by the planner."""
    validate_train(cfg.train)
    check_choice("launcher.name", cfg.launcher.name, ("local", "pool", "slurm"))
    check_choice("wandb.mode", cfg.wandb.mode, ("auto", "online", "offline", "disabled"))
    check_positive("launcher.slots", cfg.launcher.slots)
    check_positive("launcher.threads", cfg.launcher.threads, allow_zero=True)
    check_positive("launcher.max_retries", cfg.launcher.max_retries, allow_zero=True)
    check_choice("execution.autocast", cfg.execution.autocast, AUTOCAST_MODES)
    check_choice("execution.compile_mode", cfg.execution.compile_mode, COMPILE_MODES)
    if cfg.execution.seed_array_max < 2:
        raise UsageError(f"execution.seed_array_max must be >= 2, got {cfg.execution.seed_array_max}")
    check_positive("launcher.jobs_per_task", cfg.launcher.jobs_per_task)
    from mpbench.jobs import stage_kinds

    for kind in stage_kinds():
        kind.validate(cfg.stages[kind.name], f"stages.{kind.name}")
    validate_per_dataset(cfg)
    valid_grid = set(GRID_DEFAULTS) | {k for k in schema_keys() if k.split(".")[0] in ("train", "data")}
    for key in grid_of(cfg):
        section = key.split(".")[0]
        if key not in valid_grid and section not in ("reg", "model_kwargs"):
            raise UsageError(f"unknown grid key grid.{key}: {did_you_mean(key, sorted(valid_grid))}")
        if section == "reg" and key.count(".") != 2:
            raise UsageError(f"grid.{key}: regularizer hparams are crossed as grid.reg.<method>.<hparam>")
