"""The CPU/gloo half of benchmarks/context_parallel.py: one training step of a small model at each
context-parallel degree, on spawned ranks, with what each rank keeps and sends.

One spawn of max(cps) processes serves every degree: degree cp runs on ranks [0, cp) of the world
(a gloo subgroup) while the others wait at a barrier, so a run pays for one interpreter start per
rank, not one per degree. Every rank runs one thread, as a rank of a real job has its own cores.

Each rank builds the same model (same seed), wraps its attention ops with
`parallel.context_parallel.apply_cp` (cp > 1), shards the one global batch with `shard_batch`, and
runs forward + backward of its own tokens' mean loss (no optimizer step: nothing of it depends on
cp). The first step is measured, the next `reps` timed:

- saved bytes: the distinct storages autograd saves for the backward (weights and buffers
  excluded), taken with `torch.autograd.graph.saved_tensors_hooks` over the forward: what the
  step's activations hold at their peak, the end of the forward. Storages first saved inside an
  attention op (the context-parallel exchange included), but for its output, are counted apart,
  so that the report can say what does and does not shrink with cp;
- communicated bytes: every functional collective the step runs (forward and backward apart),
  seen by a TorchDispatchMode at the `_c10d_functional` ops the wrappers' autograd collectives
  dispatch to. A rank's volume is what it sends to the other ranks (all-to-all: its input but its
  own share; reduce-scatter: (n - 1) / n of its input) or receives from them (all-gather: n - 1
  inputs): what ring and direct algorithms alike must move per rank;
- step time: wall milliseconds of forward + backward on each rank, all ranks released together by
  a barrier.

Shape legend: B rows, S positions per row.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from report import spawn_gloo_ranks
from torch.utils._python_dispatch import TorchDispatchMode

# Collectives that move no data of their own (completion and autograd bookkeeping).
NOT_TRANSFERS = {"wait_tensor", "_wrap_tensor_autograd"}


class CommCounter(TorchDispatchMode):
    """Bytes this rank (`rank` of `ranks`) exchanges in functional collectives, by phase."""

    def __init__(self, rank: int, ranks: int):
        super().__init__()
        self.rank, self.ranks = rank, ranks
        self.phase = "forward"
        self.bytes = {"forward": 0, "backward": 0}
        self.calls = {"forward": [], "backward": []}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func.overloadpacket.__name__ not in NOT_TRANSFERS:
            name = func.overloadpacket.__name__
            self.bytes[self.phase] += self.transferred(name, args)
            self.calls[self.phase].append(name)
        return func(*args, **(kwargs or {}))

    def transferred(self, name: str, args) -> int:
        x = args[0]
        if name == "all_to_all_single":
            splits = args[2] or [x.shape[0] // self.ranks] * self.ranks
            return x.nbytes * (sum(splits) - splits[self.rank]) // sum(splits)
        if name == "all_gather_into_tensor":
            return x.nbytes * (args[1] - 1)
        if name == "reduce_scatter_tensor":
            return x.nbytes * (args[2] - 1) // args[2]
        raise NotImplementedError(f"the benchmark does not count the bytes of collective {name}")


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    # The functional collectives return AsyncCollectiveTensor wrappers (views of them too), whose
    # data lives in the wrapped `elem`.
    while isinstance(t, funcol.AsyncCollectiveTensor):
        t = t.elem
    return t.untyped_storage()


class SavedBytes:
    """Distinct storages autograd saves while active, those first saved inside an attention op apart."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.storages: dict[int, tuple[int, bool]] = {}
        # Every saved tensor stays referenced while measuring: a storage freed meanwhile (some are)
        # could otherwise hand its address to a new one, which would then pass for it.
        self.kept: list[torch.Tensor] = []
        self.in_attention = False
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = _storage(t)
        if storage.data_ptr() not in self.weights:
            self.storages.setdefault(storage.data_ptr(), (storage.nbytes(), self.in_attention))
            self.kept.append(t)
        return t

    def total(self, attention_only: bool = False) -> int:
        return sum(n for n, inside in self.storages.values() if inside or not attention_only)


class _Tagged:
    """An attention op that tells `saved` when it runs (the wrapped op itself is unchanged)."""

    def __init__(self, op, saved: SavedBytes):
        self.op, self.saved = op, saved

    def __call__(self, *args):
        self.saved.in_attention = True
        try:
            o = self.op(*args)
        finally:
            self.saved.in_attention = False
        # The output is a per-token activation the output projection keeps whichever side saves it
        # first (SDPA saves its own output; the chunked ops' concatenation is first saved by wo).
        ptr = _storage(o).data_ptr()
        if ptr in self.saved.storages:
            self.saved.storages[ptr] = (self.saved.storages[ptr][0], False)
        return o


def attention_config(spec: dict, attention: str):
    from sparsetron.model.config import AttentionConfig

    return AttentionConfig(
        n_heads=spec["heads"],
        n_kv_heads=spec["kv_heads"],
        backend="moba" if attention == "moba" else "sdpa",
        moba_block_size=spec["block"],
        moba_topk=spec["topk"],
    )


def build_model(spec: dict, attention: str):
    from sparsetron.model.config import ModelConfig
    from sparsetron.model.transformer import materialised_transformer

    model_cfg = ModelConfig(
        vocab_size=spec["vocab"],
        dim=spec["dim"],
        n_layers=spec["layers"],
        ffn_hidden=2 * spec["dim"],
        max_seq_len=spec["seq"],
    )
    torch.manual_seed(spec["seed"])  # the same weights on every rank and degree
    return materialised_transformer(model_cfg, attention_config(spec, attention))


def global_batch(spec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, targets, document ids [B, S]: documents of mean length spec["mean_doc"], the same on every rank."""
    g = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch"], spec["seq"])
    tokens_BS, targets_BS = (torch.randint(0, spec["vocab"], shape, generator=g) for _ in range(2))
    doc_ids_BS = (torch.rand(shape, generator=g) < 1 / spec["mean_doc"]).long().cumsum(1)
    return tokens_BS, targets_BS, doc_ids_BS


def run_case(spec: dict, attention: str, style: str | None, group, rank: int, cp: int) -> dict:
    """One (attention, style, cp) case on this rank: its measured step, then its timed ones."""
    from sparsetron.model.attention import Attention
    from sparsetron.parallel.context_parallel import apply_cp, shard_batch

    model = build_model(spec, attention)
    if cp > 1:
        apply_cp(model, group, style)
    tokens_BS, targets_BS, doc_ids_BS = global_batch(spec)
    seq = model.sequence_info(tokens_BS, doc_ids_BS)
    if cp > 1:
        tokens_BS, targets_BS, seq = shard_batch(tokens_BS, targets_BS, seq, rank, cp)

    def loss_fn():
        logits = model(tokens_BS, seq)
        return F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten())

    saved = SavedBytes(model)
    ops = {attn: (attn.op, attn.full_op) for attn in model.modules() if isinstance(attn, Attention)}
    for attn, (op, full_op) in ops.items():
        attn.op, attn.full_op = _Tagged(op, saved), _Tagged(full_op, saved)
    comm = CommCounter(rank, cp)
    with comm:
        with saved.hooks:
            loss = loss_fn()
        saved.kept.clear()
        comm.phase = "backward"
        loss.backward()
    for attn, (op, full_op) in ops.items():
        attn.op, attn.full_op = op, full_op
    times_ms = []
    for _ in range(spec["reps"]):
        model.zero_grad(set_to_none=True)
        dist.barrier(group)
        start = time.perf_counter()
        loss_fn().backward()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return {
        "saved": saved.total(),
        "saved_attention": saved.total(attention_only=True),
        "comm": comm.bytes,
        "collectives": comm.calls,
        "times_ms": times_ms,
        "loss": loss.item(),
        "tokens": tokens_BS.numel(),
    }


def worker(spec: dict) -> dict:
    """Every case of spec on this rank: {(attention, style, cp): run_case's result} for each degree it takes part in."""
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    for cp in spec["cps"]:
        # Every rank creates every subgroup, in the same order (new_group is collective).
        group = dist.new_group(list(range(cp)))
        if rank < cp:
            for attention in spec["attentions"]:
                for style in spec["styles"] if cp > 1 else [None]:
                    results[(attention, style, cp)] = run_case(spec, attention, style, group, rank, cp)
        dist.barrier()
    return results


def _entry(rank: int, world: int, port: int, spec: dict, result_dir: str, timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    try:
        result = worker(spec)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(spec: dict, timeout: float) -> list[dict]:
    """`worker(spec)` on max(spec["cps"]) spawned gloo ranks; each rank's result, by rank. A rank
    that raises fails the call with its traceback; past `timeout` seconds every rank is killed."""
    return spawn_gloo_ranks(_entry, max(spec["cps"]), (spec,), timeout, "cp-bench-")
