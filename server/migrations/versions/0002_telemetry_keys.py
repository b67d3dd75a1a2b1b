"""Per-job telemetry secret digests (``job_telemetry_keys``); ``gradwire_schema`` version 2.

A development build between the two releases already made ``job_telemetry_keys`` with
``create_all`` (and kept version 1): the table is created only where it is missing. Version 2
makes a coordinator of the release before migrations (it reads only version 1) refuse the
database instead of writing to a schema it does not know.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if "job_telemetry_keys" not in sa.inspect(op.get_bind()).get_table_names():
        op.create_table(
            "job_telemetry_keys",
            sa.Column(
                "job_id",
                sa.String(32),
                sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                primary_key=True,
                nullable=False,
            ),
            sa.Column("digest", sa.String(64), nullable=False),
        )
    op.execute("UPDATE gradwire_schema SET version = 2 WHERE id = 1")


def downgrade() -> None:
    op.execute("UPDATE gradwire_schema SET version = 1 WHERE id = 1")
    op.drop_table("job_telemetry_keys")
