"""Worker-group attempts, rank placement, the compressor in use and the spec's schema version.

- ``jobs.attempt``: the worker-group attempt last reported (0, then n after Ray Train's n-th
  restore); RESTARTING is entered when a report's attempt passes it.
- ``jobs.compressor``: the compressor rank 0 reported last (a change is a job event).
- ``jobs.spec_version``: the JobSpec schema version the stored spec was validated under; NULL for
  jobs stored before, whose spec is validated again when they are admitted.
- ``job_ranks``: per (job, rank), the node address and attempt it reported last, and from which
  step.

Existing jobs get attempt 0 and no compressor, placement or version. Plain column additions: no
table is rebuilt on SQLite.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: ``DateTime(timezone=True)``, what models_db's UTCDateTime stores
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("compressor", sa.String(128), nullable=True))
    op.add_column("jobs", sa.Column("spec_version", sa.Integer(), nullable=True))
    op.create_table(
        "job_ranks",
        sa.Column(
            "job_id",
            sa.String(32),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
            nullable=False,
        ),
        sa.Column("rank", sa.Integer(), primary_key=True, nullable=False, autoincrement=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_address", sa.String(64), nullable=False),
        sa.Column("since_step", sa.BigInteger(), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("job_ranks")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("spec_version")
        batch.drop_column("compressor")
        batch.drop_column("attempt")
