"""benchmarks/moe_layer.py: its peers compute sparsetron's function on sparsetron's weights, its
check stops a peer that does not, and its CPU report comes out whole (megatron-core's rows only
where megatron-core is installed: the CI does not install it)."""

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from tolerance import assert_within_dtype_error

# Odd sizes: nothing lines up with a power of two. hidden 12 keeps torch's grouped_mm (16-byte
# aligned rows in fp32) in the plain layer; hidden 10 sends it to its loop.
SHAPE = {"tokens": 37, "dim": 24, "experts": 6, "top_k": 2, "hidden": 12}


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"
    spec = importlib.util.spec_from_file_location("benchmark_moe_layer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def shape(dtype, **changes):
    return argparse.Namespace(**{**SHAPE, **changes}, device="cpu", dtype=dtype)


def run(module, x, grad):
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad)
    return y.detach(), x.grad


@pytest.mark.parametrize("hidden", [12, 10])
def test_plain_layer_is_sparsetrons_function(bench, hidden):
    """Output and input gradient of the plain layer in fp32, against sparsetron's layer in fp64 on
    the same weights, within a small multiple of sparsetron's own fp32 error."""
    torch.manual_seed(0)
    ours = bench.sparsetron_layer(shape(torch.float32, hidden=hidden), "loop")
    plain = bench.PlainGroupedMoE(ours)
    x = torch.randn(1, SHAPE["tokens"], SHAPE["dim"])
    grad = torch.randn_like(x)
    exact = run(_twin(bench, ours), x.double(), grad.double())
    for what, got, mine, ref in zip(("output", "dx"), run(plain, x, grad), run(ours, x, grad), exact, strict=True):
        assert_within_dtype_error(f"plain layer {what}", got, ref, mine)


def test_check_stops_a_peer_that_computes_another_function(bench):
    torch.manual_seed(0)
    expected = torch.randn(1, 64, 8)
    bench.check_agreement("fine", expected + 1e-6 * expected.abs().max(), expected, torch.float32)
    with pytest.raises(SystemExit, match="wrong and the reference disagree"):
        bench.check_agreement("wrong", expected * 1.001, expected, torch.float32)
    # bf16: 1 token of 64 off is a routing near tie; 2 are above 2%.
    off = expected.clone()
    off[0, 0] += 1.0
    bench.check_agreement("tie", off, expected, torch.bfloat16)
    off[0, 1] += 1.0
    with pytest.raises(SystemExit, match="disagree on 2 of 64 tokens"):
        bench.check_agreement("two", off, expected, torch.bfloat16)


def test_cpu_report_is_whole_and_checked(bench, capsys, monkeypatch):
    monkeypatch.setattr(bench, "megatron_ready", lambda device: "left out here")
    # One thread: on a loaded 2-core machine every two-thread parallel region (transformers combines
    # with index_add_) waits for a descheduled thread, ~60 ms a call (25 s for this test, measured).
    args = ["--device", "cpu", "--dtype", "fp32", "bf16", "--granularity", "2", "--reps", "2", "--threads", "1"]
    args += [f"--{name.replace('_', '-')}={value}" for name, value in SHAPE.items()]
    threads = torch.get_num_threads()
    try:
        report = bench.main(args)
    finally:
        torch.set_num_threads(threads)  # the rest of the suite keeps its threads
    assert "THP_MEM_ALLOC_ENABLE=" in report
    for title in ("G=2: 37 tokens, d 24, 12 experts of hidden 6, top-4, float32",
                  "G=2: 37 tokens, d 24, 12 experts of hidden 6, top-4, bfloat16"):  # fmt: skip
        assert title in report
    rows = [line for line in report.splitlines() if line.startswith("| sparsetron |")]
    assert len(rows) == 2 and all("| 1.00 |" in row for row in rows)
    assert report.count("| plain grouped_mm layer |") == report.count("| transformers Qwen3MoeSparseMoeBlock |") == 2
    assert "megatron-core: left out here" in report
    # The ratio is the peer's time over sparsetron's, in both columns.
    first_table = report.split("\n\n")[1].splitlines()
    cells = {row.split("|")[1].strip(): row.split("|")[2:6] for row in first_table[3:]}
    for name, (fwd, fwd_ratio, fwd_bwd, fwd_bwd_ratio) in cells.items():
        for ms, ratio, column in ((fwd, fwd_ratio, 0), (fwd_bwd, fwd_bwd_ratio, 2)):
            ours = float(cells["sparsetron"][column].split()[0])
            # Printed to 0.1 ms and 0.01: the ratio of the printed times is that far off at most.
            expected = float(ms.split()[0]) / ours
            assert float(ratio) == pytest.approx(expected, abs=0.006 + 0.05 * (1 + expected) / ours), name
    out = capsys.readouterr().out
    assert "plain grouped_mm layer: 0 of 37 tokens beyond 5e-2" in out


def test_granularity_must_divide_the_hidden_size(bench):
    with pytest.raises(SystemExit, match="--granularity 5 must divide the expert hidden size 12"):
        bench.granular(shape(torch.float32), 5)


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megatron_layer_is_sparsetrons_function(bench, dtype):
    """megatron-core's MoELayer (the CPU patches applied) on sparsetron's weights; GroupedMLP is bf16
    only, and torch's grouped_mm wants 16-byte rows: hidden 16."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    initialized = dist.is_initialized()
    torch.manual_seed(0)
    try:
        assert bench.megatron_ready("cpu") is None
        ours = bench.sparsetron_layer(shape(dtype, hidden=16), "loop")
        x = torch.randn(1, SHAPE["tokens"], SHAPE["dim"], dtype=dtype)
        grad = torch.randn_like(x)
        exact = run(_twin(bench, ours), x.double(), grad.double())
        mine = run(ours, x, grad)
        for grouped in [False] + ([True] if dtype == torch.bfloat16 else []):
            got = run(bench.megatron_layer_like(ours, shape(dtype, hidden=16), grouped), x, grad)
            for what, g, m, ref in zip(("output", "dx"), got, mine, exact, strict=True):
                assert_within_dtype_error(f"megatron (grouped={grouped}) {what}", g, ref, m)
    finally:
        if not initialized:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _twin(bench, layer):
    """`layer` in fp64: the reference."""
    return copy.deepcopy(layer).double()
