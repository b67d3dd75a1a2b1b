"""The coordinator's gRPC telemetry sink: ``gradwire.v1.Telemetry/StreamReports``.

Each worker rank streams ``ReportBatch`` messages (see ``protos/telemetry.proto`` and
the client in ``worker/telemetry.py``); the sink validates the reports, drops duplicates, hands each
batch's new reports to one callback, and answers with a ``StreamSummary`` when the worker closes
its stream.

Duplicates. The worker client is at-least-once: after a broken stream it re-sends, in the same
order, reports the sink may already have seen. The sink therefore remembers, per ``(job_id, rank)``,
the last report it accepted (its ``step`` and ``wall_time``; O(1) memory per rank, however long the
job) and accepts a report only when it comes later in that rank's sequence:

* a higher ``step`` than the last accepted one: new;
* the same or a lower ``step`` with a *later* ``wall_time``: a step run again after the worker
  group was restored from an older checkpoint: new, so the metrics see the restart;
* otherwise (same or lower step, no later wall time): a re-sent report: counted in ``duplicates``.

This relies on a rank sending its reports in order, which the client guarantees; a report with no
``wall_time`` is judged by ``step`` alone. :meth:`TelemetrySink.forget_job` drops a job's entries.

Callback. ``on_reports(list[StepReport])`` is called with each batch's new reports, in arrival order,
never concurrently (calls are serialised, so the callback needs no locking of its own). It returns
the reports it kept (stored), or ``None`` for all of them; the others, and all of a batch whose call
raised (the error is logged, counted in ``callback_errors``), are dropped as ``callback_error`` and
the stream goes on: telemetry must not stall a worker, and re-sending would not help since those
reports are already marked as seen. Only kept reports count as received, so the worker's client
logs the shortfall.

Counts. ``on_counts(what, n)``, when given, hears about every report as it is settled: ``what`` is
``"received"`` or a drop reason (``invalid``, ``unknown_job``, ``unauthenticated``, ``duplicate``,
``callback_error``); the coordinator feeds its Prometheus counters from it. The same numbers are
kept in the sink (:attr:`received`, :meth:`dropped`). Nothing is kept per refused job id.

Security. With a ``gate`` (:class:`~gradwire.server.telemetry_gate.TelemetryGate`, what the
coordinator runs) every batch is checked before anything else happens: the caller's per-job secret
(gRPC metadata ``gradwire-telemetry-token``, read once per call) must match the job's, the job must
be STARTING, RUNNING or RESTARTING, and each report must lie within the gate's bounds (rank, step,
wall time near now, bytes), its ``compressor`` label being set to the job's own. The first report of
a job the caller may not write ends the call with ``UNAUTHENTICATED`` (one status for unknown jobs,
finished jobs and wrong secrets alike, so the sink is no oracle of which job ids exist); that and
the rest of its batch are dropped as ``unknown_job`` or ``unauthenticated``. Bounds are checked
before de-duplication, so no report can make the sink drop later genuine ones. ``tls_cert`` and
``tls_key`` (PEM files) make the sink serve TLS only (``grpc.ssl_server_credentials``). Binding
beyond loopback still needs ``allow_remote=True``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path

import grpc

from gradwire.protos import TELEMETRY_TOKEN_METADATA
from gradwire.protos import telemetry_pb2 as pb
from gradwire.protos import telemetry_pb2_grpc as pb_grpc
from gradwire.server.telemetry_gate import TelemetryGate, token_digest

log = logging.getLogger(__name__)

__all__ = [
    "MAX_JOB_ID_CHARS",
    "MAX_NODE_ADDRESS_CHARS",
    "MAX_RANK",
    "TelemetrySink",
    "is_loopback",
    "validate_report",
]

#: Longest job id accepted (it becomes a Prometheus label value and a dictionary key).
MAX_JOB_ID_CHARS = 256
#: Ranks must lie in ``[0, MAX_RANK)``.
MAX_RANK = 1 << 16
#: Longest node address accepted, and its characters (an IPv4/IPv6 address or a host name).
MAX_NODE_ADDRESS_CHARS = 64
_NODE_ADDRESS = re.compile(r"[0-9A-Za-z.:_%\[\]-]*")
_DURATIONS = ("compute_s", "compress_s", "communicate_s", "wait_s")
_WALL_SLACK_NS = 1_000_000  # see TelemetrySink.remember


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: ``localhost``, 127.0.0.0/8 or ``::1``."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_report(report: pb.StepReport) -> str | None:
    """Why ``report`` cannot be accepted, or ``None`` when it is fine."""
    if not report.job_id:
        return "empty job_id"
    if len(report.job_id) > MAX_JOB_ID_CHARS:
        return f"job_id longer than {MAX_JOB_ID_CHARS} characters"
    if not 0 <= report.rank < MAX_RANK:
        return f"rank {report.rank} outside [0, {MAX_RANK})"
    if len(report.node_address) > MAX_NODE_ADDRESS_CHARS or not _NODE_ADDRESS.fullmatch(report.node_address):
        return f"node_address is not an address of at most {MAX_NODE_ADDRESS_CHARS} characters"
    for name in _DURATIONS:
        seconds = getattr(report, name)
        if not (math.isfinite(seconds) and seconds >= 0):
            return f"{name}={seconds} is not a finite, non-negative duration"
    return None


class _Servicer(pb_grpc.TelemetryServicer):
    def __init__(self, sink: TelemetrySink) -> None:
        self._sink = sink

    def StreamReports(self, request_iterator: Iterator[pb.ReportBatch], context: grpc.ServicerContext):
        return self._sink._serve_stream(request_iterator, context)


class TelemetrySink:
    """gRPC server for worker telemetry; see the module docstring for its guarantees.

    ``max_workers`` bounds the streams served at once (each open stream holds one server thread;
    a job holds one stream per rank); further calls are refused with ``RESOURCE_EXHAUSTED`` and
    the worker clients retry with backoff. ``max_receive_message_length`` caps one ``ReportBatch``
    in bytes. ``accept_job(job_id) -> bool``, when given, is asked once per job and stream; a report
    for a job it refuses aborts the stream with ``NOT_FOUND`` (without a ``gate`` only: a gate
    decides instead, see the module docstring).
    """

    def __init__(
        self,
        on_reports: Callable[[list[pb.StepReport]], Iterable[pb.StepReport] | None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 1024,
        max_receive_message_length: int = 4 * 1024 * 1024,
        allow_remote: bool = False,
        accept_job: Callable[[str], bool] | None = None,
        on_counts: Callable[[str, int], None] | None = None,
        gate: TelemetryGate | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        if not allow_remote and not is_loopback(host):
            raise ValueError(
                f"refusing to serve telemetry on non-loopback host {host!r}; pass allow_remote=True "
                "(with a gate, and TLS unless the network is trusted) to expose it"
            )
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (tls_cert and tls_key)")
        if max_workers < 1 or max_receive_message_length < 1:
            raise ValueError("max_workers and max_receive_message_length must be >= 1")
        self.on_reports = on_reports
        self.host = host
        self.port = int(port)
        self.max_workers = int(max_workers)
        self.max_receive_message_length = int(max_receive_message_length)
        self.accept_job = accept_job
        self.on_counts = on_counts
        self.gate = gate
        # read now: a missing or unreadable file fails the coordinator's start, not the first call
        self._tls = None if tls_cert is None else (Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())
        self._lock = threading.Lock()  # counters and de-duplication state
        self._deliver = threading.Lock()  # serialises on_reports
        self._last: dict[tuple[str, int], tuple[int, int]] = {}  # (job, rank) -> (step, wall_time ns)
        self._received = 0
        self._duplicates = 0
        self._invalid = 0
        self._unknown_job = 0
        self._unauthenticated = 0
        self._callback_errors = 0
        self._callback_lost = 0
        self._server: grpc.Server | None = None
        self._bound: int | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> int:
        """Start serving; returns the bound port (the chosen one when ``port=0``)."""
        if self._server is not None:
            raise RuntimeError("the telemetry sink is already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="gradwire-sink"),
            maximum_concurrent_rpcs=self.max_workers,
            options=[
                ("grpc.max_receive_message_length", self.max_receive_message_length),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_TelemetryServicer_to_server(_Servicer(self), server)
        target = f"{_bracket(self.host)}:{self.port}"
        try:
            if self._tls is not None:
                bound = server.add_secure_port(target, grpc.ssl_server_credentials([self._tls]))
            else:
                bound = server.add_insecure_port(target)
        except RuntimeError as exc:  # newer grpcio raises instead of returning 0
            raise OSError(f"telemetry sink could not bind {target}: {exc}") from exc
        if not bound:
            raise OSError(f"telemetry sink could not bind {target}")
        server.start()
        self._server, self._bound = server, bound
        log.info("telemetry sink listening on %s", self.address)
        return bound

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving; open streams get ``grace`` seconds to finish. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()

    def __enter__(self) -> TelemetrySink:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``host:port`` for ``TelemetryClient`` (valid once started)."""
        if self._bound is None:
            raise RuntimeError("the telemetry sink is not started")
        return f"{_bracket(self.host)}:{self._bound}"

    # ---------------------------------------------------------------- counters

    @property
    def received(self) -> int:
        """Reports accepted and handed to ``on_reports`` without error."""
        with self._lock:
            return self._received

    @property
    def duplicates(self) -> int:
        """Re-sent reports dropped by de-duplication."""
        with self._lock:
            return self._duplicates

    @property
    def rejected(self) -> int:
        """Invalid reports, and reports for jobs refused (unknown, finished, or a wrong secret)."""
        with self._lock:
            return self._invalid + self._unknown_job + self._unauthenticated

    def dropped(self) -> dict[str, int]:
        """Reports dropped so far by reason: ``invalid``, ``unknown_job``, ``unauthenticated``,
        ``duplicate`` and ``callback_error`` (reports ``on_reports`` did not keep)."""
        with self._lock:
            return {
                "invalid": self._invalid, "unknown_job": self._unknown_job,
                "unauthenticated": self._unauthenticated, "duplicate": self._duplicates,
                "callback_error": self._callback_lost,
            }  # fmt: skip

    def _count(self, what: str, n: int) -> None:
        """Tell ``on_counts`` (the coordinator's metrics) about ``n`` reports received or dropped."""
        if self.on_counts is None or n == 0:
            return
        try:
            self.on_counts(what, n)
        except Exception:
            log.exception("telemetry counting callback failed")

    @property
    def callback_errors(self) -> int:
        """Batches whose ``on_reports`` call raised."""
        with self._lock:
            return self._callback_errors

    def remember(self, job_id: str, rank: int, step: int, wall_time: float) -> None:
        """Seed the de-duplication state of ``(job_id, rank)`` with a report accepted before this
        sink started (a previous coordinator process stored it), so that the worker's re-sent
        reports up to it are dropped as duplicates instead of being counted again. ``wall_time``
        is unix seconds as the job store keeps it; it is rounded up by a millisecond, since a float
        of seconds does not keep every nanosecond (a step run again after a restore from a
        checkpoint comes seconds later, and is still accepted). A rank the sink already has an
        entry for is left alone."""
        wall = round(wall_time * 1e9) + _WALL_SLACK_NS
        with self._lock:
            self._last.setdefault((job_id, int(rank)), (int(step), wall))

    def forget_job(self, job_id: str) -> None:
        """Drop the de-duplication state of a finished job."""
        with self._lock:
            for key in [k for k in self._last if k[0] == job_id]:
                del self._last[key]

    # ---------------------------------------------------------------- serving

    def _is_new(self, report: pb.StepReport) -> bool:
        # caller holds self._lock
        key = (report.job_id, report.rank)
        step = report.step
        wall = report.wall_time.ToNanoseconds() if report.HasField("wall_time") else 0
        last = self._last.get(key)
        if last is not None and step <= last[0] and wall <= last[1]:
            return False
        self._last[key] = (step, wall)
        return True

    def _drop(self, kind: str, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            if kind == "invalid":
                self._invalid += n
            elif kind == "unauthenticated":
                self._unauthenticated += n
            else:
                self._unknown_job += n
        self._count(kind, n)

    def _serve_stream(self, batches: Iterator[pb.ReportBatch], context: grpc.ServicerContext):
        if self.gate is not None:
            return self._serve_gated(self.gate, batches, context)
        accepted = 0
        verdicts: dict[str, bool] = {}  # accept_job answers for this stream
        for batch in batches:
            valid: list[pb.StepReport] = []
            refused = None
            for report in batch.reports:
                reason = validate_report(report)
                if reason is None and self.accept_job is not None:
                    if report.job_id not in verdicts:
                        verdicts[report.job_id] = bool(self.accept_job(report.job_id))
                    if not verdicts[report.job_id]:
                        reason = refused = f"unknown job {report.job_id!r}"
                if reason is not None:
                    log.debug("rejected telemetry report (%s) from %s", reason, context.peer())
                    kind = "unknown_job" if reason is refused else "invalid"
                    with self._lock:
                        if kind == "invalid":
                            self._invalid += 1
                        else:
                            self._unknown_job += 1
                    self._count(kind, 1)
                    continue
                valid.append(report)
            accepted += self._deliver_new(valid)
            if refused is not None:
                context.abort(grpc.StatusCode.NOT_FOUND, refused)
        return pb.StreamSummary(received=accepted)

    def _serve_gated(
        self, gate: TelemetryGate, batches: Iterator[pb.ReportBatch], context: grpc.ServicerContext
    ):
        caller = _caller_digest(context)
        accepted = 0
        for batch in batches:
            admitted: list[pb.StepReport] = []
            refused: str | None = None
            invalid = 0
            reports = batch.reports
            for i, report in enumerate(reports):
                if validate_report(report) is not None:
                    invalid += 1
                    continue
                why = gate.admit(report.job_id, caller)
                if why is not None:  # this report and the rest of the batch; then the call ends
                    self._drop(why, len(reports) - i)
                    refused = report.job_id
                    break
                admitted.append(report)
            kept, broken = gate.screen(admitted)
            for reason in broken[:3]:
                log.debug("telemetry report out of bounds (%s) from %s", reason, context.peer())
            self._drop("invalid", invalid + len(broken))
            accepted += self._deliver_new(kept)
            if refused is not None:
                log.debug("telemetry for job %.64r refused from %s", refused, context.peer())
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"job {refused[:64]!r} accepts no telemetry from this caller (unknown, finished, or "
                    "a missing or wrong telemetry secret)",
                )
        return pb.StreamSummary(received=accepted)

    def _deliver_new(self, reports: list[pb.StepReport]) -> int:
        """De-duplicate and hand the new reports to ``on_reports``; returns how many were delivered."""
        if not reports:
            return 0
        with self._deliver:
            with self._lock:
                fresh = [r for r in reports if self._is_new(r)]
                self._duplicates += len(reports) - len(fresh)
            self._count("duplicate", len(reports) - len(fresh))
            if not fresh:
                return 0
            try:
                result = self.on_reports(fresh)
                kept = fresh if result is None else list(result)
            except Exception:
                log.exception("telemetry callback failed on %d report(s); they are dropped", len(fresh))
                with self._lock:
                    self._callback_errors += 1
                    self._callback_lost += len(fresh)
                self._count("callback_error", len(fresh))
                return 0
            if self.gate is not None:
                self.gate.commit(kept)
        lost = len(fresh) - len(kept)
        with self._lock:
            self._received += len(kept)
            self._callback_lost += lost
        self._count("received", len(kept))
        self._count("callback_error", lost)
        return len(kept)


def _caller_digest(context: grpc.ServicerContext) -> bytes | None:
    """SHA-256 of the telemetry secret the caller sent, or ``None`` when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == TELEMETRY_TOKEN_METADATA:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            return token_digest(text)
    return None


def _bracket(host: str) -> str:
    """IPv6 literals need brackets in a ``host:port`` target."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
