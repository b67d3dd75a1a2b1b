"""What the job store hands out: frozen records (never live ORM objects) and its errors.

The store (:mod:`gradwire.server.store`) returns and raises these; callers import them from here.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gradwire.server.states import TERMINAL_STATES, JobState

__all__ = [
    "IdempotencyConflict",
    "JobEvent",
    "JobNotFound",
    "JobNotTerminal",
    "JobPage",
    "JobPoint",
    "JobRecord",
    "RankPlacement",
    "StateConflict",
    "StoreError",
]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class JobRecord(_Record):
    """A job as stored: its spec, where it is in the state machine, and when it got there."""

    id: str
    seq: int = Field(description="submission number; the FIFO and listing order")
    name: str
    state: JobState
    priority: int
    spec: dict[str, Any] = Field(description="the JobSpec as JSON (JobSpec.model_dump(mode='json'))")
    idempotency_key: str | None
    owner: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = Field(description="first time the job reached RUNNING")
    finished_at: datetime | None = Field(description="when it reached a terminal state")
    ray_job_id: str | None = Field(description="the Ray Jobs submission id, once launched")
    reason: str = Field(description="why the last transition happened")
    restarts: int = Field(description="times the job entered RESTARTING")
    attempt: int = Field(0, description="the worker-group attempt last reported (n after the n-th restore)")
    compressor: str | None = Field(None, description="the compressor rank 0 reported last")
    spec_version: int | None = Field(
        None, description="the JobSpec schema version the spec was validated under (None: stored before)"
    )

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class JobEvent(_Record):
    """One entry of a job's state history; ``from_state`` is ``None`` for the submission."""

    job_id: str
    seq: int = Field(description="1, 2, ... within the job")
    from_state: JobState | None
    to_state: JobState
    reason: str
    at: datetime


class RankPlacement(_Record):
    """Where one rank of a job runs: the node address and worker-group attempt it reported last."""

    rank: int
    node_address: str = Field(description="Ray's address of the rank's node; empty if never reported")
    attempt: int = Field(description="the worker-group attempt (0, then n after the n-th restore)")
    since_step: int = Field(description="the first step it reported from this node in this attempt")
    at: datetime


class JobPage(_Record):
    """A page of :meth:`JobStore.list`: ``next_after`` is the cursor of the next page, if any."""

    items: tuple[JobRecord, ...]
    total: int
    next_after: int | None


class JobPoint(_Record):
    """One telemetry point: what a rank reported about one optimizer step.

    Built from a StepReport-like mapping; keys it does not know (``compressor``, ``samples``,
    ...) are ignored. ``wall_time`` is seconds since the Unix epoch (a datetime is converted);
    ``stragglers`` is a count (a list of straggler ranks is counted). Byte fields are stored as
    the worker reports them.
    """

    model_config = ConfigDict(frozen=True, from_attributes=True, extra="ignore")

    rank: int = Field(ge=0)
    step: int = Field(ge=0)
    wall_time: float
    loss: float | None = Field(None, description="None without a finite loss (a dropped straggler, NaN)")
    accuracy: float | None = None
    compute_s: float = 0.0
    compress_s: float = 0.0
    communicate_s: float = 0.0
    wait_s: float = 0.0
    bytes_sent: int = Field(0, ge=0)
    bytes_uncompressed: int = Field(0, ge=0)
    stragglers: int = Field(0, ge=0)

    @field_validator("loss", "accuracy", mode="before")
    @classmethod
    def _finite_or_none(cls, value: Any) -> Any:
        # JSON has no NaN or Inf: a non-finite value is stored and served as null
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return None
        return value

    @field_validator("wall_time", mode="before")
    @classmethod
    def _epoch_seconds(cls, value: Any) -> Any:
        if isinstance(value, datetime):
            if value.tzinfo is None:
                raise ValueError("wall_time must be timezone-aware")
            return value.timestamp()
        return value

    @field_validator("stragglers", mode="before")
    @classmethod
    def _count_ranks(cls, value: Any) -> Any:
        return len(value) if isinstance(value, (list, tuple, set, frozenset)) else value


# --- errors -----------------------------------------------------------------------------------


class StoreError(Exception):
    """Base of the errors the job store raises on purpose."""


class JobNotFound(StoreError, LookupError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r}")


class IdempotencyConflict(StoreError):
    """An idempotency key came back with a different spec than the one it was first used with."""

    def __init__(self, key: str, job_id: str) -> None:
        self.key, self.job_id = key, job_id
        super().__init__(f"idempotency key {key!r} was already used for job {job_id} with a different spec")


class StateConflict(StoreError):
    """The job is not in the state the caller expected (someone else moved it first)."""

    def __init__(self, job_id: str, current: JobState, expected: Collection[JobState]) -> None:
        self.job_id, self.current, self.expected = job_id, current, frozenset(expected)
        wanted = " or ".join(sorted(s.value for s in self.expected))
        super().__init__(f"job {job_id} is {current.value}, expected {wanted}")


class JobNotTerminal(StoreError):
    """Only a finished job may be deleted."""

    def __init__(self, job_id: str, state: JobState) -> None:
        self.job_id, self.state = job_id, state
        super().__init__(f"job {job_id} is {state.value}; only finished jobs can be deleted")
