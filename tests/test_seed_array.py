"""Seed arrays (mpbench/seed_array.py) equal separate runs: K seeds built by ``train.build`` (synthetic data, 16 px,
batch 8, crop 2 + flip, multistep schedule, lr 1e-3), trained as one vmapped array and as K runs of mpbench's own
``Stepper``, compared per seed after 6 steps: losses, parameters, BatchNorm buffers and optimizer state.

Tolerances. Conv-4 (width 8) in float32: the array computes the same ops in another order (vmap turns K
convolutions into one grouped one), so the last bits differ; parameters, BN statistics and Adam/SGD state agree to
1e-5 (measured <= 1.4e-6 over seeds 0-11), losses to 1e-5 relative (measured 3e-7). ResNet-20 is compared in
float64 (model and optimizer; the loss stays float32, as mpbench computes it) to 1e-12 (measured 1.8e-15). In
float32 its trajectories are not comparable element-wise between *any* two implementations at this size: a
pre-activation within ~1e-7 of a ReLU's kink flips sign under rounding (seen: one at 3.4e-7 moved 5 % of a conv's
gradient; over 6 Adam steps channels_last vs eager differ by up to 1e-2, the array vs eager by 7e-3, seeds 0-11).
A swapped batch moves the parameters 100x beyond the tolerance (test_can_fail_when_two_seeds_swap_batches).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mpbench.errors import UsageError
from mpbench.regularization import resolve_hparams
from mpbench.seed_array import SeedArray, seed_only, supports
from mpbench.train import Setup, Stepper, build

CPU = torch.device("cpu")
SEEDS = (3, 5, 7)
STEPS = 6
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
LOSS_RTOL = 1e-5          # the loss is float32 in both dtypes (mpbench takes cross-entropy on float32 logits)


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(seed: int, method: str = "base", model: str = "conv4", optimizer: str = "adam") -> dict:
    return {"regularizer": [method], "model": model, "model_kwargs": {"width": 8} if model == "conv4" else {},
            "dataset": "synthetic", "seed": seed,
            "data": {"image_size": 16, "channels": None, "per_class": None, "classes": None},
            "train": {"steps": STEPS, "batch_size": 8, "optimizer": optimizer, "lr": 1e-3, "weight_decay": 5e-4,
                      "momentum": 0.9, "schedule": "multistep", "milestones": [0.4, 0.7, 0.9], "gamma": 0.3,
                      "eval_every": 0, "eval_batch_size": 100, "eval_passes": 1, "final_eval_passes": 1,
                      "augment": {"crop_pad": 2, "flip": True}},
            "reg": {method: resolve_hparams(method, {})}, "artifacts": {}}


def _to_float64(module: nn.Module, args: tuple) -> tuple:
    return (args[0].double(), *args[1:])


def _setups(specs: list[dict], tmp: Path, dtype: torch.dtype = torch.float32) -> list[Setup]:
    """Each seed's ``train.build``; float64: the model in float64, its (float32) batches cast on entry."""
    out = [build(spec, tmp, CPU, {}) for spec in specs]
    for s in out:
        s.model.train()
        if dtype == torch.float64:
            s.model.double().register_forward_pre_hook(_to_float64)
    return out


def _separate(spec: dict, tmp: Path, steps: int = STEPS, dtype: torch.dtype = torch.float32
              ) -> tuple[Stepper, list[float]]:
    """One seed as mpbench runs it: train.build + Stepper (eager), ``steps`` steps."""
    st = Stepper(_setups([spec], tmp, dtype)[0], spec, CPU)
    return st, [float(st.step(i)[0]) for i in range(steps)]


def _array(specs: list[dict], tmp: Path, steps: int = STEPS, dtype: torch.dtype = torch.float32
           ) -> tuple[SeedArray, list[torch.Tensor]]:
    arr = SeedArray(_setups(specs, tmp, dtype), specs, CPU)
    return arr, [arr.step(i)[0] for i in range(steps)]


def _max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


@pytest.mark.parametrize("method,model,optimizer,dtype", [
    ("base", "conv4", "adam", torch.float32), ("base", "conv4", "sgd", torch.float32),
    ("label_smoothing", "conv4", "adam", torch.float32),
    ("base", "resnet20", "adam", torch.float64), ("base", "resnet20", "sgd", torch.float64)])
def test_array_equals_separate_runs(method, model, optimizer, dtype, tmp_path):
    tol = TOL[dtype]
    specs = [_spec(s, method, model, optimizer) for s in SEEDS]
    arr, arr_losses = _array(specs, tmp_path, dtype=dtype)
    means = []
    for k, spec in enumerate(specs):
        st, losses = _separate(spec, tmp_path, dtype=dtype)
        torch.testing.assert_close(torch.tensor([float(v[k]) for v in arr_losses]), torch.tensor(losses),
                                   rtol=LOSS_RTOL, atol=0)
        ref, got = st.s.model.state_dict(), arr.unstack(k)
        for name in ref:                                  # parameters and BatchNorm buffers alike
            if name.endswith("num_batches_tracked"):
                assert int(got[name]) == int(ref[name]) == STEPS, name
            else:
                torch.testing.assert_close(got[name], ref[name], rtol=tol, atol=tol)
        mine, theirs = arr.state_dict(k)["optimizer"]["state"], st.opt.state_dict()["state"]
        assert list(mine) == list(theirs)
        for i in theirs:                                  # per-model Adam moments / SGD momentum
            assert list(mine[i]) == list(theirs[i])
            for key, v in theirs[i].items():
                torch.testing.assert_close(mine[i][key], v, rtol=tol, atol=tol)
        means.append(got[next(n for n in ref if n.endswith("running_mean"))])
    assert float((means[0] - means[1]).abs().max()) > 100 * tol   # BN statistics are not shared between seeds


def test_can_fail_when_two_seeds_swap_batches(tmp_path):
    specs = [_spec(s) for s in SEEDS]
    arr = SeedArray(_setups(specs, tmp_path), specs, CPU)
    arr.streams[0], arr.streams[1] = arr.streams[1], arr.streams[0]
    for i in range(STEPS):
        arr.step(i)
    st, _ = _separate(specs[0], tmp_path)
    names = [n for n in st.s.model.state_dict() if not n.endswith("num_batches_tracked")]
    gap = _max_gap({n: arr.unstack(0)[n] for n in names}, {n: st.s.model.state_dict()[n] for n in names})
    assert gap > 100 * TOL[torch.float32]
    st2, _ = _separate(specs[2], tmp_path)                 # the untouched seed still matches
    assert _max_gap(arr.unstack(2), st2.s.model.state_dict()) < TOL[torch.float32]


def test_unstack_round_trip(tmp_path):
    specs = [_spec(s) for s in SEEDS]
    setups = _setups(specs, tmp_path)
    before = [{n: v.clone() for n, v in s.model.state_dict().items()} for s in setups]
    arr = SeedArray(setups, specs, CPU)
    for k in range(len(SEEDS)):                            # stacking then slicing is exact
        assert _max_gap(arr.unstack(k), before[k]) == 0.0
    for i in range(2):
        arr.step(i)
    arr.sync_models()
    again = SeedArray(setups, specs, CPU)                  # the written-back models stack into the same array
    for k in range(len(SEEDS)):
        assert _max_gap(again.unstack(k), arr.unstack(k)) == 0.0
        assert _max_gap(setups[k].model.state_dict(), arr.unstack(k)) == 0.0


def test_seed_resumes_as_its_own_run(tmp_path):
    """A seed's slice (Stepper.state_dict layout) loaded into a separate Stepper continues as that seed's run, and
    the K slices loaded into a fresh array continue the array."""
    specs = [_spec(s) for s in SEEDS]
    arr, _ = _array(specs, tmp_path, steps=3)
    st = Stepper(_setups([specs[1]], tmp_path)[0], specs[1], CPU)
    st.load_state_dict(arr.state_dict(1))
    resumed = SeedArray(_setups(specs, tmp_path), specs, CPU)
    resumed.load_state_dicts([arr.state_dict(k) for k in range(len(SEEDS))])
    for i in range(3, STEPS):
        st.step(i)
        resumed.step(i)
    refs = [_separate(spec, tmp_path)[0].s.model.state_dict() for spec in specs]
    assert _max_gap(st.s.model.state_dict(), refs[1]) < TOL[torch.float32]
    for k, ref in enumerate(refs):
        assert _max_gap(resumed.unstack(k), ref) < TOL[torch.float32]


def test_refusals(tmp_path):
    assert supports(["base"]) is None and supports(["label_smoothing"]) is None
    why = supports(["base", "dropout"])
    assert why and "dropout" in why and "attach" in why and "\n" not in why
    assert "repeat" in seed_only([_spec(1), _spec(1)])
    assert seed_only([_spec(1)]) is None and seed_only([]) is not None
    other = _spec(2)
    other["train"] = {**other["train"], "lr": 1e-2}
    assert "train" in seed_only([_spec(1), other])
    with pytest.raises(UsageError, match="train"):
        SeedArray(_setups([_spec(1), other], tmp_path), [_spec(1), other], CPU)
    specs = [_spec(s, "dropout") for s in (1, 2)]
    with pytest.raises(UsageError, match="dropout"):
        SeedArray(_setups(specs, tmp_path), specs, CPU)
    specs = [{**_spec(s), "model_kwargs": {"width": 8, "drop_rate": 0.2}} for s in (1, 2)]
    with pytest.raises(UsageError, match="drop_rate"):                 # the model's own dropout, no method
        SeedArray(_setups(specs, tmp_path), specs, CPU)


def test_bench_seedarray_prints_its_table(cli):
    code, out, err = cli("bench", "seedarray", "--model", "conv4", "--size", "16", "--batch", "8", "--steps", "2",
                         "--seeds", "1", "--seeds", "2", "--threads", "1")
    assert code == 0, err
    assert "conv4, method base, batch 8 per seed, 16 px" in out
    assert [ln.split()[0] for ln in out.splitlines() if ln.startswith(("plain", "array"))] == ["plain", "array",
                                                                                              "array"]
    code, _, err = cli("bench", "seedarray", "--seeds", "0")
    assert code == 2 and "positive array sizes" in err
