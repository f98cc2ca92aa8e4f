"""The CUDA fences of parallel/exchange.py: an exchange in flight on the side stream neither reads
rows the compute stream has not finished writing, nor lets the compute stream read rows that
have not arrived, nor has its buffers' memory handed to another tensor while in flight.

One GPU, one NCCL rank (the all-to-all is NCCL's copy to itself, on NCCL's stream like any
other). Each race is made wide with `torch.cuda._sleep` (a kernel that spins for a number of
cycles) on the stream that must be waited for; without the fence the check reads stale rows.
Then the overlapped dispatcher against the plain one on that rank, in bf16 on the GPU.
Run: pytest -m gpu.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from sparsetron.model.moe.experts import GroupedExperts
from sparsetron.model.moe.router import RouterOutput
from sparsetron.parallel.all_to_all_dispatch import AllToAllDispatcher
from sparsetron.parallel.exchange import Exchange
from sparsetron.parallel.overlapped_dispatch import OverlappedDispatcher

pytestmark = pytest.mark.gpu

SPIN = 50_000_000  # cycles: tens of milliseconds, far longer than the copies raced against it
ROWS, WIDTH = 4096, 1024


@pytest.fixture(scope="module")
def exchange():
    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield Exchange(dist.group.WORLD)
    if created:  # a group someone else made stays theirs
        dist.destroy_process_group()


def busy_side_stream(exchange, device):
    """Keep the exchange's side stream spinning, so an exchange started now runs late."""
    with torch.cuda.stream(exchange._stream_for(device)):
        torch.cuda._sleep(SPIN)


def test_start_waits_for_rows_the_compute_stream_is_still_writing(exchange):
    values = torch.randn(ROWS, WIDTH, device="cuda")
    inp = torch.zeros_like(values)
    out = torch.empty_like(values)
    torch.cuda.synchronize()
    torch.cuda._sleep(SPIN)  # the compute stream is busy ...
    inp.copy_(values)  # ... and writes the rows only then
    exchange.start(out, inp).wait()
    assert torch.equal(out, values)


def test_wait_holds_the_compute_stream_until_the_rows_arrived(exchange):
    inp = torch.randn(ROWS, WIDTH, device="cuda")
    out = torch.zeros_like(inp)
    torch.cuda.synchronize()
    busy_side_stream(exchange, inp.device)
    pending = exchange.start(out, inp)
    pending.wait()
    seen = out.clone()  # on the compute stream, right after wait
    assert torch.equal(seen, inp)


def test_buffers_in_flight_are_not_handed_to_new_tensors(exchange):
    values = torch.randn(ROWS, WIDTH, device="cuda")
    out = torch.zeros_like(values)
    torch.cuda.synchronize()
    busy_side_stream(exchange, values.device)
    inp = values.clone()
    pending = exchange.start(out, inp)
    del inp  # the caller drops the send buffer while the exchange has not read it yet
    scribbles = [torch.full_like(values, -7.0) for _ in range(4)]  # would reuse its memory
    pending.wait()
    assert torch.equal(out, values)
    del scribbles


@pytest.mark.parametrize("chunks", [1, 4])
def test_overlapped_dispatcher_matches_the_plain_one_on_the_gpu_in_bf16(exchange, chunks):
    torch.manual_seed(0)
    T, D, H, E, k = 2048, 256, 128, 16, 4
    experts = GroupedExperts(E, D, H).cuda()
    experts.init_weights(0.02, 0.02)
    x_TD = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    indices_Tk = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices
    weights_Tk = torch.softmax(torch.randn(T, k, device="cuda"), dim=-1)
    grad_TD = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)

    def run(dispatcher):
        x = x_TD.clone().requires_grad_()
        experts.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _, _ = dispatcher.run(x, RouterOutput(indices_Tk, weights_Tk, None, None), experts, lambda: None)
        y.backward(grad_TD)
        return [t.double() for t in (y, x.grad, experts.w13.grad, experts.w2.grad)]

    plain = run(AllToAllDispatcher(E, exchange))
    got = run(OverlappedDispatcher(E, exchange, chunks))
    for name, a, b in zip(("y", "dx", "dw13", "dw2"), got, plain, strict=True):
        # One chunk: the plain dispatcher's operations, bitwise. More: GEMMs over fewer rows may
        # round a row apart, and each chunk's dW is rounded to bf16 before the sum (C + 1 roundings).
        bound = 0.0 if chunks == 1 else (chunks + 1) * 2**-8 * b.abs().max().item()
        assert (a - b).abs().max().item() <= bound, name
