"""Document-masked causal attention: sparsetron's dense-mask path against its variable-length path.

One row of S tokens packed with documents of random lengths (a fixed seed), bf16, forward and
forward+backward, side by side in one run, each path called as the model calls it (on a batch of
one row, [1, S, H, d]):
  - dense mask: `kernels.varlen.document_attention_reference`, what the model ran before its varlen
    op: a boolean [1, 1, S, S] document-causal mask built from the document ids and K/V heads
    repeated for GQA, through SDPA (the backend torch picks for a masked call). Building the mask
    and repeating K/V are timed: the model paid for both in every layer;
  - sparsetron varlen: `kernels.varlen.varlen_attention`, which on CUDA in bf16/fp16 is torch's
    `torch.nn.attention.varlen.varlen_attn` (flash) on the packed layout, GQA without repeating
    K/V; cu_seqlens and max_seqlen come from `model.sequence.SequenceInfo.build`, once per batch,
    untimed. Where that kernel is missing, varlen_attention falls back to the dense mask, so the
    row is not measured on a GPU (a note says so);
  - flash-attn: `flash_attn_varlen_func`, the peer, when the flash-attn package is importable.
Before anything is timed, each path's output and q/k/v gradients are compared per element,
relative to each row's scale, with an fp32 computation (softmax attention written out per
document, shared with no path); a path whose error exceeds 4x the dense-mask path's own bf16
error gets no ratio. Out-of-memory is reported per cell. TFLOP/s counts only the causal
within-document (query, key) pairs, 4 d FLOPs per pair and head, fwd+bwd 3.5x the forward (as
../shared/specs/anchors.md).

    python benchmarks/doc_attention.py                       # GPU: S 8K and 32K, 16 heads x 128, MHA and GQA 16/4
    python benchmarks/doc_attention.py --output $OUT/doc_attention.md
    python benchmarks/doc_attention.py --device cpu          # tiny, fp32: a smoke test of the report. On the CPU
                                                             # varlen_attention is the dense mask itself, so its
                                                             # row ("varlen (CPU stand-in)") times the same code

Shape legend: S tokens, H query heads, K key/value heads, d head dim, N documents.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from report import cpu_median_ms, emit

from sparsetron.kernels.varlen import document_attention_reference, flash_varlen_available, varlen_attention
from sparsetron.model.sequence import SequenceInfo

GPU = {"seqs": "8192,32768", "heads": 16, "kv_heads": "16,4", "head_dim": 128, "mean_doc": 2048}
CPU = {"seqs": "128,200", "heads": 4, "kv_heads": "4,2", "head_dim": 16, "mean_doc": 40}
# A path may lose this much more accuracy than the dense-mask path in the same dtype.
ERROR_FACTOR = 4.0
# The baseline's name: its row comes first, and every ratio is to it.
BASELINE = "dense mask"


def doc_lengths(S: int, mean_doc: int, seed: int) -> list[int]:
    """Random document lengths summing to S: S / mean_doc - 1 distinct cut points."""
    g = torch.Generator().manual_seed(seed)
    n_cuts = max(S // mean_doc - 1, 1)
    cuts = (torch.randperm(S - 1, generator=g)[:n_cuts] + 1).sort().values.tolist()
    bounds = [0, *cuts, S]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def pair_count(lengths: list[int]) -> int:
    """Causal (query, key) pairs within documents, the diagonal included."""
    return sum(n * (n + 1) // 2 for n in lengths)


def reference_attention(q_SHd, k_SKd, v_SKd, lengths: list[int]):
    """softmax(q k^T / sqrt(d) + causal) v written out per document: the oracle, shared with no path."""
    groups = q_SHd.shape[1] // k_SKd.shape[1]
    outs = []
    for q, k, v in zip(q_SHd.split(lengths), k_SKd.split(lengths), v_SKd.split(lengths), strict=True):
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores_HLL = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        future_LL = torch.ones(len(q), len(q), dtype=torch.bool, device=q.device).triu(1)
        outs.append(torch.einsum("hqk,khd->qhd", scores_HLL.masked_fill(future_LL, -torch.inf).softmax(-1), v))
    return torch.cat(outs)


def flash_attn_varlen() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def paths(args, lengths: list[int]) -> tuple[dict[str, Callable], list[str]]:
    """name -> f(q, k, v) on [S, H, d] for this document layout (dense first: the baseline), and notes.

    Each path is sparsetron's own function on a batch of one row.
    """
    device = args.device
    doc_ids_1S = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)[None]
    seq = SequenceInfo.build(1, sum(lengths), doc_ids_1S)
    found = {BASELINE: lambda q, k, v: document_attention_reference(q[None], k[None], v[None], doc_ids_1S)[0]}
    notes = []

    def varlen(q, k, v):
        return varlen_attention(q[None], k[None], v[None], doc_ids_1S, seq.cu_seqlens_N, seq.max_seqlen)[0]

    if flash_varlen_available(device, args.dtype):
        found["sparsetron varlen (torch varlen_attn)"] = varlen
    elif device == "cpu":
        found["varlen (CPU stand-in)"] = varlen
        notes.append(
            "the flash varlen kernel is CUDA-only: on the CPU sparsetron's varlen_attention falls back to "
            "the dense mask, so both rows time the same code (a smoke test of the report, not a comparison)"
        )
    else:
        notes.append(
            "sparsetron varlen: torch.nn.attention.varlen is not importable (torch < 2.10), so varlen_attention "
            "would run the dense mask: not measured"
        )
    if device == "cuda":
        fn = flash_attn_varlen()
        if fn is None:
            notes.append("flash-attn: not importable in this environment, not measured")
        else:
            found["flash-attn"] = lambda q, k, v: fn(q, k, v, seq.cu_seqlens_N, seq.max_seqlen)
    return found, notes


def row_relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |x - ref| relative to the scale of its (token, head) row of the reference.

    A row's scale is floored at the tensor's RMS: some rows are exactly zero (a document's first
    query sees one key, so its dq vanishes), and rounding residue there is not an error.
    """
    scale = torch.maximum(ref.abs().amax(-1, keepdim=True), ref.pow(2).mean().sqrt())
    return ((x.double() - ref) / scale).abs().max().item()


def failure(err: Exception) -> str:
    """A table cell for a path that raised: OOM, or the error in brief (no '|' to break the table)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "OOM"
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}".replace("|", "/")


def gradients(fn, q, k, v, grad) -> list[torch.Tensor]:
    """[output, dq, dk, dv] of fn at fresh leaves holding q, k, v."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves)]


def check(args, found, q, k, v, grad, lengths) -> dict[str, tuple[bool, str]]:
    """Output and q/k/v gradients of each path against the reference in high precision."""
    high = torch.float64 if args.device == "cpu" else torch.float32
    try:
        refs = gradients(lambda *x: reference_attention(*x, lengths), *(t.to(high) for t in (q, k, v, grad)))
    except Exception as err:  # the report says why; the other cases still run
        return {name: (False, f"no reference: {failure(err)}") for name in found}
    errors = {}
    for name, fn in found.items():
        try:
            errors[name] = max(
                row_relative_error(a, r) for a, r in zip(gradients(fn, q, k, v, grad), refs, strict=True)
            )
        except Exception as err:
            errors[name] = failure(err)
    del refs
    baseline = errors[BASELINE]
    if not isinstance(baseline, float):
        return {name: (False, f"no baseline: {BASELINE} {baseline}") for name in found}
    tolerance = ERROR_FACTOR * max(baseline, torch.finfo(args.dtype).eps)
    verdict = {}
    for name, err in errors.items():
        if not isinstance(err, float):
            verdict[name] = (False, err)
        else:
            verdict[name] = (err <= tolerance, f"max error {err:.2e} per row scale, tolerance {tolerance:.2e}")
    return verdict


def bench_ms(args, fn, leaves) -> float:
    if args.device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=args.rep_ms, grad_to_none=leaves, return_mode="median")
    return cpu_median_ms(fn, reps=3, warmup=1)


def peak_gib(args, fn) -> float | None:
    """Memory one call adds on top of what is allocated already (None on the CPU)."""
    if args.device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def run_case(args, S: int, kv_heads: int) -> tuple[list[dict], dict, list[str], list[int]]:
    lengths = doc_lengths(S, args.mean_doc, args.seed + S)
    found, notes = paths(args, lengths)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    H, d = args.heads, args.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=args.device, dtype=args.dtype)

    q, k, v, grad = randn(S, H, d), randn(S, kv_heads, d), randn(S, kv_heads, d), randn(S, H, d)
    verdict = check(args, found, q, k, v, grad, lengths)
    print(f"  checks: {verdict}", file=sys.stderr, flush=True)
    fwd_flops = 4 * pair_count(lengths) * H * d
    leaves = [t.requires_grad_() for t in (q, k, v)]
    rows = []
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        for name, path in found.items():

            def call(path=path, mode=mode):
                if mode == "fwd":
                    with torch.no_grad():
                        return path(*leaves)
                return path(*leaves).backward(grad)

            row = {"S": S, "heads": f"{H}/{kv_heads}", "docs": len(lengths), "mode": mode, "path": name}
            try:
                row["ms"] = bench_ms(args, call, leaves)
                row["gib"] = peak_gib(args, call)
                row["tflops"] = flops / row["ms"] / 1e9
            except Exception as err:  # reported in its cell; the next one still runs
                row["ms"] = failure(err)
            for t in leaves:
                t.grad = None
            if args.device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            # Each cell as it is measured: a run stopped by a timeout still leaves its numbers.
            print(f"  {row}", file=sys.stderr, flush=True)
    return rows, verdict, notes, lengths


def fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, float) else ("—" if value is None else str(value))


def table(rows: list[dict], verdicts: dict) -> list[str]:
    """Markdown rows; a ratio to the dense-mask path only where both were checked correct and measured."""
    lines = [
        "| S | heads q/kv | docs | mode | path | ms | TFLOP/s | peak GiB | speedup vs dense | memory vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(
            r
            for r in rows
            if (r["S"], r["heads"], r["mode"], r["path"]) == (row["S"], row["heads"], row["mode"], BASELINE)
        )
        verdict = verdicts[(row["S"], row["heads"])]
        ok = verdict[row["path"]][0] and verdict[BASELINE][0]
        timed = isinstance(row["ms"], float) and isinstance(base["ms"], float)
        if row["path"] == BASELINE:
            speedup = memory = "1"
        elif not ok:
            speedup = memory = "refused"
        else:
            speedup = f"{base['ms'] / row['ms']:.2f}x" if timed else "—"
            mems = (base.get("gib"), row.get("gib"))
            memory = f"{mems[1] / mems[0]:.2f}x" if timed and None not in mems and mems[0] > 0 else "—"
        lines.append(
            f"| {row['S']} | {row['heads']} | {row['docs']} | {row['mode']} | {row['path']} | {fmt(row['ms'], '.3f')} "
            f"| {fmt(row.get('tflops'), '.3g')} | {fmt(row.get('gib'), '.2f')} | {speedup} | {memory} |"
        )
    return lines


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--seqs", help="comma-separated S (GPU default 8192,32768)")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", help="comma-separated key/value head counts, one case each (GPU default 16,4)")
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--mean-doc", type=int, help="mean document length (GPU default 2048)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's timing window per cell")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds after which no new case starts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="also write the report to this file")
    args = parser.parse_args(argv)
    defaults = GPU if args.device == "cuda" else CPU
    for key in ("seqs", "heads", "kv_heads", "head_dim", "mean_doc"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.seqs = [int(s) for s in str(args.seqs).split(",")]
    args.kv_heads = [int(k) for k in str(args.kv_heads).split(",")]
    for kv in args.kv_heads:
        if kv < 1 or args.heads % kv:
            parser.error(f"--kv-heads {kv} does not divide --heads {args.heads}")
    for S in args.seqs:
        if S < 2 * args.mean_doc:
            parser.error(f"--seqs {S} holds fewer than two documents of --mean-doc {args.mean_doc}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    rows, verdicts, notes, skipped, layouts = [], {}, set(), [], []
    for S in args.seqs:
        for kv in args.kv_heads:
            if time.perf_counter() - t0 > args.budget:
                skipped.append(f"S={S} heads {args.heads}/{kv}")
                continue
            print(f"S={S} heads {args.heads}/{kv} ...", file=sys.stderr, flush=True)
            case_rows, verdict, case_notes, lengths = run_case(args, S, kv)
            rows += case_rows
            verdicts[(S, f"{args.heads}/{kv}")] = verdict
            notes.update(case_notes)
            if kv == args.kv_heads[0]:
                layouts.append(f"S={S}: {len(lengths)} documents, longest {max(lengths)}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    lines = [
        f"## Document-masked causal attention on {device}, torch {torch.__version__}, "
        f"{str(args.dtype).removeprefix('torch.')}, head dim {args.head_dim}",
        "",
        f"`{' '.join(['python benchmarks/doc_attention.py', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        *table(rows, verdicts),
        "",
        "Checks against softmax attention written out per document in "
        f"{'fp64' if args.device == 'cpu' else 'fp32'} (output and q/k/v gradients; a path marked wrong gets no ratio):",
    ]
    for (S, heads), verdict in verdicts.items():
        for name, (ok, text) in verdict.items():
            lines.append(f"- S={S} heads {heads} {name}: {'ok' if ok else 'WRONG'} ({text})")
    lines += [f"- {note}" for note in sorted(notes)] + [f"- documents: {layout}" for layout in layouts]
    if skipped:
        lines.append(f"- not run (--budget {args.budget:.0f} s spent): {', '.join(skipped)}")
    lines.append(f"\nRun time {time.perf_counter() - t0:.0f} s.")
    return emit("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
