"""The coordinator's Prometheus metrics: the families the Grafana dashboards are built on.

:class:`CoordinatorMetrics` owns a private :class:`prometheus_client.CollectorRegistry` (never the
process-global one, so tests and several coordinators in one process do not collide) holding
exactly the families of the metrics contract in ``docs/architecture.md``::

    gradwire_grad_bytes_uncompressed_total{job_id,compressor}   counter
    gradwire_grad_bytes_sent_total{job_id,compressor}           counter
    gradwire_step_seconds{job_id,phase}                         histogram (phase: compute, compress,
                                                                communicate, wait)
    gradwire_train_steps_total{job_id}                          counter
    gradwire_train_loss{job_id}, gradwire_eval_accuracy{job_id} gauges
    gradwire_stragglers_total{job_id}                           counter
    gradwire_straggler_wait_seconds_total{job_id}               counter
    gradwire_jobs{state}                                        gauge
    gradwire_job_transitions_total{from,to}                     counter
    gradwire_worker_restarts_total{job_id}                      counter
    gradwire_compressor_active{job_id,compressor}               gauge (1: in use now, 0: used before)
    gradwire_http_requests_total{route,method,status}           counter (route: the path template)
    gradwire_http_request_duration_seconds{route,method}        histogram
    gradwire_telemetry_reports_received_total                   counter
    gradwire_telemetry_reports_dropped_total{reason}            counter (reason: DROP_REASONS)

The job's label is ``job_id`` (:data:`JOB_LABEL`), never ``job``: Prometheus gives every scraped
series a ``job`` label of its own (the scrape job), and a scrape config or a Prometheus Operator
ServiceMonitor without ``honor_labels`` would rename ours to ``exported_job``.

How step reports become series (:meth:`CoordinatorMetrics.observe_reports`):

* Bytes. A report's ``bytes_sent`` / ``bytes_uncompressed`` are the rank's *cumulative* ledger
  counters, so the counters grow by the increase since the previous report of the same
  ``(job, rank)``. Every rank puts its own bytes on the wire, so the job's counters are the sum
  over ranks. The first report seen from a rank counts its whole value (the coordinator's counter
  then equals the job's true total, restored checkpoint included). When a rank's counters go
  backwards (a worker group restored from an older checkpoint) that report counts nothing and
  becomes the new baseline, so a counter never decreases.
* Steps, loss, accuracy, stragglers and straggler wait come from rank 0 only, so each optimizer
  step and each coded round is counted once. ``gradwire_straggler_wait_seconds_total`` adds rank 0's
  ``wait_s``: wall-clock time the job spent waiting for its slowest needed worker. A step re-run
  after a restart is counted again, as the optimizer really stepped again.
* ``gradwire_step_seconds`` observes every rank's report, one sample per phase.

:meth:`~CoordinatorMetrics.render` leaves out the ``*_created`` series prometheus_client adds to
counters and histograms, so a scrape holds only the contract's families.

Reports are expected once each (the telemetry sink de-duplicates); a repeated report would count
its step and timings twice, though never its bytes.

Cardinality stays bounded: :meth:`~CoordinatorMetrics.forget_job` drops every series of a job, and
jobs that ended more than ``retention_s`` ago are forgotten by :meth:`~CoordinatorMetrics.sweep`,
which :meth:`~CoordinatorMetrics.render` runs before each scrape.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.states import TERMINAL_STATES, JobState

__all__ = [
    "DROP_REASONS",
    "HTTP_SECONDS_BUCKETS",
    "JOB_LABEL",
    "PHASES",
    "STEP_SECONDS_BUCKETS",
    "CoordinatorMetrics",
]

#: The label naming a gradwire job on every per-job family. Not ``job``: Prometheus sets that one
#: to the scrape job on every series it scrapes.
JOB_LABEL = "job_id"

#: Step phases of ``gradwire_step_seconds`` and the StepReport field each one is read from.
PHASES: Mapping[str, str] = {
    "compute": "compute_s",
    "compress": "compress_s",
    "communicate": "communicate_s",
    "wait": "wait_s",
}

#: Bucket bounds in seconds: roughly 1-2.5-5 per decade from 1 ms to one minute.
STEP_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: REST latency buckets in seconds, 5 ms to 10 s.
HTTP_SECONDS_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Why a telemetry report was dropped: it failed validation or broke a bound; its job is unknown or
#: finished; its caller lacked the job's telemetry secret; it was a re-sent copy; or the coordinator
#: did not store it (the job store refused or failed).
DROP_REASONS: tuple[str, ...] = ("invalid", "unknown_job", "unauthenticated", "duplicate", "callback_error")

#: Label value used when a report names no compressor.
UNKNOWN_COMPRESSOR = "unknown"


def _state_name(state: Any) -> str:
    return str(state.value) if isinstance(state, Enum) else str(state)


def _finite_nonneg(value: float) -> float:
    """A duration or byte increase that is safe to add to a counter (NaN and negatives count as 0)."""
    return value if math.isfinite(value) and value > 0 else 0.0


def _observe_many(child: Any, values: list[float]) -> None:
    """``child.observe(v)`` for every ``v`` of a batch (the series' child is looked up once per batch;
    prometheus_client's own observe keeps its buckets and sum consistent under its lock)."""
    for value in values:
        child.observe(value)


class _WithoutCreated:
    """A view of a registry for exposition that drops the ``*_created`` timestamp samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield kept


class CoordinatorMetrics:
    """The metrics-contract families in a private registry, fed from step reports and job events.

    Thread-safe: the telemetry sink calls :meth:`observe_report` from gRPC threads while the job
    store records transitions and Prometheus scrapes :meth:`render`.

    ``retention_s`` is how long a finished job's series stay visible (so the last scrape after
    it ended still sees its final values); ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, *, retention_s: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        if retention_s < 0:
            raise ValueError("retention_s must be >= 0")
        self.retention_s = float(retention_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._baselines: dict[tuple[str, int], tuple[int, int]] = {}  # (job, rank) -> (sent, uncompressed)
        self._compressors: dict[str, set[str]] = {}  # job -> compressor labels it has used
        self._active: dict[str, set[str]] = {}  # job -> compressor labels of gradwire_compressor_active
        self._jobs: set[str] = set()  # jobs that have series
        self._ended: dict[str, float] = {}  # job -> clock() when it reached a terminal state
        self._states: set[str] = {s.value for s in JobState}

        r = self.registry = CollectorRegistry(auto_describe=True)
        self.bytes_uncompressed = Counter(
            "gradwire_grad_bytes_uncompressed",
            "Gradient payload bytes a plain all-reduce of the same gradients would have handed to its "
            "collectives, summed over ranks (payload, not wire traffic).",
            [JOB_LABEL, "compressor"], registry=r,
        )  # fmt: skip
        self.bytes_sent = Counter(
            "gradwire_grad_bytes_sent",
            "Gradient payload bytes the workers handed to their collectives, summed over ranks (payload, "
            "not wire traffic: a ring all-reduce moves 2(n-1)/n times it, an all-gather (n-1) times).",
            [JOB_LABEL, "compressor"], registry=r,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "gradwire_step_seconds",
            "Seconds per training step and phase, one sample per rank and step. Decoding counts as "
            "communicate; wait comes from gradient-coded jobs only; the optimizer step is not included.",
            [JOB_LABEL, "phase"], buckets=STEP_SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.train_steps = Counter(
            "gradwire_train_steps",
            "Step reports from rank 0 since the coordinator started (re-run steps count again).",
            [JOB_LABEL], registry=r,
        )  # fmt: skip
        self.train_loss = Gauge(
            "gradwire_train_loss",
            "Loss of rank 0's own batch at its latest step, not a mean over ranks (NaN when rank 0 was "
            "left out of a coded round before finishing a batch).",
            [JOB_LABEL], registry=r,
        )  # fmt: skip
        self.eval_accuracy = Gauge(
            "gradwire_eval_accuracy", "Latest accuracy reported by rank 0, in [0, 1].", [JOB_LABEL],
            registry=r,
        )  # fmt: skip
        self.stragglers = Counter(
            "gradwire_stragglers",
            "Workers left out of coded gradient rounds, from rank 0's reports: exactly s per round.",
            [JOB_LABEL], registry=r,
        )  # fmt: skip
        self.straggler_wait = Counter(
            "gradwire_straggler_wait_seconds",
            "Seconds rank 0 reported as wait: from the end of its own computation (the round's start when "
            "it was left out) until the coded round's survivors were known.",
            [JOB_LABEL], registry=r,
        )  # fmt: skip
        self.jobs = Gauge("gradwire_jobs", "Jobs per state.", ["state"], registry=r)
        self.transitions = Counter(
            "gradwire_job_transitions", "Job state machine transitions.", ["from", "to"], registry=r
        )
        self.worker_restarts = Counter(
            "gradwire_worker_restarts", "Worker-group restarts.", [JOB_LABEL], registry=r
        )
        self.compressor_in_use = Gauge(
            "gradwire_compressor_active",
            "1 for the compressor a job's rank 0 reported last, 0 for those it used before (a switch "
            "is also a job event).",
            [JOB_LABEL, "compressor"], registry=r,
        )  # fmt: skip
        self.http_requests = Counter(
            "gradwire_http_requests", "REST requests answered, by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.http_seconds = Histogram(
            "gradwire_http_request_duration_seconds", "Seconds from a REST request's arrival to its answer.",
            ["route", "method"], buckets=HTTP_SECONDS_BUCKETS, registry=r,
        )  # fmt: skip
        self.telemetry_received = Counter(
            "gradwire_telemetry_reports_received",
            "Worker step reports the telemetry sink accepted (authenticated, within bounds, new) and the "
            "coordinator stored.",
            registry=r,
        )  # fmt: skip
        self.telemetry_dropped = Counter(
            "gradwire_telemetry_reports_dropped", "Worker step reports dropped, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in DROP_REASONS:  # present at 0, so rates and alerts see every reason from the start
            self.telemetry_dropped.labels(reason)
        for state in sorted(self._states):
            self.jobs.labels(state).set(0)

    # ---------------------------------------------------------------- step reports

    def observe_report(self, report: pb.StepReport) -> None:
        """Fold one ``StepReport`` into the metrics."""
        self.observe_reports([report])

    def observe_reports(self, reports: Iterable[pb.StepReport]) -> None:
        """Fold ``StepReport`` messages, in order, into the metrics (fits
        ``TelemetrySink(on_reports=...)``): per job, each series is touched once per call (byte
        increases summed, histogram buckets counted, the gauges set to the last report's values).
        The StepReport is the only shape a step report has here; anything else is a ``TypeError``."""
        batch = list(reports)
        for report in batch:
            if not isinstance(report, pb.StepReport):
                raise TypeError(f"a step report must be a StepReport, not {type(report).__name__}")
        self._observe_protos(batch)

    def _observe_protos(self, reports: list[pb.StepReport]) -> None:
        by_job: dict[str, list[pb.StepReport]] = {}
        for report in reports:
            if not report.job_id:
                raise ValueError("a step report needs a non-empty job_id")
            by_job.setdefault(report.job_id, []).append(report)
        for job, batch in by_job.items():
            self._observe_job(job, batch)

    def _observe_job(self, job: str, reports: list[pb.StepReport]) -> None:
        """Fold one job's reports (in order) into its series, each series touched once."""
        byte_sums: dict[str, list[int]] = {}  # compressor -> [sent, uncompressed] increases
        with self._lock:
            self._jobs.add(job)
            used = self._compressors.setdefault(job, set())
            baselines = self._baselines
            for r in reports:
                compressor = r.compressor or UNKNOWN_COMPRESSOR
                used.add(compressor)
                key = (job, r.rank)
                prev = baselines.get(key, (0, 0))
                sent, uncompressed = r.bytes_sent, r.bytes_uncompressed
                baselines[key] = (sent, uncompressed)
                sent, uncompressed = sent - prev[0], uncompressed - prev[1]
                if sent >= 0 and uncompressed >= 0:  # else: a restore; the new values are the baseline
                    sums = byte_sums.setdefault(compressor, [0, 0])
                    sums[0] += sent
                    sums[1] += uncompressed
        for compressor, (sent, uncompressed) in byte_sums.items():
            self.bytes_sent.labels(job, compressor).inc(sent)
            self.bytes_uncompressed.labels(job, compressor).inc(uncompressed)

        for phase, name in PHASES.items():
            values = [getattr(r, name) for r in reports]
            _observe_many(
                self.step_seconds.labels(job, phase),
                [max(0.0, float(v)) for v in values if math.isfinite(v)],
            )

        steps, stragglers, wait = 0, 0, 0.0
        loss: float | None = None
        accuracy: float | None = None
        for r in reports:
            if r.rank != 0:
                continue
            steps += 1
            loss = r.loss
            if r.HasField("accuracy"):
                accuracy = r.accuracy
            stragglers += len(r.stragglers)
            wait += _finite_nonneg(r.wait_s)
        if not steps:
            return
        self.train_steps.labels(job).inc(steps)
        assert loss is not None
        self.train_loss.labels(job).set(float(loss))
        if accuracy is not None:
            self.eval_accuracy.labels(job).set(float(accuracy))
        self.stragglers.labels(job).inc(stragglers)
        self.straggler_wait.labels(job).inc(wait)

    # ---------------------------------------------------------------- the service itself

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered REST request (``route`` is the path template, never the raw path)."""
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_seconds.labels(route, method).observe(_finite_nonneg(seconds))

    def reports_received(self, count: int) -> None:
        """``count`` step reports were accepted by the telemetry sink."""
        self.telemetry_received.inc(count)

    def reports_dropped(self, reason: str, count: int) -> None:
        """``count`` step reports were dropped for ``reason`` (one of :data:`DROP_REASONS`)."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; expected one of {', '.join(DROP_REASONS)}")
        self.telemetry_dropped.labels(reason).inc(count)

    # ---------------------------------------------------------------- job lifecycle

    def observe_transition(self, from_state: Any, to_state: Any, *, job: str | None = None) -> None:
        """Count one state-machine move; states may be :class:`JobState` members or their names.

        ``from_state=None`` (a job being created, as job-store listeners report a submission)
        counts no transition. With ``job`` given, entering ``RESTARTING`` also counts a worker
        restart of that job and entering a terminal state starts its retention period (see
        :meth:`job_ended`).
        """
        if from_state is None:
            return
        src, dst = _state_name(from_state), _state_name(to_state)
        self.transitions.labels(src, dst).inc()
        if job is None:
            return
        if dst == JobState.RESTARTING.value:
            self.worker_restarted(job)
        elif dst in {s.value for s in TERMINAL_STATES}:
            self.job_ended(job)

    def set_job_counts(self, counts: Mapping[Any, int]) -> None:
        """Set ``gradwire_jobs`` from a full ``state -> number of jobs`` count; absent states become 0."""
        named = {_state_name(state): int(n) for state, n in counts.items()}
        with self._lock:
            self._states.update(named)
            states = sorted(self._states)
        for state in states:
            self.jobs.labels(state).set(named.get(state, 0))

    def worker_restarted(self, job: str) -> None:
        """Count one worker-group restart of ``job``.

        :meth:`observe_transition` already calls this for a move into ``RESTARTING`` reported
        with ``job=``; call it directly only for restarts learnt some other way.
        """
        with self._lock:
            self._jobs.add(job)
        self.worker_restarts.labels(job).inc()

    def compressor_active(self, job: str, compressor: str) -> None:
        """``job``'s rank 0 now uses ``compressor`` (a label value the telemetry gate bounded):
        its ``gradwire_compressor_active`` series is 1 and those of earlier ones 0."""
        if not compressor:
            raise ValueError("a compressor label must not be empty")
        with self._lock:
            self._jobs.add(job)
            labels = self._active.setdefault(job, set())
            before = sorted(labels - {compressor})
            labels.add(compressor)
        for old in before:
            self.compressor_in_use.labels(job, old).set(0)
        self.compressor_in_use.labels(job, compressor).set(1)

    def job_ended(self, job: str, at: float | None = None) -> None:
        """Mark ``job`` finished at ``at`` (default: now); :meth:`sweep` forgets it ``retention_s`` later."""
        with self._lock:
            self._ended[job] = self._clock() if at is None else float(at)

    # ---------------------------------------------------------------- cardinality

    def forget_job(self, job: str) -> None:
        """Remove every series whose ``job_id`` label is ``job`` from every family, and its byte baselines."""
        with self._lock:
            compressors = self._compressors.pop(job, set())
            active = self._active.pop(job, set())
            self._jobs.discard(job)
            self._ended.pop(job, None)
            for key in [k for k in self._baselines if k[0] == job]:
                del self._baselines[key]
        for family in (self.bytes_sent, self.bytes_uncompressed):
            for compressor in compressors:
                self._remove(family, job, compressor)
        for compressor in active:
            self._remove(self.compressor_in_use, job, compressor)
        for phase in PHASES:
            self._remove(self.step_seconds, job, phase)
        for family in (
            self.train_steps, self.train_loss, self.eval_accuracy, self.stragglers, self.straggler_wait,
            self.worker_restarts,
        ):  # fmt: skip
            self._remove(family, job)

    @staticmethod
    def _remove(family: Counter | Gauge | Histogram, *labels: str) -> None:
        with contextlib.suppress(KeyError):  # that series was never created
            family.remove(*labels)

    def sweep(self, now: float | None = None) -> list[str]:
        """Forget the jobs that ended more than ``retention_s`` before ``now``; returns their ids."""
        now = self._clock() if now is None else float(now)
        with self._lock:
            expired = sorted(job for job, ended in self._ended.items() if now - ended > self.retention_s)
        for job in expired:
            self.forget_job(job)
        return expired

    @property
    def known_jobs(self) -> frozenset[str]:
        """Jobs that currently have series."""
        with self._lock:
            return frozenset(self._jobs)

    # ---------------------------------------------------------------- exposition

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, after a :meth:`sweep`.

        For FastAPI: ``body, ctype = metrics.render(); return Response(body, media_type=ctype)``.
        """
        self.sweep()
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST
