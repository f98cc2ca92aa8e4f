"""The single-device half of benchmarks/context_parallel.py: the attention op each context-parallel
rank runs, timed alone on one device beside the op on the whole sequence.

For one row of S positions (one sequence) and each degree cp:
  - allgather, rank r: the rank's S / cp queries (its two zigzag chunks, `shard_sequence`'s
    layouts) against the keys before each chunk's end, chunk after chunk as
    `model.attention_ops.per_chunk` runs them: MoBA through `kernels.moba.moba_attention` and
    full attention through `kernels.varlen.varlen_attention`, both with cu_seqlens_k. Rank 0 holds
    the first and the last chunk, rank cp - 1 the two middle ones: the two ends of the layout;
  - ulysses: the op on the whole sequence with H / cp query and K / cp key/value heads;
  - the whole op: all S queries and H heads, the single-device work both split.
Ideal: each is 1 / cp of the whole op. Forward and forward + backward (gradients of q, k, v).
Before it is timed, each piece's output is compared with the whole op's output at the same
positions and heads, per (position, head) row relative to its scale: the same function must come
out, up to rounding.

Shape legend: B rows (1), S positions, L = S / cp a rank's queries, C a chunk's, U the keys before
its end, H query heads, K key/value heads, d head dim.
"""

from __future__ import annotations

import sys
import time
import traceback

import torch
from doc_attention import failure, row_relative_error
from moba import Inputs
from moba import bench_ms as moba_bench_ms

from sparsetron.kernels.moba import moba_attention
from sparsetron.kernels.varlen import varlen_attention
from sparsetron.model.attention_ops import per_chunk
from sparsetron.model.sequence import SequenceInfo
from sparsetron.model.sequence_shard import shard_sequence

# How far a piece's output may lie from the whole op's, per row scale. Both compute the same
# function in the same dtype and differ by rounding only: in fp32 by the summation order over up to
# S keys (1e-6 seen at S 2K), in bf16 by a unit or two of the last place (2^-8 relative) where the
# fp32 accumulators round differently. A key block too many or too few, or a wrong mask, moves rows
# by O(0.1).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-5}
MODES = ("fwd", "fwd+bwd")


def moba_op(block: int, topk: int):
    """(whole op on [B, S, H, d], chunk op as per_chunk calls it) of MoBA with `block` and `topk`."""

    def packed(q_BQHd, k_BUKd, v_BUKd, cu_q, cu_k):
        B, Q, H, d = q_BQHd.shape
        U, K = k_BUKd.shape[1:3]
        flat = (q_BQHd.reshape(B * Q, H, d), k_BUKd.reshape(B * U, K, d), v_BUKd.reshape(B * U, K, d))
        return moba_attention(*flat, cu_q, block, topk, cu_seqlens_k=cu_k).view(B, Q, H, d)

    def whole(q_BSHd, k_BSKd, v_BSKd, seq: SequenceInfo):
        return packed(q_BSHd, k_BSKd, v_BSKd, seq.cu_seqlens_N, None)

    def chunk(q_BCHd, k_BUKd, v_BUKd, chunk, whole_seq):
        return packed(q_BCHd, k_BUKd, v_BUKd, chunk.cu_seqlens_q, chunk.cu_seqlens_k)

    return whole, chunk


def varlen_whole(q_BSHd, k_BSKd, v_BSKd, seq: SequenceInfo):
    return varlen_attention(q_BSHd, k_BSKd, v_BSKd, None, seq.cu_seqlens_N, seq.max_seqlen)


def varlen_chunk(q_BCHd, k_BUKd, v_BUKd, chunk, whole_seq):
    return varlen_attention(
        q_BCHd, k_BUKd, v_BUKd, None, chunk.cu_seqlens_q, chunk.max_seqlen_q, chunk.cu_seqlens_k, chunk.max_seqlen_k
    )


def ops(args) -> dict:
    block, topk = args.moba
    return {f"MoBA {block}/{topk}": moba_op(block, topk), "varlen": (varlen_whole, varlen_chunk)}


def bench_ms(args, fn, leaves) -> float:
    """Median milliseconds of fn() after a warm-up call (compilation, autotuning, first allocations),
    timed as benchmarks/moba.py times its cells; `leaves` get their gradients cleared between calls."""
    fn()
    return moba_bench_ms(args, fn, Inputs(*leaves, dO=None))


def pieces(args, S: int, whole_op, chunk_op, q, k, v, seq: SequenceInfo) -> list[tuple]:
    """(cp, label, run, leaves, where) for each piece of work: the whole op's output[:, *where] is the piece's."""
    H, K = q.shape[2], k.shape[2]
    found = []
    for cp in args.op_cps:
        for rank in sorted({0, cp - 1}):
            shard = shard_sequence(seq, rank, cp)
            index_L = shard.context.index_S
            chunks = " and ".join(f"[{c.global_start}, {c.global_end})" for c in shard.context.chunks)
            leaves = [q[:, index_L].detach().clone().requires_grad_(), k, v]

            def run(leaves=leaves, shard=shard):
                return per_chunk(chunk_op, *leaves, shard)

            found.append((cp, f"allgather rank {rank}: queries {chunks}", run, leaves, (index_L,)))
        if H % cp or K % cp:
            found.append((cp, f"ulysses: not run, {H}/{K} heads do not divide by cp {cp}", None, [], None))
            continue
        leaves = [t[:, :, : t.shape[2] // cp].detach().clone().requires_grad_() for t in (q, k, v)]

        def run(leaves=leaves):
            return whole_op(*leaves, seq)

        # The first H / cp query heads read the first K / cp key/value heads, as in the whole op.
        found.append(
            (cp, f"ulysses: whole sequence, {H // cp}/{K // cp} heads", run, leaves, (slice(None), slice(0, H // cp)))
        )
    return found


def time_piece(args, run, leaves, grad_BSHd) -> dict:
    """{mode: median ms, or what went wrong} of run() on `leaves` (q first)."""
    Q, H = leaves[0].shape[1:3]
    grad_BQHd = grad_BSHd[:, :Q, :H].contiguous()
    cells = {}
    for mode in MODES:

        def call(mode=mode):
            if mode == "fwd":
                with torch.no_grad():
                    return run()
            return run().backward(grad_BQHd)

        try:
            cells[mode] = bench_ms(args, call, leaves)
        except Exception as err:  # reported in its cell; the next one still runs
            cells[mode] = failure(err)
        for t in leaves:
            t.grad = None
    return cells


def run_case(args, S: int, name: str, whole_op, chunk_op) -> list[dict]:
    g = torch.Generator(device=args.device).manual_seed(args.seed + S)
    H, K, d = args.heads, args.kv_heads, args.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=args.device, dtype=args.dtype)

    q, k, v, grad = (randn(1, S, h, d) for h in (H, K, K, H))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    seq = SequenceInfo.build(1, S, None, device=args.device)
    with torch.no_grad():
        expected = whole_op(q, k, v, seq)
    tolerance = TOLERANCE[args.dtype]
    rows = [
        {
            "S": S,
            "op": name,
            "cp": 1,
            "work": f"whole sequence, {H}/{K} heads",
            **time_piece(args, lambda: whole_op(q, k, v, seq), [q, k, v], grad),
        }
    ]
    for cp, label, run, leaves, where in pieces(args, S, whole_op, chunk_op, q, k, v, seq):
        row = {"S": S, "op": name, "cp": cp, "work": label}
        if run is not None:
            try:
                with torch.no_grad():
                    error = row_relative_error(run(), expected[(slice(None), *where)].double())
                row["check"] = f"{'ok' if error <= tolerance else 'DIFFERS'} ({error:.1e})"
            except Exception as err:
                row["check"] = failure(err)
            row |= time_piece(args, run, leaves, grad)
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    return rows


def fmt_ms(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("—" if value is None else str(value))


def table(args, rows: list[dict]) -> list[str]:
    """Markdown: each piece's times and their share of the whole op's (ideal 1 / cp)."""
    lines = [
        "| S | op | cp | work | fwd ms | fwd+bwd ms | fwd vs whole | fwd+bwd vs whole | ideal | same output |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        whole = next(r for r in rows if (r["S"], r["op"], r["cp"]) == (row["S"], row["op"], 1))
        shares = []
        for mode in MODES:
            mine, base = row.get(mode), whole.get(mode)
            timed = isinstance(mine, float) and isinstance(base, float) and base > 0
            shares.append(f"{mine / base:.3f}" if timed else "—")
        ideal = "1" if row["cp"] == 1 else f"{1 / row['cp']:.3f}"
        cells = [fmt_ms(row.get(m)) for m in MODES] + shares + [ideal, row.get("check", "reference")]
        lines.append(f"| {row['S']} | {row['op']} | {row['cp']} | {row['work']} | {' | '.join(cells)} |")
    return lines


def section(args) -> list[str]:
    """The op timings, as markdown lines."""
    t0 = time.perf_counter()
    rows, skipped, failed = [], [], []
    for S in args.seqs:
        for name, (whole_op, chunk_op) in ops(args).items():
            if time.perf_counter() - t0 > args.budget:
                skipped.append(f"S={S} {name}")
                continue
            print(f"ops: S={S} {name} ...", file=sys.stderr, flush=True)
            try:
                rows += run_case(args, S, name, whole_op, chunk_op)
            except Exception as err:  # the whole op itself failed (OOM, ...): the next case still runs
                traceback.print_exc()
                failed.append(f"S={S} {name}: {failure(err)}")
            if args.device == "cuda":
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (reference ops: dense masks, not a speed)"
    lines = [
        f"### Each rank's attention op alone on {device}, {str(args.dtype).removeprefix('torch.')}, "
        f"one row, heads {args.heads}/{args.kv_heads} x {args.head_dim}",
        "",
        *table(args, rows),
        "",
        f"Times: median ms ({'CUDA events / triton do_bench' if args.device == 'cuda' else 'wall clock'}) after a "
        "warm-up call; fwd+bwd computes the q, k, v gradients. Same output: the piece's output against the whole "
        f"op's rows and heads, max error per row scale, ok within {TOLERANCE[args.dtype]:.1e} (rounding).",
    ]
    if skipped:
        lines.append(f"Not run (--budget {args.budget:.0f} s spent): {', '.join(skipped)}.")
    if failed:
        lines.append(f"Failed: {'; '.join(failed)}.")
    return lines
