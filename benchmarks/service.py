#!/usr/bin/env python
"""Coordinator service benchmark: REST submissions and reads over loopback, telemetry ingestion.

What it measures:

1. ``POST /v1/jobs`` (a small valid JobSpec, bearer auth) against a real uvicorn server on
   127.0.0.1 with a SQLite file store and ``NullControl`` (nothing is admitted, every job stays
   QUEUED): throughput and p50/p99 latency with 1 client and with ``--clients`` concurrent
   clients (threads, one ``httpx.Client`` each, keep-alive).
2. ``GET /v1/jobs/{id}`` on the jobs just created, same two client counts.
3. Telemetry ingestion: ``--ranks`` (256) ``TelemetryClient`` instances (the workers' real gRPC
   client, each with its job's secret) stream StepReports into the coordinator's telemetry path as
   ``Coordinator._start`` wires it (``TelemetrySink`` + ``TelemetryGate`` + ``Scheduler.on_reports``:
   the points into a SQLite file store, the metrics); end to end = points counted in the store at
   the end / wall time. Then ``--unknown`` (100,000) reports for unknown job ids, the sink
   process's RSS read before and after (``--telemetry-only`` skips the REST phases).

The server and the sink each run in a process of their own (spawned), so the load generator (this
process) does not share their interpreter lock; on a 2-core machine the two sides still share the
cores. Besides wall-clock numbers, the server process's CPU time per request is reported: it is
less sensitive to whatever else runs on the machine.

Results are printed and, with ``--out``, written into that markdown file between
``<!-- service:begin -->`` and ``<!-- service:end -->`` (the rest of the file is left alone).
``--profile DIR`` runs the server and the sink under cProfile (every thread), writes
``DIR/rest.prof`` and ``DIR/sink.prof`` and prints their top functions; a profiled run is slower,
so it does not write ``--out``.

    python benchmarks/service.py --out docs/benchmarks.md     # full run, about 1-3 minutes
    python benchmarks/service.py --quick                       # smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import platform
import pstats
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from benchmarks.sections import write_section  # noqa: E402
from benchmarks.service_servers import (  # noqa: E402
    EXAMPLE,
    TOKEN,
    Child,
    _cpu_seconds,
    rest_server,
    sink_server,
)

BEGIN, END = "<!-- service:begin -->", "<!-- service:end -->"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TARGET_SUBMISSIONS_PER_S = 500.0
TARGET_GET_P99_MS = 50.0
TARGET_REPORTS_PER_S = 10_000.0
TARGET_RSS_GROWTH_MIB = 5.0


def _since(before: tuple[float, float], after: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


def _split(cpu: tuple[float, float], per: float, scale: float) -> str:
    """``user + system`` per item, e.g. ``3.10 + 1.20``."""
    return f"{cpu[0] * scale / per:.2f} + {cpu[1] * scale / per:.2f}"


# --- profiling in the child processes ----------------------------------------------------------


@dataclass
class HttpResult:
    label: str
    clients: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    server_cpu_s: tuple[float, float]  # user, system
    errors: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def http_phase(
    url: str,
    server: Child,
    label: str,
    clients: int,
    count: int,
    request: Callable[[httpx.Client, int], httpx.Response],
    expect: int,
    collect: list | None = None,
) -> HttpResult:
    """``count`` requests split over ``clients`` threads, all released together after a warm-up."""
    start = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients

    def worker(index: int) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=120.0) as client:
            client.get("/healthz")  # opens the connection; not measured
            start.wait()
            for k in range(index, count, clients):
                began = time.perf_counter()
                response = request(client, k)
                latencies[index].append((time.perf_counter() - began) * 1e3)
                if response.status_code != expect:
                    errors[index] += 1
                elif collect is not None:
                    collect.append(response.json()["id"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    cpu_before = server.cpu()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    server_cpu = _since(cpu_before, server.cpu())
    flat = [x for part in latencies for x in part]
    return HttpResult(label, clients, count, seconds, flat, server_cpu, sum(errors))


# --- telemetry load ----------------------------------------------------------------------------


@dataclass
class TelemetryResult:
    ranks: int
    jobs: int
    reports: int
    seconds: float
    acknowledged: bool
    sink: dict[str, Any]
    sink_cpu_s: tuple[float, float]  # user, system
    client_cpu_s: tuple[float, float]
    batch_size: int

    @property
    def stored(self) -> int:
        return int(self.sink["points"])

    @property
    def end_to_end_rate(self) -> float:
        """Points the store holds at the end over the wall time from the first ``report()``."""
        return self.stored / self.seconds

    @property
    def sink_rate(self) -> float:
        span = self.sink["last"] - (self.sink["first"] or self.sink["last"])
        return self.sink["reports"] / span if span > 0 else float("nan")


def telemetry_phase(sink: Child, ranks: int, per_rank: int, batch_size: int | None) -> TelemetryResult:
    """``ranks`` real ``TelemetryClient``s (each with its job's secret) stream ``per_rank`` reports
    each into the sink; ends when every client's ``close()`` has the sink's acknowledgement."""
    from gradwire.worker.telemetry import TelemetryClient

    port, launched = sink.hello
    address = f"127.0.0.1:{port}"
    jobs = len(launched)
    extra = {} if batch_size is None else {"batch_size": batch_size}
    clients = []
    for r in range(ranks):
        job_id, secret = launched[r % jobs]
        clients.append(
            TelemetryClient(address, job_id, r // jobs, max_buffer=per_rank + 1, token=secret, **extra)
        )
    sink_cpu_before, client_cpu_before = sink.cpu(), _cpu_seconds()
    began = time.perf_counter()
    for step in range(1, per_rank + 1):
        for rank, client in enumerate(clients):
            client.report(
                {"step": step, "loss": 2.0 / step, "accuracy": 0.9 if step % 50 == 0 else None,
                 "compute_s": 0.012, "compress_s": 0.002, "communicate_s": 0.004, "wait_s": 0.0005 * rank,
                 "bytes_sent": 4_000 * step, "bytes_uncompressed": 400_000 * step,
                 "compressor": "powersgd", "samples": 32, "learning_rate": 0.1, "epoch": step // 100}
            )  # fmt: skip
    closed = [client.close(timeout=600) for client in clients]  # every one, even after a failure
    acknowledged = all(closed)
    seconds = time.perf_counter() - began
    sink_cpu, client_cpu = _since(sink_cpu_before, sink.cpu()), _since(client_cpu_before, _cpu_seconds())
    return TelemetryResult(
        ranks,
        jobs,
        ranks * per_rank,
        seconds,
        acknowledged,
        sink.ask("stats"),
        sink_cpu,
        client_cpu,
        clients[0].batch_size,
    )


@dataclass
class UnknownJobsResult:
    reports: int
    calls: int
    seconds: float
    refused_calls: int
    rss_mib: list[tuple[int, float]]  # (reports sent so far, sink RSS MiB)
    dropped: dict[str, int]

    @property
    def growth_mib(self) -> float:
        return self.rss_mib[-1][1] - self.rss_mib[0][1]


def unknown_jobs_phase(sink: Child, total: int, per_call: int, threads: int = 4) -> UnknownJobsResult:
    """``total`` StepReports for job ids the coordinator never heard of, every one a new id, in
    ``StreamReports`` calls of one ``per_call``-report batch each (a wrong secret in the metadata),
    from ``threads`` threads; the sink's RSS is read before and after each quarter."""
    import grpc

    from gradwire.protos import TELEMETRY_TOKEN_METADATA
    from gradwire.protos import telemetry_pb2 as pb
    from gradwire.protos import telemetry_pb2_grpc as pb_grpc

    port, _ = sink.hello
    metadata = ((TELEMETRY_TOKEN_METADATA, "not-the-secret-of-any-job"),)
    calls = (total + per_call - 1) // per_call
    refused = [0] * threads
    rss = [(0, sink.ask("stats")["rss"] / 2**20)]
    began = time.perf_counter()
    done = 0
    for quarter in range(4):
        first, last = calls * quarter // 4, calls * (quarter + 1) // 4

        def worker(index: int, first: int = first, last: int = last) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TelemetryStub(channel)
                for call in range(first + index, last, threads):
                    batch = pb.ReportBatch(reports=[
                        pb.StepReport(job_id=f"job-unknown-{call:07d}-{k:03d}", rank=k % 8, step=call,
                                      loss=1.0, compute_s=0.01, bytes_sent=1_000, compressor="powersgd")
                        for k in range(per_call)
                    ])  # fmt: skip
                    try:
                        stub.StreamReports(iter([batch]), metadata=metadata, timeout=30)
                    except grpc.RpcError as err:
                        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                            refused[index] += 1

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        done += (last - first) * per_call
        rss.append((done, sink.ask("stats")["rss"] / 2**20))
    seconds = time.perf_counter() - began
    return UnknownJobsResult(done, calls, seconds, sum(refused), rss, sink.ask("stats")["dropped"])


# --- report ------------------------------------------------------------------------------------


def machine() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        rev = "unknown"
    model = ""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        model = f" ({found.group(1).strip()})" if found else ""
    except OSError:
        pass
    import fastapi
    import sqlalchemy
    import uvicorn

    return (
        f"{os.cpu_count()} CPU cores{model}, {platform.platform()}, Python {platform.python_version()}, "
        f"FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__} (h11, asyncio loop), "
        f"SQLAlchemy {sqlalchemy.__version__}; git {rev} + uncommitted changes"
    )


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def render(
    args: argparse.Namespace,
    http: list[HttpResult],
    telemetry: TelemetryResult,
    unknown: UnknownJobsResult,
    load: tuple[float, float],
    seconds: float,
) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/service.py" + (" --quick" if args.quick else "")
    cmd += " --telemetry-only" if args.telemetry_only else f" --clients {args.clients}"
    lines = [
        BEGIN,
        "## Coordinator service (REST over loopback, gRPC telemetry)",
        "",
        f"Produced by `{cmd} --out docs/benchmarks.md` on {now} ({seconds:.0f} s).",
        "",
        f"Machine: {machine()}. 1-minute load average {load[0]:.2f} before the run and {load[1]:.2f} "
        "after it: the 2 cores were shared with other work, which inflates every wall-clock number.",
        "",
    ]
    if http:
        lines += [
            " ".join(
                [
                    "Setup: the coordinator app (`create_app`, bearer auth on, SQLite file store in WAL",
                    "mode, `NullControl`: no cluster, every job stays QUEUED) on uvicorn as `gradwire serve`",
                    "starts",
                    "it (one process, `log_level=warning`), in a process of its own; the clients are threads",
                    "of the benchmark process, one keep-alive `httpx.Client` each, released together after",
                    "one warm-up request. Submissions are the digits-powersgd example spec with a unique",
                    "name; reads pick among the jobs just submitted. *Server CPU ms/request* is the server",
                    "process's CPU time over the phase divided by its requests.",
                ]
            ),
            "",
            "| request | clients | requests | requests/s | p50 ms | p99 ms "
            "| server CPU ms/request (user + system) | errors |",
            "|:---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in http:
            lines.append(
                f"| `{r.label}` | {r.clients} | {r.requests} | {r.throughput:,.0f} | "
                f"{r.percentile(50):.1f} | "
                f"{r.percentile(99):.1f} | {_split(r.server_cpu_s, r.requests, 1e3)} | {r.errors} |"
            )
        lines.append("")
    t = telemetry
    s = t.sink
    per_report = 1e6 / max(1, s["reports"])
    lines += [
        " ".join(
            [
                f"Telemetry: {t.ranks} `TelemetryClient`s (the workers' gRPC client, each with its job's",
                f"secret; {t.jobs} jobs × {t.ranks // t.jobs} ranks, batches of {t.batch_size} reports)",
                "each",
                f"report {t.reports // t.ranks:,} StepReports as fast as `report()` takes them. They stream",
                "into the coordinator's telemetry path as `Coordinator._start` wires it, in a process of its",
                "own (no Ray): the `TelemetrySink` (default stream limit,",
                f"{s['max_streams']} streams) with the `TelemetryGate` attached to the job store (secret,",
                "open job, bounds), its drop/receive counters feeding the metrics, and",
                "`Scheduler.on_reports` as the callback (`store.add_reports` into a SQLite file store,",
                "`metrics.observe_reports`). *End to end* is the points in the store at the end (counted",
                "there) over the wall time from the first `report()` until every client's `close()` got",
                "the sink's acknowledgement; *sink side* is the reports handed to the callback from its",
                "first call's start to its last call's end. The clients run in the benchmark process, on",
                "the same 2 cores as the sink.",
            ]
        ),
        "",
        "| measurement | value |",
        "|:---|---:|",
        f"| StepReports sent / acknowledged by all clients | {t.reports:,} / {'all' if t.acknowledged else 'NOT all'} |",  # noqa: E501
        f"| stored points (counted in the store) / duplicates / rejected / callback errors | {t.stored:,} / "
        f"{s['duplicates']} / {s['rejected']} / {s['callback_errors']} |",
        f"| wall time, s | {t.seconds:.2f} |",
        f"| **end to end, stored StepReports/s** | **{t.end_to_end_rate:,.0f}** |",
        f"| sink side, StepReports/s | {t.sink_rate:,.0f} |",
        f"| callback calls (reports per call) | {s['calls']:,} ({s['reports'] / max(1, s['calls']):.0f}) |",
        f"| callback: storing the points µs/report | {s['store_s'] * per_report:.1f} |",
        f"| callback: `metrics.observe_reports` µs/report | {s['metrics_s'] * per_report:.1f} |",
        f"| sink process CPU µs/report, user + system (gRPC, gate, callback) | "
        f"{_split(t.sink_cpu_s, t.reports, 1e6)} |",
        f"| client process CPU µs/report, user + system (`report()` + gRPC) | "
        f"{_split(t.client_cpu_s, t.reports, 1e6)} |",
        "",
        " ".join(
            [
                f"Unknown jobs: then {unknown.reports:,} StepReports for job ids the coordinator never",
                f"heard of (every report a new id; {unknown.calls:,} `StreamReports` calls of one batch of",
                f"{unknown.reports // max(1, unknown.calls)}, a wrong secret, 4 threads), into the same",
                "sink process; its resident memory (`VmRSS`) before and after each quarter:",
            ]
        ),
        "",
        "| reports for unknown jobs sent | sink RSS MiB |",
        "|---:|---:|",
        *[f"| {n:,} | {m:.1f} |" for n, m in unknown.rss_mib],
        "",
        f"{unknown.refused_calls:,} of {unknown.calls:,} calls refused `UNAUTHENTICATED` in "
        f"{unknown.seconds:.1f} s; dropped counts at the end: "
        + ", ".join(f"{k} {v:,}" for k, v in unknown.dropped.items())
        + ".",
        "",
        "Targets:",
        "",
    ]
    if http:
        post = next(r for r in http if r.label.startswith("POST") and r.clients == args.clients)
        gets = [r for r in http if r.label.startswith("GET")]
        lines.append(
            f"- submissions: {post.throughput:,.0f}/s with {post.clients} clients "
            f"(target ≥ {TARGET_SUBMISSIONS_PER_S:,.0f}/s: "
            f"{_verdict(post.throughput >= TARGET_SUBMISSIONS_PER_S)})"
        )
        for r in gets:
            p99 = r.percentile(99)
            lines.append(
                f"- `GET /v1/jobs/{{id}}` p99 with {r.clients} client{'s' * (r.clients != 1)}: {p99:.1f} ms "
                f"(target ≤ {TARGET_GET_P99_MS:.0f} ms: {_verdict(p99 <= TARGET_GET_P99_MS)})"
            )
    lines.append(
        f"- telemetry ingestion: {t.end_to_end_rate:,.0f} stored StepReports/s end to end with {t.ranks} "
        f"ranks (target ≥ {TARGET_REPORTS_PER_S:,.0f}/s: "
        f"{_verdict(t.end_to_end_rate >= TARGET_REPORTS_PER_S)})"
    )
    flat = unknown.growth_mib <= TARGET_RSS_GROWTH_MIB
    lines.append(
        f"- coordinator memory under {unknown.reports:,} reports for unknown jobs: sink RSS "
        f"{unknown.rss_mib[0][1]:.1f} → {unknown.rss_mib[-1][1]:.1f} MiB ({unknown.growth_mib:+.1f} MiB; "
        f"target: flat, within {TARGET_RSS_GROWTH_MIB:.0f} MiB: {_verdict(flat)})"
    )
    lines += ["", NOTES, "", END]
    return "\n".join(lines) + "\n"


#: Where the time goes: cProfile of the server and sink processes (``--profile``) on 2026-11-28.
NOTES = " ".join(
    [
        "Where the time goes (cProfile of the server and sink processes, `--profile`, 2026-11-28):",
        "the server is mostly CPU-bound, almost all of it user time in Python, spread thinly over the stack",
        "rather than spent in SQL. Of a `GET /v1/jobs/{id}`'s CPU, about a quarter is FastAPI,",
        "Starlette and anyio (dependency solving and four thread-pool hops per request: the sync",
        "`require_token` and `get_services` dependencies, the sync route and its response validation),",
        "a fifth SQLAlchemy's ORM (a Session, statement-cache look-up and ORM row loading for one",
        "primary-key read; about 30 % for a POST), a fifth uvicorn's pure-Python h11 parser and the",
        "asyncio loop, about 1 % pydantic and 2 % gradwire's own code; the rest is a long tail.",
        "Concurrent POSTs also queue on SQLite's write lock (`BEGIN IMMEDIATE`), where a waiting",
        "writer sleeps in SQLite's busy handler (backing off up to 100 ms) rather than being woken when",
        "the lock frees: that is the long POST p99 with many clients (an in-process lock around write",
        "transactions, tried in a scratch copy, cut the 16-client POST p99 from about 1 s to about",
        "0.35 s). Telemetry (cProfile of the sink, `--profile --telemetry-only --quick`, 2026-12-06):",
        "before, the sink allowed 64 streams, so 192 of 256 ranks were refused `RESOURCE_EXHAUSTED` and",
        "backed off (a short run even lost reports a closing client could not deliver), and the callback",
        "stored each job's points in a transaction of its own after a `JobPoint` validation per report",
        "and fed the metrics report by report (six to eleven `labels()` look-ups each). Now the sink",
        "serves up to 1024 streams, `Scheduler.on_reports` stores a whole sink batch in one transaction",
        "(`JobStore.add_reports`: one job-id look-up and one `INSERT ... ON CONFLICT DO NOTHING",
        "RETURNING` over every job's rows built straight from the StepReports) and `observe_reports`",
        "folds a batch per job (byte increases summed, one `labels()` look-up per series and call, then",
        "prometheus_client's own `observe` per value): the callback's CPU per report halved. Side by side",
        "on the loaded machine (CI running beside it), 652f595's code stored 5,423 reports/s and this code",
        "11,092. What is left in the sink is mostly grpcio's Python server layer per message and",
        "stream (receive, locks, the aborted calls of the unknown-job phase) and SQLAlchemy's statement",
        "handling; the wall time inside the callback is inflated by GIL contention with the stream",
        "threads. Meeting the targets on one core",
        "needs about 2 ms of",
        "CPU per submission and under 100 µs per report: async auth/services dependencies, Core SQL",
        "(or `Session.get`) on the hot paths, that write lock, cached per-job metric children and",
        "several telemetry batches per store transaction are the candidates. With 2 cores shared by",
        "the server, the clients and other work, the wall-clock rates here are a lower bound.",
    ]
)


def write(out: Path, section: str) -> None:
    write_section(out, section, BEGIN, END)


def print_profile(path: Path, title: str, top: int = 25) -> None:
    buffer = io.StringIO()
    stats = pstats.Stats(str(path), stream=buffer)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    print(f"\n===== {title}: top {top} by own time ({path}) =====")
    print(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default 16)")
    parser.add_argument(
        "--submissions", type=int, default=None, help="POSTs with all clients (2000; quick 300)"
    )
    parser.add_argument("--gets", type=int, default=None, help="GETs with all clients (4000; quick 600)")
    parser.add_argument("--ranks", type=int, default=256, help="TelemetryClients (default 256, over --jobs)")
    parser.add_argument("--jobs", type=int, default=4, help="jobs the ranks belong to (default 4)")
    parser.add_argument("--reports", type=int, default=None, help="StepReports per rank (400; quick 100)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="TelemetryClient batch_size (default: the client's)"
    )
    parser.add_argument(
        "--unknown", type=int, default=None, help="reports for unknown job ids (100000; quick 20000)"
    )
    parser.add_argument("--telemetry-only", action="store_true", help="skip the REST phases")
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the servers into this folder")
    parser.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    parser.add_argument("--workdir", type=Path, default=None, help="where the SQLite files go (a temp dir)")
    args = parser.parse_args()
    args.submissions = args.submissions or (300 if args.quick else 2000)
    args.gets = args.gets or (600 if args.quick else 4000)
    args.reports = args.reports or (100 if args.quick else 400)
    args.unknown = args.unknown or (20_000 if args.quick else 100_000)
    if args.ranks % args.jobs:
        parser.error("--ranks must be a multiple of --jobs")
    for name in list(os.environ):  # the children build Settings; an operator's GRADWIRE_* must not leak in
        if name.upper().startswith("GRADWIRE_"):
            del os.environ[name]

    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gradwire-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    rest_profile = str(args.profile / "rest.prof") if args.profile else None
    sink_profile = str(args.profile / "sink.prof") if args.profile else None
    spec = yaml.safe_load(EXAMPLE.read_text())
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    http: list[HttpResult] = []
    if not args.telemetry_only:
        server = Child(rest_server, f"sqlite:///{workdir / 'rest.db'}", rest_profile)
        url = f"http://127.0.0.1:{server.hello}"
        created: list[str] = []
        try:

            def submit(tag: str) -> Callable[[httpx.Client, int], httpx.Response]:
                return lambda client, k: client.post("/v1/jobs", json={**spec, "name": f"{tag}-{k}"})

            def read(client: httpx.Client, k: int) -> httpx.Response:
                return client.get(f"/v1/jobs/{created[(k * 7919) % len(created)]}")

            single = max(50, args.submissions // 5)
            http.append(http_phase(url, server, "POST /v1/jobs", 1, single, submit("one"), 202, created))
            print(_line(http[-1]))
            http.append(
                http_phase(
                    url, server, "POST /v1/jobs", args.clients, args.submissions, submit("many"), 202, created
                )
            )
            print(_line(http[-1]))
            http.append(http_phase(url, server, "GET /v1/jobs/{id}", 1, max(50, args.gets // 5), read, 200))
            print(_line(http[-1]))
            http.append(http_phase(url, server, "GET /v1/jobs/{id}", args.clients, args.gets, read, 200))
            print(_line(http[-1]))
        finally:
            server.stop()

    sink = Child(
        sink_server, f"sqlite:///{workdir / 'sink.db'}", args.jobs, args.ranks // args.jobs,
        args.reports + 1000, sink_profile,
    )  # fmt: skip
    try:
        telemetry = telemetry_phase(sink, args.ranks, args.reports, args.batch_size)
        print(
            f"telemetry: {telemetry.reports} reports, stored {telemetry.stored} "
            f"in {telemetry.seconds:.2f} s: "
            f"end to end {telemetry.end_to_end_rate:,.0f}/s, sink side {telemetry.sink_rate:,.0f}/s"
        )
        unknown = unknown_jobs_phase(sink, args.unknown, per_call=8)
        print(
            f"unknown jobs: {unknown.reports} reports in {unknown.calls} calls, {unknown.seconds:.1f} s; "
            f"sink RSS {' -> '.join(f'{m:.1f}' for _, m in unknown.rss_mib)} MiB"
        )
    finally:
        sink.stop()
    seconds = time.perf_counter() - started
    section = render(args, http, telemetry, unknown, (load_before, os.getloadavg()[0]), seconds)
    print(section)
    if args.profile is not None:
        if not args.telemetry_only:
            print_profile(args.profile / "rest.prof", "REST server")
        print_profile(args.profile / "sink.prof", "telemetry sink")
        if args.out is not None:
            print(f"not writing {args.out}: a profiled run is slower than a plain one")
    elif args.out is not None:
        write(args.out, section)
        print(f"wrote {args.out}")


def _line(r: HttpResult) -> str:
    return (
        f"{r.label} x{r.clients}: {r.requests} in {r.seconds:.2f} s = {r.throughput:,.0f}/s, "
        f"p50 {r.percentile(50):.1f} ms, p99 {r.percentile(99):.1f} ms, errors {r.errors}"
    )


if __name__ == "__main__":
    main()
