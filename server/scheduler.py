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
The submission is retried (Ray answers "No available agent" while a head's agent starts, and a
head may be briefly unreachable) with the scheduler lock *released*: the lock only covers the
state changes, so a cancel is answered at once whatever Ray does, and a job cancelled while its
submission was being retried is not submitted, or is stopped once Ray has it. What needs no
thread has modules of its own: ``ray_jobs.py`` (submission ids, failure reasons), ``demand.py``
(what a job asks of the cluster and whether it fits), ``restarts.py`` (restarts seen in
telemetry), ``report_points.py`` (a StepReport as a stored point).

Cancel writes CANCELLED and returns; the Ray job is stopped on a helper thread (a Ray that does
not answer cannot hold the caller). Whatever Ray reports afterwards for a cancelled job is
ignored, and a stop that did not get through is retried every poll until Ray reports the job
ended. Start-up :meth:`Scheduler.reconcile` applies the follow rules once to
every non-terminal job (queued ones stay queued).

Restarts come from telemetry: a rank reporting a step at or below one it reported before (the
sink has already dropped re-sent reports) means Ray Train restored the worker group from a
checkpoint; the job goes RUNNING → RESTARTING → RUNNING and
``CoordinatorMetrics.worker_restarted`` counts it once per restart, however many ranks show it.
"""

from __future__ import annotations

import contextlib
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
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.ray_cluster import RayCluster, RayUnavailable, is_not_found
from gradwire.server.ray_jobs import failure_reason, submission_id
from gradwire.server.records import JobNotFound, JobRecord, StateConflict
from gradwire.server.restarts import RestartTracker
from gradwire.server.resume import driver_spec
from gradwire.server.states import TERMINAL_STATES, IllegalTransition, JobState
from gradwire.server.store import JobStore
from gradwire.server.telemetry_gate import new_secret, secret_digest
from gradwire.spec import SpecError

log = logging.getLogger(__name__)

SUBMIT_ATTEMPTS, SUBMIT_BACKOFF_S = 6, 1.0  # while Ray answers "No available agent" (agent starting)
#: the runtime_env variable that carries the job's spec (JSON) to its driver (`gradwire train --spec-env`)
SPEC_ENV = "GRADWIRE_JOB_SPEC"
#: the states of a job that has a Ray job (submitted, running, or being restored)
LAUNCHED = (JobState.STARTING, JobState.RUNNING, JobState.RESTARTING)
CANCELLED_BY_USER = "cancelled by user"

__all__ = ["CANCELLED_BY_USER", "LAUNCHED", "SPEC_ENV", "Scheduler"]


class Scheduler:
    """Admits, launches, follows and cancels jobs on Ray; the coordinator's job control.

    Implements the ``control`` protocol of :mod:`gradwire.server.control` (``cancel``, ``logs``,
    ``cluster``, ``wake``) and the telemetry sink's callback (:meth:`on_reports`).
    ``telemetry_address`` is the ``host:port`` workers send step reports to (settable until the
    first launch). ``policy``: what specs
    may ask for (gradwire/policy.py), put in each job's environment so that its driver and
    workers refuse what the REST door would have. A job Ray reports
    RUNNING counts as placed after ``placement_grace_s`` even if no telemetry arrived.
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
        cluster_timeout_s: float = 10.0,
        policy: JobPolicy | None = None,
        telemetry_env: Mapping[str, str] | None = None,
    ) -> None:
        self.store, self.metrics = store, metrics
        self.telemetry_env = dict(telemetry_env or {})  # e.g. GRADWIRE_TELEMETRY_CA for every job
        self.policy = policy  # into every job's environment: its driver and workers check again
        self._cluster = cluster
        self.telemetry_address = telemetry_address
        self.poll_s = float(poll_s)
        self.python = python
        self.placement_grace_s = float(placement_grace_s)
        self.cluster_timeout_s = float(cluster_timeout_s)
        self._lock = threading.RLock()  # launch and cancel: state change and Ray call together
        self._state = threading.Lock()  # the in-memory maps below
        self._unplaced: dict[str, float | None] = {}  # launched, not yet placed -> when Ray said RUNNING
        self._demands: dict[str, Demand] = {}
        self._stopping: dict[str, float] = {}  # submission id -> last stop request (monotonic)
        self._aborts: dict[str, threading.Event] = {}  # job id -> set by cancel while it is submitted
        self._restarts = RestartTracker()
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
                try:
                    record = self.store.transition(
                        job_id, JobState.CANCELLED, CANCELLED_BY_USER, expect=job.state
                    )
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
        if status is None:
            self._move(job, JobState.FAILED, f"lost: Ray no longer knows this job (submission id {sid})")
        elif status == "PENDING":
            return
        elif status == "RUNNING":
            with self._state:
                if job.id in self._unplaced and self._unplaced[job.id] is None:
                    self._unplaced[job.id] = time.monotonic()
                running_at = self._unplaced.get(job.id)
                if running_at is not None and time.monotonic() - running_at > self.placement_grace_s:
                    del self._unplaced[job.id]
            if job.state is not JobState.RUNNING:
                self._move(job, JobState.RUNNING, f"Ray job {sid} is running")
        elif status == "SUCCEEDED":
            if job.state is not JobState.RUNNING:  # it ended between two polls
                job = self._move(job, JobState.RUNNING, f"Ray job {sid} ran")
            if job is not None:
                self._move(job, JobState.SUCCEEDED, f"Ray job {sid} succeeded")
        elif status == "FAILED":
            self._move(job, JobState.FAILED, failure_reason(info, self._logs_or_none(sid)))
        elif status == "STOPPED":
            self._move(job, JobState.CANCELLED, f"Ray job {sid} was stopped outside gradwire")

    def _move(self, job: JobRecord, to: JobState, reason: str) -> JobRecord | None:
        """Transition from the state ``job`` was read in; ``None`` if someone moved it meanwhile."""
        try:
            record = self.store.transition(job.id, to, reason, expect=job.state)
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
            self._restarts.forget(job_id)

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
            try:
                demand = self._demand(job)
            except SpecError as err:
                self._move(job, JobState.FAILED, f"the stored spec is no longer valid: {err}")
                continue
            resources = resources or self._cluster.resources()
            beyond = demand.beyond(resources["total"])
            if beyond is not None:
                self._move(job, JobState.FAILED, f"cannot ever run on this cluster: {beyond}")
                continue
            if not self._fits(demand, resources):
                return  # strict FIFO: the head of the queue waits for room
            self._launch(job, demand)
            resources = None  # read again: the next job sees this one's reservation

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
        except SpecError:
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
            self._move(job, JobState.FAILED, f"resume_from: the job to resume is gone: {err}")
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
        """Submit the Ray job, retrying what may pass (no agent yet, Ray briefly unreachable) with
        growing pauses that a cancel cuts short; whether Ray has the job. A submission that fails
        for good fails the job."""
        for attempt in range(SUBMIT_ATTEMPTS):
            if abort.is_set():
                return False
            try:
                self._cluster.jobs_client().submit_job(
                    entrypoint=entrypoint,
                    submission_id=sid,
                    runtime_env={"env_vars": env},
                    metadata={"gradwire_job": started.id},
                )
                return True
            except Exception as err:
                if "already exists" in str(err):  # submitted before (another coordinator? a retry)
                    log.warning("scheduler: Ray job %s already existed; following it", sid)
                    return True
                if _retryable(err) and attempt + 1 < SUBMIT_ATTEMPTS:
                    log.info("scheduler: submitting %s failed, retrying: %s", sid, err)
                    abort.wait(SUBMIT_BACKOFF_S * (attempt + 1))  # no lock held
                    continue
                if not abort.is_set():
                    self._move(started, JobState.FAILED, f"could not submit the Ray job {sid}: {err}")
                return False
        return False

    def _move_launch(self, job: JobRecord, sid: str, demand: Demand) -> JobRecord | None:
        try:
            record = self.store.transition(
                job.id, JobState.STARTING, f"admitted ({demand}); submitting Ray job {sid}",
                expect=JobState.QUEUED, ray_job_id=sid,
            )  # fmt: skip
        except (StateConflict, IllegalTransition, JobNotFound) as err:
            log.debug("scheduler: %s not launched: %s", job.id, err)
            return None
        with self._state:
            self._unplaced[job.id] = None
        return record

    # ---------------------------------------------------------------- telemetry

    def on_reports(self, reports: list[pb.StepReport]) -> list[pb.StepReport]:
        """The telemetry sink's callback: store the points, then feed the metrics and spot restarts
        from the reports of the jobs whose points the store took; returns those reports (the sink
        counts the rest as dropped). A report of a step run again after a restore is kept (it
        counts in the metrics, and shows the restart) though the store keeps the first point of
        each (rank, step). Behind the coordinator's sink only authenticated reports within bounds
        of open jobs get here (:mod:`gradwire.server.telemetry_gate`), so nothing else can move a
        metric, a stored point or a job's state."""
        try:
            stored = self.store.add_reports(reports)  # one transaction for the whole batch
        except Exception:
            log.exception("could not store %d telemetry points", len(reports))
            return []
        by_job: dict[str, list[pb.StepReport]] = {}
        for report in reports:
            if report.job_id in stored:
                by_job.setdefault(report.job_id, []).append(report)
            # else: the job is unknown (deleted meanwhile): dropped
        kept = [report for report in reports if report.job_id in stored]
        self.metrics.observe_reports(kept)
        for job_id, batch in by_job.items():
            self._placed(job_id)
            with self._state:
                restarts = [
                    (report.rank, previous, report.step)
                    for report in batch
                    if (previous := self._restarts.observe(job_id, report.rank, report.step)) is not None
                ]
            for rank, previous, step in restarts:
                self._restarted(job_id, rank, previous, step)
        return kept

    def _placed(self, job_id: str) -> None:
        with self._state:
            if job_id not in self._unplaced:
                return
            del self._unplaced[job_id]
        # reports prove the job runs, even if the follow loop has not seen it yet
        with contextlib.suppress(StateConflict, IllegalTransition, JobNotFound):
            self.store.transition(
                job_id, JobState.RUNNING, "first step reports arrived", expect=JobState.STARTING
            )

    def _restarted(self, job_id: str, rank: int, previous: int, step: int) -> None:
        reason = (
            f"rank {rank} reported step {step} after step {previous}: "
            "Ray Train restored the worker group from its last checkpoint"
        )
        try:
            self.store.transition(job_id, JobState.RESTARTING, reason, expect=JobState.RUNNING)
        except (StateConflict, IllegalTransition, JobNotFound) as err:
            log.debug("restart of %s not recorded: %s", job_id, err)
            return
        self.metrics.worker_restarted(job_id)
        try:
            self.store.transition(
                job_id, JobState.RUNNING, f"worker group running again from step {step}",
                expect=JobState.RESTARTING,
            )  # fmt: skip
        except (StateConflict, IllegalTransition, JobNotFound) as err:
            log.debug("%s did not return to RUNNING: %s", job_id, err)


def _retryable(err: BaseException) -> bool:
    """Whether a failed submission may pass if tried again: a head whose job agent is not up yet
    ("No available agent"), or a Jobs API that did not answer or refused the connection."""
    if "No available agent" in str(err) or isinstance(err, (RayUnavailable, ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in ("ConnectionError", "Timeout") for c in type(err).__mro__)  # requests'
