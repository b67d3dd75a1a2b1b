"""TelemetrySink: a real gRPC server on 127.0.0.1:0 fed by the real worker client (a few seconds)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from gradwire.protos import telemetry_pb2 as pb
from gradwire.protos import telemetry_pb2_grpc as pb_grpc
from gradwire.server.telemetry_sink import TelemetrySink, is_loopback
from gradwire.worker.telemetry import TelemetryClient, to_proto

FAST = {"flush_s": 0.02, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 1.0}


class Collector:
    """on_reports callback that keeps every delivered report."""

    def __init__(self) -> None:
        self.reports: list[pb.StepReport] = []
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, reports: list[pb.StepReport]) -> None:
        with self.lock:
            self.calls += 1
            self.reports.extend(reports)

    def steps(self, job: str, rank: int) -> list[int]:
        with self.lock:
            return [r.step for r in self.reports if r.job_id == job and r.rank == rank]


@pytest.fixture
def sink():
    collector = Collector()
    s = TelemetrySink(collector)
    s.start()
    s.collector = collector
    yield s
    s.stop(grace=0)


def stream(address: str, *batches: list[pb.StepReport], timeout: float = 5.0) -> pb.StreamSummary:
    """One raw StreamReports call sending ``batches``."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TelemetryStub(channel)
        return stub.StreamReports(iter([pb.ReportBatch(reports=b) for b in batches]), timeout=timeout)


def step(job: str, rank: int, i: int, **extra) -> dict:
    out = {
        "job_id": job, "rank": rank, "step": i, "loss": 1.0 / (i + 1), "accuracy": 0.5,
        "compute_s": 0.01, "compress_s": 0.002, "communicate_s": 0.003, "wait_s": 0.0005,
        "bytes_sent": 1000 * (i + 1), "bytes_uncompressed": 40_000 * (i + 1),
        "stragglers": [i % 3] if i % 2 else [], "compressor": "powersgd", "samples": 32,
        "learning_rate": 0.1, "epoch": i // 10,
    }  # fmt: skip
    out.update(extra)
    return out


def test_real_client_two_ranks_every_report_once_in_order(sink: TelemetrySink) -> None:
    clients = [TelemetryClient(sink.address, "job-1", rank, batch_size=16, **FAST) for rank in (0, 1)]
    for i in range(50):
        for c in clients:
            assert c.report(step("job-1", c.rank, i))
    for c in clients:
        assert c.close(timeout=10), c.stats()
        assert c.sent == 50 and c.dropped == 0
    assert sink.received == 100 and sink.duplicates == 0 and sink.rejected == 0
    got = sink.collector
    for rank in (0, 1):
        assert got.steps("job-1", rank) == list(range(50))
    r = next(r for r in got.reports if r.rank == 1 and r.step == 7)
    want = step("job-1", 1, 7)
    for name in ("loss", "compute_s", "compress_s", "communicate_s", "wait_s", "learning_rate"):
        assert getattr(r, name) == pytest.approx(want[name]), name
    for name in ("bytes_sent", "bytes_uncompressed", "compressor", "samples", "epoch", "accuracy"):
        assert getattr(r, name) == want[name], name
    assert list(r.stragglers) == [1]
    assert r.HasField("wall_time") and abs(r.wall_time.ToNanoseconds() / 1e9 - time.time()) < 60


def test_same_batch_twice_is_delivered_once(sink: TelemetrySink) -> None:
    batch = [to_proto(step("job-d", 0, i)) for i in range(5)]
    summary = stream(sink.address, batch, batch)
    assert summary.received == 5
    assert sink.duplicates == 5
    # a later stream re-sending the tail (what a client does after a broken stream) adds nothing new
    summary = stream(sink.address, batch[3:], [to_proto(step("job-d", 0, 5))])
    assert summary.received == 1
    assert sink.duplicates == 7
    assert sink.collector.steps("job-d", 0) == [0, 1, 2, 3, 4, 5]
    # another rank (or job) with the same step numbers is not a duplicate
    assert stream(sink.address, [to_proto(step("job-d", 1, 0)), to_proto(step("job-e", 0, 0))]).received == 2


def test_step_rerun_after_restart_is_new(sink: TelemetrySink) -> None:
    first = [to_proto(step("job-r", 0, i, wall_time=1000.0 + i)) for i in range(4)]
    rerun = [to_proto(step("job-r", 0, i, wall_time=2000.0 + i)) for i in (2, 3, 4)]
    assert stream(sink.address, first).received == 4
    assert stream(sink.address, rerun).received == 3
    assert sink.collector.steps("job-r", 0) == [0, 1, 2, 3, 2, 3, 4]
    sink.forget_job("job-r")
    assert stream(sink.address, first[:1]).received == 1  # state dropped: seen as new again


def test_invalid_reports_are_rejected_and_the_rest_accepted(sink: TelemetrySink) -> None:
    good = [to_proto(step("job-v", 0, i)) for i in range(3)]
    bad = [
        pb.StepReport(job_id="", rank=0, step=9),
        pb.StepReport(job_id="job-v", rank=-1, step=9),
        pb.StepReport(job_id="x" * 300, rank=0, step=9),
        pb.StepReport(job_id="job-v", rank=2, step=9, compute_s=float("nan")),
        pb.StepReport(job_id="job-v", rank=3, step=9, wait_s=-1.0),
    ]
    summary = stream(sink.address, [good[0], bad[0], bad[1]], [bad[2], good[1], bad[3], bad[4], good[2]])
    assert summary.received == 3
    assert sink.rejected == 5
    assert sink.collector.steps("job-v", 0) == [0, 1, 2]


def test_callback_error_is_counted_and_the_stream_goes_on() -> None:
    seen: list[int] = []

    def flaky(reports: list[pb.StepReport]) -> None:
        if any(r.step == 1 for r in reports):
            raise RuntimeError("store down")
        seen.extend(r.step for r in reports)

    with TelemetrySink(flaky) as s:
        batches = [[to_proto(step("job-c", 0, i))] for i in range(3)]
        assert stream(s.address, *batches).received == 2
        assert s.callback_errors == 1 and s.received == 2
    assert seen == [0, 2]


def test_unknown_job_aborts_with_not_found() -> None:
    collector = Collector()
    with TelemetrySink(collector, accept_job=lambda job: job == "known") as s:
        assert stream(s.address, [to_proto(step("known", 0, 0))]).received == 1
        with pytest.raises(grpc.RpcError) as info:
            stream(s.address, [to_proto(step("known", 0, 1)), to_proto(step("ghost", 0, 0))])
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "ghost" in info.value.details()
        assert s.rejected == 1
    assert [r.job_id for r in collector.reports] == ["known", "known"]


def test_oversized_batch_is_refused() -> None:
    with TelemetrySink(Collector(), max_receive_message_length=1024) as s:
        big = [to_proto(step("job-big", 0, i)) for i in range(50)]
        with pytest.raises(grpc.RpcError) as info:
            stream(s.address, big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stream(s.address, big[:2]).received == 2


def test_non_loopback_host_is_refused() -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ValueError, match="allow_remote=True"):
            TelemetrySink(Collector(), host=host)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "localhost", "::1", "[::1]"))
    TelemetrySink(Collector(), host="0.0.0.0", allow_remote=True)  # allowed, not started


def test_stop_is_clean_and_idempotent() -> None:
    s = TelemetrySink(Collector())
    with pytest.raises(RuntimeError):
        _ = s.address
    port = s.start()
    assert s.address == f"127.0.0.1:{port}" and port > 0
    with pytest.raises(RuntimeError, match="already started"):
        s.start()
    assert stream(s.address, [to_proto(step("job-s", 0, 0))]).received == 1
    s.stop(grace=0.5)
    s.stop()
    with pytest.raises(grpc.RpcError) as info:
        stream(s.address, [to_proto(step("job-s", 0, 1))], timeout=1.0)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_throughput_smoke(sink: TelemetrySink) -> None:
    n, per_batch = 10_000, 200
    reports = [to_proto(step("job-t", i % 4, i // 4)) for i in range(n)]
    batches = [reports[i : i + per_batch] for i in range(0, n, per_batch)]
    start = time.perf_counter()
    summary = stream(sink.address, *batches, timeout=60)
    elapsed = time.perf_counter() - start
    assert summary.received == n
    print(f"telemetry sink: {n} reports in {elapsed:.3f} s = {n / elapsed:,.0f} reports/s")


def test_streams_beyond_max_workers_are_refused_not_queued() -> None:
    release = threading.Event()

    def held_open():
        yield pb.ReportBatch(reports=[to_proto(step("job-w", 0, 0))])
        release.wait(5)

    with TelemetrySink(Collector(), max_workers=1) as s, grpc.insecure_channel(s.address) as channel:
        first = pb_grpc.TelemetryStub(channel).StreamReports.future(held_open(), timeout=10)
        deadline = time.monotonic() + 5
        while s.received == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            stream(s.address, [to_proto(step("job-w", 1, 0))])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert first.result().received == 1
