"""MoBA backward in Triton: dense-attention gradients under the (fixed) selected mask, deterministic.

Spec step 7: nothing flows through the block means or the top-k. With P = softmax under the
mask (rebuilt from the forward's log-sum-exp) and delta_t = do_t . o_t:
dv_u = sum_t P_tu do_t, dk_u = scale sum_t dS_tu q_t, dq_t = scale sum_u dS_tu k_u, where
dS_tu = P_tu (do_t . v_u - delta_t).

- dk and dv: dkdv.py, every query that reads a key block, split so that an attention sink
  does not serialize the backward; no atomics.
- `_bwd_dq_routed_kernel`, launched once per slot: per work tile of gathered queries, their
  dq from the chosen block, added to an fp32 dq of the routed blocks (slot order, no races).
- `_bwd_dq_current_kernel`: per query tile, dq from the current block plus the routed dq.

Shape legend: T tokens (of q; k and v may hold more, see layout.BlockLayout), Hq/Hkv heads, D
head dim, NB blocks (bound), K1 routed slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dkdv import dkdv_bwd
from .layout import BlockLayout, GatherLists
from .tiles import (
    LOG2E,
    LaunchTiles,
    block_query_rows,
    dot_precision,
    grad_rows,
    key_tile,
    load_rows,
    routed_rows,
    store_rows,
)


@triton.jit
def _bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, T, HQ, stride_ot, stride_oh, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    h = tl.program_id(1)
    t = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < T
    o = load_rows(o_ptr, t, h, stride_ot, stride_oh, t_ok, D, BLOCK_D).to(tl.float32)
    do = load_rows(do_ptr, t, h, stride_ot, stride_oh, t_ok, D, BLOCK_D).to(tl.float32)
    tl.store(delta_ptr + t * HQ + h, tl.sum(o * do, axis=1), mask=t_ok)


@triton.jit
def _dq_from_keys(
    q, do, lse, delta, dq, t_key, k_ptr, v_ptr, hk, stride_kt, stride_kh, key_lo, key_hi, qk_scale, D,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Add the query tile's dq (unscaled) from keys [key_lo, key_hi) (and u <= t_key, the queries'
    key positions, if CAUSAL)."""
    for n0 in range(key_lo, key_hi, BLOCK_N):
        k, v, s = key_tile(
            q, t_key, k_ptr, v_ptr, hk, stride_kt, stride_kh, n0, key_hi, qk_scale, D,
            CAUSAL, BLOCK_N, BLOCK_D, PRECISION,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq_routed_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, state_dq_ptr,
    tokens_ptr, list_end_ptr, tile_list_ptr, tile_row0_ptr, slot_tile_start_ptr, start_ptr, end_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    slot, NB, HQ, D, qk_scale, sm_scale,
    FIRST: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    live, h, j, t, rows_ok = routed_rows(
        slot_tile_start_ptr, tile_list_ptr, tile_row0_ptr, list_end_ptr, tokens_ptr, slot, NB, HQ, BLOCK_M
    )
    if not live:
        return
    q, do, lse, delta = grad_rows(
        q_ptr, do_ptr, lse_ptr, delta_ptr, t, h, stride_qt, stride_qh, rows_ok, HQ, D, BLOCK_D
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_from_keys(
        q, do, lse, delta, dq, t, k_ptr, v_ptr, h // GROUPS, stride_kt, stride_kh,
        tl.load(start_ptr + j), tl.load(end_ptr + j), qk_scale, D, False, BLOCK_N, BLOCK_D, PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    # Query t's dq from its routed blocks, summed slot after slot in fp32; slot 0 starts it.
    if not FIRST:
        dq += load_rows(state_dq_ptr, t, h, HQ * D, D, rows_ok, D, BLOCK_D)
    store_rows(state_dq_ptr, dq, t, h, HQ * D, D, rows_ok, D, BLOCK_D)


@triton.jit
def _bwd_dq_current_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, sel_ptr, state_dq_ptr,
    qblock_ptr, start_ptr, end_ptr, qstart_ptr, qend_ptr, shift_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
    HQ, K1, D, qk_scale, sm_scale,
    GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(2)
    _, start, end, q0, qend, t, t_ok, shift = block_query_rows(
        qblock_ptr, start_ptr, end_ptr, qstart_ptr, qend_ptr, shift_ptr, BLOCK_M
    )
    if q0 >= qend:
        return
    q, do, lse, delta = grad_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, t, h, stride_qt, stride_qh, t_ok, HQ, D, BLOCK_D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_from_keys(
        q, do, lse, delta, dq, t + shift, k_ptr, v_ptr, h // GROUPS, stride_kt, stride_kh,
        start, tl.minimum(q0 + shift + BLOCK_M, end), qk_scale, D, True, BLOCK_N, BLOCK_D, PRECISION,
    )  # fmt: skip
    dq = dq * sm_scale
    if K1 > 0:
        # Slots fill in order: slot 0 empty means no routed block.
        routed = t_ok & (tl.load(sel_ptr + (t * HQ + h) * K1, mask=t_ok, other=-1) >= 0)
        dq += load_rows(state_dq_ptr, t, h, HQ * D, D, routed, D, BLOCK_D)
    store_rows(dq_ptr, dq, t, h, stride_qt, stride_qh, t_ok, D, BLOCK_D)


def moba_bwd(
    do_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THD: torch.Tensor,
    o_THD: torch.Tensor,
    lse_TH: torch.Tensor,
    layout: BlockLayout,
    sel_THK: torch.Tensor,
    lists: GatherLists,
    block_size: int,
    tiles: LaunchTiles,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in the inputs' dtypes. q, o and do share one layout (contiguous [T, Hq, D])."""
    T, Hq, D = q_THD.shape
    Hkv = k_THD.shape[1]
    K1 = sel_THK.shape[2]
    NB = layout.n_blocks
    BLOCK_D = triton.next_power_of_2(max(D, 16))
    sm_scale = D**-0.5
    qk_scale = sm_scale * LOG2E
    precision = dot_precision(q_THD.dtype)
    sizes = dict(GROUPS=Hq // Hkv, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=BLOCK_D, PRECISION=precision)
    strides = (q_THD.stride(0), q_THD.stride(1), k_THD.stride(0), k_THD.stride(1))

    delta_TH = torch.empty(T, Hq, dtype=torch.float32, device=q_THD.device)
    _bwd_delta_kernel[(triton.cdiv(T, tiles.block_m), Hq)](
        o_THD, do_THD, delta_TH, T, Hq, o_THD.stride(0), o_THD.stride(1), D, BLOCK_M=tiles.block_m, BLOCK_D=BLOCK_D
    )
    dk_THD, dv_THD = dkdv_bwd(
        do_THD, q_THD, k_THD, v_THD, lse_TH, delta_TH, layout, lists, K1, block_size, tiles, sizes, strides,
        qk_scale, sm_scale,
    )  # fmt: skip
    state_dq_THD = torch.empty(T, Hq, D if K1 else 1, dtype=torch.float32, device=q_THD.device)
    for slot in range(K1):
        _bwd_dq_routed_kernel[(lists.tiles_per_slot,)](
            q_THD, k_THD, v_THD, do_THD, lse_TH, delta_TH, state_dq_THD,
            lists.tokens_E, lists.list_end_L, lists.tile_list_U, lists.tile_row0_U, lists.slot_tile_start,
            layout.start_NB, layout.end_NB, *strides, slot, NB, Hq, D, qk_scale, sm_scale,
            FIRST=slot == 0, **sizes, num_warps=tiles.warps,
        )  # fmt: skip
    dq_THD = torch.empty_like(q_THD)
    _bwd_dq_current_kernel[(layout.n_query_blocks, triton.cdiv(block_size, tiles.block_m), Hq)](
        q_THD, k_THD, v_THD, do_THD, lse_TH, delta_TH, dq_THD, sel_THK, state_dq_THD,
        layout.qblock_P, layout.start_NB, layout.end_NB, layout.qstart_NB, layout.qend_NB, layout.shift_NB,
        *strides, Hq, K1, D, qk_scale, sm_scale, **sizes, num_warps=tiles.warps,
    )  # fmt: skip
    return dq_THD, dk_THD, dv_THD
