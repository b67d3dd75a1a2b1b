"""Sequential gradient codes (Krishnan, Ebrahimi, Khisti, ICLR 2023; docs/algorithms.md §6).

The guarantee under test: for every (B, W, λ)-admissible straggler pattern, job t is
decodable by the end of round t + T, and the decode really gives the job's gradient.
Patterns: every admissible pattern over a short horizon (enumerated), plus seeded
Bursty patterns over a long one.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from gradwire.compressors.coding import (
    Bernoulli,
    Bursty,
    SequentialScheme,
    UndecodableError,
    cyclic_repetition,
    extends_admissibly,
    is_admissible,
    m_sgc,
    m_sgc_load,
    simulate,
    sr_sgc,
)
from gradwire.compressors.coding.multiplexed import MultiplexedScheduler
from gradwire.compressors.coding.selective_repeat import SelectiveRepeatScheduler
from gradwire.compressors.coding.tasks import GROUP, UNCODED, Task

# (scheme, n, B, W, λ, rounds of the exhaustive enumeration)
CASES = [
    ("sr", 4, 1, 2, 2, 4),
    ("sr", 4, 2, 3, 2, 5),
    ("sr", 5, 1, 2, 3, 3),
    ("sr", 4, 1, 2, 4, 4),
    ("sr", 6, 1, 3, 3, 3),
    ("m", 4, 1, 2, 2, 4),
    ("m", 4, 1, 3, 2, 5),
    ("m", 4, 2, 3, 2, 5),
    ("m", 4, 1, 2, 4, 3),
    ("m", 3, 2, 4, 2, 6),
    ("m", 3, 1, 4, 3, 6),
]
CHECKED = 1100  # patterns per case: the enumerated ones, topped up with seeded Bursty ones


def build(kind: str, n: int, B: int, W: int, lam: int) -> SequentialScheme:
    return sr_sgc(n, B, W, lam) if kind == "sr" else m_sgc(n, B, W, lam)


def all_admissible(n: int, rounds: int, B: int, W: int, lam: int) -> list[np.ndarray]:
    """Every (B, W, λ)-admissible [rounds, n] pattern (depth-first over rounds)."""
    subsets = [set(c) for k in range(lam + 1) for c in itertools.combinations(range(n), k)]
    found: list[np.ndarray] = []

    def extend(history: list[set[int]]) -> None:
        if len(history) == rounds:
            pattern = np.zeros((rounds, n), dtype=bool)
            for r, late in enumerate(history):
                pattern[r, sorted(late)] = True
            found.append(pattern)
            return
        for late in subsets:
            if extends_admissibly(history, late, B, W, lam):
                extend([*history, late])

    extend([])
    return found


def sampled_admissible(n: int, B: int, W: int, lam: int, rounds: int, count: int) -> list[np.ndarray]:
    knobs = [(0.2, 0.9), (0.5, 0.9), (0.8, 0.6)]
    return [
        Bursty(B, W, lam, seed=i, start_prob=knobs[i % 3][0], stay_prob=knobs[i % 3][1]).pattern(rounds, n)
        for i in range(count)
    ]


def adaptive_moves(scheme: SequentialScheme, pattern: np.ndarray) -> int:
    """How often the adaptive rule fired: SR repeats an old job, M-SGC redoes D1 in a D2 slot."""
    scheduler = scheme.scheduler(pattern.shape[0] - scheme.delay)
    moves = 0
    for r in range(pattern.shape[0]):
        for tasks in scheduler.assign(r):
            for task in tasks:
                slot = r - task.job
                moves += task.kind == "gc" and slot > 0
                moves += task.kind == UNCODED and slot >= scheme.W - 1
        scheduler.report(r, set(np.flatnonzero(pattern[r]).tolist()))
    return moves


def steady_loads(scheme: SequentialScheme, result) -> list[Fraction]:
    """Loads of rounds in which every slot's job exists (rounds T … num_jobs − 1)."""
    jobs = len(result.decoded_round)
    return [load for r in range(scheme.delay, jobs) for load in result.loads[r]]


@pytest.mark.parametrize(("kind", "n", "B", "W", "lam", "rounds"), CASES)
def test_every_admissible_pattern_meets_the_deadline(kind, n, B, W, lam, rounds) -> None:
    scheme = build(kind, n, B, W, lam)
    exhaustive = all_admissible(n, rounds, B, W, lam)
    count = max(200, CHECKED - len(exhaustive))
    long = sampled_admissible(n, B, W, lam, rounds=2 * (scheme.delay + W) + 8, count=count)
    patterns = exhaustive + long
    assert len(patterns) > 1000
    with_stragglers = moved = 0
    for pattern in patterns:
        result = simulate(scheme, pattern)
        assert result.admissible and not result.violating_rounds
        assert result.late_jobs == [], (pattern.astype(int).tolist(), result.decoded_round)
        with_stragglers += bool(pattern.any())
        for load in steady_loads(scheme, result):
            if lam < n or kind == "sr":
                assert load == scheme.load  # exactly the paper's formula, as a fraction
            else:
                assert (W - 1) * scheme.minitask_size <= load <= scheme.load  # λ = n: idle slots
    for pattern in long[:40]:
        moved += adaptive_moves(scheme, pattern)
    assert with_stragglers > 0.9 * len(patterns)
    assert moved > 0  # the adaptive rule was exercised, not just plain coding


def without_adaptation(scheme: SequentialScheme) -> SequentialScheme:
    """The same scheme with its adaptive rule switched off (SR: no repeats; M-SGC: no D1 redo)."""

    class NoRepeat(SelectiveRepeatScheduler):
        def _repeaters(self, old: int) -> set[int]:
            return set()

    class NoRedo(MultiplexedScheduler):
        def _slot_task(self, job: int, worker: int, m: int) -> Task | None:
            if m >= scheme.W - 1 and self._d2_tasks is not None:
                template = self._d2_tasks[worker][m - (scheme.W - 1)]
                return Task(job, GROUP, template.index, template.weights, template.load)
            return super()._slot_task(job, worker, m)

    cls = NoRepeat if scheme.name == "sr-sgc" else NoRedo
    scheme.scheduler = lambda num_jobs=None: cls(scheme, num_jobs)  # type: ignore[method-assign]
    return scheme


@pytest.mark.parametrize(("kind", "n", "B", "W", "lam", "rounds"), [CASES[0], CASES[1], CASES[5], CASES[6]])
def test_the_adaptive_rule_is_needed(kind, n, B, W, lam, rounds) -> None:
    """The enumerated patterns are hard enough: without its adaptive rule each scheme misses deadlines."""
    crippled = without_adaptation(build(kind, n, B, W, lam))
    late = sum(bool(simulate(crippled, p).late_jobs) for p in all_admissible(n, rounds, B, W, lam))
    assert late > 0


def run_with_gradients(scheme: SequentialScheme, pattern: np.ndarray, seed: int) -> int:
    """Compute every message from random partition gradients; check each decoded job's gradient."""
    generator = torch.Generator().manual_seed(seed)
    partitions = len(scheme.partition_sizes)
    grads: dict[int, torch.Tensor] = {}

    def gradient(job: int) -> torch.Tensor:
        if job not in grads:
            grads[job] = torch.randn(partitions, 6, dtype=torch.float64, generator=generator)
        return grads[job]

    rounds = pattern.shape[0]
    scheduler = scheme.scheduler(rounds - scheme.delay)
    messages: dict[tuple[int, int, Task], torch.Tensor] = {}
    for r in range(rounds):
        for worker, tasks in enumerate(scheduler.assign(r)):
            for task in tasks:
                assert task.load == sum(scheme.partition_sizes[p] for p in task.partitions)
                messages[(r, worker, task)] = sum(w * gradient(task.job)[p] for p, w in task.weights)
        scheduler.report(r, set(np.flatnonzero(pattern[r]).tolist()))
    for job in scheduler.completed_jobs():
        total = torch.zeros(6, dtype=torch.float64)
        for c in scheduler.combination(job):
            assert c.task.job == job and c.worker not in scheduler.stragglers(c.round)
            total += c.coefficient * messages[(c.round, c.worker, c.task)]
        want = gradient(job).sum(dim=0)
        assert float((total - want).norm() / want.norm()) < 1e-10
    return len(scheduler.completed_jobs())


@pytest.mark.parametrize(("kind", "n", "B", "W", "lam", "rounds"), CASES)
def test_decoded_combination_is_the_jobs_gradient(kind, n, B, W, lam, rounds) -> None:
    scheme = build(kind, n, B, W, lam)
    assert sum(scheme.partition_sizes) == 1
    decoded = 0
    patterns = sampled_admissible(n, B, W, lam, rounds=3 * (scheme.delay + W) + 6, count=25)
    for i, pattern in enumerate(patterns):
        decoded += run_with_gradients(scheme, pattern, seed=i)
    assert decoded > 25 * 5


@pytest.mark.parametrize(
    ("scheme", "delay", "load"),
    [
        (lambda: sr_sgc(4, 1, 2, 2), 1, Fraction(1, 2)),  # s = ⌈2/2⌉ = 1
        (lambda: sr_sgc(8, 2, 5, 6), 2, Fraction(3, 8)),  # s = ⌈12/6⌉ = 2
        (lambda: sr_sgc(6, 1, 3, 3), 1, Fraction(1, 3)),  # s = ⌈3/3⌉ = 1
        (lambda: m_sgc(4, 1, 2, 2), 1, Fraction(3, 8)),  # 3·2 / (4·(1 + 1·3))
        (lambda: m_sgc(4, 1, 3, 2), 2, Fraction(9, 28)),  # 3·3 / (4·(1 + 2·3))
        (lambda: m_sgc(6, 2, 3, 2), 3, Fraction(1, 4)),  # 3·4 / (6·(2 + 2·3)) = 12/48
        (lambda: m_sgc(4, 1, 2, 4), 1, Fraction(1, 2)),  # λ = n: (1 + 1) / (4·1)
    ],
)
def test_delay_and_load_match_hand_computed_fractions(scheme, delay: int, load: Fraction) -> None:
    built = scheme()
    assert built.delay == delay and built.load == load


def test_m_sgc_load_is_far_below_gradient_coding() -> None:
    # the paper's 256-worker setting (docs/algorithms.md §6.4): (B, W, λ) = (1, 2, 27) vs GC with s = λ
    assert m_sgc_load(256, 1, 2, 27) == Fraction(28 * 2, 256 * 29)
    assert round(float(m_sgc_load(256, 1, 2, 27)), 5) == 0.00754
    assert m_sgc_load(256, 1, 2, 27) <= Fraction(85, 100) * Fraction(27 + 1, 256)
    # ratio to GC is (W−1+B)/(B + (W−1)(λ+1)) (§6.3)
    assert m_sgc_load(256, 1, 2, 27) / Fraction(28, 256) == Fraction(2, 29)
    # and a small one, simulated: every steady round costs exactly 3/14 < 0.85 · GC's 3/6
    scheme = m_sgc(6, 1, 3, 2)
    assert scheme.load == Fraction(3, 14) <= Fraction(85, 100) * Fraction(3, 6)
    result = simulate(scheme, Bursty(1, 3, 2, seed=0, start_prob=0.5).pattern(40, 6))
    assert result.late_jobs == []
    assert set(steady_loads(scheme, result)) == {Fraction(3, 14)}


def test_non_admissible_patterns_are_reported() -> None:
    scheme = sr_sgc(4, 1, 2, 2)
    pattern = np.zeros((6, 4), dtype=bool)
    pattern[0:2, :] = True  # everybody straggles twice: λ and B both broken
    result = simulate(scheme, pattern)
    assert not result.admissible and result.violating_rounds == [0, 1]
    assert 0 in result.late_jobs  # the guarantee does not extend to such patterns
    waited = simulate(scheme, pattern, wait_on_violation=True)
    assert waited.ignored_rounds == [0, 1] and waited.late_jobs == []
    seen = {True: 0, False: 0}
    for seed in range(60):
        random = Bernoulli(0.15, seed=seed).pattern(12, 4)
        res = simulate(m_sgc(4, 1, 3, 2), random)
        assert res.admissible == is_admissible(random, 1, 3, 2) == (not res.violating_rounds)
        seen[res.admissible] += 1
    assert min(seen.values()) > 5


def test_round_protocol_errors() -> None:
    scheduler = m_sgc(4, 1, 2, 2).scheduler(num_jobs=3)
    with pytest.raises(ValueError, match="round 1 requested, next is round 0"):
        scheduler.assign(1)
    with pytest.raises(ValueError, match=r"not assigned yet; call assign\(0\)"):
        scheduler.report(0, [])
    first = scheduler.assign(0)
    assert scheduler.assign(0) == first  # asking again is harmless
    with pytest.raises(ValueError, match="report round 0 before assigning round 1"):
        scheduler.assign(1)
    with pytest.raises(ValueError, match=r"straggler ids \[7\] out of range"):
        scheduler.report(0, {7})
    scheduler.report(0, {1})
    with pytest.raises(ValueError, match="already reported"):
        scheduler.report(0, set())
    with pytest.raises(UndecodableError, match="job 0 is not decodable yet"):
        scheduler.combination(0)
    assert not scheduler.decodable(0) and scheduler.completed_jobs() == []
    for r in range(1, 5):
        scheduler.assign(r)
        scheduler.report(r, set())
    assert scheduler.completed_jobs() == [0, 1, 2] and scheduler.decoded_round(0) == 1
    assert scheduler.assign(5) == [[], [], [], []]  # all jobs done: idle


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: sr_sgc(4, 2, 4, 2), "B to divide W - 1; got B=2, W=4"),
        (lambda: sr_sgc(4, 1, 2, 0), "0 < lam <= n=4"),
        (lambda: m_sgc(4, 1, 2, 5), "0 < lam <= n=4"),
        (lambda: m_sgc(4, 0, 2, 1), "B must be >= 1"),
        (lambda: m_sgc(4, 1, 1, 1), "W must be >= 2"),
        (lambda: m_sgc(4, 3, 3, 1), "smaller than the window"),
        (lambda: m_sgc(0, 1, 2, 1), "at least one worker"),
        (lambda: m_sgc(4, 1, 2, 2.0), "lam must be an int"),
        (lambda: sr_sgc(1, 1, 2, 1), "requires s < n"),
        (lambda: sr_sgc(4, 1, 2, 2, code=cyclic_repetition(4, 2)), r"\(n=4, s=1\) gradient code"),
        (lambda: m_sgc(4, 1, 2, 4, code=cyclic_repetition(4, 2)), "no coded part"),
        (lambda: m_sgc(4, 1, 2, 2).scheduler(num_jobs=-1), "num_jobs must be >= 0"),
        (lambda: simulate(m_sgc(4, 1, 2, 2), np.zeros((5, 3), bool)), "pattern has 3 workers"),
        (lambda: simulate(m_sgc(4, 1, 3, 2), np.zeros((2, 4), bool)), "shorter than delay"),
    ],
)
def test_bad_parameters_raise_clear_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
