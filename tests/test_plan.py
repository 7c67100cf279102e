"""Suite expansion: spec identity by content, stages as shared content-addressed artifacts."""
from __future__ import annotations

from mpbench.config import load_suite
from mpbench.plan import expand, spec_hash


def test_run_identity_is_the_resolved_spec_not_the_suite(make_suite):
    a = expand(load_suite(str(make_suite("a", grid={"seed": [0, 1]}))))
    b = expand(load_suite(str(make_suite("b", description="other"))))
    assert len(a.runs) == 2 and len(b.runs) == 1
    assert b.runs[0].id in {r.id for r in a.runs}           # shared run: trained once
    r = a.runs[0]
    assert r.id.startswith("base-conv4-synthetic-s0-") and len(r.id.rsplit("-", 1)[1]) == 8
    assert r.spec["reg"] == {"base": {}}
    c = expand(load_suite(str(make_suite("c")), ["train.checkpoint_every=2"]))
    assert c.runs[0].id == b.runs[0].id                      # how a run executes is not what it computes
    d = expand(load_suite(str(make_suite("d")), ["train.lr=0.01"]))
    assert d.runs[0].id != b.runs[0].id


def test_hparams_are_resolved_into_the_spec(make_suite):
    plan = expand(load_suite(str(make_suite(grid={"regularizer": ["dropout"]})), ["reg.dropout.p=0.3"]))
    assert plan.runs[0].spec["reg"]["dropout"]["p"] == 0.3
    grid = expand(load_suite(str(make_suite(grid={"regularizer": ["dropout"]})), ["grid.reg.dropout.p=[0.1,0.2]"]))
    assert sorted(r.spec["reg"]["dropout"]["p"] for r in grid.runs) == [0.1, 0.2]


def test_stage_artifacts_are_shared_and_ordered_first(make_suite):
    suite = make_suite(grid={"regularizer": ["finetune", "base", ["finetune", "bss"]], "seed": [0, 1]},
                       stages={"pretrain": {"dataset": "synthetic", "train": {"steps": 4, "batch_size": 32}}})
    plan = expand(load_suite(str(suite)))
    assert len(plan.artifacts) == 1 and plan.artifacts[0].kind == "pretrain"
    art = plan.artifacts[0].id
    users = [r for r in plan.runs if "finetune" in r.spec["regularizer"]]
    assert len(users) == 4 and all(r.spec["artifacts"] == {"pretrain": art} and r.deps == [art] for r in users)
    assert plan.jobs[0].kind == "pretrain"
    other = expand(load_suite(str(suite), ["train.steps=3"]))
    assert other.artifacts[0].id == art                       # target settings do not rebuild the source model


def test_spec_hash_is_order_independent():
    assert spec_hash({"a": 1, "b": {"c": 2, "d": 3}}) == spec_hash({"b": {"d": 3, "c": 2}, "a": 1})


def test_exclude_drops_matching_grid_points(make_suite):
    suite = make_suite(grid={"regularizer": ["base", "dropout"], "model": ["conv4", "conv6"]},
                       exclude=[{"regularizer": "dropout", "model": "conv6"}])
    plan = expand(load_suite(str(suite)))
    assert sorted(r.slug for r in plan.runs) == ["base-conv4-synthetic-s0", "base-conv6-synthetic-s0",
                                                  "dropout-conv4-synthetic-s0"]
