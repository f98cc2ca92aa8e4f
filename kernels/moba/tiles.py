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
