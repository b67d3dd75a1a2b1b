"""`gradwire submit` and `gradwire jobs` against a real coordinator app (uvicorn on 127.0.0.1, SQLite
store, no Ray: nothing is admitted, so jobs stay QUEUED until cancelled)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradwire.cli import app
from gradwire.server.app import create_app
from gradwire.server.control import NullControl
from gradwire.server.settings import Settings
from gradwire.server.store import JobStore
from tests.grpc_sink import free_port
from tests.unit.test_server_load import ServerThread

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
TOKEN = "cli-test-token"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in list(os.environ):
        if name.upper().startswith("GRADWIRE_") or name.upper() == "RAY_ADDRESS":
            monkeypatch.delenv(name)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    with ServerThread(create_app(Settings(tokens=(TOKEN,)), store=store, control=NullControl(store))) as srv:
        yield srv.url
    store.close()


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_submit_list_show_cancel(server: str) -> None:
    where = ("--server", server, "--token", TOKEN)
    submitted = cli("submit", str(SPEC), "--workers", "2", *where)
    assert submitted.exit_code == 0, submitted.output
    job_id, state = submitted.output.split()
    assert job_id.startswith("job-") and state == "QUEUED"

    listed = cli("jobs", "list", *where)
    assert listed.exit_code == 0 and job_id in listed.output and "digits-powersgd" in listed.output
    shown = cli("jobs", "show", job_id, *where)
    assert shown.exit_code == 0 and '"count": 2' in shown.output  # the --workers override went in
    cancelled = cli("jobs", "cancel", job_id, *where)
    assert cancelled.exit_code == 0 and cancelled.output.split() == [job_id, "CANCELLED"]
    again = cli("jobs", "cancel", job_id, *where)  # terminal now: the server's 409 is shown
    assert again.exit_code == 1 and "409" in again.output


def test_errors_are_clear(server: str) -> None:
    bad = cli("submit", str(SPEC), "--set", "optimizer.lr=-1", "--server", server, "--token", TOKEN)
    assert bad.exit_code == 2 and "optimizer.lr" in bad.output
    unauthenticated = cli("jobs", "list", "--server", server)
    assert unauthenticated.exit_code == 1 and "401" in unauthenticated.output
    missing = cli("jobs", "show", "job-000000000000", "--server", server, "--token", TOKEN)
    assert missing.exit_code == 1 and "404" in missing.output
    nobody = cli("jobs", "list", "--server", f"http://127.0.0.1:{free_port()}")
    assert nobody.exit_code == 1 and "unreachable" in nobody.output
