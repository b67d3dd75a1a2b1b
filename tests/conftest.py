"""Fixtures shared by the test folders: a real PostgreSQL server for the job-store tests.

``store_url`` is parametrized over both backends the job store supports: ``sqlite`` (a new file
in the test's tmp_path) and ``postgresql`` (the test module's own database on the session's
throwaway server, see tests/postgres.py, emptied before each test). A test that asks for it runs
once per backend. The PostgreSQL cases are skipped, saying why, only where Debian's
``postgresql`` package (``make system-deps`` installs it) or the ``psycopg`` driver
(``gradwire[postgres]``) is missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postgres

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: keep an operator's GRADWIRE_* / RAY_ADDRESS out of a test."""
    for name in list(os.environ):
        if name.upper().startswith("GRADWIRE_") or name.upper() == "RAY_ADDRESS":
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """One PostgreSQL server for the whole session, on 127.0.0.1; stopped (by PID) at the end."""
    bin_dir = postgres.binaries()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            "`make system-deps` installs Debian's postgresql package"
        )
    pytest.importorskip("psycopg", reason="the psycopg driver is missing: pip install 'gradwire[postgres]'")
    server = postgres.start(bin_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres_database(
    postgres_server: postgres.PostgresServer, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A new database for the test module (``CREATE DATABASE``); its SQLAlchemy URL."""
    name = "gw_" + re.sub(r"\W+", "_", request.module.__name__.rsplit(".", 1)[-1])[:48]
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job store URL with nothing in it yet, on each backend (see the module docstring)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'jobs.db'}"
    url: str = request.getfixturevalue("postgres_database")
    server: postgres.PostgresServer = request.getfixturevalue("postgres_server")
    server.empty(url.rsplit("/", 1)[-1])
    return url
