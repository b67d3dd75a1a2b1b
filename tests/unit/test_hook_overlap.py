"""``make_hook(..., overlap=True)``: buckets reduced by the hook's own thread while backward goes on.

On 2 real gloo ranks with several DDP buckets, PowerSGD with error feedback and Top-k with EF21
must give bit-for-bit the parameters and compressor state of the synchronous hook, and a NaN
with ``nonfinite="raise"`` must come out of ``backward()`` on every rank. Also: PowerSGD carries
the uncompressed tensors in its P all-reduce (one collective fewer per step than two separate ones).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook
from tests.ranks import run_ranks

pytestmark = pytest.mark.multiprocess


def _model() -> nn.Module:
    torch.manual_seed(0)
    # after its first step DDP rebuilds the buckets with the first one up to 1 MiB whatever the cap:
    # the 1 MiB layer fills a second one
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 5))


def _train(
    rank: int, world: int, name: str, params: dict, overlap: bool, poison_step: int | None, bucket_mb=0.01
) -> dict:
    # bucket_cap_mb small: several buckets in flight from the second step on (counted)
    model = DDP(_model(), bucket_cap_mb=bucket_mb)
    state, hook = make_hook(name, overlap=overlap, nonfinite="raise", **params)
    assert state.overlap == overlap
    buckets = []

    def counted(state, bucket):  # no annotations: DDP checks them, and this module's are strings
        buckets[-1] += 1
        return hook(state, bucket)

    model.register_comm_hook(state, counted)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    raised = None
    for step in range(6):
        x, y = torch.randn(16, 32, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        if step == poison_step and rank == 1:
            x[0, 0] = float("nan")
        opt.zero_grad(set_to_none=True)
        buckets.append(0)
        try:
            nn.functional.cross_entropy(model(x), y).backward()
        except Exception as err:  # what came out of backward is the point of the test
            raised = str(err)
            break
        opt.step()
    stats = state.stats()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": state.state_dict(),
        "collectives": stats["collectives"],
        "steps": stats["steps"],
        "raised": raised,
        "buckets": buckets,
    }


@pytest.mark.parametrize(
    ("name", "params"), [("powersgd", {"rank": 2}), ("topk", {"ratio": 0.1, "feedback": "ef21"})]
)
def test_overlap_gives_the_synchronous_result_bit_for_bit(name: str, params: dict) -> None:
    sync = run_ranks(_train, 2, name, params, False, None, timeout=180)
    overlapped = run_ranks(_train, 2, name, params, True, None, timeout=180)
    for a, b in zip(sync, overlapped):
        assert min(b["buckets"][1:]) >= 2, b["buckets"]  # several buckets a step once DDP rebuilt them
        assert a["raised"] is None and b["raised"] is None
        assert a["steps"] == b["steps"] == 6
        for pa, pb in zip(a["params"], b["params"]):
            assert torch.equal(pa, pb)
        assert a["state"]["feedback"].keys() == b["state"]["feedback"].keys()
    # the two ranks agree with each other too (a data-parallel model stays replicated)
    for pa, pb in zip(overlapped[0]["params"], overlapped[1]["params"]):
        assert torch.equal(pa, pb)


def test_overlap_raises_a_nan_out_of_backward_on_every_rank() -> None:
    results = run_ranks(_train, 2, "powersgd", {"rank": 2}, True, 3, timeout=180)
    for got in results:
        assert got["raised"] is not None and "NaN or Inf" in got["raised"]


def test_powersgd_fuses_the_uncompressed_tensors_into_its_p_round() -> None:
    # one bucket holding matrices and biases: P (with the biases riding along), then Q
    results = run_ranks(_train, 2, "powersgd", {"rank": 2, "start_iter": 0}, False, None, 1024.0, timeout=180)
    for got in results:
        assert got["raised"] is None and got["steps"] == 6
        assert got["collectives"] == 2 * 6  # three per step if the biases went in their own all-reduce
