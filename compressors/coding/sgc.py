"""The round protocol shared by the sequential gradient codes (Krishnan, Ebrahimi, Khisti, ICLR 2023).

Job ``t`` starts in round ``t`` and must be decodable by the end of round ``t + T``
(docs/algorithms.md §6.1). A master drives a :class:`RoundScheduler` one round at a time::

    scheduler = scheme.scheduler()
    for r in range(rounds):
        tasks = scheduler.assign(r)          # tasks[worker] -> list of Task
        ...                                  # workers compute; some straggle
        scheduler.report(r, stragglers)      # results of everybody else arrived
        for job in scheduler.completed_jobs(): ...
            scheduler.combination(job)       # which messages, which coefficients

Rounds go strictly in order: assign(r), report(r), assign(r + 1), ... The decisions of
round r depend only on what was reported for rounds < r (the schemes are adaptive).
"""

from __future__ import annotations

import functools
import operator
from abc import ABC, abstractmethod
from collections.abc import Iterable
from fractions import Fraction

from gradwire.compressors.coding.gradient_code import GradientCode, UndecodableError, require_ints
from gradwire.compressors.coding.stragglers import extends_admissibly
from gradwire.compressors.coding.tasks import Contribution, Task


def check_sgc_params(n: int, B: int, W: int, lam: int) -> None:
    """Raise ``ValueError`` naming the problem unless (n, B, W, λ) suit a sequential gradient code."""
    require_ints(n=n, B=B, W=W, lam=lam)
    if n < 1:
        raise ValueError(f"need at least one worker, got n={n}")
    if B < 1:
        raise ValueError(f"burst length B must be >= 1, got B={B}")
    if W < 2:
        raise ValueError(f"window W must be >= 2, got W={W}")
    if B > W - 1:
        raise ValueError(f"burst length B must be smaller than the window W; got B={B}, W={W}")
    if not 0 < lam <= n:
        raise ValueError(f"lam (distinct stragglers per window) must satisfy 0 < lam <= n={n}, got lam={lam}")


def check_code(code: GradientCode, n: int, s: int, role: str) -> None:
    """A user-supplied code must be an (n, s) code."""
    if code.n != n or code.s != s:
        raise ValueError(f"{role} needs an (n={n}, s={s}) gradient code, got (n={code.n}, s={code.s})")


class SequentialScheme(ABC):
    """Parameters and task layout of a sequential gradient code; ``scheduler()`` runs it.

    Attributes: ``n`` workers; the straggler model ``B`` (burst length — not the GC
    matrix of §5), ``W`` (window), ``lam`` (λ); ``delay`` (T); ``load`` (the paper's
    normalised load per worker per round, an exact Fraction); ``partition_sizes`` (each
    partition's fraction of a job's data); ``code`` (the gradient code used, or None).
    """

    name: str
    n: int
    B: int
    W: int
    lam: int
    delay: int
    load: Fraction
    partition_sizes: tuple[Fraction, ...]
    code: GradientCode | None

    @abstractmethod
    def scheduler(self, num_jobs: int | None = None) -> RoundScheduler:
        """A fresh master for jobs ``0 … num_jobs − 1`` (unbounded when None)."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, B={self.B}, W={self.W}, lam={self.lam}, "
            f"delay={self.delay}, load={self.load})"
        )


class RoundScheduler(ABC):
    """The master's round-by-round bookkeeping; subclasses say what to assign and when a job decodes."""

    def __init__(self, scheme: SequentialScheme, num_jobs: int | None) -> None:
        if num_jobs is not None and (isinstance(num_jobs, bool) or not isinstance(num_jobs, int)):
            raise ValueError(f"num_jobs must be an int or None, got {num_jobs!r}")
        if num_jobs is not None and num_jobs < 0:
            raise ValueError(f"num_jobs must be >= 0, got {num_jobs}")
        self.scheme = scheme
        self.n = scheme.n
        self.num_jobs = num_jobs
        self._tasks: list[list[list[Task]]] = []  # [round][worker] -> tasks
        self._stragglers: list[frozenset[int]] = []  # [round] -> reported stragglers
        self._decoded: dict[int, int] = {}  # job -> round it became decodable

    # -- subclass hooks ---------------------------------------------------------------
    @abstractmethod
    def _plan(self, r: int) -> list[list[Task]]:
        """The tasks of round ``r`` per worker, from what was reported for rounds < r."""

    @abstractmethod
    def _record(self, r: int, worker: int, task: Task) -> None:
        """Note that ``worker`` delivered ``task`` in round ``r``."""

    @abstractmethod
    def _is_decodable(self, job: int) -> bool:
        """Whether the delivered results determine ``job``'s gradient."""

    @abstractmethod
    def _combination(self, job: int) -> list[Contribution]:
        """The decode of a decodable job."""

    # -- the round protocol ---------------------------------------------------------------
    def has_job(self, job: int) -> bool:
        """Whether ``job`` is one of this scheduler's jobs."""
        return job >= 0 and (self.num_jobs is None or job < self.num_jobs)

    @property
    def next_round(self) -> int:
        """The round that the next :meth:`assign` call must name."""
        return len(self._tasks)

    def assign(self, r: int) -> list[list[Task]]:
        """Tasks of round ``r`` per worker (``tasks[worker]`` is a list; empty when idle)."""
        r = operator.index(r)
        if r < len(self._tasks):
            return [list(tasks) for tasks in self._tasks[r]]
        if r != len(self._tasks):
            raise ValueError(f"rounds go in order: round {r} requested, next is round {len(self._tasks)}")
        if len(self._stragglers) < r:
            raise ValueError(f"report round {r - 1} before assigning round {r}")
        plan = self._plan(r)
        self._tasks.append(plan)
        return [list(tasks) for tasks in plan]

    def report(self, r: int, stragglers: Iterable[int]) -> None:
        """Round ``r`` ended: every worker not in ``stragglers`` delivered all its tasks of round ``r``."""
        r = operator.index(r)
        if r < len(self._stragglers):
            raise ValueError(f"round {r} was already reported")
        if r >= len(self._tasks):
            raise ValueError(f"round {r} was not assigned yet; call assign({r}) first")
        if r != len(self._stragglers):
            expected = len(self._stragglers)
            raise ValueError(f"report rounds in order: round {r} given, round {expected} expected")
        late = frozenset(operator.index(w) for w in stragglers)
        bad = sorted(w for w in late if not 0 <= w < self.n)
        if bad:
            raise ValueError(f"straggler ids {bad} out of range for n={self.n} workers")
        self._stragglers.append(late)
        touched: set[int] = set()
        for worker, tasks in enumerate(self._tasks[r]):
            if worker in late:
                continue
            for task in tasks:
                self._record(r, worker, task)
                touched.add(task.job)
        for job in sorted(touched):
            if job not in self._decoded and self._is_decodable(job):
                self._decoded[job] = r

    def conforms(self, stragglers: Iterable[int]) -> bool:
        """Whether ``stragglers`` in the next round to report keep the reported pattern (B, W, λ)-bursty.

        A master that sees a violating round can wait for everybody and report no
        stragglers, as the reference harness does (docs/algorithms.md §6.1).
        """
        s = self.scheme
        return extends_admissibly(self._stragglers, set(stragglers), s.B, s.W, s.lam)

    # -- what the master knows -----------------------------------------------------------------
    def stragglers(self, r: int) -> frozenset[int]:
        """The stragglers reported for round ``r``."""
        return self._stragglers[r]

    def decodable(self, job: int) -> bool:
        """Whether ``job``'s full gradient can be recovered from what has been delivered."""
        return job in self._decoded

    def decoded_round(self, job: int) -> int | None:
        """The round at whose end ``job`` became decodable, or None."""
        return self._decoded.get(job)

    def completed_jobs(self) -> list[int]:
        """Decodable jobs, in increasing order."""
        return sorted(self._decoded)

    def combination(self, job: int) -> list[Contribution]:
        """Delivered messages and coefficients whose weighted sum is ``job``'s full gradient."""
        if job not in self._decoded:
            reported = len(self._stragglers)
            raise UndecodableError(f"job {job} is not decodable yet ({reported} rounds reported)")
        return self._combination(job)

    def load(self, r: int) -> list[Fraction]:
        """Per worker: fraction of one job's data it computes in round ``r`` (stragglers included)."""
        return [_total_load(tasks) for tasks in self._tasks[r]]


def _total_load(tasks: list[Task]) -> Fraction:
    if not tasks:
        return Fraction(0)
    first = tasks[0].load
    if all(t.load is first or t.load == first for t in tasks):
        return _times(first, len(tasks))  # the usual case: equal mini-tasks
    return sum((t.load for t in tasks), Fraction(0))


@functools.lru_cache(maxsize=256)
def _times(load: Fraction, count: int) -> Fraction:
    return load * count
