"""The MoBA kernels compile for a Hopper GPU (sm_90), ahead of time, on a machine without one.

The interpreter (tests/unit/test_moba_kernels.py) checks what the kernels compute but not
that Triton's compiler accepts them: globals, dtypes of dot operands, shared memory. This
compiles every kernel for sm_90 with the launch sizes `launch_tiles` picks for bf16, in a
subprocess without TRITON_INTERPRET (the interpreter decides at definition time).
"""

import os
import subprocess
import sys

import pytest

FLOATS = {
    "lse_ptr",
    "delta_ptr",
    "kbar_ptr",
    "state_o_ptr",
    "state_lse_ptr",
    "state_dq_ptr",
    "part_dk_ptr",
    "part_dv_ptr",
}
INDICES = {
    "sel_ptr",
    "tokens_ptr",
    "start_ptr",
    "end_ptr",
    "first_ptr",
    "qblock_ptr",
    "qstart_ptr",
    "qend_ptr",
    "shift_ptr",
}
# Positions in the gathered entries and list numbers (layout.GatherLists).
WIDE_INDICES = {"list_begin_ptr", "list_end_ptr", "tile_list_ptr", "tile_row0_ptr", "slot_tile_start_ptr"}
WIDE_INDICES |= {"part_first_ptr", "owner_ptr", "index_ptr"}  # dk/dv chunks (layout.KeyBlockChunks)


def compile_for_hopper(head_dim: int, dtype_name: str = "bfloat16") -> list[str]:
    """`kernel shared-memory-bytes` lines, for inputs of torch.<dtype_name>."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparsetron.kernels.moba import backward, dkdv, forward, routing
    from sparsetron.kernels.moba.tiles import dot_precision, launch_tiles

    dtype = getattr(torch, dtype_name)
    tiles = launch_tiles(_CudaTensor(dtype))
    sizes = dict(GROUPS=2, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=head_dim)
    attention = dict(sizes, PRECISION=dot_precision(dtype))
    kernels = [
        (routing._block_means_kernel, dict(ROWS=tiles.rows, BLOCK_D=head_dim)),
        (
            routing._route_kernel,
            dict(K1=11, K1_PAD=16, GROUPS=2, BLOCK_M=tiles.block_m, CHUNK=tiles.chunk, BLOCK_D=head_dim),
        ),
        (forward._fwd_routed_kernel, dict(attention, FIRST=False)),
        (forward._fwd_current_kernel, attention),
        (backward._bwd_delta_kernel, dict(BLOCK_M=tiles.block_m, BLOCK_D=head_dim)),
        (dkdv._bwd_dkdv_chunk_kernel, attention),
        (dkdv._bwd_dkdv_kernel, attention),
        (backward._bwd_dq_routed_kernel, dict(attention, FIRST=False)),
        (backward._bwd_dq_current_kernel, attention),
    ]
    report = []
    for kernel, constexprs in kernels:
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in FLOATS:
                signature[name] = "*fp32"
            elif name in INDICES:
                signature[name] = "*i32"
            elif name in WIDE_INDICES:
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype_name]
            elif name.endswith("scale"):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": tiles.warps})
        report.append(f"{kernel.__name__} {compiled.metadata.shared}")
    return report


class _CudaTensor:
    """Stands in for a CUDA tensor, for which `launch_tiles` picks the GPU sizes."""

    is_cuda = True

    def __init__(self, dtype):
        self.dtype = dtype


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=500, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    shared = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()}
    assert len(shared) == 9, result.stdout
    # An H100 gives a block at most 227 KiB of shared memory.
    assert max(shared.values()) <= 227 * 1024, shared


if __name__ == "__main__":
    # CI compiles bf16 only (about 25 s); `python tests/unit/test_moba_compile.py float32` checks another dtype.
    print("\n".join(compile_for_hopper(128, *sys.argv[1:])))
