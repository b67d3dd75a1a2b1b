"""The coordinator's moving parts, started and stopped together: what ``gradwire serve`` runs.

    with Coordinator(database_url="sqlite:///.gradwire/coordinator.db") as coordinator:
        app = create_app(settings, store=coordinator.store, metrics=coordinator.metrics,
                         control=coordinator.control)
        uvicorn.run(app, ...)

:meth:`Coordinator.start` brings up, in this order: the job store (schema created or migrated),
the Prometheus metrics (fed by a store listener: every committed transition is counted, the
``gradwire_jobs`` gauge follows the store, finished jobs start their retention period), the gRPC
telemetry sink (127.0.0.1 unless told otherwise), Ray (:class:`RayCluster`: an embedded loopback
head, or the cluster at ``ray_address``), and the :class:`Scheduler`, which first reconciles every
unfinished job with Ray and then starts polling. :meth:`Coordinator.stop` takes them down in the
reverse order. Jobs running on a joined cluster keep running while the coordinator is down; an
embedded head, and its jobs, stop with the coordinator.

The REST app is not built here: ``Coordinator.control`` (the scheduler) is what ``create_app``
takes as its ``control``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from gradwire.policy import JobPolicy
from gradwire.protos import TELEMETRY_CA_ENV
from gradwire.server.instance_lock import InstanceLock
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.ray_cluster import RayCluster
from gradwire.server.records import JobRecord
from gradwire.server.scheduler import Scheduler
from gradwire.server.states import JobState
from gradwire.server.store import DEFAULT_URL, JobStore
from gradwire.server.telemetry_gate import TelemetryBounds, TelemetryGate
from gradwire.server.telemetry_sink import TelemetrySink, is_loopback

log = logging.getLogger(__name__)

__all__ = ["Coordinator"]


class Coordinator:
    """Owns the job store, metrics, telemetry sink, Ray connection and scheduler of one coordinator.

    ``database_url``: the job store's SQLAlchemy URL. ``ray_address``: a Ray cluster to join
    (``None``: an embedded head on 127.0.0.1 with ``num_cpus`` / ``num_gpus``).
    ``grpc_host`` / ``grpc_port``: where the telemetry sink listens (port 0: any free port; a host
    beyond loopback needs ``allow_remote_telemetry``). ``telemetry_address``: the ``host:port``
    the jobs' workers dial, when it differs from the sink's own address (a coordinator behind a
    name or a NAT). ``data_dir``: the coordinator's folder, locked while it runs (one coordinator
    per folder, :mod:`gradwire.server.instance_lock`; the embedded Ray's temp dir goes there when
    its path is short enough). ``ray_address`` / ``dashboard_address``: the cluster's Jobs API
    (``http://head:8265``); ``ray_ports``: the embedded head's ``gcs_port``, ``dashboard_port``,
    ``agent_port``, ``client_port`` (unset: free ports). ``policy``: what job specs may
    ask for, put in every job's environment (``from_settings`` passes the settings'; without one,
    as in tests, jobs run unconfined).

    Telemetry: only a job's own workers may write it (each launch gets a secret, see
    :mod:`gradwire.server.telemetry_gate`), within ``telemetry_bounds``. ``telemetry_tls_cert`` /
    ``telemetry_tls_key``: PEM files that make the sink serve TLS only; ``telemetry_tls_ca``: the
    CA file *as the workers see it* (``GRADWIRE_TELEMETRY_CA`` in every job's environment; default
    the certificate's path, right for a self-signed certificate on a shared file system).
    """

    def __init__(
        self,
        *,
        database_url: str = DEFAULT_URL,
        ray_address: str | None = None,
        grpc_host: str = "127.0.0.1",
        grpc_port: int = 0,
        telemetry_address: str | None = None,
        allow_remote_telemetry: bool = False,
        data_dir: str | Path = ".gradwire",
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        ray_temp_dir: str | Path | None = None,
        dashboard_address: str | None = None,
        ray_ports: dict[str, int | None] | None = None,
        poll_s: float = 0.5,
        python: str = sys.executable,
        never_fits_grace_s: float = 30.0,
        metrics_retention_s: float = 900.0,
        policy: JobPolicy | None = None,
        telemetry_tls_cert: str | Path | None = None,
        telemetry_tls_key: str | Path | None = None,
        telemetry_tls_ca: str | Path | None = None,
        telemetry_bounds: TelemetryBounds | None = None,
    ) -> None:
        self.database_url = database_url
        self.data_dir = Path(data_dir)
        self._public_telemetry = telemetry_address
        self._sink_args: dict[str, Any] = {
            "host": grpc_host, "port": grpc_port, "allow_remote": allow_remote_telemetry,
            "tls_cert": telemetry_tls_cert, "tls_key": telemetry_tls_key,
        }  # fmt: skip
        ca = telemetry_tls_ca or telemetry_tls_cert
        self._telemetry_env = {TELEMETRY_CA_ENV: str(ca)} if ca and telemetry_tls_cert else {}
        self._telemetry_bounds = telemetry_bounds
        self._ray_args: dict[str, Any] = {
            "num_cpus": num_cpus, "num_gpus": num_gpus, "temp_dir": ray_temp_dir,
            "dashboard_address": dashboard_address, **(ray_ports or {}),
        }  # fmt: skip
        self.ray_address = ray_address
        self._scheduler_args: dict[str, Any] = {
            "poll_s": poll_s, "python": python, "policy": policy, "never_fits_grace_s": never_fits_grace_s,
        }  # fmt: skip
        self._metrics_retention_s = metrics_retention_s
        self.store: JobStore | None = None
        self.metrics: CoordinatorMetrics | None = None
        self.sink: TelemetrySink | None = None
        self.gate: TelemetryGate | None = None
        self.cluster: RayCluster | None = None
        self.scheduler: Scheduler | None = None
        self._listening = False
        self._lock: InstanceLock | None = None

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> Coordinator:
        """A coordinator for :class:`gradwire.server.settings.Settings` (``database_url``,
        ``ray_address``, ``grpc_host``, ``grpc_port``, ``telemetry_public_address``,
        ``metrics_retention_s``); ``overrides`` set any other argument (``data_dir``, ``num_cpus``...)."""
        arguments: dict[str, Any] = {
            "database_url": settings.database_url,
            "ray_address": settings.ray_address,
            "grpc_host": settings.grpc_host,
            "grpc_port": settings.grpc_port,
            "telemetry_address": settings.telemetry_public_address,
            # Settings refuses a non-loopback sink without tokens, so exposing it here was asked for
            "allow_remote_telemetry": not is_loopback(settings.grpc_host),
            "metrics_retention_s": settings.metrics_retention_s,
            "never_fits_grace_s": settings.never_fits_grace_s,
            **({"python": settings.job_python} if settings.job_python else {}),
            "ray_ports": {
                "gcs_port": settings.ray_gcs_port,
                "dashboard_port": settings.ray_dashboard_port,
                "agent_port": settings.ray_agent_port,
                "client_port": settings.ray_client_port,
            },
            # the REST door's policy (Services.policy); its checkpoint root follows data_dir
            "policy": settings.job_policy(overrides.get("data_dir", ".gradwire")),
            "telemetry_tls_cert": settings.grpc_tls_cert,
            "telemetry_tls_key": settings.grpc_tls_key,
            "telemetry_tls_ca": settings.telemetry_tls_ca,
            "telemetry_bounds": TelemetryBounds(
                max_bytes_per_step=settings.telemetry_max_bytes_per_step,
                max_clock_skew_s=settings.telemetry_max_clock_skew_s,
            ),
        }
        return cls(**{**arguments, **overrides})

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Coordinator:
        """Start every part (see the module docstring); on a failure, what started is stopped."""
        if self.scheduler is not None:
            return self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        # one coordinator per data folder: a second one is refused here, naming the first's PID
        self._lock = InstanceLock(self.data_dir).acquire()
        self.store = JobStore(self.database_url)
        self.metrics = CoordinatorMetrics(retention_s=self._metrics_retention_s)
        self.store.add_listener(self._on_transition)
        self._listening = True
        self.metrics.set_job_counts(self.store.counts_by_state())

        self.cluster = RayCluster(self.ray_address, **self._ray_args)
        # made before the sink starts, so reports arriving at once (jobs that outlived a previous
        # coordinator) have somewhere to go; its telemetry address is known once the sink is bound
        scheduler = Scheduler(
            self.store, self.cluster, self.metrics, telemetry_address=None,
            telemetry_env=self._telemetry_env, **self._scheduler_args,
        )  # fmt: skip
        # which jobs accept telemetry, from whom: the launched ones, by their stored secret digests
        self.gate = TelemetryGate(self._telemetry_bounds)
        self.gate.attach(self.store)
        self.sink = TelemetrySink(
            scheduler.on_reports, on_counts=self._count_reports, gate=self.gate, **self._sink_args
        )
        self._resume_telemetry(self.sink)
        self.sink.start()
        scheduler.telemetry_address = self._public_telemetry or self.sink.address

        self.cluster.start()
        scheduler.reconcile()
        self.scheduler = scheduler.start()
        log.info(
            "coordinator ready: store %s, telemetry %s, Ray Jobs API %s",
            self.store.engine.url.render_as_string(hide_password=True),
            scheduler.telemetry_address,
            self.cluster.dashboard_url,
        )

    def _count_reports(self, what: str, count: int) -> None:
        if self.metrics is None:
            return
        if what == "received":
            self.metrics.reports_received(count)
        else:
            self.metrics.reports_dropped(what, count)

    def _resume_telemetry(self, sink: TelemetrySink) -> None:
        """Workers of jobs that outlived a previous coordinator re-send every report that one had
        not acknowledged, stored or not (at-least-once); tell the sink where each rank's stored
        telemetry stands, so those reports are dropped as duplicates rather than counted a second
        time in the metrics (the store already skips their points)."""
        assert self.store is not None
        for job in self.store.non_terminal():
            for rank, point in self.store.last_points(job.id).items():
                sink.remember(job.id, rank, point.step, point.wall_time)

    def stop(self) -> None:
        """Stop every part that was started, in reverse order. Safe to call twice."""
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.stop()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        if self.sink is not None:
            self.sink.stop()
            self.sink = None
        if self.gate is not None:
            self.gate.detach()
            self.gate = None
        if self.store is not None:
            if self._listening:
                self.store.remove_listener(self._on_transition)
                self._listening = False
            self.store.close()
            self.store = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- what the app needs

    @property
    def control(self) -> Scheduler:
        """The job control for ``create_app(..., control=...)``: the scheduler."""
        if self.scheduler is None:
            raise RuntimeError("the coordinator is not started")
        return self.scheduler

    @property
    def telemetry_address(self) -> str:
        """The ``host:port`` jobs send their step reports to."""
        if self.scheduler is None or self.scheduler.telemetry_address is None:
            raise RuntimeError("the coordinator is not started")
        return self.scheduler.telemetry_address

    # ---------------------------------------------------------------- metrics of the state machine

    def _on_transition(
        self, job: JobRecord, from_state: JobState | None, to_state: JobState, reason: str
    ) -> None:
        """Store listener: count the move, refresh the per-state gauge, and start a finished
        job's metrics retention, and drop its de-duplication state from the sink (the gate refuses
        a finished job's reports, so a worker still flushing cannot have them counted twice).

        Restarts are counted by the scheduler (``worker_restarted``), so the move is observed
        without ``job=`` here, which would count them a second time.
        """
        metrics, store = self.metrics, self.store
        if metrics is None or store is None:
            return
        metrics.observe_transition(from_state, to_state)
        metrics.set_job_counts(store.counts_by_state())
        if to_state.terminal:
            metrics.job_ended(job.id)
            if self.sink is not None:
                self.sink.forget_job(job.id)
