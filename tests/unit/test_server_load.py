"""Load: 1000 job submissions from 50 concurrent clients against a real uvicorn server on loopback.

The coordinator runs as it would in production (uvicorn on a socket bound to 127.0.0.1, a job
store in a SQLite file or on a PostgreSQL server (``store_url``, tests/conftest.py), bearer auth)
with :class:`NullControl` as its scheduler side: no cluster, so nothing is ever admitted and
every job stays QUEUED. 50 threads, each with its own ``httpx.Client``, submit 20 jobs apiece
with distinct names and an ``Idempotency-Key`` each; two submissions per client (10 %) are sent
again later with the same key and body.

Afterwards the store must hold exactly 1000 jobs: every id a client was given, no other, all
QUEUED, each with its submission as its only event; each client's jobs in the order that client
submitted them (submission order is ``seq``, what ``GET /v1/jobs`` lists by); and every replay
answered 200 with the id (and ``Location``) of the job its key first created.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from gradwire.server.app import create_app
from gradwire.server.control import NullControl
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore

CLIENTS = 50
JOBS_PER_CLIENT = 20
REPLAYS_PER_CLIENT = 2  # 10 % of the submissions
TOKEN = "load-token-0123456789"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"


@dataclass
class Submission:
    name: str
    key: str
    job_id: str = ""
    status: int = 0
    location: str = ""


@dataclass
class ClientRun:
    """What one client sent and what it was answered, in the order it sent."""

    index: int
    submissions: list[Submission] = field(default_factory=list)
    replays: list[tuple[Submission, int, str, str]] = field(default_factory=list)  # (orig, status, id, loc)


class ServerThread:
    """A uvicorn server in a background thread on a socket already bound to 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        # proto IPPROTO_TCP, as uvicorn's own sockets have: asyncio sets TCP_NODELAY only on those, and
        # without it every response waits ~40 ms for a delayed ACK (Nagle)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.socket.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def coordinator(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, JobStore]]:
    for name in list(os.environ):  # an operator's GRADWIRE_* settings must not change the app
        if name.upper().startswith("GRADWIRE_") or name.upper() == "RAY_ADDRESS":
            monkeypatch.delenv(name)
    store = JobStore(store_url)
    app = create_app(Settings(tokens=(TOKEN,)), store=store, control=NullControl(store))
    with ServerThread(app) as server:
        yield server.url, store
    store.close()


def _spec(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {**template, "name": name}


def _client(url: str, index: int, template: dict[str, Any], start: threading.Barrier) -> ClientRun:
    run = ClientRun(index)
    rng = random.Random(index)
    replay_of = set(rng.sample(range(JOBS_PER_CLIENT), REPLAYS_PER_CLIENT))
    pending: list[tuple[int, Submission]] = []  # (send after this submission, the one to repeat)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
        start.wait()
        for n in range(JOBS_PER_CLIENT):
            sub = Submission(name=f"load-c{index:02d}-j{n:02d}", key=f"load-{index}-{n}")
            response = client.post(
                "/v1/jobs", json=_spec(template, sub.name), headers={"Idempotency-Key": sub.key}
            )
            sub.status, sub.location = response.status_code, response.headers.get("location", "")
            sub.job_id = response.json().get("id", "") if response.status_code < 300 else response.text
            run.submissions.append(sub)
            if n in replay_of:  # repeated a few submissions later, after newer jobs were created
                pending.append((min(n + rng.randint(1, 5), JOBS_PER_CLIENT - 1), sub))
            for when, original in [p for p in pending if p[0] == n]:
                again = client.post(
                    "/v1/jobs", json=_spec(template, original.name), headers={"Idempotency-Key": original.key}
                )
                replayed_id = again.json().get("id", "") if again.status_code < 300 else again.text
                run.replays.append(
                    (original, again.status_code, replayed_id, again.headers.get("location", ""))
                )
                pending.remove((when, original))
    return run


def _all_jobs(url: str) -> list[dict[str, Any]]:
    """Every job through the API, oldest first, following the cursor."""
    jobs: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30.0) as client:
        path: str | None = "/v1/jobs?limit=500"
        while path is not None:
            response = client.get(path)
            assert response.status_code == 200, response.text
            page = response.json()
            jobs.extend(page["items"])
            assert page["total"] == CLIENTS * JOBS_PER_CLIENT
            path = page["next"]
        queued = client.get("/v1/jobs", params={"state": "QUEUED", "limit": 1}).json()["total"]
        assert queued == CLIENTS * JOBS_PER_CLIENT
        metrics = client.get("/metrics").text
    assert f'gradwire_jobs{{state="QUEUED"}} {CLIENTS * JOBS_PER_CLIENT}.0' in metrics
    assert 'gradwire_jobs{state="CANCELLED"} 0.0' in metrics
    return jobs


def test_thousand_submissions_from_fifty_clients(coordinator: tuple[str, JobStore]) -> None:
    url, store = coordinator
    template = yaml.safe_load(EXAMPLE.read_text())
    start = threading.Barrier(CLIENTS)
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        runs = list(pool.map(lambda i: _client(url, i, template, start), range(CLIENTS)))
    seconds = time.monotonic() - began

    submissions = [sub for run in runs for sub in run.submissions]
    total = CLIENTS * JOBS_PER_CLIENT
    assert len(submissions) == total
    refused = [s for s in submissions if s.status != 202]
    assert not refused, refused[:5]
    assert all(s.location == f"/v1/jobs/{s.job_id}" for s in submissions)
    given = {s.job_id for s in submissions}
    assert len(given) == total, "two submissions were given the same job"

    # every replay: 200, the id and Location its key first got
    replays = [r for run in runs for r in run.replays]
    assert len(replays) == CLIENTS * REPLAYS_PER_CLIENT
    for original, status, job_id, location in replays:
        assert (status, job_id, location) == (200, original.job_id, original.location), original

    # the store: exactly those jobs (replays created nothing), all queued, nothing else happened
    jobs = _all_jobs(url)
    assert len(jobs) == total
    assert {job["id"] for job in jobs} == given, "jobs lost or duplicated"
    assert {job["state"] for job in jobs} == {JobState.QUEUED.value}
    by_id = {s.job_id: s for s in submissions}
    assert all(job["name"] == by_id[job["id"]].name == job["spec"]["name"] for job in jobs)
    assert store.counts_by_state()[JobState.QUEUED] == total
    assert sum(store.counts_by_state().values()) == total
    for job_id in random.Random(0).sample(sorted(given), 50):
        events = store.events(job_id)
        assert [(e.from_state, e.to_state) for e in events] == [(None, JobState.QUEUED)], events

    # per client, the listing (submission order) keeps the order the client sent in
    listed_order = [job["id"] for job in jobs]
    position = {job_id: i for i, job_id in enumerate(listed_order)}
    for run in runs:
        sent = [s.job_id for s in run.submissions]
        assert sorted(sent, key=position.__getitem__) == sent, f"client {run.index}: order not kept"
    seqs = [store.get(job_id).seq for job_id in listed_order[:: total // 20]]
    assert seqs == sorted(seqs)

    # not a timed test (benchmarks/service.py measures); the rate is printed for the record
    requests = total + len(replays)
    print(f"{requests} submissions from {CLIENTS} clients in {seconds:.1f} s ({requests / seconds:.0f}/s)")
