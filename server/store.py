"""The coordinator's job store: jobs, their state history and their telemetry, in SQL.

:class:`JobStore` is the only code that writes jobs. Every state change goes through
:meth:`JobStore.transition`, which reads the job with its row locked, checks the move with
:func:`gradwire.server.states.check_transition`, and writes the new state together with its
event in one transaction; the change is on disk before the caller acts on it, so a coordinator
that restarts finds every job where it left it. The REST handlers, the scheduler thread and the
gRPC sink threads share one store: each call opens and closes its own session.

Everything returned is a frozen pydantic record (:class:`JobRecord`, :class:`JobEvent`,
:class:`JobPage`, :class:`JobPoint`, defined with the store's errors in
:mod:`gradwire.server.records`), never a live ORM object.

Locking: on SQLite every write transaction starts with ``BEGIN IMMEDIATE``, so writers run one
at a time; elsewhere the job row is read with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import builtins
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.models_db import (
    JobEventRow,
    JobPointRow,
    JobRankRow,
    JobRow,
    JobTelemetryKeyRow,
    append_event,
    insert_point_rows,
    make_engine,
    upsert_rank_rows,
    writer,
)
from gradwire.server.records import (
    IdempotencyConflict,
    JobEvent,
    JobNotFound,
    JobNotTerminal,
    JobPage,
    JobPoint,
    JobRecord,
    RankPlacement,
    StateConflict,
)
from gradwire.server.report_points import report_rows
from gradwire.server.schema import upgrade as upgrade_schema
from gradwire.server.states import INITIAL_STATE, TERMINAL_STATES, JobState, check_transition

__all__ = ["DEFAULT_URL", "JobStore", "Listener", "evenly_spaced", "new_job_id", "utc_now"]

log = logging.getLogger(__name__)

#: Where ``gradwire serve`` keeps its jobs unless told otherwise (relative to the working dir).
DEFAULT_URL = "sqlite:///.gradwire/coordinator.db"

#: Called after a committed state change with (job as now stored, old state, new state, reason).
#: The old state is ``None`` for the submission itself.
Listener = Callable[[JobRecord, JobState | None, JobState, str], None]

#: Columns a transition may set besides the state and its timestamps.
TRANSITION_FIELDS = frozenset({"ray_job_id", "attempt"})
#: Columns a note (an event without a state change) may set.
NOTE_FIELDS = frozenset({"compressor"})

SUBMITTED = "submitted"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return "job-" + secrets.token_hex(6)


class JobStore:
    """Jobs in a SQL database given by a SQLAlchemy URL (a SQLite file by default).

    Safe to share between threads. Pass ``engine`` to share one made by
    :func:`~gradwire.server.models_db.make_engine` (another SQLite engine would lack the
    ``BEGIN IMMEDIATE`` hook); ``clock`` lets tests fix the timestamps.
    """

    def __init__(
        self,
        url: str | URL = DEFAULT_URL,
        *,
        engine: Engine | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._engine = engine if engine is not None else make_engine(url)
        upgrade_schema(self._engine)  # Alembic migrations (gradwire.server.schema); adopts an old database
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        self._write = sessionmaker(writer(self._engine), expire_on_commit=False)
        self._clock = clock
        self._listeners: builtins.list[Listener] = []
        self._listeners_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        """Close the pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- listeners ---------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` after every committed state change, the submission included.

        Listeners run on the thread that made the change, after the commit; an exception in one
        is logged and does not reach the caller, whose change is already stored.
        """
        with self._listeners_lock:
            if listener not in self._listeners:  # adding one twice would count every change twice
                self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; removing one that is not registered does nothing."""
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self, job: JobRecord, from_state: JobState | None, to_state: JobState, reason: str) -> None:
        with self._listeners_lock:
            listeners = builtins.list(self._listeners)
        for listener in listeners:
            try:
                listener(job, from_state, to_state, reason)
            except Exception:
                log.exception("listener %r failed on %s: %s -> %s", listener, job.id, from_state, to_state)

    # --- jobs --------------------------------------------------------------------------------

    def create(
        self,
        spec: Mapping[str, Any] | Any,
        *,
        priority: int = 0,
        idempotency_key: str | None = None,
        owner: str | None = None,
        spec_version: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new QUEUED job; returns ``(job, created)``.

        ``spec`` is the JobSpec as a JSON-ready dict (or a JobSpec). When ``idempotency_key`` was
        used before by the same ``owner``, the job submitted with it is returned with
        ``created=False``, provided the spec is the same; a different spec raises
        :class:`IdempotencyConflict`. ``spec_version`` is the JobSpec schema version the spec was
        validated under (the REST door's), kept so that later readers trust it without validating
        it again. Keys are unique per owner (two owners' equal keys make two
        jobs), so a key needs an owner (``ValueError`` otherwise). Two threads racing with one
        key both get the same job: the unique index on (owner, key) decides, and the loser reads
        the winner's row.
        """
        if idempotency_key is not None and owner is None:
            raise ValueError("an idempotency key is unique per owner: pass the owner with it")
        body = _spec_body(spec)
        for _ in range(5):  # more than one round only if a random id collides
            try:
                with self._write.begin() as session:
                    if idempotency_key is not None:
                        found = self._by_key(session, idempotency_key, owner)
                        if found is not None:
                            return _replay(found, body), False
                    record = self._insert(session, body, priority, idempotency_key, owner, spec_version)
            except IntegrityError:
                if idempotency_key is not None:
                    with self._read() as session:
                        found = self._by_key(session, idempotency_key, owner)
                    if found is not None:
                        return _replay(found, body), False
                continue
            self._notify(record, None, INITIAL_STATE, SUBMITTED)
            return record, True
        raise RuntimeError("could not draw an unused job id in 5 attempts")

    def _insert(
        self,
        session: Session,
        body: dict[str, Any],
        priority: int,
        key: str | None,
        owner: str | None,
        spec_version: int | None,
    ) -> JobRecord:
        now = self._clock()
        row = JobRow(
            id=new_job_id(),
            name=body["name"],
            state=INITIAL_STATE,
            priority=priority,
            spec=body,
            idempotency_key=key,
            owner=owner,
            created_at=now,
            updated_at=now,
            reason=SUBMITTED,
            restarts=0,
            attempt=0,
            spec_version=spec_version,
        )
        session.add(row)
        session.flush()
        append_event(session, row.id, None, INITIAL_STATE, SUBMITTED, now)
        return JobRecord.model_validate(row)

    def find_by_key(self, idempotency_key: str, *, owner: str | None) -> JobRecord | None:
        """The job ``owner`` submitted with ``idempotency_key``, if any."""
        with self._read() as session:
            row = self._by_key(session, idempotency_key, owner)
            return None if row is None else JobRecord.model_validate(row)

    @staticmethod
    def _by_key(session: Session, key: str, owner: str | None) -> JobRow | None:
        query = select(JobRow).where(JobRow.idempotency_key == key, JobRow.owner == owner)
        return session.scalars(query).one_or_none()

    def get(self, job_id: str) -> JobRecord:
        with self._read() as session:
            return JobRecord.model_validate(_row(session, job_id))

    def list(
        self,
        *,
        state: JobState | Iterable[JobState] | None = None,
        name: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        after: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> JobPage:
        """One page of jobs in submission order (``seq``), optionally filtered.

        Page on with ``after=page.next_after`` (a cursor: stable while jobs are added) or with
        ``offset``; not both. ``total`` counts every job that matches the filters.
        """
        if limit < 1 or offset < 0:
            raise ValueError(f"limit must be >= 1 and offset >= 0, got limit={limit}, offset={offset}")
        if after is not None and offset:
            raise ValueError("page with either a cursor (after) or an offset, not both")
        filters = []
        states = _states(state)
        if states is not None:
            filters.append(JobRow.state.in_(sorted(states)))
        if name is not None:
            filters.append(JobRow.name == name)
        if owner is not None:
            filters.append(JobRow.owner == owner)
        query = select(JobRow).where(*filters)
        if after is not None:
            query = query.where(JobRow.seq < after if newest_first else JobRow.seq > after)
        order = JobRow.seq.desc() if newest_first else JobRow.seq
        query = query.order_by(order).offset(offset).limit(limit + 1)
        with self._read() as session:  # one read transaction: the total and the page agree
            total = session.scalar(select(func.count()).select_from(JobRow).where(*filters)) or 0
            rows = session.scalars(query).all()
        items = tuple(JobRecord.model_validate(r) for r in rows[:limit])
        return JobPage(items=items, total=total, next_after=items[-1].seq if len(rows) > limit else None)

    def transition(
        self,
        job_id: str,
        to: JobState,
        reason: str,
        *,
        expect: JobState | Iterable[JobState] | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Move a job to state ``to`` and record why; the only way a job's state changes.

        In one transaction: lock the job row, check that its state is in ``expect`` (when given;
        else :class:`StateConflict`) and that the move is legal (else
        :class:`~gradwire.server.states.IllegalTransition`), write the state, ``reason``,
        ``started_at`` (first RUNNING), ``finished_at`` (terminal states), ``restarts`` (+1 on
        RESTARTING) and ``fields`` (``ray_job_id``, ``attempt``), and append the event.
        Listeners are called after the commit.
        """
        to = JobState(to)
        unknown = set(fields) - TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"transition() cannot set {sorted(unknown)}; it sets {sorted(TRANSITION_FIELDS)}")
        expected = _states(expect)
        with self._write.begin() as session:
            row = _row(session, job_id, lock=True)
            current = row.state
            if expected is not None and current not in expected:
                raise StateConflict(job_id, current, expected)
            check_transition(job_id, current, to)
            now = self._clock()
            row.state, row.reason, row.updated_at = to, reason, now
            if to is JobState.RUNNING and row.started_at is None:
                row.started_at = now
            if to is JobState.RESTARTING:
                row.restarts += 1
            if to in TERMINAL_STATES:
                row.finished_at = now
            for column, value in fields.items():
                setattr(row, column, value)
            append_event(session, job_id, current, to, reason, now)
            session.flush()
            record = JobRecord.model_validate(row)
        self._notify(record, current, to, reason)
        return record

    def note(self, job_id: str, reason: str, **fields: Any) -> JobRecord:
        """Record an event that changes no state (``from_state == to_state``), e.g. the compressor
        in use changing, and set ``fields`` (only ``compressor``) in the same transaction.
        Listeners are not called: nothing moved. Raises :class:`JobNotFound`."""
        unknown = set(fields) - NOTE_FIELDS
        if unknown:
            raise TypeError(f"note() cannot set {sorted(unknown)}; it sets {sorted(NOTE_FIELDS)}")
        with self._write.begin() as session:
            row = _row(session, job_id, lock=True)
            now = self._clock()
            for column, value in fields.items():
                setattr(row, column, value)
            row.updated_at = now
            append_event(session, job_id, row.state, row.state, reason, now)
            session.flush()
            return JobRecord.model_validate(row)

    def set_fields(self, job_id: str, **fields: Any) -> JobRecord:
        """Set note fields (``compressor``) without an event: a job's first value. Raises
        :class:`JobNotFound`."""
        unknown = set(fields) - NOTE_FIELDS
        if unknown:
            raise TypeError(f"set_fields() cannot set {sorted(unknown)}; it sets {sorted(NOTE_FIELDS)}")
        with self._write.begin() as session:
            row = _row(session, job_id, lock=True)
            for column, value in fields.items():
                setattr(row, column, value)
            session.flush()
            return JobRecord.model_validate(row)

    def events(self, job_id: str) -> builtins.list[JobEvent]:
        """The job's state history, oldest first (the submission is the first event)."""
        with self._read() as session:
            _row(session, job_id)
            rows = session.scalars(
                select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.seq)
            ).all()
            return [JobEvent.model_validate(r) for r in rows]

    def delete(self, job_id: str) -> None:
        """Remove a finished job with its events and points; raises :class:`JobNotTerminal` otherwise."""
        with self._write.begin() as session:
            row = _row(session, job_id, lock=True)
            if row.state not in TERMINAL_STATES:
                raise JobNotTerminal(job_id, row.state)
            session.execute(delete(JobPointRow).where(JobPointRow.job_id == job_id))
            session.execute(delete(JobTelemetryKeyRow).where(JobTelemetryKeyRow.job_id == job_id))
            session.execute(delete(JobRankRow).where(JobRankRow.job_id == job_id))
            session.execute(delete(JobEventRow).where(JobEventRow.job_id == job_id))
            session.delete(row)

    def non_terminal(self) -> builtins.list[JobRecord]:
        """Every job not yet finished, in submission order: what start-up reconciles with Ray."""
        with self._read() as session:
            rows = session.scalars(
                select(JobRow).where(JobRow.state.not_in(sorted(TERMINAL_STATES))).order_by(JobRow.seq)
            ).all()
            return [JobRecord.model_validate(r) for r in rows]

    def next_queued(self) -> JobRecord | None:
        """The queued job to admit next: highest priority first, then first submitted."""
        with self._read() as session:
            row = session.scalars(
                select(JobRow)
                .where(JobRow.state == JobState.QUEUED)
                .order_by(JobRow.priority.desc(), JobRow.seq)
                .limit(1)
            ).first()
            return None if row is None else JobRecord.model_validate(row)

    def counts_by_state(self) -> dict[JobState, int]:
        """Jobs per state, every state present (zero when none)."""
        counts = dict.fromkeys(JobState, 0)
        with self._read() as session:
            for state, count in session.execute(select(JobRow.state, func.count()).group_by(JobRow.state)):
                counts[JobState(state)] = count
        return counts

    # --- telemetry secrets -------------------------------------------------------------------

    def set_telemetry_digest(self, job_id: str, digest: str) -> None:
        """Keep the digest (hex SHA-256) of the secret ``job_id``'s workers send with their
        telemetry, replacing the one of an earlier launch. Raises :class:`JobNotFound`."""
        with self._write.begin() as session:
            _row(session, job_id, lock=True)
            session.execute(delete(JobTelemetryKeyRow).where(JobTelemetryKeyRow.job_id == job_id))
            session.add(JobTelemetryKeyRow(job_id=job_id, digest=digest))

    def telemetry_digest(self, job_id: str) -> str | None:
        """The digest :meth:`set_telemetry_digest` kept, or ``None`` (never launched, or unknown)."""
        with self._read() as session:
            return session.scalar(
                select(JobTelemetryKeyRow.digest).where(JobTelemetryKeyRow.job_id == job_id)
            )

    # --- telemetry points --------------------------------------------------------------------

    def add_points(self, job_id: str, points: Iterable[Mapping[str, Any] | JobPoint]) -> int:
        """Store telemetry points; returns how many were new.

        A point whose (rank, step) the job already has is skipped, so a report delivered twice
        is stored once. Raises :class:`JobNotFound` for an unknown (or deleted) job.
        """
        unique: dict[tuple[int, int], JobPoint] = {}
        for raw in points:
            point = raw if isinstance(raw, JobPoint) else JobPoint.model_validate(raw)
            unique.setdefault((point.rank, point.step), point)
        with self._write.begin() as session:
            _row(session, job_id)
            if not unique:
                return 0
            values = [{"job_id": job_id, **p.model_dump()} for p in unique.values()]
            return len(insert_point_rows(session, values))

    def add_reports(self, reports: Iterable[pb.StepReport]) -> dict[str, int]:
        """Store the points of StepReports of any jobs in one transaction (the telemetry sink's
        batches); returns, for each job that exists, how many of its points were new. Reports of
        unknown (or deleted) jobs are left out; like :meth:`add_points`, a (rank, step) the job
        already has is skipped. One insert statement for all the rows."""
        by_job = report_rows(reports)
        if not by_job:
            return {}
        with self._write.begin() as session:
            known = set(session.scalars(select(JobRow.id).where(JobRow.id.in_(sorted(by_job)))))
            rows = [row for job_id, job_rows in by_job.items() if job_id in known for row in job_rows]
            added = dict.fromkeys(known, 0)
            for job_id in insert_point_rows(session, rows):
                added[job_id] += 1
        return added

    def set_placement(self, job_id: str, ranks: Iterable[tuple[int, int, str, int]]) -> None:
        """Keep where ranks of ``job_id`` run now: ``(rank, attempt, node_address, since_step)`` per
        rank, replacing what each had. Raises :class:`JobNotFound` for an unknown job."""
        now = self._clock()
        rows = [
            {"job_id": job_id, "rank": int(rank), "attempt": int(attempt), "node_address": str(node),
             "since_step": int(step), "at": now}
            for rank, attempt, node, step in ranks
        ]  # fmt: skip
        with self._write.begin() as session:
            _row(session, job_id)
            upsert_rank_rows(session, rows)

    def placement(self, job_id: str) -> builtins.list[RankPlacement]:
        """Where each rank of the job reported from last, by rank (``[]`` before any report).
        Raises :class:`JobNotFound` for an unknown job."""
        with self._read() as session:
            _row(session, job_id)
            rows = session.scalars(
                select(JobRankRow).where(JobRankRow.job_id == job_id).order_by(JobRankRow.rank)
            ).all()
            return [RankPlacement.model_validate(r) for r in rows]

    def last_points(self, job_id: str) -> dict[int, JobPoint]:
        """Each rank's point with the highest step (``{}`` before any telemetry): where the job's
        stored telemetry stands, which a restarted coordinator's sink needs to recognise reports
        its workers re-send. Raises :class:`JobNotFound` for an unknown job."""
        top = (
            select(JobPointRow.rank, func.max(JobPointRow.step).label("step"))
            .where(JobPointRow.job_id == job_id)
            .group_by(JobPointRow.rank)
            .subquery()
        )
        query = (
            select(JobPointRow)
            .join(top, (JobPointRow.rank == top.c.rank) & (JobPointRow.step == top.c.step))
            .where(JobPointRow.job_id == job_id)
        )
        with self._read() as session:
            _row(session, job_id)
            return {row.rank: JobPoint.model_validate(row) for row in session.scalars(query)}

    def points(
        self, job_id: str, *, rank: int | None = None, max_points: int | None = None
    ) -> builtins.list[JobPoint]:
        """The job's points in step order (then rank), optionally for one rank only.

        With ``max_points`` and more points than that, returns exactly ``max_points`` of them,
        picked at evenly spaced positions of the ordered series: the first and the last point
        are always kept, and each kept point is a real report (no averaging, so counters such as
        ``bytes_sent`` stay exact per step). Give ``rank`` to thin one rank's curve.
        """
        if max_points is not None and max_points < 2:
            raise ValueError(f"max_points must be at least 2 (the first and last point), got {max_points}")
        filters = [JobPointRow.job_id == job_id]
        if rank is not None:
            filters.append(JobPointRow.rank == rank)
        order = (JobPointRow.step, JobPointRow.rank)
        with self._read() as session:
            _row(session, job_id)
            query = select(JobPointRow).where(*filters).order_by(*order)
            if max_points is not None:
                count = session.scalar(select(func.count()).select_from(JobPointRow).where(*filters)) or 0
                if count > max_points:
                    position = func.row_number().over(order_by=order).label("position")
                    numbered = select(JobPointRow.id, position).where(*filters).subquery()
                    wanted = [i + 1 for i in evenly_spaced(count, max_points)]
                    query = query.join(numbered, numbered.c.id == JobPointRow.id).where(
                        numbered.c.position.in_(wanted)
                    )
            return [JobPoint.model_validate(r) for r in session.scalars(query)]


# --- helpers -----------------------------------------------------------------------------------


def evenly_spaced(n: int, m: int) -> builtins.list[int]:
    """``m`` distinct indices into ``range(n)`` (``2 <= m <= n``), spread evenly, first and last kept."""
    return [(2 * i * (n - 1) + (m - 1)) // (2 * (m - 1)) for i in range(m)]  # round(i·(n-1)/(m-1))


def _spec_body(spec: Mapping[str, Any] | Any) -> dict[str, Any]:
    if hasattr(spec, "model_dump"):  # a JobSpec; the store itself does not need to import it
        spec = spec.model_dump(mode="json")
    body = json.loads(json.dumps(spec))  # a detached copy, and proof that it is JSON
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        raise ValueError("a job spec must be a JSON object with a non-empty string 'name'")
    return body


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _replay(row: JobRow, body: dict[str, Any]) -> JobRecord:
    """The job an idempotency key already made, if the spec matches."""
    if _canonical(row.spec) != _canonical(body):
        raise IdempotencyConflict(row.idempotency_key or "", row.id)
    return JobRecord.model_validate(row)


def _states(value: JobState | Iterable[JobState] | None) -> frozenset[JobState] | None:
    if value is None:
        return None
    if isinstance(value, (str, JobState)):
        return frozenset({JobState(value)})
    return frozenset(JobState(s) for s in value)


def _row(session: Session, job_id: str, *, lock: bool = False) -> JobRow:
    query = select(JobRow).where(JobRow.id == job_id)
    if lock:
        query = query.with_for_update()  # rendered where supported; SQLite relies on BEGIN IMMEDIATE
    row = session.scalars(query).one_or_none()
    if row is None:
        raise JobNotFound(job_id)
    return row
