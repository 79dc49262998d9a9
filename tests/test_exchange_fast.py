"""`exchange`'s two message forms on real processes: below `wire.SPLIT_BYTES` of payload one
packed message (header and payload, copied out), from it on a header and a payload taken straight
into the receiver's tensor. The threshold is lowered in every worker so that small tensors take
the split path; both forms, mixed, must deliver the same bytes, and a sender and receiver that
disagree across the threshold get a `ProtocolError` naming the sender (not a gloo abort, not a
timeout). A blocking `exchange` sends a split message straight from the caller's tensor and returns
once it has left: the caller may change the tensor at once, and a receiver that never takes it
makes the exchange time out naming that rank."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from distsgd.comm.base import Comm
from distsgd.comm.torch import wire
from distsgd.errors import CommTimeout, ProtocolError, WorkerFailure
from distsgd.launch import launch

pytestmark = [pytest.mark.timeout(300), pytest.mark.processes]

SPLIT = 1024  # bytes: 256 float32 and up are split in these workers
SMALL, LARGE = 10, 1000  # float32 elements: packed, split


def _values(rank: int, round_: int, n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 10_000 * rank + 100 * round_


def healthy(comm: Comm) -> dict[str, Any]:
    """Ranks 0, 1, 2 each send every other rank a small and a large tensor per round, twice by
    `exchange` and once by `exchange_start`; rank 0 also takes a large message into a tensor
    that is not contiguous (a transposed view)."""
    wire.SPLIT_BYTES = SPLIT
    me, peers = comm.rank, [r for r in range(comm.world_size) if r != comm.rank]
    got: dict[str, Any] = {}
    for round_ in range(3):
        sends = [(_values(me, round_, n), p) for p in peers for n in (SMALL, LARGE)]
        outs = [(torch.empty(n), p) for p in peers for n in (SMALL, LARGE)]
        if round_ == 2:
            comm.exchange_start(sends, outs).wait(30.0)
        else:
            comm.exchange(sends, outs, timeout=30.0)
        for tensor, _ in sends:  # sent from, not copied: only allowed once the sends have left
            tensor.fill_(-1.0)
        got[f"round {round_}"] = all(torch.equal(out, _values(p, round_, out.numel()))
                                     for out, p in outs)
    # a non-contiguous receive: staged, then copied into place
    expected = torch.arange(LARGE, dtype=torch.float32).reshape(25, 40).t()
    if me == 1:
        comm.exchange([(expected, 0)], [])
    if me == 0:
        out = torch.empty(25, 40).t()
        comm.exchange([], [(out, 1)], timeout=30.0)
        got["transposed"] = torch.equal(out, expected)
    return got


def disagreeing(comm: Comm) -> Any:
    """Rank 2 sends rank 0 a packed message where rank 0 expects a split one, and rank 1 a split
    one where rank 1 expects a packed one. Then the parts left over are drained by raw gloo, so
    that no send or receive stays posted and every rank closes."""
    wire.SPLIT_BYTES = SPLIT
    if comm.rank == 2:  # (buffered sends: a blocking exchange would wait for rank 1 to take them)
        comm.exchange_start([(torch.zeros(SMALL), 0), (torch.zeros(LARGE), 1)], []).wait()
        dist.barrier()
        dist.send(torch.zeros(LARGE * 4, dtype=torch.uint8), 0, tag=wire.X_BODY_TAG)
        return None
    expect = LARGE if comm.rank == 0 else SMALL
    try:
        comm.exchange([], [(torch.empty(expect), 2)], timeout=30.0)
        error: tuple[str, str] | str = "no error"
    except ProtocolError as e:
        error = (type(e).__name__, str(e))
    try:
        comm.poll(torch.empty(1))
        refused = "not refused"
    except CommTimeout as e:
        refused = str(e)
    dist.barrier()  # (the communicator of ranks 0 and 1 refuses work)
    if comm.rank == 1:  # the split payload that rank 1's packed receive did not take
        dist.recv(torch.empty(LARGE * 4, dtype=torch.uint8), 2, tag=wire.X_BODY_TAG)
    return error, refused


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return launch(healthy, 3, timeout=240, comm_timeout=60)


@pytest.mark.parametrize("what", ["round 0", "round 1", "round 2"])
def test_packed_and_split_messages_deliver_the_same_bytes(results: list[dict[str, Any]],
                                                          what: str) -> None:
    assert [r[what] for r in results] == [True, True, True]


def test_a_split_message_into_a_non_contiguous_tensor(results: list[dict[str, Any]]) -> None:
    assert results[0]["transposed"] is True


def test_a_disagreement_across_the_threshold_is_a_protocol_error_naming_the_sender() -> None:
    outcomes = launch(disagreeing, 3, timeout=240, comm_timeout=60)
    for rank, (expected, sent) in ((0, (LARGE, SMALL)), (1, (SMALL, LARGE))):
        (kind, message), refused = outcomes[rank]
        assert kind == "ProtocolError"
        assert (f"rank {rank} received a torch.float32 tensor of shape ({sent},) from rank 2 "
                f"into a torch.float32 buffer of shape ({expected},)") in message, message
        assert "poll refused" in refused, refused


def unreceived(comm: Comm) -> None:
    """Rank 0 exchanges a split message to rank 1, which never posts its receive."""
    wire.SPLIT_BYTES = SPLIT
    if comm.rank == 0:
        comm.exchange([(torch.zeros(LARGE), 1)], [], timeout=4.0)
    comm.barrier()


def test_a_send_never_taken_times_out_naming_the_receiver() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"worker 0 failed: .*CommTimeout: rank 0: exchange "
                                            r"timed out after 4 s waiting for rank\(s\) \[1\]"):
        launch(unreceived, 2, timeout=120, comm_timeout=60)
    assert time.monotonic() - start < 60  # the exchange's timeout, not the communicator's
