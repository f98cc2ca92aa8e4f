"""What autograd keeps for a backward, in bytes of distinct storages: the measurement the
memory plan's tests (tests/unit/test_memory_plan.py, tests/distributed/test_memory_plan_cp.py)
hold `parallel.memory`'s estimate against."""

import dataclasses
from collections.abc import Callable, Iterable

import torch


def _context_storages(loss: torch.Tensor, storages: dict[int, int]) -> None:
    """Add the tensors a custom autograd function keeps on its context outside
    save_for_backward (MoBA's block layout and gather lists: `ctx.meta`)."""
    seen, nodes = set(), [loss.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for obj in getattr(node, "meta", ()):
            if dataclasses.is_dataclass(obj):
                for value in (getattr(obj, f.name) for f in dataclasses.fields(obj)):
                    if isinstance(value, torch.Tensor):
                        storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        nodes.extend(next_node for next_node, _ in node.next_functions)


def kept_bytes(run: Callable[[], torch.Tensor], excluded: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps while `run()` builds a loss, but the storages of `excluded` (weights)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    _context_storages(loss, storages)
    skip = {t.untyped_storage().data_ptr() for t in excluded}
    return sum(n for ptr, n in storages.items() if ptr not in skip)
