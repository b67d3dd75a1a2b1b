"""Gradient-coded rounds on real gloo ranks (compressors/coding/coded_round.py, barrier.py).

* equivalence: 4 ranks train a small float64 MLP with an (n=4, s=1) fractional-repetition
  and a cyclic-repetition code under injected stragglers (one rank delayed on some steps,
  two ranks — more than the code tolerates — on a few); after 50 SGD steps every rank holds
  the parameters of uncoded full-gradient training in one process;
* tolerance: a rank delayed by 1 s does not hold up a coded round, while a plain all-reduce
  of the uncoded gradient waits for it;
* PowerSGD (error feedback included) on coded messages gives the trajectory of PowerSGD on
  the plain partition gradients: its aggregate depends only on the sum of the messages;
* misuse: barrier timeouts, double arrivals and refused compressors raise clear errors.

All multi-rank checks run in one ``run_ranks`` spawn.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from gradwire.compressors import make_reducer
from gradwire.compressors.coding import (
    GradientCode,
    NoStragglers,
    StragglerModel,
    UndecodableError,
    cyclic_repetition,
    fractional_repetition,
)
from gradwire.compressors.coding.barrier import StoreRoundBarrier
from gradwire.compressors.coding.coded_round import CodedRound, coded_gradient
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORLD = 4
STEPS = 50
LR = 0.5
SAMPLES = 96  # 24 per partition
FEATURES = 6
#: injected delay of a flagged straggler in the equivalence runs (cut short when abandoned)
DELAY_S = 0.2
#: the tolerance runs: rank TOL_RANK is late by TOL_DELAY_S on steps TOL_STEPS
TOL_RANK, TOL_DELAY_S, TOL_STEPS, TOL_ROUNDS = 3, 1.0, (1, 3), 5
#: steps of the equivalence runs where two ranks straggle (more than s = 1)
DOUBLE_STEPS = (10, 30)
#: steps of the PowerSGD comparison
POWERSGD_STEPS = 20


class Pattern(StragglerModel):
    """A fixed, deterministic pattern: one rank late on every third step, two on DOUBLE_STEPS."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def pattern(self, rounds: int, n: int) -> np.ndarray:
        return self.table[:rounds, :n].copy()

    def slowdown_for(self, round: int, worker: int) -> float:
        return 5.0 if round < len(self.table) and self.table[round, worker] else 1.0


def equivalence_pattern() -> np.ndarray:
    table = np.zeros((STEPS, WORLD), dtype=bool)
    for r in range(0, STEPS, 3):
        table[r, (r // 3) % WORLD] = True
    for r in DOUBLE_STEPS:
        table[r, [1, 2]] = True
    return table


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator, dtype=torch.float64)
    w = torch.randn(FEATURES, 1, generator=generator, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(SAMPLES, 1, generator=generator, dtype=torch.float64) > 0).double()
    return x, y


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out, y, reduction="sum")


def partitions() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data()
    size = SAMPLES // WORLD
    return [(x[j * size : (j + 1) * size], y[j * size : (j + 1) * size]) for j in range(WORLD)]


def reference_trajectory() -> torch.Tensor:
    """Uncoded full-batch gradient descent in one process: [STEPS + 1, params]."""
    x, y = make_data()
    model = make_model()
    out = [flat(model)]
    for _ in range(STEPS):
        grads = torch.autograd.grad(loss_fn(model(x), y) / SAMPLES, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p.sub_(LR * g)
        out.append(flat(model))
    return torch.stack(out)


def _train(rank: int, code: GradientCode, prefix: str) -> dict:
    model = make_model()
    batches = partitions()
    mine = {j: batches[j] for j in code.partitions(rank)}
    weights = code.encode_weights(rank)
    coded = CodedRound(
        code, prefix=prefix, stragglers=Pattern(equivalence_pattern()), delay_s=DELAY_S, timeout=60
    )
    trajectory, reports = [flat(model)], []

    def compute(cancel):
        return coded_gradient(model, loss_fn, mine, weights, cancel=cancel)

    for _ in range(STEPS):
        total, report = coded.step(compute, like=list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), total):
                p.sub_(LR * g / SAMPLES)
        trajectory.append(flat(model))
        reports.append(report)
    return {"trajectory": torch.stack(trajectory), "reports": reports, "stats": coded.stats()}


def _tolerance(rank: int) -> dict:
    """Round times of coded rounds (FR) and of a plain all-reduce, rank TOL_RANK late on TOL_STEPS."""
    code = fractional_repetition(WORLD, 1)
    model = make_model()
    batches = partitions()
    mine = {j: batches[j] for j in code.partitions(rank)}
    weights = code.encode_weights(rank)

    def coded_compute(cancel, step):
        grads = coded_gradient(model, loss_fn, mine, weights, cancel=cancel)
        if rank == TOL_RANK and step in TOL_STEPS:
            time.sleep(TOL_DELAY_S)  # ignores `cancel`: the dropped thread runs on, unread
        return grads

    coded = CodedRound(code, prefix="tolerance", timeout=60)
    coded_times, coded_reports = [], []
    for step in range(TOL_ROUNDS):
        dist.barrier()  # start every round together, so round times are comparable
        started = time.perf_counter()
        _, report = coded.step(
            lambda cancel, step=step: coded_compute(cancel, step), list(model.parameters())
        )
        coded_times.append(time.perf_counter() - started)
        coded_reports.append(report)

    reducer = make_reducer("none")
    plain_times = []
    for step in range(TOL_ROUNDS):
        dist.barrier()
        started = time.perf_counter()
        x, y = batches[rank]
        grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        if rank == TOL_RANK and step in TOL_STEPS:
            time.sleep(TOL_DELAY_S)
        reducer.reduce(list(grads))
        plain_times.append(time.perf_counter() - started)
    return {"coded": coded_times, "reports": coded_reports, "plain": plain_times}


def _powersgd(rank: int) -> dict:
    """PowerSGD (rank 1, error feedback) on coded messages vs on the plain partition gradients."""
    code = fractional_repetition(WORLD, 1)
    batches = partitions()
    params = {"rank": 1, "min_compression_rate": 0.0}
    out = {}
    for label in ("coded", "plain"):
        model = make_model()
        reducer = make_reducer("powersgd", **params)
        injected = Pattern(equivalence_pattern())
        coded = CodedRound(code, reducer, prefix="powersgd", stragglers=injected, delay_s=DELAY_S)
        mine = {j: batches[j] for j in code.partitions(rank)}
        trajectory = [flat(model)]
        for _ in range(POWERSGD_STEPS):
            if label == "coded":
                total, _ = coded.step(
                    lambda cancel, mine=mine, model=model: coded_gradient(
                        model, loss_fn, mine, code.encode_weights(rank), cancel=cancel
                    ),
                    list(model.parameters()),
                )
            else:
                x, y = batches[rank]
                grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
                total = [m * WORLD for m in reducer.reduce(list(grads))]
            with torch.no_grad():
                for p, g in zip(model.parameters(), total):
                    p.sub_(LR * g / SAMPLES)
            trajectory.append(flat(model))
        out[label] = torch.stack(trajectory)
    return out


def _misuse(rank: int, world: int) -> dict:
    """Barrier errors seen on real ranks."""
    barrier = StoreRoundBarrier.from_default_group(prefix="misuse")
    if rank < 2:
        barrier.arrive(0, rank)
    dist.barrier()
    errors = {}
    try:
        barrier.survivors(0, world, timeout=0.3)
    except TimeoutError as err:
        errors["timeout"] = str(err)
    dist.barrier()
    if rank == 0:
        for r in (0, 0, 1, 1):  # arrivals 3..6 of round 0: the fifth one overflows
            try:
                barrier.arrive(0, r)
            except RuntimeError as err:
                errors["twice"] = str(err)
                break
    dist.barrier()
    return errors


def _all(rank: int, world: int) -> dict:
    started = time.perf_counter()
    out = {
        "fr": _train(rank, fractional_repetition(WORLD, 1), "fr"),
        "cr": _train(rank, cyclic_repetition(WORLD, 1, seed=0), "cr"),
        "tolerance": _tolerance(rank),
        "powersgd": _powersgd(rank),
        "misuse": _misuse(rank, world),
    }
    out["seconds"] = time.perf_counter() - started
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    started = time.perf_counter()
    results = run_ranks(_all, WORLD, timeout=240)
    print(
        f"\ncoded-round spawn: {time.perf_counter() - started:.1f}s "
        f"(rank work {max(r['seconds'] for r in results):.1f}s)"
    )
    return results


@pytest.mark.parametrize("name", ["fr", "cr"])
def test_coded_training_equals_full_gradient_training(ranks: list[dict], name: str) -> None:
    reference = reference_trajectory()
    table = equivalence_pattern()
    for rank, result in enumerate(ranks):
        trajectory = result[name]["trajectory"]
        assert trajectory.shape == reference.shape
        scale = reference.norm(dim=1, keepdim=True)
        rel = ((trajectory - reference).norm(dim=1, keepdim=True) / scale).max().item()
        assert rel < 1e-5, f"{name} rank {rank}: relative trajectory difference {rel:.3g}"
        assert torch.equal(trajectory[-1], ranks[0][name]["trajectory"][-1]), "ranks disagree"
        assert (reference[-1] - reference[0]).norm() > 0.1  # the model did move
        stats = result[name]["stats"]
        assert stats["rounds"] == STEPS
        assert stats["over_tolerance_rounds"] == len(DOUBLE_STEPS)
    # every rank agreed on the survivors (n - s = 3 of them, distinct) in every round
    abandoned = 0
    for step in range(STEPS):
        reports = [result[name]["reports"][step] for result in ranks]
        survivors = reports[0].survivors
        assert len(survivors) == 3 and len(set(survivors)) == 3
        assert all(r.survivors == survivors and r.round == step for r in reports)
        assert all(r.coefficients == reports[0].coefficients for r in reports)
        assert all(r.abandoned == (r.rank not in survivors) for r in reports)
        assert all(r.load == 0.5 for r in reports)
        abandoned += sum(r.abandoned for r in reports)
        if step in DOUBLE_STEPS:
            assert all(r.over_tolerance for r in reports)
            # at most s flagged ranks can be dropped: one of the two was waited for
            assert set(np.flatnonzero(table[step]).tolist()) & set(survivors)
    assert abandoned == STEPS  # exactly one rank (s = 1) dropped per round
    waited = [r.waited_s for result in ranks for r in result[name]["reports"]]
    print(f"{name}: median round wait {np.median(waited) * 1e3:.1f} ms, max {max(waited) * 1e3:.0f} ms")


def test_straggler_does_not_delay_coded_round(ranks: list[dict]) -> None:
    for rank, result in enumerate(ranks):
        tol = result["tolerance"]
        for step in TOL_STEPS:
            assert tol["coded"][step] < 0.5, f"rank {rank}: coded round {step} took {tol['coded'][step]:.2f}s"
            assert tol["plain"][step] >= 0.9 * TOL_DELAY_S, (
                f"rank {rank}: plain all-reduce round {step} took only {tol['plain'][step]:.2f}s"
            )
            report = tol["reports"][step]
            assert TOL_RANK in report.stragglers
            assert report.abandoned == (rank == TOL_RANK)
    coded = max(r["tolerance"]["coded"][s] for r in ranks for s in TOL_STEPS)
    plain = min(r["tolerance"]["plain"][s] for r in ranks for s in TOL_STEPS)
    print(f"delayed steps: slowest coded round {coded * 1e3:.0f} ms, fastest plain {plain * 1e3:.0f} ms")


def test_powersgd_on_coded_messages_matches_powersgd_on_plain_gradients(ranks: list[dict]) -> None:
    """PowerSGD's aggregate (error feedback included) depends only on the sum of the messages."""
    for rank, result in enumerate(ranks):
        coded, plain = result["powersgd"]["coded"], result["powersgd"]["plain"]
        rel = ((coded - plain).norm(dim=1) / plain.norm(dim=1)).max().item()
        assert rel < 1e-6, f"rank {rank}: coded PowerSGD drifts from plain PowerSGD by {rel:.3g}"
        assert torch.equal(coded[-1], ranks[0]["powersgd"]["coded"][-1])
    moved = (plain[-1] - plain[0]).norm() / plain[0].norm()
    lowrank_gap = (plain[-1] - reference_trajectory()[POWERSGD_STEPS]).norm() / plain[0].norm()
    print(f"powersgd: coded vs plain {rel:.2g}; moved {moved:.3f}, gap to exact GD {lowrank_gap:.3g}")


def test_barrier_errors_on_real_ranks(ranks: list[dict]) -> None:
    for result in ranks:
        message = result["misuse"]["timeout"]
        assert "round 0" in message and "2 of 4 ranks arrived" in message and "needed 4" in message
    assert "arrival number 5 exceeds world_size=4" in ranks[0]["misuse"]["twice"]


# --- single-process checks ----------------------------------------------------------------------


def test_barrier_orders_arrivals_and_rejects_bad_input() -> None:
    barrier = StoreRoundBarrier(dist.HashStore(), 4, prefix="t")
    for rank in (2, 0, 3):
        barrier.arrive(7, rank)
    assert barrier.arrived(7) == 3
    assert barrier.survivors(7, 2, timeout=1.0) == [2, 0]
    assert barrier.survivors(7, 3, timeout=1.0) == [2, 0, 3]
    with pytest.raises(TimeoutError, match=r"round 7: 3 of 4 ranks arrived within 0.1s; needed 4"):
        barrier.survivors(7, 4, timeout=0.1)
    with pytest.raises(ValueError, match=r"need must be in 1\.\.world_size=4"):
        barrier.survivors(7, 5, timeout=1.0)
    with pytest.raises(ValueError, match="rank 4 out of range"):
        barrier.arrive(8, 4)
    with pytest.raises(ValueError, match="round must be >= 0"):
        barrier.arrive(-1, 0)
    with pytest.raises(ValueError, match="prefix"):
        StoreRoundBarrier(dist.HashStore(), 4, prefix="")
    barrier.release(7)
    assert barrier.arrived(7) == 0


def test_duplicate_arrival_is_reported() -> None:
    barrier = StoreRoundBarrier(dist.HashStore(), 2, prefix="dup")
    barrier.arrive(0, 1)
    barrier.arrive(0, 1)
    with pytest.raises(RuntimeError, match=r"a rank arrived twice \(\[1, 1\]\)"):
        barrier.survivors(0, 2, timeout=1.0)


@pytest.mark.parametrize("name", ["topk", "randk", "qsgd", "sign"])
def test_refuses_nonlinear_compressors(name: str) -> None:
    barrier = StoreRoundBarrier(dist.HashStore(), 4)
    pattern = rf"compressor '{name}' cannot be used in a coded round: .+Use one of"
    with pytest.raises(ValueError, match=pattern):
        CodedRound(fractional_repetition(4, 1), name, barrier, rank=0, world_size=4)


def test_accepts_linear_compressors_and_checks_shapes() -> None:
    barrier = StoreRoundBarrier(dist.HashStore(), 1)
    code = fractional_repetition(1, 0)
    for name in ("none", "fp16", "bf16", "powersgd"):
        CodedRound(code, name, barrier, rank=0, world_size=1)
    with pytest.raises(ValueError, match="n=4 workers but the world has 2 ranks"):
        CodedRound(fractional_repetition(4, 1), None, barrier, rank=0, world_size=2)
    # a world of one: the round returns the message itself (a = 1)
    coded = CodedRound(code, None, barrier, rank=0, world_size=1, stragglers=NoStragglers())
    total, report = coded.step(lambda: [torch.ones(3, dtype=torch.float64)], like=[torch.zeros(3)])
    assert report.survivors == [0] and report.coefficients == {0: 1.0} and not report.abandoned
    assert report.bytes_sent == 3 * 4  # three elements in the dtype of `like` (float32), plain all-reduce
    assert torch.equal(total[0], torch.ones(3))
    with pytest.raises(ValueError, match=r"returned shapes \[\(2,\)\], expected \[\(3,\)\]"):
        coded.step(lambda: [torch.ones(2)], like=[torch.zeros(3)])
    with pytest.raises(RuntimeError, match="computation of round 2 failed"):
        coded.step(lambda: 1 / 0, like=[torch.zeros(3)])


def test_survivor_sets_the_code_cannot_decode_are_refused() -> None:
    code = cyclic_repetition(4, 1, seed=0)
    with pytest.raises(UndecodableError, match="need at least n - s = 3"):
        code.decode([0, 1])
    with pytest.raises(ValueError, match="repeated"):
        code.decode([0, 0, 1])
