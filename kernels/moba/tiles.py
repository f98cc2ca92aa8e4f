"""Launch sizes of the MoBA kernels and the tile helpers they share.

Scores live in log2 units (scaled by D^-1/2 * log2(e)) so the kernels can use exp2; the
log-sum-exp handed between kernels and to the backward is natural-log, per (query, head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# The same constant as kernels see it (a jitted function reads only constexpr globals).
LOG2E_K = tl.constexpr(LOG2E)


@dataclass(frozen=True)
class LaunchTiles:
    block_m: int
    """Queries per tile (also the gathered entries per work tile)."""
    block_n: int
    """Keys per tile."""
    chunk: int
    """Candidate blocks scored at once by the router."""
    rows: int
    """Keys summed at once for the block means."""
    warps: int
    split: int = 4
    """A key block's routed queries are cut, for dk/dv, into chunks of `split` x their mean count
    (see dkdv.py): the longest program against the partials' memory."""


def launch_tiles(q: torch.Tensor) -> LaunchTiles:
    if q.is_cuda:
        # fp32 tiles take twice the shared memory: 64 x 64 would need ~214 KB in the backward.
        if q.dtype == torch.float32:
            return LaunchTiles(block_m=32, block_n=32, chunk=32, rows=64, warps=4)
        return LaunchTiles(block_m=64, block_n=64, chunk=32, rows=64, warps=4)
    # The interpreter (TRITON_INTERPRET=1) runs tiles as numpy arrays: small tiles keep tests quick.
    return LaunchTiles(block_m=16, block_n=16, chunk=16, rows=16, warps=1)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tl.dot would take tf32); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def load_rows(ptr, t, h, stride_t, stride_h, ok, D, BLOCK_D: tl.constexpr):
    """Rows t (int64 [M]) of head h as an [M, BLOCK_D] tile; masked rows and columns read 0."""
    d = tl.arange(0, BLOCK_D)
    ptrs = ptr + t[:, None] * stride_t + h * stride_h + d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def store_rows(ptr, x, t, h, stride_t, stride_h, ok, D, BLOCK_D: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    ptrs = ptr + t[:, None] * stride_t + h * stride_h + d[None, :]
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=ok[:, None] & (d[None, :] < D))


@triton.jit
def block_query_rows(qblock_ptr, start_ptr, end_ptr, qstart_ptr, qend_ptr, shift_ptr, BLOCK_M: tl.constexpr):
    """The query tile of a program launched over (query block, tile of it, head) (see
    layout.BlockLayout): its key block g and that block's keys [start, end), the tile's first
    query row q0, the block's query rows' end qend, the tile's rows t (int64), which of them are
    real, and the shift from a query row to its key position."""
    g = tl.load(qblock_ptr + tl.program_id(0))
    start = tl.load(start_ptr + g)
    end = tl.load(end_ptr + g)
    qend = tl.load(qend_ptr + g)
    q0 = tl.load(qstart_ptr + g) + tl.program_id(1) * BLOCK_M
    t = q0.to(tl.int64) + tl.arange(0, BLOCK_M)
    return g, start, end, q0, qend, t, t < qend, tl.load(shift_ptr + g)


@triton.jit
def routed_rows(
    slot_tile_start_ptr, tile_list_ptr, tile_row0_ptr, list_end_ptr, tokens_ptr, slot, NB, HQ,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """The work tile of a program launched over slot `slot`'s tiles (see layout.GatherLists):
    whether it is a real tile, its query head h and block j, the gathered query rows t (int64)
    and which of them are real. Every load stays in bounds also for a program past the tiles."""
    u = tl.load(slot_tile_start_ptr + slot) + tl.program_id(0)
    live = u < tl.load(slot_tile_start_ptr + slot + 1)
    lst = tl.load(tile_list_ptr + u)
    rows = tl.load(tile_row0_ptr + u) + tl.arange(0, BLOCK_M)
    # (No real row past the tiles; `live & block` would trip the interpreter.)
    rows_ok = rows < tl.where(live, tl.load(list_end_ptr + lst), 0)
    t = tl.load(tokens_ptr + rows, mask=rows_ok, other=0).to(tl.int64)
    return live, ((lst // NB) % HQ).to(tl.int32), lst % NB, t, rows_ok


@triton.jit
def grad_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, t, h, stride_qt, stride_qh, ok, HQ, D, BLOCK_D: tl.constexpr):
    """What a query row brings to every gradient: q, do, its log2-sum-exp and delta = do . o."""
    q = load_rows(q_ptr, t, h, stride_qt, stride_qh, ok, D, BLOCK_D)
    do = load_rows(do_ptr, t, h, stride_qt, stride_qh, ok, D, BLOCK_D)
    lse = tl.load(lse_ptr + t * HQ + h, mask=ok, other=0.0) * LOG2E_K
    delta = tl.load(delta_ptr + t * HQ + h, mask=ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def key_tile(
    q, t_key, k_ptr, v_ptr, hk, stride_kt, stride_kh, n0, key_hi, qk_scale, D,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys n0 .. n0 + BLOCK_N - 1 (below key_hi) of KV head hk: k, v and the query tile's scores
    in log2 units, -inf where a key is out of range (or, if CAUSAL, after the query's key
    position t_key)."""
    u = tl.arange(0, BLOCK_N).to(tl.int64) + n0
    u_ok = u < key_hi
    k = load_rows(k_ptr, u, hk, stride_kt, stride_kh, u_ok, D, BLOCK_D)
    v = load_rows(v_ptr, u, hk, stride_kt, stride_kh, u_ok, D, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    ok = u_ok[None, :]
    if CAUSAL:
        ok = ok & (u[None, :] <= t_key[:, None])
    return k, v, tl.where(ok, s, float("-inf"))
