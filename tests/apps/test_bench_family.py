"""The benchmark's 1-d, 3-d and bidirectional cases: the baseline (the formulation written the
popular way for each n, bidirectional as two passes) and the layer load the same weights and
compute the same thing, and every step the benchmarks build runs. No timing is asserted."""

import shlex
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from triton_convlstm.apps.bench.baseline import EagerConvLSTM
from triton_convlstm.apps.bench.cases import (
    CPU_SHAPES,
    FAMILY_CPU_SHAPES,
    FAMILY_GPU_SHAPES,
    GPU_SHAPES,
    MODES,
    SHAPES,
    Shape,
    build_step,
    make_models,
    run_case,
)

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]
# The perf suite's shapes and a two-layer bidirectional one (the second layer reads both
# directions' 2*hidden channels), all tiny.
SHAPES_UNDER_TEST = [SHAPES[n] for n in FAMILY_CPU_SHAPES] + [
    replace(SHAPES["cpu-s-bi"], name="cpu-s-bi-2", layers=2, steps=4),
    Shape("tiny-1d-bi", 2, 5, 3, 4, (9,), bidirectional=True),
    Shape("tiny-3d-bi", 1, 3, 2, 3, (4, 5, 3), bidirectional=True),
]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("shape", SHAPES_UNDER_TEST, ids=lambda s: s.name)
def test_baseline_and_layer_share_weights_and_outputs(shape):
    eager, layer = make_models(shape, CPU, torch.float64, seed=3)
    # make_models loads strictly already; again here, to see that nothing was left out.
    loaded = layer.load_state_dict(eager.state_dict(), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert set(eager.state_dict()) == set(layer.state_dict())
    if shape.bidirectional:
        assert any(k.startswith("cell_list_reverse.") for k in eager.state_dict())
    x = torch.randn(shape.x_size(), dtype=torch.float64)
    out, (h, c) = eager(x)
    outs, [[h_layer, c_layer]] = layer(x)
    assert out.shape == outs[-1].shape == (*shape.x_size()[:2], shape.out_channels,
                                           *shape.spatial)
    assert _rel_err(outs[-1], out) <= 1e-10
    assert _rel_err(h_layer, h) <= 1e-10
    assert _rel_err(c_layer, c) <= 1e-10


def test_the_reverse_pass_reads_the_sequence_backwards():
    """The baseline's second half is a forward pass of the reverse cells over x flipped in
    time, flipped back: checked against a one-direction model, not against the layer."""
    shape = SHAPES["cpu-1d"]
    torch.manual_seed(0)
    both = EagerConvLSTM(shape.in_dim, shape.hidden, shape.kernel, 1, spatial_dims=1,
                         bidirectional=True).double()
    one = EagerConvLSTM(shape.in_dim, shape.hidden, shape.kernel, 1, spatial_dims=1).double()
    one.cell_list.load_state_dict(both.cell_list_reverse.state_dict())
    x = torch.randn(shape.x_size(), dtype=torch.float64)
    out, (h, c) = both(x)
    back, (h_back, c_back) = one(x.flip(1))
    torch.testing.assert_close(out[:, :, shape.hidden:], back.flip(1), rtol=0, atol=0)
    torch.testing.assert_close(h[:, shape.hidden:], h_back, rtol=0, atol=0)
    torch.testing.assert_close(c[:, shape.hidden:], c_back, rtol=0, atol=0)


def test_baseline_rejects_other_dims():
    with pytest.raises(ValueError, match="spatial_dims"):
        EagerConvLSTM(2, 4, 3, 1, spatial_dims=4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", ["eager", "layer", "layer-nographs", "layer-recompute",
                                  "convs-only"])
@pytest.mark.parametrize("name", FAMILY_CPU_SHAPES)
def test_build_step_runs(name, impl, mode):
    step = build_step(impl, SHAPES[name], "fp32", mode, CPU)
    step()


def test_run_case_row_for_a_family_shape():
    row = run_case("layer", SHAPES["cpu-3d"], "fp32", "train", CPU, reps=1)
    assert row["error"] is None and row["shape"] == "cpu-3d" and row["median_ms"] > 0
    assert row["peak_mem_mb"] > 0


def test_shapes_and_labels():
    # The 2-d shapes' labels are in committed results and pytest-benchmark extra_info.
    assert SHAPES["S"].label == "B4-T16-C8-H32-32x32"
    assert SHAPES["cpu-deep"].label == "B4-T8-C8-H32-24x24-L3"
    assert SHAPES["M"].spatial == (64, 64) and SHAPES["M"].dims == 2
    assert SHAPES["1d"].label == "B32-T64-C16-H128-256" and SHAPES["1d"].dims == 1
    assert SHAPES["3d"].label == "B2-T8-C4-H32-16x32x32" and SHAPES["3d"].dims == 3
    assert SHAPES["M-bi"].label == "B16-T16-C32-H64-64x64-bi"
    assert SHAPES["M-bi"].out_channels == 128
    assert replace(SHAPES["M-bi"], name="M", bidirectional=False) == SHAPES["M"]
    # The goals' tuples stay 2-d; the family has its own.
    assert all(SHAPES[n].dims == 2 and not SHAPES[n].bidirectional
               for n in GPU_SHAPES + CPU_SHAPES)
    assert {SHAPES[n].dims for n in FAMILY_GPU_SHAPES} == {1, 2, 3}
    assert any(SHAPES[n].bidirectional for n in FAMILY_CPU_SHAPES)
    with pytest.raises(ValueError, match="size"):
        Shape("bad", 1, 1, 1, 1, (2, 2, 2, 2))


def _gpu_check():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return gpu_check


@pytest.mark.parametrize("dry_run", [False, True])
def test_gpu_check_family_options_parse(dry_run):
    """A typo in the family phase's options would cost a lent GPU's call: the bench command
    must take them, with --family-args after them winning."""
    from triton_convlstm.apps.bench.command import _parser as bench_parser

    options = _gpu_check().family_args(dry_run) + shlex.split("--dtype bf16,fp32")
    args = bench_parser().parse_args(options)
    assert args.shapes == list(FAMILY_CPU_SHAPES if dry_run else FAMILY_GPU_SHAPES)
    assert args.impls == ["eager", "layer", "layer-lengths", "convs-only"] and args.no_plots
    assert args.dtype == ["bf16", "fp32"]


def test_gpu_check_merges_the_family_rows():
    gpu_check = _gpu_check()

    def row(impl, shape, ms):
        return {"impl": impl, "shape": shape, "dtype": "bf16", "mode": "train", "median_ms": ms}

    bench = {"rows": [row("eager", "S", 4.0), row("layer", "S", 1.0)], "skipped": ["x"]}
    family = {"rows": [row("eager", "1d", 6.0), row("layer", "1d", 2.0)],
              "skipped": ["case layer 3d"], "exit_code": 0, "seconds": 9.0, "sweep": []}
    gpu_check.merge_family(bench, family)
    ratios = {(r["impl"], r["shape"]): r["speedup_vs_eager"] for r in bench["rows"]}
    assert ratios == {("eager", "S"): 1.0, ("layer", "S"): 4.0, ("eager", "1d"): 1.0,
                      ("layer", "1d"): 3.0}
    assert bench["skipped"] == ["x", "family: case layer 3d"]
    assert bench["family"] == {"exit_code": 0, "seconds": 9.0, "sweep": []}
    # The 2-d goals read only S, M and L rows, even where a family shape has a compiled one.
    bench["rows"] += [row("compiled", "S", 3.0), row("compiled", "1d", 5.0)]
    gpu_check.add_ratios(bench["rows"])
    assert [g["shape"] for g in gpu_check.goals(bench["rows"])] == ["S"]
