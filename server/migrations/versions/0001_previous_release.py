"""The schema of the release before migrations (hand-written ``gradwire_schema`` version 1).

Exactly what that release's ``Base.metadata.create_all`` made, so that a database it created is
adopted by stamping this revision (:func:`gradwire.server.schema.upgrade`) and a new database
made by this revision is the same. Frozen: never edit it; change the schema in a new revision.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# 64-bit ids, plain INTEGER on SQLite (only INTEGER PRIMARY KEY is its auto-incrementing rowid)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# job states: a plain string column (no database enum, no CHECK constraint)
STATE = sa.String(32)
UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("seq", BIG_ID, primary_key=True, autoincrement=True, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(256), nullable=True),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("started_at", UTC_TIME, nullable=True),
        sa.Column("finished_at", UTC_TIME, nullable=True),
        sa.Column("ray_job_id", sa.String(128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_jobs_name", "jobs", ["name", "seq"])
    op.create_index("ix_jobs_queue", "jobs", ["state", "priority", "seq"])
    op.create_table(
        "gradwire_schema",
        sa.Column("id", sa.Integer(), primary_key=True, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
    )
    op.execute("INSERT INTO gradwire_schema (id, version) VALUES (1, 1)")
    op.create_table(
        "job_events",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("from_state", STATE, nullable=True),
        sa.Column("to_state", STATE, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", UTC_TIME, nullable=False),
        sa.UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),
    )
    op.create_table(
        "job_points",
        sa.Column("id", BIG_ID, primary_key=True, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("wall_time", sa.Float(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("compute_s", sa.Float(), nullable=False),
        sa.Column("compress_s", sa.Float(), nullable=False),
        sa.Column("communicate_s", sa.Float(), nullable=False),
        sa.Column("wait_s", sa.Float(), nullable=False),
        sa.Column("bytes_sent", sa.BigInteger(), nullable=False),
        sa.Column("bytes_uncompressed", sa.BigInteger(), nullable=False),
        sa.Column("stragglers", sa.Integer(), nullable=False),
        sa.UniqueConstraint("job_id", "rank", "step", name="uq_job_points_job_rank_step"),
    )


def downgrade() -> None:
    for table in ("job_points", "job_events", "gradwire_schema", "jobs"):
        op.drop_table(table)
