"""MoBA forward in Triton: routed blocks by gathered queries, then the current block and the merge.

Spec step 6 is one softmax over the union of a query's blocks. It is computed in two kernels:
1. `_fwd_routed_kernel`, launched once per routed slot s = 0 .. K1 - 1: one program per work
   tile of a (slot, head, block) list, i.e. queries that chose that fully past block, gathered
   by index; it attends them to the block's keys (no causal mask: every key is in their past)
   and folds the result into the query's running fp32 state (normalized output and log2-sum-
   exp). A query appears once per slot, so the updates never race and always happen in slot
   order. Work follows the routing, so sparsity is realized; the state costs 4 (D + 1) bytes
   per (query, head) whatever K is.
2. `_fwd_current_kernel`: one program per query tile of a block, causal attention within the
   block, merged with the routed state (an exact log-sum-exp merge). It writes the output and
   the log-sum-exp the backward needs.

Shape legend: T tokens (of q; k and v may hold more, see layout.BlockLayout), Hq/Hkv heads, D
head dim, NB blocks (bound), K1 routed slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import BlockLayout, GatherLists
from .tiles import (
    LOG2E,
    LOG2E_K,
    LaunchTiles,
    block_query_rows,
    dot_precision,
    key_tile,
    load_rows,
    routed_rows,
    store_rows,
)


@triton.jit
def _attend(
    q,
    m,
    denom,
    acc,
    t_key,
    k_ptr,
    v_ptr,
    hk,
    stride_kt,
    stride_kh,
    key_lo,
    key_hi,
    qk_scale,
    D,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax of the query tile over keys [key_lo, key_hi) (and u <= t_key, the queries'
    key positions, if CAUSAL)."""
    for n0 in range(key_lo, key_hi, BLOCK_N):
        _, v, s = key_tile(
            q, t_key, k_ptr, v_ptr, hk, stride_kt, stride_kh, n0, key_hi, qk_scale, D,
            CAUSAL, BLOCK_N, BLOCK_D, PRECISION,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row with nothing allowed yet keeps m = -inf; shift by 0 instead of -inf - -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        p = tl.exp2(s - shift[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return m, denom, acc


@triton.jit
def _fwd_routed_kernel(
    q_ptr, k_ptr, v_ptr, state_o_ptr, state_lse_ptr,
    tokens_ptr, list_end_ptr, tile_list_ptr, tile_row0_ptr, slot_tile_start_ptr, start_ptr, end_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    slot, NB, HQ, D, qk_scale,
    FIRST: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    live, h, j, t, rows_ok = routed_rows(
        slot_tile_start_ptr, tile_list_ptr, tile_row0_ptr, list_end_ptr, tokens_ptr, slot, NB, HQ, BLOCK_M
    )
    if not live:
        return
    q = load_rows(q_ptr, t, h, stride_qt, stride_qh, rows_ok, D, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m, denom, acc = _attend(
        q, m, denom, acc, t, k_ptr, v_ptr, h // GROUPS, stride_kt, stride_kh,
        tl.load(start_ptr + j), tl.load(end_ptr + j), qk_scale, D, False, BLOCK_N, BLOCK_D, PRECISION,
    )  # fmt: skip
    o = acc / denom[:, None]
    lse = m + tl.log2(denom)
    # The running (normalized output, log2-sum-exp) of query t over its earlier slots: this
    # slot's block joins it. Slot 0 starts it.
    if not FIRST:
        state_lse = tl.load(state_lse_ptr + t * HQ + h, mask=rows_ok, other=0.0)
        state_o = load_rows(state_o_ptr, t, h, HQ * D, D, rows_ok, D, BLOCK_D)
        top = tl.maximum(lse, state_lse)
        w_new = tl.exp2(lse - top)
        w_state = tl.exp2(state_lse - top)
        o = (o * w_new[:, None] + state_o * w_state[:, None]) / (w_new + w_state)[:, None]
        lse = top + tl.log2(w_new + w_state)
    store_rows(state_o_ptr, o, t, h, HQ * D, D, rows_ok, D, BLOCK_D)
    tl.store(state_lse_ptr + t * HQ + h, lse, mask=rows_ok)


@triton.jit
def _fwd_current_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    sel_ptr,
    state_o_ptr,
    state_lse_ptr,
    qblock_ptr,
    start_ptr,
    end_ptr,
    qstart_ptr,
    qend_ptr,
    shift_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    HQ,
    K1,
    D,
    qk_scale,
    GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(2)
    _, start, end, q0, qend, t, t_ok, shift = block_query_rows(
        qblock_ptr, start_ptr, end_ptr, qstart_ptr, qend_ptr, shift_ptr, BLOCK_M
    )
    if q0 >= qend:
        return
    q = load_rows(q_ptr, t, h, stride_qt, stride_qh, t_ok, D, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The tile's queries sit at keys q0 + shift ..: keys of the block up to its last one.
    key_hi = tl.minimum(q0 + shift + BLOCK_M, end)
    m, denom, acc = _attend(
        q, m, denom, acc, t + shift, k_ptr, v_ptr, h // GROUPS, stride_kt, stride_kh, start, key_hi, qk_scale, D,
        True, BLOCK_N, BLOCK_D, PRECISION,
    )  # fmt: skip
    if K1 > 0:
        # The routed blocks' running state; slots fill in order, so slot 0 empty means none.
        e0 = (t * HQ + h) * K1
        routed = t_ok & (tl.load(sel_ptr + e0, mask=t_ok, other=-1) >= 0)
        state_lse = tl.load(state_lse_ptr + t * HQ + h, mask=routed, other=float("-inf"))
        state_o = load_rows(state_o_ptr, t, h, HQ * D, D, routed, D, BLOCK_D)
        m_new = tl.maximum(m, state_lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(state_lse - m_new)
        acc = acc * alpha[:, None] + state_o * w[:, None]
        denom = denom * alpha + w
        m = m_new
    store_rows(o_ptr, acc / denom[:, None], t, h, stride_ot, stride_oh, t_ok, D, BLOCK_D)
    tl.store(lse_ptr + t * HQ + h, (m + tl.log2(denom)) / LOG2E_K, mask=t_ok)


def moba_fwd(
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THD: torch.Tensor,
    layout: BlockLayout,
    sel_THK: torch.Tensor,
    lists: GatherLists,
    block_size: int,
    tiles: LaunchTiles,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o [T, Hq, D] in q's dtype and the natural-log lse [T, Hq] fp32 of every query."""
    T, Hq, D = q_THD.shape
    Hkv = k_THD.shape[1]
    K1 = sel_THK.shape[2]
    NB = layout.n_blocks
    BLOCK_D = triton.next_power_of_2(max(D, 16))
    qk_scale = D**-0.5 * LOG2E
    precision = dot_precision(q_THD.dtype)
    # fp32 running state of the routed blocks per (query, head); written by slot 0, so no fill.
    state_o_THD = torch.empty(T, Hq, D if K1 else 1, dtype=torch.float32, device=q_THD.device)
    state_lse_TH = torch.empty(T, Hq, dtype=torch.float32, device=q_THD.device)
    for slot in range(K1):
        _fwd_routed_kernel[(lists.tiles_per_slot,)](
            q_THD, k_THD, v_THD, state_o_THD, state_lse_TH,
            lists.tokens_E, lists.list_end_L, lists.tile_list_U, lists.tile_row0_U, lists.slot_tile_start,
            layout.start_NB, layout.end_NB,
            q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1),
            slot, NB, Hq, D, qk_scale,
            FIRST=slot == 0, GROUPS=Hq // Hkv, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=BLOCK_D,
            PRECISION=precision, num_warps=tiles.warps,
        )  # fmt: skip
    o_THD = torch.empty_like(q_THD)
    lse_TH = torch.empty(T, Hq, dtype=torch.float32, device=q_THD.device)
    grid = (layout.n_query_blocks, triton.cdiv(block_size, tiles.block_m), Hq)
    _fwd_current_kernel[grid](
        q_THD, k_THD, v_THD, o_THD, lse_TH, sel_THK, state_o_THD, state_lse_TH,
        layout.qblock_P, layout.start_NB, layout.end_NB, layout.qstart_NB, layout.qend_NB, layout.shift_NB,
        q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1), o_THD.stride(0), o_THD.stride(1),
        Hq, K1, D, qk_scale,
        GROUPS=Hq // Hkv, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=BLOCK_D,
        PRECISION=precision, num_warps=tiles.warps,
    )  # fmt: skip
    return o_THD, lse_TH
