"""The processes benchmarks/service.py measures: the REST server and the telemetry sink.

Each runs in a child process (so client threads do not share its GIL), reports its address over a
pipe, and stops on request, handing back its CPU time; with a profile path every thread of it runs
under cProfile.
"""

from __future__ import annotations

import cProfile
import multiprocessing as mp
import pstats
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOKEN = "bench-token-0123456789"
EXAMPLE = ROOT / "examples" / "specs" / "digits-powersgd.yaml"


def _cpu_seconds() -> tuple[float, float]:
    """This process's (user, system) CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


class ThreadProfiles:
    """cProfile in every thread started after :meth:`start` (and the calling one), merged at the end."""

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        def first_event(frame: Any, event: str, arg: Any) -> None:
            profile = cProfile.Profile()
            with self._lock:
                self._profiles.append(profile)
            profile.enable()  # replaces this hook for the rest of the thread's life

        threading.setprofile(first_event)
        main = cProfile.Profile()
        self._profiles.append(main)
        main.enable()

    def dump(self, path: Path) -> None:
        threading.setprofile(None)  # type: ignore[arg-type]
        with self._lock:
            profiles = list(self._profiles)
        profiles[0].disable()
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(str(path))


def _control_loop(conn: Connection, on_stop: Callable[[], None], extra: Callable[[], dict] | None) -> None:
    """Answer the parent: ``cpu`` with this process's CPU seconds, ``stop`` by stopping."""
    while True:
        message = conn.recv()
        if message == "cpu":
            conn.send(_cpu_seconds())
        elif message == "stop":
            on_stop()
            return
        elif message == "stats" and extra is not None:
            conn.send(extra())


# --- the REST server process -------------------------------------------------------------------


def rest_server(db_url: str, profile_path: str | None, conn: Connection) -> None:
    """Child process: the coordinator app on uvicorn, as ``gradwire serve`` configures it."""
    import uvicorn

    from gradwire.server.app import create_app
    from gradwire.server.control import NullControl
    from gradwire.server.settings import Settings
    from gradwire.server.store import JobStore

    profiles = ThreadProfiles() if profile_path else None
    store = JobStore(db_url)
    settings = Settings(tokens=(TOKEN,), host="127.0.0.1", database_url=db_url)
    app = create_app(settings, store=store, control=NullControl(store))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))

    def stop() -> None:
        server.should_exit = True

    threading.Thread(target=_control_loop, args=(conn, stop, None), daemon=True).start()
    if profiles is not None:
        profiles.start()
    conn.send(sock.getsockname()[1])
    server.run(sockets=[sock])
    if profiles is not None and profile_path:
        profiles.dump(Path(profile_path))
    store.close()
    conn.send("stopped")


# --- the telemetry sink process ----------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size now (``VmRSS``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _NoCluster:
    """The scheduler's Ray cluster, never reached: the telemetry callback does not use it."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the telemetry benchmark has no Ray cluster (asked for {name})")


def sink_server(
    db_url: str, jobs: int, ranks_per_job: int, steps: int, profile_path: str | None, conn: Connection
) -> None:
    """Child process: the telemetry path as ``Coordinator._start`` wires it, without Ray.

    The job store (SQLite file), the metrics, a :class:`TelemetryGate` attached to the store, the
    :class:`Scheduler` whose ``on_reports`` is the sink's callback, and the :class:`TelemetrySink`
    with the gate and the drop/receive counters; ``jobs`` jobs of ``ranks_per_job`` workers are
    launched (a telemetry secret each, moved to RUNNING), and their secrets handed to the parent.
    """
    from sqlalchemy import func, select

    from gradwire.server.metrics import CoordinatorMetrics
    from gradwire.server.models_db import JobPointRow
    from gradwire.server.scheduler import Scheduler
    from gradwire.server.states import JobState
    from gradwire.server.store import JobStore
    from gradwire.server.telemetry_gate import TelemetryGate, new_secret, secret_digest
    from gradwire.server.telemetry_sink import TelemetrySink

    profiles = ThreadProfiles() if profile_path else None
    store = JobStore(db_url)
    metrics = CoordinatorMetrics()
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["workers"]["count"] = ranks_per_job
    spec["steps"] = steps
    launched: list[tuple[str, str]] = []
    for j in range(jobs):
        job = store.create({**spec, "name": f"telemetry-{j}"})[0]
        secret = new_secret()
        store.set_telemetry_digest(job.id, secret_digest(secret))
        store.transition(job.id, JobState.STARTING, "benchmark launch")
        store.transition(job.id, JobState.RUNNING, "benchmark launch")
        launched.append((job.id, secret))

    scheduler = Scheduler(store, _NoCluster(), metrics, telemetry_address=None)  # type: ignore[arg-type]
    gate = TelemetryGate()
    gate.attach(store)
    clock = {"first": None, "last": 0.0, "store_s": 0.0, "metrics_s": 0.0, "reports": 0, "calls": 0}

    def timed(fn: Callable, key: str) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[key] += time.perf_counter() - began

        return wrapper

    # instance attributes shadow the methods the scheduler's callback calls: timing only
    for name in ("add_points", "add_reports"):  # whichever the scheduler's callback uses
        if hasattr(store, name):
            setattr(store, name, timed(getattr(store, name), "store_s"))
    metrics.observe_reports = timed(metrics.observe_reports, "metrics_s")  # type: ignore[method-assign]

    def on_reports(reports: list) -> Any:
        began = time.perf_counter()
        kept = scheduler.on_reports(reports)
        ended = time.perf_counter()
        if clock["first"] is None:
            clock["first"] = began
        clock["last"] = ended
        clock["reports"] += len(reports)
        clock["calls"] += 1
        return kept

    def on_counts(what: str, count: int) -> None:  # Coordinator._count_reports
        if what == "received":
            metrics.reports_received(count)
        else:
            metrics.reports_dropped(what, count)

    sink = TelemetrySink(on_reports, host="127.0.0.1", port=0, on_counts=on_counts, gate=gate)
    if profiles is not None:
        profiles.start()
    port = sink.start()
    done = threading.Event()

    def stats() -> dict:
        with store.engine.connect() as connection:
            points = connection.scalar(select(func.count()).select_from(JobPointRow.__table__)) or 0
        steps = 0.0
        for family in metrics.registry.collect():
            if family.name == "gradwire_train_steps":
                steps = sum(s.value for s in family.samples if s.name.endswith("_total"))
        return {**clock, "received": sink.received, "duplicates": sink.duplicates,
                "rejected": sink.rejected, "dropped": sink.dropped(), "callback_errors": sink.callback_errors,
                "points": points, "metric_steps": steps, "rss": rss_bytes(),
                "max_streams": sink.max_workers}  # fmt: skip

    threading.Thread(target=_control_loop, args=(conn, done.set, stats), daemon=True).start()
    conn.send((port, launched))
    done.wait()
    sink.stop()
    gate.detach()
    if profiles is not None and profile_path:
        profiles.dump(Path(profile_path))
    store.close()
    conn.send("stopped")


class Child:
    """A spawned server process and the pipe to it."""

    def __init__(self, target: Callable, *args: Any) -> None:
        context = mp.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=target, args=(*args, child_conn), daemon=True)
        self.process.start()
        deadline = time.monotonic() + 120
        while not self.conn.poll(0.2):
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{target.__name__} did not start")
        self.hello = self.conn.recv()

    def cpu(self) -> tuple[float, float]:
        self.conn.send("cpu")
        return tuple(self.conn.recv())  # type: ignore[return-value]

    def ask(self, message: str) -> Any:
        self.conn.send(message)
        return self.conn.recv()

    def stop(self) -> None:
        try:
            self.conn.send("stop")
            if self.conn.poll(60):
                self.conn.recv()
        finally:
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)


# --- HTTP load ---------------------------------------------------------------------------------
