"""Benchmarks of mpbench's own run loop: ``loop`` (a train_loop step vs a bare PyTorch step on the same model, batch
and optimizer) and ``regularizers`` (each method's step time over ``base`` on one architecture). Both alternate the
variants step by step in one process, so a busy machine slows them alike, and report medians of per-step times."""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

import mpbench.models  # noqa: F401
from mpbench.data import ImageData
from mpbench.malloc import tune_for_training
from mpbench.regularization import REGULARIZERS, RunContext, build_stack, resolve_hparams
from mpbench.train import Setup, Stepper, lr_factor


def _spec(methods: list[str], model: str, batch: int, steps: int) -> dict[str, Any]:
    return {"regularizer": methods, "model": model, "model_kwargs": {}, "dataset": "bench", "seed": 0,
            "data": {}, "artifacts": {}, "reg": {m: resolve_hparams(m, {}) for m in methods},
            "train": {"steps": steps, "batch_size": batch, "optimizer": "adam", "lr": 1e-3, "weight_decay": 5e-4,
                      "momentum": 0.9, "schedule": "multistep", "milestones": [0.4, 0.7, 0.9], "gamma": 0.3,
                      "eval_every": 0, "eval_batch_size": batch, "eval_passes": 1, "final_eval_passes": 1,
                      "augment": {"crop_pad": 0, "flip": False}}}


def fake_artifacts(kinds: tuple[str, ...], model: str, in_chans: int, root: Path) -> dict[str, Path]:
    """Stand-in stage outputs (random weights) for timing methods that need a pretrain or metatrain artifact."""
    from mpbench.store import save_tensors

    out = {}
    for kind in kinds:
        d = root / kind
        d.mkdir(parents=True, exist_ok=True)
        if kind == "pretrain":
            save_tensors(d / "model.pt", timm.create_model(model, num_classes=10, in_chans=in_chans).state_dict())
            (d / "artifact.json").write_text(json.dumps({"kind": kind, "id": "bench", "num_classes": 10,
                                                         "spec": {"model": model, "dataset": "bench"}}))
        elif kind == "metatrain":
            from regularizers.metaperturb import PerturbFunction

            save_tensors(d / "phi.pt", PerturbFunction(num_sites=1, channel_norm=64, spatial_norm=32).phi_state_dict())
        out[kind] = d
    return out


def probe_setup(methods: list[str], model: str, batch: int, size: int, steps: int, device: torch.device,
                tmp: Path, n: int = 2048, classes: int = 10) -> tuple[Setup, dict[str, Any]]:
    """A run of ``methods`` on ``model`` over random ``size`` px images, with stand-in stage outputs."""
    torch.manual_seed(0)
    data = ImageData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n) % classes, classes)
    spec = _spec(methods, model, batch, steps)
    net = timm.create_model(model, num_classes=classes, in_chans=3)
    kinds = tuple(k for m in methods for k in REGULARIZERS.get(m).requires_for(spec["reg"][m]))
    ctx = RunContext(spec=spec, model_name=model, num_classes=classes, in_chans=3, image_size=size,
                     total_steps=steps, num_train=n, device=device,
                     artifacts=fake_artifacts(kinds, model, 3, tmp / "_".join(methods)))
    stack = build_stack(methods, spec["reg"], ctx)
    for member in stack.members:
        member.check(net, ctx)
    stack.attach(net)
    net.to(device)
    return Setup(net, stack, ctx, data.images, data.labels, data.images[:batch], data.labels[:batch], classes), spec


def interleaved_medians(fns: dict[str, Any], warmup: int, steps: int
                        ) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and process-CPU seconds per call of each function, calling them in turn step after step so
    that a busy machine slows them alike (warm-up calls dropped). A function on a GPU synchronises before returning."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + steps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if i >= warmup:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _bare_step(setup: Setup, spec: dict[str, Any], device: torch.device):
    """The same model, optimizer, schedule and batch size in the plainest PyTorch loop."""
    t = spec["train"]
    model = setup.model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=t["lr"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(t))
    x = ((setup.train_x[:t["batch_size"]].float() / 255 - 0.5) / 0.5).to(device)
    y = setup.train_y[:t["batch_size"]].to(device)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        sync_device(device)

    return step


def sync_device(device: torch.device) -> None:
    """Wait for the GPU's queued work (timings of CUDA steps); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def probe_step(setup: Setup, spec: dict[str, Any], device: torch.device):
    """One step exactly as train_loop takes it (Stepper + the loop's per-step loss read-out)."""
    return timed_step(Stepper(setup, spec, device), device)


def timed_step(stepper: Stepper, device: torch.device):
    """A call that takes ``stepper``'s next step, reads the loss out (one host sync, as train_loop) and waits."""
    count = iter(range(10 ** 9))

    def step() -> None:
        total, _, _ = stepper.step(next(count))
        float(total)
        sync_device(device)

    return step


def bench_loop(model: str = "resnet20", batch: int = 128, size: int = 32, threads: int = 2, steps: int = 20,
               device: str = "cpu", warmup: int = 3) -> dict[str, Any]:
    """mpbench's run loop vs a bare loop (goal: <= 1.03x), alternating step by step. Augmentation off in both."""
    torch.set_num_threads(threads)
    tune_for_training()                      # as every training run does (mpbench.malloc)
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        setup, spec = probe_setup(["base"], model, batch, size, steps, dev, Path(tmp))
        setup.model.train()
        fns = {"mpbench": probe_step(setup, spec, dev), "bare": _bare_step(setup, spec, dev)}
        med, _ = interleaved_medians(fns, warmup, steps)
    m_loop, m_bare = med["mpbench"], med["bare"]
    return {"setup": f"{model}, batch {batch}, {size}px, Adam, {threads} threads, {device}, median of {steps} "
                     f"interleaved steps", "bare ms/step": round(1000 * m_bare, 2),
            "mpbench ms/step": round(1000 * m_loop, 2), "ratio": round(m_loop / m_bare, 3)}


def bench_regularizers(model: str = "resnet20", batch: int = 128, size: int = 32, threads: int = 2,
                       steps: int = 10, device: str = "cpu", warmup: int = 2,
                       methods: list[str] | None = None) -> dict[str, Any]:
    """Step time of each method relative to ``base`` on the same network, alternating method by method each step."""
    torch.set_num_threads(threads)
    tune_for_training()                      # as every training run does (mpbench.malloc)
    dev = torch.device(device)
    methods = methods or [n for n in REGULARIZERS.names() if not n.startswith("test_")]
    skipped = {}
    with tempfile.TemporaryDirectory() as tmp:
        fns = {}
        for m in methods:
            try:
                setup, spec = probe_setup([m], model, batch, size, warmup + steps, dev, Path(tmp))
                setup.model.train()
                fns[m] = probe_step(setup, spec, dev)
            except Exception as e:  # noqa: BLE001 - an incompatible method is reported, not fatal
                skipped[m] = str(e).splitlines()[0]
        med, _ = interleaved_medians(fns, warmup, steps)
    base = med["base"]
    out: dict[str, Any] = {"setup": f"{model}, batch {batch}, {size}px, Adam, {threads} threads, {device}, median "
                                    f"of {steps} interleaved steps", "base ms/step": round(1000 * base, 2)}
    for m in fns:
        out[m] = f"{1000 * med[m]:.2f} ms/step  ratio {med[m] / base:.2f}x"
    out.update({m: f"skipped: {why}" for m, why in skipped.items()})
    return out
