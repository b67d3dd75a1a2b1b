"""`gradwire submit` and `gradwire jobs` against a real coordinator app (uvicorn on 127.0.0.1, SQLite
store, no Ray: nothing is admitted, so jobs stay QUEUED until cancelled)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradwire.cli import app
from gradwire.server.app import create_app
from gradwire.server.control import NullControl, cancel_queued
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
    shown = cli("jobs", "show", job_id, "--json", *where)
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


def test_json_output_for_scripts(server: str) -> None:
    where = ("--server", server, "--token", TOKEN)
    submitted = cli("submit", str(SPEC), "--workers", "3", "--json", *where)
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(submitted.output)  # nothing but the job on stdout
    assert job["state"] == "QUEUED" and job["spec"]["workers"]["count"] == 3

    listed = cli("jobs", "list", "--json", *where)
    assert listed.exit_code == 0
    assert [j["id"] for j in json.loads(listed.output)] == [job["id"]]

    shown = cli("jobs", "show", job["id"], "--json", *where)
    assert shown.exit_code == 0 and json.loads(shown.output)["id"] == job["id"]
    readable = cli("jobs", "show", job["id"], *where)  # without --json: fields, then the spec as YAML
    assert readable.exit_code == 0
    assert re.search(r"^state +QUEUED$", readable.output, re.M)
    assert re.search(r"^started +-$", readable.output, re.M)
    assert "\nspec:\n" in readable.output and "    count: 3" in readable.output


class GrowingLog(NullControl):
    """A job with no log for two reads, then one line more at each read; cancelled at the fifth."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store)
        self.reads = 0

    def logs(self, job_id: str) -> str | None:
        self.reads += 1
        if self.reads <= 2:
            return None  # the API's 404 "no logs (yet)"
        if self.reads == 5:
            cancel_queued(self._store, job_id)
        return "".join(f"line {i}\n" for i in range(1, self.reads - 1))


def test_logs_follow_prints_each_line_once_until_the_job_ends(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    control = GrowingLog(store)
    with ServerThread(create_app(Settings(tokens=(TOKEN,)), store=store, control=control)) as srv:
        where = ("--server", srv.url, "--token", TOKEN)
        job_id = cli("submit", str(SPEC), *where).output.split()[0]
        once = cli("jobs", "logs", job_id, *where)  # without --follow: the 404 of a job with no log
        assert once.exit_code == 1 and "404" in once.output
        followed = cli("jobs", "logs", job_id, "--follow", "--interval", "0.05", *where)
    store.close()
    assert followed.exit_code == 0, followed.output
    assert followed.output == "line 1\nline 2\nline 3\nline 4\n"
    # 1 read without --follow; then 5 polls: no log yet, 3 while queued, the last after the cancel
    assert control.reads == 6
