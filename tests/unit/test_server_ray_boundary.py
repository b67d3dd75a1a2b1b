"""The coordinator reaches Ray by its Jobs API alone, answers a cancel at once, and refuses to start
twice or on a taken port (issue 16, items 1 and 2).

* **Grep over server/**: no ``ray.init``, no ``ray._private``, no subclass of Ray's job client or
  override of its private methods, no spec folder shared with the cluster.
* **Cancel during a retried submission**: the scheduler's Jobs API address refuses connections
  (a closed port) or accepts them and never answers (a listening socket nobody serves); the
  launch keeps retrying, and ``cancel`` must come back within a second, the job CANCELLED (never
  FAILED), and the retrying stop.
* **Clear errors at start**: a taken dashboard-agent port (``GRADWIRE_RAY_AGENT_PORT``) and a
  second coordinator in the same folder are refused before any Ray starts, saying what to change,
  in-process and through ``gradwire serve``.

No Ray process is started here (every check fails before one would be, or needs none).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")

from gradwire.server.demand import Demand
from gradwire.server.instance_lock import AlreadyRunning, InstanceLock
from gradwire.server.job_lifecycle import FailurePolicy
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.ray_cluster import RayCluster, RayUnavailable
from gradwire.server.scheduler import SPEC_ENV, Scheduler
from gradwire.server.service import Coordinator
from gradwire.server.states import JobState
from gradwire.server.store import JobStore
from gradwire.spec import JobSpec
from tests.waiting import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "server"
SPEC = ROOT / "examples" / "specs" / "digits-powersgd.yaml"

#: what server/ must not contain, and why
PRIVATE = r"\bray\._private\b"
FORBIDDEN = {
    r"\bray\.init\b": "joins the cluster as a Ray node",
    PRIVATE: "imports Ray's private modules",
    r"ray\.experimental|_internal_kv": "reads Ray's internal key-value store",
    r"\(\s*JobSubmissionClient\s*\)": "subclasses Ray's job client",
    r"\b_do_request\b": "overrides a private method of Ray's job client",
    r"\bspec_dir\b|[\"'/]specs[\"'/]|\.gradwire/specs": "writes specs to a folder shared with the cluster",
}


def server_sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(SERVER.rglob("*.py"))}


def test_grep_over_server_finds_no_private_ray_and_no_spec_folder():
    sources = server_sources()
    assert len(sources) > 10 and SERVER / "ray_cluster.py" in sources
    found = [
        f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}"
        for path, text in sources.items()
        for number, line in enumerate(text.splitlines(), 1)
        for pattern, why in FORBIDDEN.items()
        if re.search(pattern, line)
    ]
    assert found == []


def test_the_grep_catches_what_it_looks_for():
    caught = {
        "ray.init(address='auto')": r"\bray\.init\b",
        "from ray._private.worker import get_dashboard_url": PRIVATE,
        "class C(JobSubmissionClient):": r"\(\s*JobSubmissionClient\s*\)",
        'spec_dir=data / "specs"': r"\bspec_dir\b|[\"'/]specs[\"'/]|\.gradwire/specs",
    }
    for line, pattern in caught.items():
        assert re.search(pattern, line), line


def test_the_spec_travels_in_the_jobs_environment_not_a_file(tmp_path):
    scheduler = Scheduler(
        JobStore(f"sqlite:///{tmp_path}/jobs.db"), RayCluster("http://127.0.0.1:1"), CoordinatorMetrics(),
        telemetry_address="127.0.0.1:5",
    )  # fmt: skip
    words = scheduler.entrypoint("j1").split()
    assert words[words.index("train") + 1 : words.index("train") + 3] == ["--spec-env", SPEC_ENV]
    assert not [w for w in words if w.endswith((".json", ".yaml"))]
    scheduler.store.close()


def test_a_ray_address_that_is_not_a_jobs_api_is_refused_with_the_right_form():
    for address in ("auto", "ray://head:10001"):
        with pytest.raises(RayUnavailable, match="http://head:8265"):
            RayCluster(address)
    assert RayCluster("head:8265").address == "http://head:8265"


# --- cancel while the submission is retried ------------------------------------------------------


class BlackHole:
    """A loopback TCP port that takes connections and never answers (no accept, no bytes)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("ray", ["refusing", "silent"])
def test_cancel_is_answered_at_once_while_the_submission_is_retried(ray, tmp_path):
    hole = BlackHole() if ray == "silent" else None
    address = hole.address if hole else f"http://127.0.0.1:{free_port()}"  # nobody listens there
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    cluster = RayCluster(address, request_timeout_s=2.0)
    scheduler = Scheduler(
        store, cluster, CoordinatorMetrics(), telemetry_address="127.0.0.1:5",
        failure_policy=FailurePolicy(submit_backoff_s=0.5),
    )  # fmt: skip
    spec = JobSpec.from_file(SPEC).with_overrides(["steps=30"]).model_dump(mode="json")
    job, _ = store.create(spec)
    launching = threading.Thread(target=scheduler._launch, args=(job, Demand.of(job.spec)), daemon=True)
    started = time.monotonic()
    launching.start()
    try:
        wait_for(lambda: store.get(job.id).state is JobState.STARTING, 10, "STARTING")
        time.sleep(2.5)  # a submission attempt failed (refused at once, or timed out after 2 s)...
        assert launching.is_alive(), "the launch gave up instead of retrying"
        assert store.get(job.id).state is JobState.STARTING  # ... and the next one is on its way
        before = time.monotonic()
        record = scheduler.cancel(job.id)
        took = time.monotonic() - before
        assert took < 1.0, f"cancel took {took:.2f} s while the submission was retried"
        assert record.state is JobState.CANCELLED and record.reason == "cancelled by user"
        launching.join(5.0)  # the retrying stops (a call in flight times out after 2 s)
        assert not launching.is_alive(), "the launch kept retrying a cancelled job"
        assert time.monotonic() - started < 15
        events = [e.to_state for e in store.events(job.id)]
        assert events == [JobState.QUEUED, JobState.STARTING, JobState.CANCELLED], events
    finally:
        store.close()
        if hole:
            hole.close()


# --- clear errors at start -----------------------------------------------------------------------


def test_a_taken_agent_port_is_refused_before_ray_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cluster = RayCluster(agent_port=port, temp_dir=tmp_path / "ray", num_cpus=1)
        started = time.monotonic()
        with pytest.raises(RayUnavailable) as caught:
            cluster.start()
    message = str(caught.value)
    assert f"port {port}" in message and "dashboard agent" in message
    assert "GRADWIRE_RAY_AGENT_PORT" in message
    assert time.monotonic() - started < 2 and cluster.head_pid is None  # nothing was started


def test_a_second_coordinator_in_the_same_folder_is_refused(tmp_path):
    first = InstanceLock(tmp_path).acquire()
    try:
        assert (tmp_path / "coordinator.lock").read_text().strip() == str(os.getpid())
        second = Coordinator(database_url=f"sqlite:///{tmp_path}/c.db", data_dir=tmp_path)
        with pytest.raises(AlreadyRunning, match=rf"PID {os.getpid()}\b.*{re.escape(str(tmp_path))}"):
            second.start()
        assert second.cluster is None and second.store is None  # refused before Ray or the store
    finally:
        first.release()
    again = InstanceLock(tmp_path).acquire()  # free once the first one let go
    again.release()


def serve(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "GRADWIRE_PORT": str(free_port()), **env}
    environment.pop("RAY_ADDRESS", None)
    environment.pop("GRADWIRE_RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "gradwire.cli", "serve"],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_gradwire_serve_refuses_a_second_instance_in_the_folder(tmp_path):
    first = InstanceLock(tmp_path / ".gradwire").acquire()  # what a running `gradwire serve` holds
    try:
        done = serve(tmp_path)
    finally:
        first.release()
    assert done.returncode == 1, done.stderr
    assert f"another gradwire coordinator (PID {os.getpid()})" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_gradwire_serve_names_a_taken_agent_port_and_its_setting(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = serve(tmp_path, GRADWIRE_RAY_AGENT_PORT=str(port))
    assert done.returncode == 1, done.stderr
    assert f"port {port}" in done.stderr and "GRADWIRE_RAY_AGENT_PORT" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / ".gradwire" / "coordinator.lock").read_text().strip()  # released
