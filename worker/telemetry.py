"""Per-step telemetry from a training worker, without ever blocking training.

Two sinks with the same surface (``report``, ``close``, ``sent``, ``dropped``):

* :class:`TelemetryClient` streams :class:`StepReport` messages to the
  coordinator's gRPC sink (``gradwire.v1.Telemetry/StreamReports``, see
  ``protos/telemetry.proto``). ``report()`` only converts the
  report and appends it to a bounded buffer; a daemon thread batches the
  buffer onto a client stream, reconnects with capped exponential backoff
  while the sink is down, and re-sends what an interrupted stream may not
  have delivered (at-least-once: a sink may see a step twice after a broken
  stream and should de-duplicate on ``(job_id, rank, step)``).
* :class:`JsonlSink` is the fallback without a coordinator: one JSON object
  per line in a file of the run folder, plus an optional rich progress bar.

:func:`make_telemetry` picks one of them from an address (or ``None``).

Reports may be dicts, dataclasses or ``telemetry_pb2.StepReport`` messages
with the proto's field names; ``job_id``, ``rank`` and ``wall_time`` are
filled in when missing. ``wall_time`` is unix seconds (float) or a datetime.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradwire.protos import TELEMETRY_CA_ENV, TELEMETRY_TOKEN_ENV, TELEMETRY_TOKEN_METADATA
from gradwire.protos import telemetry_pb2 as pb

log = logging.getLogger(__name__)

__all__ = ["REPORT_FIELDS", "JsonlSink", "TelemetryClient", "make_telemetry", "to_proto"]

#: Field names a report may carry (those of ``gradwire.v1.StepReport``).
REPORT_FIELDS: frozenset[str] = frozenset(f.name for f in pb.StepReport.DESCRIPTOR.fields)

# gRPC's default receive limit is 4 MB; stay well below it per message.
_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _as_mapping(report: Any) -> dict[str, Any]:
    if isinstance(report, pb.StepReport):  # every field, zeros included (an unset accuracy left out)
        out: dict[str, Any] = {f.name: getattr(report, f.name) for f in report.DESCRIPTOR.fields}
        out["stragglers"] = list(report.stragglers)
        if not report.HasField("accuracy"):
            del out["accuracy"]
        if report.HasField("wall_time"):
            out["wall_time"] = report.wall_time.ToNanoseconds() / 1e9
        else:
            del out["wall_time"]
        if not report.job_id:  # unset: the sink's own
            del out["job_id"], out["rank"]
        return out
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    if isinstance(report, Mapping):
        return dict(report)
    raise TypeError(f"a report must be a mapping, a dataclass or a StepReport, not {type(report).__name__}")


def normalize(report: Any, job_id: str, rank: int) -> dict[str, Any]:
    """Return a plain dict of proto field names; fills job_id, rank and wall_time (unix seconds).

    Unknown keys raise ``ValueError`` (a typo should fail at the first step, not vanish);
    ``None`` values are treated as absent.
    """
    data = {k: v for k, v in _as_mapping(report).items() if v is not None}
    unknown = sorted(set(data) - REPORT_FIELDS)
    if unknown:
        raise ValueError(f"unknown StepReport field(s) {unknown}; known: {sorted(REPORT_FIELDS)}")
    data.setdefault("job_id", job_id)
    data.setdefault("rank", rank)
    wall = data.get("wall_time", time.time())
    if isinstance(wall, _dt.datetime):
        if wall.tzinfo is None:
            wall = wall.replace(tzinfo=_dt.timezone.utc)
        wall = wall.timestamp()
    data["wall_time"] = float(wall)
    if "stragglers" in data:
        data["stragglers"] = [int(r) for r in data["stragglers"]]
    return data


def to_proto(report: Any, job_id: str = "", rank: int = 0) -> pb.StepReport:
    """A ``gradwire.v1.StepReport`` for ``report``: a StepReport itself (what the train loop makes)
    is taken as it is, with ``job_id``, ``rank`` and ``wall_time`` filled in where unset; other
    shapes (see :func:`normalize`) are converted."""
    if isinstance(report, pb.StepReport):
        if report.job_id and report.HasField("wall_time"):
            return report
        msg = pb.StepReport()
        msg.CopyFrom(report)
        msg.job_id = msg.job_id or job_id
        if not report.job_id:
            msg.rank = msg.rank or rank
        if not msg.HasField("wall_time"):
            msg.wall_time.FromNanoseconds(time.time_ns())
        return msg
    data = normalize(report, job_id, rank)
    wall = data.pop("wall_time")
    msg = pb.StepReport(**data)
    msg.wall_time.FromNanoseconds(round(wall * 1e9))
    return msg


# --------------------------------------------------------------------------- gRPC client


class _Stream:
    """Book-keeping of one StreamReports call: every report pulled for it, in order."""

    __slots__ = ("dead", "items", "started")

    def __init__(self) -> None:
        self.items: list[pb.StepReport] = []
        self.dead = False
        self.started = time.monotonic()


class TelemetryClient:
    """Stream step reports to a gRPC telemetry sink from a background thread.

    ``report()`` never waits on the network: it appends to a buffer of at most
    ``max_buffer`` reports and, when the buffer is full, drops the report and
    counts it in ``dropped``. A daemon thread sends batches of up to
    ``batch_size`` reports (or whatever arrived within ``flush_s`` seconds) on
    one client stream, closes the stream every ``stream_max_reports`` reports or
    ``stream_max_s`` seconds to get the sink's acknowledgement (``sent`` counts
    acknowledged reports), and while the sink is unreachable retries with
    exponential backoff from ``backoff_initial_s`` up to ``backoff_max_s``.

    ``close(timeout)`` sends what it can within ``timeout`` seconds; reports
    still unsent then are added to ``dropped``. A sink that cannot be reached
    once closing has begun is not retried: the job's end is not held up by it.

    ``token`` is the job's telemetry secret, sent as gRPC metadata
    (``gradwire-telemetry-token``) on every call; a coordinator refuses reports without it.
    ``ca_file`` is a PEM file of CA certificates: given, the client dials the sink over TLS and
    checks its certificate against them. Both default to the environment the coordinator gives a
    launched job (``GRADWIRE_TELEMETRY_TOKEN``, ``GRADWIRE_TELEMETRY_CA``).
    """

    def __init__(
        self,
        address: str,
        job_id: str,
        rank: int,
        *,
        max_buffer: int = 10_000,
        batch_size: int = 64,
        flush_s: float = 0.5,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        stream_max_reports: int = 5_000,
        stream_max_s: float = 30.0,
        connect_timeout_s: float = 1.0,
        token: str | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        if max_buffer < 1 or batch_size < 1:
            raise ValueError("max_buffer and batch_size must be >= 1")
        if flush_s <= 0 or backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need flush_s > 0 and 0 < backoff_initial_s <= backoff_max_s")
        self.address = address
        self.job_id = job_id
        self.rank = int(rank)
        self.max_buffer = int(max_buffer)
        self.batch_size = int(batch_size)
        self.flush_s = float(flush_s)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.stream_max_reports = int(stream_max_reports)
        self.stream_max_s = float(stream_max_s)
        self.connect_timeout_s = float(connect_timeout_s)
        token = token if token is not None else os.environ.get(TELEMETRY_TOKEN_ENV) or None
        self._metadata = ((TELEMETRY_TOKEN_METADATA, token),) if token else ()
        ca_file = ca_file if ca_file is not None else os.environ.get(TELEMETRY_CA_ENV) or None
        # read now: a missing CA file should fail the job at its first step, not retry forever
        self._root_certificates = Path(ca_file).read_bytes() if ca_file else None

        self._buf: deque[pb.StepReport] = deque()
        self._cv = threading.Condition()
        self._closing = False  # close() called: drain, then stop
        self._abort = False  # close() timed out: stop now
        self._sent = 0
        self._dropped = 0
        self._reconnects = 0
        self._current: _Stream | None = None
        name = f"gradwire-telemetry-r{self.rank}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- training side

    def report(self, report: Any) -> bool:
        """Queue one step report; returns False when it was dropped (buffer full or closed)."""
        msg = to_proto(report, self.job_id, self.rank)
        with self._cv:
            if self._closing or len(self._buf) >= self.max_buffer:
                self._dropped += 1
                return False
            self._buf.append(msg)
            if len(self._buf) >= self.batch_size:
                self._cv.notify_all()
        return True

    @property
    def sent(self) -> int:
        """Reports the sink acknowledged (end of a stream with a StreamSummary)."""
        with self._cv:
            return self._sent

    @property
    def dropped(self) -> int:
        """Reports given up on: buffer full, reported after close, or unsent at close."""
        with self._cv:
            return self._dropped

    @property
    def pending(self) -> int:
        """Reports buffered or in flight, not yet acknowledged."""
        with self._cv:
            in_flight = len(self._current.items) if self._current is not None else 0
            return len(self._buf) + in_flight

    @property
    def reconnects(self) -> int:
        """Failed connection attempts and broken streams so far."""
        with self._cv:
            return self._reconnects

    def stats(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "dropped": self.dropped,
            "pending": self.pending,
            "reconnects": self.reconnects,
        }

    def close(self, timeout: float = 5.0) -> bool:
        """Flush for at most ``timeout`` seconds and stop; True when everything was acknowledged."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._abort = True
                if self._current is not None:
                    self._current.dead = True
                self._cv.notify_all()
            self._thread.join(max(1.0, self.flush_s * 2))
        with self._cv:
            lost = len(self._buf) + (len(self._current.items) if self._current is not None else 0)
            self._buf.clear()
            self._current = None
            self._dropped += lost
            return lost == 0

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- background thread

    def _channel(self):
        import grpc

        ms = int(self.backoff_initial_s * 1000)
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", ms),
            ("grpc.min_reconnect_backoff_ms", ms),
            ("grpc.max_reconnect_backoff_ms", int(self.backoff_max_s * 1000)),
            ("grpc.enable_retries", 0),
        ]
        if self._root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._root_certificates)
            return grpc.secure_channel(self.address, credentials, options=options)
        return grpc.insecure_channel(self.address, options=options)

    def _sleep(self, seconds: float) -> None:
        """Back off, waking early to abort or to make one last attempt when closing."""
        deadline = time.monotonic() + seconds
        with self._cv:
            while not self._abort and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cv.wait(left)

    def _has_work(self) -> bool:
        with self._cv:
            if self._abort:
                return False
            if not self._closing:
                return True
            return bool(self._buf)

    def _run(self) -> None:
        import grpc

        from gradwire.protos import telemetry_pb2_grpc as pb_grpc

        backoff = self.backoff_initial_s
        while self._has_work():
            channel = self._channel()
            try:
                grpc.channel_ready_future(channel).result(timeout=self.connect_timeout_s)
            except grpc.FutureTimeoutError:
                channel.close()
                with self._cv:
                    self._reconnects += 1
                    if self._closing:  # the sink is down as the job ends: give up now, count the rest
                        return
                self._sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            stub = pb_grpc.TelemetryStub(channel)
            try:
                while self._has_work():
                    self._one_stream(stub)
                    backoff = self.backoff_initial_s
            except grpc.RpcError as exc:
                log.debug("telemetry stream to %s failed: %s", self.address, exc)
                with self._cv:
                    self._reconnects += 1
                    if self._closing:
                        return
                self._sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
            finally:
                channel.close()

    def _one_stream(self, stub) -> None:
        """Run one StreamReports call; on success acknowledge, on failure put reports back in front."""
        stream = _Stream()
        with self._cv:
            self._current = stream
        try:
            summary = stub.StreamReports(self._batches(stream), metadata=self._metadata)
        except BaseException:
            with self._cv:
                stream.dead = True
                self._requeue(stream.items)
                self._current = None
            raise
        with self._cv:
            stream.dead = True
            self._sent += len(stream.items)
            self._current = None
        if summary.received != len(stream.items):
            log.warning("telemetry sink acknowledged %d of %d reports", summary.received, len(stream.items))

    def _requeue(self, items: list[pb.StepReport]) -> None:
        # caller holds self._cv; keep the newest max_buffer reports, oldest first
        self._buf.extendleft(reversed(items))
        items.clear()
        while len(self._buf) > self.max_buffer:
            self._buf.popleft()
            self._dropped += 1

    def _batches(self, stream: _Stream):
        """Request iterator of one call: batches until closing/rotation; gRPC pulls it from its own thread."""
        while True:
            batch: list[pb.StepReport] = []
            with self._cv:
                deadline = time.monotonic() + self.flush_s
                while len(batch) < self.batch_size:
                    if stream.dead or self._abort:
                        return
                    if self._buf:
                        item = self._buf.popleft()
                        stream.items.append(item)  # recorded under the lock: never lost on failure
                        batch.append(item)
                        continue
                    if self._closing:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                done = self._closing and not self._buf
            if batch:
                yield pb.ReportBatch(reports=batch)
            if done:
                return
            if (
                len(stream.items) >= self.stream_max_reports
                or time.monotonic() - stream.started >= self.stream_max_s
            ):
                return


# --------------------------------------------------------------------------- local fallback


class JsonlSink:
    """Fallback without a coordinator: one JSON object per line, optional rich progress bar.

    Lines carry the proto's field names with ``wall_time`` as unix seconds; non-finite
    floats (a diverged loss) are written as ``null`` so every line is strict JSON. The file
    is appended to (a resumed run continues it) and flushed every ``flush_s`` seconds
    and on ``close()``. ``progress=True`` shows a rich progress bar of steps
    (``total`` steps if known) with the latest loss; it is off by default.
    """

    def __init__(
        self,
        path: str | Path,
        job_id: str = "",
        rank: int = 0,
        *,
        progress: bool = False,
        total: int | None = None,
        flush_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id
        self.rank = int(rank)
        self.flush_s = float(flush_s)
        self._file = self.path.open("a", encoding="utf-8")
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._sent = 0
        self._dropped = 0
        self._closed = False
        self._progress = None
        self._task = None
        if progress:
            from rich.progress import Progress

            self._progress = Progress(transient=False)
            self._task = self._progress.add_task(f"rank {self.rank}", total=total)
            self._progress.start()

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def pending(self) -> int:
        return 0

    def stats(self) -> dict[str, int]:
        return {"sent": self._sent, "dropped": self._dropped, "pending": 0, "reconnects": 0}

    def report(self, report: Any) -> bool:
        data = normalize(report, self.job_id, self.rank)
        # strict JSON: a diverged loss (nan/inf) is written as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}
        line = json.dumps(clean, separators=(",", ":"), allow_nan=False)
        with self._lock:
            if self._closed:
                self._dropped += 1
                return False
            self._file.write(line + "\n")
            self._sent += 1
            now = time.monotonic()
            if now - self._last_flush >= self.flush_s:
                self._file.flush()
                self._last_flush = now
        if self._progress is not None:
            loss = data.get("loss")
            desc = f"rank {self.rank} loss {loss:.4g}" if isinstance(loss, float) else f"rank {self.rank}"
            self._progress.update(self._task, advance=1, description=desc)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        return True

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_telemetry(
    address: str | None,
    job_id: str,
    rank: int,
    *,
    run_dir: str | Path = ".",
    progress: bool = False,
    total: int | None = None,
    **client_kwargs: Any,
) -> TelemetryClient | JsonlSink:
    """A :class:`TelemetryClient` for ``address``, else a :class:`JsonlSink` writing
    ``<run_dir>/telemetry-rank<rank>.jsonl`` (progress bar on rank 0 only, if asked)."""
    if address:
        return TelemetryClient(address, job_id, rank, **client_kwargs)
    path = Path(run_dir) / f"telemetry-rank{int(rank)}.jsonl"
    return JsonlSink(path, job_id, rank, progress=progress and int(rank) == 0, total=total)
