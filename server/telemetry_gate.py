"""Who may write a job's telemetry, and what one report may claim: the coordinator's telemetry gate.

The gRPC sink (:mod:`gradwire.server.telemetry_sink`) asks a :class:`TelemetryGate` about every
batch before anything is stored, counted or de-duplicated:

* **Admission** (:meth:`TelemetryGate.admit`). Each launch gets a random per-job secret
  (:func:`new_secret`, made by the scheduler and handed to the Ray job in its environment,
  ``GRADWIRE_TELEMETRY_TOKEN``); the job store keeps only its SHA-256 digest. A worker sends the
  secret as gRPC metadata (``gradwire-telemetry-token``) on every call. A report is admitted only
  when its job is *open* — STARTING, RUNNING or RESTARTING — and the caller's secret hashes to
  that job's digest (compared with :func:`hmac.compare_digest`). The open jobs live in memory
  (fed by a job-store listener, loaded again by a restarted coordinator from the stored digests),
  so a report for an unknown or finished job costs one dictionary lookup and leaves nothing
  behind.
* **Bounds** (:meth:`TelemetryGate.screen`), for reports of admitted jobs (a buggy or
  compromised worker of the job itself):

  - ``rank`` below the spec's ``workers.count``; ``step`` at most the spec's ``steps`` (jobs given
    in ``epochs``: :attr:`TelemetryBounds.max_step`);
  - ``wall_time`` (when sent) no earlier than the job's submission and no later than now, both
    with :attr:`TelemetryBounds.max_clock_skew_s` of slack: a report from the far future would
    otherwise make the sink's de-duplication drop every later genuine report of its rank;
  - ``bytes_sent`` and ``bytes_uncompressed`` (cumulative per rank) at most
    ``(step + 1) × max_bytes_per_step``; over the rank's previous stored report they never go
    down while the step goes up, grow by at most ``max_bytes_per_step`` per step, and never go
    up while the step goes back (a restore from an older checkpoint lowers both). The coordinator
    does not build the model, so it does not know its size: ``max_bytes_per_step`` is a fixed,
    generous ceiling (64 GiB by default: a 16-billion-parameter float32 gradient), configurable
    with ``GRADWIRE_TELEMETRY_MAX_BYTES_PER_STEP``;
  - the ``compressor`` label is the job's own (its spec's ``compression.name``, or
    ``onebit_adam:<compressor>`` when its optimizer compresses its own steps): the report's
    field is overwritten, so no report can invent a label value. A job whose spec says ``auto``
    reports its current choice as ``auto:<choice>``; that is kept when ``<choice>`` is a short
    lower-case token (:data:`AUTO_CHOICE`) and the job has used fewer than
    :attr:`TelemetryBounds.max_compressor_labels` such labels (else it becomes plain ``auto``);
  - ``attempt`` (the worker group's restore count) at most :attr:`TelemetryBounds.max_attempt`.

  A report that breaks a bound is dropped as ``invalid``; the others of its batch go on.
* **Commit** (:meth:`TelemetryGate.commit`): the per-rank state the byte bounds compare against
  moves only for reports the coordinator actually stored.

Memory: one small entry per open job and one per rank of it (ranks are below ``workers.count``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.records import JobPoint, JobRecord
from gradwire.server.states import JobState
from gradwire.spec import onebit_adam_label

log = logging.getLogger(__name__)

__all__ = [
    "ACCEPTING",
    "REFUSED_UNAUTHENTICATED",
    "REFUSED_UNKNOWN_JOB",
    "TelemetryBounds",
    "TelemetryGate",
    "new_secret",
    "secret_digest",
    "token_digest",
]

#: The states in which a job's workers may report.
ACCEPTING = frozenset({JobState.STARTING, JobState.RUNNING, JobState.RESTARTING})
#: :meth:`TelemetryGate.admit` answers (they are also the sink's drop reasons).
REFUSED_UNKNOWN_JOB = "unknown_job"
REFUSED_UNAUTHENTICATED = "unauthenticated"

GIB = 1 << 30
#: what may follow ``auto:`` in the compressor label of a job whose spec says ``auto``
AUTO_CHOICE = re.compile(r"[a-z0-9][a-z0-9._%+-]{0,47}")


def new_secret() -> str:
    """A fresh per-launch telemetry secret (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_digest(secret: str) -> bytes:
    """SHA-256 of a secret. The secrets are random, so a plain hash is enough to store."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def secret_digest(secret: str) -> str:
    """:func:`token_digest` as hex text, what the job store keeps."""
    return token_digest(secret).hex()


@dataclass(frozen=True)
class TelemetryBounds:
    """The limits of :meth:`TelemetryGate.screen` (see the module docstring)."""

    max_bytes_per_step: int = 64 * GIB
    max_clock_skew_s: float = 300.0
    max_step: int = 1 << 32
    max_attempt: int = 1024
    max_compressor_labels: int = 8

    def __post_init__(self) -> None:
        if self.max_bytes_per_step < 1 or self.max_clock_skew_s < 0 or self.max_step < 1:
            raise ValueError("telemetry bounds must be positive")
        if self.max_attempt < 0 or self.max_compressor_labels < 1:
            raise ValueError("max_attempt must be >= 0 and max_compressor_labels >= 1")


@dataclass
class _Rank:
    step: int
    sent: int
    uncompressed: int


@dataclass
class _Job:
    digest: bytes
    compressor: str
    workers: int
    max_step: int
    not_before: float  # unix seconds
    ranks: dict[int, _Rank] = field(default_factory=dict)
    labels: set[str] = field(default_factory=set)  # auto:<choice> labels this job has used


class _Store(Protocol):
    def add_listener(self, listener: Any) -> None: ...
    def remove_listener(self, listener: Any) -> None: ...
    def non_terminal(self) -> list[JobRecord]: ...
    def telemetry_digest(self, job_id: str) -> str | None: ...
    def last_points(self, job_id: str) -> dict[int, JobPoint]: ...


class TelemetryGate:
    """The jobs that accept telemetry now, their secrets' digests and the bounds on their reports.

    Thread-safe. :meth:`attach` connects it to a job store (the coordinator's wiring); tests and
    tools may call :meth:`open` / :meth:`close` directly. ``clock`` is unix seconds.
    """

    def __init__(
        self, bounds: TelemetryBounds | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.bounds = bounds or TelemetryBounds()
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._store: _Store | None = None

    # ---------------------------------------------------------------- which jobs are open

    def open(self, job: JobRecord, digest: str) -> None:
        """Accept ``job``'s telemetry from callers whose secret hashes to ``digest`` (hex)."""
        spec: Mapping[str, Any] = job.spec or {}
        compression = spec.get("compression") or {}
        workers = spec.get("workers") or {}
        steps = spec.get("steps")
        entry = _Job(
            digest=bytes.fromhex(digest),
            compressor=onebit_adam_label(spec.get("optimizer") or {})
            or str(compression.get("name") or "none"),
            workers=max(1, int(workers.get("count") or 1)),
            max_step=int(steps) if isinstance(steps, int) and steps > 0 else self.bounds.max_step,
            not_before=job.created_at.timestamp() - self.bounds.max_clock_skew_s,
        )
        with self._lock:
            self._jobs.setdefault(job.id, entry)

    def close(self, job_id: str) -> None:
        """Refuse ``job_id``'s telemetry from now on and forget its state."""
        with self._lock:
            self._jobs.pop(job_id, None)

    @property
    def open_jobs(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._jobs)

    def remember(self, job_id: str, rank: int, step: int, bytes_sent: int, bytes_uncompressed: int) -> None:
        """Seed a rank's byte bounds with a point stored before this gate existed (a restarted
        coordinator); a rank that already has state is left alone."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.ranks.setdefault(int(rank), _Rank(int(step), int(bytes_sent), int(bytes_uncompressed)))

    # ---------------------------------------------------------------- the job store

    def attach(self, store: _Store) -> None:
        """Follow ``store``: open every launched, unfinished job that has a stored digest (seeding
        its ranks from the stored points), then open and close jobs as they move."""
        self._store = store
        store.add_listener(self.on_transition)
        for job in store.non_terminal():
            if job.state in ACCEPTING and self._open_from_store(job):
                for rank, point in store.last_points(job.id).items():
                    self.remember(job.id, rank, point.step, point.bytes_sent, point.bytes_uncompressed)

    def detach(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            store.remove_listener(self.on_transition)

    def on_transition(
        self, job: JobRecord, from_state: JobState | None, to_state: JobState, reason: str
    ) -> None:
        """Job-store listener: a job entering a launched state opens, a finished one closes."""
        if to_state in ACCEPTING:
            if job.id not in self.open_jobs:
                self._open_from_store(job)
        elif to_state.terminal:
            self.close(job.id)

    def _open_from_store(self, job: JobRecord) -> bool:
        digest = self._store.telemetry_digest(job.id) if self._store is not None else None
        if digest is None:
            log.warning(
                "job %s has no telemetry secret (launched before they existed?): its reports are refused",
                job.id,
            )
            return False
        self.open(job, digest)
        return True

    # ---------------------------------------------------------------- the sink's questions

    def admit(self, job_id: str, caller: bytes | None) -> str | None:
        """``None`` when a caller whose secret hashes to ``caller`` may write ``job_id``'s
        telemetry now; else why not (:data:`REFUSED_UNKNOWN_JOB` for a job that is not open,
        :data:`REFUSED_UNAUTHENTICATED` for a missing or wrong secret). Keeps no state."""
        with self._lock:
            job = self._jobs.get(job_id)
            digest = None if job is None else job.digest
        if digest is None:
            return REFUSED_UNKNOWN_JOB
        if caller is None or not hmac.compare_digest(digest, caller):
            return REFUSED_UNAUTHENTICATED
        return None

    def screen(self, reports: Iterable[pb.StepReport]) -> tuple[list[pb.StepReport], list[str]]:
        """Split admitted reports into those within bounds (their ``compressor`` set to the job's
        own) and the reasons the others break one; reports are judged in order, each against the
        rank's last stored report or the batch's earlier ones."""
        kept: list[pb.StepReport] = []
        why: list[str] = []
        now = self._clock()
        seen: dict[tuple[str, int], _Rank] = {}
        with self._lock:
            for report in reports:
                job = self._jobs.get(report.job_id)
                reason = "job closed" if job is None else self._breaks(job, report, now, seen)
                if reason is not None:
                    why.append(reason)
                    continue
                assert job is not None
                report.compressor = self._label(job, report.compressor)
                seen[(report.job_id, report.rank)] = _Rank(
                    report.step, report.bytes_sent, report.bytes_uncompressed
                )
                kept.append(report)
        return kept, why

    def _label(self, job: _Job, reported: str) -> str:
        """The compressor label a report of ``job`` gets (see the module docstring)."""
        if job.compressor != "auto" or not reported.startswith("auto:"):
            return job.compressor
        if reported in job.labels:
            return reported
        if AUTO_CHOICE.fullmatch(reported[5:]) and len(job.labels) < self.bounds.max_compressor_labels:
            job.labels.add(reported)
            return reported
        return job.compressor

    def _breaks(
        self, job: _Job, r: pb.StepReport, now: float, seen: Mapping[tuple[str, int], _Rank]
    ) -> str | None:
        if r.rank >= job.workers:
            return f"rank {r.rank} outside the job's {job.workers} workers"
        if r.step > job.max_step:
            return f"step {r.step} beyond the job's {job.max_step} steps"
        if r.attempt > self.bounds.max_attempt:
            return f"attempt {r.attempt} above {self.bounds.max_attempt}"
        if r.HasField("wall_time"):
            wall = r.wall_time.seconds + r.wall_time.nanos / 1e9
            if not job.not_before <= wall <= now + self.bounds.max_clock_skew_s:
                return (
                    f"wall_time {wall:.0f} outside [job submission, now] ± {self.bounds.max_clock_skew_s:g} s"
                )
        cap = self.bounds.max_bytes_per_step
        prev = seen.get((r.job_id, r.rank)) or job.ranks.get(r.rank)
        for name, value, before in (
            ("bytes_sent", r.bytes_sent, None if prev is None else prev.sent),
            ("bytes_uncompressed", r.bytes_uncompressed, None if prev is None else prev.uncompressed),
        ):
            if value > (r.step + 1) * cap:
                return f"{name}={value} above (step + 1) × {cap}"
            if prev is None or before is None:
                continue
            if r.step > prev.step and not 0 <= value - before <= (r.step - prev.step) * cap:
                return f"{name} went from {before} at step {prev.step} to {value} at step {r.step}"
            if r.step <= prev.step and value > before:
                return f"{name} grew to {value} while the step went back to {r.step}"
        return None

    def commit(self, reports: Iterable[pb.StepReport]) -> None:
        """Record reports the coordinator stored: the next ones are bounded against them."""
        with self._lock:
            for r in reports:
                job = self._jobs.get(r.job_id)
                if job is not None:
                    job.ranks[r.rank] = _Rank(r.step, r.bytes_sent, r.bytes_uncompressed)
