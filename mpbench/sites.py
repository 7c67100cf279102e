"""Insertion sites: where a regularizer may put a module inside a network.

Kinds of site (see ``docs/design.md`` and the design notes on MetaPerturb and DropBlock):

- ``"block"``: a residual block's output after ``out + shortcut`` and before its final ReLU, or in a plain conv
  net after conv+BN and before ReLU/pooling. These are MetaPerturb's sites (Ryu et al., NeurIPS 2020). Never
  after the stem.
- ``"branch"``: the end of a residual branch, before the add;
- ``"shortcut"``: the shortcut path (DropBlock goes on both, Ghiasi et al., NeurIPS 2018).

mpbench's own networks (``mpbench.models``) hold explicit :class:`Site` modules. Any other timm conv net gets
``"block"`` sites found generically (the blocks inside its stage containers); modules are inserted there through
hooks and registered as ``mpbench_<key>`` submodules of the block, so ``state_dict()`` and ``.to()`` see them and
the original keys do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpbench.errors import IncompatibleError, UsageError, did_you_mean

KINDS = ("block", "branch", "shortcut")
_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class SiteInfo:
    name: str      # module path of the Site (own nets) or of the block (generic nets)
    kind: str      # one of KINDS
    stage: int     # 0-based stage index
    channels: int  # channels of the tensor at the site


class Site(nn.Module):
    """An insertion point. Identity until modules are inserted; then applies them in insertion order."""

    def __init__(self, kind: str, stage: int, channels: int, where: str = ""):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown site kind {kind!r}: {did_you_mean(kind, KINDS)}")
        self.kind, self.stage, self.channels, self.where = kind, stage, channels, where

    def insert(self, key: str, module: nn.Module) -> None:
        if key in self._modules:
            raise ValueError(f"a module named {key!r} is already inserted at this site")
        self.add_module(key, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self._modules.values():
            x = m(x)
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind}, stage={self.stage}, channels={self.channels}"


# ---- generic timm nets ---------------------------------------------------------------------------------------

class _Apply:
    """Hook object applying inserted modules in order. Holds the modules themselves (not a closure) so that
    ``copy.deepcopy`` and pickling of the model map it onto the copied modules."""

    def __init__(self, pre: bool):
        self.pre = pre
        self.modules: list[nn.Module] = []

    def __call__(self, _module: nn.Module, args: tuple, out: torch.Tensor | None = None):
        x = args[0] if self.pre else out
        for m in self.modules:
            x = m(x)
        return (x, *args[1:]) if self.pre else x


def _final_act(block: nn.Module) -> nn.Module | None:
    """The final activation of a timm ResNet block (called once, right after ``x += shortcut``), else None."""
    from timm.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, BasicBlock):
        return block.act2
    if isinstance(block, Bottleneck):
        return block.act3
    return None


def _block_container(stage: nn.Module) -> nn.Module | None:
    blocks = getattr(stage, "blocks", None)
    if isinstance(blocks, _CONTAINERS):
        return blocks
    if isinstance(stage, _CONTAINERS):
        return stage
    kids = list(stage.children())
    one_class = kids and len({type(k) for k in kids}) == 1 and next(kids[0].children(), None) is not None
    if one_class and not isinstance(stage, nn.ModuleDict):
        return stage        # e.g. timm RegNet's RegStage (b1, b2, ...); not DenseNet's dict of dense layers
    return None


def _stage_paths(model: nn.Module) -> list[str]:
    """Candidate stage containers: ``model.stage_names``, else timm's ``feature_info`` modules (siblings included
    when they sit in a container of stages, e.g. ``blocks.N``), else ``layerN`` / ``stages.N`` / ``blocks.N``."""
    names = getattr(model, "stage_names", None)
    if names:
        return list(names)
    info = getattr(model, "feature_info", None)
    paths = [f["module"] for f in info] if isinstance(info, list) and info and isinstance(info[0], dict) else []
    if not paths:
        kids = dict(model.named_children())
        paths = [n for n in kids if n.startswith("layer") and n[5:].isdigit()]
        for top in ("stages", "blocks"):
            if isinstance(kids.get(top), _CONTAINERS):
                paths += [f"{top}.{i}" for i in range(len(kids[top]))]
    out: list[str] = []
    for p in paths:
        parent = p.rpartition(".")[0]
        siblings = list(model.get_submodule(parent).children()) if parent else []
        if siblings and all(isinstance(s, _CONTAINERS) for s in siblings):
            cands = [f"{parent}.{n}" for n, _ in model.get_submodule(parent).named_children()]
        else:
            cands = [p]
        out += [c for c in cands if c not in out]
    return out


def _dry_forward(model: nn.Module, paths: list[str]) -> dict[str, tuple[int, int]]:
    """Run a tiny forward pass; returns {path: (call order, channels)} for paths whose output is 4-D."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return {}
    p = next(model.parameters())
    seen: dict[str, tuple[int, int]] = {}

    def hook(path: str):
        def fn(_m, _a, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and path not in seen:
                seen[path] = (len(seen), int(out.shape[1]))
        return fn

    handles = [model.get_submodule(q).register_forward_hook(hook(q)) for q in paths]
    modes = {m: m.training for m in model.modules()}
    cfg = getattr(model, "pretrained_cfg", None)
    sizes = [64] + ([int(cfg["input_size"][-1])] if isinstance(cfg, dict) and cfg.get("input_size") else [])
    try:
        model.eval()
        for size in sizes:
            try:
                with torch.no_grad():
                    model(torch.zeros(1, first.in_channels, size, size, device=p.device, dtype=p.dtype))
                break
            except (RuntimeError, ValueError, AssertionError):   # too small for this net: try its own size
                seen.clear()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def _generic(model: nn.Module) -> tuple[list[SiteInfo], list[str]]:
    """Block sites and stage paths of a net without explicit Sites (cached on the model)."""
    cached = model.__dict__.get("_mpbench_generic")
    if cached is not None:
        return cached
    stages: list[tuple[str, list[str]]] = []
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    for path in _stage_paths(model):
        stage = model.get_submodule(path)
        cont = _block_container(stage)
        if cont is None or "stem" in path or any(m is first for m in stage.modules()):
            continue        # never the stem
        prefix = path if cont is stage else f"{path}.blocks"
        blocks = [f"{prefix}.{n}" for n, b in cont.named_children() if next(b.children(), None) is not None]
        if blocks:
            stages.append((path, blocks))
    found = _dry_forward(model, [b for _, bs in stages for b in bs]) if stages else {}
    sites, stage_paths = [], []
    for path, blocks in stages:
        kept = [b for b in blocks if b in found]
        if kept:
            sites += [SiteInfo(b, "block", len(stage_paths), found[b][1]) for b in kept]
            stage_paths.append(path)
    sites.sort(key=lambda s: found[s.name][0])
    result = (sites, stage_paths)
    model.__dict__["_mpbench_generic"] = result
    return result


# ---- public API ----------------------------------------------------------------------------------------------

def _explicit(model: nn.Module) -> list[tuple[str, Site]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Site)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UsageError(f"unknown site kind {kind!r}: {did_you_mean(kind, KINDS)}")


def list_sites(model: nn.Module, kind: str = "block") -> list[SiteInfo]:
    """Sites of ``kind`` in forward order; [] if the model has none of that kind. Raises IncompatibleError
    if the model has no recognisable sites at all."""
    _check_kind(kind)
    explicit = _explicit(model)
    if explicit:
        return [SiteInfo(n, s.kind, s.stage, s.channels) for n, s in explicit if s.kind == kind]
    sites, _ = _generic(model)
    if not sites:
        raise IncompatibleError(f"{type(model).__name__}: no insertion sites found (no stage containers of "
                                "conv blocks); use a timm conv net or an mpbench model")
    return sites if kind == "block" else []


def site_kinds(model: nn.Module) -> set[str]:
    """Kinds of site the model offers (empty if none is recognisable)."""
    explicit = _explicit(model)
    if explicit:
        return {s.kind for _, s in explicit}
    return {"block"} if _generic(model)[0] else set()


def stage_outputs(model: nn.Module) -> list[str]:
    """Module paths whose outputs are the stage outputs, in forward order (manifold mixup, DELTA)."""
    names = getattr(model, "stage_names", None)
    if names:
        return list(names)
    stages = _generic(model)[1]
    if not stages:
        raise IncompatibleError(f"{type(model).__name__}: no stages found; use a timm conv net or an mpbench model")
    return stages


def insert(model: nn.Module, site: str, module: nn.Module, key: str) -> None:
    """Make ``out = module(out)`` at ``site`` (a name from :func:`list_sites`); ``key`` names the submodule.

    At an explicit :class:`Site` the module is registered as ``<site>.<key>``. Anywhere else (a generic block)
    it is registered as ``<block>.mpbench_<key>`` and applied by a hook: a pre-hook on the final activation of
    timm ResNet blocks (so it sits after the add, before the ReLU, as in MetaPerturb), else a forward hook on the
    block's output. Several insertions at one site apply in insertion order.
    """
    try:
        target = model.get_submodule(site)
    except AttributeError:
        names = [s.name for k in site_kinds(model) for s in list_sites(model, k)]
        raise UsageError(f"no site {site!r} in {type(model).__name__}: {did_you_mean(site, names)}") from None
    if isinstance(target, Site):
        target.insert(key, module)
        return
    name = f"mpbench_{key}"
    if name in target._modules:
        raise ValueError(f"a module named {key!r} is already inserted at {site!r}")
    target.add_module(name, module)
    hook = target.__dict__.get("_mpbench_hook")
    if hook is None:
        act = _final_act(target)
        hook = _Apply(pre=act is not None)
        if act is not None:
            act.register_forward_pre_hook(hook)
        else:
            target.register_forward_hook(hook)
        target.__dict__["_mpbench_hook"] = hook
    hook.modules.append(module)


def describe_sites(model: nn.Module) -> list[str]:
    """Human-readable lines, one per site, for ``mpbench list regularizers --sites MODEL``."""
    explicit = dict(_explicit(model))
    if explicit:
        rows = [(n, s.kind, s.stage, s.channels, s.where) for n, s in explicit.items()]
    else:
        rows = []
        for s in _generic(model)[0]:
            act = _final_act(model.get_submodule(s.name))
            where = ("after the residual add, before the block's final activation (pre-hook)" if act is not None
                     else "block output (forward hook)")
            rows.append((s.name, s.kind, s.stage, s.channels, where))
    if not rows:
        return [f"{type(model).__name__}: no insertion sites found"]
    w = max(len(r[0]) for r in rows)
    return [f"{n:<{w}}  {k:<8}  stage {st}  {c:>4} ch  {where}".rstrip() for n, k, st, c, where in rows]


def find_classifier(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(qualified name, module) of the classifier: timm's ``get_classifier()``, else an ``fc`` / ``classifier`` /
    ``head`` attribute; None when the model has none (or it is an ``nn.Identity``)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        for name, module in model.named_modules():
            if module is head and name:
                return name, module
    for name in ("fc", "classifier", "head"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
            return name, module
    return None


def is_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm layer: any ``_BatchNorm`` subclass, or timm's ``FrozenBatchNorm2d``."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d"
