"""The ``mpbench`` command line: run, status, report, list, data, bench."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

import mpbench
from mpbench.errors import MpbenchError, UsageError

console = Console()
err_console = Console(stderr=True)


def _results_dir(results: str | None) -> Path:
    return Path(results or os.environ.get("MPBENCH_RESULTS", "results"))


def _data_dir(data: str | None) -> Path:
    from mpbench.data import default_data_root

    return Path(data) if data else default_data_root()


results_option = click.option("--results", "results", type=click.Path(), default=None,
                              help="results directory (default ./results, env MPBENCH_RESULTS)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mpbench.__version__, prog_name="mpbench")
@click.option("--debug", is_flag=True, help="show Python tracebacks on errors")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Benchmark regularizers (MetaPerturb and baselines) across architectures and datasets.

    Typical use: `mpbench run suite=quickstart`, then `mpbench report suite=quickstart`.

    \b
    Exit codes: 0 success, 1 some run failed, 2 usage or preflight error (nothing was written),
    130 interrupted (rerun the same command to resume).
    """
    ctx.obj = {"debug": debug}


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("overrides", nargs=-1)
@click.option("--dry-run", is_flag=True, help="check and print the plan: every job, its state and the keys that vary "
                                            "between jobs; no training")
@click.option("--estimate/--no-estimate", default=True, show_default=True,
              help="with --dry-run: estimate device-hours from short probes of each distinct step (cached)")
@click.option("--cfg", "show_cfg", is_flag=True, help="print the fully resolved suite (every default filled in) and exit")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="with --dry-run: the plan as a table or as JSON")
@click.option("--force", is_flag=True, help="rerun runs that are already done")
@click.option("--retry-failed", is_flag=True, help="retry runs that failed in an earlier invocation")
@click.option("--fail-fast", is_flag=True, help="stop the suite at the first failed run")
@results_option
@click.option("--data", "data", type=click.Path(), default=None,
              help="dataset directory (default: env MPBENCH_DATA, else a user cache dir)")
def run(overrides: tuple[str, ...], dry_run: bool, estimate: bool, show_cfg: bool, fmt: str, force: bool, retry_failed: bool, fail_fast: bool,
        results: str | None, data: str | None) -> None:
    """Run a suite: `mpbench run suite=NAME [key=value ...]`.

    Every setting is a dotted key, e.g. train.steps=200 grid.seed=[0,1] grid.regularizer=[base,dropout]
    launcher.name=pool launcher.slots=2. Finished runs are skipped, so rerunning resumes a sweep. The whole plan
    (names, values, datasets, stage files, launcher, results dir) is checked before anything trains; --dry-run
    runs the same checks.

    \b
    Exit codes: 0 every job done, 1 some job failed (the summary says which and how to retry),
    2 usage or preflight error (nothing was written), 130 interrupted (rerun to resume).
    """
    from mpbench.fork import pin_driver

    pin_driver()                                   # before anything imports torch: pool workers can be forked from us
    from mpbench.config import load_suite, parse_overrides
    from mpbench.launchers import Request, run_plan, warm_up
    from mpbench.plan import expand
    from mpbench.preflight import preflight
    from mpbench.progress import SuiteProgress
    from mpbench.store import prepare_results_dir

    suite, rest = parse_overrides(list(overrides))
    if suite is None:
        raise UsageError("no suite given: `mpbench run suite=NAME` (see `mpbench list suites`)")
    cfg = load_suite(suite, rest)
    if show_cfg:
        from omegaconf import OmegaConf

        click.echo(OmegaConf.to_yaml(cfg), nl=False)
        return
    res, data_root = _results_dir(results), _data_dir(data)
    plan = preflight(cfg, res, data_root)
    if dry_run:
        _print_plan(plan, res, fmt, _estimate(plan, cfg) if estimate else None)
        return
    defined = expand(load_suite(suite, []), data_root, problems=[]) if rest else None   # for the suite's record
    res = prepare_results_dir(res)
    req = Request(plan, cfg, res, data_root, force=force, fail_fast=fail_fast, retry_failed=retry_failed,
                  overrides=rest, defined=defined)
    warm_up(req)                                   # e.g. the pool's workers, before the display's thread starts
    with SuiteProgress(len(plan.jobs), plan.suite, console=err_console) as prog:
        req.progress = prog
        outcomes = run_plan(req)
    err_console.print(prog.summary(), highlight=False)
    failed = [k for k, v in outcomes.items() if v == "failed"]
    stopped = [k for k, v in outcomes.items() if v in ("interrupted", "busy")]
    if stopped:
        err_console.print(f"{len(stopped)} not finished here (interrupted, or running in another process): "
                          f"rerun the same command to resume them", highlight=False)
    if failed:
        err_console.print(f"{len(failed)} failed: `mpbench status suite={plan.suite}` shows why; "
                          f"`mpbench run suite={suite} --retry-failed` retries them", highlight=False)
        sys.exit(1)


def _estimate(plan, cfg) -> dict:
    """Device-hours of the plan on the device (and threads per run) the launcher would use."""
    import torch

    from mpbench.estimate import estimate
    from mpbench.launchers import device_slots

    slots = device_slots(cfg.launcher.devices, cfg.launcher.slots)
    torch.set_num_threads(cfg.launcher.threads or max(1, (os.cpu_count() or 1) // len(slots)))
    device = torch.device("cpu" if slots[0] is None else "cuda:0")
    say = lambda p, i, n: err_console.print(f"probing step time {i}/{n}: {p.model} {p.image_size}px "  # noqa: E731
                                            f"{'+'.join(p.methods)} batch {p.batch}", highlight=False)
    return {**estimate(plan, device, say), "slots": len(slots)}


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 360 else f"{seconds / 60:,.1f} min"


def _print_plan(plan, results: Path, fmt: str, cost: dict | None = None) -> None:
    """Every job with its state and the spec keys that vary between jobs of its kind (and the estimate)."""
    from mpbench.plan import flatten, short_key, varying_keys

    kinds = list(dict.fromkeys(job.kind for job in plan.jobs))
    groups = {k: [j for j in plan.jobs if j.kind == k] for k in kinds}
    keys = {k: [key for key in varying_keys(jobs, skip=()) if not key.startswith("artifacts.")]
            for k, jobs in groups.items()}
    rows = []
    for job in plan.jobs:
        rd, flat = job.dir(results), flatten(job.spec)
        rows.append({"kind": job.kind, "id": job.id, "state": rd.state() if rd.path.exists() else "pending",
                     "needs": job.deps, "varying": {k: flat.get(k) for k in keys[job.kind]}})
    if fmt == "json":
        click.echo(json.dumps({"suite": plan.suite, "stages": len(plan.artifacts), "runs": len(plan.runs),
                               "jobs": rows, "estimate": cost}, indent=1, default=str))
        return
    for kind, jobs in groups.items():
        table = Table(title=f"{plan.suite}: {len(jobs)} {kind} job{'s' if len(jobs) > 1 else ''}")
        for col in ("state", *map(short_key, keys[kind]), "id"):
            table.add_column(col, overflow="fold")
        for row in rows:
            if row["kind"] == kind:
                table.add_row(row["state"], *("" if row["varying"][k] is None else str(row["varying"][k])
                                              for k in keys[kind]), row["id"])
        console.print(table)
    console.print(f"{len(plan.artifacts)} stage(s), {len(plan.runs)} run(s); jobs of a kind differ only in the keys "
                  f"shown (`--cfg` prints the whole resolved suite)", highlight=False)
    if cost:
        total = cost["total_s"]
        console.print(f"estimated (from {cost['probes']} probed step times, {cost['measured']} measured now) on "
                      f"{cost['device']}: {_hours(total)} of device time (stages {_hours(cost['stages_s'])}, runs "
                      f"{_hours(total - cost['stages_s'])}); about {_hours(total / cost['slots'])} wall on "
                      f"{cost['slots']} slot(s) if they do not slow each other", highlight=False)


@cli.command()
@click.argument("overrides", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="json: a list with one object per suite (counts per state, the jobs not done)")
@results_option
def status(overrides: tuple[str, ...], fmt: str, results: str | None) -> None:
    """Per suite: done / running / failed / pending runs; failed ones with their error line.

    `mpbench status [suite=NAME | suite=path/to/NAME.yaml]`: all suites in the results dir when none is given.
    """
    from mpbench.config import parse_overrides
    from mpbench.status import suite_status

    suite, rest = parse_overrides(list(overrides))
    if rest:
        raise UsageError(f"status takes only suite=NAME, got {rest[0]!r}")
    suite_status(_results_dir(results), suite, console, fmt)


@cli.command()
@click.argument("overrides", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["table", "latex", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write to FILE instead of stdout")
@click.option("--only-last", is_flag=True, help="only the runs of the suite's last `mpbench run` invocation")
@click.option("--invocation", default=None, metavar="ID", help="only the runs of this invocation (ids: `status`)")
@click.option("--reference", type=click.Path(dir_okay=False, exists=True), default=None, metavar="FILE",
              help="a paper's numbers (row,column,value,source CSV) to show each cell's difference to; default "
                   "<results>/paper/<suite>.csv when present")
@click.option("--wandb", "to_wandb", is_flag=True,
              help="also log the table as a W&B Table to a summary run of the suite's group (online with "
                   "credentials, else offline under <results>/wandb-reports)")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="the metric to tabulate (repeat for several tables, e.g. --metric acc --metric nll --metric ece); "
                   "default: the suite's report.metric")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="also write the paper figures (PNG and PDF) of the same runs to DIR: learning curves, reliability "
                   "diagrams, accuracy vs eps, per cell; each file written is listed on stderr")
@results_option
def report(overrides: tuple[str, ...], fmt: str, out: str | None, only_last: bool, invocation: str | None,
           reference: str | None, to_wandb: bool, metrics: tuple[str, ...], plot_dir: str | None,
           results: str | None) -> None:
    """Aggregate a suite's runs: mean and 95% CI over seeds, best mean bold, missing seeds marked.

    `mpbench report suite=NAME` (or suite=path/to/NAME.yaml) covers the suite as defined plus every run any
    invocation added; runs that differ in more than the seed get their own row, labelled with the keys that differ.
    """
    from mpbench.config import parse_overrides, suite_name
    from mpbench.report import build_report
    from mpbench.store import atomic_write

    suite, rest = parse_overrides(list(overrides))
    layout = {}
    for item in rest:
        key, value = item.split("=", 1)
        if key not in ("rows", "columns", "metric"):
            raise UsageError(f"report takes suite=, rows=, columns=, metric=; got {key!r}")
        layout[key] = value.strip("[]").split(",")
    wanted = list(metrics) + layout.pop("metric", [])
    res = _results_dir(results)
    if not res.is_dir():
        raise UsageError(f"no results dir {res}: run `mpbench run suite=NAME` first or pass --results DIR")
    texts = []
    for metric in wanted or [None]:
        text, skipped = build_report(res, suite_name(suite) if suite else None, fmt, only_last=only_last,
                                     invocation=invocation, reference=Path(reference) if reference else None,
                                     metric=metric, **layout)
        texts.append(text if fmt != "csv" or not texts else text.split("\n", 1)[1])   # csv: one header
    text = ("[" + ",\n".join(texts) + "]") if fmt == "json" and len(texts) > 1 else \
        ("" if fmt == "csv" else "\n").join(texts)
    if out:
        try:
            atomic_write(Path(out), text if text.endswith("\n") else text + "\n")
        except OSError as e:
            raise UsageError(f"cannot write {out}: {e.strerror or e}: check that its directory exists and is "
                             f"writable") from None
        err_console.print(f"wrote {out}", highlight=False)
    elif fmt == "table":
        console.print(text) if isinstance(text, str) else console.print(text)
    else:
        click.echo(text)
    for name, reason in skipped:
        err_console.print(f"skipped unreadable run dir {name}: {reason}", highlight=False)
    if plot_dir:                                   # the figures of the same runs (mpbench/figures.py)
        from mpbench.figures import write_figures

        files = write_figures(res, Path(plot_dir), suite_name(suite) if suite else None, only_last=only_last,
                              invocation=invocation, metric=(wanted or [None])[0], **layout)
        for path in files:
            err_console.print(str(path), highlight=False, markup=False, soft_wrap=True)
        if not files:
            err_console.print(f"no figures written to {plot_dir}: no done run has curves, reliability or robustness "
                              f"data", highlight=False, markup=False)
    if to_wandb:
        import io

        import pandas as pd

        from mpbench.wandb_sink import log_table

        long = pd.read_csv(io.StringIO(build_report(res, suite_name(suite) if suite else None, "csv",
                                                    only_last=only_last, invocation=invocation,
                                                    metric=(wanted or [None])[0], **layout)[0]))
        run_id = log_table(suite_name(suite) if suite else "all-runs", long, "auto", "mpbench", None,
                           res / "wandb-reports")
        err_console.print(f"W&B: the table is in run {run_id}" if run_id else "W&B: off (nothing logged)",
                          highlight=False)


@cli.command(name="list")
@click.argument("what", type=click.Choice(["regularizers", "models", "datasets", "suites", "evals", "jobs", "stages",
                                           "launchers"]))
@click.option("--sites", "sites_model", default=None, metavar="MODEL", help="with regularizers: insertion sites of MODEL")
@click.option("--format", "fmt", type=click.Choice(["table", "plain", "json"]), default=None,
              help="table (default on a terminal), plain: one tab-separated line per entry (default when piped), "
                   "json: a list of objects with the same fields")
def list_(what: str, sites_model: str | None, fmt: str | None) -> None:
    """List registered regularizers, models, datasets or suites with one-line descriptions.

    Piped output is one unwrapped line per entry, so `mpbench list regularizers | grep dropout | cut -f1` works.
    """
    from mpbench.listing import list_registry

    list_registry(what, console, sites_model, fmt)


@cli.group()
def data() -> None:
    """Prepare and verify datasets (offline: from installed packages or files you place)."""


@data.command("prepare")
@click.argument("name")
@click.option("--data", "root", type=click.Path(), default=None, help="dataset directory")
@click.option("--from", "sources", type=click.Path(), multiple=True, metavar="PATH",
              help="datasets: import this downloaded archive (zip, tar, tgz) or folder into the data dir (give it "
                   "once per archive for datasets with several); assets: copy this downloaded file (checked: "
                   "sha256, parses) instead of downloading")
def data_prepare(name: str, root: str | None, sources: tuple[str, ...]) -> None:
    """Make dataset or asset NAME available offline (or print how to get it).

    Datasets: --from imports the archives or folders you downloaded (`mpbench list datasets` says which) into the
    data dir, checks published md5s, then verifies counts. Assets (e.g. metaperturb_official, the authors' phi)
    are downloaded unless MPBENCH_OFFLINE=1 is set, or copied from --from FILE."""
    from mpbench import assets
    from mpbench.data import DATASETS

    if name in assets.ASSETS:
        if len(sources) > 1:
            raise UsageError(f"--from is given {len(sources)} times: asset {name} is one file; give --from once")
        msg = assets.prepare(name, Path(root) if root else None, Path(sources[0]) if sources else None)
    else:
        dataset = assets.dataset_or_asset(name, DATASETS)()
        # a plugin written before --from existed may define prepare(root) only
        msg = dataset.prepare(_data_dir(root), [Path(s) for s in sources]) if sources else \
            dataset.prepare(_data_dir(root))
    console.print(msg, highlight=False, markup=False, soft_wrap=True)


@data.command("verify")
@click.argument("name")
@click.option("--data", "root", type=click.Path(), default=None, help="dataset directory")
def data_verify(name: str, root: str | None) -> None:
    """Check that dataset or asset NAME's files are present, match published checksums and decode to the expected
    counts per split (decoded JPEG sets: and every class in each split); assets: sha256."""
    from mpbench import assets
    from mpbench.data import DATASETS

    if name in assets.ASSETS:
        msg = assets.verify(name, Path(root) if root else None)
    else:
        msg = assets.dataset_or_asset(name, DATASETS)().verify(_data_dir(root))
    console.print(msg, highlight=False, markup=False, soft_wrap=True)


from mpbench.cli_bench import bench  # noqa: E402  (the subcommand group lives in its own module)

cli.add_command(bench)


def main() -> None:
    args = sys.argv[1:]
    debug = "--debug" in args
    if debug:                                        # a group option, accepted after the subcommand too
        args = ["--debug", *(a for a in args if a != "--debug")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        code = cli.main(args=args, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):     # click turns Ctrl-C (and a launcher's stop) into Abort
            _interrupted(e.__cause__)
        err_console.print("aborted", highlight=False)
        sys.exit(130)
    except click.ClickException as e:
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        err_console.print(f"error: {e.format_message()}{where}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code if e.exit_code else 2)
    except MpbenchError as e:
        if debug:
            traceback.print_exc()
        for line in str(e).splitlines() or [type(e).__name__]:
            err_console.print(f"error: {line}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        err_console.print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", soft_wrap=True,
                          highlight=False, markup=False)
        sys.exit(1)


def _interrupted(e: KeyboardInterrupt) -> None:
    """Exit 128 + the signal's number (130 for a plain Ctrl-C) after one line: what stopped, and how to resume.

    A launcher's ``mpbench.runner.Stopped`` names the signal and the runs it checkpointed."""
    code = getattr(e, "exit_code", 130)
    what = str(e) if hasattr(e, "exit_code") else "interrupted"
    try:
        err_console.print(f"{what}: rerun the same command to resume", highlight=False, markup=False, soft_wrap=True)
    except OSError:                                # a closed terminal (SIGHUP): the exit code still says it
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
