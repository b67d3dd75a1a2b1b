"""A worker's StepReport (the gRPC telemetry message) as a point of the job's stored time series."""

from __future__ import annotations

import time
from typing import Any

from gradwire.protos import telemetry_pb2 as pb

__all__ = ["report_point"]


def report_point(report: pb.StepReport) -> dict[str, Any]:
    """The JobPoint fields of one StepReport (the arrival time when the worker sent no wall time)."""
    wall = report.wall_time.ToNanoseconds() / 1e9 if report.HasField("wall_time") else time.time()
    return {
        "rank": report.rank,
        "step": report.step,
        "wall_time": wall,
        "loss": report.loss,
        "accuracy": report.accuracy if report.HasField("accuracy") else None,
        "compute_s": report.compute_s,
        "compress_s": report.compress_s,
        "communicate_s": report.communicate_s,
        "wait_s": report.wait_s,
        "bytes_sent": report.bytes_sent,
        "bytes_uncompressed": report.bytes_uncompressed,
        "stragglers": len(report.stragglers),
    }
