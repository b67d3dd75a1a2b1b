"""The coordinator's own health metrics: REST requests (by route template, method, status, latency)
and telemetry reports received / dropped by reason, fed by a real app and a real gRPC sink."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gradwire.protos import telemetry_pb2 as pb
from gradwire.protos import telemetry_pb2_grpc as pb_grpc
from gradwire.server.app import create_app
from gradwire.server.metrics import DROP_REASONS, CoordinatorMetrics
from gradwire.server.settings import Settings
from gradwire.server.store import JobStore
from gradwire.server.telemetry_sink import TelemetrySink

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"


pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


def scrape_text(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_rest_requests_are_counted_by_route_template_method_and_status(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        app = create_app(Settings(max_body_bytes=4096), store=store)
        client = TestClient(app, raise_server_exceptions=False)
        job = client.post("/v1/jobs", json=yaml.safe_load(EXAMPLE.read_text()))
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert client.get("/v1/jobs/does-not-exist").status_code == 404
        assert client.get("/v1/jobs/another-missing-one").status_code == 404
        assert client.get("/no/such/path/at/all").status_code == 404
        assert client.post("/v1/jobs", content=b"x" * 5000).status_code == 413  # refused by a middleware
        samples = scrape_text(client.get("/metrics").text)
    finally:
        store.close()

    count = "gradwire_http_requests_total"
    assert sample(samples, count, route="/v1/jobs", method="POST", status="202") == 1
    assert sample(samples, count, route="/v1/jobs/{job_id}", method="GET", status="200") == 1
    # two different missing ids, one series: the label is the template, never the raw path
    assert sample(samples, count, route="/v1/jobs/{job_id}", method="GET", status="404") == 2
    assert sample(samples, count, route="unmatched", method="GET", status="404") == 1
    # refused before routing (by the body limit): counted, under no route
    assert sample(samples, count, route="unmatched", method="POST", status="413") == 1
    raw_paths = [dict(k[1]).get("route") for k in samples if k[0] == count]
    assert not any(job_id in str(r) or "does-not-exist" in str(r) for r in raw_paths)

    hist = "gradwire_http_request_duration_seconds"
    assert sample(samples, f"{hist}_count", route="/v1/jobs/{job_id}", method="GET") == 3
    inf = sample(samples, f"{hist}_bucket", route="/v1/jobs/{job_id}", method="GET", le="+Inf")
    assert inf == 3
    slowest = sample(samples, f"{hist}_bucket", route="/v1/jobs/{job_id}", method="GET", le="10.0")
    assert slowest == 3  # three quick answers all fall under the top bound
    assert sample(samples, f"{hist}_sum", route="/v1/jobs/{job_id}", method="GET") > 0


def report(job: str, rank: int, step: int) -> pb.StepReport:
    return pb.StepReport(
        job_id=job, rank=rank, step=step, compressor="topk", loss=1.0, compute_s=0.01,
        bytes_sent=100 * (step + 1), bytes_uncompressed=4000 * (step + 1),
    )  # fmt: skip


def stream(address: str, *batches: list[pb.StepReport]) -> pb.StreamSummary:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TelemetryStub(channel)
        return stub.StreamReports(iter([pb.ReportBatch(reports=b) for b in batches]), timeout=5.0)


def test_telemetry_received_and_dropped_by_reason() -> None:
    metrics = CoordinatorMetrics()
    before = scrape_text(metrics.render()[0].decode())
    for reason in DROP_REASONS:  # present at zero before anything happens
        assert sample(before, "gradwire_telemetry_reports_dropped_total", reason=reason) == 0
    assert sample(before, "gradwire_telemetry_reports_received_total") == 0

    def store(reports: list[pb.StepReport]) -> None:
        if any(r.step == 7 for r in reports):
            raise RuntimeError("store down")

    def count(what: str, n: int) -> None:
        if what == "received":
            metrics.reports_received(n)
        else:
            metrics.reports_dropped(what, n)

    with TelemetrySink(store, accept_job=lambda job: job != "ghost", on_counts=count) as sink:
        good = [report("a", 0, i) for i in range(4)]
        assert stream(sink.address, good).received == 4
        assert stream(sink.address, good[2:]).received == 0  # re-sent: 2 duplicates
        invalid = pb.StepReport(job_id="a", rank=-1, step=9)
        assert stream(sink.address, [invalid, report("a", 1, 0)]).received == 1
        assert stream(sink.address, [report("a", 0, 7), report("a", 0, 8)]).received == 0  # callback raised
        with pytest.raises(grpc.RpcError):
            stream(sink.address, [report("ghost", 0, 0)])
        assert sink.dropped() == {
            "invalid": 1, "unknown_job": 1, "unauthenticated": 0, "duplicate": 2, "callback_error": 2,
        }  # fmt: skip

    samples = scrape_text(metrics.render()[0].decode())
    dropped = "gradwire_telemetry_reports_dropped_total"
    assert sample(samples, "gradwire_telemetry_reports_received_total") == 5
    assert sample(samples, dropped, reason="duplicate") == 2
    assert sample(samples, dropped, reason="invalid") == 1
    assert sample(samples, dropped, reason="unknown_job") == 1
    assert sample(samples, dropped, reason="callback_error") == 2


def test_unknown_drop_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown drop reason 'lost'"):
        CoordinatorMetrics().reports_dropped("lost", 1)
