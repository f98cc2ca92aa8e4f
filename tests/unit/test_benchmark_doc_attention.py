"""benchmarks/doc_attention.py on the CPU: its paths compute document-causal attention, the varlen
adapter speaks both torch signatures, and a path that computes another function gets no ratio.
(The whole CPU report is checked by test_benchmark_gpu_suite.py's dry run.)"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "doc_attention.py"
    spec = importlib.util.spec_from_file_location("benchmark_doc_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def qkv(S, H, K, d, dtype=torch.float64):
    return torch.randn(S, H, d, dtype=dtype), torch.randn(S, K, d, dtype=dtype), torch.randn(S, K, d, dtype=dtype)


def test_documents_fill_the_row_and_pairs_are_the_masks_true_entries(bench):
    for S, mean in [(8192, 2048), (301, 40)]:
        lengths = bench.doc_lengths(S, mean, seed=S)
        assert sum(lengths) == S and min(lengths) >= 1 and len(lengths) == S // mean
        doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        if S < 1000:  # the mask itself, counted the slow way
            mask = (doc_ids[:, None] == doc_ids[None, :]) & torch.ones(S, S, dtype=torch.bool).tril()
            assert bench.pair_count(lengths) == int(mask.sum())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dense_mask_and_per_document_paths_equal_the_oracle(bench, kv_heads):
    lengths = bench.doc_lengths(203, 30, seed=kv_heads)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    q, k, v = qkv(203, 4, kv_heads, 16)
    expected = bench.reference_attention(q, k, v, lengths)
    for got in (bench.dense_mask_attention(q, k, v, doc_ids), bench.per_document_attention(q, k, v, lengths)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # A later document must not see an earlier one: its first query attends to itself alone.
    first = sum(lengths[:2])
    torch.testing.assert_close(expected[first], v[first].repeat_interleave(4 // kv_heads, 0))


def fake_varlen(window_api: bool):
    """A CPU varlen_attn with one of torch's two signatures, computing from cu_seqlens alone."""

    def attend(q, k, v, cu, causal, gqa):
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            o = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, enable_gqa=gqa
            )
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    if window_api:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
            assert window_size in ((-1, -1), (-1, 0))
            return attend(q, k, v, cu_q, window_size == (-1, 0), enable_gqa)
    else:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            return attend(q, k, v, cu_q, is_causal, False)

    return varlen_attn


@pytest.mark.parametrize("window_api", [True, False], ids=["window_size", "is_causal"])
def test_varlen_adapter_asks_for_causal_attention_with_either_signature(bench, monkeypatch, window_api):
    monkeypatch.setitem(
        sys.modules, "torch.nn.attention.varlen", types.SimpleNamespace(varlen_attn=fake_varlen(window_api))
    )
    run = bench.torch_varlen()
    lengths = bench.doc_lengths(150, 30, seed=1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = qkv(150, 4, 2, 8)
    torch.testing.assert_close(run(q, k, v, cu, max(lengths)), bench.reference_attention(q, k, v, lengths))


def test_a_path_computing_another_function_gets_no_ratio(bench, monkeypatch):
    # Plausible bugs: the stand-in attends across document boundaries, or not causally.
    for wrong in (
        lambda q, k, v, lengths: bench.reference_attention(q, k, v, [sum(lengths)]),
        lambda q, k, v, lengths: torch.cat(
            [
                F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in x), enable_gqa=True).transpose(0, 1)
                for x in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)
            ]
        ),
    ):
        monkeypatch.setattr(bench, "per_document_attention", wrong)
        report = bench.main(["--device", "cpu", "--seqs", "96", "--heads", "4", "--kv-heads", "2"])
        assert "- S=96 heads 4/2 varlen (CPU stand-in): WRONG" in report
        assert "- S=96 heads 4/2 dense mask: ok" in report
        rows = [line for line in report.splitlines() if "| varlen (CPU stand-in) |" in line]
        assert len(rows) == 2 and all(line.endswith("| refused | refused |") for line in rows)


def test_a_path_that_raises_is_reported_in_its_cells_and_the_run_goes_on(bench, monkeypatch):
    def refuse(q, k, v, lengths):
        raise RuntimeError("kernel refused | this shape")

    monkeypatch.setattr(bench, "per_document_attention", refuse)
    report = bench.main(["--device", "cpu", "--seqs", "96,128", "--heads", "4", "--kv-heads", "4"])
    for S in (96, 128):
        assert (
            f"- S={S} heads 4/4 varlen (CPU stand-in): WRONG (failed: RuntimeError: kernel refused / this shape)"
            in report
        )
        assert f"- S={S} heads 4/4 dense mask: ok" in report
        row = next(
            line for line in report.splitlines() if line.startswith(f"| {S} | 4/4 |") and "| fwd | varlen" in line
        )
        assert "| failed: RuntimeError: kernel refused / this shape | — | — | refused | refused |" in row
