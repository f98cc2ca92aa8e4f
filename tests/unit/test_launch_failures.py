"""The one line a failed torchrun job ends with (launch/failures.py): what each rank records in
torchrun's error file, read back through torch's own ProcessFailure, and which rank is named."""

import random
import signal

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from sparsetron.launch.failures import ERROR_FILE_VAR, LAUNCHER_VAR, report, summarize


class Ranks:
    """Error files of a job's ranks, written by `report` as each rank would."""

    def __init__(self, tmp_path, monkeypatch):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self.monkeypatch.setenv(LAUNCHER_VAR, "1")

    def file(self, rank: int):
        return self.tmp_path / f"error_{rank}.json"

    def fail(self, rank: int, message: str, when: float, **facts) -> None:
        self.monkeypatch.setenv(ERROR_FILE_VAR, str(self.file(rank)))
        self.monkeypatch.setattr("time.time", lambda: when)
        report(message, **facts)

    def failures(self, exitcodes: dict[int, int]) -> dict[int, ProcessFailure]:
        # What torchrun hands its launcher: one ProcessFailure per failed rank, read from its file.
        return {r: ProcessFailure(r, 1000 + r, code, str(self.file(r))) for r, code in exitcodes.items()}


@pytest.fixture
def ranks(tmp_path, monkeypatch):
    return Ranks(tmp_path, monkeypatch)


def test_a_rank_prints_its_error_unless_the_launcher_collects_it(tmp_path, monkeypatch, capsys):
    message = f"checkpoint /x{random.randint(0, 999)} does not exist"
    monkeypatch.delenv(ERROR_FILE_VAR, raising=False)
    report(message)
    assert capsys.readouterr().err == f"error: {message}\n"
    monkeypatch.setenv(ERROR_FILE_VAR, str(tmp_path / "error.json"))
    report(message)  # plain torchrun: printed and recorded
    assert capsys.readouterr().err == f"error: {message}\n"
    monkeypatch.setenv(LAUNCHER_VAR, "1")
    report(message)
    assert capsys.readouterr().err == ""
    failure = ProcessFailure(0, 1, 2, str(tmp_path / "error.json"))
    assert failure.message["message"] == message and failure.timestamp > 0  # torch reads it


def test_an_error_every_rank_hits_is_printed_once_as_it_is(ranks):
    world = random.randint(2, 8)
    # Some ranks were stopped by torchrun (SIGTERM) before they got as far.
    failed = random.sample(range(world), random.randint(1, world))
    for rank in failed:
        ranks.fail(rank, "unknown key moe.topk", when=100 + random.random(), every_rank=True)
    exitcodes = {r: 2 if r in failed else -signal.SIGTERM for r in range(world)}
    assert summarize(ranks.failures(exitcodes)) == ("error: unknown key moe.topk", 2)


@pytest.mark.parametrize("broken", [False, True], ids=["stopped", "stopped-and-broken"])
def test_one_failing_rank_is_named_and_the_ranks_it_took_down_are_not(ranks, broken):
    world = random.randint(3, 8)
    culprit = random.randrange(world)
    ranks.fail(culprit, "data file /d/part-3.bin does not exist", when=100.5)
    others = [r for r in range(world) if r != culprit]
    # Some saw a collective break (only a consequence, even if earlier); torchrun stopped the rest
    # (SIGTERM, without a message).
    peers = random.sample(others, random.randint(1, len(others) - 1)) if broken else []
    for rank in peers:
        ranks.fail(rank, f"rank {rank}, step 3: a collective failed: Connection closed by peer", 100.1, peer=True)
    exitcodes = {r: 2 if r == culprit else 1 if r in peers else -signal.SIGTERM for r in range(world)}
    line, status = summarize(ranks.failures(exitcodes))
    assert (line, status) == (f"error: rank {culprit}: data file /d/part-3.bin does not exist", 2)


def test_a_rank_killed_without_a_word_is_named_by_the_peer_that_noticed(ranks):
    # The OOM killer's SIGKILL leaves no error file; rank 0's collective failure blames rank 1.
    blame = "rank 0 (step 7): collective gloo:allreduce #40 of process group 0 (ranks 0, 1): rank(s) 1 did not reach it"
    ranks.fail(0, blame, when=100.2, peer=True)
    line, status = summarize(ranks.failures({0: 1, 1: -signal.SIGKILL}))
    assert line == f"error: {blame}; rank 1 (pid 1001) was killed by SIGKILL"
    assert status == 1


def test_of_two_own_errors_the_earlier_is_printed(ranks):
    first, second = random.sample(range(4), 2)
    ranks.fail(second, "out of memory on cuda:1 in step 3", when=100.75)
    ranks.fail(first, "out of memory on cuda:0 in step 3", when=100.25)  # same second, earlier
    line, _ = summarize(ranks.failures({first: 1, second: 1}))
    assert line == f"error: rank {first}: out of memory on cuda:0 in step 3"
