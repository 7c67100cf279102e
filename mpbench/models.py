"""CIFAR-style networks registered into timm's registry (``timm.create_model("resnet20", num_classes=10)``).

- ``resnet20/32/44/56``: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2: a 3x3
  stem of 16 channels, 3 stages of (depth-2)/6 basic blocks with 16/32/64 channels, option-A shortcuts
  (stride-2 subsampling + zero channel padding, no parameters), as in MetaPerturb's release.
- ``wrn_28_2``: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation blocks, widths
  32/64/128, 1x1 projection shortcuts on the pre-activated input where the shape changes.
- ``vgg9``: the 8 convs of VGG configuration A (Simonyan & Zisserman, ICLR 2015: 64, M, 128, M, 256, 256, M,
  512, 512, M, 512, 512, M) with BN, then global average pooling and one FC layer: 8 conv + 1 FC = 9.
- ``conv4``, ``conv6``: k blocks of conv3x3+BN+ReLU+maxpool(2) of ``width`` channels (Vinyals et al. 2016; Snell
  et al. 2017 for Conv-4), then global average pooling and FC.

Every max-pool is skipped once the map is 1 px, and the head pools globally, so any input of >= 8 px works.
Each net holds explicit :class:`mpbench.sites.Site` modules (identity until something is inserted); the stem
has none. ReLUs are not in-place, so inserted modules may save their outputs for backward.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import is_model, model_entrypoint, register_model
from torch import nn

from mpbench.errors import UsageError, did_you_mean
from mpbench.sites import Site

_BLOCK_WHERE = "after the residual add, before the block's final ReLU"
_CONV_WHERE = "after conv+BN, before ReLU and pooling"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class MaybePool(nn.MaxPool2d):
    """2x2 max-pool that leaves a map of height or width 1 unchanged."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if min(x.shape[-2:]) < 2 else super().forward(x)


class ShortcutA(nn.Module):
    """Identity, or option A of He et al. 2016: subsample by ``stride``, zero-pad the new channels."""

    def __init__(self, cin: int, cout: int, stride: int, stage: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin
        self.site = Site("shortcut", stage, cout, "on the shortcut path, before the add")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.site(x)


class BasicBlock(nn.Module):
    """Post-activation basic block: relu(site(branch_site(bn2(conv2(relu(bn1(conv1 x))))) + shortcut(x)))."""

    def __init__(self, cin: int, cout: int, stride: int, stage: int):
        super().__init__()
        self.conv1, self.bn1, self.act1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.branch_site = Site("branch", stage, cout, "after the branch's last BN, before the add")
        self.shortcut = ShortcutA(cin, cout, stride, stage)
        self.site = Site("block", stage, cout, _BLOCK_WHERE)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch_site(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))
        return self.act2(self.site(out + self.shortcut(x)))


class PreActBlock(nn.Module):
    """WRN block: conv2(drop(relu(bn2(conv1(relu(bn1 x)))))) + shortcut; the 1x1 projection, when needed, reads
    relu(bn1 x) as in the authors' code."""

    def __init__(self, cin: int, cout: int, stride: int, stage: int, drop: float = 0.0):
        super().__init__()
        self.bn1, self.act1, self.conv1 = nn.BatchNorm2d(cin), nn.ReLU(), _conv3x3(cin, cout, stride)
        self.bn2, self.act2, self.drop = nn.BatchNorm2d(cout), nn.ReLU(), nn.Dropout(drop)
        self.conv2 = _conv3x3(cout, cout)
        self.branch_site = Site("branch", stage, cout, "end of the residual branch (after conv2), before the add")
        self.project = cin != cout or stride != 1
        self.shortcut = nn.Sequential()
        if self.project:
            self.shortcut.add_module("conv", nn.Conv2d(cin, cout, 1, stride, bias=False))
        self.shortcut.add_module("site", Site("shortcut", stage, cout, "on the shortcut path, before the add"))
        self.site = Site("block", stage, cout, "block output, after the residual add (pre-activation block)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.branch_site(self.conv2(self.drop(self.act2(self.bn2(self.conv1(pre))))))
        return self.site(out + self.shortcut(pre if self.project else x))


class ConvBlock(nn.Module):
    """conv3x3 -> BN -> site -> ReLU (-> 2x2 max-pool)."""

    def __init__(self, cin: int, cout: int, stage: int, pool: bool):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.site = Site("block", stage, cout, _CONV_WHERE)
        self.act = nn.ReLU()
        self.pool = MaybePool() if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.site(self.bn(self.conv(x)))))


class _Net(nn.Module):
    """timm classifier API shared by the nets: ``forward_features`` -> global average pool -> dropout -> ``fc``."""

    stage_names: list[str]

    def _finish(self, num_features: int, num_classes: int, drop_rate: float, reductions: list[int],
                first_conv: str, in_chans: int) -> None:
        self.num_classes, self.num_features, self.drop_rate = num_classes, num_features, drop_rate
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        chs = [self.get_submodule(s)[-1].site.channels for s in self.stage_names]
        self.feature_info = [dict(num_chs=c, reduction=r, module=s)
                             for c, r, s in zip(chs, reductions, self.stage_names)]
        self.pretrained_cfg = dict(input_size=(in_chans, 32, 32), mean=(0.5,) * in_chans, std=(0.5,) * in_chans,
                                   num_classes=num_classes, first_conv=first_conv, classifier="fc")
        self.default_cfg = self.pretrained_cfg
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        x = F.dropout(x, self.drop_rate, self.training) if self.drop_rate else x
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise UsageError(f"{type(self).__name__} supports only global_pool='avg', not {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class CifarResNet(_Net):
    """He et al. 2016 CIFAR ResNet (6n+2 layers, option-A shortcuts)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise UsageError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), not {depth}")
        n, widths = (depth - 2) // 6, (16, 32, 64)
        self.conv1, self.bn1, self.act1 = _conv3x3(in_chans, 16), nn.BatchNorm2d(16), nn.ReLU()
        self.stage_names = ["layer1", "layer2", "layer3"]
        cin = 16
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i and j == 0) else 1, i) for j in range(n)]
            self.add_module(self.stage_names[i], nn.Sequential(*blocks))
            cin = w
        self._finish(64, num_classes, drop_rate, [1, 2, 4], "conv1", in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


class WideResNet(_Net):
    """Zagoruyko & Komodakis 2016 WRN-depth-k (pre-activation); ``block_drop`` is their dropout between convs."""

    def __init__(self, depth: int = 28, widen: int = 2, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0, block_drop: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise UsageError(f"WRN depth must be 6n+4 (16, 22, 28, 40), not {depth}")
        n, widths = (depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv3x3(in_chans, 16)
        self.stage_names = ["layer1", "layer2", "layer3"]
        cin = 16
        for i, w in enumerate(widths):
            blocks = [PreActBlock(cin if j == 0 else w, w, 2 if (i and j == 0) else 1, i, block_drop)
                      for j in range(n)]
            self.add_module(self.stage_names[i], nn.Sequential(*blocks))
            cin = w
        self.bn, self.act = nn.BatchNorm2d(cin), nn.ReLU()
        self._finish(cin, num_classes, drop_rate, [1, 2, 4], "conv1", in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.act(self.bn(x))


class PlainConvNet(_Net):
    """Stages ``layer1..`` of :class:`ConvBlock`; ``stages`` lists each stage's widths; a stage ends in a pool."""

    def __init__(self, stages: list[list[int]], num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0):
        super().__init__()
        self.stage_names = [f"layer{i + 1}" for i in range(len(stages))]
        cin = in_chans
        for i, widths in enumerate(stages):
            blocks = []
            for j, w in enumerate(widths):
                blocks.append(ConvBlock(cin, w, i, pool=j == len(widths) - 1))
                cin = w
            self.add_module(self.stage_names[i], nn.Sequential(*blocks))
        self._finish(cin, num_classes, drop_rate, [2 ** (i + 1) for i in range(len(stages))], "layer1.0.conv",
                     in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = self.get_submodule(name)(x)
        return x


# ---- timm registration ---------------------------------------------------------------------------------------

_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create(name: str, build: Callable[..., _Net], fixed: dict[str, Any], pretrained: bool,
            kwargs: dict[str, Any]) -> _Net:
    if pretrained:
        raise UsageError(f"{name} has no pretrained weights: use pretrained=False (fine-tuning loads a "
                         "'pretrain' artifact instead)")
    for k in _TIMM_ARGS:
        kwargs.pop(k, None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    allowed = [p for p in inspect.signature(build).parameters if p not in fixed and p != "self"]
    for k in kwargs:
        if k not in allowed:
            raise UsageError(f"unknown model_kwargs.{k} for {name}: {did_you_mean(k, allowed)}")
    model = build(**fixed, **kwargs)
    model.pretrained_cfg["architecture"] = name
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def _register(name: str, build: Callable[..., _Net], fixed: dict[str, Any], doc: str) -> None:
    """Register ``name`` in timm, refusing to replace a model timm already has."""
    if is_model(name) and model_entrypoint(name).__module__ != __name__:
        raise RuntimeError(f"timm already has a model named {name!r}; mpbench will not overwrite it")

    def entry(pretrained: bool = False, **kwargs: Any) -> _Net:
        return _create(name, build, fixed, pretrained, kwargs)

    entry.__name__, entry.__qualname__, entry.__doc__, entry.__module__ = name, name, doc, __name__
    register_model(entry)


def _convk(k: int) -> Callable[..., _Net]:
    def build(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, width: int = 64) -> _Net:
        return PlainConvNet([[width]] * k, num_classes, in_chans, drop_rate)
    return build


_SPECS: dict[str, tuple[Callable[..., _Net], dict[str, Any], str]] = {
    "resnet20": (CifarResNet, {"depth": 20}, "ResNet-20 (He et al. 2016), 0.27M parameters at 10 classes."),
    "resnet32": (CifarResNet, {"depth": 32}, "ResNet-32 (He et al. 2016), 0.46M parameters at 10 classes."),
    "resnet44": (CifarResNet, {"depth": 44}, "ResNet-44 (He et al. 2016), 0.66M parameters at 10 classes."),
    "resnet56": (CifarResNet, {"depth": 56}, "ResNet-56 (He et al. 2016), 0.85M parameters at 10 classes."),
    "wrn_28_2": (WideResNet, {"depth": 28, "widen": 2}, "WRN-28-2 (Zagoruyko & Komodakis 2016), 1.47M parameters."),
    "vgg9": (PlainConvNet, {"stages": [[64], [128], [256, 256], [512, 512], [512, 512]]},
             "VGG-9: VGG configuration A's 8 convs (+BN) and one FC layer, 9.2M parameters."),
    "conv4": (_convk(4), {}, "Conv-4: 4 x (conv3x3-BN-ReLU-maxpool) of ``width`` (64) channels."),
    "conv6": (_convk(6), {}, "Conv-6: 6 x (conv3x3-BN-ReLU-maxpool) of ``width`` (64) channels."),
}
for _name, (_build, _fixed, _doc) in _SPECS.items():
    _register(_name, _build, _fixed, _doc)

MODELS: list[str] = list(_SPECS)
MODEL_DESCRIPTIONS: dict[str, str] = {name: doc for name, (_, _, doc) in _SPECS.items()}
MODEL_DISPLAY: dict[str, str] = {"resnet20": "ResNet-20", "resnet32": "ResNet-32", "resnet44": "ResNet-44",
                                 "resnet56": "ResNet-56", "wrn_28_2": "WRN-28-2", "vgg9": "VGG-9", "conv4": "Conv-4",
                                 "conv6": "Conv-6"}
