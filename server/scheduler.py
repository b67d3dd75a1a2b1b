"""The coordinator's scheduler: admits queued jobs onto Ray, launches them, and follows them.

One background thread polls (every ``poll_s``, or at once after :meth:`Scheduler.wake`):

1. **Follow.** Every launched job (STARTING, RUNNING, RESTARTING) is looked up in Ray's Jobs API
   by its submission id and its stored state follows Ray's status::

       Ray PENDING    → stays STARTING
       Ray RUNNING    → RUNNING
       Ray SUCCEEDED  → SUCCEEDED (through RUNNING if the job ended between two polls)
       Ray FAILED     → FAILED, the reason quoting the tail of the job's log
       Ray STOPPED    → CANCELLED (stopped from outside gradwire)
       unknown to Ray → FAILED ("lost: ...")

2. **Admit.** Queued jobs are taken in the store's order (priority, then submission; strictly:
   a job that does not fit now blocks those behind it). A job is admitted only when the
   cluster's *available* CPUs and GPUs cover ``workers.count × cpus_per_worker`` (and GPUs)
   after subtracting what this scheduler already launched but Ray has not placed yet, and when
   the demands of all its launched jobs together stay within the cluster's *total*. A job that
   asks for more than the total can never run and is failed at once, with the reason.

3. **Launch.** The state is written first, then acted on: QUEUED → STARTING, with the Ray
   submission id ``gradwire-<job id>`` stored, *then* ``JobSubmissionClient.submit_job``. The
   entrypoint is ``<python> -m gradwire.cli train --spec-env GRADWIRE_JOB_SPEC --job-id <id>
   --telemetry <addr> --no-progress``; ``--job-id`` names the job's Ray Train run, so its
   checkpoints are its own.

The spec travels with the job: its JSON (``resume_from: <job id>`` replaced by that job's run
folder, ``resume.py``) is the ``GRADWIRE_JOB_SPEC`` variable of the Ray job's ``runtime_env``, so
the coordinator and the cluster share no folder; it reaches Ray by the Jobs API address alone.

What a job's state becomes is decided in one place, :func:`gradwire.server.job_lifecycle.decide`,
from one signal at a time (Ray's status, a failed submission, stored step reports, a cancel, an
admission, a refusal); what a failure means is the :class:`~gradwire.server.job_lifecycle.FailurePolicy`'s
call. The methods here only do the I/O around it: ask Ray, submit, stop, store, count. A
submission the policy says to retry is tried again with the scheduler lock *released*: the lock only
covers the state changes, so a cancel is answered at once whatever Ray does, and a job cancelled
while its submission was being retried is not submitted, or is stopped once Ray has it. What needs
no thread has modules of its own: ``ray_jobs.py`` (submission ids, failure reasons), ``demand.py``
(what a job asks of the cluster and whether it fits), ``report_points.py`` (a StepReport as a
stored point).

Cancel writes CANCELLED and returns; the Ray job is stopped on a helper thread (a Ray that does
not answer cannot hold the caller). Whatever Ray reports afterwards for a cancelled job is
ignored, and a stop that did not get through is retried every poll until Ray reports the job
ended. Start-up :meth:`Scheduler.reconcile` applies the follow rules once to
every non-terminal job (queued ones stay queued).

Restarts come from Ray Train: each StepReport carries the worker group's ``attempt``, and a report
of a higher attempt than the stored one moves the job RUNNING → RESTARTING → RUNNING once
(``CoordinatorMetrics.worker_restarted`` counts it). Each rank's node address and attempt are kept
as the job's placement (``JobStore.set_placement``), written only when they change; a compressor
change in rank 0's reports is a job event and moves ``gradwire_compressor_active``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from gradwire.policy import JobPolicy
from gradwire.protos import TELEMETRY_TOKEN_ENV
from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.control import ClusterUnavailable
from gradwire.server.demand import Demand
from gradwire.server.job_lifecycle import (
    CANCELLED_BY_USER,
    LAUNCHED,
    Admitted,
    CancelRequested,
    Decision,
    FailurePolicy,
    RayStatus,
    Refused,
    ReportsArrived,
    SubmitFailed,
    decide,
)
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.ray_cluster import RayCluster, RayUnavailable, is_not_found
from gradwire.server.ray_jobs import submission_id
from gradwire.server.records import JobNotFound, JobRecord, StateConflict
from gradwire.server.resume import driver_spec
from gradwire.server.states import TERMINAL_STATES, IllegalTransition, JobState
from gradwire.server.store import JobStore
from gradwire.server.telemetry_gate import new_secret, secret_digest
from gradwire.spec import SPEC_SCHEMA_VERSION, JobSpec, SpecError

log = logging.getLogger(__name__)

#: the runtime_env variable that carries the job's spec (JSON) to its driver (`gradwire train --spec-env`)
SPEC_ENV = "GRADWIRE_JOB_SPEC"

__all__ = ["CANCELLED_BY_USER", "LAUNCHED", "SPEC_ENV", "Scheduler"]


class Scheduler:
    """Admits, launches, follows and cancels jobs on Ray; the coordinator's job control.

    Implements the ``control`` protocol of :mod:`gradwire.server.control` (``cancel``, ``logs``,
    ``cluster``, ``wake``) and the telemetry sink's callback (:meth:`on_reports`).
    ``telemetry_address`` is the ``host:port`` workers send step reports to (settable until the
    first launch). ``policy``: what specs
    may ask for (gradwire/policy.py), put in each job's environment so that its driver and
    workers refuse what the REST door would have. A job Ray reports
    RUNNING counts as placed after ``placement_grace_s`` even if no telemetry arrived. A job
    bigger than the whole cluster fails only once it has been bigger for ``never_fits_grace_s``
    (nodes that just joined, or one being replaced, may not be counted yet); until then it waits
    at the head of the queue. ``python`` is the interpreter the job's driver runs on the head
    (``GRADWIRE_JOB_PYTHON``; default: the coordinator's own).
    ``failure_policy``: retries of a submission and how failures are explained (default:
    :class:`~gradwire.server.job_lifecycle.FailurePolicy`).
    """

    def __init__(
        self,
        store: JobStore,
        cluster: RayCluster,
        metrics: CoordinatorMetrics,
        *,
        telemetry_address: str | None,
        poll_s: float = 0.5,
        python: str = sys.executable,
        placement_grace_s: float = 120.0,
        never_fits_grace_s: float = 30.0,
        cluster_timeout_s: float = 10.0,
        policy: JobPolicy | None = None,
        telemetry_env: Mapping[str, str] | None = None,
        failure_policy: FailurePolicy | None = None,
    ) -> None:
        self.failure_policy = failure_policy or FailurePolicy()
        self.store, self.metrics = store, metrics
        self.telemetry_env = dict(telemetry_env or {})  # e.g. GRADWIRE_TELEMETRY_CA for every job
        self.policy = policy  # into every job's environment: its driver and workers check again
        self._cluster = cluster
        self.telemetry_address = telemetry_address
        self.poll_s = float(poll_s)
        self.python = python
        self.placement_grace_s = float(placement_grace_s)
        self.never_fits_grace_s = float(never_fits_grace_s)
        self.cluster_timeout_s = float(cluster_timeout_s)
        self._lock = threading.RLock()  # launch and cancel: state change and Ray call together
        self._state = threading.Lock()  # the in-memory maps below
        self._unplaced: dict[str, float | None] = {}  # launched, not yet placed -> when Ray said RUNNING
        self._demands: dict[str, Demand] = {}
        self._too_big_since: dict[str, float] = {}  # queued job -> first seen bigger than the cluster
        self._stopping: dict[str, float] = {}  # submission id -> last stop request (monotonic)
        self._aborts: dict[str, threading.Event] = {}  # job id -> set by cancel while it is submitted
        # what on_reports compares reports with, per open job: (attempt, compressor) as stored,
        # and each rank's (attempt, node address) as last written to the store's placement
        self._seen: dict[str, tuple[int, str]] = {}
        self._ranks: dict[str, dict[int, tuple[int, str]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_at = 0.0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Scheduler:
        """Start the polling thread (call :meth:`reconcile` first)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gradwire-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling; running Ray jobs are left running (a restarted coordinator reconciles them)."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def wake(self) -> None:
        """Poll now (a job was queued, or capacity may have freed)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def poll_once(self) -> None:
        """One round: follow launched jobs, retry pending stops, admit queued jobs."""
        for phase in (self._follow, self._retry_stops, self._admit):
            try:
                phase()
            except RayUnavailable as err:
                self._warn(f"scheduler: Ray unreachable during {phase.__name__.strip('_')}: {err}")
            except Exception:
                log.exception("scheduler: %s failed", phase.__name__.strip("_"))

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at > 30.0:
            self._warned_at = now
            log.warning(message)

    # ---------------------------------------------------------------- the control protocol

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: CANCELLED is written, then its Ray job (if any) is stopped on a helper
        thread (a stop that does not get through is retried every poll), so the answer never
        waits for Ray. Returns the CANCELLED record; raises :class:`StateConflict` for a finished
        job and :class:`JobNotFound` for an unknown one.
        """
        with self._lock:  # held for store calls only, never for Ray's
            for attempt in range(3):  # the follow loop may move the job (STARTING → RUNNING) meanwhile
                job = self.store.get(job_id)
                if job.terminal:
                    raise StateConflict(job_id, job.state, frozenset(JobState) - TERMINAL_STATES)
                (move,) = decide(job, CancelRequested()).moves
                try:
                    record = self.store.transition(job_id, move.to, move.reason, expect=job.state)
                    break
                except StateConflict:
                    if attempt == 2:
                        raise
            with self._state:
                abort = self._aborts.get(job_id)
            if abort is not None:
                abort.set()  # its submission, being retried, stops (or stops the Ray job it made)
            self._finished(job_id)
        if job.state in LAUNCHED:
            sid = job.ray_job_id or submission_id(job_id)
            with self._state:
                self._stopping[sid] = time.monotonic()
            threading.Thread(
                target=self._stop_ray_job, args=(sid,), name=f"gradwire-stop-{job_id}", daemon=True
            ).start()
        self.wake()  # its resources are free for the next job
        return record

    def logs(self, job_id: str) -> str | None:
        """The Ray job's log (driver output), or ``None`` when it was never launched or Ray no
        longer has it; raises :class:`JobNotFound` for an unknown job, ``ClusterUnavailable`` when
        Ray is unreachable."""
        job = self.store.get(job_id)
        if job.ray_job_id is None:
            return None
        try:
            return self._cluster.jobs_client().get_job_logs(job.ray_job_id)
        except Exception as err:
            if is_not_found(err):
                return None
            raise ClusterUnavailable(f"cannot read the logs of {job.ray_job_id} from Ray: {err}") from err

    def cluster(self) -> dict[str, Any]:
        """``{"total": {...}, "available": {...}}`` of the Ray cluster; ``ClusterUnavailable`` when
        Ray does not answer within ``cluster_timeout_s``, or its Jobs API would not take a job now
        (``RayCluster.ready``: the dashboard, and an embedded head's agent)."""
        try:
            problem = self._cluster.ready()
            if problem is not None:
                raise ClusterUnavailable(problem)
            return self._cluster.resources(timeout_s=self.cluster_timeout_s)
        except ClusterUnavailable:
            raise
        except Exception as err:
            raise ClusterUnavailable(str(err)) from err

    # ---------------------------------------------------------------- start-up

    def reconcile(self) -> list[JobRecord]:
        """Bring every launched, unfinished job in line with what Ray says about it (queued jobs
        stay queued); returns the jobs as they are afterwards. Raises :class:`RayUnavailable`
        when Ray cannot be asked."""
        jobs = [job for job in self.store.non_terminal() if job.state in LAUNCHED]
        for job in jobs:
            with self._state:
                self._unplaced.setdefault(job.id, None)  # until telemetry or Ray shows it running
            self._apply(job, self._job_info(job))
        return [self.store.get(job.id) for job in jobs]

    # ---------------------------------------------------------------- follow

    def _follow(self) -> None:
        for job in self.store.non_terminal():
            if job.state in LAUNCHED:
                self._apply(job, self._job_info(job))

    def _job_info(self, job: JobRecord) -> Any | None:
        """Ray's JobDetails for the job, ``None`` if Ray does not know it."""
        sid = job.ray_job_id or submission_id(job.id)
        try:
            return self._cluster.jobs_client().get_job_info(sid)
        except Exception as err:
            if is_not_found(err):
                return None
            raise RayUnavailable(f"cannot ask Ray about {sid}: {err}") from err

    def _apply(self, job: JobRecord, info: Any | None) -> None:
        """Move the stored job to where Ray's status says it is (a no-op when it already is)."""
        sid = job.ray_job_id or submission_id(job.id)
        status = None if info is None else str(info.status)
        if status == "RUNNING":
            with self._state:
                if job.id in self._unplaced and self._unplaced[job.id] is None:
                    self._unplaced[job.id] = time.monotonic()
                running_at = self._unplaced.get(job.id)
                if running_at is not None and time.monotonic() - running_at > self.placement_grace_s:
                    del self._unplaced[job.id]
        failure = ""
        if status == "FAILED":
            failure = self.failure_policy.explain_failure(info, self._logs_or_none(sid))
        self._carry_out(job, decide(job, RayStatus(sid, status, failure), self.failure_policy))

    def _carry_out(self, job: JobRecord, decision: Decision) -> JobRecord | None:
        """Store the decision's moves in order, each expecting the state the previous one left;
        then its notes. Returns the job as last stored, ``None`` when someone moved it first."""
        record: JobRecord | None = job
        for move in decision.moves:
            record = self._move(record, move.to, move.reason, **move.fields)
            if record is None:
                return None
            if move.to is JobState.RESTARTING:
                self.metrics.worker_restarted(job.id)
        for note in decision.notes:
            try:
                if note.reason:
                    record = self.store.note(job.id, note.reason, **note.fields)
                else:
                    record = self.store.set_fields(job.id, **note.fields)
            except JobNotFound:
                return None
            if "compressor" in note.fields:
                self.metrics.compressor_active(job.id, note.fields["compressor"])
        return record

    def _move(self, job: JobRecord, to: JobState, reason: str, **fields: Any) -> JobRecord | None:
        """Transition from the state ``job`` was read in; ``None`` if someone moved it meanwhile."""
        try:
            record = self.store.transition(job.id, to, reason, expect=job.state, **fields)
        except (StateConflict, IllegalTransition, JobNotFound) as err:
            log.debug("scheduler: not moving %s to %s: %s", job.id, to, err)
            return None
        if record.terminal:
            self._finished(job.id)
        return record

    def _logs_or_none(self, sid: str) -> str | None:
        try:
            return self._cluster.jobs_client().get_job_logs(sid)
        except Exception as err:
            log.debug("scheduler: no logs for %s: %s", sid, err)
            return None

    def _finished(self, job_id: str) -> None:
        """Forget a job that reached a terminal state (the reservation, restarts)."""
        with self._state:
            self._unplaced.pop(job_id, None)
            self._demands.pop(job_id, None)
            self._too_big_since.pop(job_id, None)
            self._seen.pop(job_id, None)
            self._ranks.pop(job_id, None)

    # ---------------------------------------------------------------- stop

    def _stop_ray_job(self, sid: str) -> None:
        with self._state:
            self._stopping[sid] = time.monotonic()
        try:
            self._cluster.jobs_client().stop_job(sid)
        except Exception as err:
            if is_not_found(err):  # never reached Ray: nothing to stop
                with self._state:
                    self._stopping.pop(sid, None)
            else:
                log.warning("scheduler: could not stop Ray job %s (will retry): %s", sid, err)

    def _retry_stops(self) -> None:
        with self._state:
            due = [sid for sid, at in self._stopping.items() if time.monotonic() - at > 2.0]
        client = self._cluster.jobs_client() if due else None
        for sid in due:
            try:
                ended = client.get_job_status(sid).is_terminal()
            except Exception as err:
                ended = is_not_found(err)
                if not ended:
                    raise RayUnavailable(f"cannot ask Ray about {sid}: {err}") from err
            if ended:
                with self._state:
                    self._stopping.pop(sid, None)
            else:
                self._stop_ray_job(sid)

    # ---------------------------------------------------------------- admit and launch

    def _admit(self) -> None:
        resources = None
        while not self._stop.is_set():
            job = self.store.next_queued()
            if job is None:
                return
            problem = _stale_spec(job)
            if problem is not None:
                self._carry_out(job, decide(job, Refused(problem)))
                continue
            demand = self._demand(job)
            resources = resources or self._cluster.resources()
            beyond = demand.beyond(resources["total"])
            if beyond is not None:
                if not self._too_big_for_good(job.id, beyond):
                    return  # the cluster may be growing: the head of the queue waits
                self._carry_out(job, decide(job, Refused(f"cannot ever run on this cluster: {beyond}")))
                continue
            with self._state:
                self._too_big_since.pop(job.id, None)
            if not self._fits(demand, resources):
                return  # strict FIFO: the head of the queue waits for room
            self._launch(job, demand)
            resources = None  # read again: the next job sees this one's reservation

    def _too_big_for_good(self, job_id: str, beyond: str) -> bool:
        """Whether ``job_id`` has been bigger than the whole cluster for ``never_fits_grace_s``."""
        now = time.monotonic()
        with self._state:
            since = self._too_big_since.setdefault(job_id, now)
        if now - since >= self.never_fits_grace_s:
            with self._state:
                self._too_big_since.pop(job_id, None)
            return True
        if since == now:  # once per job
            log.warning(
                "job %s is bigger than the cluster (%s); it fails if the cluster does not grow within %g s",
                job_id,
                beyond,
                self.never_fits_grace_s,
            )
        return False

    def _demand(self, job: JobRecord) -> Demand:
        with self._state:
            found = self._demands.get(job.id)
        if found is None:
            found = Demand.of(job.spec)
            with self._state:
                self._demands[job.id] = found
        return found

    def _fits(self, demand: Demand, resources: Mapping[str, Mapping[str, float]]) -> bool:
        launched = {j.id: self._demand_or_zero(j) for j in self.store.non_terminal() if j.state in LAUNCHED}
        with self._state:
            unplaced = set(self._unplaced)
        pending = [d for job_id, d in launched.items() if job_id in unplaced]
        return demand.fits_now(resources, committed=launched.values(), pending=pending)

    def _demand_or_zero(self, job: JobRecord) -> Demand:
        try:
            return self._demand(job)
        except ValueError:  # a launched job's spec from before a schema change: count it as nothing
            return Demand(0, 0.0, 0.0)

    def entrypoint(self, job_id: str) -> str:
        """The shell command the Ray job runs for ``job_id`` (its spec is in ``SPEC_ENV``)."""
        if not self.telemetry_address:
            raise RuntimeError("the scheduler has no telemetry address to give jobs")
        words = [self.python, "-m", "gradwire.cli", "train", "--spec-env", SPEC_ENV, "--job-id", job_id]
        words += ["--telemetry", self.telemetry_address, "--no-progress"]
        return shlex.join(words)

    def _launch(self, job: JobRecord, demand: Demand) -> None:
        """QUEUED → STARTING under the lock, then the submission, retried *outside* it."""
        sid = submission_id(job.id)
        try:
            spec = driver_spec(job.spec, self.store)  # resume_from: a job id becomes its run folder
        except JobNotFound as err:
            self._carry_out(job, decide(job, Refused(f"resume_from: the job to resume is gone: {err}")))
            return
        entrypoint = self.entrypoint(job.id)
        abort = threading.Event()
        with self._lock:
            # the job's telemetry secret: its digest is stored before the job can report (STARTING),
            # the secret itself goes only into the Ray job's environment
            secret = new_secret()
            try:
                self.store.set_telemetry_digest(job.id, secret_digest(secret))
            except JobNotFound:
                return
            started = self._move_launch(job, sid, demand)
            if started is None:
                return
            with self._state:
                self._aborts[job.id] = abort  # a cancel from now on sets it
        try:
            env = {"PYTHONUNBUFFERED": "1", **self._cluster.job_env(), **self.telemetry_env}
            env[TELEMETRY_TOKEN_ENV] = secret
            if self.policy is not None:
                env.update(self.policy.to_env())
            env[SPEC_ENV] = json.dumps(spec, separators=(",", ":"))  # the spec travels with the job
            submitted = self._submit(started, sid, entrypoint, env, abort)
        finally:
            with self._state:
                self._aborts.pop(job.id, None)
        if submitted and abort.is_set():  # cancelled while the submission was in flight
            self._stop_ray_job(sid)
        elif submitted:
            log.info("scheduler: launched %s as Ray job %s (%s)", job.id, sid, demand)

    def _submit(
        self, started: JobRecord, sid: str, entrypoint: str, env: dict[str, str], abort: threading.Event
    ) -> bool:
        """Submit the Ray job; after an error the failure policy says whether to try again and
        when (a cancel cuts the wait short) or to fail the job. Returns whether Ray has the job."""
        attempt = 0
        while not abort.is_set():
            try:
                self._cluster.jobs_client().submit_job(
                    entrypoint=entrypoint,
                    submission_id=sid,
                    runtime_env={"env_vars": env},
                    metadata={"gradwire_job": started.id},
                )
                return True
            except Exception as err:
                decision = decide(started, SubmitFailed(sid, err, attempt), self.failure_policy)
                if decision.nothing:  # submitted before (a retry, another coordinator): follow it
                    log.warning("scheduler: Ray job %s already existed; following it", sid)
                    return True
                if decision.retry_after_s is not None:
                    log.info("scheduler: submitting %s failed, retrying: %s", sid, err)
                    abort.wait(decision.retry_after_s)  # no lock held
                    attempt += 1
                    continue
                if not abort.is_set():
                    self._carry_out(started, decision)
                return False
        return False

    def _move_launch(self, job: JobRecord, sid: str, demand: Demand) -> JobRecord | None:
        decision = decide(job, Admitted(sid, str(demand)))
        if not decision.moves:
            return None
        (move,) = decision.moves
        try:
            record = self.store.transition(
                job.id, move.to, move.reason, expect=JobState.QUEUED, **move.fields
            )
        except (StateConflict, IllegalTransition, JobNotFound) as err:
            log.debug("scheduler: %s not launched: %s", job.id, err)
            return None
        with self._state:
            self._unplaced[job.id] = None
        return record

    # ---------------------------------------------------------------- telemetry

    def on_reports(self, reports: list[pb.StepReport]) -> list[pb.StepReport]:
        """The telemetry sink's callback: store the points, feed the metrics, then let the job's
        lifecycle see what the reports say (the job runs; a higher worker-group attempt: Ray Train
        restored it; rank 0's compressor changed) and keep each rank's placement; returns the
        reports of the jobs whose points the store took (the sink counts the rest as dropped). A
        report of a step run again after a restore is kept (it counts in the metrics) though the
        store keeps the first point of each (rank, step). Behind the coordinator's sink only
        authenticated reports within bounds of open jobs get here
        (:mod:`gradwire.server.telemetry_gate`), so nothing else can move a metric, a stored point
        or a job's state."""
        try:
            stored = self.store.add_reports(reports)  # one transaction for the whole batch
        except Exception:
            log.exception("could not store %d telemetry points", len(reports))
            return []
        kept = [report for report in reports if report.job_id in stored]  # else: the job is gone
        self.metrics.observe_reports(kept)
        by_job: dict[str, list[pb.StepReport]] = {}
        for report in kept:
            by_job.setdefault(report.job_id, []).append(report)
        for job_id, batch in by_job.items():
            try:
                self._follow_reports(job_id, batch)
            except JobNotFound:
                continue
        return kept

    def _follow_reports(self, job_id: str, batch: list[pb.StepReport]) -> None:
        """The I/O around ``decide(job, ReportsArrived(...))`` for one job's stored reports: the
        store is read only when the reports may change something (first reports, a new attempt,
        a new compressor), and the placement written only when a rank's attempt or node changed."""
        with self._state:
            unplaced = job_id in self._unplaced
            if unplaced:
                del self._unplaced[job_id]
            seen = self._seen.get(job_id)
        signal = _reports_signal(batch)
        if (
            seen is None
            or unplaced
            or signal.attempt > seen[0]
            or any(name != seen[1] for _, name in signal.compressors)
        ):
            job = self.store.get(job_id)
            if not job.terminal:
                job = self._carry_out(job, decide(job, signal, self.failure_policy)) or self.store.get(job_id)
            with self._state:
                self._seen[job_id] = (job.attempt, job.compressor or "")
        self._keep_placement(job_id, batch)

    def _keep_placement(self, job_id: str, batch: list[pb.StepReport]) -> None:
        changed: dict[int, tuple[int, int, str, int]] = {}
        with self._state:
            ranks = self._ranks.setdefault(job_id, {})
            for r in batch:
                where = (r.attempt, r.node_address)
                if ranks.get(r.rank) != where:
                    ranks[r.rank] = where
                    changed[r.rank] = (r.rank, r.attempt, r.node_address, r.step)
        if changed:
            self.store.set_placement(job_id, changed.values())


def _stale_spec(job: JobRecord) -> str | None:
    """Why a queued job's stored spec cannot run, or ``None``. A spec stored under this
    coordinator's schema version was validated at the door and is trusted; one stored under another
    version (or before versions were kept) is validated again, once, before it is admitted."""
    if job.spec_version == SPEC_SCHEMA_VERSION:
        return None
    try:
        JobSpec.from_dict(job.spec)
    except SpecError as err:
        stored = "version not recorded" if job.spec_version is None else f"version {job.spec_version}"
        return (
            f"the stored spec (schema {stored}; this coordinator's is version {SPEC_SCHEMA_VERSION}) "
            f"is no longer valid: {err}"
        )
    return None


def _reports_signal(batch: list[pb.StepReport]) -> ReportsArrived:
    """What one job's batch of reports tells its lifecycle: the highest attempt with the lowest
    step reported in it, and each change of rank 0's compressor with its step."""
    attempt = max(r.attempt for r in batch)
    resumed = min(r.step for r in batch if r.attempt == attempt)
    changes: list[tuple[int, str]] = []
    for r in batch:
        if r.rank == 0 and r.compressor and (not changes or changes[-1][1] != r.compressor):
            changes.append((r.step, r.compressor))
    return ReportsArrived(attempt=attempt, resumed_step=resumed, compressors=tuple(changes))
