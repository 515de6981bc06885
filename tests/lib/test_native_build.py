"""native_build: the CPU gate kernels built once into a private cache, the reason kept where
they cannot be (torch ops then), and the switches that turn them off."""

import ctypes
import fnmatch
import os
import re
from pathlib import Path

import pytest
import torch

from triton_convlstm import native_build, native_gates


def _case():
    z = torch.randn(3, 20, 4, 3).contiguous(memory_format=torch.channels_last)
    c_prev = torch.randn(3, 5, 4, 3).contiguous(memory_format=torch.channels_last)
    return z, c_prev


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """native_build with its own cache directory and a fresh load; restored after."""
    monkeypatch.setenv(native_build.ENV_CACHE, str(tmp_path))
    native_build.reset()
    yield tmp_path
    monkeypatch.undo()
    native_build.reset()


def test_builds_into_its_cache_once(fresh_build):
    assert native_build.library() is not None, native_build.load_error()
    (built,) = fresh_build.glob("kernels-*.so")
    stamp = built.stat().st_mtime_ns
    native_build.reset()
    assert native_build.library() is not None
    assert built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_working_compiler_the_reason_is_kept_and_torch_ops_run(fresh_build,
                                                                         monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert native_build.library() is None
    assert "false" in native_build.load_error() and "exited" in native_build.load_error()
    z, c_prev = _case()
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert not native_gates.gate_forward(z, None, c_prev, None, h, c, None)


def test_a_compiler_command_with_arguments_and_a_corrupt_cached_build(fresh_build,
                                                                      monkeypatch):
    cc = native_build.compiler()
    monkeypatch.setenv("CC", f"env {' '.join(cc)}")  # as "ccache gcc" would be split
    _, _, path = native_build.build_plan()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_bytes(b"")  # a truncated file where the build should be (a full disk, say)
    assert native_build.library() is not None, native_build.load_error()  # built again
    assert path.stat().st_size > 0


def test_a_cache_directory_others_can_write_is_not_loaded_from(fresh_build):
    fresh_build.chmod(0o777)
    assert native_build.library() is None
    assert "writable by others" in native_build.load_error()


def test_turned_off_by_the_environment(fresh_build, monkeypatch):
    monkeypatch.setenv(native_build.ENV_SWITCH, "0")
    assert native_build.library() is None
    assert native_build.ENV_SWITCH in native_build.load_error()


def test_every_file_the_build_reads_is_installed_with_the_package():
    # A wheel carries only what package-data names: a missing header would leave an installed
    # package without its kernels (the torch ops then), with nothing failing loudly.
    root = Path(native_build.__file__).parent
    text = (root.parent / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    patterns = re.findall(r'"([^"]+)"', re.search(r"triton_convlstm = \[(.*?)\]", section,
                                                  re.S).group(1))
    for path in native_build.SOURCES + native_build.HEADERS:
        name = path.relative_to(root).as_posix()
        assert any(fnmatch.fnmatch(name, p) for p in patterns), (name, patterns)
    assert sorted(p.name for p in (root / "csrc").iterdir()) == sorted(
        p.name for p in native_build.SOURCES + native_build.HEADERS)  # none left unbuilt


def test_the_shares_run_on_the_openmp_runtime_torch_runs_on(fresh_build):
    """Where torch runs on libgomp (the Linux wheels), the library links that very runtime,
    whose workers are torch's (even where another package loaded a copy of its own)."""
    runtime = native_build.openmp_runtime()
    if runtime is None:
        pytest.skip("torch's threads run on no GNU OpenMP runtime here: built without OpenMP")
    assert runtime.exists()
    lib = native_build.library()
    assert lib is not None, native_build.load_error()
    assert native_build.parallel()
    # the library's OpenMP calls bind to torch's runtime, not to a copy of the compiler's
    info = native_build._DlInfo()
    fn = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p)
    assert ctypes.CDLL(None).dladdr(fn, ctypes.byref(info))
    assert Path(os.fsdecode(info.dli_fname)).resolve() == runtime.resolve()


def test_without_the_runtime_it_builds_without_openmp_and_the_pool_runs_the_shares(
        fresh_build, monkeypatch):
    monkeypatch.setattr(native_build, "openmp_runtime", lambda: Path("/nonexistent/libgomp.so.1"))
    assert native_build.library() is not None, native_build.load_error()  # (the fallback)
    assert not native_build.parallel()
    monkeypatch.setattr(native_gates, "ELEMENTS_PER_THREAD", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        z, c_prev = _case()
        h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
        assert len(native_gates._plans((z, c_prev, c_prev, c_prev))) == 3
        assert native_gates.gate_forward(z, None, c_prev, None, h, c, None)
    finally:
        torch.set_num_threads(threads)
    h_ref, c_ref = torch.empty_like(c_prev), torch.empty_like(c_prev)
    native_build.reset()
    monkeypatch.undo()
    assert native_gates.gate_forward(z, None, c_prev, None, h_ref, c_ref, None)  # one thread
    assert torch.equal(h, h_ref) and torch.equal(c, c_ref)
