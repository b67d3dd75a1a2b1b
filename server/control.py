"""What the REST routes need from the scheduler side, and what they get when none is attached.

:class:`JobControl` is the seam between the HTTP layer and whatever runs jobs (the Ray
scheduler). The routes never talk to Ray themselves: they store jobs through the
:class:`~gradwire.server.store.JobStore` and call a ``JobControl`` for everything that needs the
cluster. :class:`NullControl` is the stand-in when no scheduler is attached: queued jobs can still
be cancelled (nothing runs them), and anything that needs a cluster raises
:class:`ClusterUnavailable`, which the API answers with 503.

:class:`Services` bundles what one app serves with, so route handlers reach it through a single
dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from gradwire.policy import JobPolicy
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.records import JobRecord, StateConflict
from gradwire.server.settings import Settings
from gradwire.server.states import TERMINAL_STATES, JobState
from gradwire.server.store import JobStore

__all__ = [
    "ACTIVE_STATES",
    "CANCEL_REASON",
    "ClusterUnavailable",
    "JobControl",
    "NullControl",
    "Services",
    "cancel_queued",
]

#: States a cancel request can act on.
ACTIVE_STATES = frozenset(JobState) - TERMINAL_STATES

#: The reason recorded when a cancel request over REST moves a job.
CANCEL_REASON = "cancelled by request"


class ClusterUnavailable(RuntimeError):
    """The cluster (or the scheduler in front of it) cannot be reached; the API answers 503."""


class JobControl(Protocol):
    """The scheduler side, as the REST routes use it. Methods are called from worker threads."""

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job that has not finished and return it as stored afterwards.

        A queued job goes straight to CANCELLED (:func:`cancel_queued`). A job already handed
        to Ray is asked to stop; the returned record may still be STARTING or RUNNING, and reaches
        CANCELLED once the Ray job has stopped. Raises
        :class:`~gradwire.server.store.JobNotFound`, :class:`~gradwire.server.store.StateConflict`
        for a job that already finished, or :class:`ClusterUnavailable`.
        """
        ...

    def logs(self, job_id: str) -> str | None:
        """The job's driver log so far, or ``None`` when there is none (yet)."""
        ...

    def cluster(self) -> dict[str, Any]:
        """``{"total": {resource: amount}, "available": {resource: amount}}``.

        Raises :class:`ClusterUnavailable` when the cluster cannot be reached.
        """
        ...

    def wake(self) -> None:
        """A job was queued: look for room for it now rather than at the next poll."""
        ...


def cancel_queued(store: JobStore, job_id: str, reason: str = CANCEL_REASON) -> JobRecord:
    """Cancel ``job_id`` if it is still QUEUED; :class:`StateConflict` if it has moved on."""
    return store.transition(job_id, JobState.CANCELLED, reason, expect=JobState.QUEUED)


class NullControl:
    """The :class:`JobControl` of a coordinator with no scheduler attached."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    def cancel(self, job_id: str) -> JobRecord:
        job = self._store.get(job_id)
        if job.state is JobState.QUEUED:
            return cancel_queued(self._store, job_id)
        if job.terminal:
            raise StateConflict(job_id, job.state, ACTIVE_STATES)
        raise ClusterUnavailable(f"job {job_id} is {job.state.value} and no scheduler is attached to stop it")

    def logs(self, job_id: str) -> str | None:
        return None

    def cluster(self) -> dict[str, Any]:
        raise ClusterUnavailable("no cluster attached to this coordinator")

    def wake(self) -> None:
        pass


@dataclass(frozen=True)
class Services:
    """What the routes of one app work with (kept on ``app.state.services``)."""

    settings: Settings
    store: JobStore
    metrics: CoordinatorMetrics
    control: JobControl
    compressor_schemas: dict[str, dict[str, Any]]

    @cached_property
    def policy(self) -> JobPolicy:
        """What job specs may ask for here (gradwire/policy.py), from the settings."""
        return self.settings.job_policy()
