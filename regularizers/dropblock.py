"""DropBlock with the paper's linear drop-probability ramp, on the residual branch and shortcut of the last two
stages."""
from __future__ import annotations

from typing import Any

from timm.layers import DropBlock2d
from timm.layers.drop import drop_block_2d
from torch import nn

from mpbench.errors import IncompatibleError
from mpbench.hparams import at_least, between, boolean
from mpbench.regularization import Hparam, Regularizer, RunContext, register_regularizer


def _plan_sites(model: nn.Module) -> tuple[list, bool]:
    """(sites, fallback): "branch" + "shortcut" sites of the last two stages, else their "block" sites."""
    from mpbench.sites import list_sites

    for kinds, fallback in ((("branch", "shortcut"), False), (("block",), True)):
        sites = [s for k in kinds for s in list_sites(model, k)]
        if sites:
            last2 = sorted({s.stage for s in sites})[-2:]
            return [s for s in sites if s.stage in last2], fallback
    return [], True


def paper_gamma_scale(h: int, w: int, kh: int, kw: int) -> float:
    """Factor on timm's seed rate so that seeds drawn everywhere (timm) cover, in expectation and before overlaps,
    the same number of units as the paper's seeds drawn only at valid centres: drop_prob * H * W.

    timm's gamma assumes every seed covers kh * kw units, but seeds near a border are clipped; over the map a seed
    covers sum_1d(H, kh) * sum_1d(W, kw) / (H W) units on average, with sum_1d(H, k) = k H - floor(k^2 / 4).
    Without this factor, timm's realised drop rate is ~1.4x drop_prob on 8x8 maps with bs 3 (~1.1x at 16x16).
    """
    def s1(n: int, k: int) -> int:
        return k * n - (k * k) // 4

    return kh * kw * (h - kh + 1) * (w - kw + 1) / (s1(h, kh) * s1(w, kw))


class ClampedDropBlock2d(DropBlock2d):
    """timm's DropBlock2d (timm 1.0.31; ``couple_channels`` passed explicitly) with the block size clamped to the
    smaller side of the feature map (bs <= H and bs <= W; timm clamps each side separately) and, if
    ``paper_gamma``, the seed rate corrected by :func:`paper_gamma_scale` (times ``gamma_scale``)."""

    def __init__(self, *args, paper_gamma: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.paper_gamma = paper_gamma

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        h, w = x.shape[-2], x.shape[-1]
        k = min(self.block_size, h, w)
        scale = self.gamma_scale * (paper_gamma_scale(h, w, k, k) if self.paper_gamma else 1.0)
        return drop_block_2d(x, drop_prob=self.drop_prob, block_size=k, gamma_scale=scale,
                             with_noise=self.with_noise, inplace=self.inplace, couple_channels=self.couple_channels,
                             scale_by_keep=self.scale_by_keep)


@register_regularizer("dropblock")
class DropBlock(Regularizer):
    """DropBlock (Ghiasi, Lin, Le, NeurIPS 2018): drop contiguous block_size x block_size regions of feature maps.

    Implementation: ``timm.layers.DropBlock2d`` (timm pinned to 1.0.31) with ``couple_channels=False`` passed
    explicitly (an independent mask per channel: the paper's Algorithm 1 and its preferred variant; timm >= 1.0.23
    defaults to shared masks), ``scale_by_keep=True`` (rescale by numel/count_ones over the whole tensor),
    ``gamma_scale=1``. The block size is clamped to the feature map. timm draws seeds everywhere (blocks clip at
    borders) but uses the paper's valid-centre gamma, which over-drops on small maps (realised rate ~1.4x drop_prob
    at 8x8, bs 3); with ``paper_gamma`` (default) the seed rate is corrected so that the expected dropped area
    equals the paper's, and the realised rate is, as in the paper, a little below ``drop_prob`` (block overlaps).

    Schedule: the paper's linear ramp of the drop probability from 0 at step 0 to ``drop_prob`` at the last step
    of the whole run (``keep_prob = 1 - step/total_steps * (1 - target_keep_prob)`` in the reference TPU code),
    set in ``begin_step``; the step is saved in ``state_dict``.

    Placement: as in the reference ResNet code, on the residual branch (after its last BN) and on the shortcut
    ("branch" and "shortcut" sites) of the last two stages. Models without branch/shortcut sites (plain conv nets)
    fall back to the "block" sites (after conv+BN, before ReLU) of their last two stages; ``chosen_sites`` then
    marks every site "(block fallback)". Defaults drop_prob 0.1 and block_size 3 are mpbench's CIFAR-scale proposal
    (the paper has no CIFAR setting; ImageNet used 0.1 / 7). Evaluation: deterministic (identity in eval mode).
    """

    citation = ("Ghiasi, Lin, Le. DropBlock: A regularization method for convolutional networks. NeurIPS 2018 "
                "(arXiv 1810.12890).")
    display = "DropBlock"
    graph_safe = False      # drop_prob: a Python float ramped in begin_step (a graph would freeze it)
    hparams = {
        "drop_prob": Hparam(0.1, "final drop probability of the ramp", between(0, 1, hi_open=True)),
        "block_size": Hparam(3, "side of the dropped square (clamped to the map)", at_least(1, integer=True)),
        "paper_gamma": Hparam(True, "correct timm's seed rate to the paper's expected dropped area", boolean),
    }

    def __init__(self, ctx: RunContext, **hp: Any):
        super().__init__(ctx, **hp)
        self.blocks: list[ClampedDropBlock2d] = []
        self.step = 0

    @classmethod
    def check(cls, model: nn.Module, ctx: RunContext) -> None:
        if not _plan_sites(model)[0]:
            raise IncompatibleError(f"dropblock: {ctx.model_name} has no conv feature-map sites to drop blocks from")

    def attach(self, model: nn.Module) -> None:
        from mpbench.sites import insert

        sites, fallback = _plan_sites(model)
        for s in sites:
            m = ClampedDropBlock2d(drop_prob=self.current_drop_prob(), block_size=int(self.hp["block_size"]),
                                   gamma_scale=1.0, with_noise=False, inplace=False, couple_channels=False,
                                   scale_by_keep=True, paper_gamma=bool(self.hp["paper_gamma"]))
            insert(model, s.name, m, key="dropblock")
            self.blocks.append(m)
            self.chosen_sites.append(f"{s.name} (block fallback)" if fallback else s.name)

    def current_drop_prob(self) -> float:
        total = max(int(self.ctx.total_steps), 1)
        return float(self.hp["drop_prob"]) * min(max(self.step, 0) / total, 1.0)

    def begin_step(self, step: int) -> None:
        self.step = int(step)
        p = self.current_drop_prob()
        for m in self.blocks:
            m.drop_prob = p

    def scalars(self) -> dict[str, float]:
        return {"drop_prob": self.current_drop_prob()}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "drop_prob": self.current_drop_prob()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "step" in state:
            self.begin_step(int(state["step"]))
