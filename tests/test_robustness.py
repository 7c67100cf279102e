"""The `robustness` evaluation: PGD with EoT (l_inf, l_2, l_1) reaches the closed-form minimal perturbation of a
linear classifier, stays in its ball and the pixel box, samples a deterministic model once and a stochastic one
`samples` times per step, refuses bad settings at plan time, and runs end to end through `mpbench run`/`report`."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpbench.batches import standardise
from mpbench.errors import UsageError
from mpbench.evals import EVALS, EvalContext, all_metrics
from mpbench.evals.robustness import (NORMS, Robustness, correct, pgd_eot, project_l1_ball, random_start,
                                      subset_indices)
from mpbench.hparams import resolve
from mpbench.regularization import EvalProtocol

SHAPE = (3, 4, 4)
D = 3 * 4 * 4


class Linear2(nn.Module):
    """Two classes, logits (0, w . x01 + b) of the [0, 1] image behind the normalised input: class 1 iff z > 0."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        z = (xn * 0.5 + 0.5).flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


class Counting(nn.Module):
    """Counts forward calls; ``noise`` > 0 adds Gaussian noise to the logits (a stochastic model in eval mode)."""

    def __init__(self, inner: nn.Module, noise: float = 0.0):
        super().__init__()
        self.inner, self.noise, self.calls = inner, noise, 0

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(xn)
        return out + self.noise * torch.randn_like(out) if self.noise else out


def fwd(model: nn.Module):
    return lambda x01: model(standardise(x01))


def linear_case(margin: float = 0.5):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    x0 = torch.full((1, *SHAPE), 0.5, dtype=torch.float64)     # room 0.5 to each side of the box: it never binds
    b = margin - float(x0.flatten(1) @ w)
    return Linear2(w, b), x0, torch.tensor([1])


# closed form: the smallest perturbation of norm p that moves z = w.x + b by `margin` has size margin / ||w||_q
DUAL = {"linf": 1, "l2": 2, "l1": float("inf")}


@pytest.mark.parametrize("norm", NORMS)
def test_pgd_reaches_the_minimal_perturbation_of_a_linear_classifier(norm):
    model, x0, y = linear_case()
    threshold = 0.5 / float(model.w.norm(p=DUAL[norm]))
    rel = {"linf": 0.025, "l2": 0.025, "l1": 0.033}[norm]
    for factor, fooled in ((1.02, True), (0.98, False)):
        eps = factor * threshold
        adv = pgd_eot(fwd(model), x0, y, norm=norm, eps=eps, steps=200, rel_step=rel, l1_fraction=0.01)
        assert bool(correct(fwd(model), adv, y, 1)) is not fooled, (norm, factor)
        size = (adv - x0).flatten(1).norm(p={"linf": float("inf"), "l2": 2, "l1": 1}[norm])
        assert float(size) <= eps * (1 + 1e-9)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 5)).double().eval()


def _images(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)
    x[:, 0] = (x[:, 0] > 0.5).double()                           # pixels on the box faces
    return x, torch.randint(0, 5, (n,), generator=g)


def textbook_pgd(f, x0, y, norm, eps, steps, alpha):
    """Madry et al.'s PGD, written out: gradient step, projection onto the ball, clip to the box."""
    x, out = x0.clone(), []
    for _ in range(steps):
        xr = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(f(xr), y, reduction="sum"), xr)
        if norm == "linf":
            x = x + alpha * grad.sign()
            x = x0 + (x - x0).clamp(-eps, eps)
        else:
            x = x + alpha * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = x - x0
            n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            x = x0 + delta * torch.clamp(eps / n, max=1.0)
        x = x.clamp(0, 1)
        out.append(x)
    return out


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_eot_with_one_sample_is_plain_pgd(norm, eps):
    net = _mlp()
    x0, y = _images()
    ref = textbook_pgd(fwd(net), x0, y, norm, eps, 30, 0.1 * eps)
    for samples in (1, 10):                                     # a deterministic model: 10 samples, same gradient
        seen = []
        pgd_eot(fwd(net), x0, y, norm=norm, eps=eps, steps=30, rel_step=0.1, samples=samples,
                on_step=lambda t, x: seen.append(x))
        assert len(seen) == 30
        for a, b in zip(seen, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)      # float64, operation order aside


@pytest.mark.parametrize("start", [False, True])
def test_l1_iterates_stay_in_the_ball_and_the_box(start):
    net = _mlp()
    x0, y = _images()
    eps, seen = 2.0, []
    pgd_eot(fwd(net), x0, y, norm="l1", eps=eps, steps=40, rel_step=0.3, l1_fraction=0.1, start_random=start,
            on_step=lambda t, x: seen.append(x))
    for x in seen:
        assert float((x - x0).flatten(1).abs().sum(1).max()) <= eps * (1 + 1e-9)
        assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert float((seen[-1] - x0).abs().sum(dim=(1, 2, 3)).max()) > 0.9 * eps    # and it does move to the boundary


def test_l1_projection_is_the_euclidean_projection():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(5, 40, generator=g, dtype=torch.float64) * 3
    eps = 4.0
    p = project_l1_ball(v, eps)
    assert torch.allclose(p.abs().sum(1), torch.full((5,), eps, dtype=torch.float64))
    lo, hi = torch.zeros(5, dtype=torch.float64), v.abs().max(1).values    # soft threshold found by bisection
    for _ in range(200):
        mid = (lo + hi) / 2
        big = (v.abs() - mid[:, None]).clamp_min(0).sum(1) > eps
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    torch.testing.assert_close(p, v.sign() * (v.abs() - hi[:, None]).clamp_min(0), rtol=0, atol=1e-9)
    inside = v / v.abs().sum(1, keepdim=True) * 3.0
    assert torch.equal(project_l1_ball(inside, eps), inside)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_in_the_ball(norm):
    x0, _ = _images()
    x = random_start(x0, norm, 0.3)
    size = (x - x0).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1)
    assert float(size.max()) <= 0.3 + 1e-12 and 0 <= float(x.min()) and float(x.max()) <= 1


def _run(model: nn.Module, protocol: EvalProtocol, passes: int, **settings):
    cfg = resolve("eval_settings.robustness", Robustness.settings, settings)
    x = (torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    ctx = EvalContext(model, SimpleNamespace(eval_protocol=protocol), x, torch.tensor([0, 1, 2, 3]), 100, passes,
                      torch.device("cpu"), True)
    return Robustness(**cfg).run(ctx)


def test_a_deterministic_model_gets_one_sample_a_stochastic_one_ten():
    steps, few = 3, {"steps": 3, "linf_eps": [0.01], "l2_eps": [], "l1_eps": [], "skip_misclassified": False}
    torch.manual_seed(0)
    net = Counting(nn.Sequential(nn.Flatten(), nn.Linear(D, 5)).eval())
    out = _run(net, EvalProtocol(), 1, **few)
    assert net.calls == 1 + steps * 1 + 1                           # clean pass, 3 steps x 1 sample, 1 pass
    assert out["robust_settings"]["samples_used"] == 1 and "robust_l2" not in out

    noisy = Counting(nn.Sequential(nn.Flatten(), nn.Linear(D, 5)).eval(), noise=0.1)
    out = _run(noisy, EvalProtocol(2, 3), 3, **few)
    assert noisy.calls == 3 + steps * 10 + 3                        # MC predictions of 3 passes, 10 samples a step
    assert out["robust_settings"]["samples_used"] == 10 and out["robust_settings"]["passes"] == 3
    assert [r["eps"] for r in out["robust_linf"]] == [0.01] and out["robust_images"] == 4


def test_metaperturb_in_eval_mode_is_attacked_through_its_noise():
    """A real stochastic method (MetaPerturb's noise at evaluation, native CPU kernels where they build): the
    input gradient flows through it, and each step averages 10 samples."""
    import timm

    import mpbench.models  # noqa: F401  (registers conv4)
    from regularizers.metaperturb import attach_perturbation

    torch.manual_seed(0)
    net = timm.create_model("conv4", num_classes=4, in_chans=3, width=8)
    attach_perturbation(net, 16, owner="test", phi=None, trainable=False)
    net.eval()
    x0 = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert not torch.equal(fwd(net)(x0), fwd(net)(x0))          # noise on in eval mode
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(1))
    cfg = resolve("eval_settings.robustness", Robustness.settings,
                  {"steps": 2, "linf_eps": [0.03], "l2_eps": [], "l1_eps": [], "skip_misclassified": False})
    ctx = EvalContext(net, SimpleNamespace(eval_protocol=EvalProtocol(2, 3)), (x0 * 255).to(torch.uint8),
                      torch.arange(4), 100, 3, torch.device("cpu"), True)
    out = Robustness(**cfg).run(ctx)
    assert len(calls) == 3 + 2 * 10 + 3 and out["robust_settings"]["stochastic"]
    adv = pgd_eot(fwd(net), x0, torch.arange(4), norm="linf", eps=0.03, steps=2, rel_step=0.5, samples=10)
    assert float((adv - x0).abs().max()) == pytest.approx(0.03, abs=1e-6)   # the gradient is not zero


def test_misclassified_images_are_not_attacked():
    net = Counting(nn.Sequential(nn.Flatten(), nn.Linear(D, 5)).eval())
    with torch.no_grad():
        net.inner[1].weight.zero_()
        net.inner[1].bias.copy_(torch.tensor([0.0, 0, 0, 0, 1]))   # always predicts class 4: none of the labels
    out = _run(net, EvalProtocol(), 1, steps=5)
    assert net.calls == 1 and out["robust_clean_acc"] == 0
    assert all(r["acc"] == 0 for n in NORMS for r in out[f"robust_{n}"])


def test_settings_are_declared_and_checked():
    assert "robustness" in EVALS and not Robustness.periodic
    metrics = all_metrics()
    for n in NORMS:
        assert metrics[f"robust_{n}"].kind == "array" and metrics[f"robust_{n}"].unit == "%"
    assert metrics["robust_clean_acc"].unit == "%" and metrics["robust_clean_acc"].direction == "higher"
    for bad in ({"steps": 0}, {"samples": 1.5}, {"linf_eps": [-0.1]}, {"linf_eps": [2.0]}, {"l2_eps": 0.5},
                {"l1_eps": [1.0, 1.0]}, {"subset": "random"}, {"linf_step": 0}, {"images": 0}, {"random_start": 1}):
        with pytest.raises(UsageError, match="eval_settings.robustness"):
            resolve("eval_settings.robustness", Robustness.settings, bad)
    assert resolve("eval_settings.robustness", Robustness.settings, {"l1_eps": [], "images": None})["l1_eps"] == []


def test_subsets_are_fixed_and_spread():
    assert subset_indices(10, None, "spread").tolist() == list(range(10))
    assert subset_indices(10, 3, "first").tolist() == [0, 1, 2]
    assert subset_indices(10, 4, "spread").tolist() == [0, 3, 6, 9]
    assert subset_indices(5794, 500, "spread").unique().numel() == 500


ROBUST = {"images": 6, "steps": 2, "samples": 2, "linf_eps": [0.01, 0.03], "l2_eps": [0.5], "l1_eps": [2.0],
          "batch_size": 4}


def test_robustness_runs_end_to_end_and_reports(cli, make_suite, tmp_path):
    suite = make_suite("robust", grid={"regularizer": ["base", "dropout"]}, train={"steps": 3, "eval_every": 0},
                       eval=["classification", "robustness"], eval_settings={"robustness": ROBUST})
    res = tmp_path / "res"
    code, out, err = cli("run", f"suite={suite}", "--results", res, "launcher.name=local")
    assert code == 0, err
    results = [json.loads(p.read_text()) for p in res.glob("runs/*/result.json")]
    assert len(results) == 2
    for r in results:
        final = r["final"]
        assert [e["eps"] for e in final["robust_linf"]] == [0.01, 0.03]
        assert [e["eps"] for e in final["robust_l2"]] == [0.5] and [e["eps"] for e in final["robust_l1"]] == [2.0]
        for n in NORMS:
            assert all(0 <= e["acc"] <= final["robust_clean_acc"] <= 1 for e in final[f"robust_{n}"])
        assert final["robust_images"] == 6 and final["robust_settings"]["samples_used"] == 1   # both deterministic
        assert final["robust_settings"]["indices"] == "round(linspace(0, 199, 6))"
        assert r["spec"]["eval"]["robustness"]["steps"] == 2
    code, out, err = cli("report", f"suite={suite}", "--results", res, "metric=robust_clean_acc", "--format", "csv")
    assert code == 0, err
    assert "robust_clean_acc" in out and sum(1 for line in out.splitlines()[1:] if line.strip()) == 2


def test_bad_settings_stop_the_run_before_training(cli, make_suite, tmp_path):
    suite = make_suite("robust_bad", eval=["classification", "robustness"])
    res = tmp_path / "res"
    code, _, err = cli("run", f"suite={suite}", "--results", res, "eval_settings.robustness.l2_step=1.5")
    assert code == 2 and not res.exists()
    assert "eval_settings.robustness.l2_step" in err


def test_paper_figure6_plans_its_runs_and_shares_table1s_phi(cli, tmp_path):
    from mpbench.config import load_suite
    from mpbench.plan import expand

    code, _, err = cli("run", "suite=paper-figure6", "--dry-run", "--no-estimate", "--data", tmp_path / "nodata",
                       "--results", tmp_path / "res")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and errors and all("dataset '" in line and "missing" in line for line in errors), err
    fig, table1 = expand(load_suite("paper-figure6")), expand(load_suite("paper-table1"))
    assert len(fig.runs) == 5 * 5 and [j.kind for j in fig.artifacts] == ["metatrain"]
    assert {j.id for j in fig.artifacts} <= {j.id for j in table1.artifacts}        # one phi for both
    for job in fig.runs:
        assert list(job.spec["eval"]) == ["classification", "robustness"]
        r = job.spec["eval"]["robustness"]
        assert (r["steps"], r["samples"], r["linf_step"], r["l2_step"], r["l1_step"]) == (200, 10, 0.025, 0.025, 0.033)
        assert job.spec["data"]["image_size"] == 84 and job.spec["train"]["augment"]["crop_pad"] == 8
