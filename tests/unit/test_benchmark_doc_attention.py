"""benchmarks/doc_attention.py on the CPU: its paths are sparsetron's own functions called on a
batch of one row and compute document-causal attention, and a path that computes another function
or raises gets no ratio. (The whole CPU report is checked by test_benchmark_gpu_suite.py's dry run;
varlen_attention's torch-signature handling by test_varlen.py.)"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparsetron.kernels.varlen import document_attention_reference


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


def cpu_paths(bench, monkeypatch, lengths, flash=False):
    """The benchmark's paths for this layout on the CPU in fp64 (flash: as if the flash kernel ran)."""
    monkeypatch.setattr(bench, "flash_varlen_available", lambda device, dtype: flash)
    args = bench.parse(["--device", "cpu"])
    args.dtype = torch.float64
    return bench.paths(args, lengths)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_both_paths_equal_the_oracle(bench, monkeypatch, kv_heads):
    lengths = bench.doc_lengths(203, 30, seed=kv_heads)
    q, k, v = qkv(203, 4, kv_heads, 16)
    expected = bench.reference_attention(q, k, v, lengths)
    found, notes = cpu_paths(bench, monkeypatch, lengths)
    assert list(found) == ["dense mask", "varlen (CPU stand-in)"] and "same code" in notes[0]
    for got in (fn(q, k, v) for fn in found.values()):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # A later document must not see an earlier one: its first query attends to itself alone.
    first = sum(lengths[:2])
    torch.testing.assert_close(expected[first], v[first].repeat_interleave(4 // kv_heads, 0))


def test_paths_call_sparsetrons_functions_with_the_batch_of_one_row(bench, monkeypatch):
    lengths = bench.doc_lengths(150, 30, seed=1)
    calls = []

    def spy(name, fn):
        def record(*args):
            calls.append((name, args))
            return fn(*args)

        monkeypatch.setattr(bench, name, record)

    spy("document_attention_reference", document_attention_reference)
    spy("varlen_attention", bench.varlen_attention)
    found, notes = cpu_paths(bench, monkeypatch, lengths, flash=True)
    # Where the flash kernel runs, the row is sparsetron's op by name, and no stand-in note is left.
    assert list(found) == ["dense mask", "sparsetron varlen (torch varlen_attn)"] and notes == []
    q, k, v = qkv(150, 4, 2, 8)
    for fn in found.values():
        fn(q, k, v)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    (dense_name, dense), (varlen_name, varlen) = calls
    assert dense_name == "document_attention_reference" and varlen_name == "varlen_attention"
    for args in (dense, varlen):
        assert [t.shape for t in args[:3]] == [(1, 150, 4, 8), (1, 150, 2, 8), (1, 150, 2, 8)]
        assert torch.equal(args[3], doc_ids)
    assert torch.equal(varlen[4], cu) and varlen[5] == max(lengths)


def across_documents(q, k, v, doc_ids, cu, max_len):
    return document_attention_reference(q, k, v, torch.zeros_like(doc_ids))


def not_causal(q, k, v, doc_ids, cu, max_len):
    groups = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(groups, 2).transpose(1, 2) for t in (k, v))
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=same_doc).transpose(1, 2)


@pytest.mark.parametrize("wrong", [across_documents, not_causal])
def test_a_path_computing_another_function_gets_no_ratio(bench, monkeypatch, wrong):
    # Plausible bugs: the varlen path attends across document boundaries, or not causally.
    monkeypatch.setattr(bench, "varlen_attention", wrong)
    report = bench.main(["--device", "cpu", "--seqs", "96", "--heads", "4", "--kv-heads", "2"])
    assert "- S=96 heads 4/2 varlen (CPU stand-in): WRONG" in report
    assert "- S=96 heads 4/2 dense mask: ok" in report
    rows = [line for line in report.splitlines() if "| varlen (CPU stand-in) |" in line]
    assert len(rows) == 2 and all(line.endswith("| refused | refused |") for line in rows)


def test_a_path_that_raises_is_reported_in_its_cells_and_the_run_goes_on(bench, monkeypatch):
    def refuse(*args):
        raise RuntimeError("kernel refused | this shape")

    monkeypatch.setattr(bench, "varlen_attention", refuse)
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
