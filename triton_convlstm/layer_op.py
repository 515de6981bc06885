"""A whole layer over a whole sequence as one torch op.

One opaque op per layer means ``torch.compile`` does not unroll the time loop (compile time does
not grow with T), and the op's own backward computes weight gradients once over all steps.
The fake kernels allocate through the same helper as the real ones, so strides agree.

Eagerly the same implementation runs through a plain ``autograd.Function`` (or, without grad,
directly): a ``torch.library`` custom op costs ~150 us of host time per call in its dispatch
machinery, which at small shapes is longer than the whole CUDA-graph replay of a layer.
:func:`run_layer` picks the path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor

from . import gate_buffer, graphs
from .layout import in_layout_of, like_seq
from .reference import state_dtype
from .sequence import LayerSpec, layer_backward, layer_forward, output_buffers
from .step_op import cell_step

# Part of the ops' names: bumped whenever what the fake kernels promise (output strides) changes.
# Inductor's on-disk FX graph cache keys a compiled graph on the ops' names, not on their fake
# kernels (pytorch/pytorch#160472), so after such a change a cached graph would assert the old
# strides; a new name is a new key. 2: 3-d sequences on CPU are channels-first.
OP_REVISION = 2


@torch.library.custom_op(f"triton_convlstm::layer_forward_r{OP_REVISION}", mutates_args=())
def layer_forward_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    peephole: Tensor | None,
    h0: Tensor | None,
    c0: Tensor | None,
    dilation: Sequence[int],
    backend: str,
    save: bool,
    use_graphs: bool,
    keep_gates: bool = True,
    fused: bool = False,
    padding_mode: str = "zeros",
    lengths: Tensor | None = None,
    recurrent_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer over the sequence (:func:`triton_convlstm.sequence.layer_forward`).

    Args:
        x: (T, B, C, H, W), the compute dtype.
        weight: (4*hid, C + hid, kh, kw), the compute dtype.
        bias: (4*hid,), the compute dtype, or None.
        peephole: (3, hid), the state dtype, or None.
        h0: (B, hid, H, W), the compute dtype, or None (zeros).
        c0: (B, hid, H, W), the state dtype, or None (zeros).
        dilation: (dh, dw).
        backend: "torch" or "triton" (resolved).
        save: keep c_seq and z_seq for the backward.
        use_graphs: run the loop from a captured CUDA graph where it can.
        keep_gates: False: z_seq stays empty and the backward recomputes the gates.
        fused: see LayerSpec.
        padding_mode: the convolutions' padding, as nn.Conv2d's ("zeros", "reflect",
            "replicate", "circular").
        lengths: (B,) int64 on x's device, or None: each sample's length (past it: the cell
            kept, h zero; see :func:`triton_convlstm.sequence.layer_forward`).
        recurrent_mask: (B, hid, H, W), the compute dtype, or None: the dropout mask on h
            where it feeds the hidden convolution.

    Returns:
        (h_seq, c_last, c_seq, z_seq): h_seq (T, B, hid, H, W) in the compute dtype, c_last
        (B, hid, H, W) in the state dtype, and what the backward reads (empty without save; see
        :func:`triton_convlstm.sequence.output_buffers`).
    """
    return _forward_impl(x, weight, bias, peephole, h0, c0, dilation, backend, save, use_graphs,
                         keep_gates, fused, padding_mode, lengths, recurrent_mask)


# Captured loops keep x (forward) and the gradient of h_seq (backward) in the sequence layout:
# the copy into the static buffer, made every call anyway, then also converts the layout, and
# the loops need no copy of their own (x's frames are read by both the forward and the
# backward's weight gradient; the gate kernels read the gradient per step).
_ARG0_SEQ_LAYOUT = {0: like_seq}


def _on_device(fn):
    """Run fn with x's CUDA device current: Triton launches, streams and graph captures all
    follow the current device, not the tensors'."""
    def wrapped(*args, **kwargs):
        x = next(a for a in args if isinstance(a, Tensor))
        if not x.is_cuda:
            return fn(*args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(*args, **kwargs)
    return wrapped


def _forward_runner(spec: LayerSpec, save: bool):
    """The forward as a function of its 8 tensor arguments (the op's 6, then lengths and the
    recurrent mask): what a captured graph replays."""
    def run(x, weight, bias, peephole, h0, c0, lengths, recurrent_mask):
        return layer_forward(x, weight, bias, peephole, h0, c0, spec, save, lengths,
                             recurrent_mask)
    return run


@_on_device
def _forward_impl(x, weight, bias, peephole, h0, c0, dilation, backend, save, use_graphs,
                  keep_gates=True, fused=False, padding_mode="zeros", lengths=None,
                  recurrent_mask=None, static_outputs=False, user=None):
    spec = LayerSpec(tuple(dilation), backend, keep_gates, fused, padding_mode)
    args = (x, weight, bias, peephole, h0, c0, lengths, recurrent_mask)
    run = _forward_runner(spec, save)
    if use_graphs and graphs.can_capture(x):
        return tuple(graphs.FORWARD.run(run, args, key=(spec, save), layouts=_ARG0_SEQ_LAYOUT,
                                        keep=range(4) if static_outputs else (), user=user))
    return tuple(run(*args))


@layer_forward_op.register_fake
def _(x, weight, bias, peephole, h0, c0, dilation, backend, save, use_graphs, keep_gates=True,
      fused=False, padding_mode="zeros", lengths=None, recurrent_mask=None):
    return output_buffers(x, weight, save, backend, keep_gates=keep_gates)


@torch.library.custom_op(f"triton_convlstm::layer_backward_r{OP_REVISION}", mutates_args=())
def layer_backward_op(
    grad_h_seq: Tensor | None,
    grad_c_last: Tensor | None,
    x: Tensor,
    weight: Tensor,
    peephole: Tensor | None,
    h0: Tensor | None,
    c0: Tensor | None,
    h_seq: Tensor,
    c_last: Tensor,
    c_seq: Tensor,
    z_seq: Tensor,
    dilation: Sequence[int],
    backend: str,
    needs: Sequence[bool],
    use_graphs: bool,
    keep_gates: bool = True,
    bias: Tensor | None = None,
    padding_mode: str = "zeros",
    lengths: Tensor | None = None,
    recurrent_mask: Tensor | None = None,
    fused: bool = False,
) -> list[Tensor]:
    """Gradients of :func:`layer_forward_op` (:func:`triton_convlstm.sequence.layer_backward`).

    Args:
        grad_h_seq: (T, B, hid, H, W), the gradient w.r.t. h_seq, or None (zeros).
        grad_c_last: (B, hid, H, W), the gradient w.r.t. c_last, or None (zeros).
        x, weight, peephole, h0, c0: the forward's inputs.
        h_seq, c_last, c_seq, z_seq: the forward's outputs, run with ``save``.
        dilation, backend, use_graphs, keep_gates, padding_mode: as the forward's.
        needs: six flags: which of (x, weight, bias, peephole, h0, c0) get a gradient.
        bias: the forward's, read only when the gates are recomputed (keep_gates=False).
        lengths, recurrent_mask, fused: the forward's (fused: how a forward run again rounds).

    Returns:
        Gradients for (x, weight, bias, peephole, h0, c0), each shaped, typed and laid out as
        that input (the bias's as a (4*hid,) tensor in weight's dtype); an empty tensor where
        not needed.
    """
    return _backward_impl(grad_h_seq, grad_c_last, x, weight, peephole, h0, c0, h_seq, c_last,
                          c_seq, z_seq, dilation, backend, needs, use_graphs, keep_gates, bias,
                          padding_mode, lengths, recurrent_mask, fused)


def _backward_runner(spec: LayerSpec, needs: tuple[bool, ...], consume: bool = False):
    """The backward as a function of its 14 tensor arguments (layer_backward's 11, then the
    bias, the lengths and the recurrent mask), gradients in promised layouts. ``consume`` as
    in :func:`layer_backward`."""
    def run(*a):
        grads = layer_backward(*a[:11], spec, needs, consume, bias=a[11], lengths=a[12],
                               recurrent_mask=a[13])
        likes = _grad_likes(*a[2:7])
        return [a[2].new_empty(0) if g is None else in_layout_of(g, like)
                for g, like in zip(grads, likes)]
    return run


@_on_device
def _backward_impl(grad_h_seq, grad_c_last, x, weight, peephole, h0, c0, h_seq, c_last, c_seq,
                   z_seq, dilation, backend, needs, use_graphs, keep_gates=True, bias=None,
                   padding_mode="zeros", lengths=None, recurrent_mask=None, fused=False):
    spec = LayerSpec(tuple(dilation), backend, keep_gates, fused, padding_mode)
    needs = tuple(bool(n) for n in needs)
    args = (grad_h_seq, grad_c_last, x, weight, peephole, h0, c0, h_seq, c_last, c_seq, z_seq,
            bias, lengths, recurrent_mask)
    if use_graphs and graphs.can_capture(x):
        run = _backward_runner(spec, needs)
        return graphs.BACKWARD.run(run, args, key=(spec, needs), layouts=_ARG0_SEQ_LAYOUT)
    # Saved gates carrying gate_buffer's mark are the forward's own, read by this backward
    # alone: it overwrites them as the eager one does, and a second backward over the same
    # forward (retain_graph) finds them marked used and runs the forward again. This knowingly
    # breaks the op's schema, which declares no input mutable (torch's SchemaCheckMode says
    # so): declared, functionalization would copy the gates first, the very cost avoided.
    claimed = gate_buffer.claim(z_seq) if keep_gates and z_seq.dtype == x.dtype else None
    if claimed is None:
        return _backward_runner(spec, needs)(*args)
    if claimed is False:  # (the forward's outputs are args 7-10, in its order)
        saved = _forward_runner(spec, True)(x, weight, bias, peephole, h0, c0, lengths,
                                            recurrent_mask)
        args = (*args[:7], *saved, *args[11:])
    # Torch's in-place math (fp64, the first step's h0 gradient) bumps z_seq's version: a
    # second backward must still unpack it, find the mark used and rerun the forward.
    with torch.autograd._unsafe_preserve_version_counter(args[10]):
        return _backward_runner(spec, needs, consume=True)(*args)


@layer_backward_op.register_fake
def _(grad_h_seq, grad_c_last, x, weight, peephole, h0, c0, h_seq, c_last, c_seq, z_seq,
      dilation, backend, needs, use_graphs, keep_gates=True, bias=None, padding_mode="zeros",
      lengths=None, recurrent_mask=None, fused=False):
    likes = _grad_likes(x, weight, peephole, h0, c0)
    return [
        torch.empty_like(like) if need and like is not None else x.new_empty(0)
        for need, like in zip(needs, likes)
    ]


def _grad_likes(x, weight, peephole, h0, c0):
    """The tensors each gradient takes its shape and strides from (fake and real alike)."""
    return (x, weight, weight.new_empty(weight.shape[0]), peephole, h0, c0)


def _setup_context(ctx, inputs, output):
    (x, weight, bias, peephole, h0, c0, dilation, backend, save, use_graphs, keep_gates, fused,
     padding_mode, lengths, recurrent_mask) = inputs
    h_seq, c_last, c_seq, z_seq = output
    ctx.mark_non_differentiable(c_seq, z_seq)
    # Otherwise autograd hands the backward zero-filled (T, B, 4*hid, H, W) gradients for the
    # saved buffers nobody differentiates, and zeros for unused outputs.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, bias, peephole, h0, c0, h_seq, c_last, c_seq, z_seq,
                          lengths, recurrent_mask)
    # fused too: a forward the backward reruns (after a replay overwrote what it saved) must
    # round as the first run did.
    ctx.config = (LayerSpec(tuple(dilation), backend, keep_gates, fused, padding_mode), save,
                  use_graphs, bias is not None)


def _backward(ctx, grad_h_seq, grad_c_last, _grad_c_seq, _grad_z_seq, backward_fn=None):
    spec, save, use_graphs, has_bias = ctx.config
    if not save:
        raise RuntimeError(
            "ConvLSTM: backward through a forward that ran without grad tracking (nothing saved)"
        )
    (x, weight, bias, peephole, h0, c0, h_seq, c_last, c_seq, z_seq, lengths,
     recurrent_mask) = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    needs[2] = needs[2] and has_bias
    if backward_fn is None:  # the custom op (torch.compile)
        grads = layer_backward_op(
            grad_h_seq, grad_c_last, x, weight, peephole, h0, c0, h_seq, c_last, c_seq, z_seq,
            spec.dilation, spec.backend, needs, use_graphs, spec.keep_gates, bias,
            spec.padding_mode, lengths, recurrent_mask, spec.fused,
        )
    else:
        grads = backward_fn(ctx, grad_h_seq, grad_c_last, x, weight, bias, peephole, h0, c0,
                            h_seq, c_last, c_seq, z_seq, lengths, recurrent_mask, spec,
                            tuple(bool(n) for n in needs), use_graphs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    # No gradient for the 7 settings, the lengths, and the mask (a constant of the call).
    return (*grads, *([None] * 9))


layer_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """The op's forward and backward without the custom-op dispatch (eager mode only).

    With CUDA graphs, the saved pre-activations and cells stay in the forward entry's static
    buffers (no clone), and the backward graph reads them there (no copy in): two passes over
    the largest tensors and their memory saved. A later replay of the same entry overwrites
    them; the entry's generation tells, and the backward then replays the forward once more
    from the saved inputs before reading.
    """

    @staticmethod
    def forward(ctx, *inputs):  # the op's 15 inputs, the graph slot, static_outputs
        output, ctx.graph = _eager_forward(*inputs)
        ctx.consumed = False
        _setup_context(ctx, inputs[:15], output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        # The engine runs a backward with grad mode on exactly when create_graph=True: a second
        # derivative through this one would silently miss its terms (once_differentiable
        # raises only when an incoming gradient requires grad; a .sum() loss's does not).
        if torch.is_grad_enabled():
            raise RuntimeError(
                "ConvLSTM: double backward is not supported: its backward is not itself "
                "differentiable, so create_graph=True through the layer (gradient penalties, "
                "Hessian-vector products, MAML) would miss its second-order terms")
        # Unpacking the saved tensors checks their versions: not while another thread's replay
        # or backward is updating the shared buffers (their counters are restored only after).
        with graphs.LOCK if ctx.graph is not None else contextlib.nullcontext():
            return (*_backward(ctx, *grads, backward_fn=_eager_backward), None, None)


@_on_device
def _eager_forward(x, weight, bias, peephole, h0, c0, dilation, backend, save, use_graphs,
                   keep_gates=True, fused=False, padding_mode="zeros", lengths=None,
                   recurrent_mask=None, slot=None, static_outputs=False):
    if not (save and use_graphs and graphs.can_capture(x)):
        return _forward_impl(x, weight, bias, peephole, h0, c0, dilation, backend, save,
                             use_graphs, keep_gates, fused, padding_mode, lengths,
                             recurrent_mask), None
    spec = LayerSpec(tuple(dilation), backend, keep_gates, fused, padding_mode)
    with graphs.LOCK:  # the generation read must be this call's replay's
        out, entry = graphs.FORWARD.run_with_entry(
            _forward_runner(spec, save),
            (x, weight, bias, peephole, h0, c0, lengths, recurrent_mask),
            key=(spec, save), owner=slot, keep=range(4) if static_outputs else (2, 3),
            layouts=_ARG0_SEQ_LAYOUT,
        )
        if entry is None:  # the uncaptured warm-up call: its outputs are fresh tensors
            return tuple(out), None
        # Aliases, so autograd never touches the static tensors' own metadata (nor hands the
        # same tensor object to two calls).
        return tuple(t.detach() for t in out), (entry, entry.generation)


@_on_device
def _eager_backward(ctx, grad_h_seq, grad_c_last, x, weight, bias, peephole, h0, c0, h_seq,
                    c_last, c_seq, z_seq, lengths, recurrent_mask, spec, needs, use_graphs):
    # The backward overwrites the saved gates with their gradients (no gradient buffer of the
    # same size). A second backward through the same forward (retain_graph=True) then finds
    # them gone and recomputes them: ctx.consumed, or a changed generation with graphs.
    run = _backward_runner(spec, needs, consume=True)
    inputs = (x, weight, bias, peephole, h0, c0, lengths, recurrent_mask)
    saved = (h_seq, c_last, c_seq, z_seq)
    # What layer_backward overwrites (saved gates in another dtype, or none, are left intact).
    consumes = spec.keep_gates and z_seq.dtype == x.dtype
    if ctx.graph is None or not graphs.can_capture(x):
        # Uncaptured forward, or inside someone else's capture (then recompute, uncaptured).
        if ctx.consumed or ctx.graph is not None:
            saved = _forward_runner(spec, True)(*inputs)
        ctx.consumed = consumes
        # Torch's in-place math bumps z_seq's version; autograd must still unpack it later.
        with torch.autograd._unsafe_preserve_version_counter(saved[3]):
            return run(grad_h_seq, grad_c_last, x, weight, peephole, h0, c0, *saved, bias,
                       lengths, recurrent_mask)
    # From here on under graphs.LOCK (_EagerLayer.backward holds it whenever ctx.graph is set):
    # no other thread's replay between the generation check and the backward's reads.
    entry, generation = ctx.graph
    if entry.generation != generation:  # replayed or consumed since: restore this call's buffers
        entry.replay(inputs, keep=range(4))
    if consumes:  # before running: a backward that fails half-way leaves them garbage too
        entry.mark_consumed()
    xs, ws, bs, ps, h0s, c0s, ls, ms = entry.static_inputs
    args = (grad_h_seq, grad_c_last, xs, ws, ps, h0s, c0s, *entry.static_outputs, bs, ls, ms)
    graphs.release_collected()  # now, so that `entry.dropped` below is up to date
    if entry.dropped:  # its module was collected, or the LRU let it go: no new captures on it
        with torch.autograd._unsafe_preserve_version_counter(entry.static_outputs[3]):
            return run(*args)
    # Capturing runs the backward once (warm-up), which consumes the forward's buffers.
    restore = (lambda: entry.replay(inputs, keep=range(4))) if consumes else None
    with torch.autograd._unsafe_preserve_version_counter(entry.static_outputs[3]):
        return graphs.BACKWARD.run_with_entry(
            run, args, key=(spec, needs, entry), shared=range(2, 14), layouts=_ARG0_SEQ_LAYOUT,
            before_replay=restore,
        )[0]


def _one_step(x_t, weight, bias, peephole, h0, c0, dilation, padding_mode):
    """One frame in inference on CPU (streaming, T=1 chunks): the cell's step, without the
    loop's sequence buffers (at hid16 16x16 their allocations and layout copies cost more than
    the step: 350 -> 213 us a frame, one thread). Same outputs as layer_forward, with empty
    saved tensors."""
    if c0 is None:
        b, _, *spatial = x_t.shape
        c0 = x_t.new_zeros((b, weight.shape[0] // 4, *spatial), dtype=state_dtype(x_t.dtype))
    h, c = cell_step(x_t, h0, c0, weight, bias, peephole, dilation, "torch",
                     padding_mode=padding_mode)
    empty = x_t.new_empty(0)
    return h.unsqueeze(0), c, empty, empty


def run_layer(x: Tensor, weight: Tensor, bias: Tensor | None, peephole: Tensor | None,
              h0: Tensor | None, c0: Tensor | None, dilation: Sequence[int], backend: str,
              save: bool, use_graphs: bool, keep_gates: bool = True, fused: bool = False,
              padding_mode: str = "zeros", lengths: Tensor | None = None,
              recurrent_mask: Tensor | None = None, slot: int | None = None,
              static_outputs: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer over the sequence: the custom op while torch.compile traces (opaque, so the
    loop is not unrolled), else the same code called directly.

    Args:
        x, weight, bias, peephole, h0, c0, dilation, backend, save, use_graphs, keep_gates,
            fused, padding_mode, lengths, recurrent_mask: as :func:`layer_forward_op`'s.
        slot: graphs.slot_of of the calling module, or None: gives each layer its own captured
            forward in training, and counts it among the users of the inference captures it
            shares with others.
        static_outputs: with a captured loop, h_seq and c_last may be the capture's own
            buffers (no clone), which the entry's next replay overwrites (in inference an entry
            serves every layer and module with the same signature: any such call): for a
            caller that copies what it keeps at once. In training the backward still finds
            them (the entry's generation tells when to replay); a later layer that saves its
            input must not get them.

    Returns:
        (h_seq, c_last, c_seq, z_seq), as :func:`layer_forward_op` returns.
    """
    args = (x, weight, bias, peephole, h0, c0, list(dilation), backend, save, use_graphs,
            keep_gates, fused, padding_mode, lengths, recurrent_mask)
    if torch.compiler.is_compiling():
        return layer_forward_op(*args)
    if (not save and x.shape[0] == 1 and backend == "torch" and x.device.type == "cpu"
            and lengths is None and recurrent_mask is None
            and not (use_graphs and graphs.can_capture(x))):
        return _one_step(x[0], weight, bias, peephole, h0, c0, dilation, padding_mode)
    if not save:
        return _forward_impl(*args, static_outputs=static_outputs, user=slot)
    return _EagerLayer.apply(*args, slot, static_outputs)
