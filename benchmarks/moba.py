"""MoBA attention: sparsetron against dense SDPA and against FlexAttention with the exact MoBA mask.

One sequence of S tokens (batch 1), side by side in one run: forward and forward+backward
time, TFLOP/s and peak memory of
  - SDPA: `scaled_dot_product_attention(is_causal=True)` on [1, H, S, D], the backend torch picks;
  - Flex: compiled `flex_attention` whose mask_mod reads the exact per-token MoBA selection
    (precomputed, [H, S, n] bool), with a compiled `create_block_mask`;
  - MoBA: `sparsetron.kernels.moba.moba_attention` on the packed [S, H, D] layout.
Before anything is timed, each contender's output is checked: a small case against
`moba_reference`, and at every S MoBA's and Flex's outputs (and gradients) against each other
and against an exact fp32 computation of sampled query rows. A contender that disagrees gets
no speedup ratio. Out-of-memory and failures are reported in the table and the run goes on.
An attention-sink section times MoBA alone with every query routed to block 0 against random
routing at the same shapes (the dk/dv backward splits long routed lists; without that, the sink
serializes it). Prints markdown (header, one table per block size / top-k, checks, the sink
table, targets of issue 5) that pastes into benchmarks/RESULTS.md as is.

    python benchmarks/moba.py                     # GPU: S 8K, 32K, 128K (+512K forward), B=512/K=3 and B=4096/K=12
    python benchmarks/moba.py --quick             # GPU: S 8K and 32K, sink at 32K
    python benchmarks/moba.py --sink-seqs 32k,512k --configs 512/3   # sink cases at other lengths
    python benchmarks/moba.py --seqs 32k,128k --configs 512/3 --kv-heads 4
    python benchmarks/moba.py --output $OUT/moba.md   # also write the report to a file
    python benchmarks/moba.py --device cpu        # tiny shapes, fp32, eager Flex forward: a smoke test (~15 s)

Expected duration of the default GPU run on one H100: about 5 minutes (an estimate: no GPU had
been lent when this was written). FlexAttention compiles its block mask and kernels once per
(S, B, K) case, roughly 20-60 s each; dense SDPA fwd+bwd at 128K is ~460 ms a call
(../shared/specs/anchors.md) and Flex with the exact mask about 3x that. Cases run training
lengths first, 512K forward, then the sink cases (MoBA only, 32K and 128K: seconds); once `--budget` seconds (default 480) are spent no new case
starts, so one run fits in 10 minutes. `--flex-max-seq 32k` (or 0) saves most of the compile time.
Progress goes to stderr; the report (stdout, and `--output`) comes last.

Shape legend: S tokens, H (Hq) query heads, Hkv key/value heads, D head dim, n blocks,
R sampled query rows; B block size, K blocks per query (counting the current one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import shlex
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from report import cpu_median_ms, emit
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sparsetron.kernels.moba import moba_attention, moba_reference, moba_selection

GPU = {"seqs": "8k,32k,128k,512k", "configs": "512/3,4096/12", "heads": 16, "head_dim": 128, "max_train_seq": "128k"}
GPU["sink_seqs"] = "32k,128k"
GPU_QUICK_SEQS = "8k,32k"
GPU_QUICK_SINK_SEQS = "32k"
CPU = {"seqs": "512,1024", "configs": "64/3,128/4", "heads": 2, "head_dim": 32, "max_train_seq": "512"}
CPU["sink_seqs"] = "512"
CPU_QUICK_SEQS = "512"
# (B, K, S, speedup over SDPA in fwd+bwd) from issue 5; peak memory at most 1.5x SDPA's everywhere.
SPEED_TARGETS = [(512, 3, 32768, 6.0), (512, 3, 131072, 20.0)]
MEMORY_TARGET = 1.5
SLOW_MS = 50.0  # calls slower than this are timed with a few CUDA events instead of do_bench
CONTENDERS = ("SDPA", "Flex", "MoBA")
MODES = ("fwd", "fwd+bwd")


def log(args, message: str) -> None:
    print(f"[{time.perf_counter() - args.t0:6.0f}s] {message}", file=sys.stderr, flush=True)


def size_arg(text: str) -> int:
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def free(collect: bool = False) -> None:
    """Return cached blocks to the device; collect=True first frees reference cycles (a caught
    exception's frames, compiled graphs), at ~0.3 s a call."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "OOM"
    first = (str(error).strip().splitlines() or [""])[0].replace("|", "/")
    return f"failed: {type(error).__name__}: {first[:50]}" + ("..." if len(first) > 50 else "")


# ---------------------------------------------------------------- inputs and the three contenders


@dataclass
class Inputs:
    """q, k, v (leaves with grads) and dO in one layout: "SHD" packed, or "BHSD" = [1, H, S, D]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dO: torch.Tensor

    def leaves(self):
        return (self.q, self.k, self.v)

    def clear_grads(self) -> None:
        for t in self.leaves():
            t.grad = None

    def to_shd(self, t: torch.Tensor) -> torch.Tensor:
        return t[0].transpose(0, 1) if t.dim() == 4 else t


def make_inputs(args, S: int, layout: str, grad: bool = True) -> Inputs:
    """The same random values for every contender at one S (seeded), in the contender's own layout."""
    g = torch.Generator(device=args.device).manual_seed(args.seed + S)
    shapes = [(S, args.heads, args.head_dim), (S, args.kv_heads, args.head_dim), (S, args.kv_heads, args.head_dim)]
    shapes.append(shapes[0])
    tensors = []
    for shape in shapes:
        t = torch.randn(shape, generator=g, device=args.device, dtype=args.dtype)
        if layout == "BHSD":
            t = t.transpose(0, 1).unsqueeze(0).contiguous()
        tensors.append(t)
    for t in tensors[:3]:
        t.requires_grad_(grad)
    return Inputs(*tensors)


def sdpa_forced(args):
    """The sdpa_kernel context of --sdpa-backend (a no-op for auto: torch picks)."""
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    backends["efficient"] = SDPBackend.EFFICIENT_ATTENTION
    return contextlib.nullcontext() if args.sdpa_backend == "auto" else sdpa_kernel(backends[args.sdpa_backend])


def sdpa_call(args, inp: Inputs) -> torch.Tensor:
    with sdpa_forced(args):
        return F.scaled_dot_product_attention(
            inp.q, inp.k, inp.v, is_causal=True, enable_gqa=args.kv_heads != args.heads
        )


def sdpa_backend_name(args, inp: Inputs, grad: bool) -> str:
    """The backend SDPA dispatches to for these inputs (torch's own choice function)."""
    try:
        with sdpa_forced(args), torch.set_grad_enabled(grad):
            gqa = args.kv_heads != args.heads
            return SDPBackend(torch._fused_sdp_choice(inp.q, inp.k, inp.v, is_causal=True, enable_gqa=gqa)).name
    except Exception as error:  # a private function: report, never stop the run for it
        return f"unknown ({type(error).__name__})"


def moba_call(args, inp: Inputs, B: int, K: int) -> torch.Tensor:
    cu_seqlens = torch.tensor([0, inp.q.shape[0]], dtype=torch.int32, device=inp.q.device)
    return moba_attention(inp.q, inp.k, inp.v, cu_seqlens, B, K)


# ---------------------------------------------------------------- the exact selection, in chunks


def block_means(k_SHD: torch.Tensor, B: int) -> torch.Tensor:
    """kbar [n, Hkv, D] fp32: the mean key of each block (spec step 2), summed in chunks of tokens."""
    S, H, D = k_SHD.shape
    n = -(-S // B)
    sums = torch.zeros(n, H, D, dtype=torch.float32, device=k_SHD.device)
    step = max(B, (2**26 // (H * D * 4)) // B * B)
    for c0 in range(0, S, step):
        c1 = min(S, c0 + step)
        sums.index_add_(0, torch.arange(c0, c1, device=k_SHD.device) // B, k_SHD[c0:c1].detach().float())
    sizes = (S - torch.arange(n, device=k_SHD.device) * B).clamp(max=B).float()
    return sums / sizes.view(n, 1, 1)


def select_rows(q_RHD, t_R, kbar_nHD, B: int, K: int, tie_tol: float):
    """Spec steps 3-5 for the queries at positions t_R: chosen [H, R, n] bool, and near_tie [H, R]:
    the K-th pick beats the first left-out past block by at most tie_tol * |q_t| * max_j |kbar_j|,
    so that an fp32 rounding elsewhere may pick the other one (rows excused when outputs differ)."""
    R, H, _ = q_RHD.shape
    n = kbar_nHD.shape[0]
    kbar_q = kbar_nHD.repeat_interleave(H // kbar_nHD.shape[1], dim=1)
    gate_HRn = torch.einsum("rhd,nhd->hrn", q_RHD.detach().float(), kbar_q)
    j_n = torch.arange(n, device=q_RHD.device)
    gate_HRn.masked_fill_((t_R.view(R, 1) < (j_n + 1) * B).unsqueeze(0), float("-inf"))
    gate_HRn.masked_fill_((j_n.view(1, n) == (t_R // B).view(R, 1)).unsqueeze(0), float("inf"))
    picks = min(K, n)
    values, indices = gate_HRn.topk(min(K + 1, n), dim=-1)
    chosen = torch.zeros(H, R, n, dtype=torch.bool, device=q_RHD.device)
    chosen.scatter_(-1, indices[..., :picks], values[..., :picks] != float("-inf"))
    near = torch.zeros(H, R, dtype=torch.bool, device=q_RHD.device)
    if K < n:
        last, left_out = values[..., picks - 1], values[..., picks]
        scale = q_RHD.detach().float().norm(dim=-1).T * kbar_q.norm(dim=-1).amax(0).view(H, 1)
        near = last.isfinite() & left_out.isfinite() & (last - left_out <= tie_tol * scale)
    return chosen, near


def full_selection(q_SHD, kbar_nHD, B: int, K: int, tie_tol: float):
    """chosen [H, S, n] and near_tie [H, S] for every query, a chunk of queries at a time (the fp32
    gate of all of them would be 32 GB at 512K)."""
    S, H, _ = q_SHD.shape
    n = kbar_nHD.shape[0]
    chosen = torch.empty(H, S, n, dtype=torch.bool, device=q_SHD.device)
    near = torch.empty(H, S, dtype=torch.bool, device=q_SHD.device)
    chunk = max(1, 2**28 // (H * n * 8))
    for c0 in range(0, S, chunk):
        c1 = min(S, c0 + chunk)
        t = torch.arange(c0, c1, device=q_SHD.device)
        chosen[:, c0:c1], near[:, c0:c1] = select_rows(q_SHD[c0:c1], t, kbar_nHD, B, K, tie_tol)
    # Property of the spec's selection: the current block plus min(K - 1, past blocks) others.
    expected = 1 + (torch.arange(S, device=q_SHD.device) // B).clamp(max=K - 1)
    if not torch.equal(chosen.sum(-1), expected.expand(H, S)):
        raise RuntimeError("selection does not pick 1 + min(K-1, past blocks) blocks per query")
    return chosen, near


def exact_rows(inp: Inputs, rows_R, kbar_nHD, B: int, K: int, tie_tol: float):
    """The exact MoBA output of the sampled query rows, in fp32: o [R, H, D] and near_tie [H, R]."""
    q, k, v = (t.detach() for t in inp.leaves())
    S, H, D = q.shape
    groups = H // k.shape[1]
    q_RHD = q[rows_R]
    chosen_HRn, near_HR = select_rows(q_RHD, rows_R, kbar_nHD, B, K, tie_tol)
    u_S = torch.arange(S, device=q.device)
    block_S = u_S // B
    causal_RS = u_S.view(1, S) <= rows_R.view(-1, 1)
    out = torch.empty(len(rows_R), H, D, dtype=torch.float32, device=q.device)
    for h in range(H):
        scores_RS = (q_RHD[:, h].float() @ k[:, h // groups].float().T) * D**-0.5
        allowed_RS = chosen_HRn[h][:, block_S] & causal_RS
        probs_RS = torch.softmax(scores_RS.masked_fill(~allowed_RS, float("-inf")), dim=-1)
        out[:, h] = probs_RS @ v[:, h // groups].float()
    return out, near_HR


def sample_rows(S: int, B: int, count: int, seed: int, device) -> torch.Tensor:
    """Block edges, the ends of the sequence and `count` random positions."""
    fixed = {0, 1, B - 1, B, B + 1, 2 * B - 1, 2 * B, S // 2, S - B - 1, S - B, S - 2, S - 1}
    g = torch.Generator().manual_seed(seed)
    rows = fixed | set(torch.randint(0, S, (count,), generator=g).tolist())
    return torch.tensor(sorted(r for r in rows if 0 <= r < S), device=device)


# ---------------------------------------------------------------- comparing outputs


def compare_rows(got_RHD, want_RHD, near_HR, rtol: float):
    """Per (row, head): max |error| <= rtol * max |want row| + 1e-3 * max |want|. Rows whose gates are
    near-tied are excused. Returns (ok, worst relative error of the others, excused count)."""
    got, want = got_RHD.float(), want_RHD.float()
    err_RH = (got - want).abs().amax(-1)
    row_max = want.abs().amax(-1)
    bad = err_RH > rtol * row_max + 1e-3 * want.abs().max()
    near_RH = near_HR.T.to(bad.device)
    worst = (err_RH / row_max.clamp_min(1e-30)).masked_fill(near_RH, 0).max().item()
    return not bool((bad & ~near_RH).any()), worst, int((bad & near_RH).sum())


def relative_error(got, want, keep_S=None) -> float:
    """||got - want|| / ||want|| (Frobenius, fp32, chunked over S), rows with keep_S False dropped."""
    num = den = 0.0
    for c0 in range(0, got.shape[0], 8192):
        g, w = got[c0 : c0 + 8192].float(), want[c0 : c0 + 8192].float()
        if keep_S is not None:
            keep = keep_S[c0 : c0 + 8192].to(g.device).view(-1, *([1] * (g.dim() - 1)))
            g, w = g * keep, w * keep
        num += (g - w).pow(2).sum().item()
        den += w.pow(2).sum().item()
    return (num / max(den, 1e-30)) ** 0.5


def compare_full(got, want, near_HS, rtol: float, grad_tol: float) -> tuple[bool, str]:
    """Full outputs (and gradients when both have them) of two contenders, [S, H, D] each."""
    ok, worst, excused = True, 0.0, 0
    for c0 in range(0, got[0].shape[0], 8192):
        part = slice(c0, c0 + 8192)
        ok_part, worst_part, excused_part = compare_rows(got[0][part], want[0][part], near_HS[:, part], rtol)
        ok, worst, excused = ok and ok_part, max(worst, worst_part), excused + excused_part
    text = f"out max row err {worst:.2%}" + (f" ({excused} near-tied rows excused)" if excused else "")
    if got[1] is not None and want[1] is not None:
        # dq rows of near-tied queries may use another block; dk and dv barely move.
        errors = [relative_error(got[1], want[1], ~near_HS.any(0))] + [
            relative_error(a, b) for a, b in zip(got[2:], want[2:], strict=True)
        ]
        ok = ok and max(errors) <= grad_tol
        text += ", grads rel err dq {:.2%} dk {:.2%} dv {:.2%}".format(*errors)
    return ok, text


def outputs(call, inp: Inputs, grads: bool):
    """(o, dq, dk, dv) in [S, H, D] layout, detached; gradients None when not asked for."""
    if not grads:
        with torch.no_grad():
            return (inp.to_shd(call(inp)), None, None, None)
    inp.clear_grads()
    o = call(inp)
    o.backward(inp.dO)
    result = (inp.to_shd(o.detach()), *(inp.to_shd(t.grad) for t in inp.leaves()))
    inp.clear_grads()
    return result


# ---------------------------------------------------------------- timing and memory


@dataclass
class Cell:
    ms: float | None = None
    gib: float | None = None
    note: str = ""


def bench_ms(args, fn, inp: Inputs) -> float:
    """Median milliseconds of fn(), already warmed up."""
    if args.device == "cpu":
        return cpu_median_ms(fn, reps=args.cpu_reps)
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first < SLOW_MS:
        return triton.testing.do_bench(fn, rep=args.rep_ms, grad_to_none=list(inp.leaves()), return_mode="median")
    # do_bench would spend 7 calls to time one: a few event-timed calls instead.
    times = []
    for _ in range(max(3, min(10, int(args.slow_rep_ms / first)))):
        inp.clear_grads()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(args, call, inp: Inputs, mode: str) -> Cell:
    """Time one contender in one mode, then its peak memory over one call (inputs included)."""

    def forward():
        with torch.no_grad():
            call(inp)

    def forward_backward():
        call(inp).backward(inp.dO)

    fn = forward if mode == "fwd" else forward_backward
    try:
        fn()  # compilation, autotuning, first-use allocations
        ms = bench_ms(args, fn, inp)
        gib = None
        if args.device == "cuda":
            inp.clear_grads()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            gib = torch.cuda.max_memory_allocated() / 2**30
        cell = Cell(ms, gib)
    except Exception as error:
        if not isinstance(error, torch.OutOfMemoryError):
            print("".join(traceback.format_exc().splitlines(keepends=True)[-6:]), file=sys.stderr)
        cell = Cell(note=describe(error))
    inp.clear_grads()
    free(collect=bool(cell.note))
    return cell


# ---------------------------------------------------------------- one (B, K, S) case


@dataclass
class Case:
    B: int
    K: int
    S: int
    pairs: int  # attended (query, key) pairs per head
    cells: dict = field(default_factory=dict)  # (contender, mode) -> Cell
    verdict: dict = field(default_factory=dict)  # contender -> (ok, text)


def attended_pairs(S: int, B: int, K: int) -> int:
    """Per head: each query reads its own block up to itself and min(K - 1, t // B) full past blocks."""
    t = torch.arange(S, dtype=torch.int64)
    return int((t % B + 1 + B * (t // B).clamp(max=K - 1)).sum())


def run_flex(args, case: Case, chosen, modes):
    """Flex's check outputs (moved to the CPU) and its cells; the mask state is freed on return."""
    B, S = case.B, case.S

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & chosen[h, q_idx, kv_idx // B]

    if args.device == "cuda":
        # Uncompiled, create_block_mask evaluates the full S x S mask (out of memory at 128K).
        block_mask = torch.compile(create_block_mask)(mask_mod, 1, args.heads, S, S, device=args.device)
        flex = torch.compile(flex_attention, dynamic=False)
    else:
        block_mask = create_block_mask(mask_mod, 1, args.heads, S, S, device=args.device)
        flex = flex_attention  # eager: forward only on the CPU, materializes the scores

    def call(inp):
        return flex(inp.q, inp.k, inp.v, block_mask=block_mask, enable_gqa=args.kv_heads != args.heads)

    inp = make_inputs(args, S, "BHSD", grad=args.device == "cuda")  # no Flex backward on the CPU
    try:
        got = tuple(None if t is None else t.cpu() for t in outputs(call, inp, grads="fwd+bwd" in modes))
    except Exception as error:
        got = None
        case.verdict["Flex"] = (False, f"check {describe(error)}")
    free()
    for mode in modes:
        case.cells["Flex", mode] = measure(args, call, inp, mode)
    return got


def run_case(args, B: int, K: int, S: int, sdpa_cache: dict) -> Case:
    case = Case(B, K, S, attended_pairs(S, B, K))
    modes = MODES if S <= args.max_train_seq else ("fwd",)
    rtol = 3e-2 if args.dtype == torch.bfloat16 else 1e-4
    grad_tol = 2e-2 if args.dtype == torch.bfloat16 else 1e-4
    log(args, f"B={B} K={K} S={short(S)}: density {case.pairs / (S * (S + 1) / 2):.3f}")

    # The oracle rows, and the exact selection for Flex's mask, from MoBA's inputs.
    inp = make_inputs(args, S, "SHD")
    kbar = block_means(inp.k, B)
    rows = sample_rows(S, B, args.rows, args.seed, args.device)
    want_rows, near_rows = exact_rows(inp, rows, kbar, B, K, args.tie_tol)
    flex_reason = ""
    if S > args.flex_max_seq:
        flex_reason = f"skipped (S > --flex-max-seq {short(args.flex_max_seq)})"
    flex_got, near_HS = None, None
    if not flex_reason:
        try:
            chosen, near_HS = full_selection(inp.q, kbar, B, K, args.tie_tol)
            del inp
            free()
            flex_got = run_flex(args, case, chosen, [m for m in modes if args.device == "cuda" or m == "fwd"])
            near_HS = near_HS.cpu()
        except Exception as error:
            flex_reason = describe(error)
            print("".join(traceback.format_exc().splitlines(keepends=True)[-6:]), file=sys.stderr)
        finally:
            chosen = inp = None
            if args.device == "cuda":
                torch._dynamo.reset()  # drop compiled graphs and the mask they hold
            free(collect=True)
    if flex_got is not None:
        got_rows = flex_got[0][rows.cpu()].to(args.device)
        ok, worst, excused = compare_rows(got_rows, want_rows, near_rows, rtol)
        case.verdict["Flex"] = (
            ok,
            f"{len(rows)} exact rows: max err {worst:.2%}" + (f", {excused} near-tied excused" if excused else ""),
        )
    for mode in modes:
        if flex_reason or ("Flex", mode) not in case.cells:
            case.cells["Flex", mode] = Cell(note=flex_reason or "n/a (no CPU backward)")

    # MoBA: the check first, then the timings with nothing else alive.
    inp = make_inputs(args, S, "SHD")
    try:
        got = outputs(lambda i: moba_call(args, i, B, K), inp, grads="fwd+bwd" in modes)
        ok, worst, excused = compare_rows(got[0][rows], want_rows, near_rows, rtol)
        text = f"{len(rows)} exact rows: max err {worst:.2%}" + (f", {excused} near-tied excused" if excused else "")
        if flex_got is not None:
            flex_dev = tuple(None if t is None else t.to(args.device) for t in flex_got)
            ok_flex, text_flex = compare_full(got, flex_dev, near_HS, rtol, grad_tol)
            ok, text = ok and ok_flex, f"{text}; vs Flex: {text_flex}"
            del flex_dev
        case.verdict["MoBA"] = (ok, text)
        del got
    except Exception as error:
        case.verdict["MoBA"] = (False, f"check {describe(error)}")
    free(collect=True)
    for mode in modes:
        case.cells["MoBA", mode] = measure(args, lambda i: moba_call(args, i, B, K), inp, mode)
    del inp
    free()

    # SDPA does not depend on B and K: measured once per S.
    for mode in modes:
        if (S, mode) not in sdpa_cache:
            inp = make_inputs(args, S, "BHSD")
            args.sdpa_backends.setdefault(mode, sdpa_backend_name(args, inp, mode != "fwd"))
            sdpa_cache[S, mode] = measure(args, lambda i: sdpa_call(args, i), inp, mode)
            del inp
            free()
        case.cells["SDPA", mode] = sdpa_cache[S, mode]
    for mode in modes:
        log(args, f"  {mode}: " + ", ".join(f"{c} {fmt_cell(case.cells[c, mode])}" for c in CONTENDERS))
    for name, (ok, text) in case.verdict.items():
        log(args, f"  check {name}: {'ok' if ok else 'WRONG'} ({text})")
    return case


def reference_checks(args) -> list[str]:
    """MoBA against moba_reference (fp32 oracle) on small cases, and this script's chunked selection
    against moba_selection. Returns report lines; a failure marks every MoBA row as wrong."""
    lines = []
    cases = [(3072, 256, 3), (3072, 128, 12)] if args.device == "cuda" else [(384, 32, 3), (384, 16, 6)]
    for S, B, K in cases:
        inp = make_inputs(args, S, "SHD")
        cu = torch.tensor([0, S], dtype=torch.int32, device=args.device)
        try:
            groups = args.heads // args.kv_heads
            kbar = block_means(inp.k, B)
            mine, near = full_selection(inp.q, kbar, B, K, args.tie_tol)
            theirs = moba_selection(inp.q.detach(), inp.k.detach().repeat_interleave(groups, dim=1), B, K)
            same_selection = not bool(((mine != theirs).any(-1) & ~near).any())
            got = outputs(lambda i, B=B, K=K: moba_call(args, i, B, K), inp, grads=True)
            ref_inp = Inputs(*(t.detach().double().requires_grad_() for t in inp.leaves()), inp.dO.double())
            want = outputs(lambda i, cu=cu, B=B, K=K: moba_reference(i.q, i.k, i.v, cu, B, K), ref_inp, grads=True)
            ok, text = compare_full(
                got,
                want,
                near,
                3e-2 if args.dtype == torch.bfloat16 else 1e-4,
                2e-2 if args.dtype == torch.bfloat16 else 1e-4,
            )
            ok = ok and same_selection
            text += "" if same_selection else "; this script's selection differs from moba_selection"
        except Exception as error:
            ok, text = False, describe(error)
        args.reference_ok = args.reference_ok and ok
        lines.append(f"- S={S} B={B} K={K}: {'ok' if ok else 'WRONG'} ({text})")
        log(args, f"reference check{lines[-1][1:]}")
        del inp
        free()
    return lines


# ---------------------------------------------------------------- an attention sink


def sink_inputs(args, S: int, B: int) -> Inputs:
    """make_inputs with block 0 made an attention sink: its keys and every query share a direction
    w, so that every query's gate picks block 0 (and its dk/dv program would read every query)."""
    inp = make_inputs(args, S, "SHD", grad=False)
    g = torch.Generator(device=args.device).manual_seed(args.seed + S + 1)
    w = F.normalize(torch.randn(args.head_dim, generator=g, device=args.device), dim=0).to(args.dtype)
    inp.q += 4 * w
    inp.k[:B] += 8 * w
    for t in inp.leaves():
        t.requires_grad_()
    return inp


def run_sink(args, B: int, K: int, S: int) -> tuple[str, bool, str]:
    """MoBA alone at one (S, B, K), on random inputs and on sink inputs: a table row, whether both
    outputs matched the exact sampled rows, and what was checked."""
    rtol = 3e-2 if args.dtype == torch.bfloat16 else 1e-4
    rows = sample_rows(S, B, args.rows, args.seed, args.device)
    shares, cells, checks, all_ok = [], [], [], True
    for name, inputs in (("random", lambda: make_inputs(args, S, "SHD")), ("sink", lambda: sink_inputs(args, S, B))):
        inp = inputs()
        kbar = block_means(inp.k, B)
        want_rows, near_rows = exact_rows(inp, rows, kbar, B, K, args.tie_tol)
        chosen_HRn, _ = select_rows(inp.q[rows], rows, kbar, B, K, args.tie_tol)
        shares.append(f"{chosen_HRn[:, rows >= B, 0].float().mean().item():.0%}")
        try:
            got = outputs(lambda i: moba_call(args, i, B, K), inp, grads=False)[0][rows]
            ok, worst, excused = compare_rows(got, want_rows, near_rows, rtol)
            checks.append(
                f"{name} {len(rows)} exact rows: max err {worst:.2%}" + (f", {excused} excused" if excused else "")
            )
        except Exception as error:
            ok = False
            checks.append(f"{name} check {describe(error)}")
        all_ok = all_ok and ok
        free(collect=True)
        cells.append({mode: measure(args, lambda i: moba_call(args, i, B, K), inp, mode) for mode in MODES})
        del inp
        free()
    slow = "—"
    random_ms, sink_ms = cells[0]["fwd+bwd"].ms, cells[1]["fwd+bwd"].ms
    if all_ok and random_ms and sink_ms:
        slow = f"{sink_ms / random_ms:.2f}x"
    row = [short(S), str(B), str(K), " / ".join(shares)]
    row += [fmt_cell(c[mode]) for mode in MODES for c in cells] + [slow]
    log(args, f"sink S={short(S)} B={B} K={K}: " + " | ".join(row[3:]))
    return "| " + " | ".join(row) + " |", all_ok, "; ".join(checks)


def sink_section(args, skipped: list[str]) -> list[str]:
    """The sink cases at the first --configs B/K, while the budget lasts."""
    B, K = args.configs[0]
    head = ["S", "B", "K", "block 0 picked (random / sink)", "fwd ms random", "fwd ms sink"]
    head += ["fwd+bwd ms random", "fwd+bwd ms sink", "sink / random fwd+bwd"]
    lines = [
        "",
        "### Attention sink (MoBA only)",
        "",
        "Every query routed to block 0 (its keys and the queries share a direction), against the same "
        "shapes on random inputs: with the dk/dv work of long routed lists split across programs the "
        "sink should cost about what random routing costs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    checks = []
    for S in args.sink_seqs:
        if time.perf_counter() - args.t0 > args.budget:
            skipped.append(f"sink S={short(S)} B={B} K={K}")
            continue
        row, ok, text = run_sink(args, B, K, S)
        lines.append(row)
        checks.append(f"- sink S={short(S)}: {'ok' if ok else 'WRONG'} ({text})")
    return lines + ["", *checks] if checks else []


# ---------------------------------------------------------------- report


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 10 else f"{ms:.3f}"


def fmt_cell(cell: Cell, what: str = "ms") -> str:
    if cell.note:
        return cell.note
    value = cell.ms if what == "ms" else cell.gib
    return "n/a" if value is None else fmt_ms(value) if what == "ms" else f"{value:.2f}"


def trusted(case: Case, name: str) -> bool:
    return name == "SDPA" or case.verdict.get(name, (False, ""))[0]


def ratio(case: Case, mode: str, num: str, den: str, what: str = "ms") -> tuple[float | None, str]:
    a, b = case.cells[num, mode], case.cells[den, mode]
    for name in (num, den):
        if not trusted(case, name) and not case.cells[name, mode].note:
            return None, "refused"
    x, y = (a.ms, b.ms) if what == "ms" else (a.gib, b.gib)
    if x is None or y is None:
        return None, "—"
    return x / y, f"{x / y:.2f}x" if x / y < 10 else f"{x / y:.1f}x"


def tflops(case: Case, name: str, mode: str, args) -> str:
    cell = case.cells[name, mode]
    if cell.ms is None or not trusted(case, name):
        return "—"
    pairs = case.S * case.S / 2 if name == "SDPA" else case.pairs  # SDPA counts the causal half
    flops = 4 * args.head_dim * args.heads * pairs * (3.5 if mode == "fwd+bwd" else 1.0)
    return f"{flops / cell.ms / 1e9:.0f}" if args.device == "cuda" else f"{flops / cell.ms / 1e9:.2g}"


def table(args, cases: list[Case]) -> list[str]:
    head = [
        "S", "mode", "density", "SDPA ms", "Flex ms", "MoBA ms", "MoBA vs SDPA", "MoBA vs Flex",
        "SDPA TFLOP/s", "Flex eff. TFLOP/s", "MoBA eff. TFLOP/s", "SDPA GiB", "Flex GiB", "MoBA GiB", "MoBA/SDPA mem",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        for mode in MODES:
            if ("SDPA", mode) not in case.cells:
                lines.append(f"| {short(case.S)} | {mode} | | " + " | ".join(["— (forward only)"] + [""] * 11) + " |")
                continue
            row = [short(case.S), mode, f"{case.pairs / (case.S * (case.S + 1) / 2):.3f}"]
            row += [fmt_cell(case.cells[c, mode]) for c in CONTENDERS]
            row += [ratio(case, mode, "SDPA", "MoBA")[1], ratio(case, mode, "Flex", "MoBA")[1]]
            row += [tflops(case, c, mode, args) for c in CONTENDERS]
            row += [fmt_cell(case.cells[c, mode], "gib") for c in CONTENDERS]
            row.append(ratio(case, mode, "MoBA", "SDPA", "gib")[1])
            lines.append("| " + " | ".join(row) + " |")
    return lines


def summary(cases: list[Case], skipped: list[str]) -> list[str]:
    lines = []
    for B, K, S, target in SPEED_TARGETS:
        case = next((c for c in cases if (c.B, c.K, c.S) == (B, K, S)), None)
        what = f"- S={short(S)} B={B} K={K} fwd+bwd, MoBA speedup over SDPA"
        if case is None or ("SDPA", "fwd+bwd") not in case.cells:
            lines.append(f"{what}: not measured in this run (target >= {target:g}x)")
            continue
        value, text = ratio(case, "fwd+bwd", "SDPA", "MoBA")
        if value is None:
            verdict = "not verified" if text == "refused" else "not measured"
        else:
            verdict = "met" if value >= target else "NOT met"
        lines.append(f"{what}: {text} (target >= {target:g}x): {verdict}")
    worst, unverified = None, []
    for case in cases:
        for mode in MODES:
            if ("SDPA", mode) in case.cells:
                value, text = ratio(case, mode, "MoBA", "SDPA", "gib")
                where = f"S={short(case.S)} B={case.B} K={case.K} {mode}"
                if text == "refused":
                    unverified.append(where)
                elif value is not None and (worst is None or value > worst[0]):
                    worst = (value, f"{text} at {where}")
    what = "- peak memory MoBA/SDPA"
    if worst is None:
        lines.append(f"{what}: not measured in this run (target <= {MEMORY_TARGET}x)")
    else:
        verdict = "met" if worst[0] <= MEMORY_TARGET else "NOT met"
        lines.append(f"{what}, worst row: {worst[1]} (target <= {MEMORY_TARGET}x): {verdict}")
    if unverified:
        lines.append(f"{what}: not verified where MoBA's output was wrong: {', '.join(unverified)}")
    lines += [f"- skipped for the time budget: {', '.join(skipped)}"] if skipped else []
    return lines


def header(args) -> list[str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    cuda = f", CUDA {torch.version.cuda}" if args.device == "cuda" else ""
    dtype = str(args.dtype).removeprefix("torch.")
    if args.device == "cuda":
        timing = (
            f"Times: median ms of `triton.testing.do_bench` (calls under {SLOW_MS:g} ms) or of 3-10 CUDA-event-timed "
            "calls (slower ones), after a warm-up call (compilation, autotuning)."
        )
    else:
        timing = f"Times: median ms of {args.cpu_reps} calls after a warm-up call; FlexAttention runs eager (no CPU backward)."
    return [
        "## MoBA attention: dense SDPA vs FlexAttention (exact MoBA mask) vs sparsetron",
        "",
        f"{datetime.date.today()}, {device}, torch {torch.__version__}, triton {triton_version}{cuda}",
        "",
        f"`{' '.join(shlex.quote(a) for a in ['python', *args.argv])}`",
        "",
        f"Batch 1, one sequence of S tokens, {args.heads} query / {args.kv_heads} key-value heads of {args.head_dim}, "
        f"{dtype}, torch.randn inputs (seed {args.seed}). " + timing + " Peak GiB: `torch.cuda.max_memory_allocated` "
        "over one call after `reset_peak_memory_stats`, counting the contender's own inputs q, k, v and dO (in both modes), "
        "the gradients in fwd+bwd, and for Flex its [H, S, n] bool selection and block mask. TFLOP/s: SDPA counts the causal "
        "half (2 S^2 H D forward); Flex and MoBA count the attended pairs only (effective; density = attended / "
        "causal pairs); fwd+bwd counts 3.5x the forward. SDPA backend: "
        + ", ".join(f"{m} {b}" for m, b in args.sdpa_backends.items())
        + f" (`--sdpa-backend {args.sdpa_backend}`).",
    ]


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="S 8K and 32K only (CPU: 512), shorter timing")
    parser.add_argument("--seqs", help="comma-separated S, k = 1024 (GPU default 8k,32k,128k,512k)")
    parser.add_argument("--configs", help="comma-separated B/K (GPU default 512/3,4096/12)")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--max-train-seq", type=size_arg, help="longer S are timed forward only (GPU default 128k)")
    parser.add_argument(
        "--flex-max-seq", type=size_arg, help="longer S skip Flex (default: --max-train-seq; 0: no Flex)"
    )
    parser.add_argument("--sink-seqs", help="S of the attention-sink cases, MoBA only (GPU default 32k,128k; 0: none)")
    parser.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "cudnn", "efficient"])
    parser.add_argument("--rows", type=int, default=64, help="random query rows checked exactly at each S")
    parser.add_argument("--tie-tol", type=float, default=1e-4, help="near-tied gates, relative to |q| max|kbar|")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no new case starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    defaults = GPU if args.device == "cuda" else CPU
    if args.seqs is None:
        args.seqs = (GPU_QUICK_SEQS if args.device == "cuda" else CPU_QUICK_SEQS) if args.quick else defaults["seqs"]
    args.seqs = [size_arg(s) for s in args.seqs.split(",")]
    args.configs = [tuple(int(x) for x in c.split("/")) for c in (args.configs or defaults["configs"]).split(",")]
    quick_sinks = GPU_QUICK_SINK_SEQS if args.device == "cuda" and args.quick else defaults["sink_seqs"]
    sinks = (args.sink_seqs or quick_sinks).split(",")
    args.sink_seqs = [S for S in (size_arg(s) for s in sinks) if S > 0]
    args.heads = args.heads or defaults["heads"]
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or defaults["head_dim"]
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    args.max_train_seq = args.max_train_seq or size_arg(defaults["max_train_seq"])
    args.flex_max_seq = args.max_train_seq if args.flex_max_seq is None else args.flex_max_seq
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    args.rep_ms, args.slow_rep_ms, args.cpu_reps = (40, 1000, 2) if args.quick else (100, 2000, 3)
    args.argv = ["benchmarks/moba.py", *argv]
    args.sdpa_backends, args.reference_ok = {}, True
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse(sys.argv[1:] if argv is None else argv)
    args.t0 = time.perf_counter()
    if args.device == "cuda":
        torch._dynamo.config.recompile_limit = 64  # one graph per (S, B, grad mode); reset after each Flex case anyway
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
    reference = reference_checks(args)
    # Training lengths first (the targets), then the forward-only ones.
    order = [(B, K, S) for S in args.seqs if S <= args.max_train_seq for B, K in args.configs]
    order += [(B, K, S) for S in args.seqs if S > args.max_train_seq for B, K in args.configs]
    cases, skipped, sdpa_cache = [], [], {}
    for B, K, S in order:
        if time.perf_counter() - args.t0 > args.budget:
            skipped.append(f"S={short(S)} B={B} K={K}")
            continue
        case = run_case(args, B, K, S, sdpa_cache)
        if not args.reference_ok:
            case.verdict["MoBA"] = (False, "failed the reference check; " + case.verdict["MoBA"][1])
        cases.append(case)
    sink = sink_section(args, skipped)
    lines = header(args) + ["", "Check against `moba_reference` (fp64) and `moba_selection`:", *reference]
    for B, K in args.configs:
        mine = sorted((c for c in cases if (c.B, c.K) == (B, K)), key=lambda c: c.S)
        if not mine:
            continue
        lines += [
            "",
            f"### B={B}, K={K}",
            "",
            *table(args, mine),
            "",
            "Checks (a contender marked wrong gets no ratio):",
        ]
        for case in mine:
            for name, (ok, text) in case.verdict.items():
                lines.append(f"- S={short(case.S)} {name}: {'ok' if ok else 'WRONG'} ({text})")
    lines += sink
    lines += [
        "",
        "### Targets (issue 5)",
        "",
        *summary(cases, skipped),
        "",
        f"Run time {time.perf_counter() - args.t0:.0f} s.",
    ]
    return emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
