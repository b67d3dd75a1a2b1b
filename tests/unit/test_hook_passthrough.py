"""Compressor ``none`` without feedback: the hook hands DDP the all-reduce's own future.

Checked on 2 real gloo ranks: the ledger counts exactly what DDP sends, the mean is exact, and a
NaN on one rank is seen by both (counted with ``nonfinite="propagate"``, raised out of backward on
every rank with ``"raise"``).
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
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _steps(rank: int, world: int, mode: str, poison: bool) -> dict:
    model = DDP(_model())
    state, hook = make_hook("none", nonfinite=mode)
    assert state.reducer.passthrough
    model.register_comm_hook(state, hook)
    x = torch.full((4, 8), float(rank + 1))
    y = torch.tensor([0, 1, 2, 0])
    out: dict = {"raised": None}
    # step 1: finite everywhere; the mean of the two ranks' gradients
    nn.functional.cross_entropy(model(x), y).backward()
    out["grad"] = model.module[0].weight.grad.clone()
    local = _model()
    nn.functional.cross_entropy(local(x), y).backward()
    out["local_grad"] = local[0].weight.grad.clone()
    # step 2: rank 1's input is NaN when poisoned
    model.zero_grad(set_to_none=True)
    x2 = x.clone()
    if poison and rank == 1:
        x2[0, 0] = float("nan")
    try:
        nn.functional.cross_entropy(model(x2), y).backward()
    except Exception as err:  # the test inspects what came out of backward
        out["raised"] = f"{type(err).__name__}: {err}"
    out["stats"] = state.stats()
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def test_mean_and_ledger_match_ddp():
    results = run_ranks(_steps, 2, "propagate", False, timeout=120)
    expected = (results[0]["local_grad"] + results[1]["local_grad"]) / 2
    for got in results:
        torch.testing.assert_close(got["grad"], expected)
        stats = got["stats"]
        assert stats["bytes_sent"] == stats["bytes_uncompressed"] == 2 * 4 * got["params"]
        assert stats["steps"] == 2 and stats["nonfinite_steps"] == 0 and got["raised"] is None


def test_nan_on_one_rank_is_counted_on_both():
    for got in run_ranks(_steps, 2, "propagate", True, timeout=120):
        assert got["stats"]["nonfinite_steps"] == 1 and got["raised"] is None


def test_nan_on_one_rank_raises_on_both():
    for got in run_ranks(_steps, 2, "raise", True, timeout=120):
        assert got["raised"] is not None and "NaN or Inf" in got["raised"], got["raised"]


@pytest.mark.parametrize(
    "values,dtype,finite",
    [([1.0, -2.0, 3.0], torch.float32, True),
     ([3e38, 3e38, 3e38], torch.float32, True),  # the float32 sum overflows; the values are finite
     ([60000.0, 60000.0], torch.float16, True),
     ([1.0, float("inf")], torch.float32, False),
     ([float("inf"), float("-inf")], torch.float32, False),
     ([3e38, 3e38, float("nan")], torch.float32, False),
     ([1.0, float("nan")], torch.float16, False)],
)  # fmt: skip
def test_the_passthrough_check_tells_non_finite_from_an_overflowing_sum(values, dtype, finite):
    from gradwire.compressors.reducer import all_finite

    assert all_finite(torch.tensor(values, dtype=dtype)) is finite
    # several tensors in one check (the mean gradients of a step): each value its own tensor
    assert all_finite([torch.tensor([v], dtype=dtype) for v in values]) is finite
    assert all_finite([torch.ones(3), torch.tensor(values, dtype=dtype)]) is finite
