"""`gradwire db upgrade` and `gradwire db current`: the job store's schema migrations.

A coordinator upgrades its database itself when it starts (``gradwire serve``); ``db upgrade``
does the same ahead of time, e.g. before rolling out a new release to several coordinators, or
to see what a start would do. The database comes from ``--database-url`` or
``GRADWIRE_DATABASE_URL`` (default: ``serve``'s SQLite file under ``.gradwire/``). Both commands
need the ``server`` extra, and ``postgres`` for a PostgreSQL URL.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gradwire.cli.extras import command_needs

db_app = typer.Typer(help="The coordinator's job store: schema migrations.", no_args_is_help=True)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="GRADWIRE_DATABASE_URL",
        help="SQLAlchemy URL of the job store (default: serve's SQLite file under .gradwire/)",
        show_default=False,
    ),
]


def _url(command: str, given: str | None) -> str:
    with command_needs(command, "server", ("sqlalchemy", "alembic")):
        from sqlalchemy.engine import make_url

        from gradwire.server.store import DEFAULT_URL
    url = given or DEFAULT_URL
    try:
        backend = make_url(url).get_backend_name()
    except Exception as err:
        typer.echo(f"not a database URL: {err}", err=True)
        raise typer.Exit(2) from None
    if backend == "postgresql":
        with command_needs(command, "postgres", ("psycopg",)):
            pass
    return url


def _where(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _unreachable(url: str, err: Exception) -> typer.Exit:
    reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
    typer.echo(f"cannot use the database at {_where(url)}: {reason}", err=True)
    return typer.Exit(1)


@db_app.command("upgrade")
def upgrade(
    database_url: DatabaseUrl = None,
    revision: Annotated[str, typer.Option(help="the revision to reach")] = "head",
) -> None:
    """Migrate the job store to the newest schema, as a starting coordinator does.

    A database of the release before migrations is adopted, every job kept."""
    url = _url("gradwire db upgrade", database_url)
    from sqlalchemy.exc import DBAPIError

    from gradwire.server.models_db import SchemaMismatch
    from gradwire.server.schema import upgrade_url

    try:
        found, now = upgrade_url(url, revision)
    except SchemaMismatch as err:
        typer.echo(f"refused: {err}", err=True)
        raise typer.Exit(1) from None
    except DBAPIError as err:
        raise _unreachable(url, err) from None
    if found == now:
        typer.echo(f"{_where(url)}: at revision {now}, nothing to do")
    else:
        typer.echo(f"{_where(url)}: upgraded from {found or 'an empty database'} to revision {now}")


@db_app.command("current")
def current(database_url: DatabaseUrl = None) -> None:
    """Print the job store's schema revision and the newest this gradwire ships."""
    url = _url("gradwire db current", database_url)
    from sqlalchemy.exc import DBAPIError

    from gradwire.server.models_db import make_engine
    from gradwire.server.schema import current_revision, head_revision

    engine = make_engine(url)
    try:
        found = current_revision(engine)
    except DBAPIError as err:
        raise _unreachable(url, err) from None
    finally:
        engine.dispose()
    typer.echo(f"{_where(url)}: revision {found or 'none'} (newest: {head_revision()})")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
