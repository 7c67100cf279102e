"""Execution options (mpbench/execution.py) compute what eager does: each option against eager on a tiny run (Conv-4
of width 8 at 16 px, batch 8, a few Adam steps with crop+flip, seed 0, one thread), with the tolerance of each
comparison stated where it is asserted; options that cannot run fall back to eager and the record says why."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import mpbench.models  # noqa: F401
from mpbench.bench_loop import _spec
from mpbench.data import ImageData
from mpbench.errors import UsageError
from mpbench.regularization import RunContext, build_stack
from mpbench.train import Setup, Stepper

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_check.sh)")

# fp32 reorderings (another conv algorithm, a fused kernel) change the last bits of each op; over 4 steps the losses
# agree to ~1e-7 relative (measured 2e-7), the parameters to ~2e-7 absolute. Adam turns a rounding-level change of a
# near-zero gradient into at most ~lr of update, hence the parameters' absolute bound.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
PARAM_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phi(tmp_path_factory) -> Path:
    from regularizers.metaperturb import PerturbFunction

    path = tmp_path_factory.mktemp("phi") / "phi.pt"
    torch.manual_seed(1)
    PerturbFunction().save_phi(path)
    return path


def tiny(method: str = "base", steps: int = 4, device: torch.device = CPU, phi: Path | None = None,
         optimizer: str = "adam") -> tuple[Setup, dict]:
    """A run of ``method`` on Conv-4 (width 8) over 64 random 16 px images, 10 classes, batch 8, crop 2 + flip."""
    torch.manual_seed(0)
    n, size, batch = 64, 16, 8
    data = ImageData(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n) % 10, 10)
    spec = _spec([method], "conv4", batch, steps)
    spec["train"]["augment"] = {"crop_pad": 2, "flip": True}
    spec["train"]["optimizer"] = optimizer
    if method == "metaperturb":
        spec["reg"]["metaperturb"]["phi"] = str(phi)
    net = timm.create_model("conv4", num_classes=10, in_chans=3, width=8)
    ctx = RunContext(spec=spec, model_name="conv4", num_classes=10, in_chans=3, image_size=size, total_steps=steps,
                     num_train=n, device=device)
    stack = build_stack([method], spec["reg"], ctx)
    stack.attach(net)
    net.to(device).train()
    return Setup(net, stack, ctx, data.images, data.labels, data.images[:batch], data.labels[:batch], 10), spec


def train(options: dict | None, method: str = "base", steps: int = 4, device: torch.device = CPU,
          phi: Path | None = None, stepper_hook=None) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    """(losses per step, final state dict, execution record) of ``steps`` steps under ``options``."""
    s, spec = tiny(method, steps, device, phi)
    st = Stepper(s, spec, device, options)
    if stepper_hook:
        stepper_hook(st)
    losses = [float(st.step(i)[0]) for i in range(steps)]
    state = {k: v.detach().float().cpu().clone() for k, v in s.model.state_dict().items()}
    return losses, state, st.execution.record()


def assert_close_run(a, b, loss_rtol=LOSS_RTOL, loss_atol=LOSS_ATOL, param_atol=PARAM_ATOL) -> None:
    torch.testing.assert_close(torch.tensor(a[0]), torch.tensor(b[0]), rtol=loss_rtol, atol=loss_atol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=0, atol=param_atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def eager():
    torch.set_num_threads(1)
    return train({})


# ---- the options, one by one, against eager ----------------------------------------------------------------------

def test_no_options_is_the_plain_step_bit_for_bit(eager):
    """Every option off (the default) is eager exactly: same losses and parameters bit for bit."""
    again = train({"channels_last": False, "fused_adam": False, "autocast": "none", "compile": False})
    assert again[0] == eager[0]
    assert all(torch.equal(again[1][k], eager[1][k]) for k in eager[1])
    assert again[2]["applied"] == {} and again[2]["fallbacks"] == {}


def test_channels_last_computes_what_eager_does(eager):
    out = train({"channels_last": True})
    assert out[2]["applied"] == {"channels_last": True}
    assert_close_run(out, eager)          # fp32 reordering: losses rtol 1e-5 / atol 1e-6, parameters atol 1e-5


def test_fused_adam_computes_what_eager_does(eager):
    assert torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], fused=True).defaults["fused"]   # CPU kernel here
    out = train({"fused_adam": True})
    assert out[2]["applied"] == {"fused_adam": True}
    assert_close_run(out, eager)          # same update, other kernel: fp32 tolerance (measured: bitwise equal here)


def test_fused_adam_with_sgd_is_recorded_as_not_applied():
    s, spec = tiny(optimizer="sgd")
    st = Stepper(s, spec, CPU, {"fused_adam": True})
    assert "fused_adam" not in st.execution.applied and "Adam" in st.execution.fallbacks["fused_adam"]


def test_compile_computes_what_eager_does(eager):
    """One tiny compile (inductor's C++ backend; ~5 s with a warm inductor cache, ~50 s cold on 2 busy cores)."""
    out = train({"compile": True})
    assert out[2]["applied"] == {"compile": "default"}, out[2]
    assert_close_run(out, eager)          # fusions reorder fp32 sums: losses rtol 1e-5 / atol 1e-6, params atol 1e-5


def test_bf16_autocast_is_close_and_recorded(eager):
    out = train({"autocast": "bf16"})
    assert out[2]["applied"] == {"autocast": "bf16"} and "distribution" in out[2]["notes"]["autocast"]
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per op): the losses agree to ~1e-2 relative
    # (measured 1.7e-3); parameters differ by at most a few Adam steps of lr = 1e-3 (measured 4.5e-3 after 4 steps)
    assert_close_run(out, eager, loss_rtol=2e-2, loss_atol=1e-3, param_atol=4 * 4 * 1e-3)


def test_bf16_autocast_keeps_batchnorm_and_metaperturb_in_float32(phi):
    from regularizers.metaperturb import PerturbSite

    seen: dict[str, set] = {"bn_in": set(), "bn_out": set(), "mp_out": set(), "conv_out": set()}

    def hook(st):
        for m in st.s.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.register_forward_hook(lambda mod, a, o: (seen["bn_out"].add(o.dtype), None)[1])
            elif isinstance(m, PerturbSite):
                m.register_forward_hook(lambda mod, a, o: (seen["mp_out"].add(o.dtype), None)[1])
            elif isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda mod, a, o: (seen["conv_out"].add(o.dtype), None)[1])

    out = train({"autocast": "bf16"}, method="metaperturb", steps=2, phi=phi, stepper_hook=hook)
    assert seen["conv_out"] == {torch.bfloat16}                       # autocast is on
    assert seen["bn_out"] == {torch.float32} and seen["mp_out"] == {torch.float32}
    assert all(torch.isfinite(torch.tensor(out[0])))


def test_options_with_metaperturb_compute_what_eager_does(phi):
    """MetaPerturb (native CPU kernels; their noise is seeded from torch's generator, so it is the same draw)."""
    ref = train({}, method="metaperturb", phi=phi)
    assert_close_run(train({"channels_last": True, "fused_adam": True}, method="metaperturb", phi=phi), ref)


# ---- CUDA graphs -------------------------------------------------------------------------------------------------

def test_cuda_graph_on_cpu_falls_back_to_eager_with_the_reason(eager):
    out = train({"cuda_graph": True, "cudnn_benchmark": True})
    assert out[2]["applied"] == {}
    assert "CUDA" in out[2]["fallbacks"]["cuda_graph"] and "eager" in out[2]["fallbacks"]["cuda_graph"]
    assert "CUDA" in out[2]["fallbacks"]["cudnn_benchmark"]
    assert out[0] == eager[0] and all(torch.equal(out[1][k], eager[1][k]) for k in eager[1])   # identical


@pytest.mark.parametrize("method,safe", [("base", True), ("dropout", True), ("label_smoothing", True),
                                         ("metaperturb", False), ("dropblock", False), ("mixup", False),
                                         ("cutmix", False), ("manifold_mixup", False), ("bss", False)])
def test_methods_that_are_not_graph_safe_fall_back_with_the_reason(method, safe, phi):
    """What a CUDA run decides (no CUDA call is made to decide it): graph-safe methods are captured, the others run
    eagerly with the method named in the record."""
    from mpbench.execution import StepExecution

    s, spec = tiny(method, phi=phi)
    assert s.stack.graph_safe is safe
    ex = StepExecution({"cuda_graph": True}, torch.device("cuda"), s.stack, spec["train"])
    if safe:
        assert ex.applied == {"cuda_graph": True} and ex.optimizer_kwargs()["capturable"]
    else:
        assert ex.applied == {} and f"{method} is not graph-safe" in ex.fallbacks["cuda_graph"]


def test_cuda_graph_needs_adam():
    from mpbench.execution import StepExecution

    s, spec = tiny(optimizer="sgd")
    ex = StepExecution({"cuda_graph": True}, torch.device("cuda"), s.stack, spec["train"])
    assert "only Adam" in ex.fallbacks["cuda_graph"]


@pytest.mark.parametrize("pad,flip", [(2, True), (0, False), (3, False), (0, True)])
def test_staged_batches_are_the_stream_batches(pad, flip):
    """The host draws + device ops a CUDA graph replays give BatchStream.next()'s batches bit for bit, across
    epochs (this keeps mpbench.execution.draw/make_batch in step with mpbench.batches)."""
    from mpbench.batches import BatchStream
    from mpbench.execution import draw, make_batch

    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20) % 4
    a = BatchStream(images, labels, 6, 3, CPU, crop_pad=pad, flip=flip)
    b = BatchStream(images, labels, 6, 3, CPU, crop_pad=pad, flip=flip)
    for _ in range(8):                                        # 3 batches an epoch: crosses two reshuffles
        xa, ya = a.next()
        xb, yb = make_batch(b, *draw(b))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict()["pos"] == b.state_dict()["pos"] and torch.equal(a.gen.get_state(), b.gen.get_state())


def test_graph_body_run_eagerly_computes_what_eager_does(eager):
    """The captured step's body (static index buffers, staged batch, learning rate as a tensor), run without a
    capture on the CPU, after the eager warm-up steps; its checkpoint holds plain floats and loads into an eager run."""
    from mpbench.execution import GraphStep

    def as_graph(st):
        st.execution.applied["cuda_graph"] = True
        st.execution.fit_optimizer(st.opt, st._opt_flags)
        assert isinstance(st.opt.param_groups[0]["lr"], torch.Tensor)
        st.graph = GraphStep(st, capture=False, warmup=2)
        holder.append(st)

    holder: list = []
    out = train({}, stepper_hook=as_graph)
    # lr as a float32 tensor (1e-3 rounds by 5e-8 relative): fp32 tolerance
    assert_close_run(out, eager)
    assert holder[0].graph.replays == 2                    # steps 2 and 3 went through the body
    state = holder[0].state_dict()
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    s, spec = tiny()
    plain = Stepper(s, spec, CPU)
    plain.load_state_dict(state)
    assert isinstance(plain.opt.param_groups[0]["lr"], float)
    assert plain.opt.param_groups[0].get("capturable") is False


# ---- configuration, the worker's args, result.json -------------------------------------------------------------

def test_unknown_or_bad_options_are_usage_errors():
    from mpbench.execution import resolve

    with pytest.raises(UsageError, match="channels_last"):
        resolve({"channel_last": True})
    with pytest.raises(UsageError, match="bf16"):
        resolve({"autocast": "bf17"})
    assert resolve(None)["compile_mode"] == "default"


def test_execution_from_worker_args(make_suite, tmp_path):
    from mpbench.config import load_suite
    from mpbench.launchers import Request
    from mpbench.plan import expand
    from mpbench.runner import Execution

    cfg = load_suite(str(make_suite()), ["execution.channels_last=true", "execution.compile_mode=max-autotune"])
    args = Request(expand(cfg), cfg, tmp_path / "r", tmp_path / "d").worker_args()
    json.dumps(args)
    ex = Execution.from_args({**args, "device": "cpu"})
    assert ex.options["channels_last"] is True and ex.options["compile_mode"] == "max-autotune"
    assert ex.device == CPU and ex.results == tmp_path / "r"
    assert Execution.from_args({"results": "r", "data_root": "d"}).options == {}


def test_mpbench_run_records_execution_in_result_json(make_suite, cli, tmp_path):
    suite = make_suite(train={"steps": 3, "batch_size": 16, "eval_every": 0, "eval_batch_size": 100})
    res = tmp_path / "res"
    code, _, err = cli("run", f"suite={suite}", "--results", res, "execution.channels_last=true",
                       "execution.cuda_graph=true")
    assert code == 0, err
    result = json.loads(next(res.glob("runs/*/result.json")).read_text())
    ex = result["execution"]
    assert ex["requested"]["channels_last"] is True and ex["applied"] == {"channels_last": True}
    assert "CUDA" in ex["fallbacks"]["cuda_graph"]
    assert result["spec"].get("execution") is None            # not part of the run's identity
    code, _, err = cli("run", f"suite={suite}", "--results", res, "execution.autocast=fp8", "--dry-run")
    assert code == 2 and "execution.autocast" in err


def test_bench_throughput_prints_its_table_on_cpu():
    from mpbench.bench_throughput import bench_throughput, format_table

    r = bench_throughput("conv4", "base", batch=8, size=16, threads=1, steps=1, warmup=1,
                         variants={"eager": {}, "channels_last": {"channels_last": True},
                                   "cuda_graph": {"cuda_graph": True}})
    text = format_table(r)
    rows = {row["variant"]: row for row in r["rows"]}
    assert rows["eager"]["ms"] > 0 and rows["eager"]["ratio"] == 1.0 and rows["channels_last"]["images_per_s"] > 0
    assert rows["cuda_graph"]["ms"] is None and "n/a (cuda_graph: CUDA graphs need a CUDA device" in text
    assert "conv4, method base, batch 8, 16 px" in text


# ---- on a GPU (scripts/gpu_check.sh) ---------------------------------------------------------------------------

@needs_cuda
def test_cuda_graph_computes_what_eager_does_on_cuda():
    dev = torch.device("cuda")
    ref = train({}, steps=8, device=dev)
    out = train({"cuda_graph": True}, steps=8, device=dev)
    assert out[2]["applied"] == {"cuda_graph": True}, out[2]
    # capturable Adam computes its bias correction in float32 on the device: fp32 tolerance
    assert_close_run(out, ref)


@needs_cuda
def test_cuda_graph_with_dropout_and_every_option_on_cuda():
    dev = torch.device("cuda")
    opts = {"cuda_graph": True, "channels_last": True, "cudnn_benchmark": True, "fused_adam": True,
            "autocast": "bf16" if torch.cuda.is_bf16_supported() else "none"}
    out = train(opts, method="dropout", steps=8, device=dev)
    assert out[2]["fallbacks"] == {} and out[2]["applied"]["cuda_graph"] is True, out[2]
    assert all(torch.isfinite(torch.tensor(out[0])))


@needs_cuda
def test_options_compute_what_eager_does_on_cuda():
    dev = torch.device("cuda")
    ref = train({}, device=dev)
    for opts in ({"channels_last": True}, {"fused_adam": True}, {"cudnn_benchmark": True}):
        out = train(opts, device=dev)
        assert out[2]["fallbacks"] == {}, out[2]
        # cuDNN/fused kernels: fp32 rounding; TF32 stays off (torch's default for convolutions is on: allow 1e-3)
        assert_close_run(out, ref, loss_rtol=1e-3, loss_atol=1e-4, param_atol=1e-4)


@needs_cuda
def test_metaperturb_on_cuda_with_cuda_graph_runs_eagerly_and_says_why(phi):
    out = train({"cuda_graph": True}, method="metaperturb", steps=4, device=torch.device("cuda"), phi=phi)
    assert "metaperturb is not graph-safe" in out[2]["fallbacks"]["cuda_graph"]
