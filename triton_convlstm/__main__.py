"""Command line: ``python -m triton_convlstm {demo,bench,info} ...``."""

from __future__ import annotations

import sys

USAGE = """usage: python -m triton_convlstm COMMAND [options]

commands:
  demo     train a small nowcasting model on moving digits (see --help)
  bench    compare this layer with the common formulation (see --help); also
           `bench compare OLD.json NEW.json` and `bench table RESULTS.json ...`
  info     versions, devices and which backend would run
"""


def _info() -> int:
    import platform

    import torch

    from .backend import interpreter_enabled, resolve_backend, triton_import_error

    print(f"python  {platform.python_version()}")
    print(f"torch   {torch.__version__}")
    err = triton_import_error()
    if err is None:
        import triton

        print(f"triton  {triton.__version__}")
    else:
        print(f"triton  unavailable ({err})")
    cuda = torch.cuda.is_available()
    print(f"cuda    {torch.cuda.get_device_name() if cuda else 'not available'}")
    device = torch.device("cuda" if cuda else "cpu")
    print(f"backend 'auto' on {device}: {resolve_backend('auto', device)}")
    print(f"TRITON_INTERPRET {'on' if interpreter_enabled() else 'off'}")
    from . import native_build

    lib, why = native_build.library(), native_build.load_error()
    state = "built: " + lib._name if lib is not None else "off: " + str(why)
    print(f"cpu kernels (gates, small 1-d/3-d convolutions) {state}")
    if lib is not None:
        fused = "on" if native_build.has_sgemm() else "off (no BLAS sgemm in torch's libraries)"
        print(f"cpu one-step kernel (streaming inference) {fused}")
        print(f"cpu 3x3 convolutions by Winograd F(2x2, 3x3) {fused}")
        runtime = native_build.openmp_runtime()
        workers = (f"torch's OpenMP workers ({runtime})" if native_build.parallel()
                   else "a Python thread pool (torch runs no GNU OpenMP here)")
        print(f"cpu kernels' threads {workers}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .apps.demo.command import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from .apps.bench.command import main as bench_main

        return bench_main(rest)
    if command == "info":
        if rest in (["-h"], ["--help"]):
            print("usage: python -m triton_convlstm info\n\nPrints the versions of Python, "
                  "torch and Triton, the CUDA device and which backend 'auto' picks.")
            return 0
        if rest:
            print(f"error: info takes no arguments, got {' '.join(rest)}", file=sys.stderr)
            return 2
        return _info()
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
