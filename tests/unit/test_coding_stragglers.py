"""Straggler models and the (B, W, λ)-bursty model's definition (docs/algorithms.md §6.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradwire.compressors.coding import Bernoulli, Bursty, NoStragglers, extends_admissibly, is_admissible

MODELS = [(1, 2, 1), (1, 2, 2), (1, 3, 2), (2, 3, 2), (2, 5, 3), (3, 4, 1), (1, 4, 4)]


def admissible_by_definition(pattern: np.ndarray, B: int, W: int, lam: int) -> bool:
    """The model's definition written out loop by loop (independent of the vectorised check)."""
    rounds, n = pattern.shape
    for start in range(max(1, rounds - W + 1)):
        window = pattern[start : start + W]
        if len({w for r in range(len(window)) for w in range(n) if window[r, w]}) > lam:
            return False
        for w in range(n):
            hits = [r for r in range(len(window)) if window[r, w]]
            if hits and hits[-1] - hits[0] + 1 > B:
                return False
    return True


def admissible_incrementally(pattern: np.ndarray, B: int, W: int, lam: int) -> bool:
    history: list[set[int]] = []
    for row in pattern:
        now = set(np.flatnonzero(row).tolist())
        if not extends_admissibly(history, now, B, W, lam):
            return False
        history.append(now)
    return True


@pytest.mark.parametrize(("B", "W", "lam"), MODELS)
def test_bursty_patterns_are_admissible_and_not_trivial(B: int, W: int, lam: int) -> None:
    n, rounds = 6, 60
    busiest_window = longest_burst = total = 0
    for seed in range(40):
        pattern = Bursty(B, W, lam, seed=seed).pattern(rounds, n)
        assert pattern.shape == (rounds, n) and pattern.dtype == np.bool_
        assert is_admissible(pattern, B, W, lam)
        assert admissible_by_definition(pattern, B, W, lam)
        total += int(pattern.sum())
        for start in range(rounds - W + 1):
            busiest_window = max(busiest_window, int(pattern[start : start + W].any(0).sum()))
        for w in range(n):
            run = 0
            for hit in pattern[:, w]:
                run = run + 1 if hit else 0
                longest_burst = max(longest_burst, run)
    assert total > 100  # the patterns do contain stragglers ...
    assert busiest_window == lam  # ... up to λ distinct ones in a window ...
    assert longest_burst == B  # ... and full-length bursts


def test_bursty_is_reproducible_and_prefix_consistent() -> None:
    model = Bursty(2, 5, 3, seed=4)
    long = model.pattern(50, 7)
    assert np.array_equal(Bursty(2, 5, 3, seed=4).pattern(20, 7), long[:20])
    assert np.array_equal(model.pattern(50, 7), long)
    assert not np.array_equal(Bursty(2, 5, 3, seed=5).pattern(50, 7), long)
    with_n = Bursty(2, 5, 3, seed=4, n=7, slowdown=3.0)
    for r in range(50):
        for w in range(7):
            assert with_n.slowdown_for(r, w) == (3.0 if long[r, w] else 1.0)
    with pytest.raises(ValueError, match="needs the number of workers"):
        model.slowdown_for(0, 0)


def test_bernoulli_frequency_and_reproducibility() -> None:
    model = Bernoulli(0.2, slowdown=4.0, seed=9)
    pattern = model.pattern(3000, 10)
    assert abs(pattern.mean() - 0.2) < 0.02
    assert abs(pattern.mean(axis=0) - 0.2).max() < 0.05  # every worker, not just on average
    assert np.array_equal(Bernoulli(0.2, seed=9).pattern(100, 10), pattern[:100])
    assert np.array_equal(Bernoulli(0.2, seed=9).pattern(100, 4), pattern[:100, :4])  # n-independent
    assert not np.array_equal(Bernoulli(0.2, seed=10).pattern(100, 10), pattern[:100])
    for r in range(30):
        for w in range(10):
            assert model.slowdown_for(r, w) == (4.0 if pattern[r, w] else 1.0)
    assert not Bernoulli(0.0).pattern(50, 5).any() and Bernoulli(1.0).pattern(50, 5).all()


def test_no_stragglers() -> None:
    model = NoStragglers()
    assert not model.pattern(10, 4).any() and model.pattern(10, 4).shape == (10, 4)
    assert model.slowdown_for(3, 2) == 1.0


def p(rows: list[str]) -> np.ndarray:
    """A pattern from strings, one per round, '1' = straggler: p(["10", "01"])."""
    return np.array([[c == "1" for c in row] for row in rows])


@pytest.mark.parametrize(
    ("rows", "B", "W", "lam", "ok"),
    [
        (["110", "000", "000"], 1, 3, 1, False),  # two distinct stragglers in a window, λ = 1
        (["100", "000", "010"], 1, 3, 1, False),  # two distinct, in different rounds of one window
        (["100", "000", "000", "010"], 1, 3, 1, True),  # ... in different windows
        (["100", "000", "100"], 1, 3, 2, False),  # two bursts of one worker inside a window
        (["100", "000", "000", "100"], 1, 3, 2, True),  # ... in different windows
        (["100", "100", "100"], 2, 4, 1, False),  # burst of 3 > B = 2
        (["100", "100", "000", "000"], 2, 4, 1, True),  # burst of exactly B
        (["100", "000", "100"], 3, 4, 1, True),  # a hole inside an interval of B rounds is allowed
        (["100", "000", "000", "100"], 3, 4, 1, False),  # span 4 > B = 3 inside one window
        (["111", "000"], 1, 2, 2, False),  # λ + 1 stragglers in one round
        (["000", "000"], 1, 2, 0, True),
        (["100"], 1, 5, 0, False),  # pattern shorter than W is one window
        ([], 1, 2, 1, True),
    ],
)
def test_is_admissible_on_hand_made_patterns(rows: list[str], B: int, W: int, lam: int, ok: bool) -> None:
    pattern = p(rows) if rows else np.zeros((0, 3), dtype=bool)
    assert is_admissible(pattern, B, W, lam) is ok
    assert admissible_by_definition(pattern, B, W, lam) is ok
    assert admissible_incrementally(pattern, B, W, lam) is ok
    assert is_admissible(torch.from_numpy(pattern), B, W, lam) is ok


def test_three_implementations_agree_on_random_patterns() -> None:
    rng = np.random.default_rng(0)
    verdicts = {True: 0, False: 0}
    for trial in range(3000):
        B, W, lam = MODELS[trial % len(MODELS)]
        n, rounds = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        pattern = rng.random((rounds, n)) < rng.choice([0.05, 0.15, 0.3])
        verdict = is_admissible(pattern, B, W, lam)
        assert (
            verdict
            == admissible_by_definition(pattern, B, W, lam)
            == admissible_incrementally(pattern, B, W, lam)
        ), (pattern.astype(int).tolist(), B, W, lam)
        verdicts[verdict] += 1
    assert min(verdicts.values()) > 500  # both answers are exercised


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: is_admissible(np.zeros((3, 2), bool), 0, 3, 1), "B \\(burst length\\) must be >= 1"),
        (lambda: is_admissible(np.zeros((3, 2), bool), 1, 0, 1), "W \\(window\\) must be >= 1"),
        (lambda: is_admissible(np.zeros((3, 2), bool), 1, 3, -1), "must be >= 0"),
        (lambda: is_admissible(np.zeros(3, bool), 1, 3, 1), "\\[rounds, n\\] array"),
        (lambda: is_admissible(np.full((2, 2), 2), 1, 3, 1), "boolean"),
        (lambda: Bernoulli(1.5), "p must be in \\[0, 1\\]"),
        (lambda: Bernoulli(0.1, slowdown=0.5), "must be >= 1"),
        (lambda: Bernoulli(0.1, seed=-1), "seed must be >= 0"),
        (lambda: Bursty(1, 3, 1, start_prob=2.0), "start_prob must be in"),
        (lambda: Bursty(1, 3, 1).pattern(-1, 3), "rounds must be >= 0"),
    ],
)
def test_bad_arguments_raise(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
