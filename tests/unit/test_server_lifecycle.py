"""A job's lifecycle: :func:`decide` for every signal, the failure policy, and the scheduler carrying
decisions out against a real job store (SQLite) with reports as the telemetry sink hands them over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.job_lifecycle import (
    CANCELLED_BY_USER,
    Admitted,
    CancelRequested,
    FailurePolicy,
    RayStatus,
    Refused,
    ReportsArrived,
    SubmitFailed,
    decide,
)
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.ray_cluster import RayCluster, RayUnavailable
from gradwire.server.ray_jobs import submission_id
from gradwire.server.scheduler import Scheduler
from gradwire.server.states import JobState, can_transition
from gradwire.server.store import JobStore
from gradwire.spec import SPEC_SCHEMA_VERSION, JobSpec

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
S = JobState


@dataclass(frozen=True)
class Job:
    state: JobState
    attempt: int = 0
    compressor: str | None = None


def moves(job: Job, signal, policy: FailurePolicy | None = None) -> list[JobState]:
    return [m.to for m in decide(job, signal, policy).moves]


@pytest.mark.parametrize(
    ("state", "status", "expected"),
    [
        (S.STARTING, "PENDING", []),
        (S.STARTING, "RUNNING", [S.RUNNING]),
        (S.RUNNING, "RUNNING", []),
        (S.RESTARTING, "RUNNING", [S.RUNNING]),
        (S.STARTING, "SUCCEEDED", [S.RUNNING, S.SUCCEEDED]),  # it ended between two polls
        (S.RUNNING, "SUCCEEDED", [S.SUCCEEDED]),
        (S.RUNNING, "FAILED", [S.FAILED]),
        (S.RUNNING, "STOPPED", [S.CANCELLED]),
        (S.STARTING, None, [S.FAILED]),
        (S.QUEUED, "RUNNING", []),  # not launched: Ray has nothing to say
        (S.CANCELLED, "STOPPED", []),  # a cancelled job ignores Ray's later words
        (S.SUCCEEDED, None, []),
    ],
)
def test_ray_status_moves_every_state_legally(state, status, expected):
    decision = decide(Job(state), RayStatus("gradwire-job-1", status, failure="stopped on non-finite values"))
    assert [m.to for m in decision.moves] == expected
    here = state
    for move in decision.moves:  # each move is one the state machine has
        assert can_transition(here, move.to), (here, move.to)
        here = move.to
    if status == "FAILED":
        assert decision.moves[0].reason == "stopped on non-finite values"
    if status is None and expected:
        assert decision.moves[0].reason.startswith("lost: Ray no longer knows this job")


@pytest.mark.parametrize("state", [S.QUEUED, S.STARTING, S.RUNNING, S.RESTARTING])
def test_cancel_is_a_move_from_every_open_state(state):
    (move,) = decide(Job(state), CancelRequested()).moves
    assert move.to is S.CANCELLED and move.reason == CANCELLED_BY_USER
    assert decide(Job(S.FAILED), CancelRequested()).nothing


def test_admission_and_refusal():
    (move,) = decide(Job(S.QUEUED), Admitted("gradwire-job-1", "2 workers × 1 CPU")).moves
    assert move.to is S.STARTING and move.fields == {"ray_job_id": "gradwire-job-1"}
    assert "2 workers × 1 CPU" in move.reason
    assert decide(Job(S.STARTING), Admitted("gradwire-job-1", "x")).nothing  # admitted once
    assert moves(Job(S.QUEUED), Refused("cannot ever run on this cluster: 5 CPUs")) == [S.FAILED]


def test_failure_policy_retries_what_may_pass_and_fails_the_rest():
    policy = FailurePolicy(submit_attempts=3, submit_backoff_s=0.5)
    starting = Job(S.STARTING)
    agent = RuntimeError("No available agent to submit job, please try again later.")
    first = decide(starting, SubmitFailed("sid", agent, 0), policy)
    assert first.moves == () and first.retry_after_s == 0.5
    assert decide(starting, SubmitFailed("sid", RayUnavailable("down"), 1), policy).retry_after_s == 1.0
    last = decide(starting, SubmitFailed("sid", agent, 2), policy)  # the third and last try
    assert [m.to for m in last.moves] == [S.FAILED] and "could not submit the Ray job sid" in last.moves[
        0
    ].reason
    refused = decide(starting, SubmitFailed("sid", ValueError("bad runtime_env"), 0), policy)
    assert [m.to for m in refused.moves] == [S.FAILED] and refused.retry_after_s is None
    assert decide(starting, SubmitFailed("sid", RuntimeError("Job sid already exists"), 0), policy).nothing
    with pytest.raises(ValueError):
        FailurePolicy(submit_attempts=0)
    diverged = SimpleNamespace(driver_exit_code=1)
    assert policy.explain_failure(diverged, "run: stopped: loss is nan at step 7\n").startswith(
        "stopped on non-finite"
    )


def test_reports_start_a_job_and_a_higher_attempt_is_one_restart():
    assert moves(Job(S.STARTING), ReportsArrived(attempt=0, resumed_step=1)) == [S.RUNNING]
    assert moves(Job(S.RUNNING), ReportsArrived(attempt=0, resumed_step=9)) == []
    decision = decide(Job(S.RUNNING), ReportsArrived(attempt=2, resumed_step=21))
    assert [m.to for m in decision.moves] == [S.RESTARTING, S.RUNNING]
    assert decision.moves[0].fields == {"attempt": 2} and decision.moves[1].fields == {"attempt": 2}
    assert "attempt 2" in decision.moves[0].reason and "step 20" in decision.moves[0].reason
    assert moves(Job(S.RUNNING, attempt=2), ReportsArrived(attempt=2, resumed_step=21)) == []  # once
    assert moves(Job(S.RUNNING, attempt=2), ReportsArrived(attempt=1, resumed_step=5)) == []  # late ones
    # the coordinator never saw the job run before the restore
    assert moves(Job(S.STARTING), ReportsArrived(attempt=1, resumed_step=4)) == [
        S.RUNNING,
        S.RESTARTING,
        S.RUNNING,
    ]


def test_a_compressor_change_is_a_note_and_the_first_value_is_kept_silently():
    first = decide(Job(S.RUNNING), ReportsArrived(compressors=((1, "auto:powersgd-r4"),)))
    (note,) = first.notes
    assert note.reason == "" and note.fields == {"compressor": "auto:powersgd-r4"}
    held = Job(S.RUNNING, compressor="auto:powersgd-r4")
    assert decide(held, ReportsArrived(compressors=((2, "auto:powersgd-r4"),))).nothing
    switch = decide(held, ReportsArrived(compressors=((40, "auto:topk-1%"), (41, "auto:powersgd-r4"))))
    assert [n.reason for n in switch.notes] == [
        "compressor: auto:powersgd-r4 → auto:topk-1% at step 40",
        "compressor: auto:topk-1% → auto:powersgd-r4 at step 41",
    ]
    assert switch.notes[-1].fields == {"compressor": "auto:powersgd-r4"} and not switch.moves


# --- the scheduler carrying decisions out --------------------------------------------------------


def report(
    job_id: str, rank: int, step: int, *, attempt: int = 0, compressor: str = "powersgd"
) -> pb.StepReport:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + step) * 1e9))
    return pb.StepReport(
        job_id=job_id, rank=rank, step=step, wall_time=stamp, loss=1.0, compressor=compressor,
        attempt=attempt, node_address=f"10.1.0.{rank + 1}",
    )  # fmt: skip


@pytest.fixture
def launched(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    metrics = CoordinatorMetrics()
    scheduler = Scheduler(store, RayCluster(), metrics, telemetry_address="127.0.0.1:1")  # Ray never asked
    job, _ = store.create(JobSpec.from_file(SPEC).model_dump(mode="json"))
    store.transition(job.id, JobState.STARTING, "test", ray_job_id=submission_id(job.id))
    yield store, metrics, scheduler, job.id
    store.close()


def test_first_reports_run_the_job_and_place_its_ranks(launched):
    store, metrics, scheduler, job_id = launched
    scheduler.on_reports([report(job_id, r, 1) for r in (0, 1)])
    job = store.get(job_id)
    assert job.state is JobState.RUNNING and job.reason == "first step reports arrived"
    assert job.compressor == "powersgd" and job.attempt == 0
    assert [e.to_state for e in store.events(job_id)] == [S.QUEUED, S.STARTING, S.RUNNING]  # no note
    placed = {p.rank: (p.node_address, p.attempt, p.since_step) for p in store.placement(job_id)}
    assert placed == {0: ("10.1.0.1", 0, 1), 1: ("10.1.0.2", 0, 1)}
    sample = metrics.registry.get_sample_value
    assert sample("gradwire_compressor_active", {"job_id": job_id, "compressor": "powersgd"}) == 1


def test_a_compressor_switch_in_rank_0s_reports_is_one_event(launched):
    store, metrics, scheduler, job_id = launched
    scheduler.on_reports([report(job_id, r, 1, compressor="auto:powersgd-r4") for r in (0, 1)])
    scheduler.on_reports([report(job_id, r, s, compressor="auto:topk-1%") for s in (2, 3) for r in (0, 1)])
    scheduler.on_reports([report(job_id, 0, 4, compressor="auto:topk-1%")])
    notes = [e for e in store.events(job_id) if e.from_state == e.to_state]
    assert [e.reason for e in notes] == ["compressor: auto:powersgd-r4 → auto:topk-1% at step 2"]
    assert notes[0].to_state is JobState.RUNNING
    assert store.get(job_id).compressor == "auto:topk-1%"
    sample = metrics.registry.get_sample_value
    assert sample("gradwire_compressor_active", {"job_id": job_id, "compressor": "auto:topk-1%"}) == 1
    assert sample("gradwire_compressor_active", {"job_id": job_id, "compressor": "auto:powersgd-r4"}) == 0


def test_restarts_follow_the_attempt_and_placement_moves_with_it(launched):
    store, metrics, scheduler, job_id = launched
    scheduler.on_reports([report(job_id, r, s) for s in (1, 2, 3) for r in (0, 1)])
    # Ray Train restored the group twice in a row, the second time on another node for rank 1
    restored = [report(job_id, r, s, attempt=2) for s in (3, 4) for r in (0, 1)]
    for r in restored[1::2]:
        r.node_address = "10.1.0.9"
    scheduler.on_reports(restored[:2])
    scheduler.on_reports(restored[2:])
    job = store.get(job_id)
    assert (job.state, job.attempt, job.restarts) == (JobState.RUNNING, 2, 1)
    assert metrics.registry.get_sample_value("gradwire_worker_restarts_total", {"job_id": job_id}) == 1
    placed = {p.rank: (p.node_address, p.attempt, p.since_step) for p in store.placement(job_id)}
    assert placed == {0: ("10.1.0.1", 2, 3), 1: ("10.1.0.9", 2, 3)}
    # a cancelled job's later reports change nothing
    scheduler.cancel(job_id)
    scheduler.on_reports([report(job_id, 0, 5, attempt=3)])
    assert store.get(job_id).state is JobState.CANCELLED and store.get(job_id).restarts == 1


# --- the spec: validated at the door, trusted after ----------------------------------------------


class TinyCluster:
    """A cluster of one CPU: every job of the example spec (2 workers) is too big for it."""

    def resources(self, timeout_s: float = 10.0) -> dict:
        return {"total": {"CPU": 1.0, "GPU": 0.0}, "available": {"CPU": 1.0, "GPU": 0.0}}


def test_a_stored_spec_is_trusted_at_its_schema_version_and_validated_again_otherwise(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    scheduler = Scheduler(
        store, TinyCluster(), CoordinatorMetrics(), telemetry_address="127.0.0.1:1", never_fits_grace_s=0
    )
    valid = JobSpec.from_file(SPEC).model_dump(mode="json")
    broken = {**valid, "compression": {"name": "no-such-compressor"}}
    trusted, _ = store.create(broken, spec_version=SPEC_SCHEMA_VERSION)  # as if the door had passed it
    legacy, _ = store.create(broken)  # stored before versions were kept
    older, _ = store.create(valid, spec_version=SPEC_SCHEMA_VERSION - 1)  # still valid: admitted on
    scheduler.poll_once()
    reasons = {job.id: store.get(job.id).reason for job in (trusted, legacy, older)}
    assert all(store.get(j).state is JobState.FAILED for j in reasons)
    # trusted: not validated again, so it got as far as the cluster's size
    assert reasons[trusted.id].startswith("cannot ever run on this cluster"), reasons[trusted.id]
    assert reasons[older.id].startswith("cannot ever run on this cluster"), reasons[older.id]
    assert reasons[legacy.id].startswith(
        f"the stored spec (schema version not recorded; this coordinator's is version {SPEC_SCHEMA_VERSION}) "
        "is no longer valid"
    ), reasons[legacy.id]
    assert "compression.name" in reasons[legacy.id]
    store.close()


class GrowingCluster:
    """One CPU until ``grow()``; then two (a node joined): room for one 2-CPU job at a time."""

    def __init__(self) -> None:
        self.cpus = 1.0

    def grow(self) -> None:
        self.cpus = 2.0

    def resources(self, timeout_s: float = 10.0) -> dict:
        return {"total": {"CPU": self.cpus, "GPU": 0.0}, "available": {"CPU": self.cpus, "GPU": 0.0}}


def test_a_job_bigger_than_the_cluster_waits_for_nodes_before_it_fails(tmp_path, monkeypatch):
    """One reading of a cluster whose nodes are still joining does not fail a job for good: it waits
    ``never_fits_grace_s`` at the head of the queue, is launched if the cluster grows, fails if not."""
    grace = 1.0
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    cluster = GrowingCluster()
    scheduler = Scheduler(
        store, cluster, CoordinatorMetrics(), telemetry_address="127.0.0.1:1", never_fits_grace_s=grace
    )
    launched: list[str] = []

    def launch(job, demand) -> None:  # no Ray here: what a launch stores, without the submission
        launched.append(job.id)
        store.transition(job.id, JobState.STARTING, "test: launched")

    monkeypatch.setattr(scheduler, "_launch", launch)
    spec = JobSpec.from_file(SPEC).model_dump(mode="json")  # 2 workers: bigger than 1 CPU
    waits, _ = store.create(spec, spec_version=SPEC_SCHEMA_VERSION)
    fails, _ = store.create(spec, spec_version=SPEC_SCHEMA_VERSION)

    scheduler.poll_once()
    assert store.get(waits.id).state is JobState.QUEUED and launched == []
    cluster.grow()
    scheduler.poll_once()
    assert launched == [waits.id]  # the node joined in time: the first job runs

    store.transition(waits.id, JobState.CANCELLED, "test: out of the way")
    cluster.cpus = 1.0  # the node left again: the second job waits, then fails with the cause
    scheduler.poll_once()
    assert store.get(fails.id).state is JobState.QUEUED
    time.sleep(grace + 0.1)
    scheduler.poll_once()
    failed = store.get(fails.id)
    assert failed.state is JobState.FAILED, failed.reason
    assert failed.reason.startswith("cannot ever run on this cluster"), failed.reason
    assert "CPU" in failed.reason
    store.close()


def test_the_jobs_python_is_a_setting_refused_when_it_is_not_one_path(tmp_path, monkeypatch):
    """GRADWIRE_JOB_PYTHON names the interpreter the job's driver runs on the head; a value that
    is not a single path (a space, a control character) is refused at start, naming the field."""
    from pydantic import ValidationError

    from gradwire.server.settings import Settings

    monkeypatch.setenv("GRADWIRE_JOB_PYTHON", "/opt/gradwire-venv/bin/python")
    settings = Settings()
    assert settings.job_python == "/opt/gradwire-venv/bin/python"
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    python = settings.job_python
    scheduler = Scheduler(store, TinyCluster(), CoordinatorMetrics(), telemetry_address="x:1", python=python)
    assert scheduler.entrypoint("job-1").split()[:3] == [python, "-m", "gradwire.cli"]
    store.close()
    for bad in ("python; rm -rf /", "py\nthon"):
        monkeypatch.setenv("GRADWIRE_JOB_PYTHON", bad)
        with pytest.raises(ValidationError) as caught:
            Settings()
        assert "job_python" in str(caught.value)
        assert "rm -rf" not in str(caught.value)  # the value is not echoed back
