"""The job store's schema over time: Alembic migrations, run when a store opens and by
``gradwire db upgrade``.

The revisions live in ``migrations/versions/`` beside this module (shipped in the wheel; no
``alembic.ini`` is needed: :func:`alembic_config` builds the configuration in code):

- ``0001``: the schema of the release before migrations (tables ``jobs``, ``job_events``,
  ``job_points`` and ``gradwire_schema`` holding version 1), exactly as that release's
  ``create_all`` made it;
- ``0002``: ``job_telemetry_keys`` (per-job telemetry secret digests; created only where a
  development build had not already made it) and ``gradwire_schema`` version 2.

:func:`upgrade` brings any database to the newest revision in one transaction:

- an empty database gets every revision;
- a database made by the hand-written schema code of the release before migrations (a
  ``gradwire_schema`` table holding version 1, no ``alembic_version``) is *adopted*: stamped
  ``0001`` and upgraded, every job kept;
- a database at an older revision is upgraded; one at the newest is left as it is;
- a database at a revision this gradwire does not know (written by a newer gradwire), one whose
  ``gradwire_schema`` holds another version without Alembic's table, or one holding the job
  tables with neither record is refused with :class:`~gradwire.server.models_db.SchemaMismatch`
  instead of guessed at.

``gradwire_schema`` stays: from revision 0002 on it holds 2, which a coordinator of the release
before migrations (it reads only version 1) refuses to open, instead of writing to a schema it
does not know. Alembic's own record is the ``alembic_version`` table.

Several coordinators opening one database at once upgrade it once: on PostgreSQL the upgrade
holds a transaction-scoped advisory lock, on SQLite the write lock (``BEGIN IMMEDIATE``), and the
state is read again under the lock. On SQLite the upgrade runs with foreign keys off (a table
rebuild by Alembic's batch mode would otherwise cascade its implicit ``DELETE`` into the events
and points) and checks them with ``PRAGMA foreign_key_check`` before it commits.

A new revision (after changing :mod:`gradwire.server.models_db`)::

    python -m gradwire.server.schema revision "what changed"

writes ``migrations/versions/NNNN_what_changed.py`` from the difference between the models and
a scratch SQLite database at the current head; review it (SQLite needs ``batch_alter_table`` for
anything but adding a column or a table). ``tests/unit/test_server_migrations.py`` fails while the
newest revision and the models differ.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import URL

from gradwire.server.models_db import BEGIN_OPTION, SchemaMismatch, make_engine

__all__ = [
    "LEGACY_REVISION",
    "MIGRATIONS",
    "alembic_config",
    "current_revision",
    "head_revision",
    "upgrade",
]

#: The folder with ``env.py`` and ``versions/``.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"

#: The revision equal to the schema of the release before migrations (``gradwire_schema`` = 1).
LEGACY_REVISION = "0001"
LEGACY_VERSION = 1

#: Key of the PostgreSQL advisory lock held while upgrading ("gradwire" in ASCII, as an int64).
ADVISORY_LOCK = 0x6772616477697265

#: The tables of the release before migrations, any of which marks a database as not empty.
JOB_TABLES = frozenset({"jobs", "job_events", "job_points"})


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code: the shipped migrations, and ``connection`` (when
    given) for ``env.py`` to run them on."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this gradwire ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations shipped"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in the database (``None``: none, i.e. empty or not yet adopted)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the database to ``revision`` (the newest by default); returns (revision found, revision
    now). See the module docstring for what is adopted and what is refused."""
    where = engine.url.render_as_string(hide_password=True)
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:  # before BEGIN: the pragma is a no-op inside a transaction
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.execution_options(**{BEGIN_OPTION: "IMMEDIATE"}).begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
                found = _adopt(connection, where)
                config = alembic_config(connection)
                command.upgrade(config, revision)
                now = MigrationContext.configure(connection).get_current_revision()
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration left rows without their job: {broken[:5]}")
        finally:
            if sqlite:  # the transaction has ended: the pragma applies again
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")
    return found, now or ""


def _adopt(connection: Connection, where: str) -> str | None:
    """Check the database's record of its schema; stamp a pre-migration database ``0001``.
    Returns the revision found (after adoption: ``0001``), ``None`` for an empty database."""
    tables = set(inspect(connection).get_table_names())
    script = ScriptDirectory.from_config(alembic_config())
    if "alembic_version" in tables:
        found = MigrationContext.configure(connection).get_current_revision()
        if found is not None:
            try:
                script.get_revision(found)
            except Exception:
                raise SchemaMismatch(
                    f"the job store at {where} is at schema revision {found!r}, which this gradwire "
                    f"does not know (its newest is {script.get_current_head()!r}): a newer gradwire "
                    "wrote it"
                ) from None
            return found
    if "gradwire_schema" in tables:
        version = connection.execute(text("SELECT version FROM gradwire_schema WHERE id = 1")).scalar()
        if version not in (None, LEGACY_VERSION):  # None: the old code had not written it yet
            raise SchemaMismatch(
                f"the job store at {where} has schema version {version} but no migration record; "
                f"this gradwire adopts version {LEGACY_VERSION} only"
            )
        command.stamp(alembic_config(connection), LEGACY_REVISION)
        return LEGACY_REVISION
    if tables & JOB_TABLES:
        raise SchemaMismatch(
            f"the job store at {where} holds {sorted(tables & JOB_TABLES)} but no schema record "
            "(neither gradwire_schema nor alembic_version); refusing to guess its schema"
        )
    return None


def upgrade_url(url: str | URL, revision: str = "head") -> tuple[str | None, str]:
    """:func:`upgrade` on a new engine for ``url`` (what ``gradwire db upgrade`` runs)."""
    engine = make_engine(url)
    try:
        return upgrade(engine, revision)
    finally:
        engine.dispose()


def new_revision(message: str) -> Path:
    """Write the next revision from the difference between the models and the current head
    (autogenerate on a scratch SQLite database); returns its path."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head() or "0000"
    number = f"{int(head) + 1:04d}"
    slug = re.sub(r"[^a-z0-9]+", "_", message.lower()).strip("_")[:40]
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{folder}/scratch.db")
        try:
            upgrade(engine)
            with engine.begin() as connection:
                config = alembic_config(connection)
                made: Any = command.revision(config, message=message, autogenerate=True, rev_id=number)
        finally:
            engine.dispose()
    path = Path(made.path)
    target = path.with_name(f"{number}_{slug}.py")
    path.rename(target)
    return target


if __name__ == "__main__":  # python -m gradwire.server.schema revision "message"
    if len(sys.argv) != 3 or sys.argv[1] != "revision":
        sys.exit('usage: python -m gradwire.server.schema revision "what changed"')
    print(new_revision(sys.argv[2]))
