"""Telemetry client, JSONL fallback and generated-stub freshness (loopback only, a few seconds)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")

from gradwire.worker.telemetry import JsonlSink, TelemetryClient, make_telemetry, to_proto  # noqa: E402
from tests.grpc_sink import free_port as _free_port  # noqa: E402
from tests.grpc_sink import start_sink as _start_sink  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FAST = {"flush_s": 0.05, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 0.2}


def _step(i: int, **extra) -> dict:
    report = {
        "step": i,
        "loss": 1.0 / (i + 1),
        "accuracy": 0.5,
        "compute_s": 0.01,
        "compress_s": 0.002,
        "communicate_s": 0.003,
        "wait_s": 0.0005,
        "bytes_sent": 1000 + i,
        "bytes_uncompressed": 40_000,
        "stragglers": [i % 3],
        "compressor": "powersgd",
    }
    report.update(extra)
    return report


def _wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def sink():
    server, sink, port = _start_sink()
    yield sink, f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_every_report_arrives_in_order_per_rank(sink):
    sink_obj, address = sink
    n = 300
    clients = [TelemetryClient(address, "job-1", rank, batch_size=16, **FAST) for rank in (0, 1)]
    for i in range(n):
        for c in clients:
            assert c.report(_step(i))
    for c in clients:
        assert c.close(timeout=10)
        assert (c.sent, c.dropped, c.pending) == (n, 0, 0)
    for rank in (0, 1):
        got = sink_obj.by_rank(rank)
        assert [r.step for r in got] == list(range(n))
        r = got[7]
        assert r.job_id == "job-1" and r.rank == rank
        assert r.HasField("accuracy") and r.accuracy == 0.5
        assert math.isclose(r.loss, 1 / 8)
        assert (r.compute_s, r.compress_s, r.communicate_s, r.wait_s) == (0.01, 0.002, 0.003, 0.0005)
        assert (r.bytes_sent, r.bytes_uncompressed) == (1007, 40_000)
        assert list(r.stragglers) == [1] and r.compressor == "powersgd"
        assert abs(r.wall_time.ToNanoseconds() / 1e9 - time.time()) < 60


def test_dataclass_and_proto_reports_and_optional_accuracy(sink):
    sink_obj, address = sink

    @dataclasses.dataclass
    class Rep:
        step: int
        loss: float
        accuracy: float | None = None

    with TelemetryClient(address, "job-2", 3, **FAST) as client:
        client.report(Rep(step=0, loss=0.5))
        client.report(to_proto({"step": 1, "loss": 0.25, "wall_time": 1.5e9}, "job-2", 3))
    got = sink_obj.by_rank(3)
    assert [r.step for r in got] == [0, 1]
    assert not got[0].HasField("accuracy")
    assert got[1].wall_time.seconds == 1_500_000_000


def test_unknown_field_is_rejected_at_report_time():
    with pytest.raises(ValueError, match="lsos"):
        to_proto({"step": 1, "lsos": 0.1})


def test_sink_down_never_blocks_and_counts_drops():
    address = f"127.0.0.1:{_free_port()}"  # nothing listens here
    client = TelemetryClient(address, "job-3", 0, max_buffer=100, **FAST)
    t0 = time.perf_counter()
    accepted = sum(client.report(_step(i)) for i in range(1000))
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"1000 report() calls took {elapsed:.3f} s with the sink down"
    assert accepted == 100
    assert client.dropped == 900
    assert client.sent == 0
    t0 = time.perf_counter()
    assert client.close(timeout=0.3) is False
    assert time.perf_counter() - t0 < 3.0
    assert client.dropped == 1000  # the 100 buffered ones were given up at close
    assert client.reconnects >= 1


def test_sink_coming_up_later_gets_buffered_reports():
    port = _free_port()
    client = TelemetryClient(f"127.0.0.1:{port}", "job-4", 2, max_buffer=1000, **FAST)
    for i in range(50):
        client.report(_step(i))
    time.sleep(0.3)  # a few failed connection attempts
    assert client.sent == 0 and client.reconnects >= 1
    server, sink_obj, _ = _start_sink(port)
    try:
        for i in range(50, 80):
            client.report(_step(i))
        assert client.close(timeout=10)
        assert [r.step for r in sink_obj.by_rank(2)] == list(range(80))
        assert (client.sent, client.dropped) == (80, 0)
    finally:
        server.stop(grace=None)


def test_broken_stream_is_resent_at_least_once():
    port = _free_port()
    server, first, _ = _start_sink(port)
    client = TelemetryClient(f"127.0.0.1:{port}", "job-5", 0, batch_size=4, **FAST)
    for i in range(20):
        client.report(_step(i))
    assert _wait_for(lambda: len(first.reports) == 20)
    server.stop(grace=None).wait()  # the open stream breaks before its summary
    for i in range(20, 40):
        client.report(_step(i))
    server2, second, _ = _start_sink(port)
    try:
        assert client.close(timeout=10)
        steps = [r.step for r in first.reports] + [r.step for r in second.reports]
        assert set(steps) == set(range(40))  # nothing lost; duplicates allowed
        assert [r.step for r in second.reports] == list(range(40))  # the broken stream was resent
        assert client.dropped == 0 and client.reconnects >= 1
    finally:
        server2.stop(grace=None)


def test_report_after_close_is_dropped(sink):
    _, address = sink
    client = TelemetryClient(address, "job-6", 0, **FAST)
    client.close(timeout=5)
    assert client.report(_step(0)) is False
    assert client.dropped == 1


def test_jsonl_fallback_writes_valid_lines(tmp_path):
    out = make_telemetry(None, "job-7", 1, run_dir=tmp_path)
    assert isinstance(out, JsonlSink)
    for i in range(5):
        out.report(_step(i))
    out.report({"step": 5, "loss": float("nan")})
    out.close()
    lines = (tmp_path / "telemetry-rank1.jsonl").read_text().splitlines()
    assert len(lines) == 6 and out.sent == 6
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c}")}
    rows = [json.loads(line, **strict) for line in lines]
    assert [r["step"] for r in rows] == list(range(6))
    assert rows[0]["job_id"] == "job-7" and rows[0]["rank"] == 1
    assert rows[2]["stragglers"] == [2] and rows[2]["bytes_sent"] == 1002
    assert isinstance(rows[0]["wall_time"], float)
    assert rows[5]["loss"] is None


def test_jsonl_progress_bar_is_optional(tmp_path):
    with JsonlSink(tmp_path / "run" / "t.jsonl", "job-8", 0, progress=True, total=3) as out:
        for i in range(3):
            out.report(_step(i))
    assert len((tmp_path / "run" / "t.jsonl").read_text().splitlines()) == 3


def test_generated_stubs_are_fresh(tmp_path):
    """Regenerate the stubs and compare byte for byte: a stale stub fails here.

    Uses the grpcio-tools release pinned in scripts/gen_protos.py (the stubs embed its versions);
    the script fetches that wheel once into .gradwire/tools/ when it is not installed.
    """
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    try:
        gen.tools_path()
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot install grpcio-tools=={gen.GRPCIO_TOOLS}: {err}")
    written = gen.generate(tmp_path)
    assert sorted(p.name for p in written) == ["telemetry_pb2.py", "telemetry_pb2_grpc.py"]
    for fresh in written:
        committed = ROOT / "protos" / fresh.name
        assert committed.exists(), f"{committed} missing: run scripts/gen_protos.sh"
        assert fresh.read_bytes() == committed.read_bytes(), (
            f"{committed.relative_to(ROOT)} is stale (or was made by another grpcio-tools version): "
            "run scripts/gen_protos.sh"
        )


def test_the_train_loops_step_report_travels_as_it_is_with_its_identity_filled(sink, tmp_path):
    """worker/runtime.py's step_report is the one conversion (step timing → StepReport): the client
    sends that message, with only job_id, rank and wall_time added; the JSONL fallback keeps every
    field, zeros included."""
    from gradwire.protos import telemetry_pb2 as pb
    from gradwire.worker.runtime import node_address, step_report
    from gradwire.worker.steps import StepTimes

    times = StepTimes(loss=0.5, compute_s=0.01, stragglers=[1])
    made = step_report(
        7, times, {"bytes_sent": 70, "bytes_uncompressed": 700}, attempt=2, node="10.0.0.5",
        compressor="powersgd", learning_rate=0.1, samples=32, epoch=0, evaluation=(0.3, 0.9),
    )  # fmt: skip
    assert isinstance(made, pb.StepReport) and not made.job_id and made.accuracy == pytest.approx(0.9)
    sink_obj, address = sink
    with TelemetryClient(address, "job-9", 1, **FAST) as client:
        client.report(made)
    (got,) = sink_obj.by_rank(1)
    assert (got.job_id, got.rank, got.step, got.attempt, got.node_address) == ("job-9", 1, 7, 2, "10.0.0.5")
    assert got.HasField("wall_time") and list(got.stragglers) == [1] and got.bytes_sent == 70
    out = make_telemetry(None, "job-9", 0, run_dir=tmp_path)
    out.report(step_report(
        1, StepTimes(loss=1.0), {"bytes_sent": 0, "bytes_uncompressed": 0}, attempt=0, node="",
        compressor="none", learning_rate=0.1, samples=1, epoch=0, evaluation=None,
    ))  # fmt: skip
    out.close()
    (row,) = [json.loads(line) for line in (tmp_path / "telemetry-rank0.jsonl").read_text().splitlines()]
    assert row["attempt"] == 0 and row["bytes_sent"] == 0 and row["job_id"] == "job-9"
    assert "accuracy" not in row
    assert node_address()  # outside Ray: this host's own address
