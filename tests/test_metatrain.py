"""MetaPerturb meta-training stage: source task splits, the first-order phi step, single-process == distributed,
best-of-runs selection, resume, and the stage end to end through ``mpbench run``."""
from __future__ import annotations

import hashlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

from mpbench.data import load_dataset
from mpbench.metatrain import MetaTrainer, choose, make_tasks, metatrain, selection_data
from mpbench.sites import is_batchnorm
from mpbench.train import Interrupted, RunHooks

CPU = torch.device("cpu")
SPEC = {
    "dataset": "synthetic", "model": "conv4", "split": "release", "groups": 2, "steps": 3, "batch_size": 16,
    "lr": 1e-3, "weight_decay": 5e-4, "clip": 100.0, "inner_steps": 1, "runs": 1, "seed": 0,
    "data": {"image_size": None, "channels": None, "per_class": None, "classes": None},
    "augment": {"crop_pad": 2, "flip": True}, "model_kwargs": {"width": 8},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(**kw):
    return {**SPEC, **kw}


def _digests(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in images]


def _train(tmp_path):
    return load_dataset("synthetic", tmp_path, "train")


def test_release_split_gives_two_swapped_halves_per_class_disjoint_group(tmp_path):
    data = _train(tmp_path)
    tasks = make_tasks(data, "release", 2)
    assert len(tasks) == 4                                          # 2 * groups
    assert [t.group for t in tasks] == [0, 0, 1, 1]
    assert set(tasks[0].classes).isdisjoint(tasks[2].classes)       # class-disjoint across groups
    assert sorted(tasks[0].classes + tasks[2].classes) == list(range(10))
    a, b = tasks[0], tasks[1]
    assert (a.train_part, a.valid_part, b.train_part, b.valid_part) == ("A", "B", "B", "A")
    ha, hb = _digests(a.train.images), _digests(a.valid.images)
    assert set(ha).isdisjoint(hb)                                    # A and B are disjoint halves ...
    assert _digests(b.train.images) == hb and _digests(b.valid.images) == ha   # ... swapped in the second task
    assert len(ha) == len(hb) == 150                                 # 5 classes x 60 images, halved
    for t in tasks:                                                  # relabelled 0..k-1, all classes in both
        assert t.train.num_classes == 5 and set(t.train.labels.tolist()) == set(range(5))
        assert set(t.valid.labels.tolist()) == set(range(5))
    # images of task classes only: group 0's images are exactly the source images of its classes
    group0 = _digests(data.images[torch.isin(data.labels, torch.tensor(tasks[0].classes))])
    assert sorted(ha + hb) == sorted(group0)


def test_paper_split_holds_out_part_of_the_same_classes(tmp_path):
    data = _train(tmp_path)
    tasks = make_tasks(data, "paper", 2)
    assert len(tasks) == 2 and set(tasks[0].classes).isdisjoint(tasks[1].classes)
    for t in tasks:
        tr, va = _digests(t.train.images), _digests(t.valid.images)
        assert set(tr).isdisjoint(va) and len(tr) == 240 and len(va) == 60     # last fifth of each class
        assert torch.bincount(t.valid.labels).tolist() == [12] * 5
    with pytest.raises(Exception, match="fewer than 2 classes"):
        make_tasks(data, "paper", 6)
    with pytest.raises(Exception, match="split"):
        make_tasks(data, "wrong", 2)
    sel_train, sel_valid = selection_data(load_dataset("synthetic", tmp_path, "test"))
    assert set(_digests(sel_train.images)).isdisjoint(_digests(sel_valid.images))
    assert set(_digests(sel_train.images)).isdisjoint(_digests(data.images))   # held out from meta-training


def test_selection_on_another_dataset_is_disjoint_from_its_small_subset(tmp_path):
    """The paper's rule: the best phi is chosen on CIFAR-100 images disjoint from s-CIFAR100 (the first 50 per
    class); here the same rule on synthetic (its first 20 per class play s-CIFAR100)."""
    spec = _spec(selection={"dataset": "synthetic", "skip_per_class": 20, "per_class": 30})
    sel_train, sel_valid = selection_data(None, spec, tmp_path)
    small = load_dataset("synthetic", tmp_path, "train", per_class=20)
    chosen = _digests(sel_train.images) + _digests(sel_valid.images)
    assert len(chosen) == 10 * 30 and set(chosen).isdisjoint(_digests(small.images))
    assert set(_digests(sel_train.images)).isdisjoint(_digests(sel_valid.images))
    record, _ = metatrain(_spec(runs=2, select_steps=2, selection=spec["selection"]), tmp_path, CPU)
    assert record["selection"]["rule"] == spec["selection"] and "after the first 20" in record["selection"]["data"]
    assert record["selection"]["train"] + record["selection"]["valid"] == 300


def test_phi_step_is_the_task_average_and_theta_gets_no_phi_update(tmp_path):
    """One meta step == a manual first-order computation on 2 tiny tasks."""
    spec = _spec(groups=1)
    tasks = make_tasks(_train(tmp_path), "release", 1)
    assert len(tasks) == 2
    auto = MetaTrainer(spec, tasks, 0, CPU)
    man = MetaTrainer(spec, tasks, 0, CPU)
    phi0 = auto.phi_state()
    for lr in auto.learners.values():      # theta's optimizer holds no phi parameter
        assert {id(p) for g in lr.opt.param_groups for p in g["params"]}.isdisjoint(map(id, auto.phi.parameters()))
    auto.meta_step()

    # manual: inner step of each theta_k, then BN eval / perturbation train, valid CE, backward into phi
    grads, bn_before = [], []
    for p in man.phi.parameters():
        p.requires_grad_(False)
    for k, lr in man.learners.items():
        net = lr.net
        net.train()
        x, y = lr.train_stream.next()
        loss = F.cross_entropy(net(x), y)
        lr.opt.zero_grad()
        loss.backward()
        lr.opt.step()
        bn_before.append({n: b.clone() for n, b in net.named_buffers() if "running" in n and "metaperturb" not in n})
        for m in net.modules():
            if is_batchnorm(m):
                m.eval()
        for p in man.phi.parameters():
            p.requires_grad_(True)
            p.grad = None
        xv, yv = lr.valid_stream.next()
        F.cross_entropy(net(xv), yv).backward()
        grads.append([p.grad.clone() for p in man.phi.parameters()])
        for p in man.phi.parameters():
            p.requires_grad_(False)
    mean = [(g0 + g1) / 2 for g0, g1 in zip(*grads)]
    assert not all(torch.allclose(a, b) for a, b in zip(*grads))     # the tasks disagree: averaging matters
    opt = torch.optim.Adam(man.phi.parameters(), lr=1e-3, weight_decay=5e-4)
    for p, g in zip(man.phi.parameters(), mean):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(man.phi.parameters(), 100.0)
    opt.step()

    got, want = auto.phi_state(), man.phi_state()
    for k in got:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), k
        assert not torch.equal(got[k], phi0[k]), k                      # phi moved
    for (k, la), lm, bn in zip(auto.learners.items(), man.learners.values(), bn_before):
        sa, sm = la.net.state_dict(), lm.net.state_dict()
        for n in sa:
            if n in la.phi_keys:
                continue
            assert torch.allclose(sa[n].float(), sm[n].float(), rtol=1e-5, atol=1e-6), n   # theta: inner step only
        for n, b in bn.items():                                       # BN stats untouched by the valid pass
            assert torch.allclose(sa[n], b, rtol=1e-6, atol=1e-7), n


def test_single_process_equals_distributed_world_2(tmp_path):
    spec = _spec(steps=3)
    single, phi1 = metatrain(spec, tmp_path, CPU, world_size=1)
    dist, phi2 = metatrain(spec, tmp_path, CPU, world_size=2)
    assert single["execution"]["mode"] == "single-process"
    assert dist["execution"] == {"mode": "distributed", "world_size": 2, "backend": "gloo"}
    for k in phi1:
        assert torch.allclose(phi1[k], phi2[k], rtol=1e-6, atol=1e-8), k
    assert sum(v.numel() for v in phi1.values()) == 82
    assert [r["meta_step"] for r in dist["history"]] == [1, 2, 3]
    assert single["history"][-1]["loss"] == pytest.approx(dist["history"][-1]["loss"], rel=1e-5)


def test_best_of_runs_records_scores_and_keeps_the_chosen_phi(tmp_path):
    spec = _spec(steps=2, runs=2, seed=3, select_steps=4)
    out, phi = metatrain(spec, tmp_path, CPU)
    assert out["seeds"] == [3, 4] and len(out["runs"]) == 2
    scores = [r["score"] for r in out["runs"]]
    assert all({"acc", "nll", "ece"} <= set(s) for s in scores)
    assert out["chosen_run"] == choose(scores)
    assert out["selection"]["steps"] == 4 and "test split" in out["selection"]["data"]
    assert out["final"]["select_acc"] == scores[out["chosen_run"]]["acc"]
    # every run is an independent meta-training run with its own seed
    alone, phi_alone = metatrain(_spec(steps=2, seed=3 + out["chosen_run"]), tmp_path, CPU)
    assert all(torch.equal(phi[k], phi_alone[k]) for k in phi)
    assert alone["runs"][0]["score"] is None and alone["chosen_run"] == 0
    assert choose([{"acc": 0.5, "nll": 1.0}, {"acc": 0.6, "nll": 2.0}]) == 1
    assert choose([{"acc": 0.5, "nll": 1.0}, {"acc": 0.5, "nll": 0.9}]) == 1
    assert choose([{"acc": 0.5, "nll": 1.0}, {"acc": 0.5, "nll": 1.0}]) == 0


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)                       # checkpoints are weights_only-loadable


def test_resume_gives_the_same_phi_as_uninterrupted(tmp_path):
    spec = _spec(steps=4, runs=2, select_steps=2, inner_steps=2)
    ref, phi_ref = metatrain(spec, tmp_path, CPU)
    saved, calls, steps_seen = {}, {"n": 0}, []

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == 7                 # run 1 (second run), before its meta-step 2

    hooks = RunHooks(should_stop=stop, save_checkpoint=lambda s: saved.update(s), checkpoint_every=3)
    with pytest.raises(Interrupted):
        metatrain(spec, tmp_path, CPU, hooks)
    state = _roundtrip(saved)
    assert state["run"] == 1 and state["trainer"]["step"] == 2 and len(state["done"]) == 1
    assert len(state["trainer"]["tasks"]) == 4
    # resume in the other execution mode: the checkpoint format is the same
    hooks = RunHooks(load_checkpoint=lambda: state, on_step=lambda s, t, loss: steps_seen.append((s, t)))
    out, phi = metatrain(spec, tmp_path, CPU, hooks, world_size=2)
    assert steps_seen[0] == (7, 8) and steps_seen[-1] == (8, 8)
    for k in phi:
        assert torch.allclose(phi[k], phi_ref[k], rtol=1e-6, atol=1e-8), k
    for got, want in zip(out["runs"], ref["runs"]):
        assert got["score"] == pytest.approx(want["score"], rel=1e-5)
    assert out["chosen_run"] == ref["chosen_run"]


def test_stage_runs_once_through_mpbench_run_and_feeds_two_target_runs(make_suite, cli, tmp_path):
    suite = make_suite(grid={"regularizer": ["metaperturb"], "seed": [0, 1]}, train={"steps": 3, "eval_every": 0},
                       stages={"metatrain": {"dataset": "synthetic", "model": "conv4", "steps": 2, "batch_size": 16,
                                             "groups": 2, "split": "release"}})
    res = tmp_path / "res"
    code, _, err = cli("run", f"suite={suite}", "--results", res, "--data", tmp_path / "data",
                       "reg.metaperturb.final_eval_passes=2", "reg.metaperturb.eval_passes=2")
    assert code == 0, err
    arts = list(res.glob("artifacts/*"))
    assert len(arts) == 1 and arts[0].name.startswith("metatrain-conv4-synthetic-")
    art = arts[0]
    phi = torch.load(art / "phi.pt", weights_only=True)
    assert list(phi) == ["kernel", "phi_1.w_identity", "phi_1.w_all", "phi_2.w_identity", "phi_2.w_all",
                         "fc.weight"] and sum(v.numel() for v in phi.values()) == 82
    meta = json.loads((art / "artifact.json").read_text())
    assert meta["kind"] == "metatrain" and meta["source"]["split"] == "release"
    assert meta["source"]["num_tasks"] == 4 and meta["architecture"] == "conv4"
    assert meta["execution"]["mode"] == "single-process" and meta["chosen_run"] == 0
    assert json.loads((art / "status.json").read_text())["attempts"] == 1
    runs = sorted(res.glob("runs/*/result.json"))
    assert len(runs) == 2
    for p in runs:
        r = json.loads(p.read_text())
        assert r["artifacts"] == {"metatrain": art.name}
        assert r["regularizers"]["metaperturb"]["resolved"]["phi"] == str(art / "phi.pt")
    code, _, err = cli("run", f"suite={suite}", "--results", res, "--data", tmp_path / "data",
                       "reg.metaperturb.final_eval_passes=2", "reg.metaperturb.eval_passes=2")
    assert code == 0 and json.loads((art / "status.json").read_text())["attempts"] == 1   # not rebuilt
