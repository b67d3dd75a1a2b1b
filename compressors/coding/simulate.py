"""Run a sequential gradient code against a straggler pattern (no gradients, just who delivers what).

The master's view of round r: it assigns, the pattern says who straggles, it reports.
A round whose stragglers break the (B, W, λ) model (judged against the rounds reported
so far) is listed in ``violating_rounds``; with ``wait_on_violation`` the master waits for
everybody in such a round and reports no stragglers, as the reference harness does
(docs/algorithms.md §6.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from gradwire.compressors.coding.sgc import SequentialScheme
from gradwire.compressors.coding.stragglers import as_pattern, is_admissible


@dataclass
class SimulationResult:
    """Outcome of :func:`simulate`.

    ``decoded_round[t]``: round at whose end job t became decodable (None: never);
    ``loads[r][i]``: fraction of one job's data worker i computed in round r;
    ``admissible``: the whole input pattern obeys the scheme's (B, W, λ) model;
    ``violating_rounds``: rounds whose stragglers broke the model given the reported past;
    ``ignored_rounds``: violating rounds reported as straggler-free (wait_on_violation).
    """

    delay: int
    decoded_round: list[int | None]
    loads: list[list[Fraction]]
    admissible: bool
    violating_rounds: list[int] = field(default_factory=list)
    ignored_rounds: list[int] = field(default_factory=list)

    def on_time(self, job: int) -> bool:
        """Job decoded by the end of round ``job + delay``."""
        done = self.decoded_round[job]
        return done is not None and done <= job + self.delay

    @property
    def late_jobs(self) -> list[int]:
        """Jobs not decodable by their deadline."""
        return [t for t in range(len(self.decoded_round)) if not self.on_time(t)]


def simulate(
    scheme: SequentialScheme, pattern: Any, num_jobs: int | None = None, *, wait_on_violation: bool = False
) -> SimulationResult:
    """Run ``scheme`` for ``pattern.shape[0]`` rounds against ``pattern`` ([rounds, n], True = straggler).

    Jobs ``0 … num_jobs − 1`` are run; by default ``num_jobs = rounds − delay``, so every job's
    deadline falls inside the pattern.
    """
    array = as_pattern(pattern)
    rounds, n = array.shape
    if n != scheme.n:
        raise ValueError(f"pattern has {n} workers, the scheme has n={scheme.n}")
    if num_jobs is None:
        num_jobs = rounds - scheme.delay
        if num_jobs < 1:
            raise ValueError(f"a pattern of {rounds} rounds is shorter than delay + 1 = {scheme.delay + 1}")
    scheduler = scheme.scheduler(num_jobs)
    loads: list[list[Fraction]] = []
    violating: list[int] = []
    ignored: list[int] = []
    for r in range(rounds):
        scheduler.assign(r)
        stragglers = set(np.flatnonzero(array[r]).tolist())
        if not scheduler.conforms(stragglers):
            violating.append(r)
            if wait_on_violation:
                ignored.append(r)
                stragglers = set()
        scheduler.report(r, stragglers)
        loads.append(scheduler.load(r))
    return SimulationResult(
        delay=scheme.delay,
        decoded_round=[scheduler.decoded_round(t) for t in range(num_jobs)],
        loads=loads,
        admissible=is_admissible(array, scheme.B, scheme.W, scheme.lam),
        violating_rounds=violating,
        ignored_rounds=ignored,
    )
