"""Semantics of the noise / mixing regularizers: base, dropout, spatial_dropout, dropblock, manifold_mixup, mixup,
cutmix, label_smoothing, drop_path, info_dropout."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import mpbench.models  # noqa: F401  (registers the CIFAR nets into timm)
from mpbench.errors import IncompatibleError
from mpbench.regularization import REGULARIZERS, RegularizerStack, RunContext, build_stack
from mpbench.sites import list_sites

torch.set_num_threads(1)

NAMES = ["base", "dropout", "spatial_dropout", "dropblock", "manifold_mixup", "mixup", "cutmix", "label_smoothing",
         "drop_path", "info_dropout"]
K = 10


def make_ctx(model_name: str = "resnet20", steps: int = 100, num_train: int = 1000, **reg) -> RunContext:
    return RunContext(spec={"reg": reg}, model_name=model_name, num_classes=K, in_chans=3, image_size=32,
                      total_steps=steps, num_train=num_train)


def make(name: str, model_name: str = "resnet20", steps: int = 100, num_train: int = 1000, **hp):
    torch.manual_seed(0)
    ctx = make_ctx(model_name, steps, num_train, **{name: hp})
    model = timm.create_model(model_name, num_classes=K)
    stack = build_stack([name], {name: hp}, ctx)
    reg = stack.members[0]
    reg.check(model, ctx)
    reg.attach(model)
    return reg, model


def site_kind(model, name):
    return model.get_submodule(name.split(" ")[0]).kind


# ---- registry -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_registered_with_citation_and_valid_defaults(name):
    cls = REGULARIZERS.get(name)
    assert cls.name == name and cls.citation and cls.__doc__
    for key, hp in cls.hparams.items():
        assert hp.help, f"{name}.{key} has no help line"
        assert hp.check is None or hp.check(hp.default) is None, f"{name}.{key}: default fails its own check"
    assert cls.mixes_batch == (name in ("manifold_mixup", "mixup", "cutmix"))


def test_two_batch_mixers_are_rejected():
    for pair in (["mixup", "cutmix"], ["manifold_mixup", "mixup"], ["cutmix", "manifold_mixup"]):
        with pytest.raises(IncompatibleError, match="mix the batch"):
            RegularizerStack.check_composition(pair)
    RegularizerStack.check_composition(["mixup", "label_smoothing", "dropblock", "info_dropout", "drop_path"])


def test_base_changes_nothing():
    reg, model = make("base")
    ref = timm.create_model("resnet20", num_classes=K)
    assert reg.chosen_sites == [] and model.state_dict().keys() == ref.state_dict().keys()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    assert reg.transform_batch(x, y)[0] is x


# ---- dropout / spatial dropout --------------------------------------------------------------------------------

def test_head_dropout_statistics_and_eval_identity():
    reg, model = make("dropout", p=0.3, where="head")
    assert reg.chosen_sites == ["head"]
    seen = []
    model.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    feats = torch.ones(500, model.num_features, 4, 4)
    model.train()
    model.forward_head(feats)
    h = seen[-1]
    zero = (h == 0).float().mean().item()
    assert abs(zero - 0.3) < 0.02
    assert torch.allclose(h[h != 0], torch.full_like(h[h != 0], 1 / 0.7))
    model.eval()
    model.forward_head(feats)
    assert torch.equal(seen[-1], torch.ones_like(seen[-1]))
    assert set(model.state_dict()) == set(timm.create_model("resnet20", num_classes=K).state_dict())


def test_block_dropout_is_elementwise_at_every_block_site():
    reg, model = make("dropout", p=0.2, where="both")
    blocks = [s.name for s in list_sites(model, "block")]
    assert reg.chosen_sites == ["head"] + blocks
    site = model.get_submodule(blocks[-1]).train()
    out = site(torch.ones(64, 64, 8, 8))
    assert abs((out == 0).float().mean().item() - 0.2) < 0.01
    per_map = (out == 0).float().mean((2, 3))
    assert ((per_map > 0) & (per_map < 1)).float().mean() > 0.9     # masks are not per channel


def test_spatial_dropout_drops_whole_channels():
    reg, model = make("spatial_dropout", p=0.25)
    assert reg.chosen_sites == [s.name for s in list_sites(model, "block")]
    site = model.get_submodule(reg.chosen_sites[0]).train()
    out = site(torch.ones(256, 16, 8, 8))
    per_map = out.flatten(2)
    zero_maps = (per_map == 0).all(-1)
    assert ((per_map == 0).any(-1) == zero_maps).all()                      # a map is all dropped or all kept
    assert torch.allclose(per_map[~zero_maps], torch.full_like(per_map[~zero_maps], 1 / 0.75))
    assert abs(zero_maps.float().mean().item() - 0.25) < 0.02
    site.eval()
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(site(x), x)


# ---- dropblock ------------------------------------------------------------------------------------------------

def test_dropblock_sites_are_branch_and_shortcut_of_last_two_stages():
    reg, model = make("dropblock")
    kinds = {site_kind(model, n) for n in reg.chosen_sites}
    stages = {model.get_submodule(n).stage for n in reg.chosen_sites}
    assert kinds == {"branch", "shortcut"} and stages == {1, 2} and len(reg.chosen_sites) == 12
    assert all(m.couple_channels is False for m in reg.blocks)


def test_dropblock_falls_back_to_block_sites_on_plain_nets():
    reg, model = make("dropblock", model_name="conv4")
    assert reg.chosen_sites and all(n.endswith("(block fallback)") for n in reg.chosen_sites)
    assert {site_kind(model, n) for n in reg.chosen_sites} == {"block"}
    assert {model.get_submodule(n.split(" ")[0]).stage for n in reg.chosen_sites} == {2, 3}


@pytest.mark.parametrize("hw", [8, 16])
def test_dropblock_linear_ramp_and_realised_rate(hw):
    torch.manual_seed(1)
    reg, model = make("dropblock", steps=100, drop_prob=0.2, block_size=3)
    m = reg.blocks[-1].train()
    x = torch.ones(64, 32, hw, hw)
    for step, want in [(0, 0.0), (25, 0.05), (50, 0.1), (100, 0.2)]:
        reg.begin_step(step)
        assert all(b.drop_prob == pytest.approx(want) for b in reg.blocks)
        out = m(x)
        rate = (out == 0).float().mean().item()
        assert rate <= want + 0.01 and rate >= 0.8 * want - 0.005, (step, rate, want)   # overlaps: a bit below
        if want:
            keep = out != 0
            assert torch.allclose(out[keep], torch.full_like(out[keep], x.numel() / keep.sum().item()))
            per_map = (out == 0).float().mean((2, 3))
            assert per_map.std(1).mean() > 0                                               # per-channel masks
    m.eval()
    y = torch.randn(2, 32, hw, hw)
    assert m(y) is y


def test_dropblock_is_identity_at_eval_and_resumes_its_schedule():
    torch.manual_seed(0)
    ref = timm.create_model("resnet20", num_classes=K)
    model = copy.deepcopy(ref)
    ctx = make_ctx(steps=10)
    reg = REGULARIZERS.get("dropblock")(ctx, drop_prob=0.5)
    reg.attach(model)
    reg.begin_step(9)
    x = torch.randn(4, 3, 32, 32)
    ref.eval(), model.eval()
    assert torch.equal(model(x), ref(x))
    model.train()
    assert not torch.equal(model(x), ref.train()(x))
    again = REGULARIZERS.get("dropblock")(ctx, drop_prob=0.5)
    again.attach(copy.deepcopy(ref))
    again.load_state_dict(reg.state_dict())
    assert [b.drop_prob for b in again.blocks] == [pytest.approx(0.45)] * 12


# ---- manifold mixup --------------------------------------------------------------------------------------------

def test_manifold_mixup_at_k0_is_input_mixup():
    reg, model = make("manifold_mixup", layers=[0])
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, K, (8,))
    torch.manual_seed(3)
    xm, t = reg.transform_batch(x, y)
    lam, perm = reg.last["lam"], reg.last["perm"]
    assert reg.last["k"] == 0 and 0 < lam < 1
    assert torch.equal(xm, lam * x + (1 - lam) * x[perm])
    onehot = F.one_hot(y, K).float()
    assert torch.allclose(t, lam * onehot + (1 - lam) * onehot[perm])
    assert torch.allclose(t.sum(1), torch.ones(8))
    ref = copy.deepcopy(model)
    assert torch.equal(model(xm), ref(lam * x + (1 - lam) * x[perm]))


@pytest.mark.parametrize("k", [1, 2])
def test_manifold_mixup_mixes_the_stage_output_once_and_never_at_eval(k):
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=K)
    stage = model.get_submodule(model.stage_names[k - 1])
    raw, mixed = [], []
    stage.register_forward_hook(lambda m, a, o: raw.append(o.detach()))
    reg = REGULARIZERS.get("manifold_mixup")(make_ctx(), layers=[k])
    reg.check(model, make_ctx())
    reg.attach(model)
    assert reg.chosen_sites == [model.stage_names[k - 1]]
    stage.register_forward_hook(lambda m, a, o: mixed.append(o.detach()))
    model.train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, K, (6,))
    soft = torch.softmax(torch.randn(6, K), 1)
    xm, t = reg.transform_batch(x, soft)
    lam, perm = reg.last["lam"], reg.last["perm"]
    assert xm is x and torch.allclose(t, lam * soft + (1 - lam) * soft[perm])
    assert torch.allclose(t.sum(1), torch.ones(6))
    model(xm)
    assert torch.allclose(mixed[-1], lam * raw[-1] + (1 - lam) * raw[-1][perm])
    model(x)                                           # armed for one forward only
    assert torch.equal(mixed[-1], raw[-1])
    reg.transform_batch(x, y)
    model.eval()
    model(x)                                           # armed, but eval: no mixing
    assert torch.equal(mixed[-1], raw[-1])
    reg.end_forward()
    assert reg._armed is None


def test_manifold_mixup_draws_k_uniformly():
    reg, _ = make("manifold_mixup")
    assert reg.chosen_sites == ["input", "layer1", "layer2"]
    torch.manual_seed(0)
    ks = []
    for _ in range(300):
        reg.transform_batch(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]))
        ks.append(reg.last["k"])
        reg.end_forward()
    counts = np.bincount(ks, minlength=3)
    assert counts.min() > 70


# ---- mixup / cutmix ---------------------------------------------------------------------------------------------

def test_mixup_soft_targets_and_callers_tensor_untouched():
    reg, _ = make("mixup")
    np.random.seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % K
    x0 = x.clone()
    xm, t = reg.transform_batch(x, y)
    assert torch.equal(x, x0)
    lam = reg.last_lam
    assert 0 < lam < 1 and reg.mixer.label_smoothing == 0 and reg.mixer.num_classes == K
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    onehot = F.one_hot(y, K).float()
    assert torch.allclose(t, lam * onehot + (1 - lam) * onehot.flip(0), atol=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(8))


def test_mixup_odd_batch_leaves_last_sample_unmixed():
    reg, _ = make("mixup")
    np.random.seed(1)
    x, y = torch.randn(7, 3, 8, 8), torch.arange(7)
    xm, t = reg.transform_batch(x, y)
    lam = reg.last_lam
    assert torch.equal(xm[6], x[6]) and torch.equal(t[6], F.one_hot(y[6], K).float())
    assert torch.allclose(xm[:6], lam * x[:6] + (1 - lam) * x[:6].flip(0), atol=1e-6)
    assert torch.allclose(t.sum(1), torch.ones(7))
    xm, t = reg.transform_batch(x[:1], y[:1])
    assert torch.equal(xm, x[:1]) and torch.equal(t, F.one_hot(y[:1], K).float())


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_lambda_matches_pasted_area(seed):
    reg, _ = make("cutmix", prob=1.0)
    np.random.seed(seed)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    smooth = torch.full((8, K), 0.01).scatter_(1, y[:, None], 1 - 0.09)   # soft targets in work too
    for target in (y, smooth):
        xm, t = reg.transform_batch(x, target)
        lam = reg.last_lam
        changed = (xm != x).any(1)                       # (B, H, W): pixels taken from the partner
        assert torch.equal(xm[changed.unsqueeze(1).expand_as(x)], x.flip(0)[changed.unsqueeze(1).expand_as(x)])
        area = changed.float().mean((1, 2))
        assert torch.allclose(area, torch.full_like(area, 1 - lam), atol=1e-6)
        rows, cols = changed[0].any(1).nonzero(), changed[0].any(0).nonzero()
        if len(rows):                                    # the changed pixels form one box
            assert changed[0].sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        soft = F.one_hot(y, K).float() if target.ndim == 1 else smooth
        assert torch.allclose(t, lam * soft + (1 - lam) * soft.flip(0), atol=1e-6)
        assert torch.allclose(t.sum(1), torch.ones(8), atol=1e-6)


# ---- label smoothing --------------------------------------------------------------------------------------------

def test_label_smoothing_targets():
    reg, _ = make("label_smoothing", eps=0.1)
    y = torch.tensor([0, 3, 9])
    _, t = reg.transform_batch(torch.zeros(3, 3, 8, 8), y)
    assert torch.allclose(t[torch.arange(3), y], torch.full((3,), 0.9 + 0.01))
    assert torch.allclose(t.sum(1), torch.ones(3)) and torch.allclose(t.min(1).values, torch.full((3,), 0.01))
    logits = torch.randn(3, K)
    ce = torch.sum(-t * F.log_softmax(logits, -1), -1).mean()
    assert torch.allclose(ce, F.cross_entropy(logits, y, label_smoothing=0.1))
    soft = torch.softmax(torch.randn(3, K), 1)
    _, t2 = reg.transform_batch(torch.zeros(3, 3, 8, 8), soft)
    assert torch.allclose(t2, 0.9 * soft + 0.01) and torch.allclose(t2.sum(1), torch.ones(3))


# ---- drop path --------------------------------------------------------------------------------------------------

def test_drop_path_rejects_plain_nets_at_check():
    for name in ("conv4", "vgg9"):
        model = timm.create_model(name, num_classes=K)
        with pytest.raises(IncompatibleError, match="residual"):
            REGULARIZERS.get("drop_path").check(model, make_ctx(name))


def test_drop_path_linear_rates_per_sample_drop():
    reg, model = make("drop_path", rate=0.5)
    assert reg.chosen_sites == [s.name for s in list_sites(model, "branch")]
    L = len(reg.rates)
    assert reg.rates == pytest.approx([0.5 * (i + 1) / L for i in range(L)])
    site = model.get_submodule(reg.chosen_sites[-1]).train()
    out = site(torch.ones(2000, 4, 2, 2)).flatten(1)
    dropped = (out == 0).all(1)
    assert ((out == 0).any(1) == dropped).all()                          # whole samples
    assert abs(dropped.float().mean().item() - 0.5) < 0.04
    assert torch.allclose(out[~dropped], torch.full_like(out[~dropped], 2.0))
    site.eval()
    assert torch.equal(site(torch.ones(3, 4, 2, 2)), torch.ones(3, 4, 2, 2))


# ---- information dropout ----------------------------------------------------------------------------------------

def _info_module(reg):
    return reg.noisy[0]


def test_info_dropout_kl_zero_at_max_alpha_and_closed_form():
    reg, model = make("info_dropout")
    m = _info_module(reg).train()
    C = m.alpha_head.in_channels
    x = torch.randn(4, C, 8, 8)
    with torch.no_grad():
        m.alpha_head.weight.zero_()
        m.alpha_head.bias.fill_(50.0)                     # sigmoid = 1: alpha = max_alpha + 0.001
    m(x)
    assert m.kl.abs().item() < 1e-4
    with torch.no_grad():
        m.alpha_head.bias.zero_()                         # sigmoid = 0.5
    m(x)
    want = C * 8 * 8 * -math.log((0.001 + 0.35) / 0.701)
    assert m.kl.item() == pytest.approx(want, rel=1e-5)


def test_info_dropout_noise_convention_and_sigma0():
    reg, model = make("info_dropout")
    m = _info_module(reg).train()
    C = m.alpha_head.in_channels
    x = torch.rand(64, C, 8, 8) + 0.5
    with torch.no_grad():
        m.alpha_head.weight.zero_()
        m.alpha_head.bias.zero_()
    alpha = 0.001 + 0.35
    noise = torch.randn_like(x)
    assert torch.allclose(m(x, noise=noise), x * torch.exp(alpha * noise))
    log_eps = torch.log(m(x) / x)
    assert log_eps.mean().abs().item() < 0.01 and log_eps.std().item() == pytest.approx(alpha, rel=0.02)
    m.sigma0 = 0.0
    assert torch.equal(m(x), x)                                       # eps == 1
    m.sigma0 = 1.0
    with reg.deterministic():
        assert torch.equal(m(x), x)
    m.eval()
    assert torch.equal(m(x), x)


def test_info_dropout_penalty_scaling_and_gradients_reach_alpha_head():
    reg, model = make("info_dropout", beta=2.0, num_train=500)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    logits = model(x)
    pen = reg.penalty(model, x, y, logits)
    assert pen.item() == pytest.approx(2.0 * sum(m.kl.item() for m in reg.noisy) / 500, rel=1e-5)
    (F.cross_entropy(logits, y) + pen).backward()
    for m in reg.noisy:
        assert m.alpha_head.weight.grad is not None and m.alpha_head.weight.grad.abs().sum() > 0
    reg.end_forward()
    assert all(m.kl is None for m in reg.noisy)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()                          # through the noise alone, too
    assert reg.noisy[0].alpha_head.weight.grad.abs().sum() > 0
    reg.end_forward()
    model.eval()
    model(x)
    assert reg.penalty(model, x, y, logits) is None                  # no KL and no noise at eval


def test_info_dropout_bn_reestimation_is_deterministic_and_restores_modes():
    reg, model = make("info_dropout", bn_batches=3, where="blocks")
    assert reg.chosen_sites == [s.name for s in list_sites(model, "block")]
    torch.manual_seed(0)
    batches = [torch.randn(16, 3, 32, 32) for _ in range(5)]
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stem_bn = model.bn1 if hasattr(model, "bn1") else bns[0]
    reg.before_eval(model, lambda: iter(batches))
    first = [b.running_mean.clone() for b in bns]
    assert model.training and all(b.training and b.momentum == 0.1 for b in bns)
    assert all(b.num_batches_tracked.item() == 3 for b in bns)
    reg.before_eval(model, lambda: iter(batches))
    assert all(torch.equal(a, b.running_mean) for a, b in zip(first, bns))   # noise was off
    # cumulative average over the 3 batches (stem BN sees the un-noised input)
    stem_in = []
    h = stem_bn.register_forward_pre_hook(lambda m, a: stem_in.append(a[0].detach()))
    model.eval()
    for b in batches[:3]:
        model(b)
    h.remove()
    want = torch.stack([s.mean((0, 2, 3)) for s in stem_in]).mean(0)
    assert torch.allclose(stem_bn.running_mean, want, atol=1e-5)
    model.eval()
    reg.before_eval(model, lambda: iter([]))                                 # no batch: stats kept
    assert not model.training and torch.equal(stem_bn.running_mean, first[bns.index(stem_bn)])


def test_info_dropout_one_by_one_head_and_stage_placement():
    reg, model = make("info_dropout", head="conv1x1", where="stages")
    sites = list_sites(model, "block")
    last = {s.stage: s.name for s in sites}
    assert reg.chosen_sites == list(last.values())
    assert all(m.alpha_head.kernel_size == (1, 1) for m in reg.noisy)


def test_info_dropout_default_places_noise_at_the_last_block_of_each_stage():
    reg, model = make("info_dropout")
    assert reg.chosen_sites == ["layer1.2.site", "layer2.2.site", "layer3.2.site"]
