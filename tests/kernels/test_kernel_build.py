"""Every kernel builds for real GPUs (sm_90, sm_80), even on a machine without one: the gate
kernels (kernels/gates.py) and the fused forward step (kernels/fused_step.py), each with the
jitted math they share (kernels/_common.py: activations, cell update) compiled into it.

The interpreter tests run the kernels' Python, which accepts code that would not compile for a
GPU; this builds PTX and cubin with triton.compile for each load dtype and the constexpr
variants the launchers use, specialized as a real launch would be (16-byte aligned pointers,
strides of 1 as constants, other integers divisible by 16), and checks for 16-byte accesses.

TRITON_INTERPRET (set by conftest on CPU) turns @triton.jit into the interpreter, which
triton.compile cannot take, so the builds run in subprocesses, running this file as a script
without that variable.
"""

import json
import os
import re
import subprocess
import sys

import pytest

DTYPES = ("fp32", "bf16", "fp16")
# sm_90 (the target) gets every (kernel, layout, flag set) for every dtype: each constexpr flag
# takes both values, each layout meets both kernels and both flag sets. sm_80 gets each kernel
# in every dtype, layouts and flags rotating; two 64-bit-offset builds close the list.
SHAPES = [("fwd", "nchw", "on"), ("fwd", "nhwc", "off"), ("bwd", "nchw", "off"),
          ("bwd", "nhwc", "on")]  # fmt: skip
SM80 = ["fwd-nchw-on-fp32", "fwd-nhwc-off-bf16", "fwd-nhwc-on-fp16", "bwd-nhwc-on-fp32",
        "bwd-nchw-off-bf16", "bwd-nchw-on-fp16"]  # fmt: skip
WIDE = ["fwd-nhwc-on-bf16", "bwd-nchw-on-fp32"]


# The fused forward step (kernels/fused_step.py): every dtype on both targets, flags on and off.
FUSED = [f"fused-x-{flags}-{dt}-{arch}" for dt in DTYPES for flags, arch in
         (("on", "sm90"), ("off", "sm90"), ("on" if dt != "bf16" else "off", "sm80"))]


def variant_ids():
    ids = [f"{k}-{lay}-{flags}-{dt}-sm90" for dt in DTYPES for k, lay, flags in SHAPES]
    return ids + [f"{v}-sm80" for v in SM80] + [f"{v}-sm90-wide" for v in WIDE] + FUSED


def tile_accesses(vid):
    """(loads, stores) of whole [pixels x channels] tiles the kernel makes: each must be one or
    more 16-byte vector accesses (the per-channel bias/peephole loads are not counted)."""
    kernel, _, flags, *_ = vid.split("-")
    on = flags == "on"
    if kernel == "fwd":  # zx (+ zh) per gate and c_prev; h, c (+ z per gate)
        return 4 * (1 + on) + 1, 2 + 4 * on
    return 4 + 2 + 3 * on, 5  # z per gate, c_prev, c (+ dh, dh2, dc); dz per gate, dc_prev


# ---- the build, run as a script (no TRITON_INTERPRET) ------------------------------------------


def _launch_signature(fn, dtype, lowp, unit_stride, wide=False):
    """(signature, constants, attributes) as a real launch specializes them: pointers 16-byte
    aligned (``lowp`` ones in ``dtype``, the rest fp32), strides ``unit_stride`` names turned
    into the constant 1, other integers divisible by 16 (64-bit strides when ``wide``)."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name == "len_ptr":  # the per-sample lengths, int64
            sig[name] = "*i64"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in lowp else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "STEP":  # do_not_specialize: no divisibility hint at launch
            sig[name] = "i32"
        elif name.startswith("s_") and unit_stride(name):
            sig[name], const[name] = "constexpr", 1
        else:
            sig[name] = "i64" if wide and name.startswith("s_") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _fused_precision(dtype, on):
    """fp32 dots as TF32 (cuDNN's default for convolutions), or IEEE (allow_tf32 off)."""
    return ("tf32" if on else "ieee") if dtype == "fp32" else "ieee"


def _compile_fused(vid):
    """The fused step at the M layer's sizes (C 32, hidden 64, 3x3), channels_last strides."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton_convlstm.kernels import fused_step

    _, _, flags, dtype, arch = vid.split("-")
    fn = fused_step._fused_step_kernel
    # Peepholes come in fp32 whatever the data's dtype (validation.cast_params: the state dtype).
    lowp = {"x_ptr", "h_ptr", "w_ptr", "bias_ptr", "ho_ptr", "z_ptr"}
    # channels_last: every channel stride is 1
    sig, const, attrs = _launch_signature(
        fn, dtype, lowp, lambda name: name.endswith("_c") or name == "s_bias")
    on = flags == "on"
    bm, bc = fused_step._blocks(64, 64 * 64)
    dot = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[dtype]
    const.update({n: on for n in ("HAS_H", "HAS_BIAS", "HAS_PEEP", "SAVE_Z")},
                 CIN=32, HID=64, KH=3, KW=3, PREC=_fused_precision(dtype, on),
                 DOT_TY=dot, BLOCK_M=bm, BLOCK_C=bc,
                 BLOCK_KX=fused_step._block_k(32, 2 if dtype != "fp32" else 4),
                 BLOCK_KH=fused_step._block_k(64, 2 if dtype != "fp32" else 4))
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch[2:]), 32),
                              options={"num_warps": fused_step.NUM_WARPS})
    ptx = compiled.asm.get("ptx", "")
    return {"ptx": len(ptx), "cubin": len(compiled.asm.get("cubin", b"")),
            "tensor_core_ops": ptx.count("wgmma.mma_async") + ptx.count("mma.sync"),
            "shared_bytes": compiled.metadata.shared}


def _compile(vid):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton_convlstm.kernels import gates

    if vid.startswith("fused-"):
        return _compile_fused(vid)
    kernel, layout, flags, dtype, arch, *wide = vid.split("-")
    wide = bool(wide)
    fn = gates._gates_fwd_kernel if kernel == "fwd" else gates._gates_bwd_kernel
    lowp = {"zx_ptr", "zh_ptr", "h_ptr", "z_ptr", "bias_ptr", "dz_ptr", "dh_ptr",
            "dh2_ptr"}  # fmt: skip
    # The axis that is contiguous: Triton turns a stride argument equal to 1 into a constant.
    unit = ("_p", "s_bias") if layout == "nchw" else ("_c", "s_bias")
    sig, const, attrs = _launch_signature(
        fn, dtype, lowp, lambda name: name.endswith(unit) or name == "s_pe_c", wide)
    bp, bc = gates._blocks(layout == "nhwc", 64, 64 * 64)
    on = flags == "on"
    names = (["HAS_ZH", "HAS_BIAS", "HAS_PEEP", "SAVE_Z", "HAS_LEN"] if kernel == "fwd"
             else ["HAS_PEEP", "HAS_DH", "HAS_DH2", "HAS_DC", "HAS_DB", "HAS_LEN"])  # fmt: skip
    const.update({n: on for n in names}, WIDE=wide, BLOCK_P=bp, BLOCK_C=bc)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch[2:]), 32),
                              options={"num_warps": gates.NUM_WARPS})  # fmt: skip
    ptx = compiled.asm.get("ptx", "")
    return {"ptx": len(ptx), "cubin": len(compiled.asm.get("cubin", b"")),
            "vector_loads": ptx.count("ld.global.v4"),
            "vector_stores": ptx.count("st.global.v4"),
            "narrow_row_offsets": _narrow_row_offsets(compiled.asm["ttir"])}  # fmt: skip


def _narrow_row_offsets(ttir):
    """int32 products of the program id (axis 0) or NROWS: the backward's per-program rows of
    partial sums are that far into their buffers, which pass 2^31 elements at large images."""
    names = set(re.findall(r"(%[\w.]+) = tt.get_program_id x", ttir)) | {"%NROWS"}
    products = re.findall(r"arith.muli (%[\w.]+), (%[\w.]+) : i32", ttir)
    return sum(1 for operands in products if names & set(operands))


def _main(ids):
    results = {}
    for vid in ids:
        try:
            results[vid] = _compile(vid)
        except Exception as exc:  # report it per variant; the test shows the message
            results[vid] = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
    print(json.dumps(results))


# ---- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # really compile
    ids, workers = variant_ids(), max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, __file__, *ids[i::workers]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]  # fmt: skip
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        results.update(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.parametrize("vid", variant_ids())
def test_kernel_builds(builds, vid):
    res = builds[vid]
    assert "error" not in res, res.get("error")
    assert res["ptx"] > 0 and res["cubin"] > 0
    if vid.startswith("fused-"):  # its dots run on tensor cores (but IEEE fp32's)
        _, _, flags, dtype, _ = vid.split("-")
        # Launchable on every GPU from sm_80 on (sm_86/89 allow 99 KB of shared memory a block).
        assert res["shared_bytes"] <= 99 * 1024, res
        if _fused_precision(dtype, flags == "on") != "ieee" or dtype != "fp32":
            assert res["tensor_core_ops"] > 0, res
        return
    # Coalesced 16-byte accesses on the contiguous axis, in both layouts and every dtype.
    loads, stores = tile_accesses(vid)
    assert res["vector_loads"] >= loads and res["vector_stores"] >= stores, res
    assert res["narrow_row_offsets"] == 0, res


if __name__ == "__main__":
    _main(sys.argv[1:])
