"""Execution options: how a run's training step executes, never what it computes (the suite's ``execution:``).

Each option is off by default (none is guaranteed to reproduce eager's numbers bit for bit, so none is on unasked):

===================  =====================================================================  =========================
option               what it does                                                           numbers vs eager
===================  =====================================================================  =========================
``channels_last``    model weights and training batches in NHWC                             fp32 rounding (other
                                                                                            conv algorithms)
``cudnn_benchmark``  cuDNN autotunes its conv algorithms (CUDA only)                        fp32 rounding
``fused_adam``       torch's fused Adam kernel (``Adam(fused=True)``; CPU and CUDA)         fp32 rounding
``autocast``         ``none`` | ``bf16``: forward and loss under bfloat16 autocast;         **changes the numbers'
                     BatchNorm and MetaPerturb's perturbation still run in float32          distribution** (bf16
                     (their inputs are cast up, autocast is off inside them), the loss is   convolutions and
                     computed on float32 logits, no grad scaler (bf16 has fp32's range)     matmuls)
``compile``          ``torch.compile`` of the model's training forward (``compile_mode``);  fp32 rounding (fusions)
                     random ops keep eager's generator (inductor's ``fallback_random``)
``cuda_graph``       the whole training step (augmentation, forward, loss, backward, Adam)  fp32 rounding (capturable
                     captured once in a CUDA graph and replayed; evaluation stays outside   Adam's bias correction
                     (CUDA only; methods must declare ``Regularizer.graph_safe``)          on the device)
``seed_array``       runs of one wave that differ only by seed train as one vmapped model   fp32 rounding (tests/
                     (mpbench/seed_array.py, at most ``seed_array_max`` seeds), each still  test_seed_array.py);
                     its own run (directory, result, W&B run); eager step                   the other options off
===================  =====================================================================  =========================

Identity: execution options are not part of a run's identity (its spec hash), as the launcher's settings are not:
a run trained with them is the same run. That holds for every option above except ``autocast=bf16``, which changes
the distribution of the numbers slightly; it is therefore off by default, recorded in ``result.json`` like every
option, and should stay off for results until shown equal in accuracy on a real target (runs that differ only by
it would share one run directory).

What ran is recorded in ``result.json`` under ``execution``: ``requested`` (every option as the suite set it),
``applied`` (the options in effect), ``fallbacks`` (each requested option that could not apply, with the reason:
the device, the method, a missing compiler, a capture that failed) and ``notes``. An option that cannot apply never
fails a run: it falls back to eager and says so.

CUDA graphs: the first :data:`GRAPH_WARMUP` steps run eagerly (on a side stream, as capture requires), then the
step is captured once and replayed for every later step. What stays on the host each step: the regularizers'
``begin_step``, the batch stream's random draws (the same CPU generator and the same draws as
:class:`mpbench.batches.BatchStream`, so the batches are the same), the schedule's learning rate (written into a
device tensor the graph reads) and the finite-loss check, which therefore fires after that step's update (eager:
before it). Methods with host-side work inside the step (numpy or Python randomness, ``.item()``, per-step Python
values such as an annealed coefficient, data-dependent shapes) set ``graph_safe = False`` and run eagerly.
"""
from __future__ import annotations

import contextlib
import shutil
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mpbench.batches import standardise
from mpbench.config import AUTOCAST_MODES, COMPILE_MODES
from mpbench.errors import RunFailed, UsageError, did_you_mean

DEFAULTS: dict[str, Any] = {"channels_last": False, "cudnn_benchmark": False, "fused_adam": False,
                            "autocast": "none", "compile": False, "compile_mode": "default", "cuda_graph": False,
                            "seed_array": False, "seed_array_max": 16}
_CUDNN_BENCHMARK = torch.backends.cudnn.benchmark     # the process's own setting (runs without the option)
GRAPH_WARMUP = 3            # eager steps before the capture (lazy state: optimizer moments, cuDNN plans, compile)


def resolve(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The defaults updated with ``options`` (a suite's ``execution`` section or a worker's dict), checked."""
    out = dict(DEFAULTS)
    for k, v in dict(options or {}).items():
        if k not in DEFAULTS:
            raise UsageError(f"unknown execution option {k!r}: {did_you_mean(k, list(DEFAULTS))}")
        out[k] = v
    for k in ("channels_last", "cudnn_benchmark", "fused_adam", "compile", "cuda_graph", "seed_array"):
        if not isinstance(out[k], bool):
            raise UsageError(f"execution.{k} must be true or false, got {out[k]!r}")
    if isinstance(out["seed_array_max"], bool) or not isinstance(out["seed_array_max"], int) or \
            out["seed_array_max"] < 2:
        raise UsageError(f"execution.seed_array_max must be an integer >= 2, got {out['seed_array_max']!r}")
    if out["autocast"] not in AUTOCAST_MODES:
        raise UsageError(f"execution.autocast={out['autocast']!r} is not valid: "
                         f"{did_you_mean(str(out['autocast']), AUTOCAST_MODES)}")
    if out["compile_mode"] not in COMPILE_MODES:
        raise UsageError(f"execution.compile_mode={out['compile_mode']!r} is not valid: "
                         f"{did_you_mean(str(out['compile_mode']), COMPILE_MODES)}")
    return out


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on ``device`` here, or None."""
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx[-1] if isinstance(inductor_config.cpp.cxx, tuple) else inductor_config.cpp.cxx
        if not any(shutil.which(c) for c in (cxx or "g++", "g++", "c++", "clang++") if c):
            return "no C++ compiler on this machine (inductor's CPU backend needs one: install g++)"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor's CUDA backend needs it)"
    return f"inductor does not target device {device.type}"


def _fused_supported(device: torch.device) -> bool:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def float32_forward(inner: Callable[..., torch.Tensor], device_type: str) -> Callable[..., torch.Tensor]:
    """``inner`` (a module's forward) run in float32 under autocast: its input cast up, autocast off inside it."""

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_autocast_enabled(device_type):
            return inner(x, *args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return inner(x.float(), *args, **kwargs)

    return forward


def _float32_modules(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers and MetaPerturb's perturbation sites: what autocast must leave in float32."""
    kinds: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)
    try:
        from regularizers.metaperturb import PerturbSite

        kinds += (PerturbSite,)
    except ImportError:                               # a plain install without the regularizers package
        pass
    return [m for m in model.modules() if isinstance(m, kinds)]


class StepExecution:
    """The execution options of one run, decided for its device, method and optimizer, and applied to its
    :class:`mpbench.train.Stepper`; :meth:`record` is what ``result.json`` keeps under ``execution``."""

    def __init__(self, options: Mapping[str, Any] | None, device: torch.device, stack: Any,
                 train: Mapping[str, Any]):
        self.requested = resolve(options)
        self.device = device
        self.applied: dict[str, Any] = {}
        self.fallbacks: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self._restore: list[Callable[[], None]] = []
        o, cuda = self.requested, device.type == "cuda"
        if o["channels_last"]:
            self.applied["channels_last"] = True
        if o["cudnn_benchmark"]:
            if cuda and torch.backends.cudnn.is_available():
                self.applied["cudnn_benchmark"] = True
            else:
                self.fallbacks["cudnn_benchmark"] = f"cuDNN runs on CUDA devices only (device {device.type})"
        if o["fused_adam"]:
            if train.get("optimizer", "adam") != "adam":
                self.fallbacks["fused_adam"] = f"train.optimizer={train.get('optimizer')}: fused_adam applies to Adam"
            elif _fused_supported(device):
                self.applied["fused_adam"] = True
            else:
                self.applied["fused_adam"] = "foreach"
                self.notes["fused_adam"] = f"no fused Adam kernel for {device.type}: the foreach kernels ran"
        if o["autocast"] == "bf16":
            if cuda and not torch.cuda.is_bf16_supported():
                self.fallbacks["autocast"] = f"{torch.cuda.get_device_name(device)} has no bfloat16 support"
            else:
                self.applied["autocast"] = "bf16"
                self.notes["autocast"] = ("bf16 changes the numbers' distribution; BatchNorm and MetaPerturb's "
                                          "perturbation ran in float32, the loss on float32 logits")
        if o["compile"]:
            why = compile_unavailable(device)
            if why:
                self.fallbacks["compile"] = why
            else:
                self.applied["compile"] = o["compile_mode"]
        if o["cuda_graph"]:
            why = self._graph_unavailable(stack, train)
            if why:
                self.fallbacks["cuda_graph"] = f"{why}: the step ran eagerly"
            else:
                self.applied["cuda_graph"] = True
                self.notes["cuda_graph"] = (f"Adam capturable (bias correction on the device in float32); steps "
                                            f"before the capture: {GRAPH_WARMUP} (eager)")

    def _graph_unavailable(self, stack: Any, train: Mapping[str, Any]) -> str | None:
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device (device {self.device.type})"
        if not getattr(stack, "graph_safe", True):                 # RegularizerStack.graph_safe
            unsafe = [m.name for m in stack.members if not m.graph_safe]
            return (f"{', '.join(unsafe)} {'is' if len(unsafe) == 1 else 'are'} not graph-safe (host-side work or "
                    f"per-step Python values inside the step, which a graph would freeze)")
        if train.get("optimizer", "adam") != "adam":
            return f"train.optimizer={train.get('optimizer')}: only Adam is captured (capturable, tensor learning rate)"
        if self.requested["compile"] and self.requested["compile_mode"] in ("reduce-overhead", "max-autotune"):
            return f"compile_mode={self.requested['compile_mode']} captures its own CUDA graphs"
        return None

    # ---- what the Stepper asks ---------------------------------------------------------------------------------
    @property
    def channels_last(self) -> bool:
        return bool(self.applied.get("channels_last"))

    @property
    def graph(self) -> bool:
        return bool(self.applied.get("cuda_graph"))

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of ``torch.optim.Adam`` (none for SGD)."""
        kw: dict[str, Any] = {}
        fused = self.applied.get("fused_adam")
        if fused is True:
            kw["fused"] = True
        elif fused == "foreach":
            kw["foreach"] = True
        if self.graph:
            kw["capturable"] = True
            if not fused:
                kw["foreach"] = True
        return kw

    def prepare_model(self, model: nn.Module) -> None:
        """Process-wide settings, the model's memory format and autocast's float32 sites (before the optimizer)."""
        if self.device.type == "cuda":    # set for every CUDA run, so a failed run's setting never carries over
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = bool(self.applied.get("cudnn_benchmark")) or _CUDNN_BENCHMARK
            self._restore.append(lambda: setattr(torch.backends.cudnn, "benchmark", before))
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.applied.get("autocast"):
            for m in _float32_modules(model):
                m.forward = float32_forward(m.forward, self.device.type)   # keys, class unchanged

    def forward(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The training forward: the model itself, or its compiled form (``model``'s state_dict keys unchanged).
        A compiler failure at the first call falls back to the eager model and is recorded."""
        mode = self.applied.get("compile")
        if not mode:
            return model
        from torch import _inductor

        compiled = torch.compile(model, options={**_inductor.list_mode_options(mode), "fallback_random": True})
        chosen: list[Callable[[torch.Tensor], torch.Tensor]] = []

        def fwd(x: torch.Tensor) -> torch.Tensor:
            if chosen:
                return chosen[0](x)
            try:
                out = compiled(x)
            except Exception as e:  # noqa: BLE001 - compiling failed (before the compiled code ran): eager
                self.applied.pop("compile", None)
                self.fallbacks["compile"] = (f"compilation failed ({type(e).__name__}: "
                                             f"{(str(e).splitlines() or [''])[0][:200]}): the step ran eagerly")
                chosen.append(model)
                return model(x)
            chosen.append(compiled)
            return out

        return fwd

    def autocast(self, capturing: bool = False) -> contextlib.AbstractContextManager:
        if not self.applied.get("autocast"):
            return contextlib.nullcontext()
        # no weight cache inside a CUDA graph capture (the cache would outlive the captured region)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not capturing)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def fit_optimizer(self, opt: torch.optim.Optimizer, flags: Mapping[str, Any]) -> None:
        """After ``opt.load_state_dict``: this run's kernel flags (a checkpoint restores the saving run's), the
        learning rate as a device tensor where the graph reads it, ``step`` counters where the kernels want them."""
        for g in opt.param_groups:
            g.update(flags)
            if self.graph and not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=self.device)
            elif not self.graph and isinstance(g["lr"], torch.Tensor):
                g["lr"] = float(g["lr"])
            on_device = bool(g.get("capturable") or g.get("fused"))
            for p in g["params"]:
                st = opt.state.get(p, {})
                if isinstance(st.get("step"), torch.Tensor):
                    st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)

    def close(self) -> None:
        """Put back the process-wide settings (a local launcher runs the next job in this process)."""
        while self._restore:
            self._restore.pop()()

    def record(self) -> dict[str, Any]:
        return {"requested": dict(self.requested), "applied": dict(self.applied), "fallbacks": dict(self.fallbacks),
                "notes": dict(self.notes)}


def unused_record(options: Mapping[str, Any] | None, why: str) -> dict[str, Any]:
    """``execution`` of a job whose kind does not take training steps through the Stepper (e.g. meta-training)."""
    req = resolve(options)
    return {"requested": req, "applied": {}, "fallbacks": {k: why for k, v in req.items()
                                                            if v != DEFAULTS[k] and k not in ("compile_mode",
                                                                                               "seed_array_max")},
            "notes": {}}


def optimizer_state_for_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with device-tensor learning rates as floats (a checkpoint loads anywhere)."""
    groups = [{**g, "lr": float(g["lr"])} if isinstance(g.get("lr"), torch.Tensor) else g
              for g in state["param_groups"]]
    return {**state, "param_groups": groups}


# ---- batches drawn on the host, made on the device (what a CUDA graph replays) ------------------------------------

def draw(stream: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The host-side random draws of ``stream.next()`` (indices, crop shifts, flip mask), consuming its generator
    and advancing its position exactly as ``next()`` does (``tests/test_execution.py`` checks they stay equal)."""
    if stream.pos + stream.batch_size > len(stream.order):
        stream.order = torch.randperm(len(stream.labels), generator=stream.gen)
        stream.pos = 0
        stream.epoch += 1
    idx = stream.order[stream.pos:stream.pos + stream.batch_size]
    stream.pos += stream.batch_size
    b = len(idx)
    shifts = mask = None
    if stream.crop_pad or stream.flip:
        if stream.crop_pad > 0:
            shifts = torch.randint(0, 2 * stream.crop_pad + 1, (2, b), generator=stream.gen)
        if stream.flip:
            mask = torch.rand(b, generator=stream.gen) < 0.5
    return idx, shifts, mask


def make_batch(stream: Any, idx: torch.Tensor, shifts: torch.Tensor | None,
               mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of those draws, computed on the device of ``idx`` (the ops of BatchStream.next and
    mpbench.batches.random_crop_flip, in the same order)."""
    x = stream.images[idx].float() / 255.0
    if shifts is not None:
        b, c, h, w = x.shape
        pad, dev = stream.crop_pad, x.device
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = (shifts[0][:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (shifts[1][:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
               rows, cols]
    if mask is not None:
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return standardise(x), stream.labels[idx]


class GraphStep:
    """The whole training step of a :class:`mpbench.train.Stepper` in one CUDA graph.

    ``step(i)`` returns that step's ``(total, batch, terms)``, or None while the step must run eagerly (the warm-up
    steps, done here on a side stream, or after a failed capture, recorded in the execution's fallbacks).
    ``capture=False`` runs the captured body eagerly instead (the static buffers, the staged batch, the device
    learning rate; what tests check on a CPU)."""

    def __init__(self, stepper: Any, capture: bool = True, warmup: int = GRAPH_WARMUP):
        self.st, self.capture, self.warmup_left = stepper, capture, warmup
        self.ex: StepExecution = stepper.execution
        stream, dev = stepper.stream, stepper.device
        b = stream.batch_size
        self.idx = torch.zeros(b, dtype=torch.long, device=dev)
        self.shifts = torch.zeros(2, b, dtype=torch.long, device=dev) if stream.crop_pad > 0 else None
        self.mask = torch.zeros(b, dtype=torch.bool, device=dev) if stream.flip else None
        self.side = torch.cuda.Stream(dev) if capture else None
        self.graph: Any = None
        self.out: tuple[torch.Tensor, int, dict[str, torch.Tensor]] | None = None
        self.failed = False
        self.replays = 0                              # steps taken through the graph (or its body, capture=False)

    def _stage(self, step: int) -> None:
        self.st.s.stack.begin_step(step)
        idx, shifts, mask = draw(self.st.stream)
        self.idx.copy_(idx)
        if self.shifts is not None:
            self.shifts.copy_(shifts)
        if self.mask is not None:
            self.mask.copy_(mask)

    def _body(self, step: int, capturing: bool) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        x, y = make_batch(self.st.stream, self.idx, self.shifts, self.mask)
        total, loss, penalties, x = self.st.forward_loss(x, y, capturing=capturing)
        self.st.update(total)
        terms = {"cross_entropy": loss.detach(), **{k: v.detach() for k, v in penalties.items()}}
        return total.detach(), x.shape[0], terms

    def step(self, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]] | None:
        if self.failed:
            return None
        if self.warmup_left > 0:
            self.warmup_left -= 1
            if self.side is None:
                return None
            self.side.wait_stream(torch.cuda.current_stream(self.st.device))
            with torch.cuda.stream(self.side):
                out = self.st.eager_step(step)
            torch.cuda.current_stream(self.st.device).wait_stream(self.side)
            return out
        self._stage(step)
        if not self.capture:
            out = self._body(step, capturing=False)
        elif self.graph is None:
            try:
                self._capture(step)
            except Exception as e:  # noqa: BLE001 - a step that cannot be captured runs eagerly, recorded
                return self._give_up(step, e)
            self.ex.notes["cuda_graph"] += f"; captured at step {step}"
            self.graph.replay()
            out = self.out
        else:
            self.graph.replay()
            out = self.out
        total, batch, terms = out
        self.replays += 1
        self.st.sched.step()
        if not torch.isfinite(total):
            bad = [k for k, v in terms.items() if not torch.isfinite(v)]
            raise RunFailed(f"non-finite loss ({', '.join(bad) or 'total'} = {float(total)}) at step {step} (CUDA "
                            f"graph: after this step's update): lower train.lr or check the regularizer's hparams")
        return total.clone(), batch, {k: v.clone() for k, v in terms.items()}

    def _capture(self, step: int) -> None:
        self.st.opt.zero_grad(set_to_none=True)       # the graph's backward allocates the gradients it rewrites
        torch.cuda.synchronize(self.st.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            self.out = self._body(step, capturing=True)
        self.graph = g

    def _give_up(self, step: int, e: BaseException) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """After a failed capture: this step (already staged) and every later one run eagerly."""
        self.failed, self.graph, self.out = True, None, None
        self.ex.applied.pop("cuda_graph", None)
        self.ex.fallbacks["cuda_graph"] = (f"capture failed at step {step} ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:200] if str(e) else ''}): the step ran eagerly")
        self.st.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.st.device)
        x, y = make_batch(self.st.stream, self.idx, self.shifts, self.mask)
        return self.st.train_on(x, y, step)

