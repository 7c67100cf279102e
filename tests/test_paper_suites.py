"""The paper's suites: their real plans (job counts), and both run end to end on fixture data written in each
dataset's official layout, through every stage and the report (LaTeX compiled when a TeX engine is present)."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest

from mpbench.data import DATASETS, clear_cache
from test_data import write_cifar, write_stl10
from test_data_paper import MAKERS, PAPER, K

TINY = ["train.steps=2", "train.eval_every=0", "train.batch_size=4", "train.eval_batch_size=64", "grid.seed=[0]",
        "reg.metaperturb.final_eval_passes=2", "reg.metaperturb.eval_passes=1", "reg.info_dropout.bn_batches=1",
        "launcher.name=local",
        "stages.metatrain.steps=1", "stages.metatrain.groups=1", "stages.metatrain.batch_size=2",
        "stages.metatrain.runs=2", "stages.metatrain.select_steps=1", "stages.metatrain.selection.skip_per_class=2"]
PRETRAIN = ["stages.pretrain.train.steps=2", "stages.pretrain.train.batch_size=4", "stages.pretrain.train.eval_every=0"]


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """Every dataset of both suites, tiny, imported with `mpbench data prepare NAME --from` from official layouts."""
    tmp = tmp_path_factory.mktemp("paper")
    root = tmp / "data"
    rng = np.random.default_rng(0)
    labels = [c for c in range(100) for _ in range(4)]                       # 4 images of each CIFAR-100 class
    write_cifar(root, rng.integers(0, 256, (400, 3072), dtype=np.uint8), labels, "train")
    write_cifar(root, rng.integers(0, 256, (10, 3072), dtype=np.uint8), list(range(10)), "test")
    for split, n in (("train", 20), ("test", 5)):
        write_stl10(root, split, rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tobytes(),
                    [1 + i % 10 for i in range(n)])
    with pytest.MonkeyPatch.context() as mp:
        for name, cls in PAPER.items():
            fx = MAKERS[name](tmp / "fixtures" / name)
            for attr, value in (("archive_md5", {}), ("md5", {}), ("num_classes", K), ("sizes", fx.counts)):
                mp.setattr(cls, attr, value)
            DATASETS.get(name)().prepare(root, fx.sources)
        clear_cache()
        yield root
    clear_cache()


@pytest.mark.parametrize("suite, runs, stages", [("paper-table1", 7 * 6 * 5, 2), ("paper-table2", 5 * 8 * 2 * 5, 1)])
def test_real_suites_plan(cli, paper_data, tmp_path, suite, runs, stages):
    code, out, err = cli("run", f"suite={suite}", "--dry-run", "--no-estimate", "--format", "json",
                         "--data", paper_data, "--results", tmp_path / "res")
    plan = json.loads(out)
    assert code == 0, err
    assert (plan["runs"], plan["stages"]) == (runs, stages)
    kinds = {j["kind"] for j in plan["jobs"]}
    assert kinds == ({"run", "metatrain", "pretrain"} if stages == 2 else {"run", "metatrain"})


def test_both_suites_share_one_phi_and_run_end_to_end(cli, paper_data, tmp_path):
    res = tmp_path / "res"
    tic = time.perf_counter()
    code, _, err = cli("run", "suite=paper-table1", *TINY, *PRETRAIN, "--data", paper_data, "--results", res)
    assert code == 0, err
    code, _, err = cli("run", "suite=paper-table2", *TINY, "--data", paper_data, "--results", res)
    assert code == 0, err
    took = time.perf_counter() - tic
    assert len(list(res.glob("artifacts/metatrain-*"))) == 1                # the same phi serves both tables
    assert len(list(res.glob("runs/*/done"))) == 7 * 6 + 5 * 8 * 2 - 5 * 2     # ResNet-20 on both: shared runs
    phi = json.loads(next(res.glob("artifacts/metatrain-*/artifact.json")).read_text())
    assert phi["selection"]["rule"]["dataset"] == "cifar100" and phi["chosen_run"] in (0, 1)

    code, out, err = cli("report", "suite=paper-table1", "--results", res, "--format", "markdown", "--only-last")
    assert code == 0, err
    for label in ("FT + MetaPerturb", "Fine-tuning", "DropBlock", "Manifold Mixup", "Information Dropout",
                  "s-CIFAR100", "Stanford Dogs", "CUB", "# transferred parameters"):
        assert label in out, label
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in out.splitlines()[2:9]}
    assert rows["MetaPerturb"] == "82" and rows["Base"] == "0" and rows["DropBlock"] == "0"
    assert int(rows["Fine-tuning"].replace(",", "")) > 200_000                  # ResNet-20's transferred weights
    assert int(rows["FT + MetaPerturb"].replace(",", "")) > 82                  # BN skipped, plus phi

    code, out, err = cli("report", "suite=paper-table2", "--results", res, "--format", "latex", "--only-last",
                         "--out", tmp_path / "t2.tex")
    assert code == 0, err
    tex = (tmp_path / "t2.tex").read_text()
    assert "ResNet-56" in tex and "WRN-28-2" in tex and "Conv-4" in tex and "s-CIFAR100" in tex
    if shutil.which("pdflatex"):
        doc = tmp_path / "doc.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[margin=1cm,landscape]{geometry}"
                       "\\begin{document}\\tiny\n" + tex + "\n\\end{document}\n")
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]
    print(f"both paper suites on fixtures: {took:.1f} s")
