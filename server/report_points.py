"""A worker's StepReport (the gRPC telemetry message) as a row of the job's stored time series: the
one conversion between the report and the store, made where the store writes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from gradwire.protos import telemetry_pb2 as pb

__all__ = ["report_rows"]


def report_rows(reports: Iterable[pb.StepReport]) -> dict[str, list[dict[str, Any]]]:
    """``job_points`` rows of StepReports, by job, each job's first report of a (rank, step) only.

    The values :class:`~gradwire.server.records.JobPoint` would give (a non-finite loss or
    accuracy becomes ``None``, the arrival time stands in for a missing wall time), without a
    model per report. Raises ``ValueError`` for an empty job id or a negative rank."""
    now = time.time()
    isfinite = math.isfinite
    jobs: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in reports:
        job_id, rank, step = r.job_id, r.rank, r.step
        if not job_id or rank < 0:
            raise ValueError(f"a stored point needs a job id and a rank >= 0, got {job_id!r}, {rank}")
        rows = jobs.get(job_id)
        if rows is None:
            rows = jobs[job_id] = {}
        if (rank, step) in rows:
            continue
        loss = r.loss
        accuracy = r.accuracy if r.HasField("accuracy") else None
        rows[(rank, step)] = {
            "job_id": job_id,
            "rank": rank,
            "step": step,
            "wall_time": r.wall_time.ToNanoseconds() / 1e9 if r.HasField("wall_time") else now,
            "loss": loss if isfinite(loss) else None,
            "accuracy": accuracy if accuracy is None or isfinite(accuracy) else None,
            "compute_s": r.compute_s,
            "compress_s": r.compress_s,
            "communicate_s": r.communicate_s,
            "wait_s": r.wait_s,
            "bytes_sent": r.bytes_sent,
            "bytes_uncompressed": r.bytes_uncompressed,
            "stragglers": len(r.stragglers),
        }
    return {job_id: list(rows.values()) for job_id, rows in jobs.items()}
