"""Between 2 gloo ranks a small all-reduce runs as one all-gather and a local sum, with the ring's
result to the bit; elsewhere the ring runs.

* On 2 real gloo ranks, ``Communicator.all_reduce_mean`` of float32, float16 and bfloat16 payloads
  of 1 element up to ``PAIR_GATHER_MAX_BYTES`` is ``torch.equal`` to torch's own all-reduce of the same
  (divided) payload on every rank, and issues no ``dist.all_reduce`` at all; one byte over the cap it
  issues exactly one.
* The ledger counts the same bytes either way (2 ranks: an all-gather of S sends S, as the ring).
* On 3 ranks every all-reduce is the ring's.
* Its future (what the DDP hook returns for ``none``) carries the summed mean.
* The cost model counts one message for such an all-reduce and two for a larger one or on 3 ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from gradwire.compressors.communicator import Communicator
from gradwire.compressors.costmodel import collective_terms, reducer_terms
from gradwire.compressors.ledger import PAIR_GATHER_MAX_BYTES, pair_gathers
from tests.ranks import run_ranks


def _counting_all_reduce() -> list[int]:
    calls = [0]
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted
    return calls


def _payloads(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own values
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        itemsize = torch.empty((), dtype=dtype).element_size()
        for numel in (1, 777, PAIR_GATHER_MAX_BYTES // itemsize):
            out.append((torch.randn(numel, generator=gen) * 3).to(dtype))
    return out


def _compare(rank: int, world: int) -> dict[str, object]:
    comm = Communicator()
    calls = _counting_all_reduce()
    equal, ours = [], []
    for x in _payloads(rank):
        want = x.clone().div_(world)
        distributed_c10d.all_reduce(want)  # torch's ring, not through the counter
        got = comm.all_reduce_mean(x.clone()).wait()
        ours.append(got)
        equal.append(torch.equal(got, want))
    small_calls = calls[0]
    over = torch.ones(PAIR_GATHER_MAX_BYTES // 4 + 1)
    comm.all_reduce_mean(over).wait()
    future = comm.all_reduce_mean(torch.full((10,), float(rank + 1))).future().wait()
    return {
        "equal": equal,
        "small_calls": small_calls,
        "over_calls": calls[0] - small_calls,
        "over": over[:3],
        "future": future,
        "bytes_sent": comm.ledger.bytes_sent,
        "wire": comm.ledger.wire_bytes_sent,
        "ours": ours,
    }


@pytest.mark.multiprocess
def test_two_gloo_ranks_gather_small_payloads_with_the_rings_result() -> None:
    results = run_ranks(_compare, 2)
    for got in results:
        assert all(got["equal"]), got["equal"]
        assert got["small_calls"] == 0
        assert got["over_calls"] == 1
        assert torch.equal(got["over"], torch.ones(3))
        assert torch.equal(got["future"], torch.full((10,), 1.5))
        # the ring's bytes: 2(n-1)/n * S = S per all-reduce on 2 ranks
        assert got["wire"] == got["bytes_sent"]
    for a, b in zip(results[0]["ours"], results[1]["ours"]):
        assert torch.equal(a, b)


def _three(rank: int, world: int) -> int:
    comm = Communicator()
    calls = _counting_all_reduce()
    for x in _payloads(rank):
        comm.all_reduce_mean(x).wait()
    return calls[0]


@pytest.mark.multiprocess
def test_three_ranks_keep_the_ring() -> None:
    assert run_ranks(_three, 3) == [9, 9, 9]


def test_cost_model_counts_one_message_for_a_gathered_pair() -> None:
    assert pair_gathers(PAIR_GATHER_MAX_BYTES, 2) and not pair_gathers(PAIR_GATHER_MAX_BYTES + 1, 2)
    assert not pair_gathers(4096, 3)
    assert reducer_terms("all_reduce", 4096, 2) == (1, 4096.0)
    assert reducer_terms("all_reduce", 4096, 2) != collective_terms("all_reduce", 4096, 2)
    assert reducer_terms("all_reduce", PAIR_GATHER_MAX_BYTES + 4, 2) == (2, float(PAIR_GATHER_MAX_BYTES + 4))
    assert reducer_terms("all_reduce", 4096, 3) == collective_terms("all_reduce", 4096, 3)
