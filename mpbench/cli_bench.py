"""``mpbench bench``: speed and scheduling benchmarks, one subcommand each (no timing assert lives in a test).

Each subcommand prints its exact settings with its figures; step-time benchmarks measure their variants
interleaved in one process so that the machine's load affects them alike.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import click

SLOT_COUNTS = (1, 2, 4, 8)          # bench packing's slot counts and bench seedarray's array sizes


def _step_options(fn: Callable) -> Callable:
    """The options of the step-time benchmarks: model, batch, image size, threads, steps, device."""
    for opt in reversed([
        click.option("--model", default="resnet20", show_default=True),
        click.option("--batch", default=128, show_default=True),
        click.option("--size", default=32, show_default=True, help="image size in pixels"),
        click.option("--threads", default=2, show_default=True, help="torch intra-op threads"),
        click.option("--steps", default=20, show_default=True, help="measured steps per variant (interleaved)"),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda"),
        click.option("--malloc-tune/--no-malloc-tune", default=True, show_default=True,
                     help="keep freed memory in the process as training runs do (mpbench.malloc; "
                          "MPBENCH_MALLOC_TUNE=0)"),
    ]):
        fn = opt(fn)
    return fn


def _malloc(tune: bool) -> None:
    if not tune:
        os.environ["MPBENCH_MALLOC_TUNE"] = "0"


@click.group(context_settings={"max_content_width": 120})
def bench() -> None:
    """Speed and scheduling benchmarks (`mpbench bench NAME --help`: settings)."""


@bench.command()
@_step_options
@click.option("--impl", multiple=True, type=click.Choice(["fast", "pytorch", "triton", "reference", "release"]),
              help="implementation(s) to time (default: fast and reference); fast uses the native CPU kernels "
                   "where they build and Triton's on CUDA, pytorch is fast without them, triton forces Triton's")
@click.option("--channels-last", is_flag=True, help="run every variant in channels_last")
def metaperturb(model: str, batch: int, size: int, threads: int, steps: int, device: str, malloc_tune: bool,
                impl: tuple[str, ...], channels_last: bool) -> None:
    """Base vs MetaPerturb ms/step and their ratio."""
    from mpbench.bench import bench_metaperturb

    _malloc(malloc_tune)
    bench_metaperturb(model, batch, size, threads, steps, impls=impl or ("fast", "reference"),
                      channels_last=channels_last, device=device, malloc_tune=malloc_tune)


def _print_rows(rows: dict[str, Any]) -> None:
    for k, v in rows.items():
        click.echo(f"{k:>22}: {v}")


@bench.command()
@_step_options
def loop(model: str, batch: int, size: int, threads: int, steps: int, device: str, malloc_tune: bool) -> None:
    """mpbench's run loop vs a bare PyTorch loop.

    Same model, batch and optimizer."""
    from mpbench.bench_loop import bench_loop

    _malloc(malloc_tune)
    _print_rows(bench_loop(model=model, batch=batch, size=size, threads=threads, steps=steps, device=device))


@bench.command()
@_step_options
def regularizers(model: str, batch: int, size: int, threads: int, steps: int, device: str,
                 malloc_tune: bool) -> None:
    """Every registered method's ms/step relative to base."""
    from mpbench.bench_loop import bench_regularizers

    _malloc(malloc_tune)
    _print_rows(bench_regularizers(model=model, batch=batch, size=size, threads=threads, steps=steps,
                                   device=device))


@bench.command()
@_step_options
@click.option("--method", default="base", show_default=True, help="the regularizer of the timed run")
@click.option("--variant", "variants", multiple=True, metavar="NAME",
              help="time only these variants (default: all; eager is always timed)")
def throughput(model: str, batch: int, size: int, threads: int, steps: int, device: str, malloc_tune: bool,
               method: str, variants: tuple[str, ...]) -> None:
    """ms/step and images/s under each execution option vs eager."""
    from mpbench.bench_throughput import bench_throughput, format_table, pick_variants

    _malloc(malloc_tune)
    click.echo(format_table(bench_throughput(model, method, batch, size, threads, steps, device,
                                             variants=pick_variants(variants))))


@bench.command()
@click.option("--runs", default=16, show_default=True, help="equal runs in the suite")
@click.option("--slots", default=2, show_default=True, help="pool slots (CPU)")
@click.option("--steps", type=int, default=None, help="steps per run  [default: 800]")
@click.option("--threads", type=int, default=None, help="threads per slot  [default: cores / slots]")
@click.option("--per-job-process", is_flag=True,
              help="a fresh worker process per job (the pool launcher before persistent workers)")
def makespan(runs: int, slots: int, steps: int | None, threads: int | None, per_job_process: bool) -> None:
    """Makespan of equal runs on pool slots vs the ideal.

    Ideal: the sum of the runs' times / slots. 1.00x: no slot was ever idle; above it: the workers' start-up and the hand-over between jobs."""
    from mpbench.bench_makespan import bench_makespan

    bench_makespan(runs, slots, steps=steps, threads=threads, per_job_process=per_job_process)


@bench.command()
@click.option("--slots", "slot_counts", type=int, multiple=True,
              help=f"slot counts to measure (repeatable)  [default: {', '.join(map(str, SLOT_COUNTS))}]")
@click.option("--runs", type=int, default=None, help="runs per measurement  [default: the largest slot count]")
@click.option("--steps", type=int, default=None, help="steps per run  [default: 300 on a GPU, 10 on the CPU]")
@click.option("--model", default="resnet20", show_default=True)
@click.option("--size", default=32, show_default=True, help="image size in pixels")
@click.option("--batch", default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (one device, shared)")
@click.option("--threads", type=int, default=None, help="threads per slot  [default: cores / slots]")
@click.option("--mps/--no-mps", default=True, show_default=True,
              help="on a GPU, also measure under CUDA MPS (when nvidia-cuda-mps-control exists)")
def packing(slot_counts: tuple[int, ...], runs: int | None, steps: int | None, model: str, size: int, batch: int,
            device: str, threads: int | None, mps: bool) -> None:
    """Runs/hour with 1-8 runs sharing one device (and MPS).

    The same suite of equal runs with launcher.slots runs at once on one device, against one at a time."""
    from mpbench.bench_packing import bench_packing, format_table

    click.echo(format_table(bench_packing(slot_counts or SLOT_COUNTS, runs, steps, model, size, batch, device,
                                          threads, mps)))


@bench.command()
@_step_options
@click.option("--seeds", "array_sizes", type=int, multiple=True,
              help="array sizes K to time (repeatable)  [default: 1, 2, 4, 8]")
def seedarray(model: str, batch: int, size: int, threads: int, steps: int, device: str, malloc_tune: bool,
              array_sizes: tuple[int, ...]) -> None:
    """K seeds trained as one vmapped array vs K runs in sequence.

    mpbench.seed_array: the runs of one spec that differ only by seed, stacked (torch.func); speed-up = K x the
    plain run's ms/step / the array's."""
    from mpbench.bench_seed_array import bench_seed_array, format_table
    from mpbench.errors import UsageError

    if any(k < 1 for k in array_sizes):
        raise UsageError("bench seedarray: --seeds takes positive array sizes, e.g. --seeds 1 --seeds 4")
    _malloc(malloc_tune)
    click.echo(format_table(bench_seed_array(model, batch, size, array_sizes or SLOT_COUNTS, steps, device,
                                             threads)))
