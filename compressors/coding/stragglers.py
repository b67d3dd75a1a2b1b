"""Seeded straggler models and the (B, W, λ)-bursty model's definition.

The bursty model (Krishnan, Ebrahimi, Khisti, ICLR 2023, arXiv:2211.13802; docs/algorithms.md §6.1):
in every window of W consecutive rounds

(i)  at most λ distinct workers straggle, and
(ii) each worker's straggling rounds inside the window lie in one interval of at most B
     rounds — equivalently, a worker straggling in round r did not straggle in rounds
     ``r − W + 1 … r − B``.

Rounds inside the interval may be skipped (a burst "of length ≤ B" confines the rounds,
it does not force all of them), exactly as the check in the reference simulators.

A pattern is a ``[rounds, n]`` boolean array, ``True`` where worker ``j`` straggles in
round ``r``. Models return numpy arrays; the checks accept numpy arrays or torch tensors.
Patterns are reproducible: the same seed gives the same pattern, and a longer pattern
extends a shorter one (row ``r`` depends only on the seed and the rounds before it).
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {name}={value}")
    return int(value)


def check_model_params(B: int, W: int, lam: int) -> None:
    """Raise ``ValueError`` unless ``(B, W, λ)`` is a meaningful bursty model."""
    _check_int("B (burst length)", B, 1)
    _check_int("W (window)", W, 1)
    _check_int("lam (stragglers per window)", lam, 0)


def as_pattern(pattern: Any) -> np.ndarray:
    """A ``[rounds, n]`` numpy bool array from a numpy array, torch tensor or nested lists."""
    if hasattr(pattern, "detach"):
        pattern = pattern.detach().cpu().numpy()
    array = np.asarray(pattern)
    if array.ndim != 2:
        raise ValueError(f"a straggler pattern is a [rounds, n] array, got shape {array.shape}")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError("a straggler pattern must be boolean (or 0/1)")
        array = array.astype(bool)
    return array


def is_admissible(pattern: Any, B: int, W: int, lam: int) -> bool:
    """Whether ``pattern`` ([rounds, n], True = straggler) obeys the (B, W, λ)-bursty model.

    Checks every window of W consecutive rounds (a whole pattern shorter than W is one
    window): at most ``lam`` distinct stragglers, and each worker's straggling rounds span
    at most ``B`` rounds (last − first + 1 ≤ B).
    """
    check_model_params(B, W, lam)
    array = as_pattern(pattern)
    rounds = array.shape[0]
    if rounds == 0:
        return True
    width = min(W, rounds)
    windows = sliding_window_view(array, width, axis=0)  # [windows, n, width]
    if (windows.any(axis=2).sum(axis=1) > lam).any():
        return False
    position = np.arange(width)
    first = np.where(windows, position, width).min(axis=2)
    last = np.where(windows, position, -1).max(axis=2)
    return bool(((last < 0) | (last - first + 1 <= B)).all())


def extends_admissibly(
    previous: Sequence[Collection[int]], stragglers: Collection[int], B: int, W: int, lam: int
) -> bool:
    """Whether a round with ``stragglers`` after the rounds ``previous`` (oldest first) stays admissible.

    The incremental form of :func:`is_admissible` (a pattern is admissible iff every round
    passes this check against the rounds before it): at most ``lam`` distinct stragglers
    in the last W rounds, and no new straggler straggled in rounds ``r − W + 1 … r − B``.
    A round that brings no straggler from outside an already broken window is not blamed
    again (so the first violating round is flagged, and later rounds only for new breaches).
    """
    new = set(stragglers)
    recent = previous[max(0, len(previous) - (W - 1)) :]
    seen = set().union(*recent)
    if not new <= seen and len(seen | new) > lam:
        return False
    # previous[-back] is round r − back: a new straggler must be clean in rounds r − W + 1 … r − B
    return all(new.isdisjoint(previous[-back]) for back in range(B, min(W, len(previous) + 1)))


class StragglerModel(ABC):
    """Who straggles in which round, and how much slower a straggler is."""

    @abstractmethod
    def pattern(self, rounds: int, n: int) -> np.ndarray:
        """A reproducible ``[rounds, n]`` bool array, True where the worker straggles."""

    @abstractmethod
    def slowdown_for(self, round: int, worker: int) -> float:
        """Factor on the worker's compute time in that round (1.0 when it does not straggle)."""


class NoStragglers(StragglerModel):
    """Every worker is on time in every round."""

    def pattern(self, rounds: int, n: int) -> np.ndarray:
        return np.zeros((_check_int("rounds", rounds, 0), _check_int("n", n, 1)), dtype=bool)

    def slowdown_for(self, round: int, worker: int) -> float:
        return 1.0


class Bernoulli(StragglerModel):
    """Each worker straggles independently with probability ``p`` in each round.

    A straggler's compute time is multiplied by ``slowdown``. Draws for round ``r`` come from
    a generator seeded with ``(seed, r)``, and worker ``j`` takes the ``j``-th draw, so a
    worker's fate does not depend on ``n`` or on the order of queries.
    """

    def __init__(self, p: float, slowdown: float = 5.0, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"straggling probability p must be in [0, 1], got p={p}")
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown multiplies a straggler's time and must be >= 1, got {slowdown}")
        self.p = float(p)
        self.slowdown = float(slowdown)
        self.seed = _check_int("seed", seed, 0)

    def _draws(self, round: int, count: int) -> np.ndarray:
        return np.random.default_rng((self.seed, round)).random(count)

    def pattern(self, rounds: int, n: int) -> np.ndarray:
        rounds, n = _check_int("rounds", rounds, 0), _check_int("n", n, 1)
        out = np.zeros((rounds, n), dtype=bool)
        for r in range(rounds):
            out[r] = self._draws(r, n) < self.p
        return out

    def slowdown_for(self, round: int, worker: int) -> float:
        round, worker = _check_int("round", round, 0), _check_int("worker", worker, 0)
        return self.slowdown if self._draws(round, worker + 1)[worker] < self.p else 1.0


class Bursty(StragglerModel):
    """Random patterns that always satisfy the (B, W, λ)-bursty model.

    Round by round, in a random worker order: a worker outside a burst starts one with
    probability ``start_prob`` (length drawn uniformly from 1..B), a worker inside a burst
    keeps straggling with probability ``stay_prob`` (so bursts may have holes); either is
    granted only if :func:`extends_admissibly` still holds. Every round consumes the same
    number of draws from one generator seeded with ``(seed, n)``.

    ``slowdown_for`` needs the number of workers: pass ``n`` here.
    """

    def __init__(
        self,
        B: int,
        W: int,
        lam: int,
        seed: int = 0,
        *,
        n: int | None = None,
        start_prob: float = 0.3,
        stay_prob: float = 0.9,
        slowdown: float = 5.0,
    ) -> None:
        check_model_params(B, W, lam)
        for name, value in (("start_prob", start_prob), ("stay_prob", stay_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown multiplies a straggler's time and must be >= 1, got {slowdown}")
        self.B, self.W, self.lam = B, W, lam
        self.seed = _check_int("seed", seed, 0)
        self.n = None if n is None else _check_int("n", n, 1)
        self.start_prob, self.stay_prob, self.slowdown = start_prob, stay_prob, float(slowdown)
        self._cache: dict[int, np.ndarray] = {}

    def pattern(self, rounds: int, n: int) -> np.ndarray:
        rounds, n = _check_int("rounds", rounds, 0), _check_int("n", n, 1)
        cached = self._cache.get(n)
        if cached is None or cached.shape[0] < rounds:
            cached = self._generate(rounds, n)
            self._cache[n] = cached
        return cached[:rounds].copy()

    def _generate(self, rounds: int, n: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, n))
        out = np.zeros((rounds, n), dtype=bool)
        history: list[set[int]] = []
        burst_end = np.full(n, -1)  # last round of the worker's current burst
        for r in range(rounds):
            order = rng.permutation(n)
            coin = rng.random(n)
            length = rng.integers(1, self.B + 1, size=n)
            now: set[int] = set()
            for w in order.tolist():
                in_burst = r <= burst_end[w]
                wants = coin[w] < (self.stay_prob if in_burst else self.start_prob)
                if wants and extends_admissibly(history, now | {w}, self.B, self.W, self.lam):
                    now.add(w)
                    if not in_burst:
                        burst_end[w] = r + length[w] - 1
            history.append(now)
            out[r, sorted(now)] = True
        return out

    def slowdown_for(self, round: int, worker: int) -> float:
        if self.n is None:
            raise ValueError("Bursty.slowdown_for needs the number of workers: construct with n=...")
        round = _check_int("round", round, 0)
        worker = operator.index(worker)
        if not 0 <= worker < self.n:
            raise ValueError(f"worker {worker} out of range for n={self.n}")
        return self.slowdown if self.pattern(round + 1, self.n)[round, worker] else 1.0


def injected_delay(slowdown: float, elapsed: float, fixed: float | None = None) -> float:
    """Seconds an injected straggler waits after its real computation: ``fixed`` if given,
    else ``(slowdown − 1)·elapsed``, so its round takes ``slowdown`` times as long."""
    return fixed if fixed is not None else max(0.0, (slowdown - 1.0) * elapsed)
