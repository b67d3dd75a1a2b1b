"""Worker-group restarts seen in telemetry: a rank's step going back means Ray Train restored the
group from a checkpoint. The scheduler feeds every step report to a :class:`RestartTracker`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RestartTracker"]


@dataclass
class _JobSteps:
    generation: int = 0  # restarts counted so far
    last: dict[int, tuple[int, int]] = field(default_factory=dict)  # rank -> (generation, step)


class RestartTracker:
    """Finds worker-group restarts in a job's step reports, once per restart.

    A rank's step going back (or repeating) starts a new generation, unless that rank is only
    catching up with a restart another rank already showed: after a restart every rank goes
    back, and only the first one to do so counts.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, _JobSteps] = {}

    def observe(self, job_id: str, rank: int, step: int) -> int | None:
        """Record one report; returns the step the rank had reached when it starts a new restart."""
        steps = self._jobs.setdefault(job_id, _JobSteps())
        seen = steps.last.get(rank)
        if seen is None or step > seen[1]:
            steps.last[rank] = (steps.generation if seen is None else seen[0], step)
            return None
        generation, previous = seen
        if generation < steps.generation:  # this rank follows a restart already counted
            steps.last[rank] = (steps.generation, step)
            return None
        steps.generation += 1
        steps.last[rank] = (steps.generation, step)
        return previous

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
