"""How a gradwire job maps onto a Ray job: the pieces of the scheduler that need no thread.

* :func:`submission_id` — the Ray submission id of a job (``gradwire-<job id>``);
* :class:`Demand` — the CPUs and GPUs a job's worker group asks for, and what fits;
* :class:`RestartTracker` — a worker-group restart seen in telemetry (a rank's step going back);
* :func:`report_point` — a StepReport as a row of the job's time series;
* :func:`failure_reason` — why a Ray job failed, from its status and the tail of its log.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.states import JobState
from gradwire.spec import JobSpec

__all__ = ["Demand", "RestartTracker", "failure_reason", "report_point", "submission_id"]

SUBMISSION_PREFIX = "gradwire-"
CANCELLED_BY_USER = "cancelled by user"
LAUNCHED = (JobState.STARTING, JobState.RUNNING, JobState.RESTARTING)
_EPS = 1e-9


def submission_id(job_id: str) -> str:
    """The Ray Jobs submission id of a gradwire job: derived from its id, so it is known (and
    stored) before the job is submitted, and a restarted coordinator can ask Ray about it."""
    return SUBMISSION_PREFIX + job_id


# --- what a job needs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Demand:
    """The Ray resources a job's worker group takes."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> Demand:
        """From a stored spec (validated again; raises :class:`SpecError`)."""
        w = JobSpec.from_dict(spec).workers
        return cls(w.count, w.cpus_per_worker, w.gpus_per_worker)

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def beyond(self, total: Mapping[str, float]) -> str | None:
        """Why the job can never run on a cluster of this ``total`` size, or ``None``."""
        for kind, need, per, name in (
            ("CPU", self.cpus, self.cpus_per_worker, "cpus_per_worker"),
            ("GPU", self.gpus, self.gpus_per_worker, "gpus_per_worker"),
        ):
            have = total.get(kind, 0.0)
            if need > have + _EPS:
                return (
                    f"workers.count={self.workers} × workers.{name}={per:g} needs {need:g} {kind}s, "
                    f"but the whole Ray cluster has {have:g}; lower workers.count or workers.{name}"
                )
        return None

    def __str__(self) -> str:
        gpus = f" and {self.gpus_per_worker:g} GPU" if self.gpus else ""
        return f"{self.workers} workers × {self.cpus_per_worker:g} CPU{gpus}"


def _sum(demands: Iterable[Demand]) -> tuple[float, float]:
    cpus = gpus = 0.0
    for d in demands:
        cpus, gpus = cpus + d.cpus, gpus + d.gpus
    return cpus, gpus


# --- restarts seen in telemetry ---------------------------------------------------------------


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


def report_point(report: pb.StepReport) -> dict[str, Any]:
    """The JobPoint fields of one StepReport."""
    wall = report.wall_time.ToNanoseconds() / 1e9 if report.HasField("wall_time") else time.time()
    return {
        "rank": report.rank,
        "step": report.step,
        "wall_time": wall,
        "loss": report.loss,
        "accuracy": report.accuracy if report.HasField("accuracy") else None,
        "compute_s": report.compute_s,
        "compress_s": report.compress_s,
        "communicate_s": report.communicate_s,
        "wait_s": report.wait_s,
        "bytes_sent": report.bytes_sent,
        "bytes_uncompressed": report.bytes_uncompressed,
        "stragglers": len(report.stragglers),
    }


# --- Ray's answers ----------------------------------------------------------------------------


def _tail(text: str | None, lines: int = 20, chars: int = 3000) -> str:
    if not text:
        return ""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:]


def failure_reason(info: Any, logs: str | None) -> str:
    """Why a Ray job failed, for the job's stored reason: exit code, meaning, and the log's tail.

    ``gradwire train`` exits 1 when the job stopped on non-finite values (and says so in its
    last log line), 2 on bad input; an uncaught exception also exits 1, hence the log check.
    """
    code = getattr(info, "driver_exit_code", None)
    tail = _tail(logs)
    stopped = [line for line in (logs or "").splitlines()[-500:] if ": stopped: " in line]
    if code == 1 and stopped:
        head = f"stopped on non-finite values (gradwire train exited with 1): {stopped[-1].strip()}"
    elif code == 2:
        head = "gradwire train refused its input (exit code 2)"
    elif code is not None:
        head = f"the Ray job failed: its driver exited with code {code}"
    else:
        detail = getattr(info, "message", None) or getattr(info, "error_type", None) or "no detail"
        head = f"the Ray job failed: {detail}"
    return f"{head}\n--- last lines of the job's log ---\n{tail}" if tail else head
