"""The job store's Alembic migrations, on SQLite and on a real PostgreSQL server (``store_url``).

- the newest revision makes exactly the tables of :mod:`gradwire.server.models_db` (Alembic's
  autogenerate finds no difference), from an empty database and from an adopted one;
- a database made by the release before migrations (its own DDL below, written by its
  ``create_all`` at commit fc0df84, plus its ``gradwire_schema`` row) is adopted: every job, event
  and point survives the upgrade unchanged, new jobs keep numbering after the old ones, and the
  release before refuses the migrated database (``gradwire_schema`` holds 2);
- what cannot be adopted is refused; coordinators starting together upgrade once;
- ``gradwire db upgrade`` does the same from the command line.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, Table, delete, insert, inspect, select, text
from typer.testing import CliRunner

from gradwire.server.models_db import SCHEMA_VERSION, Base, SchemaMismatch, make_engine
from gradwire.server.schema import LEGACY_REVISION, alembic_config, current_revision, head_revision, upgrade
from gradwire.server.states import JobState
from gradwire.server.store import JobStore

# The previous release's tables exactly as its Base.metadata.create_all made them (SQLAlchemy's
# DDL for each dialect), then what its init_schema wrote. Frozen: this is the database to adopt.
LEGACY_DDL = {
    "sqlite": [
        """CREATE TABLE gradwire_schema (
            id INTEGER NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (id))""",
        """CREATE TABLE jobs (
            seq INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT, id VARCHAR(32) NOT NULL,
            name VARCHAR(128) NOT NULL, state VARCHAR(32) NOT NULL, priority INTEGER NOT NULL,
            spec JSON NOT NULL, idempotency_key VARCHAR(256), owner VARCHAR(128),
            created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL, started_at DATETIME,
            finished_at DATETIME, ray_job_id VARCHAR(128), reason TEXT NOT NULL,
            restarts INTEGER NOT NULL, UNIQUE (id), UNIQUE (idempotency_key))""",
        "CREATE INDEX ix_jobs_name ON jobs (name, seq)",
        "CREATE INDEX ix_jobs_queue ON jobs (state, priority, seq)",
        """CREATE TABLE job_events (
            id INTEGER NOT NULL, job_id VARCHAR(32) NOT NULL, seq INTEGER NOT NULL,
            from_state VARCHAR(32), to_state VARCHAR(32) NOT NULL, reason TEXT NOT NULL,
            at DATETIME NOT NULL, PRIMARY KEY (id),
            CONSTRAINT uq_job_events_job_seq UNIQUE (job_id, seq),
            FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)""",
        """CREATE TABLE job_points (
            id INTEGER NOT NULL, job_id VARCHAR(32) NOT NULL, rank INTEGER NOT NULL,
            step BIGINT NOT NULL, wall_time FLOAT NOT NULL, loss FLOAT, accuracy FLOAT,
            compute_s FLOAT NOT NULL, compress_s FLOAT NOT NULL, communicate_s FLOAT NOT NULL,
            wait_s FLOAT NOT NULL, bytes_sent BIGINT NOT NULL, bytes_uncompressed BIGINT NOT NULL,
            stragglers INTEGER NOT NULL, PRIMARY KEY (id),
            CONSTRAINT uq_job_points_job_rank_step UNIQUE (job_id, rank, step),
            FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)""",
    ],
    "postgresql": [
        """CREATE TABLE gradwire_schema (
            id SERIAL NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (id))""",
        """CREATE TABLE jobs (
            seq BIGSERIAL NOT NULL, id VARCHAR(32) NOT NULL, name VARCHAR(128) NOT NULL,
            state VARCHAR(32) NOT NULL, priority INTEGER NOT NULL, spec JSON NOT NULL,
            idempotency_key VARCHAR(256), owner VARCHAR(128),
            created_at TIMESTAMP WITH TIME ZONE NOT NULL, updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
            started_at TIMESTAMP WITH TIME ZONE, finished_at TIMESTAMP WITH TIME ZONE,
            ray_job_id VARCHAR(128), reason TEXT NOT NULL, restarts INTEGER NOT NULL,
            PRIMARY KEY (seq), UNIQUE (id), UNIQUE (idempotency_key))""",
        "CREATE INDEX ix_jobs_name ON jobs (name, seq)",
        "CREATE INDEX ix_jobs_queue ON jobs (state, priority, seq)",
        """CREATE TABLE job_events (
            id BIGSERIAL NOT NULL, job_id VARCHAR(32) NOT NULL, seq INTEGER NOT NULL,
            from_state VARCHAR(32), to_state VARCHAR(32) NOT NULL, reason TEXT NOT NULL,
            at TIMESTAMP WITH TIME ZONE NOT NULL, PRIMARY KEY (id),
            CONSTRAINT uq_job_events_job_seq UNIQUE (job_id, seq),
            FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)""",
        """CREATE TABLE job_points (
            id BIGSERIAL NOT NULL, job_id VARCHAR(32) NOT NULL, rank INTEGER NOT NULL,
            step BIGINT NOT NULL, wall_time FLOAT NOT NULL, loss FLOAT, accuracy FLOAT,
            compute_s FLOAT NOT NULL, compress_s FLOAT NOT NULL, communicate_s FLOAT NOT NULL,
            wait_s FLOAT NOT NULL, bytes_sent BIGINT NOT NULL, bytes_uncompressed BIGINT NOT NULL,
            stragglers INTEGER NOT NULL, PRIMARY KEY (id),
            CONSTRAINT uq_job_points_job_rank_step UNIQUE (job_id, rank, step),
            FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)""",
    ],
}
LEGACY_INIT = "INSERT INTO gradwire_schema (id, version) VALUES (1, 1)"
# what a development build between the releases added with create_all (still version 1)
DEV_BUILD_DDL = """CREATE TABLE job_telemetry_keys (
    job_id VARCHAR(32) NOT NULL, digest VARCHAR(64) NOT NULL, PRIMARY KEY (job_id),
    FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)"""

JOBS = 40
TIMES = ("created_at", "updated_at", "started_at", "finished_at")
COLUMNS = ("seq", "name", "priority", "spec", "idempotency_key", "owner", *TIMES, "ray_job_id", "reason")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
PATHS = [  # the states a legacy job went through, first to last
    ["QUEUED"],
    ["QUEUED", "CANCELLED"],
    ["QUEUED", "STARTING"],
    ["QUEUED", "STARTING", "RUNNING"],
    ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "RUNNING"],
    ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"],
    ["QUEUED", "STARTING", "FAILED"],
]


@pytest.fixture
def engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def utc(engine: Engine, when: datetime | None) -> datetime | None:
    """As the release before wrote a time: naive UTC on SQLite, aware elsewhere."""
    if when is None or engine.dialect.name != "sqlite":
        return when
    return when.replace(tzinfo=None)


def make_legacy_database(engine: Engine, *, dev_build: bool = False) -> dict[str, dict[str, Any]]:
    """A database as the release before migrations left it, with jobs in every state, their
    events and points, idempotency keys with and without owners, and a deleted last job; returns
    what each kept job must read back as."""
    with engine.begin() as connection:
        for statement in LEGACY_DDL[engine.dialect.name]:
            connection.exec_driver_sql(statement)
        if dev_build:
            connection.exec_driver_sql(DEV_BUILD_DDL)
        connection.exec_driver_sql(LEGACY_INIT)
        tables = MetaData()
        jobs, events, points = (
            Table(name, tables, autoload_with=connection) for name in ("jobs", "job_events", "job_points")
        )
        expected: dict[str, dict[str, Any]] = {}
        for n in range(JOBS + 1):
            path = PATHS[n % len(PATHS)]
            created = T0 + timedelta(minutes=n)
            updated = created + timedelta(seconds=len(path) - 1)
            started = created + timedelta(seconds=path.index("RUNNING")) if "RUNNING" in path else None
            finished = updated if path[-1] in ("CANCELLED", "SUCCEEDED", "FAILED") else None
            job = {
                "id": f"job-{n:012x}",
                "name": f"legacy-{n}",
                "state": path[-1],
                "priority": n % 3,
                "spec": {"name": f"legacy-{n}", "steps": 10 + n, "nested": {"list": [1, 2.5, "x"]}},
                "idempotency_key": f"key-{n}" if n % 4 == 0 else None,
                "owner": ("alice", "bob", None)[n % 3],
                "created_at": created,
                "updated_at": updated,
                "started_at": started,
                "finished_at": finished,
                "ray_job_id": f"raysubmit_{n}" if len(path) > 2 else None,
                "reason": f"why {n}",
                "restarts": path.count("RESTARTING"),
            }
            times = {k: utc(engine, job[k]) for k in TIMES}
            connection.execute(insert(jobs).values({**job, **times}))
            job["seq"] = connection.execute(select(jobs.c.seq).where(jobs.c.id == job["id"])).scalar_one()
            job["events"] = [(None if i == 0 else path[i - 1], state) for i, state in enumerate(path)]
            for i, (src, dst) in enumerate(job["events"]):
                at = utc(engine, created + timedelta(seconds=i))
                connection.execute(
                    insert(events).values(
                        job_id=job["id"], seq=i + 1, from_state=src, to_state=dst, reason=f"to {dst}", at=at
                    )
                )
            job["points"] = []
            if "RUNNING" in path:
                for step in range(n % 5 + 1):
                    for rank in range(2):
                        point = {
                            "rank": rank, "step": step, "wall_time": 1.7e9 + step, "loss": 1 / (step + 1),
                            "accuracy": None if step % 2 else 0.5, "compute_s": 0.1, "compress_s": 0.01,
                            "communicate_s": 0.2, "wait_s": 0.0, "bytes_sent": 5 * 2**40 + step,
                            "bytes_uncompressed": 2**45, "stragglers": rank,
                        }  # fmt: skip
                        connection.execute(insert(points).values(job_id=job["id"], **point))
                        job["points"].append(point)
            expected[job["id"]] = job
        if dev_build:
            keys = Table("job_telemetry_keys", tables, autoload_with=connection)
            connection.execute(insert(keys).values(job_id="job-000000000003", digest="ab" * 32))
        # the last job was deleted (as JobStore.delete did): its number must never come back
        last = f"job-{JOBS:012x}"
        for table in (points, events):
            connection.execute(delete(table).where(table.c.job_id == last))
        connection.execute(delete(jobs).where(jobs.c.id == last))
        expected.pop(last)
    return expected


@pytest.mark.parametrize("dev_build", [False, True], ids=["previous-release", "dev-build"])
def test_upgrade_from_the_previous_release_keeps_every_job(store_url: str, engine: Engine, dev_build: bool):
    expected = make_legacy_database(engine, dev_build=dev_build)
    deleted_seq = max(job["seq"] for job in expected.values()) + 1
    assert current_revision(engine) is None

    store = JobStore(store_url)  # a coordinator of this release starts on it
    try:
        assert current_revision(store.engine) == head_revision()
        listed = [job for job in store.list(limit=1000).items]
        assert [job.id for job in listed] == sorted(expected, key=lambda i: expected[i]["seq"])
        for job in listed:
            want = expected[job.id]
            got = job.model_dump()
            for column in (*COLUMNS, "restarts"):
                assert got[column] == want[column], (job.id, column)
            assert job.state is JobState(want["state"])
            events = store.events(job.id)
            assert [(e.from_state, e.to_state) for e in events] == [
                (None if s is None else JobState(s), JobState(d)) for s, d in want["events"]
            ]
            assert [e.at for e in events] == [
                want["created_at"] + timedelta(seconds=i) for i in range(len(events))
            ]
            assert [p.model_dump() for p in store.points(job.id)] == sorted(
                want["points"], key=lambda p: (p["step"], p["rank"])
            )
            # 0004: no attempt, compressor, placement or schema version was known before
            assert (job.attempt, job.compressor, job.spec_version) == (0, None, None)
            assert store.placement(job.id) == []
        if dev_build:
            assert store.telemetry_digest("job-000000000003") == "ab" * 32
        # keys: an owner's key replays its job; owners now have keys of their own
        keyed = next(j for j in expected.values() if j["idempotency_key"] and j["owner"] == "alice")
        assert store.create(keyed["spec"], idempotency_key=keyed["idempotency_key"], owner="alice") == (
            store.get(keyed["id"]),
            False,
        )
        _, created = store.create(keyed["spec"], idempotency_key=keyed["idempotency_key"], owner="carol")
        assert created
        # old jobs move on, new ones number after every old one (the deleted one included)
        old_running = next(j["id"] for j in expected.values() if j["state"] == "RUNNING")
        assert store.transition(old_running, JobState.SUCCEEDED, "finished").restarts >= 0
        new, _ = store.create({"name": "after-upgrade"})
        assert new.seq > deleted_seq
        assert store.next_queued() is not None
    finally:
        store.close()
    assert schema_diff(engine) == []  # the adopted database is exactly the models
    with engine.connect() as connection:
        # the release before reads gradwire_schema and refuses anything but 1
        assert connection.execute(text("SELECT version FROM gradwire_schema")).scalar() == SCHEMA_VERSION == 2


def test_0004_adds_attempts_and_placement_to_a_0003_database(store_url: str, engine: Engine):
    """Revision 0004 on a database at 0003 with a running job: the job keeps everything, reads
    attempt 0 and no compressor, can store its placement and a new attempt; 0004 downgrades."""
    assert upgrade(engine, "0003") == (None, "0003")
    jobs = Table("jobs", MetaData(), autoload_with=engine)
    assert "attempt" not in jobs.c
    with engine.begin() as connection:
        connection.execute(
            insert(jobs).values(
                id="job-00000000abcd", name="before-0004", state="RUNNING", priority=0, spec={"name": "x"},
                created_at=utc(engine, T0), updated_at=utc(engine, T0), reason="running", restarts=0,
            )
        )  # fmt: skip
    assert upgrade(engine, "head") == ("0003", head_revision())
    assert schema_diff(engine) == []
    store = JobStore(store_url)
    try:
        job = store.get("job-00000000abcd")
        assert (job.name, job.state, job.restarts) == ("before-0004", JobState.RUNNING, 0)
        assert (job.attempt, job.compressor, job.spec_version) == (0, None, None)
        store.set_placement(job.id, [(0, 1, "10.0.0.3", 40)])
        moved = store.transition(job.id, JobState.RESTARTING, "restored", attempt=1)
        assert (moved.attempt, moved.restarts) == (1, 1)
        assert [(p.rank, p.attempt, p.node_address) for p in store.placement(job.id)] == [(0, 1, "10.0.0.3")]
    finally:
        store.close()
    from alembic import command

    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0003")
    assert "job_ranks" not in inspect(engine).get_table_names()
    assert "attempt" not in {c["name"] for c in inspect(engine).get_columns("jobs")}


def test_the_newest_revision_is_the_models(engine: Engine):
    """Fails when models_db.py changed without a migration: add one
    (``python -m gradwire.server.schema revision "what changed"``, then review it)."""
    assert upgrade(engine) == (None, head_revision())
    assert schema_diff(engine) == []
    assert upgrade(engine) == (head_revision(), head_revision())  # again: nothing to do
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version FROM gradwire_schema")).scalar() == SCHEMA_VERSION


def test_the_first_revision_is_the_previous_release(engine: Engine):
    """Revision 0001 makes what the previous release's DDL makes (so stamping 0001 is true)."""
    upgrade(engine, LEGACY_REVISION)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version FROM gradwire_schema")).scalar() == 1
        made = describe(connection, None)
    with engine.begin() as connection:  # the previous release's DDL, beside it
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(f"ATTACH DATABASE '{engine.url.database}-legacy' AS legacy")
        else:
            connection.exec_driver_sql("CREATE SCHEMA legacy")
            connection.exec_driver_sql("SET search_path TO legacy")
        for statement in LEGACY_DDL[engine.dialect.name]:
            if engine.dialect.name == "sqlite":  # into the attached database
                statement = statement.replace("CREATE TABLE ", "CREATE TABLE legacy.", 1).replace(
                    "CREATE INDEX ", "CREATE INDEX legacy.", 1
                )
            connection.exec_driver_sql(statement)
        if engine.dialect.name != "sqlite":
            connection.exec_driver_sql("SET search_path TO public")
    with engine.connect() as connection:
        assert made == describe(connection, "legacy")


def describe(connection: Any, schema: str | None) -> dict[str, Any]:
    """Per table: columns (type, nullable, primary key), unique constraints, indexes, foreign keys."""
    found = {}
    inspector = inspect(connection)
    for table in inspector.get_table_names(schema=schema):
        if table == "alembic_version":
            continue
        pk = set(inspector.get_pk_constraint(table, schema=schema)["constrained_columns"])
        columns = inspector.get_columns(table, schema=schema)
        found[table] = (
            sorted((c["name"], str(c["type"]), c["nullable"], c["name"] in pk) for c in columns),
            sorted(sorted(u["column_names"]) for u in inspector.get_unique_constraints(table, schema=schema)),
            sorted((i["name"], i["column_names"]) for i in inspector.get_indexes(table, schema=schema)),
            sorted(
                (fk["constrained_columns"], fk["referred_table"], fk["referred_columns"], fk["options"])
                for fk in inspector.get_foreign_keys(table, schema=schema)
            ),
        )
    return found


def test_what_cannot_be_adopted_is_refused(engine: Engine):
    with engine.begin() as connection:
        for statement in LEGACY_DDL[engine.dialect.name]:
            connection.exec_driver_sql(statement)
    with engine.begin() as connection:  # job tables without any record of their schema
        connection.exec_driver_sql("DROP TABLE gradwire_schema")
    with pytest.raises(SchemaMismatch, match="no schema record"):
        upgrade(engine)
    with engine.begin() as connection:  # a hand-written version this release never had
        connection.exec_driver_sql("CREATE TABLE gradwire_schema (id INTEGER PRIMARY KEY, version INTEGER)")
        connection.exec_driver_sql("INSERT INTO gradwire_schema VALUES (1, 7)")
    with pytest.raises(SchemaMismatch, match="version 7"):
        upgrade(engine)
    assert current_revision(engine) is None  # nothing was changed or stamped


def test_coordinators_starting_together_upgrade_once(store_url: str):
    start = threading.Barrier(4)
    results: list[Any] = []

    def open_store() -> None:
        start.wait()
        try:
            with JobStore(store_url) as store:
                results.append(store.create({"name": "racer"})[0].id)
        except Exception as error:  # reported below
            results.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4 and all(isinstance(r, str) for r in results), results
    with JobStore(store_url) as store:
        assert store.list().total == 4
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_gradwire_db_upgrade_adopts_and_reports(store_url: str, engine: Engine):
    from gradwire.cli import app

    expected = make_legacy_database(engine)
    runner = CliRunner()
    first = runner.invoke(app, ["db", "current", "--database-url", store_url])
    assert first.exit_code == 0 and "revision none" in first.output, first.output
    done = runner.invoke(app, ["db", "upgrade", "--database-url", store_url])
    assert done.exit_code == 0, done.output
    assert f"from {LEGACY_REVISION} to revision {head_revision()}" in done.output
    again = runner.invoke(app, ["db", "upgrade"], env={"GRADWIRE_DATABASE_URL": store_url})
    assert again.exit_code == 0 and "nothing to do" in again.output, again.output
    with JobStore(store_url) as store:
        assert {job.id for job in store.list(limit=1000).items} == set(expected)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    refused = runner.invoke(app, ["db", "upgrade", "--database-url", store_url])
    assert refused.exit_code == 1 and "9999" in refused.output


def test_spec_json_round_trips_unchanged(store_url: str):
    """JSON columns keep key order, unicode and numbers as the submission sent them."""
    body = {"name": "jsön", "b": 1, "a": [1.5, 10**15, None, True], "nested": {"z": "ü", "y": {}}}
    with JobStore(store_url) as store:
        job, _ = store.create(body)
        assert json.dumps(store.get(job.id).spec) == json.dumps(body)
