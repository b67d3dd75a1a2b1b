"""Alembic's environment for the job store: runs the migrations on the connection that
:func:`gradwire.server.schema.upgrade` passes in ``config.attributes["connection"]`` (in the
transaction that function holds), or on a new engine for the ``sqlalchemy.url`` option."""

from __future__ import annotations

from alembic import context

from gradwire.server.models_db import Base, make_engine

config = context.config
target_metadata = Base.metadata


def run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by rebuilding them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("the job store's migrations run online only (gradwire db upgrade)")

given = config.attributes.get("connection")
if given is not None:
    run(given)
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()
