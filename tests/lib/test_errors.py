"""Bad input raises ValueError/TypeError naming the argument, expected vs actual, before any
computation (checked by recording the aten ops dispatched during the failing call)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from triton_convlstm import ConvLSTM, ConvLSTMCell

BAD = (ValueError, TypeError)
# Ops that compute nothing: views, metadata, allocation. Anything else dispatched during a call
# that fails validation counts as computation (the layer runs as custom ops, so the recorder may
# see one "layer_forward" op rather than convolutions).
HARMLESS = {"transpose", "select", "detach", "view", "permute", "expand", "slice", "alias",
            "unsqueeze", "squeeze", "t", "_unsafe_view", "as_strided", "is_same_size", "empty",
            "empty_like", "empty_strided", "zeros", "zeros_like", "lift_fresh", "size", "stride",
            "sym_size", "sym_stride", "sym_numel", "dim", "is_contiguous"}


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    def computed(self):
        return [op for op in self.ops if op not in HARMLESS]


def raises_before_compute(fn, exc, match):
    rec = OpRecorder()
    with pytest.raises(exc, match=match) as info:
        with rec:
            fn()
    assert not rec.computed(), f"computed {rec.computed()} before raising"
    return info


def layer(**kw):
    args = dict(input_dim=3, hidden_dim=4, kernel_size=3, num_layers=2, batch_first=True,
                backend="torch")
    args.update(kw)
    return ConvLSTM(**args)


def x_ok(b=2, t=3, c=3, h=5, w=6, dtype=torch.float32):
    return torch.randn(b, t, c, h, w, dtype=dtype)


def state_ok(b=2, hid=4, h=5, w=6, layers=2, hdt=torch.float32, cdt=torch.float32):
    return [(torch.zeros(b, hid, h, w, dtype=hdt), torch.zeros(b, hid, h, w, dtype=cdt))
            for _ in range(layers)]


def shows_expected_and_actual(msg: str, *values) -> None:
    for v in values:
        assert str(v) in msg, f"{v!r} not in message: {msg}"


# ---------------------------------------------------------------------------------------------
# constructor


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(input_dim=0), "input_dim"),
        (dict(input_dim=-2), "input_dim"),
        (dict(hidden_dim=0), "hidden_dim"),
        (dict(hidden_dim=[4, -1]), "hidden_dim"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(kernel_size=(3, 0)), "kernel_size"),
        (dict(kernel_size=[3, -1]), "kernel_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_layers=-1), "num_layers"),
        (dict(dilation=0), "dilation"),
        (dict(dilation=[1, 0]), "dilation"),
    ],
    ids=["input_dim0", "input_dim-2", "hidden0", "hidden[4,-1]", "kernel0", "kernel(3,0)",
         "kernel[3,-1]", "layers0", "layers-1", "dilation0", "dilation[1,0]"],
)
def test_non_positive_sizes(kw, name):
    with pytest.raises(BAD, match=name) as info:
        layer(**kw)
    bad = list(kw.values())[0]
    if isinstance(bad, int):
        assert str(bad) in str(info.value)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(hidden_dim=[4, 5, 6]), "hidden_dim"),
        (dict(hidden_dim=[4]), "hidden_dim"),
        (dict(kernel_size=[3, 3, 3]), "kernel_size"),
        (dict(kernel_size=[(3, 3)]), "kernel_size"),
        (dict(dilation=[1, 1, 1]), "dilation"),
    ],
    ids=["hidden3of2", "hidden1of2", "kernel3of2", "kernel1of2", "dilation3of2"],
)
def test_list_argument_wrong_length(kw, name):
    with pytest.raises(BAD, match=name) as info:
        layer(**kw)
    msg = str(info.value)
    assert "2" in msg and str(len(list(kw.values())[0])) in msg, msg


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(hidden_dim=2.5), "hidden_dim"),
        (dict(input_dim="3"), "input_dim"),
        (dict(kernel_size=(3, 3, 3)), "kernel_size"),
        (dict(kernel_size=1.5), "kernel_size"),
        (dict(num_layers=1.0), "num_layers"),
    ],
    ids=["hidden-float", "input-str", "kernel-3tuple", "kernel-float", "layers-float"],
)
def test_wrong_types_of_sizes(kw, name):
    with pytest.raises(BAD, match=name):
        layer(**kw)


@pytest.mark.parametrize("name", ["peephole", "cuda_graphs", "recompute_gates"])
@pytest.mark.parametrize("value", ["False", 1, None], ids=["str", "int", "None"])
def test_keyword_switches_take_only_bools(name, value):
    with pytest.raises(TypeError, match=rf"{name}: expected True or False, got {value!r}"):
        layer(**{name: value})
    if name == "peephole":
        with pytest.raises(TypeError, match=name):
            ConvLSTMCell(3, 4, 3, peephole=value)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None], ids=["cuda", "Triton",
                                                                        "empty", "None"])
def test_unknown_backend(backend):
    with pytest.raises(BAD, match="backend"):
        layer(backend=backend)
    with pytest.raises(BAD, match="backend"):
        ConvLSTMCell(3, 4, 3, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_without_interpreter(monkeypatch):
    # Import Triton under the interpreter first: triton.language's own @jit helpers are built at
    # import in whatever mode TRITON_INTERPRET says then, and later interpreted kernels need them
    # interpreted too.
    pytest.importorskip("triton.language")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|CUDA|cuda"):
        m = layer(backend="triton")
        m(x_ok())


@pytest.mark.parametrize(
    "kw, name",
    [(dict(input_dim=0), "input_dim"), (dict(hidden_dim=-1), "hidden_dim"),
     (dict(kernel_size=0), "kernel_size"), (dict(dilation=0), "dilation")],
    ids=["input_dim", "hidden_dim", "kernel_size", "dilation"],
)
def test_cell_constructor(kw, name):
    args = dict(input_dim=3, hidden_dim=4, kernel_size=3)
    args.update(kw)
    with pytest.raises(BAD, match=name):
        ConvLSTMCell(**args)


# ---------------------------------------------------------------------------------------------
# forward: x


def test_wrong_ndim():
    m = layer()
    x4, x6 = torch.randn(2, 3, 5, 6), torch.randn(1, 2, 3, 3, 5, 6)
    info = raises_before_compute(lambda: m(x4), BAD, r"\bx\b|input")
    shows_expected_and_actual(str(info.value), 5, 4)
    raises_before_compute(lambda: m(x6), BAD, r"\bx\b|input")


@pytest.mark.parametrize("batch_first", [True, False], ids=["BT", "TB"])
def test_wrong_channels(batch_first):
    m = layer(batch_first=batch_first)
    x = torch.randn(2, 3, 4, 5, 6)  # 4 channels, input_dim 3
    info = raises_before_compute(lambda: m(x), BAD, r"channel|input_dim")
    shows_expected_and_actual(str(info.value), 3, 4)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8],
                         ids=["int64", "int32", "bool", "uint8"])
def test_non_float_input(dtype):
    m = layer()
    x = torch.zeros(2, 3, 3, 5, 6, dtype=dtype)
    info = raises_before_compute(lambda: m(x), BAD, r"\bx\b|input|dtype")
    assert str(dtype).replace("torch.", "") in str(info.value)


def test_complex_input():
    m = layer()
    x = torch.zeros(2, 3, 3, 5, 6, dtype=torch.complex64)
    raises_before_compute(lambda: m(x), BAD, r"\bx\b|input|dtype")


def test_not_a_tensor():
    m = layer()
    raises_before_compute(lambda: m([[1.0]]), TypeError,
                          r"input_tensor: expected a torch\.Tensor, got list")
    cell = ConvLSTMCell(3, 4, 3, backend="torch")
    raises_before_compute(lambda: cell(3.0), TypeError,
                          r"input_tensor: expected a torch\.Tensor, got float")


@pytest.mark.parametrize("batch_first", [True, False], ids=["BT", "TB"])
def test_empty_sequence(batch_first):
    m = layer(batch_first=batch_first)
    x = torch.randn(2, 0, 3, 5, 6) if batch_first else torch.randn(0, 2, 3, 5, 6)
    raises_before_compute(lambda: m(x), BAD, r"T\b|time|sequence|length|steps")


def test_x_on_other_device_than_parameters():
    m = layer()
    x = torch.empty(2, 3, 3, 5, 6, device="meta")
    raises_before_compute(lambda: m(x), BAD, "device")


@pytest.mark.gpu
def test_x_on_cuda_parameters_on_cpu():
    m = layer()
    with pytest.raises(BAD, match="device"):
        m(x_ok().cuda())
    m.cuda()
    with pytest.raises(BAD, match="device"):
        m(x_ok())
    with pytest.raises(BAD, match="hidden_state|device"):
        m(x_ok().cuda(), state_ok())


@pytest.mark.parametrize(
    "param_dtype, x_dtype",
    [(torch.float32, torch.float64), (torch.float32, torch.float16),
     (torch.float64, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["p32-x64", "p32-x16", "p64-x32", "pbf16-x32"],
)
def test_x_dtype_differs_from_parameters(param_dtype, x_dtype):
    """Outside autocast, a float x whose dtype differs from the parameters raises TypeError
    naming both dtypes, before anything is computed (never a silent cast or wrong-dtype
    state)."""
    assert not torch.is_autocast_enabled("cpu")
    m = layer().to(param_dtype)
    x = x_ok(dtype=x_dtype)
    info = raises_before_compute(lambda: m(x), TypeError, r"input_tensor: expected dtype")
    msg = str(info.value)
    assert f"expected dtype {param_dtype}" in msg and f"got {x_dtype}" in msg, msg
    # with a (correctly typed) state as well, and for the cell
    st = state_ok(hdt=param_dtype, cdt=torch.float64 if param_dtype == torch.float64
                  else torch.float32)
    raises_before_compute(lambda: m(x, st), TypeError,
                          rf"expected dtype {param_dtype}.*got {x_dtype}")
    cell = ConvLSTMCell(3, 4, 3, backend="torch").to(param_dtype)
    raises_before_compute(lambda: cell(x[:, 0]), TypeError,
                          rf"input_tensor: expected dtype {param_dtype}.*got {x_dtype}")


# ---------------------------------------------------------------------------------------------
# forward: hidden_state


def test_state_wrong_number_of_layers():
    m = layer()
    x = x_ok()
    for st in (state_ok(layers=1), state_ok(layers=3)):
        info = raises_before_compute(lambda st=st: m(x, st), BAD, "hidden_state")
        shows_expected_and_actual(str(info.value), 2, len(st))


@pytest.mark.parametrize(
    "which, shape",
    [("h", (2, 5, 5, 6)), ("c", (2, 5, 5, 6)), ("h", (1, 4, 5, 6)), ("c", (2, 4, 5, 7)),
     ("h", (2, 4, 5)), ("c", (2, 4, 6, 5))],
    ids=["h-hidden", "c-hidden", "h-batch", "c-width", "h-ndim", "c-HW-swapped"],
)
def test_state_wrong_shape(which, shape):
    m = layer()
    x = x_ok()
    st = state_ok()
    h, c = st[1]
    st[1] = (torch.zeros(shape), c) if which == "h" else (h, torch.zeros(shape))
    info = raises_before_compute(lambda: m(x, st), BAD, "hidden_state")
    msg = str(info.value)
    assert re.search(r"2, 4, 5, 6|\(2, 4, 5, 6\)|\[2, 4, 5, 6\]", msg), msg


def test_state_wrong_shape_first_layer_of_other_width():
    """Per-layer hidden sizes: the state of layer 0 must have hidden_dim[0] channels."""
    m = layer(hidden_dim=[4, 6])
    x = x_ok()
    st = [(torch.zeros(2, 6, 5, 6), torch.zeros(2, 6, 5, 6)),
          (torch.zeros(2, 6, 5, 6), torch.zeros(2, 6, 5, 6))]
    raises_before_compute(lambda: m(x, st), BAD, "hidden_state")


def test_state_not_pairs():
    m = layer()
    x = x_ok()
    st = [torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 5, 6)]
    raises_before_compute(lambda: m(x, st), TypeError,
                          r"hidden_state\[0\]: expected a pair \(h, c\) of tensors, got Tensor")
    st1 = [(torch.zeros(2, 4, 5, 6),), (torch.zeros(2, 4, 5, 6),)]
    raises_before_compute(lambda: m(x, st1), TypeError,
                          r"hidden_state\[0\]: expected a pair \(h, c\) of tensors, got tuple")
    # a pair whose part is not a tensor
    st2 = state_ok()
    st2[1] = (st2[1][0], 0.0)
    raises_before_compute(lambda: m(x, st2), TypeError,
                          r"hidden_state\[1\] c: expected a torch\.Tensor, got float")


def test_state_wrong_h_dtype():
    m = layer()
    x = x_ok()
    st = state_ok(hdt=torch.float64)
    info = raises_before_compute(lambda: m(x, st), BAD, "hidden_state")
    assert "float64" in str(info.value) and "float32" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_state_16bit_c_must_be_float32(dtype):
    m = layer().to(dtype)
    x = x_ok(dtype=dtype)
    st = state_ok(hdt=dtype, cdt=dtype)
    info = raises_before_compute(lambda: m(x, st), BAD, "hidden_state")
    assert "float32" in str(info.value)
    # the right dtypes run
    outs, lasts = m(x, state_ok(hdt=dtype, cdt=torch.float32))
    assert lasts[0][1].dtype == torch.float32


def test_state_int_dtype():
    m = layer()
    x = x_ok()
    st = state_ok(hdt=torch.int64, cdt=torch.int64)
    raises_before_compute(lambda: m(x, st), BAD, "hidden_state")


def test_state_on_other_device():
    m = layer()
    x = x_ok()
    st = state_ok()
    st[0] = (st[0][0].to("meta"), st[0][1])
    raises_before_compute(lambda: m(x, st), BAD, "hidden_state|device")
    st = state_ok()
    st[1] = (st[1][0], st[1][1].to("meta"))
    raises_before_compute(lambda: m(x, st), BAD, "hidden_state|device")


def test_state_not_a_list():
    m = layer()
    x = x_ok()
    raises_before_compute(
        lambda: m(x, torch.zeros(2, 4, 5, 6)), ValueError,
        r"hidden_state: expected a list of 2 \(h, c\) pairs \(one per layer\), got Tensor")


# ---------------------------------------------------------------------------------------------
# the cell


def test_cell_bad_inputs():
    cell = ConvLSTMCell(3, 4, 3, backend="torch")
    st = (torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 5, 6))
    seq = torch.randn(2, 1, 3, 5, 6)
    five = torch.randn(2, 5, 5, 6)
    good = torch.randn(2, 3, 5, 6)
    bad_c = (torch.zeros(2, 4, 5, 6), torch.zeros(2, 3, 5, 6))
    ints = torch.zeros(2, 3, 5, 6, dtype=torch.long)
    # wrong ndim (a sequence given to the cell)
    raises_before_compute(lambda: cell(seq, st), BAD, r"\bx\b|input")
    # wrong channels
    info = raises_before_compute(lambda: cell(five, st), BAD, r"channel|input_dim|\bx\b|input")
    shows_expected_and_actual(str(info.value), 3, 5)
    # wrong state shape
    raises_before_compute(lambda: cell(good, bad_c), BAD, r"state|\bc\b")
    # integer input
    raises_before_compute(lambda: cell(ints, st), BAD, r"\bx\b|input|dtype")
    # 16-bit c must be float32
    half = ConvLSTMCell(3, 4, 3, backend="torch").to(torch.bfloat16)
    gb = good.to(torch.bfloat16)
    st16 = (st[0].to(torch.bfloat16), st[1].to(torch.bfloat16))
    raises_before_compute(lambda: half(gb, st16), BAD, r"state")


def test_nothing_changed_after_error():
    """A failed call leaves parameters untouched and the module usable."""
    m = layer()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(BAD):
        m(x_ok(), state_ok(layers=1))
    with pytest.raises(BAD):
        m(torch.randn(2, 3, 4, 5, 6))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    outs, _ = m(x_ok())
    assert outs[0].shape == (2, 3, 4, 5, 6)


def test_op_recorder_sees_a_real_forward():
    """The 'nothing computed' checks above are only meaningful if the recorder sees the ops of a
    successful call."""
    m = layer()
    x = x_ok()
    rec = OpRecorder()
    with rec:
        m(x)
    assert rec.computed(), rec.ops


def test_state_hints_name_the_likely_mistake():
    m1 = ConvLSTM(3, 4, 3, 1, batch_first=True)
    h, c = torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 5, 6)
    with pytest.raises(ValueError, match=r"\[\(h, c\)\]"):  # a bare pair for a one-layer model
        m1(x_ok(), (h, c))
    m2 = ConvLSTM(3, [4, 4], 3, 2, batch_first=True)  # last_states of the last layer only
    _, last = m2(x_ok())
    with pytest.raises(ValueError, match="return_all_layers=True"):
        m2(x_ok(), last)
    with pytest.raises(TypeError, match="one \\(h, c\\) pair per layer"):  # a bare pair, 2 layers
        m2(x_ok(), (torch.zeros(2, 4, 5, 6), torch.zeros(2, 4, 5, 6)))


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    m = ConvLSTM(np.int64(3), np.int64(4), (np.int32(3), 3), np.int64(1), batch_first=True)
    h, c = m.cell_list[0].init_hidden(np.int64(2), (np.int64(5), 6))
    outs, _ = m(x_ok(), [(h, c)])
    assert outs[0].shape == (2, 3, 4, 5, 6)
    # stored as plain ints, as the popular module's attributes are
    assert type(m.num_layers) is int and type(m.input_dim) is int
    assert m.hidden_dim == [4] and all(type(v) is int for v in m.hidden_dim)
    assert type(m.cell_list[0].input_dim) is int and m.cell_list[0].kernel_size == (3, 3)
    with pytest.raises(TypeError, match="hidden_dim"):
        ConvLSTM(3, np.float64(4.0), 3, 1)
    with pytest.raises(TypeError, match="hidden_dim"):  # a bool tensor is no size
        ConvLSTM(3, torch.tensor(True), 3, 1)
    assert ConvLSTM(3, torch.tensor(4), 3, 1).hidden_dim == [4]
