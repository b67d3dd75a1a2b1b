"""The coordinator survives its own SIGKILL while a job runs (issue 5, acceptance "Restart").

The session's Ray (``local_ray``: a loopback head in the pytest process, with its dashboard, the
Jobs API) must outlive the coordinator, so the coordinator runs as a child process, ``python -m
gradwire.cli serve``, reaching that Ray by its Jobs API address (``RAY_ADDRESS``, the head's
dashboard URL). Both coordinator processes get the same
REST port, the same gRPC telemetry port (the jobs' workers keep dialling the address they were
launched with) and the same SQLite file. One scenario (the module fixture) runs once:

1. Coordinator A starts; over REST go ``long`` and ``outside`` (digits PowerSGD, far more steps
   than the test waits for, 2 workers × 0.5 CPU each). Both reach RUNNING; ``long`` has stored
   step reports of both ranks.
2. A is SIGKILLed. While it is down (``DOWN_S``), Ray keeps running ``long`` (asked through the
   Jobs API from this process), ``outside`` is stopped directly on Ray, behind the coordinator's
   back, and the job store (the SQLite file, read directly) holds ``long``'s steps 1..K0 per rank.
3. Coordinator B starts on the same database, ports and Ray. ``long``'s stored steps must grow
   past K0 on both ranks; then it is cancelled over REST and Ray must report its job STOPPED.
   Once no more reports arrive, B's ``/metrics`` is read and B is stopped (Ctrl-C).

The tests then check what it saw: the job is still there (same id, Ray submission id, spec);
its state is reconciled (``long`` RUNNING with no transition added, ``outside`` CANCELLED with
the reason naming the outside stop; every job's events are exactly QUEUED, STARTING, RUNNING(,
CANCELLED): no duplicate transition); telemetry resumes, reports made while no coordinator was
listening included; nothing lost or duplicated: each rank's stored steps are exactly 1..K (no gap
across the outage, no step twice), B's byte counters end at the job's byte totals, and B's
``gradwire_train_steps_total`` counts each rank-0 step it stored once and none that A had
stored (K - K0): the new sink is seeded from the store (``TelemetrySink.remember``).

A fresh Ray head answers "No available agent to submit job" for a while, and a second Ray head
on the machine (another test session) holding the dashboard agent's port 52365 keeps it so for
good: the scenario first waits until Ray's Jobs API takes a no-op job.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gradwire.cli.remote import CoordinatorClient
from gradwire.ray_env import local_ray_env
from gradwire.spec import JobSpec
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.slow

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
LONG_STEPS = 200_000  # far more than the scenario waits for: the jobs are stopped
READY_S = 240.0  # a coordinator process: imports, Ray connection, Jobs API
JOB_START_S = 300.0  # a Ray job on 2 shared cores: driver, Ray Train workers, torch imports
ALL_POINTS = 100_000  # the REST API's largest max_points: a series is never thinned below it
DOWN_S = 8.0  # how long no coordinator runs
BEFORE_KILL = 20  # stored steps per rank before the kill
AFTER_RESTART = 50  # steps per rank stored beyond K0 before the cancel
RANKS = (0, 1)


# --------------------------------------------------------------------------- helpers


def job_body(name: str, storage: Path) -> dict[str, Any]:
    spec = JobSpec.from_file(SPEC).with_overrides(
        [
            f"name={name}",
            f"steps={LONG_STEPS}",
            "workers.count=2",
            "workers.cpus_per_worker=0.5",
            f"checkpoint.storage={storage}",
        ]
    )
    return spec.model_dump(mode="json")


class CoordinatorProcess:
    """``gradwire serve`` as a child process, its output in a log file."""

    def __init__(self, name: str, cwd: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gradwire.cli", "serve"],
            cwd=cwd,  # its .gradwire/ (job specs for the Ray drivers) goes there
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]

    def wait_ready(self, client: CoordinatorClient, timeout: float = READY_S) -> None:
        """Until ``/readyz`` answers 200 (the database and Ray reachable)."""

        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"coordinator {self.name} exited:\n{self.output()}")
            with contextlib.suppress(Exception):  # not listening yet
                return client.http.get("/readyz").status_code == 200
            return False

        try:
            wait_for(ready, timeout, f"coordinator {self.name} ready")
        except TimeoutError as err:
            raise AssertionError(f"{err}\n{self.output()}") from None

    def sigkill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as an operator stops it; SIGKILL if that does not end it. Returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def wait_for_job_agent(ray_jobs: Any, timeout: float = 120.0) -> None:
    """Until Ray's Jobs API takes a job: a fresh head answers "No available agent to submit job"
    (HTTP 500) for a while, and the scheduler fails a job whose submission is refused."""
    submitted: list[str] = []

    def accepted() -> bool:
        try:
            submitted.append(ray_jobs.submit_job(entrypoint="true", metadata={"gradwire_test": "warm-up"}))
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            return False
        return True

    wait_for(
        accepted, timeout, "the Ray Jobs agent (is another Ray on this machine holding the agent's HTTP "
        "port, 52365? ray.init cannot move it)", every=1.0,
    )  # fmt: skip
    wait_for(lambda: ray_jobs.get_job_status(submitted[0]).is_terminal(), timeout, "the warm-up Ray job")


def wait_state(
    client: CoordinatorClient, job_id: str, state: str, timeout: float, coordinator: CoordinatorProcess
) -> dict[str, Any]:
    """Until the job is in ``state``; fails at once if it ends in another one."""
    seen: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        job = seen["job"] = client.get(job_id)
        if job["state"] == state:
            return job
        if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            raise AssertionError(f"{job_id} ended {job['state']}: {job['reason']}\n{coordinator.output()}")
        return None

    try:
        return wait_for(reached, timeout, f"{job_id} {state}")
    except TimeoutError as err:
        raise AssertionError(f"{err}; it is {seen.get('job')}\n{coordinator.output()}") from None


def listening_hosts(pid: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}


def loopback_only(hosts: set[str]) -> bool:
    """Every address is 127.0.0.0/8 or ::1 (gRPC binds 127.0.0.1 as ``::ffff:127.0.0.1``)."""
    addresses = [ipaddress.ip_address(h.split("%")[0]) for h in hosts]
    return bool(addresses) and all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses)


def stored_steps(client: CoordinatorClient, job_id: str) -> dict[int, list[int]]:
    """Each rank's stored steps, over REST (every point: the series is shorter than ALL_POINTS)."""
    out = {}
    for rank in RANKS:
        params = {"rank": rank, "max_points": ALL_POINTS}
        page = client._call("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()
        assert len(page["points"]) < ALL_POINTS, "thinned: raise ALL_POINTS or shorten the scenario"
        out[rank] = [p["step"] for p in page["points"]]
    return out


def stored_points(database_url: str, job_id: str) -> dict[int, list[Any]]:
    """The job's points per rank, straight from the job store (no coordinator running)."""
    from gradwire.server.store import JobStore

    store = JobStore(database_url)
    try:
        return {rank: store.points(job_id, rank=rank) for rank in RANKS}
    finally:
        store.close()


def events(client: CoordinatorClient, job_id: str) -> list[dict[str, Any]]:
    return client._call("GET", f"/v1/jobs/{job_id}/events").json()["events"]


def prometheus(client: CoordinatorClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(client.http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


# --------------------------------------------------------------------------- the scenario


@dataclass
class Seen:
    """What the scenario observed; the tests check it."""

    long: dict[str, Any] = field(default_factory=dict)  # as submitted
    outside: dict[str, Any] = field(default_factory=dict)
    hosts: dict[str, set[str]] = field(default_factory=dict)  # coordinator -> listening addresses
    long_before: dict[str, Any] = field(default_factory=dict)  # GET just before the kill
    events_before: list[dict[str, Any]] = field(default_factory=list)
    ray_while_down: list[str] = field(default_factory=list)  # long's Ray status, every second
    outside_ray_status: str = ""  # after the stop behind the coordinator's back
    at_kill: dict[int, list[Any]] = field(default_factory=dict)  # rank -> points stored by A
    killed_at: float = 0.0
    restarted_at: float = 0.0  # unix time B answered /readyz
    long_after: dict[str, Any] = field(default_factory=dict)  # GET once B is ready
    events_after: list[dict[str, Any]] = field(default_factory=list)
    ray_after: str = ""
    outside_after: dict[str, Any] = field(default_factory=dict)
    outside_events: list[dict[str, Any]] = field(default_factory=list)
    cancelled: dict[str, Any] = field(default_factory=dict)  # the cancel's answer
    ray_final: str = ""
    long_final: dict[str, Any] = field(default_factory=dict)
    events_final: list[dict[str, Any]] = field(default_factory=list)
    samples: dict[tuple[str, frozenset], float] = field(default_factory=dict)  # B's /metrics
    b_exit: int | None = None
    b_output: str = ""
    final: dict[int, list[Any]] = field(default_factory=dict)  # rank -> points, B stopped

    @property
    def k0(self) -> dict[int, int]:
        return {rank: len(points) for rank, points in self.at_kill.items()}


@pytest.fixture(scope="module")
def seen(local_ray, tmp_path_factory) -> Seen:
    folder = tmp_path_factory.mktemp("restart")
    rest_port, grpc_port = free_port(), free_port()
    database_url = f"sqlite:///{folder / 'coordinator.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWIRE_")}
    env |= local_ray_env() | {
        "RAY_ADDRESS": local_ray.dashboard_url,
        "GRADWIRE_PORT": str(rest_port),
        "GRADWIRE_GRPC_PORT": str(grpc_port),
        "GRADWIRE_DATABASE_URL": database_url,
        "GRADWIRE_CHECKPOINT_ROOT": str(folder),  # the jobs' storages: folder / "ckpt-*"
        "PYTHONUNBUFFERED": "1",
    }
    ray_jobs = local_ray.jobs_client()
    processes: list[CoordinatorProcess] = []
    ray_ids: list[str] = []
    client = CoordinatorClient(f"http://127.0.0.1:{rest_port}", timeout=60.0)
    out = Seen()

    def ray_status(sid: str) -> str:
        return str(ray_jobs.get_job_status(sid))

    try:
        # ---- 1. coordinator A, two jobs running, telemetry stored
        wait_for_job_agent(ray_jobs)
        a = CoordinatorProcess("coordinator-a", folder, env)
        processes.append(a)
        a.wait_ready(client)
        out.hosts["A"] = listening_hosts(a.pid)
        out.long = client.submit(job_body("restart-long", folder / "ckpt-long"))
        out.outside = client.submit(job_body("restart-outside", folder / "ckpt-outside"))
        for job in (out.long, out.outside):
            ray_ids.append(wait_state(client, job["id"], "RUNNING", JOB_START_S, a)["ray_job_id"])
        long_id, outside_id = out.long["id"], out.outside["id"]
        long_sid, outside_sid = ray_ids
        wait_for(
            lambda: all(len(s) >= BEFORE_KILL for s in stored_steps(client, long_id).values()),
            JOB_START_S, f"{BEFORE_KILL} stored steps of each rank",
        )  # fmt: skip
        out.long_before = client.get(long_id)
        out.events_before = events(client, long_id)

        # ---- 2. SIGKILL; Ray keeps the job; another one is stopped behind the coordinator's back
        a.sigkill()
        out.killed_at = time.time()
        ray_jobs.stop_job(outside_sid)
        out.at_kill = stored_points(database_url, long_id)
        down_until = time.monotonic() + DOWN_S
        while time.monotonic() < down_until:
            out.ray_while_down.append(ray_status(long_sid))
            time.sleep(1.0)
        wait_for(
            lambda: ray_jobs.get_job_status(outside_sid).is_terminal(), 180,
            "Ray stopping the outside job",
        )  # fmt: skip
        out.outside_ray_status = ray_status(outside_sid)

        # ---- 3. coordinator B on the same database, ports and Ray
        b = CoordinatorProcess("coordinator-b", folder, env)
        processes.append(b)
        b.wait_ready(client)
        out.restarted_at = time.time()
        out.hosts["B"] = listening_hosts(b.pid)
        out.long_after = client.get(long_id)
        out.events_after = events(client, long_id)
        out.ray_after = ray_status(long_sid)
        with contextlib.suppress(TimeoutError):  # the test says what it is instead
            wait_for(lambda: client.get(outside_id)["state"] == "CANCELLED", 60, "outside reconciled")
        out.outside_after = client.get(outside_id)
        out.outside_events = events(client, outside_id)
        k0 = out.k0
        wait_for(
            lambda: all(len(s) >= k0[r] + AFTER_RESTART for r, s in stored_steps(client, long_id).items()),
            180, "stored steps growing after the restart",
        )  # fmt: skip

        # ---- cancel over REST; Ray stops the job; wait until no more reports arrive
        out.cancelled = client.cancel(long_id)
        wait_for(lambda: ray_jobs.get_job_status(long_sid).is_terminal(), 120, "Ray stopping long")
        out.ray_final = ray_status(long_sid)
        last = {"n": -1, "since": time.monotonic()}

        def settled() -> bool:
            n = sum(len(s) for s in stored_steps(client, long_id).values())
            if n != last["n"]:
                last.update(n=n, since=time.monotonic())
            return time.monotonic() - last["since"] > 6.0

        wait_for(settled, 120, "telemetry to settle after the cancel", every=1.0)
        out.long_final = client.get(long_id)
        out.events_final = events(client, long_id)
        out.samples = prometheus(client)
        out.b_exit = b.interrupt()
        out.b_output = b.output()
        out.final = stored_points(database_url, long_id)
    finally:
        client.close()
        for process in processes:
            process.close()
        for sid in ray_ids:
            with contextlib.suppress(Exception):
                if not ray_jobs.get_job_status(sid).is_terminal():
                    ray_jobs.stop_job(sid)
                    wait_for(lambda sid=sid: ray_jobs.get_job_status(sid).is_terminal(), 60, f"stop {sid}")
    return out


# --------------------------------------------------------------------------- the checks


def test_coordinators_listen_on_loopback_only(seen):
    for name, hosts in seen.hosts.items():
        assert loopback_only(hosts), f"coordinator {name} listens on {sorted(hosts)}"


def test_ray_keeps_the_job_running_while_the_coordinator_is_down(seen):
    assert len(seen.ray_while_down) >= DOWN_S - 2
    assert set(seen.ray_while_down) == {"RUNNING"}, seen.ray_while_down


def test_the_job_is_still_there(seen):
    before, after = seen.long_before, seen.long_after
    assert after["id"] == seen.long["id"] and after["ray_job_id"].endswith(seen.long["id"])
    assert after == before, "the job changed across the restart (state, reason, timestamps, spec...)"


def test_a_running_job_is_reconciled_without_new_transitions(seen):
    assert seen.ray_after == "RUNNING"
    assert seen.long_after["state"] == "RUNNING", seen.long_after
    assert [e["to_state"] for e in seen.events_before] == ["QUEUED", "STARTING", "RUNNING"]
    assert seen.events_after == seen.events_before, "the restart added or changed transitions"


def test_a_job_stopped_while_the_coordinator_was_down_is_reconciled(seen):
    assert seen.outside_ray_status == "STOPPED"
    job = seen.outside_after
    assert job["id"] == seen.outside["id"]
    assert job["state"] == "CANCELLED", job
    assert "stopped outside gradwire" in job["reason"], job["reason"]
    moves = [e["to_state"] for e in seen.outside_events]
    assert moves == ["QUEUED", "STARTING", "RUNNING", "CANCELLED"], moves


def test_telemetry_resumes_with_what_was_reported_during_the_outage(seen):
    for rank, points in seen.final.items():
        assert len(points) >= seen.k0[rank] + AFTER_RESTART, (rank, seen.k0[rank], len(points))
        # reported while no coordinator ran: buffered by the workers' clients, delivered to B
        during = [p.step for p in points if seen.killed_at < p.wall_time < seen.restarted_at]
        assert during, f"rank {rank}: no report made during the outage was stored"
        assert min(during) > seen.k0[rank], (rank, seen.k0[rank], min(during))


def test_cancel_after_the_restart_stops_the_ray_job(seen):
    assert seen.cancelled["state"] == "CANCELLED"
    assert seen.ray_final == "STOPPED"
    assert seen.long_final["state"] == "CANCELLED"  # Ray's later status did not overwrite it
    moves = [e["to_state"] for e in seen.events_final]
    assert moves == ["QUEUED", "STARTING", "RUNNING", "CANCELLED"], moves


def test_the_coordinator_stops_on_ctrl_c(seen):
    # uvicorn re-raises the SIGINT it caught once it has shut down, so `gradwire serve` ends in
    # KeyboardInterrupt (exit code 130) after its with-block stopped the coordinator
    assert seen.b_exit in (0, 130), f"exit code {seen.b_exit}\n{seen.b_output}"


def test_no_step_is_lost_or_stored_twice(seen):
    for rank, points in seen.at_kill.items():
        assert [p.step for p in points] == list(range(1, len(points) + 1)), f"rank {rank} at the kill"
    for rank, points in seen.final.items():
        steps = [p.step for p in points]
        assert steps == list(range(1, len(steps) + 1)), f"rank {rank}: stored steps are not 1..{len(steps)}"
        walls = [p.wall_time for p in points]
        assert walls == sorted(walls), f"rank {rank}: wall times go back"
        assert points[: seen.k0[rank]] == seen.at_kill[rank], f"rank {rank}: points stored by A changed"


def test_byte_counters_end_at_the_job_totals(seen):
    # each (job, rank) series of a new process starts from the cumulative bytes the first report
    # it gets carries, so B's counters end at the job's totals: the sum of each rank's last report
    labels = frozenset({"job_id": seen.long["id"], "compressor": "powersgd"}.items())
    for name, column in (("sent", "bytes_sent"), ("uncompressed", "bytes_uncompressed")):
        total = sum(getattr(points[-1], column) for points in seen.final.values())
        assert seen.samples[(f"gradwire_grad_bytes_{name}_total", labels)] == total, name


def test_step_counter_counts_each_step_once(seen):
    # Prometheus counters restart at 0 with the process: A counted rank 0's steps 1..K0 (what it
    # stored), so B must count K0+1..K, each once; a step re-sent and counted by both would
    # make increase() over the restart count it twice
    k0, k = seen.k0[0], len(seen.final[0])
    counted = seen.samples[("gradwire_train_steps_total", frozenset({"job_id": seen.long["id"]}.items()))]
    assert counted == k - k0, f"B counted {counted:g} rank-0 steps; it stored {k - k0} (steps {k0 + 1}..{k})"
