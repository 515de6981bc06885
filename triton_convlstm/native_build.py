"""The CPU kernels (``csrc/gates.c``, ``csrc/im2col.c``, ``csrc/winograd.c``,
``csrc/step.c``, ``csrc/parallel.c``): built on first use, cached on disk, loaded by ctypes.

Plain C without torch headers builds in about 5 s (2-core box) with the system's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) for this machine's CPU (``-march=native``: the
kernels' transcendental loops are vectorized) into one library, cached under
``$TRITON_CONVLSTM_CACHE`` (default ``~/.cache/triton_convlstm``), keyed by the sources, the
flags, the compiler and the CPU, so a shared home directory serves each machine its own build.
Where torch runs on an OpenMP runtime with GNU OpenMP's entry points (the Linux wheels'
libgomp), the library links that same runtime, so that a call split between threads runs on
torch's own workers (``csrc/parallel.c``; the columns steps and the small convolutions'
gradients share theirs inside C, in "omp parallel" regions); where it cannot, it is built
without, the shares of split calls run on a Python thread pool (:func:`parallel`), and those
C calls on one thread.

Where nothing builds (no compiler, a failed build, ``TRITON_CONVLSTM_NATIVE=0``), :func:`library`
answers None and the CPU path computes the same function with torch ops (slower at small
sizes): :func:`load_error` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

_CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(_CSRC / name for name in ("gates.c", "im2col.c", "winograd.c", "step.c",
                                          "parallel.c"))
HEADERS = (_CSRC / "kernels.h",)
# -fopenmp-simd honours the source's "omp simd" loops without linking an OpenMP runtime; errno
# and FP traps off so that the activations vectorize (no -ffast-math: NaN and inf must behave).
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
# With torch's libgomp: the sources compiled with -fopenmp (tcl_parallel's "omp parallel"),
# then linked to that file itself (not the compiler's -lgomp, which could load a second copy),
# every symbol resolved at link time (-z defs: a compiler whose OpenMP calls libgomp lacks,
# clang's, fails there and the build goes on without).
OPENMP_COMPILE, OPENMP_LINK = ("-fopenmp",), ("-Wl,-z,defs",)
ARCH_FLAGS = ("-march=native",)  # where the CPU can be identified (Linux), else the baseline
ENV_SWITCH = "TRITON_CONVLSTM_NATIVE"
ENV_CACHE = "TRITON_CONVLSTM_CACHE"
ENV_CC = "CC"

_LOCK = threading.Lock()
_STATE: list = []  # [(library or None, error or None)] once tried


class Rows(ctypes.Structure):
    """One tensor's strides (elements) as the C side sees it: per sample and per row."""

    _fields_ = [("b", ctypes.c_int64), ("m", ctypes.c_int64)]


class Plan(ctypes.Structure):
    """A call's sizes and strides (``plan_t`` in gates.c): built once per layout, then passed
    by reference with each call's pointers."""

    _fields_ = [("B", ctypes.c_int64), ("m_begin", ctypes.c_int64), ("m_end", ctypes.c_int64),
                ("N", ctypes.c_int64), ("hid", ctypes.c_int64), ("peep_on_n", ctypes.c_int64),
                ("gate_step", ctypes.c_int64 * 2), ("rows", Rows * 8)]


class Geometry(ctypes.Structure):
    """A small convolution's sizes (``geom_t``): the frame (1-d and 2-d with unit leading
    dims), kernel, dilation, the pads before each dim and each dim's total pad."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "B", "D", "H", "W", "KD", "KH", "KW", "dd", "dh", "dw", "pd", "ph", "pw", "td", "th",
        "tw")]


class Layout(ctypes.Structure):
    """A tensor as (B, channels, pixels) for im2col.c (``layout_t``): element strides."""

    _fields_ = [(name, ctypes.c_int64) for name in ("channels", "sample", "channel", "pixel")]


class WinogradPlan(ctypes.Structure):
    """A 3x3 convolution's sizes for winograd.c (``winograd_plan_t``)."""

    _fields_ = [*[(name, ctypes.c_int64) for name in ("B", "H", "W", "tiles_h", "tiles_w")],
                ("x", Layout), ("h", Layout),
                *[(name, ctypes.c_int64) for name in (
                    "channels", "out", "u_step", "z_sample", "z_pixel", "block", "tile_begin",
                    "tile_end", "gemm_threads")]]


class StepPlan(ctypes.Structure):
    """A fused inference step's sizes (``step_plan_t`` in step.c)."""

    _fields_ = [("g", Geometry), ("x", Layout), ("h", Layout),
                ("gates", Plan), ("rows", ctypes.c_int64), ("out", ctypes.c_int64),
                ("pixels", ctypes.c_int64), ("w_row", ctypes.c_int64),
                ("z_pixel_major", ctypes.c_int64), ("tile_rows", ctypes.c_int64),
                ("z_in_gates", ctypes.c_int64), ("winograd", ctypes.c_int64),
                ("wino", WinogradPlan), ("threads", ctypes.c_int64),
                ("gate_threads", ctypes.c_int64)]


class ConvGradPlan(ctypes.Structure):
    """A small convolution's input or weight gradient, piece by piece
    (``conv_grad_plan_t``)."""

    _fields_ = [("g", Geometry),
                *[(name, ctypes.c_int64) for name in (
                    "frames", "out", "pixels", "grad_frame", "grad_channel", "grad_pixel",
                    "w_row")],
                ("x", Layout), ("chunk", ctypes.c_int64), ("threads", ctypes.c_int64)]


_P = ctypes.c_void_p
_G, _L = ctypes.POINTER(Geometry), ctypes.POINTER(Layout)
_SIGNATURES = {  # name: (argument types, result type)
    "tcl_gate_forward": ([ctypes.POINTER(Plan)] + [_P] * 7, None),
    "tcl_gate_backward": ([ctypes.POINTER(Plan)] + [_P] * 10, None),
    "tcl_im2col": ([_G, _L, _P, _L, _P, _L, _P], ctypes.c_int),
    "tcl_col2im": ([_G, _L, _P, _L, _P], ctypes.c_int),
    "tcl_input_grad": ([ctypes.POINTER(ConvGradPlan)] + [_P] * 4, ctypes.c_int),
    "tcl_weight_grad": ([ctypes.POINTER(ConvGradPlan)] + [_P] * 4, ctypes.c_int),
    "tcl_conv_grad_scratch": ([ctypes.POINTER(ConvGradPlan)], ctypes.c_int64),
    "tcl_set_sgemm": ([_P], None),
    "tcl_set_blas_threads": ([_P], None),
    "tcl_step_forward": ([ctypes.POINTER(StepPlan)] + [_P] * 11, ctypes.c_int),
    "tcl_winograd_scratch": ([ctypes.POINTER(WinogradPlan)], ctypes.c_int64),
    "tcl_winograd_weight": ([ctypes.c_int64] * 2 + [_P] + [ctypes.c_int64] * 4
                            + [ctypes.c_int, _P], None),
    "tcl_winograd3x3": ([ctypes.POINTER(WinogradPlan)] + [_P] * 6, ctypes.c_int),
    "tcl_winograd_weight_grad": ([ctypes.POINTER(WinogradPlan)] + [_P] * 5, ctypes.c_int),
    "tcl_winograd_weight_back": ([ctypes.c_int64] * 2 + [_P] * 2, None),
    "tcl_parallel": ([ctypes.c_int, ctypes.c_int64, _P, _P, ctypes.c_int64], ctypes.c_int),
    "tcl_parallel_threads": ([], ctypes.c_int),
}


def enabled() -> bool:
    """False when ``TRITON_CONVLSTM_NATIVE=0`` turns the kernels off (torch ops then)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "triton_convlstm"


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` if set (split as a shell would: ``ccache gcc``), else
    the first of cc, gcc, clang found."""
    if os.environ.get(ENV_CC):
        return shlex.split(os.environ[ENV_CC])
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return None if found is None else [found]


def _cpu_identity() -> str | None:
    """What -march=native builds for: the CPU's model and feature flags (Linux); None where
    they cannot be read, and the build is then for the architecture's baseline (a cache
    shared by different machines must not hand one another's instructions to another)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in wanted]
    return "\n".join(sorted(set(lines)))


def _private_dir(path: Path) -> str | None:
    """None where ``path`` is a directory only this user can write (a library loaded from it
    runs as this process), else why not. Made (0700) if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to another user"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (chmod go-w it, or set {ENV_CACHE})"
    return None


def _build(cc: list[str], arch: tuple[str, ...], out: Path) -> str | None:
    """Compiles SOURCES into ``out`` (atomically: concurrent builds each replace it whole):
    with ``arch`` and torch's OpenMP runtime, else without the runtime, else without ``arch``
    either; None on success, else the compiler's words."""
    runtime = openmp_runtime()
    tries = [(arch, runtime)] if runtime is not None else []
    tries += [(arch, None)] + ([((), None)] if arch else [])
    errors = []
    for flags, rt in tries:
        error = _compile(cc, flags, out, rt)
        if error is None:
            return None
        errors.append(error)
    return "\n".join(errors)


def _compile(cc: list[str], arch: tuple[str, ...], out: Path,
             runtime: Path | None = None) -> str | None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    objects = []
    if runtime is None:
        cmds = [[*cc, *FLAGS, *arch, "-o", tmp, *map(str, SOURCES)]]
    else:  # (objects first, so that -fopenmp does not link the compiler's own runtime)
        objects = [f"{tmp}.{k}.o" for k in range(len(SOURCES))]
        flags = [f for f in FLAGS if f not in ("-shared", "-fopenmp-simd")]
        cmds = [[*cc, *flags, *OPENMP_COMPILE, *arch, "-c", str(src), "-o", obj]
                for src, obj in zip(SOURCES, objects)]
        cmds.append([*cc, "-shared", *OPENMP_LINK, "-o", tmp, *objects, str(runtime)])
    error = None
    try:
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                error = f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
                break
    except (OSError, subprocess.SubprocessError) as exc:
        error = f"{' '.join(cmd)}: {exc}"
    for obj in objects:
        Path(obj).unlink(missing_ok=True)
    if error is not None:
        Path(tmp).unlink(missing_ok=True)  # (a failed link may have removed it already)
        return error
    os.replace(tmp, out)
    return None


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    sgemm = _torch_sgemm()
    lib.tcl_set_sgemm(sgemm)
    lib.has_sgemm = sgemm is not None  # (read by has_sgemm)
    lib.tcl_set_blas_threads(_torch_symbol("MKL_Set_Num_Threads_Local"))
    lib.openmp_pid = os.getpid() if lib.tcl_parallel_threads() else None  # (see parallel)
    return lib


def _torch_sgemm() -> int | None:
    """The address of the Fortran BLAS ``sgemm_`` in the library torch links (MKL in the x86
    wheels, OpenBLAS beside torch in others), or None: the fused step then declines."""
    return _torch_symbol("sgemm_")


def _torch_symbol(name: str) -> int | None:
    """The address ``name`` has as torch's own libraries resolve it (libtorch_cpu and what it
    links: the BLAS, see _torch_sgemm, and the OpenMP runtime), or None."""
    import torch

    root = Path(torch.__file__).parent
    found = [root / "lib" / lib for lib in ("libtorch_cpu.so", "libtorch_cpu.dylib")]
    found += sorted((root.parent / "torch.libs").glob("libopenblas*.so*"))
    for path in found:
        try:
            fn = getattr(ctypes.CDLL(str(path)), name)
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def openmp_runtime() -> Path | None:
    """The OpenMP runtime torch's threads run on: the file torch's ``GOMP_parallel`` (GNU
    OpenMP's entry point, which gcc's "omp parallel" calls) binds to, or None (no such
    runtime, no dladdr). Asked of torch's own library, not of the process: another package
    may have loaded a copy of its own (scikit-learn's vendored libgomp, say)."""
    fn = _torch_symbol("GOMP_parallel")
    try:
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    info = _DlInfo()
    if fn and dladdr(ctypes.c_void_p(fn), ctypes.byref(info)) and info.dli_fname:
        return Path(os.fsdecode(info.dli_fname))
    return None


def parallel() -> bool:
    """Whether the loaded library runs a call's shares on torch's OpenMP threads
    (``tcl_parallel``); else native_gates runs them on a Python thread pool. Not in a forked
    child: GNU OpenMP's threads do not survive a fork, and its next parallel region waits on
    them for ever (torch's own ops too, unless the child keeps to one thread, as DataLoader
    workers do); the pool there is the child's own."""
    lib = library()
    return lib is not None and lib.openmp_pid == os.getpid()


def threads() -> int:
    """The threads a call may share (torch's, where :func:`parallel`, else one): part of
    the keys of plans made for them."""
    import torch

    return torch.get_num_threads() if parallel() else 1


def has_sgemm() -> bool:
    """Whether the loaded library was handed a BLAS sgemm (the fused step needs one)."""
    lib = library()
    return lib is not None and lib.has_sgemm


def build_plan() -> tuple[list[str], tuple[str, ...], Path] | None:
    """(compiler command, architecture flags, the cached library's path) for this machine, or
    None without a compiler. The path names a hash of the sources, flags, compiler and CPU."""
    cc = compiler()
    if not cc:
        return None
    cpu = _cpu_identity()
    arch = ARCH_FLAGS if cpu is not None else ()
    texts = [s.read_text() for s in SOURCES + HEADERS]
    runtime = openmp_runtime()
    key = hashlib.sha256("\0".join([*texts, " ".join(FLAGS + arch), *cc,
                                    platform.machine(), cpu or "",
                                    str(runtime or "")]).encode())
    return cc, arch, cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if not enabled():
        return None, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    plan = build_plan()
    if plan is None:
        return None, "no C compiler found (set CC, or install cc/gcc/clang)"
    cc, arch, path = plan
    try:
        error = _private_dir(path.parent)
        if error is None and not path.exists():
            error = _build(cc, arch, path)
    except OSError as exc:  # an unwritable cache directory
        error = f"cannot build into {path.parent}: {exc}"
    if error is not None:
        return None, error
    try:
        return _open(path), None
    except (OSError, AttributeError):  # a truncated or foreign file: built again, once
        try:
            error = _build(cc, arch, path)
            return (_open(path), None) if error is None else (None, error)
        except (OSError, AttributeError) as exc:
            return None, f"cannot load {path}: {exc}"


def library() -> ctypes.CDLL | None:
    """The loaded kernels (built on the first call of a process), or None where they cannot
    be had (see :func:`load_error`)."""
    if not _STATE:
        with _LOCK:
            if not _STATE:
                _STATE.append(_load())
    return _STATE[0][0]


def load_error() -> str | None:
    """Why :func:`library` is None (after it was called), else None."""
    library()
    return _STATE[0][1]


def reset() -> None:
    """Forget the loaded library, so that the next :func:`library` call tries again (tests
    change the environment between calls)."""
    with _LOCK:
        _STATE.clear()
