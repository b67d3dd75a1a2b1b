"""OneBitAdam on two real gloo ranks under DDP: the ranks stay bit-identical through the warm-up, the
freeze and the compressed stage, the loss falls, every byte is in the ledger, and ranks that disagree
on the schedule, or a DDP model without the optimizer's hook, are refused on every rank."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors.onebit_adam import OneBitAdam
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WARMUP, STEPS = 4, 40


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))


def _data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A teacher's labels on each rank's own inputs (the same teacher everywhere)."""
    teacher = torch.Generator().manual_seed(123)
    w = torch.randn(16, 4, generator=teacher)
    gen = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(STEPS):
        x = torch.randn(32, 16, generator=gen)
        out.append((x, (x @ w).argmax(1)))
    return out


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def _train(rank: int, **options) -> dict:
    model = DDP(_model())
    opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=WARMUP, **options)
    model.register_comm_hook(*opt.comm_hook())
    losses, digests = [], []
    for x, y in _data(rank):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        digests.append(_digest(model.module))
    shapes = [tuple(p.shape) for p in model.module.parameters()]
    return {"losses": losses, "digests": digests, "stats": opt.stats(), "shapes": shapes}


def _refused(fn) -> str:
    try:
        fn()
    except Exception as err:  # DDP may re-raise a hook's error wrapped; the message carries ours
        return f"{type(err).__name__}: {err}"
    return "not refused"


def _disagree(rank: int, **options) -> str:
    model = DDP(_model())
    if not options:
        options = {"freeze_step": WARMUP + rank}  # rank 1 freezes later
    opt = OneBitAdam(model.parameters(), lr=1e-2, **{"freeze_step": WARMUP, **options})
    model.register_comm_hook(*opt.comm_hook())
    x, y = _data(rank)[0]
    return _refused(lambda: nn.functional.cross_entropy(model(x), y).backward())


def _no_hook(rank: int) -> str:
    model = DDP(_model())
    opt = OneBitAdam(model.parameters(), lr=1e-2, freeze_step=WARMUP)
    x, y = _data(rank)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    return _refused(opt.step)


def _all_cases(rank: int, world: int) -> dict:
    return {
        "train": _train(rank),
        "local": _train(rank, variance="local", space="update"),
        # the recommended form: a bfloat16 warm-up, then 2-bit steps
        "local2": _train(
            rank, variance="local", space="update", compressor_params={"bits": 2}, warmup_dtype="bfloat16"
        ),
        "no_hook": _no_hook(rank),
        "disagree": _disagree(rank),
        "disagree_dtype": _disagree(rank, warmup_dtype=("float32", "bfloat16")[rank]),
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_all_cases, 2, timeout=240)


@pytest.mark.parametrize("run", ["train", "local", "local2"])  # frozen v and shared m; per-rank m and v
def test_ranks_stay_bit_identical_and_the_loss_falls(ranks: list[dict], run: str) -> None:
    first, second = ranks[0][run], ranks[1][run]
    assert first["digests"] == second["digests"]  # after every step, warm-up and compressed alike
    assert len(set(first["digests"])) == STEPS  # and the parameters did move every step
    for result in ranks:
        losses = result[run]["losses"]
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.parametrize(
    ("run", "bits", "warmup_bytes"), [("train", 1, 4), ("local", 1, 4), ("local2", 2, 2)]
)
def test_ledger_holds_every_byte(ranks: list[dict], run: str, bits: int, warmup_bytes: int) -> None:
    train = ranks[0][run]
    numel = [math.prod(s) for s in train["shapes"]]
    plain = 4 * sum(numel)
    # compressed stage: sign bits and a 4-byte scale per tensor, all-gathered (1-D ones as rows); with
    # 2 bits a second bit and a second scale
    momentum = sum(bits * (math.ceil(n / 8) + 4) for n in numel)
    probes = 2 * 96  # the schedule check at step 0 and at the freeze: 12 float64 each
    stats = train["stats"]
    warmup = WARMUP * warmup_bytes * sum(numel)
    assert stats["bytes_sent"] == warmup + probes + (STEPS - WARMUP) * momentum
    assert stats["bytes_uncompressed"] == STEPS * plain
    assert stats["dense_steps"] == WARMUP
    assert 10 * momentum < plain  # a compressed step sends under a tenth of a plain one


def test_ranks_that_disagree_on_the_freeze_are_refused_on_every_rank(ranks: list[dict]) -> None:
    for result in ranks:
        assert "ranks disagree on OneBitAdam's schedule (freeze_step 4.0..5.0)" in result["disagree"]


def test_a_bfloat16_warm_up_rounds_what_the_ranks_average(ranks: list[dict]) -> None:
    # the same data and weights: only the warm-up's wire dtype differs, and the first step shows it
    assert ranks[0]["local2"]["digests"][0] != ranks[0]["local"]["digests"][0]


def test_ranks_that_disagree_on_the_warmup_dtype_are_refused_on_every_rank(ranks: list[dict]) -> None:
    for result in ranks:
        assert "ranks disagree on OneBitAdam's schedule (warmup_dtype 0.0..1.0)" in result["disagree_dtype"]


def test_ddp_without_the_hook_is_refused(ranks: list[dict]) -> None:
    for result in ranks:
        assert result["no_hook"].startswith("MissingHookError")
        assert "register_comm_hook(*optimizer.comm_hook())" in result["no_hook"]
