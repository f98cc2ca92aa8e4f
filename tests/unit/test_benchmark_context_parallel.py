"""benchmarks/context_parallel.py in its quick CPU run: two gloo ranks really split the step (the
ranks' losses average to one process's, per-token activations halve), the bytes each style sends
are the module docstring's formula exactly, and every rank's attention op computes the whole op's
rows; a piece that computes another function is flagged; bad sizes are refused by name."""

import importlib.util
from pathlib import Path

import pytest
import torch

from sparsetron.kernels.moba import moba_attention

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_context_parallel", BENCHMARKS / "context_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(bench):
    return bench.main(["--device", "cpu", "--quick"])


def rows(report: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with `header`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.split("|")[1:-1]])
    return table


def test_two_ranks_split_the_step_of_one_process(quick):
    memory = {(r[0], r[1], int(r[2])): r for r in rows(quick, "| attention | style | cp | tokens/rank |")}
    assert set(memory) == {
        (attention, style, cp)
        for attention in ("moba", "full")
        for style, cp in (("—", 1), ("ulysses", 2), ("allgather", 2))
    }
    for (_, _, cp), r in memory.items():
        assert int(r[3]) == 256 // cp
        # fp32: the mean of the two halves' mean losses is the whole row's, up to rounding.
        assert float(r[12]) < 1e-5, r
        # What autograd keeps outside attention is per token: each rank keeps its share.
        assert abs(float(r[8]) - 1 / cp) < 0.002, r
        assert float(r[4]) > 0 and float(r[10]) > 0


def test_bytes_sent_equal_the_formula(quick):
    # Quick run: B 1, S 256, H = K = 4 heads of d 8, fp32, cp 2 (L = 128), 2 layers.
    B, S, H, K, d, b, cp = 1, 256, 4, 4, 8, 4, 2
    expected = {
        # q, k, v and o each cross once; a rank keeps 1 / cp of what it holds.
        "ulysses": (cp - 1) * (2 * H + 2 * K) * B * (S // cp) * d * b // cp,
        # k and v: each rank receives the other ranks' shares.
        "allgather": (cp - 1) * 2 * K * B * (S // cp) * d * b,
    }
    comm = rows(quick, "| attention | style | cp | collectives")
    assert len(comm) == 4
    for attention, style, cp, calls, fwd, bwd, formula, match in comm:
        assert cp == "2"
        assert int(fwd) == int(bwd) == int(formula) == expected[style], (attention, style)
        assert match == "yes"
        assert (
            calls
            == {
                "ulysses": "4 all_to_all_single; 4 all_to_all_single",
                "allgather": "2 all_gather_into_tensor; 2 reduce_scatter_tensor",
            }[style]
        )
    assert "Every case matches it exactly." in quick


def test_each_ranks_op_computes_the_whole_ops_rows(quick):
    ops = rows(quick, "| S | op | cp | work |")
    # Per op: the whole sequence, then per cp in (2, 4): ranks 0 and cp - 1, and Ulysses.
    assert [(r[1], r[2], r[3].split(":")[0]) for r in ops] == [
        (op, cp, work)
        for op in ("MoBA 32/3", "varlen")
        for cp, work in [("1", "whole sequence, 4/4 heads")]
        + [(c, w) for c, r in (("2", 1), ("4", 3)) for w in ("allgather rank 0", f"allgather rank {r}", "ulysses")]
    ]
    assert "allgather rank 0: queries [0, 64) and [192, 256)" in [r[3] for r in ops]
    for r in ops:
        assert all(float(ms) > 0 for ms in r[4:6]), r
        assert (r[9] == "reference") if r[2] == "1" else r[9].startswith("ok"), r


def test_a_piece_computing_another_function_is_flagged(bench, monkeypatch):
    import context_parallel_ops as ops  # the benchmarks' folder is on sys.path (tests/conftest.py)

    def wrong(q, k, v, cu, block, topk, cu_seqlens_k=None):
        # One block fewer for the chunks (queries shorter than keys) only: a plausible kernel bug.
        return moba_attention(q, k, v, cu, block, topk - (cu_seqlens_k is not None), cu_seqlens_k=cu_seqlens_k)

    monkeypatch.setattr(ops, "moba_attention", wrong)
    args = bench.parse(["--device", "cpu", "--quick", "--parts", "ops", "--op-cps", "2", "--cpu-reps", "1"])
    report = "\n".join(ops.section(args))
    table = rows(report, "| S | op | cp | work |")
    checks = {(r[1], r[3].split(":")[0]): r[9] for r in table}
    assert checks[("MoBA 32/3", "allgather rank 1")].startswith("DIFFERS")
    assert checks[("MoBA 32/3", "ulysses")].startswith("ok")  # the whole-sequence op is untouched
    assert checks[("varlen", "allgather rank 0")].startswith("ok")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seqs", "300"], "--seqs 300 must be divisible by 2 x cp x MoBA block = 2 x 2 x 32"),
        (["--op-cps", "1,2"], "--op-cps 1 must be >= 2"),
        (["--gloo-seq", "200"], "--gloo-seq 200 at --gloo-cps 2 (moba, ulysses): data.seq_len=200 must be divisible"),
        (["--gloo-cps", "2,4"], "--gloo-cps [2, 4] must start at 1"),
        (["--kv-heads", "3"], "--kv-heads 3 must divide --heads 4"),
        (["--parts", "gloo,speed"], "--parts: unknown speed"),
    ],
)
def test_bad_sizes_are_refused_by_name_before_any_work(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse(["--device", "cpu", "--quick", *argv])
    assert message in capsys.readouterr().err


def test_comm_counter_counts_what_leaves_the_rank():
    from context_parallel_gloo import CommCounter

    counter = CommCounter(rank=1, ranks=4)
    x = torch.randn(8, 3)  # 96 bytes
    # Uneven all-to-all: rank 1 keeps its own 2 of the 8 rows and sends 6.
    assert counter.transferred("all_to_all_single", (x, [2, 2, 2, 2], [1, 2, 3, 2], "g")) == 96 * 6 // 8
    assert counter.transferred("all_to_all_single", (x, None, None, "g")) == 96 * 3 // 4
    assert counter.transferred("all_gather_into_tensor", (x, 4, "g")) == 96 * 3
    assert counter.transferred("reduce_scatter_tensor", (x, "sum", 4, "g")) == 96 * 3 // 4
    with pytest.raises(NotImplementedError, match="all_reduce"):
        counter.transferred("all_reduce", (x, "sum", "g"))


def test_saved_bytes_read_through_collective_wrappers():
    # A functional collective's output (and a view of it, as Ulysses' cp-4 head exchange returns)
    # is a wrapper without storage of its own; its bytes are those of the tensor it wraps.
    import torch.distributed._functional_collectives as funcol
    from context_parallel_gloo import SavedBytes

    model = torch.nn.Linear(3, 3)
    saved = SavedBytes(model)
    data = torch.randn(4, 3)
    wrapped_view = funcol.AsyncCollectiveTensor(data).view(2, 6)
    with saved.hooks:
        (model(wrapped_view.view(4, 3)) * data).sum()
    # The weight is left out; the wrapped data counts once, whichever way it was saved.
    assert saved.total() == data.nbytes
