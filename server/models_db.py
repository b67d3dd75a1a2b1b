"""The job store's tables (SQLAlchemy 2 typed ORM) and how the database engine is opened.

Only :mod:`gradwire.server.store` touches the ``*Row`` classes; it hands everyone else the
frozen records of :mod:`gradwire.server.records`, so no live ORM object leaves a session.

Tables:

- ``jobs``: one row per submitted job. ``seq`` is the primary key, an integer that only grows
  (SQLite ``AUTOINCREMENT``, so a deleted job's number is never reused); it is the FIFO and
  listing order. ``id`` is the public id (``job-`` + 12 hex digits). ``owner`` is the name of
  the principal that submitted it (server/principals.py; NULL for jobs stored before owners were
  recorded); an ``idempotency_key`` is unique per owner (``uq_jobs_owner_idempotency_key``, since
  schema version 2; version 1 had the key unique on its own).
- ``job_events``: the state history, one row per transition (the submission included), numbered
  per job from 1.
- ``job_points``: the telemetry time series, one row per (job, rank, step); the unique key lets
  the at-least-once gRPC sink store a report twice without duplicating it.
- ``job_ranks``: where each rank of a job runs now, one row per (job, rank): the node's address
  and the worker-group attempt it reported last (since schema revision 0004), for the job's
  placement in the API.
- ``job_telemetry_keys``: per launched job, the SHA-256 digest (hex) of the secret its workers
  send with their telemetry (never the secret itself). A table of its own, so the digest is
  never part of a job record or an API response.
- ``gradwire_schema``: a single row holding :data:`SCHEMA_VERSION`.

Schema changes: the tables are made and changed by the Alembic migrations of
:mod:`gradwire.server.schema` (``server/migrations/versions/``), run when a store opens and by
``gradwire db upgrade``; a change here needs a new revision there (a test compares the newest
revision with these models). ``gradwire_schema`` is what the release before migrations read: it
holds 1 there and 2 from migration 0002 on, so that release refuses a migrated database.

SQLite (the default): every connection turns on foreign keys and WAL journaling (readers do
not block the writer) with ``synchronous=NORMAL``: a committed transaction survives a crash of
the coordinator process; only a power loss can undo the last few commits. SQLAlchemy emits
``BEGIN`` itself, so that the store can ask for ``BEGIN IMMEDIATE`` on write transactions
(:data:`BEGIN_OPTION`): two writers then queue on the database lock up front instead of both
reading a row and one failing on upgrade to a write lock.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Engine,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from gradwire.server.states import JobState

#: What ``gradwire_schema`` holds: 1 in the release before migrations (which reads only 1), 2 once
#: Alembic manages the schema (migration 0002; the revision itself is in ``alembic_version``).
SCHEMA_VERSION = 2

#: Execution option read by the SQLite ``begin`` hook: ``"IMMEDIATE"`` takes the write lock at
#: ``BEGIN``; anything else (the default) starts a deferred, read-first transaction.
BEGIN_OPTION = "gradwire_sqlite_begin"

#: 64-bit on PostgreSQL and friends; plain INTEGER on SQLite, where only ``INTEGER PRIMARY KEY``
#: is an auto-incrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class SchemaMismatch(RuntimeError):
    """The database was written by a different version of the job store's schema."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes in and out, whatever the database keeps.

    SQLite has no time zones, so values are stored as naive UTC there and marked UTC on the way
    back; naive datetimes are refused on the way in rather than silently taken as local time.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the job store keeps UTC times only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Stored as a plain string column (no database enum type, no CHECK constraint), so adding a
# state later needs no schema change; values are checked in Python on the way in and out.
StateColumn = Enum(JobState, native_enum=False, create_constraint=False, length=32, validate_strings=True)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        JobState: StateColumn,
    }


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_queue", "state", "priority", "seq"),
        Index("ix_jobs_name", "name", "seq"),
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    state: Mapped[JobState]
    priority: Mapped[int] = mapped_column(default=0)
    spec: Mapped[dict[str, Any]]
    idempotency_key: Mapped[str | None] = mapped_column(String(256))  # unique per owner: __table_args__
    owner: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    ray_job_id: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    restarts: Mapped[int] = mapped_column(default=0)
    # since revision 0004: the worker-group attempt last seen (Ray Train's restores), the compressor
    # rank 0 reported last, and the JobSpec schema version the spec was validated under (NULL: before)
    attempt: Mapped[int] = mapped_column(default=0)
    compressor: Mapped[str | None] = mapped_column(String(128))
    spec_version: Mapped[int | None]


class JobEventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    from_state: Mapped[JobState | None]
    to_state: Mapped[JobState]
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime]


class JobPointRow(Base):
    __tablename__ = "job_points"
    __table_args__ = (UniqueConstraint("job_id", "rank", "step", name="uq_job_points_job_rank_step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    rank: Mapped[int]
    step: Mapped[int] = mapped_column(BigInteger)
    wall_time: Mapped[float] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float)
    compute_s: Mapped[float] = mapped_column(Float, default=0.0)
    compress_s: Mapped[float] = mapped_column(Float, default=0.0)
    communicate_s: Mapped[float] = mapped_column(Float, default=0.0)
    wait_s: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_uncompressed: Mapped[int] = mapped_column(BigInteger, default=0)
    stragglers: Mapped[int] = mapped_column(default=0)


class JobRankRow(Base):
    __tablename__ = "job_ranks"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    rank: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    attempt: Mapped[int] = mapped_column(default=0)
    node_address: Mapped[str] = mapped_column(String(64), default="")
    since_step: Mapped[int] = mapped_column(BigInteger, default=0)
    at: Mapped[datetime]


class JobTelemetryKeyRow(Base):
    __tablename__ = "job_telemetry_keys"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    digest: Mapped[str] = mapped_column(String(64))


class SchemaVersionRow(Base):
    __tablename__ = "gradwire_schema"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int]


#: Columns of ``job_points`` that a telemetry point carries (everything but the keys).
POINT_FIELDS = tuple(c.name for c in JobPointRow.__table__.columns if c.name not in ("id", "job_id"))


# --- engine and schema ------------------------------------------------------------------------


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for ``url``; SQLite gets the set-up described in the module docstring.

    A SQLite file's folder is created if missing. An in-memory SQLite URL (``sqlite://``) shares
    one connection between all users, so it suits single-threaded tests only; use a file
    whenever several threads write.
    """
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, echo=echo, pool_pre_ping=True)
    database = url.database or ""
    in_memory = database in ("", ":memory:") or url.query.get("mode") == "memory"
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30.0}}
    if in_memory:
        kwargs["poolclass"] = StaticPool
    elif not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, echo=echo, **kwargs)
    _configure_sqlite(engine, wal=not in_memory)
    return engine


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver stops issuing BEGIN; _on_begin does it
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(BEGIN_OPTION) == "IMMEDIATE"
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _switch_to_wal(cursor: Any, timeout_s: float = 30.0) -> None:
    """WAL mode for a file database. Switching takes SQLite's exclusive lock and does not wait in
    the busy handler, so several processes opening a new file at once (coordinators starting
    together) retry here, as the busy timeout would, instead of failing "database is locked"."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) whose transactions take the SQLite write lock at BEGIN."""
    return engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})


def append_event(
    session: Session, job_id: str, from_state: JobState | None, to_state: JobState, reason: str, at: datetime
) -> None:
    """Add a job's next history entry (numbered from 1); the caller holds the job's row lock."""
    if from_state is None:  # the submission: a new job's first event
        seq = 1
    else:
        seq = 1 + (session.scalar(select(func.max(JobEventRow.seq)).where(JobEventRow.job_id == job_id)) or 0)
    session.add(
        JobEventRow(job_id=job_id, seq=seq, from_state=from_state, to_state=to_state, reason=reason, at=at)
    )


def insert_point_rows(session: Session, rows: list[dict[str, Any]]) -> list[str]:
    """Insert ``job_points`` rows of any jobs (each row names its ``job_id``; one row per
    (job, rank, step) in ``rows``), skipping the keys already stored; returns the ``job_id`` of
    each row that went in. On SQLite and PostgreSQL this is one ``INSERT ... ON CONFLICT DO
    NOTHING ... RETURNING`` over all the rows (batched into multi-row statements by SQLAlchemy)."""
    if not rows:
        return []
    table = JobPointRow.__table__
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        make_insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        statement = (
            make_insert(table)
            .on_conflict_do_nothing(index_elements=["job_id", "rank", "step"])
            .returning(table.c.job_id)
        )
        return list(session.execute(statement, rows).scalars())
    # Other databases: leave out the keys already stored. Two writers adding the same new point
    # at the same moment can still collide here; the caller then sees an IntegrityError.
    by_job: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_job.setdefault(row["job_id"], []).append(row)
    added: list[str] = []
    for job_id, values in by_job.items():
        keys = [(v["rank"], v["step"]) for v in values]
        known = select(JobPointRow.rank, JobPointRow.step).where(
            JobPointRow.job_id == job_id, tuple_(JobPointRow.rank, JobPointRow.step).in_(keys)
        )
        stored = set(session.execute(known).tuples())
        fresh = [v for v in values if (v["rank"], v["step"]) not in stored]
        if fresh:
            session.execute(insert(table), fresh)
        added += [job_id] * len(fresh)
    return added


def upsert_rank_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Write ``job_ranks`` rows (each names ``job_id`` and ``rank``), replacing what a (job, rank)
    had: one ``INSERT ... ON CONFLICT DO UPDATE`` on SQLite and PostgreSQL, a merge elsewhere."""
    if not rows:
        return
    table = JobRankRow.__table__
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        make_insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        statement = make_insert(table)
        updated = {c: statement.excluded[c] for c in ("attempt", "node_address", "since_step", "at")}
        session.execute(
            statement.on_conflict_do_update(index_elements=["job_id", "rank"], set_=updated), rows
        )
        return
    for row in rows:
        session.merge(JobRankRow(**row))
