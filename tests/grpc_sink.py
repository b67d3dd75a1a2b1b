"""A recording gRPC telemetry sink for tests (loopback only)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from gradwire.protos import telemetry_pb2 as pb
from gradwire.protos import telemetry_pb2_grpc as pb_grpc
from tests.waiting import free_port  # noqa: F401  (re-exported: tests import it from here)


class RecordingSink(pb_grpc.TelemetryServicer):
    """Records every report in arrival order."""

    def __init__(self) -> None:
        self.reports: list[pb.StepReport] = []
        self.streams = 0
        self.lock = threading.Lock()

    def StreamReports(self, request_iterator, context):
        with self.lock:
            self.streams += 1
        n = 0
        for batch in request_iterator:
            with self.lock:
                self.reports.extend(batch.reports)
            n += len(batch.reports)
        return pb.StreamSummary(received=n)

    def by_rank(self, rank: int) -> list[pb.StepReport]:
        with self.lock:
            return [r for r in self.reports if r.rank == rank]


def start_sink(port: int = 0) -> tuple[grpc.Server, RecordingSink, int]:
    sink = RecordingSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TelemetryServicer_to_server(sink, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, f"could not bind 127.0.0.1:{port}"
    server.start()
    return server, sink, bound


