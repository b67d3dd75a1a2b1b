"""What a worker computes in a round, and how the master combines the results.

A job's data is cut into partitions (``scheme.partition_sizes[p]`` is partition ``p``'s
fraction of the job's data). Partition gradients ``g_p`` are **sums** over the
partition's samples (docs/algorithms.md §5.1), so the job's full gradient is ``Σ_p g_p``.

A :class:`Task` asks a worker for the message ``Σ_{(p, w) ∈ weights} w · g_p`` of one
job. A :class:`Contribution` says which delivered message enters a decoded job's
gradient and with what coefficient: ``Σ_c c.coefficient · message(c) = Σ_p g_p``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

#: SR-SGC: a worker's (n, s) gradient-code task for a job
CODED = "gc"
#: M-SGC: one uncoded mini-task of the worker's own D1 part
UNCODED = "d1"
#: M-SGC: the worker's (n, λ) gradient-code task for one D2 group
GROUP = "d2"


@dataclass(frozen=True)
class Task:
    """One message a worker computes for job ``job`` in a round.

    ``index`` is the mini-task number inside the worker's D1 part (``"d1"``), the D2 group
    (``"d2"``), or 0 (``"gc"``). ``load`` is the fraction of the job's data the task reads
    (the sum of the sizes of the partitions in ``weights``).
    """

    job: int
    kind: str
    index: int
    weights: tuple[tuple[int, float], ...]
    load: Fraction

    def weight_map(self) -> dict[int, float]:
        """``{partition: coefficient}`` of the message."""
        return dict(self.weights)

    @property
    def partitions(self) -> list[int]:
        """The partitions the worker reads for this task."""
        return [p for p, _ in self.weights]


@dataclass(frozen=True)
class Contribution:
    """Worker ``worker``'s message for ``task``, delivered in round ``round``, enters with ``coefficient``."""

    round: int
    worker: int
    task: Task
    coefficient: float
