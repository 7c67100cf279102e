"""Output that scripts can use: `list` piped or as JSON, `status --format json`, and 'did you mean' suggestions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpbench.errors import did_you_mean
from mpbench.regularization import REGULARIZERS
from mpbench.store import RunDir, write_json

# --- mpbench list ------------------------------------------------------------------------------------------------


def test_list_piped_is_one_unwrapped_line_per_entry(cli):
    code, out, err = cli("list", "regularizers")            # stdout is captured: not a terminal
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == REGULARIZERS.names()
    assert not any(ch in out for ch in "┃│━")                 # no table drawing
    long_name = max(REGULARIZERS.names(), key=len)
    hits = [line for line in lines if long_name in line]      # `mpbench list regularizers | grep NAME`
    assert len(hits) == 1 and hits[0].startswith(long_name + "\t")
    e = REGULARIZERS.entry(long_name)
    assert hits[0].split("\t")[1] == " ".join(e.description.split())   # the whole description, same line
    assert all(line.count("\t") == 4 for line in lines)       # name, description, citation, hparams, needs


@pytest.mark.parametrize("what, name", [("models", "resnet20"), ("datasets", "fashion_mnist"),
                                        ("suites", "quickstart"), ("stages", "pretrain"), ("launchers", "slurm")])
def test_every_list_is_plain_when_piped_and_json_on_request(cli, what, name):
    code, out, err = cli("list", what)
    assert code == 0, err
    assert name in [line.split("\t")[0] for line in out.splitlines()]
    code, out, _ = cli("list", what, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert name in [r["name"] for r in rows] and all(r["description"] is not None for r in rows)


def test_list_regularizers_json_has_every_method_and_its_fields(cli):
    code, out, err = cli("list", "regularizers", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == REGULARIZERS.names()
    for r in rows:
        assert set(r) == {"name", "description", "citation", "hparams", "needs"}
        cls = REGULARIZERS.get(r["name"])
        assert set(r["hparams"]) == set(cls.hparams) and r["needs"] == list(cls.requires)
    dropout = next(r for r in rows if r["name"] == "dropout")
    assert dropout["hparams"] == {k: v.default for k, v in REGULARIZERS.get("dropout").hparams.items()}


def test_list_table_on_request_and_sites_stay_plain(cli):
    code, out, _ = cli("list", "launchers", "--format", "table")
    assert code == 0 and "┃" in out and "slurm" in out
    code, out, _ = cli("list", "regularizers", "--sites", "resnet20")
    lines = out.splitlines()                                  # one unwrapped line per site, on a terminal too
    assert code == 0 and len(lines) == 27 and all(line.startswith("layer") and " ch " in line for line in lines)
    code, out, _ = cli("list", "regularizers", "--sites", "resnet20", "--format", "json")
    sites = json.loads(out)
    assert code == 0 and {s["kind"] for s in sites} == {"block", "branch", "shortcut"} and len(sites) == 27
    code, _, err = cli("list", "models", "--sites", "resnet20")
    assert code == 2 and "list regularizers" in err and len(err.strip().splitlines()) == 1


# --- mpbench status ----------------------------------------------------------------------------------------------

def _results(tmp_path: Path, suite: str = "tiny") -> Path:
    """A results dir (written with the store's own API) holding one job in each state plus a broken one."""
    res = tmp_path / "res"
    for sub in ("runs", "artifacts", "suites"):
        (res / sub).mkdir(parents=True)
    art = RunDir(res, "meta-train", "zz-stage-1")              # its id says nothing about its kind
    art.create("zz-stage", {})
    art.update_status(state="running", step=3, total=10, host="node7")
    done = RunDir(res, "run", "base-a")
    done.create("base-a", {})
    done.mark_done({"final": {"acc": 1.0}})
    failed = RunDir(res, "run", "base-b")
    failed.create("base-b", {})
    failed.update_status(state="failed", error="non-finite loss at step 2")
    broken = RunDir(res, "run", "base-c")
    broken.path.mkdir()
    broken.config.write_text("\x00 not yaml: [")
    broken.status_file.write_text('{"state": 5}')
    write_json(res / "suites" / f"{suite}.json", {"name": suite, "description": "", "report": {},
                                                  "artifacts": ["zz-stage-1"],
                                                  "runs": ["base-a", "base-b", "base-c", "base-d"]})
    return res


def test_status_json_counts_and_jobs_not_done(cli, tmp_path):
    res = _results(tmp_path)
    code, out, err = cli("status", "suite=tiny", "--results", res, "--format", "json")
    assert code == 0, err
    [s] = json.loads(out)
    assert s["suite"] == "tiny" and s["jobs"] == 5
    assert s["counts"] == {"done": 1, "running": 1, "failed": 1, "pending": 1, "unreadable": 1}
    jobs = {j["id"]: j for j in s["not_done"]}
    assert set(jobs) == {"zz-stage-1", "base-b", "base-c", "base-d"}
    assert jobs["zz-stage-1"]["kind"] == "meta-train" and jobs["zz-stage-1"]["state"] == "running"
    assert "step 3/10 on node7" in jobs["zz-stage-1"]["detail"]
    assert jobs["base-b"] == {"id": "base-b", "kind": "run", "state": "failed", "detail": "non-finite loss at step 2"}
    assert jobs["base-c"]["state"] == "unreadable" and "delete" in jobs["base-c"]["detail"]
    assert jobs["base-d"]["state"] == "pending"
    code, out, _ = cli("status", "--results", res)                 # the table never crashes on the broken dir
    assert code == 0 and "done 1" in out and "unreadable 1" in out and "meta-train" in out


def test_status_json_lists_every_suite_and_skips_a_broken_record(cli, tmp_path):
    res = _results(tmp_path)
    write_json(res / "suites" / "other.json", {"name": "other", "runs": ["base-a"], "artifacts": []})
    (res / "suites" / "junk.json").write_text("{ not json")
    code, out, err = cli("status", "--results", res, "--format", "json")
    assert code == 0
    assert [s["suite"] for s in json.loads(out)] == ["other", "tiny"]
    assert "junk.json" in err and "mpbench run suite=junk" in err


def test_status_takes_suite_as_a_yaml_path_like_run(cli, make_suite, tmp_path):
    res = _results(tmp_path, suite="tiny")
    path = make_suite("tiny")
    code, out, _ = cli("status", f"suite={path}", "--results", res, "--format", "json")
    assert code == 0 and json.loads(out)[0]["suite"] == "tiny"
    renamed = path.with_name("my-copy.yaml")                    # the YAML's name: wins over the file name
    path.rename(renamed)
    code, out, _ = cli("status", f"suite={renamed}", "--results", res)
    assert code == 0 and "tiny" in out and "done 1" in out
    code, out, _ = cli("status", f"suite={tmp_path / 'gone' / 'tiny.yaml'}", "--results", res)   # no file: stem
    assert code == 0 and "done 1" in out
    code, _, err = cli("status", "suite=tiy", "--results", res)
    assert code == 2 and "no results for suite 'tiy'" in err and "did you mean 'tiny'" in err
    assert len(err.strip().splitlines()) == 1


# --- did you mean ------------------------------------------------------------------------------------------------

def test_did_you_mean_treats_look_alike_characters_as_equal():
    import timm

    import mpbench.models  # noqa: F401  (registers resnet20 and friends)

    msg = did_you_mean("resnet2O", timm.list_models())
    assert msg.startswith("did you mean 'resnet20'")
    assert did_you_mean("resnet2O", ["resnet32", "resnet20", "resnet44"]).startswith("did you mean 'resnet20'")
    assert did_you_mean("cifarlOO", ["cifar10", "cifar100"]).startswith("did you mean 'cifar100'")
    assert did_you_mean("DropOut", ["dropout", "drop_path"]) == "did you mean 'dropout'?"


def test_did_you_mean_offers_up_to_three_best_first_or_the_valid_names():
    names = ["resnet20", "resnet200", "resnet200d", "resnet201", "vgg9"]
    msg = did_you_mean("resnet2O", names)
    assert msg.startswith("did you mean 'resnet20', ") and msg.endswith("?") and msg.count("'") == 6
    assert " or " in msg and "vgg9" not in msg
    assert did_you_mean("train.stpes", ["train.steps", "train.milestones", "data"]) == "did you mean 'train.steps'?"
    assert did_you_mean("zzz", ["base", "dropout"]) == "valid: base, dropout"
    many = [f"m{i:02d}" for i in range(20)]
    assert did_you_mean("qqqq", many).endswith(", ...")


def test_cli_typo_suggests_the_right_model(cli, make_suite, tmp_path):
    code, _, err = cli("run", f"suite={make_suite()}", "grid.model=[resnet2O]", "--results", tmp_path / "r")
    assert code == 2 and "did you mean 'resnet20'" in err and len(err.strip().splitlines()) == 1


def test_report_and_dry_run_print_json(cli, make_suite, tmp_path):
    import json

    suite = make_suite(grid={"seed": [0, 1]})
    res = tmp_path / "res"
    code, out, _ = cli("run", f"suite={suite}", "--results", res, "--dry-run", "--format", "json")
    plan = json.loads(out)
    assert code == 0 and plan["runs"] == 2 and {j["state"] for j in plan["jobs"]} == {"pending"}
    assert cli("run", f"suite={suite}", "--results", res)[0] == 0
    code, out, _ = cli("report", "suite=tiny", "--results", res, "--format", "json")
    table = json.loads(out)
    assert code == 0 and table["metric"] == "acc" and table["unit"] == "%" and table["direction"] == "higher"
    assert len(table["cells"]) == 1 and table["cells"][0]["n"] == 2 and "seeds" in table["footer"]
