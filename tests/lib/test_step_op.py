"""gate_update and its torch.library ops: both backends agree, gradients, opcheck, compile.

On CPU the Triton path runs in the interpreter (conftest), so it is exercised here too.
"""

import pytest
import torch

from conftest import DEVICE, DEVICE_MARKS
from triton_convlstm import step_op
from triton_convlstm.backend import interpreter_enabled
from triton_convlstm.step_op import gate_backward_op, gate_forward_op, gate_update

pytestmark = DEVICE_MARKS
TRITON_HERE = DEVICE == "cuda" or interpreter_enabled()
needs_triton = pytest.mark.skipif(not TRITON_HERE, reason="Triton cannot run on this device")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreter_enabled(),
                                                 reason="CPU Triton needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]  # fmt: skip


def inputs(b=2, hid=3, hh=4, ww=5, *, dtype=torch.float32, layout="nchw", zh=True, bias=True,
           peep=True, device=DEVICE, grad=True):  # fmt: skip
    def mk(*shape, state=False):
        t = torch.randn(shape, device=device, dtype=torch.float32 if state else dtype)
        if layout == "nhwc" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)

    return dict(
        zx=mk(b, 4 * hid, hh, ww), c_prev=mk(b, hid, hh, ww, state=True),
        zh=mk(b, 4 * hid, hh, ww) if zh else None, bias=mk(4 * hid) if bias else None,
        peephole=mk(3, hid, state=True) if peep else None,
    )  # fmt: skip


def run(args, backend):
    """Outputs and the gradients of a scalar loss w.r.t. every tensor input."""
    h, c = gate_update(args["zx"], args["c_prev"], zh=args["zh"], bias=args["bias"],
                       peephole=args["peephole"], backend=backend)  # fmt: skip
    leaves = [t for t in args.values() if t is not None]
    loss = (h.float() * torch.linspace(-1, 1, h.numel(), device=h.device).view_as(h)).sum()
    loss = loss + (c * c.detach().cos()).sum()
    return (h, c), torch.autograd.grad(loss, leaves)


def rel_err(a, b):
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])  # fmt: skip
@pytest.mark.parametrize("opts", ["zh-bias-peep", "bare"])
def test_backends_agree(opts, dtype, tol, layout):
    full = opts != "bare"
    args = inputs(dtype=dtype, layout=layout, zh=full, bias=full, peep=full)
    (h_t, c_t), g_t = run(args, "torch")
    (h_k, c_k), g_k = run(args, "triton")
    assert h_k.dtype == dtype and c_k.dtype == torch.float32
    assert rel_err(h_k, h_t) <= tol and rel_err(c_k, c_t) <= 1e-5
    for name, a, b in zip([k for k, v in args.items() if v is not None], g_k, g_t):
        assert a.dtype == b.dtype == args[name].dtype, name
        assert rel_err(a, b) <= tol, name


def test_gradcheck_fp64():
    """fp64 always takes the torch path, whatever the backend says."""
    args = inputs(b=1, hid=2, hh=3, ww=2, dtype=torch.float64, device="cpu")
    args["c_prev"] = args["c_prev"].detach().double().requires_grad_()
    args["peephole"] = args["peephole"].detach().double().requires_grad_()
    names = list(args)
    for backend in ("torch", "triton"):
        f = lambda *ts, backend=backend: gate_update(ts[0], ts[1], zh=ts[2], bias=ts[3],
                                                     peephole=ts[4], backend=backend)  # fmt: skip
        assert gate_update(args["zx"], args["c_prev"], backend=backend)[1].dtype == torch.float64
        assert torch.autograd.gradcheck(f, [args[n] for n in names])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", ["all", "bare"])
def test_opcheck(opts, device):
    full = opts == "all"
    a = inputs(device=device, zh=full, bias=full, peep=full, grad=False)
    torch.library.opcheck(gate_forward_op, (a["zx"], a["zh"], a["bias"], a["c_prev"],
                                            a["peephole"]))  # fmt: skip
    h, c, z = gate_forward_op(a["zx"], a["zh"], a["bias"], a["c_prev"], a["peephole"])
    dh = torch.randn_like(h) if full else None
    torch.library.opcheck(gate_backward_op, (z, a["c_prev"], c, a["peephole"], dh,
                                             torch.randn_like(c)))  # fmt: skip


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fake_kernels_match_real_strides(layout):
    a = inputs(layout=layout, grad=False, device="cpu")
    args = (a["zx"], a["zh"], a["bias"], a["c_prev"], a["peephole"])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = gate_forward_op(*(mode.from_tensor(t) for t in args))
    expect = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert all(t.is_contiguous(memory_format=expect) for t in fake)
    if TRITON_HERE and DEVICE == "cpu":
        real = gate_forward_op(*args)
        assert [t.stride() for t in real] == [t.stride() for t in fake]


def _step(zx, c_prev, zh, bias, peephole, backend):
    h, c = gate_update(zx, c_prev, zh=zh, bias=bias, peephole=peephole, backend=backend)
    return (h * h).sum() + c.sum()


# No warning may escape the compile (e.g. dynamo's about tracing an lru_cache'd function).
@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton),
                                     "torch"])
def test_compile_fullgraph(backend):
    """Dynamo traces gate_update without a graph break; on CPU the Triton custom op runs in the
    interpreter inside the compiled graph (its fake kernel is what the compiler sees). aot_eager
    (dynamo + AOT autograd) keeps this fast on CPU; the GPU test below uses inductor."""
    torch._dynamo.reset()
    a = inputs()
    leaves = [t for t in a.values() if t is not None]
    eager = _step(*a.values(), backend)
    g_eager = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    out = compiled(*a.values(), backend)
    g_comp = torch.autograd.grad(out, leaves)
    assert rel_err(out, eager) <= 1e-5
    assert all(rel_err(x, y) <= 1e-5 for x, y in zip(g_comp, g_eager))


@pytest.mark.gpu
def test_compile_fullgraph_inductor_cuda():
    torch._dynamo.reset()
    a = inputs(b=4, hid=16, hh=32, ww=32, dtype=torch.bfloat16, layout="nhwc")
    compiled = torch.compile(_step, fullgraph=True)
    assert rel_err(compiled(*a.values(), "triton"), _step(*a.values(), "triton")) <= 1e-3


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = inputs(device="cpu", grad=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gate_update(a["zx"], a["c_prev"], backend="triton")
    h, c = gate_update(a["zx"], a["c_prev"], backend="auto")  # auto falls back to torch on CPU
    assert c.dtype == torch.float32


def test_bad_arguments_raise():
    a = inputs(grad=False)
    with pytest.raises(ValueError, match="zx"):
        gate_update(a["zx"][:, :5], a["c_prev"])
    with pytest.raises(ValueError, match="c_prev"):
        gate_update(a["zx"], a["c_prev"][:, :1])
    with pytest.raises(ValueError, match="bias"):
        gate_update(a["zx"], a["c_prev"], bias=a["bias"][:3])
    with pytest.raises(ValueError, match="backend"):
        gate_update(a["zx"], a["c_prev"], backend="cudnn")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arg", ["zx", "c_prev", "zh", "bias", "peephole"])
def test_arguments_of_an_integer_dtype_or_another_device_raise(arg, backend):
    """Each named, before anything runs: a meta tensor sent the Triton op to its fake kernel
    (uninitialised outputs), an integer zx gave integer (truncated) h on the torch path."""
    a = inputs(grad=False)
    call = lambda **kw: gate_update(**{**a, **kw}, backend=backend)  # noqa: E731
    integer = f"{arg}: expected a floating-point tensor, got dtype torch.int"
    with pytest.raises(TypeError, match=integer):
        call(**{arg: a[arg].long()})
    if arg != "zx":  # the others must be on zx's device
        with pytest.raises(ValueError, match=f"{arg}: expected a tensor on .*, got meta"):
            call(**{arg: a[arg].to("meta")})


@needs_triton
def test_state_dtype_and_no_aliasing():
    a = inputs(dtype=torch.float16, grad=False)
    a["c_prev"] = a["c_prev"].half()  # a 16-bit state is taken in, fp32 comes out
    h, c = gate_update(a["zx"], a["c_prev"], zh=a["zh"], backend="triton")
    assert h.dtype == torch.float16 and c.dtype == torch.float32
    assert not any(h.data_ptr() == t.data_ptr() for t in a.values() if t is not None)
    assert step_op.__all__ == ["gate_update", "gate_forward_op", "gate_backward_op", "cell_step"]


@pytest.mark.parametrize("spatial", [(7,), (2, 3, 4)], ids=["1d", "3d"])
def test_opcheck_and_gate_update_in_1d_and_3d(spatial):
    """The single-step ops serve the family: (B, C, *spatial) with 1 or 3 spatial dims, the
    Triton ops (interpreter on CPU) checked by opcheck and against the torch path."""
    torch.manual_seed(6)
    zx, zh = (torch.randn(2, 8, *spatial, device=DEVICE) for _ in range(2))
    bias, c_prev = torch.randn(8, device=DEVICE), torch.randn(2, 2, *spatial, device=DEVICE)
    peep = torch.randn(3, 2, device=DEVICE)
    if DEVICE == "cuda" or interpreter_enabled():
        torch.library.opcheck(gate_forward_op, (zx, zh, bias, c_prev, peep))
        h, c, z = gate_forward_op(zx, zh, bias, c_prev, peep)
        torch.library.opcheck(gate_backward_op, (z, c_prev, c, peep, torch.randn_like(h),
                                                 torch.randn_like(c)))
        tri = gate_update(zx, c_prev, zh=zh, bias=bias, peephole=peep, backend="triton")
        ref = gate_update(zx, c_prev, zh=zh, bias=bias, peephole=peep, backend="torch")
        for a, b in zip(tri, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h, c = gate_update(zx, c_prev, zh=zh, bias=bias, peephole=peep, backend="torch")
    assert h.shape == c.shape == (2, 2, *spatial)
