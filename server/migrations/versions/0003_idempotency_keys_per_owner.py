"""Idempotency keys unique per owner: ``uq_jobs_owner_idempotency_key`` replaces the key's own
unique constraint (two principals' equal keys make two jobs).

Jobs stored before owners were recorded keep ``owner`` NULL; NULLs are distinct in a unique
constraint, so their keys no longer collide with anyone's. On SQLite the ``jobs`` table is
rebuilt (batch mode; :func:`gradwire.server.schema.upgrade` runs it with foreign keys off, so the
events and points stay), keeping its AUTOINCREMENT counter so that a deleted job's number is still
never reused.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

NEW = "uq_jobs_owner_idempotency_key"
#: what an unnamed unique constraint is called while SQLite's batch mode rebuilds the table
SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _unique_on(columns: list[str]) -> str | None:
    for constraint in sa.inspect(op.get_bind()).get_unique_constraints("jobs"):
        if constraint["column_names"] == columns:
            return constraint["name"]
    return None


def _swap(drop: list[str], create: list[str], name: str | None) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        found = _unique_on(drop)
        if found is not None:
            op.drop_constraint(found, "jobs", type_="unique")
        op.create_unique_constraint(name, "jobs", create)
        return
    counter = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'")).scalar()
    with op.batch_alter_table(
        "jobs",
        recreate="always",
        naming_convention=SQLITE_NAMES,
        table_kwargs={"sqlite_autoincrement": True},
    ) as batch:
        batch.drop_constraint(_unique_on(drop) or f"uq_jobs_{drop[0]}", type_="unique")
        batch.create_unique_constraint(name, create)
    if counter is not None:  # the rebuilt table restarts at its largest seq; keep the old counter
        bind.execute(
            sa.text("UPDATE sqlite_sequence SET seq = max(seq, :counter) WHERE name = 'jobs'"),
            {"counter": counter},
        )


def upgrade() -> None:
    _swap(["idempotency_key"], ["owner", "idempotency_key"], NEW)


def downgrade() -> None:
    _swap(["owner", "idempotency_key"], ["idempotency_key"], "jobs_idempotency_key_key")
