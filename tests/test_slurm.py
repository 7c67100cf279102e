"""The Slurm launcher against a real single-node Slurm (``bash scripts/slurm.sh start``): a suite end to end,
a real partition-priority preemption that requeues and resumes from the run's checkpoint, sbatch typos."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("MPBENCH_SLURM_DIR", "/tmp/mpbench-slurm"))


def _cluster_up() -> str | None:
    """None when the test cluster answers, else why the tests skip."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "Slurm is not installed (apt-get install --no-install-recommends slurm-wlm munge slurmdbd mariadb-server)"
    if "SLURM_CONF" not in os.environ and (STATE / "etc" / "slurm.conf").exists():
        os.environ["SLURM_CONF"] = str(STATE / "etc" / "slurm.conf")
    try:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh"), "status"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scripts/slurm.sh status failed: {e}"
    if r.returncode != 0:
        return f"the test Slurm cluster is not up ({r.stdout.strip()}): run `bash scripts/slurm.sh start`"
    return None


_WHY = _cluster_up()
needs_slurm = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

SLURM = ["launcher.name=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.time_min=30"]  # > 10: see slurm.py


def _runs(res: Path) -> list[Path]:
    return sorted(p for p in (res / "runs").iterdir() if p.is_dir())


def _node_cpus() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout.split()[0]


def _jobs_named(name: str) -> list[str]:
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1days", "--name", name],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@needs_slurm
def test_suite_runs_as_a_job_array(make_suite, cli, tmp_path):
    suite = make_suite(grid={"seed": [0, 1]})
    t0 = time.time()
    code, out, err = cli("run", f"suite={suite}", *SLURM, f"launcher.folder={tmp_path / 'submitit'}",
                         "--results", tmp_path / "res", "--data", tmp_path / "data")
    assert code == 0, err
    assert time.time() - t0 < 90
    runs = _runs(tmp_path / "res")
    assert len(runs) == 2
    array_ids = set()
    for d in runs:
        result = json.loads((d / "result.json").read_text())
        assert result["final"]["acc"] >= 0 and result["attempts"] == 1 and not result["resumed"]
        status = json.loads((d / "status.json").read_text())
        assert status["state"] == "done"
        job_id = status["slurm_job_id"]
        assert job_id and "_" in job_id, status          # <array job id>_<task id>
        array_ids.add(job_id.split("_")[0])
        assert (d / "done").exists() and not (d / "lock").exists()
    assert len(array_ids) == 1                              # one array for the wave
    logs = list((tmp_path / "submitit").rglob("*_log.out"))
    assert len(logs) == 2


@needs_slurm
def test_preempted_run_requeues_and_resumes_from_its_checkpoint(make_suite, tmp_path):
    """A higher-priority partition preempts the run: Slurm sends USR2, the run checkpoints, submitit requeues it,
    and the second attempt resumes from that checkpoint to the same final metrics as an uninterrupted run."""
    train = {"steps": 4000, "batch_size": 32, "eval_every": 0, "checkpoint_every": 0}
    suite = make_suite(train=train)
    res = tmp_path / "res"
    cmd = [sys.executable, "-c", "from mpbench.cli import main; main()", "run", f"suite={suite}", *SLURM,
           "launcher.threads=1", f"launcher.folder={tmp_path / 'submitit'}", "--results", str(res),
           "--data", str(tmp_path / "data")]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    urgent = None
    try:
        status: dict = {}
        while time.time() - t0 < 60:                         # wait until it trains
            runs = list((res / "runs").glob("*/status.json")) if (res / "runs").exists() else []
            status = json.loads(runs[0].read_text()) if runs else {}
            if status.get("state") == "running" and status.get("step"):
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.2)
        else:
            pytest.fail(f"the run did not start training within 60 s: {status}")
        run_dir = runs[0].parent
        t_preempt = time.time()
        urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", _node_cpus(), "-t", "2",
                                 "-o", str(tmp_path / "urgent.out"), "--wrap", "sleep 1"],
                                capture_output=True, text=True, check=True).stdout.strip()
        ckpt_step = None
        while time.time() - t_preempt < 40:                  # preempted: checkpointed and pending again
            status = json.loads(runs[0].read_text())
            if "stopped at step" in (status.get("note") or "") and (run_dir / "checkpoint.pt").exists():
                ckpt_step = int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"])
                break
            assert not (run_dir / "done").exists(), "the run finished before it was preempted: make it longer"
            time.sleep(0.2)
        assert ckpt_step is not None and 0 < ckpt_step < train["steps"], status
        assert f"stopped at step {ckpt_step}" in status["note"]
        out, _ = proc.communicate(timeout=80)
    finally:
        if proc.poll() is None:
            proc.kill()
        if urgent:
            subprocess.run(["scancel", urgent], check=False)
    assert proc.returncode == 0, out
    result = json.loads((run_dir / "result.json").read_text())
    status = json.loads((run_dir / "status.json").read_text())
    assert result["resumed"] is True and result["attempts"] >= 2, result
    assert status["state"] == "done" and status["attempts"] >= 2
    log = "".join(p.read_text() for p in (tmp_path / "submitit").rglob("*_log.err"))
    assert "Caught signal SIGUSR2" in log and "preempted" in log
    sacct: list[str] = []
    for _ in range(50):                                      # the result file is written before Slurm's end
        sacct = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", status["slurm_job_id"]],
                               capture_output=True, text=True).stdout.split()
        if sacct and sacct[-1] == "COMPLETED":
            break
        time.sleep(0.2)
    assert "REQUEUED" in sacct and sacct[-1] == "COMPLETED", sacct
    print(f"preempted at step {ckpt_step}, finished after {time.time() - t0:.0f}s; sacct {sacct}")

    # the same run without interruption (in process) ends with the same numbers
    from mpbench.config import load_suite
    from mpbench.launchers import Request, run_plan
    from mpbench.plan import expand
    from mpbench.store import prepare_results_dir

    cfg = load_suite(str(suite), ["launcher.threads=1"])
    ref_res = prepare_results_dir(tmp_path / "ref")
    assert run_plan(Request(expand(cfg), cfg, ref_res, tmp_path / "data")) == {result["id"]: "done"}
    ref = json.loads((ref_res / "runs" / result["id"] / "result.json").read_text())
    assert ref["final"] == result["final"]


@needs_slurm
def test_killed_job_is_recorded_as_failed_with_reason(make_suite, tmp_path):
    """A killed worker leaves no result file: the launcher records why from Slurm's state instead of waiting forever."""
    suite = make_suite(train={"steps": 100000, "eval_every": 0})
    res = tmp_path / "res"
    cmd = [sys.executable, "-c", "from mpbench.cli import main; main()", "run", f"suite={suite}", *SLURM,
           "launcher.max_retries=0", f"launcher.folder={tmp_path / 'submitit'}", "--results", str(res),
           "--data", str(tmp_path / "data")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0, status = time.time(), {}
        while time.time() - t0 < 60 and not (status.get("state") == "running" and status.get("step")):
            found = list(res.glob("runs/*/status.json"))
            status = json.loads(found[0].read_text()) if found else {}
            time.sleep(0.2)
        assert status.get("state") == "running", status
        os.kill(int(status["pid"]), 9)                       # dies without a word (OOM killer, segfault)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out
    status = json.loads(found[0].read_text())
    assert status["state"] == "failed" and "ended FAILED without a result" in status["error"], status
    assert status["transient"] is True and "FAIL" in out


@needs_slurm
def test_sbatch_typo_is_a_usage_error_before_submitting(make_suite, cli, tmp_path):
    name = f"typo{os.getpid()}x{time.time_ns() % 10**6}"
    folder = tmp_path / "submitit"
    code, out, err = cli("run", f"suite={make_suite(name)}", *SLURM, "launcher.sbatch.constraintt=x",
                         f"launcher.folder={folder}", "--results", tmp_path / "res", "--data", tmp_path / "data")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "constraintt" in lines[0] and "constraint" in lines[0].replace("constraintt", ""), err
    assert not folder.exists() or not any(folder.rglob("*"))
    assert _jobs_named(f"mpbench-{name}") == []
    assert not list((tmp_path / "res").glob("runs/*"))     # rejected before the plan was written


def test_sbatch_parameters_are_routed():
    from mpbench.errors import UsageError
    from mpbench.launchers.slurm import sbatch_parameters

    named, extra = sbatch_parameters({"qos": "high", "reservation": "r1", "mail-type": "END", "requeue": True})
    assert named == {"slurm_qos": "high", "slurm_mail_type": "END"}
    assert extra == {"reservation": "r1", "requeue": True}
    with pytest.raises(UsageError, match="launcher.partition"):
        sbatch_parameters({"partition": "gpu"})


def test_without_slurm_is_a_one_line_usage_error(make_suite, cli, tmp_path, monkeypatch):
    import mpbench.launchers.slurm as slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    code, out, err = cli("run", f"suite={make_suite()}", "launcher.name=slurm", "--results", tmp_path / "res",
                         "--data", tmp_path / "data")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sbatch" in lines[0] and "launcher.name=pool" in lines[0], err
