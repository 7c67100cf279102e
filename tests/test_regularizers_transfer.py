"""Fine-tuning family: finetune, finetune_bnreset, l2sp, delta, bss (regularizers/_transfer.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import mpbench.models  # noqa: F401  (registers resnet20 & co. into timm)
from mpbench.errors import IncompatibleError, UsageError
from mpbench.regularization import REGULARIZERS, RegularizerStack, RunContext, build_stack, resolve_hparams
from mpbench.sites import is_batchnorm
from regularizers.bss import bss_value
from regularizers.delta import feature_sites

MODEL = "resnet20"
SRC_CLASSES, TGT_CLASSES = 7, 5


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ---------------------------------------------------------------------------------------------------

def randomise(net: nn.Module, seed: int) -> None:
    """Make every tensor (BN statistics included) clearly different from a fresh initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                if n.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.3 * torch.randn(t.shape, generator=g))
            else:
                t.fill_(17)     # num_batches_tracked


def make_artifact(root: Path, model: str = MODEL, *, net: nn.Module | None = None, name: str = "pretrain-a",
                  num_classes: int = SRC_CLASSES, seed: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    d = root / name
    d.mkdir(parents=True)
    if net is None:
        net = timm.create_model(model, num_classes=num_classes, in_chans=3)
        randomise(net, seed)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, d / "model.pt")
    (d / "artifact.json").write_text(json.dumps({
        "kind": "pretrain", "id": name, "num_classes": num_classes,
        "spec": {"model": model, "model_kwargs": {}, "dataset": "mnist5k"}}))
    return d, state


def make_ctx(artifact: Path | None, model: str = MODEL, reg: dict | None = None) -> RunContext:
    spec = {"model": model, "model_kwargs": {}, "dataset": "digits", "reg": reg or {}}
    return RunContext(spec=spec, model_name=model, num_classes=TGT_CLASSES, in_chans=3, image_size=32,
                      total_steps=10, num_train=100, artifacts={"pretrain": artifact} if artifact else {})


def fresh(model: str = MODEL, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(model, num_classes=TGT_CLASSES, in_chans=3)


def build(names: list[str], ctx: RunContext, model: nn.Module, hp: dict | None = None) -> RegularizerStack:
    stack = build_stack(names, hp or {}, ctx)
    for m in stack.members:
        m.check(model, ctx)
    stack.attach(model)
    return stack


def bn_keys(model: nn.Module) -> set[str]:
    names = {n for n, m in model.named_modules() if is_batchnorm(m)}
    return {k for k in model.state_dict() if k.rsplit(".", 1)[0] in names}


def under(key: str, module: str) -> bool:
    """``key`` names ``module`` or something inside it."""
    return key == module or key.startswith(module + ".")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---- registry / composition ------------------------------------------------------------------------------------

def test_registered_with_requires_and_claims():
    for n in ("finetune", "finetune_bnreset", "l2sp", "delta"):
        cls = REGULARIZERS.get(n)
        assert cls.requires == ("pretrain",) and cls.claims == ("init",), n
    bss = REGULARIZERS.get("bss")
    assert bss.requires == () and bss.claims == ()
    RegularizerStack.check_composition(["finetune", "bss"])
    RegularizerStack.check_composition(["l2sp", "bss"])
    with pytest.raises(IncompatibleError):
        RegularizerStack.check_composition(["finetune", "l2sp"])


# ---- weight loading --------------------------------------------------------------------------------------------

def test_finetune_loads_everything_but_the_classifier(tmp_path):
    art, src = make_artifact(tmp_path)
    model = fresh()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    stack = build(["finetune"], make_ctx(art), model)
    after = model.state_dict()
    head = [k for k in after if under(k, "fc")]
    assert head == ["fc.weight", "fc.bias"]
    for k, v in after.items():
        if k in head:
            assert torch.equal(v, init[k]), k                       # new head: fresh init, never the source's
        else:
            assert torch.equal(v, src[k]), k                        # everything else: the source, BN stats too
    assert not torch.equal(after["fc.weight"][:1], src["fc.weight"][:1])
    t = stack.describe()["finetune"]["transfer"]
    assert t == {"artifact": "pretrain-a", "bn_reset": False, "loaded": len(after) - 2, "skipped_classifier": 2,
                 "skipped_bn": 0, "new": 0}


def test_finetune_bnreset_skips_batchnorm_params_and_buffers(tmp_path):
    art, src = make_artifact(tmp_path)
    model = fresh()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    bns = bn_keys(model)
    assert any(k.endswith("running_mean") for k in bns) and any(k.endswith("num_batches_tracked") for k in bns)
    stack = build(["finetune_bnreset"], make_ctx(art), model)
    after = model.state_dict()
    for k, v in after.items():
        if k in bns or under(k, "fc"):
            assert torch.equal(v, init[k]), k
            assert not torch.equal(v, src[k]) if v.shape == src[k].shape else True
        else:
            assert torch.equal(v, src[k]), k
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1) and m.num_batches_tracked == 0
    t = stack.describe()["finetune_bnreset"]["transfer"]
    assert t["bn_reset"] and t["skipped_bn"] == len(bns) and t["skipped_classifier"] == 2
    assert t["loaded"] == len(after) - len(bns) - 2


class Tiny(nn.Module):
    """BN named without "bn"; a conv whose name contains "bn": BN is found by type, not by name."""

    def __init__(self, num_classes: int = TGT_CLASSES):
        super().__init__()
        self.bnx_conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        return self.fc(self.norm(self.bnx_conv(x)).mean((2, 3)))


def test_bnreset_identifies_batchnorm_by_type(tmp_path):
    srcnet = Tiny(SRC_CLASSES)
    randomise(srcnet, 3)
    art, src = make_artifact(tmp_path, "tiny", net=srcnet)
    torch.manual_seed(0)
    model = Tiny()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    build(["finetune_bnreset"], make_ctx(art, "tiny"), model)
    after = model.state_dict()
    assert torch.equal(after["bnx_conv.weight"], src["bnx_conv.weight"])    # "bn" in the name, but a conv
    for k in ("norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
              "fc.weight", "fc.bias"):
        assert torch.equal(after[k], init[k]), k


def test_bare_file_reference_loads(tmp_path):
    _, src = make_artifact(tmp_path)
    model = fresh()
    stack = build(["finetune"], make_ctx(tmp_path / "pretrain-a" / "model.pt"), model)
    for k, v in model.state_dict().items():
        assert under(k, "fc") or torch.equal(v, src[k]), k
    assert stack.describe()["finetune"]["transfer"]["artifact"] == "model.pt"


# ---- errors ----------------------------------------------------------------------------------------------------

def test_mismatched_architecture_is_one_line_error(tmp_path):
    art, _ = make_artifact(tmp_path, "resnet32")
    model = fresh()
    ctx = make_ctx(art)
    cls = REGULARIZERS.get("finetune")
    with pytest.raises(IncompatibleError) as e:
        cls.check(model, ctx)
    assert "resnet32" in one_line(e) and MODEL in one_line(e)
    for name in ("finetune", "finetune_bnreset", "l2sp", "delta"):
        with pytest.raises(IncompatibleError) as e:
            build_stack([name], {}, ctx).attach(fresh())
        one_line(e)


def test_shape_mismatch_under_the_same_name_is_one_line_error(tmp_path):
    wrong = timm.create_model("resnet32", num_classes=SRC_CLASSES)
    art, _ = make_artifact(tmp_path, MODEL, net=wrong)      # artifact.json claims resnet20, weights are resnet32
    with pytest.raises(IncompatibleError) as e:
        build_stack(["finetune"], {}, make_ctx(art)).attach(fresh())
    assert "model.pt" in one_line(e)


def test_check_accepts_when_artifact_not_built(tmp_path):
    model = fresh()
    for name in ("finetune", "finetune_bnreset", "l2sp", "delta"):
        REGULARIZERS.get(name).check(model, make_ctx(tmp_path / "not-built-yet"))
        REGULARIZERS.get(name).check(model, make_ctx(None))


@pytest.mark.parametrize("damage", ["garbage", "missing", "not_a_state_dict", "no_json", "bad_json"])
def test_corrupt_or_missing_artifact_is_one_line_usage_error(tmp_path, damage):
    art, _ = make_artifact(tmp_path)
    f = art / "model.pt"
    if damage == "garbage":
        f.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "missing":
        f.unlink()
    elif damage == "not_a_state_dict":
        torch.save([1, 2, 3], f)
    elif damage == "no_json":
        f = art / "artifact.json"
        f.unlink()
    else:
        f = art / "artifact.json"
        f.write_text("{not json")
    with pytest.raises(UsageError) as e:
        build_stack(["finetune"], {}, make_ctx(art)).attach(fresh())
    msg = one_line(e)
    assert str(f) in msg and "mpbench run" in msg
    assert not isinstance(e.value, IncompatibleError)


def test_no_artifact_in_context_is_usage_error():
    with pytest.raises(UsageError) as e:
        build_stack(["finetune"], {}, make_ctx(None)).attach(fresh())
    assert "mpbench run" in one_line(e)


# ---- L2-SP -----------------------------------------------------------------------------------------------------

def test_l2sp_penalty_zero_at_init_and_quadratic_in_the_offset(tmp_path):
    art, src = make_artifact(tmp_path)
    model = fresh()
    x = torch.randn(2, 3, 32, 32)
    stack = build(["l2sp"], make_ctx(art), model, {"l2sp": {"alpha": 0.1, "beta": 0.0}})
    reg = stack.members[0]
    assert float(reg.penalty(model, x, None, None).detach()) == 0.0
    m_b = fresh()
    stack_b = build(["l2sp"], make_ctx(art), m_b, {"l2sp": {"alpha": 0.1, "beta": 0.02}})
    head = m_b.fc.weight.pow(2).sum() + m_b.fc.bias.pow(2).sum()
    torch.testing.assert_close(stack_b.members[0].penalty(m_b, x, None, None), 0.01 * head)
    # move two shared tensors (a conv and a BN gamma) away from w0: (alpha/2) * ||delta||^2
    conv = next(n for n, p in model.named_parameters() if p.dim() == 4)
    gamma = next(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)) + ".weight"
    with torch.no_grad():
        model.get_parameter(conv).add_(0.5)
        model.get_parameter(gamma).sub_(2.0)
    assert torch.equal(reg._w0[0], src[next(n for n, _ in model.named_parameters())])   # w0 not aliased
    n_conv, n_gamma = model.get_parameter(conv).numel(), model.get_parameter(gamma).numel()
    expected = 0.5 * 0.1 * (0.25 * n_conv + 4.0 * n_gamma)
    p = reg.penalty(model, x, None, None)
    torch.testing.assert_close(p, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    p.backward()
    assert model.get_parameter(conv).grad is not None and torch.allclose(
        model.get_parameter(conv).grad, torch.full_like(model.get_parameter(conv), 0.1 * 0.5))


def test_l2sp_turns_weight_decay_off_for_shared_layers_and_head(tmp_path):
    art, _ = make_artifact(tmp_path)
    model = fresh()
    stack = build(["l2sp"], make_ctx(art), model)
    assert stack.members[0].hp == {"alpha": 0.01, "beta": 0.01}
    assert stack.describe()["l2sp"]["penalised"] == {"shared_tensors": len(list(model.parameters())) - 2,
                                                      "head": ["fc.weight", "fc.bias"]}
    extra = nn.Parameter(torch.zeros(3))            # stands for a module inserted by another regularizer
    params = [p for p in model.parameters()] + [extra]
    groups = stack.param_groups(model, [{"params": params, "weight_decay": 5e-4, "lr": 1e-3}])
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert sorted(wd) == sorted(id(p) for p in params)             # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(params)
    for n, p in model.named_parameters():
        assert wd[id(p)] == 0.0, n                                 # shared (BN gamma/beta too) and head
    assert wd[id(extra)] == 5e-4
    assert all(g["lr"] == 1e-3 for g in groups)
    torch.optim.Adam(groups, lr=1e-3, weight_decay=5e-4)           # a valid optimizer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_l2sp_w0_follows_the_model_to_the_gpu(tmp_path):
    art, _ = make_artifact(tmp_path)
    model = fresh()
    reg = build(["l2sp"], make_ctx(art), model).members[0]
    model.cuda()
    p = reg.penalty(model, torch.zeros(1, device="cuda"), None, None)
    assert p.device.type == "cuda" and reg._w0[0].device.type == "cuda"


# ---- DELTA -----------------------------------------------------------------------------------------------------

def _bn_eval(model: nn.Module) -> None:
    """Train mode, but BN on running statistics, so that target == source gives identical feature maps."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def test_delta_sites_are_the_last_conv_of_each_stage(tmp_path):
    art, _ = make_artifact(tmp_path)
    model = fresh()
    stages = list(model.stage_names)
    reg = build(["delta"], make_ctx(art), model).members[0]
    assert len(reg.chosen_sites) == len(stages)
    for site, st in zip(reg.chosen_sites, stages):
        assert site.startswith(st + ".") and isinstance(model.get_submodule(site), nn.Conv2d)
        convs = [n for n, m in model.get_submodule(st).named_modules() if isinstance(m, nn.Conv2d)
                 and "shortcut" not in n and "downsample" not in n]
        assert site == f"{st}.{convs[-1]}"
    assert feature_sites(model, "stage_output") == stages


def test_delta_penalty_zero_when_target_equals_source(tmp_path):
    art, _ = make_artifact(tmp_path)
    model = fresh()
    n_params = sum(p.numel() for p in model.parameters())
    keys = set(model.state_dict())
    stack = build(["delta"], make_ctx(art), model, {"delta": {"beta": 0.0}})
    reg = stack.members[0]
    assert sum(p.numel() for p in model.parameters()) == n_params and set(model.state_dict()) == keys
    x = torch.randn(4, 3, 32, 32)
    _bn_eval(model)
    logits = model(x)
    p = reg.penalty(model, x, None, logits)
    assert float(p.detach()) == 0.0
    stack.end_forward()
    assert not reg._ft and not reg._fs


def test_delta_penalty_value_and_gradient(tmp_path):
    art, src = make_artifact(tmp_path)
    model = fresh()
    stack = build(["delta"], make_ctx(art), model, {"delta": {"alpha": 0.3, "beta": 0.04}})
    reg = stack.members[0]
    site = reg.chosen_sites[-1]
    with torch.no_grad():
        model.get_submodule(site).weight.mul_(1.5)
    # independent reference: the source net and the target run through plain forward hooks
    srcnet = timm.create_model(MODEL, num_classes=SRC_CLASSES)
    srcnet.load_state_dict(src)
    srcnet.eval()
    feats: dict[str, list[torch.Tensor]] = {"s": [], "t": []}
    hs = [srcnet.get_submodule(n).register_forward_hook(lambda m, i, o: feats["s"].append(o)) for n in reg.chosen_sites]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        srcnet(x)
    for h in hs:
        h.remove()
    _bn_eval(model)
    ht = [model.get_submodule(n).register_forward_hook(lambda m, i, o: feats["t"].append(o.detach().clone()))
          for n in reg.chosen_sites]
    logits = model(x)
    for h in ht:
        h.remove()
    expected = 0.0
    for ft, fs in zip(feats["t"], feats["s"]):
        b, c, h, w = ft.shape
        expected += sum(float(((ft[i] - fs[i]) ** 2).sum()) / (h * w) for i in range(b)) / b
    assert expected > 0
    head = float(model.fc.weight.detach().pow(2).sum() + model.fc.bias.detach().pow(2).sum())
    p = reg.penalty(model, x, None, logits)
    assert float(p.detach()) == pytest.approx(0.3 * expected + 0.02 * head, rel=1e-5)
    p.backward()
    assert model.get_submodule(site).weight.grad is not None
    assert all(q.grad is None for q in reg._src_net.parameters())
    assert not reg._src_net.training


def test_delta_rejects_attention_and_turns_weight_decay_off(tmp_path):
    art, _ = make_artifact(tmp_path)
    ctx = make_ctx(art, reg={"delta": {"attention": True}})
    with pytest.raises(UsageError) as e:
        resolve_hparams("delta", {"attention": True})         # at plan time
    assert "attention" in one_line(e)
    with pytest.raises(UsageError) as e:
        build_stack(["delta"], {"delta": {"attention": True}}, ctx)
    one_line(e)
    model = fresh()
    stack = build(["delta"], make_ctx(art), model)
    groups = stack.param_groups(model, [{"params": list(model.parameters()), "weight_decay": 5e-4}])
    assert all(g["weight_decay"] == 0.0 for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ---- BSS -------------------------------------------------------------------------------------------------------

def _smallest_sq_singular_values(f: np.ndarray, k: int) -> float:
    f = f.astype(np.float64)
    gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f     # the min(b, d) x min(b, d) Gram matrix
    return float(np.sort(np.linalg.eigvalsh(gram))[:k].sum())


@pytest.mark.parametrize("b,d,k", [(16, 64, 1), (80, 64, 2), (5, 5, 3), (4, 9, 10)])
def test_bss_value_matches_eigenvalues_of_the_gram_matrix(b, d, k):
    f = torch.randn(b, d, generator=torch.Generator().manual_seed(b + d))
    ref = _smallest_sq_singular_values(f.numpy(), min(k, b, d))
    assert float(bss_value(f, k)) == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("batch", [8, 80])
def test_bss_penalty_on_penultimate_features(batch):
    model = fresh()
    stack = build(["bss"], make_ctx(None), model, {"bss": {"k": 2}})
    reg = stack.members[0]
    assert reg.hp == {"eta": 0.001, "k": 2} and reg.chosen_sites == ["fc:input"]
    x = torch.randn(batch, 3, 32, 32)
    model.train()
    logits = model(x)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)   # BN in train mode: same batch
    p = reg.penalty(model, x, None, logits)
    assert float(p.detach()) == pytest.approx(0.001 * _smallest_sq_singular_values(feats.numpy(), 2), rel=1e-3, abs=1e-9)
    p.backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    stack.end_forward()
    model.eval()
    with torch.no_grad():
        model(x)                        # evaluation forwards are not captured
    with pytest.raises(RuntimeError):
        reg.penalty(model, x, None, None)


def test_bss_guards_non_finite_features():
    model = fresh()
    reg = build(["bss"], make_ctx(None), model).members[0]
    model.train()
    x = torch.randn(4, 3, 32, 32)
    x[0] = float("nan")
    logits = model(x)
    p = reg.penalty(model, x, None, logits)
    assert float(p) == 0.0 and reg.nan_skips == 1
    assert reg.describe()["nan_skips"] == 1 and reg.state_dict() == {"nan_skips": 1}


def test_finetune_then_bss_compose(tmp_path):
    art, src = make_artifact(tmp_path)
    model = fresh()
    stack = build(["finetune", "bss"], make_ctx(art), model)
    conv = next(k for k, v in src.items() if v.dim() == 4)
    assert torch.equal(model.state_dict()[conv], src[conv])
    model.train()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    pens = stack.penalty(model, x, torch.zeros(4, dtype=torch.long), logits)
    assert set(pens) == {"bss"} and torch.isfinite(pens["bss"])
