"""The CPU gate kernels (``csrc/gates.c``): built on first use, cached on disk, loaded by ctypes.

Plain C without torch headers builds in well under a second with the system's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) for this machine's CPU (``-march=native``: the
kernels' transcendental loops are vectorized). The library is cached under
``$TRITON_CONVLSTM_CACHE`` (default ``~/.cache/triton_convlstm``), keyed by the source, the
flags, the compiler and the CPU, so a shared home directory serves each machine its own build.

Where nothing builds (no compiler, a failed build, ``TRITON_CONVLSTM_NATIVE=0``), :func:`library`
answers None and the CPU path computes the same function with torch ops (slower at small
sizes): :func:`load_error` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "gates.c"
# -fopenmp-simd honours the source's "omp simd" loops without linking an OpenMP runtime; errno
# and FP traps off so that the activations vectorize (no -ffast-math: NaN and inf must behave).
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
ARCH_FLAGS = ("-march=native",)  # tried first; a compiler without it builds for the baseline
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


_P = ctypes.c_void_p
_SIGNATURES = {
    "tcl_gate_forward": [ctypes.POINTER(Plan)] + [_P] * 7,
    "tcl_gate_backward": [ctypes.POINTER(Plan)] + [_P] * 10,
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


def compiler() -> str | None:
    """The C compiler to build with: ``$CC`` if set, else the first of cc, gcc, clang."""
    if os.environ.get(ENV_CC):
        return os.environ[ENV_CC]
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _cpu_identity() -> str:
    """What -march=native builds for: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in wanted]
    return "\n".join(sorted(set(lines)))


def _build(cc: str, out: Path) -> str | None:
    """Compiles SOURCE into ``out`` (atomically); None on success, else the compiler's words."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in (ARCH_FLAGS, ()):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *FLAGS, *arch, "-o", tmp, str(SOURCE)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            done, err = None, f"{' '.join(cmd)}: {exc}"
        if done is not None and done.returncode == 0:
            os.replace(tmp, out)
            return None
        os.unlink(tmp)
        if done is not None:
            err = f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        errors.append(err)
    return "\n".join(errors)


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if not enabled():
        return None, f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc/gcc/clang)"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS + ARCH_FLAGS), cc,
                                    platform.machine(), _cpu_identity()]).encode())
    path = cache_dir() / f"gates-{key.hexdigest()[:16]}.so"
    if not path.exists():
        try:
            error = _build(cc, path)
        except OSError as exc:  # an unwritable cache directory
            error = f"cannot build into {path.parent}: {exc}"
        if error is not None:
            return None, error
    try:
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
    except (OSError, AttributeError) as exc:
        return None, f"cannot load {path}: {exc}"
    return lib, None


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
