"""Which implementation of the gate update runs: Triton kernels or plain torch."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


_PROBE: list = []  # [None] or [reason] once probed


def triton_import_error() -> str | None:
    """None when Triton imports, else the reason it does not (probed once).

    A plain global rather than functools.lru_cache: torch.compile traces the callers and warns
    about lru_cache-wrapped functions. The modules probe at construction, so tracing only reads.
    """
    if not _PROBE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _PROBE.append(f"{type(exc).__name__}: {exc}")
        else:
            _PROBE.append(None)
    return _PROBE[0]


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (slowly); CI uses it."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def exporting() -> bool:
    """Whether an exporter (torch.export, torch.onnx.export, torch.jit.trace) is capturing the
    call rather than running it. Exported programs run where this package's Python ops cannot
    (ONNX Runtime, AOTInductor, ExecuTorch, TensorRT): they get standard torch ops only.
    (torch.onnx.export captures through one of the other two; asking torch.onnx itself would
    import it, 30 ms, on the first forward of every program.)

    The flag behind ``torch.compiler.is_exporting()`` is read rather than the function: dynamo
    before torch 2.13 answers that call with a constant True while it traces, torch.compile
    included, which sent every compiled model down the unrolled export path (found on a GPU
    box's torch 2.11). Both export modes set the flag while they trace in the torch versions
    read (non-strict through torch.export's compiling-state context, strict through dynamo's
    export entry points), and dynamo reads a module attribute as its value at trace time (with
    a guard). A strict export by an older torch that did not set it would keep this package's
    op in the exported program (runnable where the package is installed, not elsewhere)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is None:  # a torch without the flag: its function is all there is
        flag = torch.compiler.is_exporting()
    return bool(flag) or torch.jit.is_tracing()


def cudnn_conv_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32 for fp32, whichever API set it.

    The legacy ``torch.backends.cudnn.allow_tf32`` raises once a user set the per-op flags of
    the newer API to disagree (``torch.backends.cudnn.conv.fp32_precision = "ieee"`` alone
    leaves the RNN flag at "tf32"); then the convolution's own flag decides, "none" deferring
    to cuDNN's and then to the global one."""
    cudnn = torch.backends.cudnn
    try:
        return bool(cudnn.allow_tf32)
    except RuntimeError:
        for scope in (getattr(cudnn, "conv", None), cudnn, torch.backends):
            precision = getattr(scope, "fp32_precision", "none")
            if precision != "none":
                return precision == "tf32"
        return False


def check_backend_name(backend: str) -> None:
    """Raises a ValueError unless backend is one of :data:`BACKENDS`.

    Args:
        backend: the user's choice, as passed.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map the user's choice to "triton" or "torch" for tensors on ``device`` of ``dtype``.

    "auto" picks Triton on CUDA when it imports, torch otherwise. "triton" raises a RuntimeError
    naming the reason when it cannot run (no Triton, or CPU tensors outside the interpreter).
    float64 always runs the torch path: the kernels compute in float32. So does a call being
    exported (:func:`exporting`), whatever was asked for.

    Args:
        backend: "auto", "torch" or "triton".
        device: the tensors' device.
        dtype: the compute dtype, or None (not float64).

    Returns:
        "triton" or "torch".

    Raises:
        ValueError: an unknown backend.
        RuntimeError: "triton" where it cannot run.
    """
    check_backend_name(backend)
    # Meta tensors (shape inference) take the torch path whatever was asked: its ops have meta
    # kernels, the Triton launchers none.
    if backend == "torch" or dtype == torch.float64 or device.type == "meta" or exporting():
        return "torch"
    err = triton_import_error()
    on_cuda = device.type == "cuda"
    if backend == "auto":
        return "triton" if on_cuda and err is None else "torch"
    if err is not None:
        raise RuntimeError(f"backend='triton' needs Triton, which failed to import ({err})")
    if not on_cuda and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' got tensors on {device}; Triton runs on CUDA devices, or on CPU "
            "only under TRITON_INTERPRET=1 (the interpreter, for testing)"
        )
    return "triton"
