"""OneBitAdam in one process (a group of one): the warm-up is torch's Adam bit for bit, the freeze
holds v, the momentum travels through the compressor with error feedback, the ledger is exact, the
state round-trips, and misuse is refused naming the cause. Multi-rank behaviour is in
tests/integration/test_adam_onebit.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradwire.compressors.onebit_adam import OneBitAdam, doubling_refreshes


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen), torch.randint(3, (16,), generator=gen)) for _ in range(n)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_warm_up_is_torch_adam_bit_for_bit() -> None:
    ours, theirs = _model(), _model()
    batches = _batches(6)
    _train(ours, OneBitAdam(ours.parameters(), lr=3e-3, freeze_step=6), batches)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=3e-3, foreach=False), batches)
    for a, b in zip(_params(ours), _params(theirs)):
        assert torch.equal(a, b)


def test_after_the_freeze_v_holds_and_matrix_momentum_is_a_scaled_sign() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=3)
    _train(model, opt, _batches(3))
    frozen = [opt.state[p]["v"].clone() for p in model.parameters()]
    _train(model, opt, _batches(4, seed=2))
    for p, v in zip(model.parameters(), frozen):
        assert torch.equal(opt.state[p]["v"], v)
        if p.dim() == 2:  # sign compressor: every element of the mean momentum is ±scale
            assert opt.state[p]["m"].abs().unique().numel() == 1
    assert opt.stats()["dense_steps"] == 3 and opt.stats()["steps"] == 7


def test_periodic_refresh_schedule() -> None:
    opt = OneBitAdam(_model().parameters(), freeze_step=3, variance="periodic", refresh_every=4)
    assert [t for t in range(16) if opt.dense(t)] == [0, 1, 2, 7, 11, 15]


def test_update_space_compresses_the_preconditioned_momentum() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=3, space="update")
    _train(model, opt, _batches(5))
    for p in model.parameters():
        if p.dim() == 2:  # the sign's single magnitude is in units of the update m / (√v̂ + ε)
            update = opt.state[p]["m"] / opt.denominator(p, opt.param_groups[0])
            assert torch.allclose(update.abs(), update.abs().mean().expand_as(update), rtol=1e-5)
            assert opt.state[p]["m"].abs().unique().numel() > 1


def test_update_space_residual_follows_a_variance_refresh() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2, variance="doubling", space="update")
    _train(model, opt, _batches(4))  # steps 0, 1 dense; 2, 3 compressed
    weight, group = next(model.parameters()), opt.param_groups[0]
    old_denom, old_residual = opt.denominator(weight, group), opt.reducer.feedback.state[0]["e"].clone()
    _train(model, opt, _batches(1, seed=4))  # step 4 refreshes v: the residual keeps its meaning
    expected = old_residual * old_denom / opt.denominator(weight, group)
    assert torch.allclose(opt.reducer.feedback.state[0]["e"], expected, rtol=1e-6)


def test_local_moments_step_by_the_decoded_adam_step() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2, variance="local", space="update")
    _train(model, opt, _batches(3))  # steps 0, 1 plain Adam; step 2 the first compressed one
    weight = next(model.parameters())
    before, residual_before = weight.detach().clone(), opt.reducer.feedback.state[0]["e"].clone()
    _train(model, opt, _batches(1, seed=6))  # t = 4: v keeps moving from this rank's own gradient
    assert opt.variance_steps == 4 and opt.dense_steps == 2
    step = opt.state[weight]["m"] / opt.denominator(weight, opt.param_groups[0])
    decoded = (before - weight.detach()) / (3e-3 / (1 - 0.9**4))
    # what moved the weight is the sign of this rank's Adam step plus its residual: one magnitude
    assert torch.allclose(decoded.abs(), decoded.abs().mean().expand_as(decoded), rtol=1e-4)
    # and what the sign dropped is kept for the next step (error feedback in units of the step)
    assert torch.allclose(opt.reducer.feedback.state[0]["e"], step + residual_before - decoded, atol=1e-5)


def test_error_feedback_keeps_what_the_sign_dropped() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2)
    _train(model, opt, _batches(2))
    before = {p: opt.state[p]["m"].clone() for p in model.parameters()}
    batch = _batches(1, seed=5)
    _train(model, opt, batch)
    weight = next(model.parameters())
    local = torch.lerp(before[weight], weight.grad, 0.1)  # β1 = 0.9
    residual = opt.reducer.feedback.state[0]["e"]  # key 0: the first parameter
    assert torch.allclose(local - opt.state[weight]["m"], residual, atol=1e-7)
    assert residual.abs().max() > 0


def test_doubling_refreshes_update_v_at_2w_4w() -> None:
    assert doubling_refreshes(5, 45) == [10, 20, 40]
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2, variance="doubling")
    dense = [opt.dense(t) for t in range(10)]
    assert dense == [True, True, False, False, True, False, False, False, True, False]
    _train(model, opt, _batches(4))
    weight = next(model.parameters())
    v = opt.state[weight]["v"].clone()
    _train(model, opt, _batches(1, seed=3))  # step 4: a full-precision step updates v
    assert not torch.equal(opt.state[weight]["v"], v)
    assert opt.variance_steps == 3 and opt.dense_steps == 3


def test_ledger_counts_exactly_the_compressed_momentum() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2)
    _train(model, opt, _batches(5))
    sizes = [p.numel() for p in model.parameters()]
    # per compressed step: ⌈d/8⌉ sign bytes + a 4-byte scale per tensor (1-D ones travel as rows);
    # the warm-up of a group of one sends nothing (no hook, no peers)
    per_step = sum(math.ceil(d / 8) + 4 for d in sizes)
    stats = opt.stats()
    assert stats["bytes_sent"] == 3 * per_step
    assert stats["bytes_uncompressed"] == 3 * 4 * sum(sizes)


def test_state_round_trip_continues_bit_for_bit() -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2)
    _train(model, opt, _batches(4))
    saved_params, saved_state = _params(model), copy.deepcopy(opt.state_dict())  # as torch.save
    later = _batches(3, seed=9)
    _train(model, opt, later)
    twin = _model(seed=7)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), saved_params):
            p.copy_(q)
    opt2 = OneBitAdam(twin.parameters(), lr=3e-3, freeze_step=2)
    opt2.load_state_dict(saved_state)
    _train(twin, opt2, later)
    for a, b in zip(_params(model), _params(twin)):
        assert torch.equal(a, b)
    assert opt2.stats()["bytes_sent"] == opt.stats()["bytes_sent"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 1}, "saved by rank 1 of 1"),
        ({"world_size": 4}, "rank 0 of 4"),
        ({"freeze_step": 9}, "freeze_step=9"),
        ({"space": "update"}, "space='update'"),
        ({"version": 99}, "version 99"),
    ],
)
def test_load_refuses_another_ranks_or_runs_state(change: dict, message: str) -> None:
    model = _model()
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2)
    _train(model, opt, _batches(3))
    state = opt.state_dict()
    state["onebit"] = {**state["onebit"], **change}
    with pytest.raises(ValueError, match=message):
        OneBitAdam(_model().parameters(), lr=3e-3, freeze_step=2).load_state_dict(state)


def test_load_refuses_a_plain_adam_state() -> None:
    model = _model()
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="no 'onebit' entry"):
        OneBitAdam(model.parameters(), freeze_step=2).load_state_dict(adam.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"freeze_step": 0}, "freeze_step=0"),
        ({"freeze_step": True}, "freeze_step=True"),
        ({"freeze_step": 2.5}, "freeze_step=2.5"),
        ({"freeze_step": 2, "lr": -1.0}, "lr=-1.0"),
        ({"freeze_step": 2, "lr": float("nan")}, "lr=nan"),
        ({"freeze_step": 2, "betas": (1.0, 0.999)}, r"betas\[0\]=1.0"),
        ({"freeze_step": 2, "eps": 0.0}, "eps=0.0"),
        ({"freeze_step": 2, "weight_decay": -0.1}, "weight_decay=-0.1"),
        ({"freeze_step": 2, "variance": "adaptive"}, "variance='adaptive'"),
        ({"freeze_step": 2, "space": "gradient"}, "space='gradient'"),
        ({"freeze_step": 2, "variance": "local"}, "variance='local' needs space='update'"),
        ({"freeze_step": 2, "variance": "periodic"}, "refresh_every=None goes with variance='periodic'"),
        ({"freeze_step": 2, "refresh_every": 5}, "refresh_every=5 goes with"),
        ({"freeze_step": 2, "variance": "periodic", "refresh_every": 1}, "refresh_every=1 must be"),
        ({"freeze_step": 2, "compressor": "nope"}, "compressor='nope'"),
        ({"freeze_step": 2, "compressor_params": {"feedback": "ef21"}}, "feedback='ef21'"),
        ({"freeze_step": 2, "warmup_dtype": "float16"}, "warmup_dtype='float16'"),
        ({"freeze_step": 2, "compressor_params": {"start_iter": 5}}, "start_iter is set by OneBitAdam"),
        ({"freeze_step": 2, "compressor": "powersgd", "compressor_params": {"rank": 0}}, "rank"),
    ],
)
def test_construction_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OneBitAdam(_model().parameters(), **kwargs)


def test_local_steps_may_be_estimated_with_ef21() -> None:
    model = _model()
    params = {"feedback": "ef21", "bits": 2}
    opt = OneBitAdam(model.parameters(), lr=3e-3, freeze_step=2, variance="local", space="update",
                     compressor_params=params)  # fmt: skip
    assert opt.reducer.feedback.name == "ef21"
    losses = _train(model, opt, _batches(12))
    assert math.isfinite(losses[-1]) and opt.dense_steps == 2


def test_a_parameter_without_gradient_is_refused_by_name() -> None:
    model = _model()
    extra = nn.Parameter(torch.zeros(4, 4))
    opt = OneBitAdam([*model.parameters(), extra], freeze_step=2)
    with pytest.raises(ValueError, match=r"parameter 4 \(shape \(4, 4\)\) has no gradient"):
        _train(model, opt, _batches(1))


def test_powersgd_momentum_and_weight_decay_train() -> None:
    model = _model()
    opt = OneBitAdam(
        model.parameters(), lr=1e-2, weight_decay=0.01, freeze_step=3, compressor="powersgd",
        compressor_params={"rank": 2},
    )  # fmt: skip
    batch = _batches(1)
    losses = _train(model, opt, batch * 40)
    assert losses[-1] < 0.5 * losses[0]
    assert opt.stats()["bytes_sent"] < opt.stats()["bytes_uncompressed"]
