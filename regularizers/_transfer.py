"""Shared by the fine-tuning family (finetune, finetune_bnreset, l2sp, delta): read a ``pretrain`` artifact and copy
the source network's weights into the target network.

Pretrain artifact contract: ``ctx.artifacts["pretrain"]`` is a directory holding ``model.pt`` (the source network's
``state_dict()``: same architecture, the source dataset's number of classes) and ``artifact.json``
(``{"kind": "pretrain", "id", "spec": {"model", "dataset", ...}, "num_classes"}``). A ``file:`` stage reference
(the path of a bare ``model.pt``) is accepted too; it has no ``artifact.json``, so only the key/shape check below
guards the architecture.

Matching is by ``state_dict`` key. Every source key that is kept must exist in the target with the same shape,
otherwise the architecture differs (``IncompatibleError``). Target keys the source lacks (modules inserted by a
regularizer listed earlier in the stack) keep their fresh initialisation and are counted as ``new``.

What is never loaded:
- the classifier (``model.get_classifier()``, the ``fc`` module of the CIFAR nets): the target has its own classes;
- with ``skip_bn`` (MetaPerturb release variant): every parameter AND buffer (running mean/var,
  ``num_batches_tracked``) of every BatchNorm module. BatchNorm is identified by module TYPE
  (``torch.nn.modules.batchnorm._BatchNorm`` subclasses: BatchNorm1d/2d/3d, SyncBatchNorm, timm BatchNormAct2d, plus
  any ``FrozenBatchNorm2d``), not by the substring ``"bn"`` in the key as the release does. On the release's
  networks the two agree except for BN inside a projection shortcut (``downsample.1`` in ResNet-18/34), which the
  substring rule loads and this rule resets; the small CIFAR ResNets have parameter-free shortcuts.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mpbench.errors import IncompatibleError, UsageError, describe_error
from mpbench.sites import find_classifier, is_batchnorm
from mpbench.regularization import Hparam, Regularizer, RunContext

KIND = "pretrain"


def _rebuild_hint(directory: Path) -> str:
    return f"delete {directory} and rerun `mpbench run` to rebuild the pretrain stage"


# --------------------------------------------------------------------------------------------------------------------
# artifact reading
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class SourceWeights:
    """A pretrain artifact, read and validated."""

    path: Path                      # the artifact directory (or the bare model file of a ``file:`` reference)
    model_file: Path
    artifact_id: str
    model: str | None               # timm name of the source architecture (None for a bare file)
    model_kwargs: dict[str, Any]
    num_classes: int | None
    state: dict[str, torch.Tensor]


def artifact_dir(ctx: RunContext, who: str) -> Path:
    if KIND not in ctx.artifacts:
        raise UsageError(f"{who} needs a pretrain artifact but the run has none: start it with `mpbench run`, "
                         f"which builds the pretrain stage first")
    return Path(ctx.artifacts[KIND])


def read_meta(directory: Path) -> dict[str, Any]:
    """``artifact.json`` of a pretrain artifact directory; a missing or bad file is a one-line UsageError."""
    f = directory / "artifact.json"
    if not f.is_file():
        raise UsageError(f"pretrain artifact file {f} is missing: {_rebuild_hint(directory)}")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"pretrain artifact file {f} is unreadable ({describe_error(e, 120)}): {_rebuild_hint(directory)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("spec"), dict) or not meta["spec"].get("model"):
        raise UsageError(f"pretrain artifact file {f} lacks spec.model: {_rebuild_hint(directory)}")
    if meta.get("kind", KIND) != KIND:
        raise UsageError(f"artifact {f} is of kind {meta.get('kind')!r}, not 'pretrain': {_rebuild_hint(directory)}")
    return meta


def read_state(model_file: Path, directory: Path) -> dict[str, torch.Tensor]:
    if not model_file.is_file():
        raise UsageError(f"pretrain artifact file {model_file} is missing: {_rebuild_hint(directory)}")
    try:
        state = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip/IO failure means the same thing to the user
        raise UsageError(f"pretrain artifact file {model_file} is corrupt ({describe_error(e, 120)}): "
                         f"{_rebuild_hint(directory)}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UsageError(f"pretrain artifact file {model_file} is not a state_dict of tensors: "
                         f"{_rebuild_hint(directory)}")
    return state


def target_model_name(ctx: RunContext) -> str:
    return str(ctx.spec.get("model") or ctx.model_name)


def check_same_model(ctx: RunContext, meta: dict[str, Any], directory: Path, who: str) -> None:
    src, tgt = str(meta["spec"]["model"]), target_model_name(ctx)
    if src != tgt:
        raise IncompatibleError(f"{who}: pretrain artifact {directory.name} holds a {src} but the run's model is {tgt}: "
                                f"fine-tuning needs the same architecture (rebuild the stage with `mpbench run`)")


def load_source(ctx: RunContext, who: str) -> SourceWeights:
    """Read ``ctx.artifacts['pretrain']``, check the architecture name, return the source weights (on the CPU)."""
    path = artifact_dir(ctx, who)
    if path.is_file():          # ``file:`` stage reference: a bare state_dict
        state = read_state(path, path)
        return SourceWeights(path, path, path.name, None, {}, None, state)
    if not path.is_dir():
        raise UsageError(f"pretrain artifact {path} is missing: rerun `mpbench run`, which rebuilds stages")
    meta = read_meta(path)
    check_same_model(ctx, meta, path, who)
    state = read_state(path / "model.pt", path)
    spec = meta["spec"]
    nc = meta.get("num_classes")
    return SourceWeights(path, path / "model.pt", str(meta.get("id") or path.name), str(spec["model"]),
                         dict(spec.get("model_kwargs") or {}), int(nc) if nc is not None else None, state)


# --------------------------------------------------------------------------------------------------------------------
# model anatomy
# --------------------------------------------------------------------------------------------------------------------

def batchnorm_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if is_batchnorm(m)}


def classifier_name(model: nn.Module, who: str) -> str:
    """Qualified name of the classifier module (:func:`mpbench.sites.find_classifier`)."""
    found = find_classifier(model)
    if found is not None:
        return found[0]
    raise IncompatibleError(f"{who}: {type(model).__name__} has no classifier module (timm get_classifier): "
                            f"cannot tell the new head from the transferred layers")


def under(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def owner(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


@dataclass
class TransferReport:
    artifact_id: str
    bn_reset: bool
    loaded: list[str] = field(default_factory=list)            # target keys now equal to the source
    skipped_classifier: list[str] = field(default_factory=list)  # source keys of the old head
    skipped_bn: list[str] = field(default_factory=list)        # source keys of BatchNorm modules (bn_reset only)
    new: list[str] = field(default_factory=list)               # target keys absent from the source (fresh init)

    def summary(self) -> dict[str, Any]:
        return {"artifact": self.artifact_id, "bn_reset": self.bn_reset, "loaded": len(self.loaded),
                "skipped_classifier": len(self.skipped_classifier), "skipped_bn": len(self.skipped_bn),
                "new": len(self.new)}


def transfer(model: nn.Module, src: SourceWeights, *, skip_bn: bool, who: str) -> TransferReport:
    """Copy the source weights into ``model`` in place (see the module docstring for what is skipped)."""
    target = model.state_dict()
    head = classifier_name(model, who)
    bns = batchnorm_names(model) if skip_bn else set()
    rep = TransferReport(src.artifact_id, skip_bn)
    to_load: dict[str, torch.Tensor] = {}
    for k, v in src.state.items():
        if under(k, head):
            rep.skipped_classifier.append(k)
        elif skip_bn and owner(k) in bns:
            rep.skipped_bn.append(k)
        elif k not in target:
            raise IncompatibleError(f"{who}: source weight {k!r} of {src.model_file} has no counterpart in the "
                                    f"{type(model).__name__}: the architectures differ (or a regularizer listed "
                                    f"before {who} renamed modules: list {who} first)")
        elif tuple(target[k].shape) != tuple(v.shape):
            raise IncompatibleError(f"{who}: source weight {k!r} of {src.model_file} has shape {tuple(v.shape)}, the "
                                    f"model's is {tuple(target[k].shape)}: the architectures differ")
        else:
            to_load[k] = v
    if not to_load:
        raise IncompatibleError(f"{who}: nothing to load from {src.model_file}: no key matches the model")
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    rep.loaded = list(to_load)
    skipped = set(rep.skipped_bn)
    rep.new = [k for k in target if k not in src.state and not under(k, head) and k not in skipped]
    return rep


def shared_and_head_params(model: nn.Module, rep: TransferReport, who: str
                           ) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(parameters loaded from the source, parameters of the new classifier)."""
    head = classifier_name(model, who)
    loaded = set(rep.loaded)
    params = list(model.named_parameters())
    return ([(n, p) for n, p in params if n in loaded], [(n, p) for n, p in params if under(n, head)])


def without_weight_decay(groups: list[dict[str, Any]], params: list[nn.Parameter]) -> list[dict[str, Any]]:
    """Move ``params`` into copies of their groups with ``weight_decay = 0`` (other group settings kept)."""
    ids = {id(p) for p in params}
    out: list[dict[str, Any]] = []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in ids]
        moved = [p for p in g["params"] if id(p) in ids]
        if keep:
            out.append({**g, "params": keep})
        if moved:
            out.append({**g, "params": moved, "weight_decay": 0.0})
    return out


# --------------------------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------------------------

class SourceInit(Regularizer):
    """Initialise from the pretrain artifact's weights (all but the classifier; BN too unless ``skip_bn``)."""

    requires: ClassVar[tuple[str, ...]] = (KIND,)
    claims: ClassVar[tuple[str, ...]] = ("init",)
    skip_bn: ClassVar[bool] = False
    hparams: ClassVar[dict[str, Hparam]] = {}

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.report: TransferReport | None = None
        self.source: SourceWeights | None = None

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        classifier_name(model, cls.name)
        path = ctx.artifacts.get(KIND)
        if path is None or not Path(path).is_dir() or not (Path(path) / "artifact.json").is_file():
            return      # not built yet (or a bare file): checked again in attach
        try:
            meta = read_meta(Path(path))
        except UsageError:
            return      # attach reports the bad file
        check_same_model(ctx, meta, Path(path), cls.name)

    def attach(self, model: nn.Module) -> None:
        self.source = load_source(self.ctx, self.name)
        self.report = transfer(model, self.source, skip_bn=self.skip_bn, who=self.name)
        loaded = set(self.report.loaded)
        self._transferred = sum(p.numel() for n, p in model.named_parameters() if n in loaded)

    def transferred(self) -> int:
        """Parameters (not buffers) copied from the source network."""
        return getattr(self, "_transferred", 0)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.report is not None:
            d["transfer"] = self.report.summary()
        return d

