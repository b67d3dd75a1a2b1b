"""Alembic migrations of the job store (run by gradwire.server.schema; see docs/service.md, PostgreSQL)."""
