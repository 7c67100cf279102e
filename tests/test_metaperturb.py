"""MetaPerturb: the perturbation function (reference vs hand-derived values vs the fast path), phi files, the
regularizer plugin and the benchmark entry point."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import mpbench.models  # noqa: F401  (registers resnet20 & co. into timm)
from mpbench.errors import UsageError
from mpbench.regularization import REGULARIZERS, RunContext, resolve_hparams
from regularizers.metaperturb import (PHI_NUMEL, PHI_SHAPES, MetaPerturb, PerturbFunction, PerturbSite,
                                      expected_softplus, load_phi_file, native, softplus_sigmoid, standard_normal)

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "metaperturb_official_tin_resnet20_750.pth"
needs_official = pytest.mark.skipif(not OFFICIAL.is_file(), reason="released phi not present (../shared/reference)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["native", "pytorch"])
def cpu_backend(request, monkeypatch):
    """Run a test on both CPU executions of the fast path: the native kernels (which must build here) and the
    PyTorch one (GPUs, other dtypes, no compiler)."""
    if request.param == "native":
        assert native.library() is not None, native.why_unavailable()
    else:
        monkeypatch.setattr(native, "applies", lambda h: False)
    return request.param


def official(**kw) -> PerturbFunction:
    kw.setdefault("channel_norm", 64)
    kw.setdefault("spatial_norm", 32)
    return PerturbFunction.from_official(OFFICIAL, **kw)


def pair(num_sites=3, dtype=torch.float32, trainable=False, **kw):
    """(reference, fast) PerturbFunctions with the same (official if present, else random) phi."""
    ref = official(num_sites=num_sites, impl="reference", **kw) if OFFICIAL.is_file() else \
        PerturbFunction(num_sites=num_sites, impl="reference", **kw)
    ref = ref.to(dtype)
    fast = copy.deepcopy(ref)
    fast.impl = "fast"
    ref.phi_trainable = fast.phi_trainable = trainable
    return ref, fast


# ---- parameters, init, phi state ---------------------------------------------------------------------------------

def test_parameters_have_the_released_keys_shapes_and_init():
    fn = PerturbFunction(num_sites=2, channels=[3, 5])
    params = dict(fn.named_parameters())
    assert list(params) == list(PHI_SHAPES)
    assert {k: tuple(v.shape) for k, v in params.items()} == dict(PHI_SHAPES)
    assert sum(p.numel() for p in params.values()) == PHI_NUMEL == 82
    assert fn.fc.bias is None
    # N(0, 0.01) read as std 0.01: the 82 values have std ~0.01 (not ~0.1 = sqrt(0.01))
    allv = torch.cat([p.detach().flatten() for p in params.values()])
    assert 0.006 < allv.std().item() < 0.014
    # running stats: buffers, per site, per channel, init 0 / 1, not in phi
    assert fn.running_mean_0.shape == (3, 4) and fn.running_var_1.shape == (5, 4)
    assert torch.equal(fn.running_mean_1, torch.zeros(5, 4)) and torch.equal(fn.running_var_0, torch.ones(3, 4))
    assert set(fn.phi_state_dict()) == set(PHI_SHAPES)
    sd = fn.state_dict()
    assert {"running_mean_0", "running_var_0", "running_mean_1", "running_var_1"} <= set(sd)


def test_phi_trainable_flag_and_phi_round_trip(tmp_path):
    fn = PerturbFunction()
    assert fn.phi_trainable
    fn.phi_trainable = False
    assert not any(p.requires_grad for p in fn.parameters())
    fn.save_phi(tmp_path / "phi.pt")
    other = PerturbFunction.from_official(tmp_path / "phi.pt")
    for k, v in fn.phi_state_dict().items():
        assert torch.equal(v, other.phi_state_dict()[k])
    wrapped = {"phi": fn.phi_state_dict(), "step": 3}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    load_phi_file(tmp_path / "wrapped.pt")


@needs_official
def test_official_file_loads_exactly():
    raw = torch.load(OFFICIAL, map_location="cpu", weights_only=True)
    fn = official()
    assert set(raw) == set(PHI_SHAPES)
    for k, v in fn.phi_state_dict().items():
        assert torch.equal(v, raw[k].cpu())


@pytest.mark.parametrize("case", ["missing", "truncated", "garbage", "wrong_key", "wrong_shape", "not_tensor",
                                  "nan", "not_mapping"])
def test_bad_phi_files_are_one_line_usage_errors(tmp_path, case):
    good = PerturbFunction().phi_state_dict()
    path = tmp_path / f"{case}.pt"
    if case == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "garbage":
        path.write_bytes(b"\x00not a torch file at all" * 10)
    elif case == "wrong_key":
        bad = dict(good)
        bad["phi_3.w_all"] = bad.pop("phi_2.w_all")
        torch.save(bad, path)
    elif case == "wrong_shape":
        torch.save({**good, "kernel": torch.zeros(3, 1, 3, 3)}, path)
    elif case == "not_tensor":
        torch.save({**good, "fc.weight": [0.0] * 10}, path)
    elif case == "nan":
        torch.save({**good, "fc.weight": torch.full((1, 10), float("nan"))}, path)
    elif case == "not_mapping":
        torch.save([1, 2, 3], path)
    with pytest.raises(UsageError) as e:
        PerturbFunction.from_official(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    expect = {"missing": "not found", "wrong_key": "missing phi_2.w_all", "wrong_shape": "kernel has shape",
              "nan": "non-finite", "not_tensor": "fc.weight", "not_mapping": "not a MetaPerturb phi",
              "truncated": "cannot read", "garbage": "cannot read"}[case]
    assert expect in msg


@needs_official
def test_released_file_is_legacy_format_saved_on_cuda():
    """The file the spec describes: legacy (non-zip) torch format; loading maps CUDA tensors to the CPU."""
    import zipfile

    assert not zipfile.is_zipfile(OFFICIAL)
    assert all(v.device.type == "cpu" for v in load_phi_file(OFFICIAL).values())


# ---- the reference against values derived by hand ---------------------------------------------------------------

def conv3x3_loops(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cross-correlation of one 2-D map with a 3x3 kernel, zero padding 1, by explicit loops."""
    H, W = x.shape
    out = torch.zeros(H, W, dtype=torch.float64)
    for i in range(H):
        for j in range(W):
            acc = 0.0
            for di in range(3):
                for dj in range(3):
                    ii, jj = i + di - 1, j + dj - 1
                    if 0 <= ii < H and 0 <= jj < W:
                        acc += float(x[ii, jj]) * float(k[di, dj])
            out[i, j] = acc
    return out


def by_hand(phi, h, eps, c, train, running=None, channel_norm=64.0, spatial_norm=32.0, var_factor=True):
    """The spec (metaperturb.md section 1) computed channel by channel with loops; float64 throughout."""
    phi = {k: v.double() for k, v in phi.items()}
    h, eps = h.double(), eps.double()
    B, C, H, W = h.shape

    def equivariant(x, w_id, w_all):
        out = torch.zeros_like(x)
        for b in range(B):
            mean_map = sum(x[b, cc] for cc in range(C)) / C
            shared = conv3x3_loops(mean_map, w_all[0, 0])
            for cc in range(C):
                out[b, cc] = conv3x3_loops(x[b, cc], w_id[0, 0]) + shared
        return out

    a1 = equivariant(h, phi["phi_1.w_identity"], phi["phi_1.w_all"]).clamp_min(0)
    alpha = equivariant(a1, phi["phi_2.w_identity"], phi["phi_2.w_all"])
    t = alpha + eps
    z = torch.where(t > 20, t, torch.log(1 + torch.exp(t)))
    g = torch.zeros(B, C, 4, dtype=torch.float64)
    for b in range(B):
        for cc in range(C):
            for k in range(4):
                g[b, cc, k] = conv3x3_loops(h[b, cc], phi["kernel"][k, 0]).clamp_min(0).mean()
    new_running = None
    if train:
        m = g.sum(0) / B
        v = ((g - m) ** 2).sum(0) / (B - 1)
        rm, rv = running
        factor = B / (B - 1) if var_factor else 1.0
        new_running = (0.9 * rm.double() + 0.1 * m, 0.9 * rv.double() + 0.1 * v * factor)
    else:
        m, v = (r.double() for r in running)
    s = torch.zeros(C, dtype=torch.float64)
    wfc = phi["fc.weight"][0]
    for cc in range(C):
        feats = list(m[cc]) + list(v[cc]) + [C / channel_norm, H / spatial_norm]
        s[cc] = 1 / (1 + math.exp(-sum(float(f) * float(wv) for f, wv in zip(feats, wfc))))
    out = h * ((s.view(1, C, 1, 1) * z - 1) * c + 1)
    return out.clamp(max=100.0), new_running


@needs_official
@pytest.mark.parametrize("var_factor", [True, False])
def test_reference_matches_hand_derivation_with_the_released_phi(var_factor):
    h = torch.randn(2, 3, 5, 5) * 1.5
    eps = torch.randn(2, 3, 5, 5)
    fn = official(num_sites=2, impl="reference", release_var_factor=var_factor)
    phi = fn.phi_state_dict()
    # training: batch statistics, running stats of site 1 updated (site 0 untouched)
    fn.train()
    out = fn(h, site=1, noise_coeff=0.6, eps=eps)
    want, (rm, rv) = by_hand(phi, h, eps, 0.6, True, (torch.zeros(3, 4), torch.ones(3, 4)), var_factor=var_factor)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fn.running_mean_1.double(), rm, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fn.running_var_1.double(), rv, atol=1e-6, rtol=1e-5)
    assert fn.running_mean_0.numel() == 0 or torch.equal(fn.running_mean_0, torch.zeros_like(fn.running_mean_0))
    # evaluation: that site's running statistics
    fn.eval()
    out = fn(h, site=1, noise_coeff=1.0, eps=eps)
    want, _ = by_hand(phi, h, eps, 1.0, False, (fn.running_mean_1, fn.running_var_1))
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    # the fast path means the same
    fast = copy.deepcopy(fn)
    fast.impl = "fast"
    torch.testing.assert_close(fast(h, site=1, noise_coeff=1.0, eps=eps), out, atol=1e-5, rtol=1e-5)


def test_softplus_and_sigmoid_helper_are_exact():
    t = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([0.0, -0.0, 79.9, 80.0, 80.1, 1e4, -1e4])])
    z, sig = softplus_sigmoid(t.clone())
    torch.testing.assert_close(z, F.softplus(t), atol=2e-7, rtol=1e-6)
    torch.testing.assert_close(sig, torch.sigmoid(t), atol=2e-7, rtol=0)
    assert torch.isfinite(z).all()


# ---- fast path == reference ------------------------------------------------------------------------------------

SHAPES = [(4, 3, 6, 6), (5, 8, 4, 4), (3, 2, 7, 5)]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("coeff", [1.0, 0.35])
def test_fast_equals_reference_frozen_phi(mode, coeff, cpu_backend):
    ref, fast = pair(num_sites=3)
    for fn in (ref, fast):
        fn.train(mode == "train")
    for step in range(2):
        for site, shape in enumerate(SHAPES):
            h = torch.randn(shape) * 2
            eps = torch.randn(shape)
            g = torch.randn(shape)
            h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
            o1 = ref(h1, site=site, noise_coeff=coeff, eps=eps)
            o2 = fast(h2, site=site, noise_coeff=coeff, eps=eps)
            torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
            (o1 * g).sum().backward()
            (o2 * g).sum().backward()
            torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)
            with torch.no_grad():       # the no-grad path (MC evaluation) agrees too (a copy: stats update once)
                torch.testing.assert_close(copy.deepcopy(fast)(h, site=site, noise_coeff=coeff, eps=eps), o1,
                                           atol=1e-5, rtol=1e-5)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[k], v, atol=1e-6, rtol=1e-5)


def test_fast_path_sees_phi_changed_in_place_after_a_cached_forward(cpu_backend):
    """The frozen kernels are cached per phi (by storage and version, no read-back): an in-place write to phi (an
    optimizer step, load_phi) after a forward gives the new phi's output, equal to the reference's."""
    ref, fast = pair(num_sites=1)
    h, eps = torch.randn(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    phi = {k: v.clone() for k, v in fast.phi_state_dict().items()}
    with torch.no_grad():
        before = copy.deepcopy(fast)(h, eps=eps)
        for fn in (ref, fast):
            fn.kernel.mul_(-3.0)
            fn.fc.weight.add_(0.5)
        torch.testing.assert_close(fast(h, eps=eps), ref(h, eps=eps), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(fast(h, eps=eps), before, atol=1e-3)
        fast.load_phi(phi)
        torch.testing.assert_close(fast(h, eps=eps), before, atol=1e-5, rtol=1e-5)


def test_fast_equals_reference_when_clipping_and_in_channels_last(cpu_backend):
    ref, fast = pair(num_sites=1, clip=3.0)
    h = torch.randn(4, 6, 5, 5) * 4
    eps = torch.randn(4, 6, 5, 5) + 1.0
    hc = h.contiguous(memory_format=torch.channels_last)
    h1, h2 = h.clone().requires_grad_(), hc.clone().requires_grad_()
    o1, o2 = ref(h1, eps=eps), fast(h2, eps=eps)
    assert (o1 >= 3.0).any()
    assert o2.is_contiguous(memory_format=torch.channels_last)     # the layout of the input is kept
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(h)
    (o1 * g).sum().backward()
    (o2 * g).sum().backward()
    torch.testing.assert_close(h2.grad, h1.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_phi_gradients_equal_reference_in_float64(mode):
    """Meta-training: phi receives gradients on the fast path, the same as the reference's (float64)."""
    ref, fast = pair(num_sites=2, dtype=torch.float64, trainable=True)
    for fn in (ref, fast):
        fn.train(mode == "train")
    for site, shape in enumerate([(4, 3, 5, 5), (3, 5, 4, 6)]):
        h = torch.randn(shape, dtype=torch.float64)
        eps = torch.randn(shape, dtype=torch.float64)
        g = torch.randn(shape, dtype=torch.float64)
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        (ref(h1, site=site, noise_coeff=0.8, eps=eps) * g).sum().backward()
        (fast(h2, site=site, noise_coeff=0.8, eps=eps) * g).sum().backward()
        torch.testing.assert_close(h2.grad, h1.grad, atol=1e-10, rtol=1e-8)
        for (name, p1), p2 in zip(ref.named_parameters(), fast.parameters()):
            if mode == "eval" and name in ("kernel",):
                assert p1.grad is None and p2.grad is None      # evaluation: running stats, no kernel gradient
                continue
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-10, rtol=1e-8, msg=name)
        ref.zero_grad()
        fast.zero_grad()


@pytest.mark.parametrize("trainable", [False, True])
def test_fast_path_gradcheck(trainable):
    """Finite differences check the hand-written backward (frozen phi) and the autograd path (trainable phi)."""
    _, fast = pair(num_sites=1, dtype=torch.float64, trainable=trainable, clip=2.5)
    fast.train()
    h = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fast(x, noise_coeff=0.7, eps=eps), (h,), eps=1e-6, atol=1e-5)


def test_noise_is_sampled_and_standard_normal(cpu_backend):
    ref, fast = pair(num_sites=1)
    h = torch.randn(4, 3, 6, 6)
    torch.manual_seed(1)
    a = fast(h)
    torch.manual_seed(1)
    b = fast(h)
    torch.testing.assert_close(a, b)          # a function of torch's seed
    assert not torch.allclose(fast(h), a)      # fresh noise each call
    x = standard_normal((1 << 20,), torch.empty(0))
    assert abs(x.mean().item()) < 0.005 and abs(x.var().item() - 1) < 0.01
    assert abs((x.abs() < 1).float().mean().item() - 0.6827) < 0.003
    half = x.numel() // 2                        # no correlation between the two halves of a draw
    assert abs(torch.corrcoef(torch.stack([x[:half], x[half:2 * half]]))[0, 1].item()) < 0.01
    y = standard_normal((8, 16, 64, 64), torch.empty(0), memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last) and abs(y.std().item() - 1) < 0.01


def test_expected_multiplier_is_the_gaussian_expectation():
    alpha = torch.linspace(-8, 8, 33, dtype=torch.float64)
    e = torch.linspace(-10, 10, 200001, dtype=torch.float64)
    dens = torch.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi)
    want = torch.stack([torch.trapezoid(F.softplus(a + e) * dens, e) for a in alpha])
    torch.testing.assert_close(expected_softplus(alpha), want, atol=1e-6, rtol=1e-6)
    # deterministic mode draws nothing and equals both implementations' expected multiplier
    ref, fast = pair(num_sites=1)
    h = torch.randn(3, 4, 5, 5)
    for fn in (ref, fast):
        fn.eval()
        fn.deterministic = True
    state = torch.get_rng_state()
    out = fast(h)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(out, ref(h), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(h), out)


def test_running_stats_momentum_sites_and_errors():
    fn = PerturbFunction(num_sites=2)               # lazily allocated per site
    fn.phi_trainable = False
    h = torch.randn(6, 3, 4, 4)
    fn(h, site=0)
    assert fn.running_mean_0.shape == (3, 4) and fn.running_mean_1.numel() == 0
    with pytest.raises(ValueError, match="5-channel"):
        fn(torch.randn(6, 5, 4, 4), site=0)
    with pytest.raises(IndexError):
        fn(h, site=2)
    with pytest.raises(ValueError, match=">= 2"):
        fn(h[:1], site=0)
    fn.eval()
    fn(h[:1], site=0)                               # evaluation accepts a single image
    # eval output of one image does not depend on the rest of the batch (running statistics)
    eps = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(fn(h, eps=eps)[:2], fn(h[:2], eps=eps[:2]))
    # a lazily built function loads a trained state dict
    fresh = PerturbFunction(num_sites=2)
    fresh.load_state_dict(fn.state_dict())
    assert torch.equal(fresh.running_var_0, fn.running_var_0)


# ---- the regularizer plugin ---------------------------------------------------------------------------------------

def ctx_for(tmp_path, steps=100, artifacts=None):
    return RunContext(spec={}, model_name="resnet20", num_classes=10, in_chans=3, image_size=32,
                      total_steps=steps, num_train=500, artifacts=artifacts or {})


@pytest.fixture
def phi_file(tmp_path):
    if OFFICIAL.is_file():
        return OFFICIAL
    path = tmp_path / "phi.pt"
    PerturbFunction().save_phi(path)
    return path


def test_plugin_registry_and_requires():
    assert REGULARIZERS.get("metaperturb") is MetaPerturb
    assert "2006.07540" in MetaPerturb.citation and "NeurIPS 2020" in MetaPerturb.citation
    assert MetaPerturb.requires_for({"phi": None}) == ("metatrain",)
    assert MetaPerturb.requires_for({"phi": "x.pt"}) == ()


def test_plugin_attaches_to_resnet20(tmp_path, phi_file):
    model = timm.create_model("resnet20", num_classes=10)
    reg = MetaPerturb(ctx_for(tmp_path), phi=str(phi_file))
    assert reg.requires == ()
    MetaPerturb.check(model, reg.ctx)
    reg.attach(model)
    assert len(reg.chosen_sites) == 9 and len(reg.wrappers) == 9
    assert reg.resolved["channel_norm"] == 64 and reg.resolved["spatial_norm"] == 32
    fn = reg.fn
    assert not fn.phi_trainable and all(w.fn is fn for w in reg.wrappers)
    # phi not in the optimizer; its state once in the model's state dict
    groups = reg.param_groups(model, [{"params": list(model.parameters())}])
    assert not {id(p) for p in fn.parameters()} & {id(p) for p in groups[0]["params"]}
    keys = [k for k in model.state_dict() if k.endswith("fc.weight") and "metaperturb" in k]
    assert len(keys) == 1
    assert sum(k.split(".")[-1].startswith("running_mean_") for k in model.state_dict()) == 9
    # annealing
    reg.begin_step(0)
    assert reg.wrappers[3].c == 0.0
    reg.begin_step(20)
    assert reg.wrappers[3].c == pytest.approx(0.5)
    reg.begin_step(60)
    assert reg.wrappers[0].c == 1.0
    state = reg.state_dict()
    # training and evaluation run; MC protocol; deterministic context
    x = torch.randn(4, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is None for p in fn.parameters())
    assert reg.eval_protocol.describe() == "mc5/mc100"
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert not torch.allclose(a, b)
        with reg.deterministic():
            assert fn.deterministic
            torch.testing.assert_close(model(x), model(x))
        assert not fn.deterministic
    desc = reg.describe()
    assert desc["eval"] == "mc5/mc100" and len(desc["sites"]) == 9 and desc["cpu_kernel"] == "native"
    # resume
    other = MetaPerturb(ctx_for(tmp_path), phi=str(phi_file))
    other.attach(timm.create_model("resnet20", num_classes=10))
    other.load_state_dict(state)
    assert other.step == 60 and other.wrappers[0].c == 1.0
    # a deep copy of the model keeps one shared function
    clone = copy.deepcopy(model)
    fns = {id(m.fn) for m in clone.modules() if isinstance(m, PerturbSite)}
    assert len(fns) == 1 and id(fn) not in fns


def test_plugin_uses_the_metatrain_artifact(tmp_path, phi_file):
    art = tmp_path / "metatrain-x"
    art.mkdir()
    (art / "phi.pt").write_bytes(Path(phi_file).read_bytes())
    reg = MetaPerturb(ctx_for(tmp_path, artifacts={"metatrain": art}))
    assert reg.requires == ("metatrain",)
    reg.attach(timm.create_model("conv4", num_classes=10, width=8))
    assert reg.resolved["channel_norm"] == 8 and len(reg.chosen_sites) == 4
    # a stage given as a file
    reg = MetaPerturb(ctx_for(tmp_path, artifacts={"metatrain": art / "phi.pt"}))
    reg.attach(timm.create_model("conv4", num_classes=10, width=8))
    with pytest.raises(UsageError, match="metatrain"):
        MetaPerturb(ctx_for(tmp_path)).attach(timm.create_model("conv4", num_classes=10, width=8))
    with pytest.raises(UsageError, match="not found"):
        MetaPerturb(ctx_for(tmp_path), phi=str(tmp_path / "nope.pt")).attach(
            timm.create_model("conv4", num_classes=10, width=8))
    with pytest.raises(UsageError, match="final_eval_passes=0"):
        resolve_hparams("metaperturb", {"phi": str(phi_file), "final_eval_passes": 0})     # at plan time


def test_bench_smoke():
    from mpbench.bench import bench_metaperturb, format_result

    r = bench_metaperturb("resnet20", batch=4, size=16, threads=1, steps=1, warmup=0, verbose=False,
                          impls=("fast", "pytorch", "reference"))
    assert r["sites"] == 9 and r["base_ms"] > 0 and r["fast_ratio"] > 0 and r["reference_ratio"] > 0
    assert r["pytorch_ratio"] > 0 and r["cpu_kernel"] == "native"
    assert "resnet20, cpu, batch 4, 16 px, 1 threads" in format_result(r) and "fast = native kernels" in format_result(r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_check.sh)")
def test_fast_path_on_cuda_equals_reference():
    """On a GPU the fast path (its Triton kernels where triton runs, else the PyTorch execution): outputs, gradients
    and the running statistics equal the reference's for the same eps."""
    ref, fast = pair(num_sites=1, clip=3.0)
    ref, fast = ref.cuda(), fast.cuda()
    for mode in (True, False):
        ref.train(mode)
        fast.train(mode)
        h = (torch.randn(8, 16, 16, 16) * 2).cuda()
        eps, g = torch.randn_like(h), torch.randn_like(h)
        h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
        o1, o2 = ref(h1, noise_coeff=0.6, eps=eps), fast(h2, noise_coeff=0.6, eps=eps)
        torch.testing.assert_close(o2, o1, atol=1e-4, rtol=1e-4)
        (o1 * g).sum().backward()
        (o2 * g).sum().backward()
        torch.testing.assert_close(h2.grad, h1.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.running_var_0, ref.running_var_0)
    assert fast(h).device.type == "cuda" and not torch.equal(fast(h), fast(h))   # noise drawn on the device
