"""DELTA: fine-tuning with a feature-map distance to a frozen copy of the source network."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mpbench.errors import IncompatibleError, UsageError
from mpbench.hparams import at_least, boolean, one_of
from mpbench.regularization import Hparam, RunContext, register_regularizer
from regularizers._transfer import (SourceInit, classifier_name, shared_and_head_params,
                                    without_weight_decay)

_SITES = ("last_conv", "stage_output")
_ATTENTION_MSG = ("delta: attention=true (DELTA's channel-attention weights from a head-only pre-training and "
                  "per-filter ablation pass) is not implemented: use attention=false (W_c = 1)")


def _stages(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    names = getattr(model, "stage_names", None)
    if names:
        return [(n, model.get_submodule(n)) for n in names]
    try:
        from mpbench.sites import stage_outputs
    except ImportError:
        stage_outputs = None
    if stage_outputs is not None:
        out = []
        for s in stage_outputs(model):
            n = s if isinstance(s, str) else (s[0] if isinstance(s, tuple) else getattr(s, "name", None))
            if isinstance(n, str):
                out.append((n, model.get_submodule(n)))
        if out:
            return out
    raise IncompatibleError(f"{who}: {type(model).__name__} lists no stages (stage_names): cannot pick the "
                            f"feature maps to match")


def feature_sites(model: nn.Module, mode: str, who: str = "delta") -> list[str]:
    """Qualified names of the modules whose outputs DELTA matches.

    ``last_conv`` (default, as the official code: ``layerK.<last>.conv3`` for ResNet-50/101): the last
    ``nn.Conv2d`` of each stage in registration order, i.e. its output before BN, leaving out convs of projection
    shortcuts (any module path containing ``downsample`` or ``shortcut``). ``stage_output``: the stage container's
    output (after the residual add and ReLU of its last block).
    """
    out = []
    for sn, stage in _stages(model, who):
        if mode == "stage_output":
            out.append(sn)
            continue
        convs = [n for n, m in stage.named_modules() if isinstance(m, nn.Conv2d)
                 and not any(t in ("downsample", "shortcut") for t in n.split("."))]
        if not convs:
            raise IncompatibleError(f"{who}: stage {sn} of {type(model).__name__} has no conv: use "
                                    f"reg.delta.sites=stage_output")
        out.append(f"{sn}.{convs[-1]}" if convs[-1] else sn)
    return out


@register_regularizer("delta")
class DELTA(SourceInit):
    """DELTA: fine-tuning + alpha * sum_l mean_b sum_c ||FM_t - FM_s||^2/(H*W) + (beta/2)||w_fc||^2, wd off.

    Initialisation is standard fine-tuning (every source key but the classifier's). A frozen copy of the source
    network (all of ``model.pt``, source classifier included) runs in eval mode on the same batch; the distance is
    taken at the last conv of each stage, before its BN (``sites=last_conv``, the official choice) or at the stage
    outputs (``sites=stage_output``). Per layer: squared L2 distance summed over channels and positions, divided
    by H*W, averaged over the batch; layers summed. ``W_c = 1`` (the ``fea_map`` variant without attention);
    ``attention=true`` is rejected. The head term is (beta/2)*(||W_fc||^2 + ||b_fc||^2). As in the official
    scripts weight decay is off for the transferred layers and the head (``param_groups``).

    Scale: the official code sums over the batch with a factor 1/2 (``0.5 * sum_b``); here the batch is averaged,
    so alpha here = alpha_official * batch_size / 2 for the same strength, and alpha does not depend on the batch
    size. Defaults alpha = beta = 0.01 are the official values (lixingjian/DELTA ``run.sh``).
    """

    citation = "Li et al., DELTA: DEep Learning Transfer using Feature Map with Attention, ICLR 2019"
    display = "DELTA"
    hparams: ClassVar[dict[str, Hparam]] = {
        "alpha": Hparam(0.01, "weight of the feature-map distance", at_least(0)),
        "beta": Hparam(0.01, "weight of (1/2)||w_fc||^2 (new classifier)", at_least(0)),
        "attention": Hparam(False, "channel attention weights (not implemented: only false)", boolean),
        "sites": Hparam("last_conv", "last_conv (of each stage, pre-BN) | stage_output", one_of(*_SITES)),
    }

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self._src_net: nn.Module | None = None
        self._shared: list[nn.Parameter] = []
        self._head: list[nn.Parameter] = []
        self._ft: dict[str, torch.Tensor] = {}
        self._fs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @classmethod
    def check_hparams(cls, hp: dict[str, Any]) -> None:
        if hp.get("attention"):
            raise UsageError(_ATTENTION_MSG)

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        hp = {k: v.default for k, v in cls.hparams.items()}
        hp.update((ctx.spec.get("reg") or {}).get(cls.name) or {})
        super().check(model, ctx)
        feature_sites(model, hp["sites"], cls.name)

    # build -----------------------------------------------------------------------------------------------------
    def _source_net(self, model: nn.Module) -> nn.Module:
        import timm

        import mpbench.models  # noqa: F401  (registers the CIFAR nets into timm)

        src = self.source
        name = src.model or (self.ctx.spec.get("model") or self.ctx.model_name)
        head = classifier_name(model, self.name)
        nc = src.num_classes or int(src.state[f"{head}.weight"].shape[0])
        kwargs = dict(src.model_kwargs or self.ctx.spec.get("model_kwargs") or {})
        net = timm.create_model(name, pretrained=False, num_classes=nc, in_chans=self.ctx.in_chans, **kwargs)
        try:
            net.load_state_dict(src.state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0][:160]
            raise IncompatibleError(f"delta: {src.model_file} does not load into a {name} ({first}): the "
                                    f"architectures differ") from None
        net.eval().requires_grad_(False)
        return net

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        shared, head = shared_and_head_params(model, self.report, self.name)
        self._shared = [p for _, p in shared]
        self._head = [p for _, p in head]
        self._src_net = self._source_net(model)
        self.source = None
        self.chosen_sites = feature_sites(model, self.hp["sites"], self.name)
        for n in self.chosen_sites:
            self._handles.append(model.get_submodule(n).register_forward_hook(self._hook(self._ft, n, True)))
            self._handles.append(self._src_net.get_submodule(n).register_forward_hook(self._hook(self._fs, n, False)))

    @staticmethod
    def _hook(store: dict[str, torch.Tensor], name: str, train_only: bool):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if train_only and not (module.training and torch.is_grad_enabled()):
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            store[name] = out.clone()   # a later in-place op (ReLU, +=) must not change the stored map
        return hook

    def param_groups(self, model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return without_weight_decay(groups, self._shared + self._head)

    # training --------------------------------------------------------------------------------------------------
    def penalty(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                logits: torch.Tensor) -> torch.Tensor | None:
        net = self._src_net
        p0 = next(net.parameters())
        if p0.device != x.device:
            net.to(x.device)
        net.eval()
        self._fs.clear()
        with torch.no_grad():
            (net.forward_features if hasattr(net, "forward_features") else net)(x)
        missing = [n for n in self.chosen_sites if n not in self._ft or n not in self._fs]
        if missing:
            raise RuntimeError(f"delta: no feature map captured at {missing[0]} in this step's forward")
        fea = torch.zeros((), device=x.device)
        for n in self.chosen_sites:
            ft, fs = self._ft[n].float(), self._fs[n].float()
            hw = ft[0, 0].numel() if ft.dim() > 2 else 1
            fea = fea + (ft - fs).pow(2).flatten(1).sum(1).div(hw).mean()
        hd = torch.zeros((), device=x.device)
        for p in self._head:
            hd = hd + p.float().pow(2).sum()
        return self.hp["alpha"] * fea + 0.5 * self.hp["beta"] * hd

    def end_forward(self) -> None:
        self._ft.clear()
        self._fs.clear()
