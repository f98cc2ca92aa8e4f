"""The test harness itself: a rank that dies after saving its result keeps the results; one that
dies before fails the call."""

import atexit
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import run_distributed


def abort_at_exit_worker():
    # What gloo's threads have been seen to do at interpreter exit, now and then.
    if dist.get_rank() == 0:
        atexit.register(os.abort)
    return dist.get_rank() * 10


def abort_before_saving_worker():
    if dist.get_rank() == 0:
        os.abort()
    return dist.get_rank()


def test_an_abort_after_the_result_is_saved_keeps_the_results():
    assert run_distributed(abort_at_exit_worker, 2, timeout=60) == [0, 10]


def test_an_abort_before_the_result_is_saved_fails():
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_distributed(abort_before_saving_worker, 2, timeout=60)
