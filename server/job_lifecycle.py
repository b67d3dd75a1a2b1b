"""A job's life in one place: what can happen to it, and the one function that decides what follows.

The scheduler (:mod:`gradwire.server.scheduler`) does the I/O — it asks Ray, submits, stops, stores
and counts — and turns everything it learns into a *signal*: Ray's status of the job, a failed
submission, a batch of step reports, a cancel, an admission or a refusal. :func:`decide` takes the
job as stored and one signal and returns a :class:`Decision`: the state moves to make, in order
(each one checked again by :mod:`gradwire.server.states` when the store writes it), the events that
change no state (a compressor switch), and whether to try a submission again. Nothing here sleeps,
locks or calls out, so every rule can be read and tested on its own.

The moves::

    QUEUED      --admitted-->  STARTING --Ray RUNNING / first reports--> RUNNING
    QUEUED      --never fits / spec invalid / resume target gone-->      FAILED
    STARTING    --submission failed for good-->                          FAILED
    RUNNING     --a report of a higher attempt--> RESTARTING --> RUNNING (once per attempt)
    launched    --Ray SUCCEEDED--> (RUNNING) SUCCEEDED; FAILED --> FAILED; STOPPED --> CANCELLED;
                  unknown to Ray --> FAILED ("lost: ...")
    any open    --cancel-->                                              CANCELLED

Restarts come from Ray Train itself, never from step numbers: every StepReport carries the
worker group's ``attempt`` (0 for the first group, n once Ray Train restored the group n times from
its checkpoints; the worker reads it from the checkpoint Ray Train hands it, see
``worker/runtime.py``). A report whose attempt is above the stored one moves the job
RUNNING → RESTARTING → RUNNING, storing the new attempt, with an event naming the attempt and the
step the group resumed from; later reports of the same attempt change nothing.

:class:`FailurePolicy` is the one place that says what a failure means: which submission errors
are worth another try and how long to wait, and how a failed Ray job is explained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from gradwire.server.ray_cluster import RayUnavailable
from gradwire.server.ray_jobs import failure_reason
from gradwire.server.states import TERMINAL_STATES, JobState

__all__ = [
    "CANCELLED_BY_USER",
    "LAUNCHED",
    "Admitted",
    "CancelRequested",
    "Decision",
    "FailurePolicy",
    "Move",
    "RayStatus",
    "Refused",
    "ReportsArrived",
    "SubmitFailed",
    "decide",
]

#: the states of a job that has a Ray job (submitted, running, or being restored)
LAUNCHED = (JobState.STARTING, JobState.RUNNING, JobState.RESTARTING)
CANCELLED_BY_USER = "cancelled by user"


class StoredJob(Protocol):
    """What :func:`decide` reads of a job (a :class:`~gradwire.server.records.JobRecord` has it)."""

    @property
    def state(self) -> JobState: ...
    @property
    def attempt(self) -> int: ...
    @property
    def compressor(self) -> str | None: ...


# --- signals -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayStatus:
    """What Ray's Jobs API says of the job: ``status`` is Ray's name (``PENDING``, ``RUNNING``,
    ``SUCCEEDED``, ``FAILED``, ``STOPPED``) or ``None`` when Ray does not know the submission id.
    ``failure`` explains a FAILED job (the policy's :meth:`FailurePolicy.failure_reason`)."""

    submission_id: str
    status: str | None
    failure: str = ""


@dataclass(frozen=True)
class SubmitFailed:
    """``submit_job`` raised ``error`` on try number ``attempt`` (0-based)."""

    submission_id: str
    error: BaseException
    attempt: int


@dataclass(frozen=True)
class ReportsArrived:
    """Rank reports of the job were stored. ``attempt`` is the highest worker-group attempt among
    them and ``resumed_step`` the lowest step reported in that attempt (the first step after the
    restore); ``compressors`` is rank 0's compressor as ``(step, name)`` wherever it differs from
    the one before it in the batch, in order (empty: no rank-0 report)."""

    attempt: int = 0
    resumed_step: int = 0
    compressors: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class CancelRequested:
    """A client asked to cancel the job."""


@dataclass(frozen=True)
class Admitted:
    """The scheduler found room for the job and is about to submit it as ``submission_id``."""

    submission_id: str
    demand: str


@dataclass(frozen=True)
class Refused:
    """The job can never run: ``reason`` says why (too big for the cluster, its stored spec no
    longer validates, the job it resumes is gone)."""

    reason: str


Signal = RayStatus | SubmitFailed | ReportsArrived | CancelRequested | Admitted | Refused


# --- decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    """One state transition to store, with its reason (and the columns it sets)."""

    to: JobState
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What follows a signal: ``moves`` to store in order, ``notes`` (events without a state
    change, each with the fields it sets; a note with an empty reason only sets its fields, with
    no event), and ``retry_after_s`` (submit again after that long; ``None``: do not)."""

    moves: tuple[Move, ...] = ()
    notes: tuple[Move, ...] = ()
    retry_after_s: float | None = None

    @property
    def nothing(self) -> bool:
        return not self.moves and not self.notes and self.retry_after_s is None


NOTHING = Decision()


@dataclass(frozen=True)
class FailurePolicy:
    """What a failure means for a job.

    A submission is tried ``submit_attempts`` times in all while the error may pass (a head whose
    job agent is not up yet answers "No available agent"; a Jobs API that did not answer or
    refused the connection), waiting ``submit_backoff_s × n`` before try n+1; any other error,
    or the last try's, fails the job with the error in the reason. "already exists" means the
    submission id is taken by an earlier try of ours: the job is followed, not failed.
    :meth:`explain_failure` says why a Ray job FAILED, from its details and the tail of its log
    (``ray_jobs.failure_reason``: stopped on non-finite values, refused its input, or crashed).
    """

    submit_attempts: int = 6
    submit_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.submit_attempts < 1 or self.submit_backoff_s < 0:
            raise ValueError("submit_attempts must be >= 1 and submit_backoff_s >= 0")

    @staticmethod
    def already_submitted(error: BaseException) -> bool:
        return "already exists" in str(error)

    @staticmethod
    def retryable(error: BaseException) -> bool:
        """Whether a failed submission may pass if tried again (see the class docstring)."""
        if "No available agent" in str(error):
            return True
        if isinstance(error, (RayUnavailable, ConnectionError, TimeoutError)):
            return True
        return any(c.__name__ in ("ConnectionError", "Timeout") for c in type(error).__mro__)  # requests'

    def after_submit_error(self, error: BaseException, attempt: int) -> float | None:
        """Seconds to wait before trying again, or ``None`` when the job fails now."""
        if self.retryable(error) and attempt + 1 < self.submit_attempts:
            return self.submit_backoff_s * (attempt + 1)
        return None

    @staticmethod
    def explain_failure(info: Any, logs: str | None) -> str:
        return failure_reason(info, logs)


def decide(job: StoredJob, signal: Signal, policy: FailurePolicy | None = None) -> Decision:
    """Where ``job`` (as stored) goes after ``signal``; see the module docstring for the rules."""
    state = JobState(job.state)
    if state in TERMINAL_STATES:  # nothing leaves a terminal state; Ray's later words are ignored
        return NOTHING
    if isinstance(signal, CancelRequested):
        return Decision(moves=(Move(JobState.CANCELLED, CANCELLED_BY_USER),))
    if isinstance(signal, Admitted):
        if state is not JobState.QUEUED:
            return NOTHING
        reason = f"admitted ({signal.demand}); submitting Ray job {signal.submission_id}"
        return Decision(moves=(Move(JobState.STARTING, reason, {"ray_job_id": signal.submission_id}),))
    if isinstance(signal, Refused):
        return Decision(moves=(Move(JobState.FAILED, signal.reason),))
    if isinstance(signal, SubmitFailed):
        return _after_submit_error(signal, policy or FailurePolicy())
    if isinstance(signal, RayStatus):
        return _follow_ray(state, signal)
    if isinstance(signal, ReportsArrived):
        return _after_reports(job, state, signal)
    raise TypeError(f"not a job signal: {signal!r}")


def _one(to: JobState, reason: str) -> Decision:
    return Decision(moves=(Move(to, reason),))


def _after_submit_error(signal: SubmitFailed, policy: FailurePolicy) -> Decision:
    if policy.already_submitted(signal.error):
        return NOTHING  # an earlier try of ours got through: follow the Ray job
    wait = policy.after_submit_error(signal.error, signal.attempt)
    if wait is not None:
        return Decision(retry_after_s=wait)
    reason = f"could not submit the Ray job {signal.submission_id}: {signal.error}"
    return Decision(moves=(Move(JobState.FAILED, reason),))


def _follow_ray(state: JobState, signal: RayStatus) -> Decision:
    sid, status = signal.submission_id, signal.status
    if state is JobState.QUEUED:  # not launched: Ray has nothing to say about it
        return NOTHING
    if status is None:
        return _one(JobState.FAILED, f"lost: Ray no longer knows this job (submission id {sid})")
    if status == "RUNNING":
        return NOTHING if state is JobState.RUNNING else _one(JobState.RUNNING, f"Ray job {sid} is running")
    if status == "SUCCEEDED":
        ran = () if state is JobState.RUNNING else (Move(JobState.RUNNING, f"Ray job {sid} ran"),)
        return Decision(moves=(*ran, Move(JobState.SUCCEEDED, f"Ray job {sid} succeeded")))
    if status == "FAILED":
        return _one(JobState.FAILED, signal.failure or f"Ray job {sid} failed")
    if status == "STOPPED":
        return _one(JobState.CANCELLED, f"Ray job {sid} was stopped outside gradwire")
    return NOTHING  # PENDING, or a status this coordinator does not know: wait


def _after_reports(job: StoredJob, state: JobState, signal: ReportsArrived) -> Decision:
    moves: list[Move] = []
    if state is JobState.STARTING:  # reports prove the job runs, even before Ray's status says so
        moves.append(Move(JobState.RUNNING, "first step reports arrived"))
    if signal.attempt > job.attempt:
        restored = max(0, signal.resumed_step - 1)
        if state is not JobState.RESTARTING:
            moves.append(
                Move(
                    JobState.RESTARTING,
                    f"Ray Train restored the worker group (attempt {signal.attempt}) from its checkpoint "
                    f"at step {restored}",
                    {"attempt": signal.attempt},
                )
            )
        moves.append(
            Move(
                JobState.RUNNING,
                f"worker group attempt {signal.attempt} running from step {restored}",
                {"attempt": signal.attempt},
            )
        )
    notes: list[Move] = []
    current = job.compressor or ""
    for step, name in signal.compressors:
        if not name or name == current:
            continue
        # a switch is an event; the job's first value is stored without one
        text = f"compressor: {current} → {name} at step {step}" if current else ""
        notes.append(Move(state, text, {"compressor": name}))
        current = name
    return Decision(moves=tuple(moves), notes=tuple(notes))
