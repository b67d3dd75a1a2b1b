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


def sink_server(db_url: str, jobs: int, profile_path: str | None, conn: Connection) -> None:
    """Child process: the gRPC sink, its callback storing points and feeding the metrics."""
    from gradwire.server.metrics import CoordinatorMetrics
    from gradwire.server.report_points import report_point
    from gradwire.server.store import JobStore
    from gradwire.server.telemetry_sink import TelemetrySink

    profiles = ThreadProfiles() if profile_path else None
    store = JobStore(db_url)
    metrics = CoordinatorMetrics()
    spec = yaml.safe_load(EXAMPLE.read_text())
    job_ids = [store.create({**spec, "name": f"telemetry-{j}"})[0].id for j in range(jobs)]
    clock = {"first": None, "last": 0.0, "store_s": 0.0, "metrics_s": 0.0, "reports": 0, "calls": 0}

    def on_reports(reports: list) -> None:
        """What the scheduler's callback does with a batch: store the points, feed the metrics."""
        began = time.perf_counter()
        by_job: dict[str, list] = {}
        for report in reports:
            by_job.setdefault(report.job_id, []).append(report)
        for job_id, batch in by_job.items():
            store.add_points(job_id, [report_point(r) for r in batch])
        stored = time.perf_counter()
        metrics.observe_reports(reports)
        ended = time.perf_counter()
        if clock["first"] is None:
            clock["first"] = began
        clock["last"] = ended
        clock["store_s"] += stored - began
        clock["metrics_s"] += ended - stored
        clock["reports"] += len(reports)
        clock["calls"] += 1

    sink = TelemetrySink(on_reports, host="127.0.0.1", port=0)
    if profiles is not None:
        profiles.start()
    port = sink.start()
    done = threading.Event()

    def stats() -> dict:
        points = sum(len(store.points(job_id, rank=None, max_points=None)) for job_id in job_ids)
        steps = 0.0
        for family in metrics.registry.collect():
            if family.name == "gradwire_train_steps":
                steps = sum(s.value for s in family.samples if s.name.endswith("_total"))
        return {**clock, "received": sink.received, "duplicates": sink.duplicates,
                "rejected": sink.rejected, "callback_errors": sink.callback_errors,
                "points": points, "metric_steps": steps}  # fmt: skip

    threading.Thread(target=_control_loop, args=(conn, done.set, stats), daemon=True).start()
    conn.send((port, job_ids))
    done.wait()
    sink.stop()
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
