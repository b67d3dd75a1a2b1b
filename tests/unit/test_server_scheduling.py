"""The scheduler's thread-free pieces: what a job demands and whether it fits, step reports as
stored points, and a Ray job's id and failure reason (the job's lifecycle: test_server_lifecycle.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.demand import Demand
from gradwire.server.ray_jobs import failure_reason, submission_id
from gradwire.server.records import JobPoint
from gradwire.server.report_points import report_rows
from gradwire.spec import JobSpec

CLUSTER = {"total": {"CPU": 8.0, "GPU": 0.0}, "available": {"CPU": 8.0}}


def test_demand_of_a_stored_spec_multiplies_workers_by_their_share():
    spec = {"name": "d", "model": {"name": "mlp"}, "data": {"dataset": "digits", "batch_size": 8},
            "optimizer": {"name": "sgd", "lr": 0.1}, "steps": 1,
            "workers": {"count": 3, "cpus_per_worker": 1.5}}  # fmt: skip
    stored = JobSpec.from_dict(spec).model_dump(mode="json")  # as the REST door stores it
    demand = Demand.of(stored)
    assert (demand.cpus, demand.gpus) == (4.5, 0.0)
    assert str(demand) == "3 workers × 1.5 CPU"
    with pytest.raises(ValueError, match="workers"):
        Demand.of({"name": "d"})


def test_a_demand_beyond_the_whole_cluster_says_which_resource():
    assert Demand(4, 2.0, 0.0).beyond(CLUSTER["total"]) is None  # exactly 8 CPUs: fits
    reason = Demand(2, 1.0, 1.0).beyond(CLUSTER["total"])
    assert reason is not None and "2 GPUs" in reason and "gpus_per_worker" in reason


def test_fits_now_subtracts_launched_jobs_that_ray_has_not_placed_yet():
    two = Demand(2, 1.0, 0.0)
    assert two.fits_now(CLUSTER, committed=[], pending=[])
    # Ray still shows 8 CPUs available, but 7 are promised to a launched, unplaced job
    seven = Demand(7, 1.0, 0.0)
    assert not two.fits_now(CLUSTER, committed=[seven], pending=[seven])
    assert Demand(1, 1.0, 0.0).fits_now(CLUSTER, committed=[seven], pending=[seven])


def test_fits_now_keeps_all_launched_jobs_within_the_total():
    # Ray reports room (a placed job's workers may be idle), but the commitments would exceed 8
    placed = Demand(7, 1.0, 0.0)
    assert not Demand(2, 1.0, 0.0).fits_now(CLUSTER, committed=[placed], pending=[])
    assert Demand(1, 1.0, 0.0).fits_now(CLUSTER, committed=[placed], pending=[])


def test_a_cpu_only_job_ignores_a_cluster_without_gpus_and_a_gpu_job_needs_them():
    assert Demand(1, 1.0, 0.0).fits_now(CLUSTER, committed=[], pending=[])
    assert not Demand(1, 1.0, 1.0).fits_now(CLUSTER, committed=[], pending=[])


def test_a_step_report_becomes_a_valid_point_once_per_rank_and_step():
    report = pb.StepReport(job_id="j", rank=1, step=4, loss=0.5, bytes_sent=10, bytes_uncompressed=40,
                           stragglers=[2, 3], wall_time=Timestamp(seconds=1_700_000_000))  # fmt: skip
    again = pb.StepReport(job_id="j", rank=1, step=4, loss=9.0, accuracy=0.75)
    (row,) = report_rows([report, again])["j"]  # the first report of a (rank, step) only
    assert row["wall_time"] == 1_700_000_000 and row["accuracy"] is None and row["stragglers"] == 2
    point = JobPoint.model_validate({k: v for k, v in row.items() if k != "job_id"})
    assert (point.rank, point.step, point.loss) == (1, 4, 0.5)
    assert (point.bytes_sent, point.bytes_uncompressed) == (10, 40)
    report.accuracy = 0.75
    report.loss = float("nan")
    (row,) = report_rows([report])["j"]
    assert row["accuracy"] == pytest.approx(0.75) and row["loss"] is None  # JSON has no NaN
    with pytest.raises(ValueError, match="job id"):
        report_rows([pb.StepReport(rank=0, step=1)])


def test_ray_job_id_and_failure_reasons():
    assert submission_id("job-0123456789ab") == "gradwire-job-0123456789ab"
    log = "step 1\nrun: stopped: loss is nan at step 7\n"
    assert failure_reason(SimpleNamespace(driver_exit_code=1), log).startswith("stopped on non-finite")
    assert "refused its input" in failure_reason(SimpleNamespace(driver_exit_code=2), "")
    crashed = failure_reason(SimpleNamespace(driver_exit_code=None, message="node died"), "boom")
    assert crashed.startswith("the Ray job failed: node died") and crashed.endswith("boom")
