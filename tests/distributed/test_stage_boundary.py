"""What a pipeline stage receives is, bit for bit, what the stage before it sent; and every
block of every stage sees the same description of the batch's sequences.

torch does not check a receive buffer's dtype against what the sender sends: a buffer typed
fp32 that receives bf16 bytes reads 1e36-scale garbage on gloo (and is undefined on NCCL), and
the loss can still look normal. So the check is on the bytes: every training and evaluation
forward of the second stage gets exactly the tensors (dtype, shape, values) the first stage
returned, on the layouts where the stage boundary dtype differs from the stored parameters'
(FSDP mixed precision) and where it does not, with tensor (sequence) parallelism, in bf16 and
fp32. The SequenceInfo each block receives (positions, documents, cu_seqlens, longest
document) is that of the micro-batch's whole sequences on every stage and tensor rank.
"""

import pytest
import torch
from harness import run_distributed

from sparsetron.model.sequence import SequenceInfo
from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer

LAYOUTS = {
    "pp2xdp2": (4, ["parallel.pipeline=2", "parallel.data_parallel_shard=2"]),
    "pp2": (2, ["parallel.pipeline=2"]),
    "pp2xtp2": (4, ["parallel.pipeline=2", "parallel.tensor=2"]),
}


def boundary_worker(run_dir, overrides):
    job = load_job_config(
        "debug-deepseek",
        [
            "model.n_layers=2",
            "trainer.steps=2",
            "trainer.micro_batch_size=2",
            "trainer.grad_accum_steps=2",
            "trainer.eval_interval=0",
            "trainer.eval_batches=1",
            "checkpoint.save_final=false",
            "checkpoint.interval=0",
            "metrics.console=none",
            f"trainer.run_dir={run_dir}",
            *overrides,
        ],
    )
    trainer = Trainer(job)
    stages = dict(zip(trainer.pipeline_split.stage_indices, trainer.pipeline_split.stages, strict=True))
    sent, received, sequences = [], [], {}
    for key, block in trainer.model.layers.items():
        block.register_forward_pre_hook(lambda module, args, key=key: sequences.setdefault(key, []).append(args[1]))
    if 0 in stages:
        stages[0].register_forward_hook(lambda module, args, out: sent.append(out.detach().clone()))
    if 1 in stages:
        # prepend: before FSDP's own pre-forward hook, which casts inputs to its compute dtype.
        stages[1].register_forward_pre_hook(
            lambda module, args: received.append(args[0].detach().clone()), prepend=True
        )
    trainer.run()
    ranks = {axis: trainer.mesh[axis].get_local_rank() for axis in ("pp", "dp", "tp")}
    return ranks, sent, received, sequences


PRECISIONS = ("bf16", "fp32")


def both_precisions_worker(run_dir, overrides):
    """`boundary_worker` in each precision, one after the other: one spawn per layout."""
    return {p: boundary_worker(f"{run_dir}/{p}", [*overrides, f"trainer.precision={p}"]) for p in PRECISIONS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(layout):
        if layout not in cache:
            world, overrides = LAYOUTS[layout]
            run_dir = str(tmp_path_factory.mktemp(f"boundary-{layout}"))
            by_rank = run_distributed(both_precisions_worker, world, run_dir, overrides, timeout=300)
            cache[layout] = {p: [rank_results[p] for rank_results in by_rank] for p in PRECISIONS}
        return cache[layout]

    return get


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stage_receives_what_the_previous_stage_sent(runs, layout, precision):
    results = runs(layout)[precision]
    # Stage 0 on pipeline rank 0 sends to stage 1 on rank 1, within each (data, tensor) rank.
    sent = {(r["dp"], r["tp"]): s for r, s, _, _ in results if r["pp"] == 0}
    received = {(r["dp"], r["tp"]): got for r, _, got, _ in results if r["pp"] == 1}
    assert sent.keys() == received.keys() and sent
    for where, tensors in sent.items():
        # The step-0 evaluation, two steps of two micro-batches, the final evaluation.
        assert len(tensors) == len(received[where]) == 6
        for out, got in zip(tensors, received[where], strict=True):
            assert got.dtype == out.dtype and got.shape == out.shape
            assert torch.equal(got, out), f"max |sent| {out.abs().max()}, max |received| {got.abs().max()}"
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert all(t.dtype == expected for t in tensors)

    for where in sent:
        seen = {}  # layer -> the SequenceInfo of each forward
        for r, _, _, sequences in results:
            if (r["dp"], r["tp"]) == where:
                seen.update(sequences)
        assert sorted(seen, key=int) == ["0", "1"]
        for forwards in zip(*seen.values(), strict=True):
            first = forwards[0]
            # Whole sequences, whatever part of them the hidden states hold, and built as one process builds them.
            rebuilt = SequenceInfo.build(*first.positions_BS.shape, first.doc_ids_BS)
            for seq in (*forwards, rebuilt):
                assert torch.equal(seq.positions_BS, first.positions_BS)
                assert torch.equal(seq.doc_ids_BS, first.doc_ids_BS)
                assert torch.equal(seq.cu_seqlens_N, first.cu_seqlens_N) and seq.max_seqlen == first.max_seqlen
            assert first.positions_BS.shape == (2, 64)
