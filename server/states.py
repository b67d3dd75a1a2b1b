"""The job state machine: every state a coordinator job can be in and every move it may make.

This module is the one place that decides whether a job may go from one state to another.
The job store (:mod:`gradwire.server.store`) is the only code that changes a stored state, and
it calls :func:`check_transition` inside the same transaction that writes the new state, so an
illegal move cannot be persisted.

::

    QUEUED      → STARTING | FAILED | CANCELLED
    STARTING    → RUNNING | FAILED | CANCELLED
    RUNNING     → SUCCEEDED | FAILED | CANCELLED | RESTARTING
    RESTARTING  → RUNNING | FAILED | CANCELLED
    SUCCEEDED, FAILED, CANCELLED: terminal

- ``QUEUED``: stored, waiting for the scheduler to find room on the cluster.
- ``STARTING``: the scheduler admitted it and is submitting it as a Ray job.
- ``RUNNING``: the Ray job's workers are training.
- ``RESTARTING``: the worker group failed and Ray Train brought it back from the last checkpoint
  (``RUNNING → RESTARTING → RUNNING``, when a step report carries a higher worker-group attempt
  than the job's; :mod:`gradwire.server.job_lifecycle` decides it); each entry counts as one
  restart.
- ``SUCCEEDED`` / ``FAILED`` / ``CANCELLED``: terminal; nothing leaves them, and only jobs in
  them may be deleted.

``QUEUED → FAILED`` is allowed on purpose. A queued job can be known to be hopeless before it
is ever launched: it asks for more CPUs or GPUs than the whole cluster has, or start-up
reconciliation finds that its stored spec no longer validates after an upgrade.
Without this edge such a job would have to pass through ``STARTING`` only to fail there, and
its event history would claim a launch that never happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum


class JobState(str, Enum):
    """Where a job is in its life. The value is the name stored in the database and in JSON."""

    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED and CANCELLED: the job will never change again."""
        return self in TERMINAL_STATES


TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

#: Every legal move, keyed by the state it leaves. A pair not listed here is illegal,
#: including a state "moving" to itself.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RESTARTING}
    ),
    JobState.RESTARTING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

#: The state every job is created in.
INITIAL_STATE = JobState.QUEUED


class IllegalTransition(ValueError):
    """A job was asked to make a move the state machine does not have."""

    def __init__(self, job_id: str, from_state: JobState, to_state: JobState) -> None:
        self.job_id = job_id
        self.from_state = from_state
        self.to_state = to_state
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[from_state])) or "none, it is terminal"
        super().__init__(
            f"job {job_id}: cannot go from {from_state.value} to {to_state.value} (allowed: {allowed})"
        )


def can_transition(from_state: JobState, to_state: JobState) -> bool:
    """Whether the state machine has the move ``from_state → to_state``."""
    return JobState(to_state) in TRANSITIONS[JobState(from_state)]


def check_transition(job_id: str, from_state: JobState, to_state: JobState) -> None:
    """Raise :class:`IllegalTransition` unless ``from_state → to_state`` is a legal move."""
    if not can_transition(from_state, to_state):
        raise IllegalTransition(job_id, JobState(from_state), JobState(to_state))
