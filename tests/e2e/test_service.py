"""End to end over HTTP: the coordinator served by uvicorn on 127.0.0.1, jobs on the session's real Ray.

Two jobs go in through `POST /v1/jobs` at once: a 30-step digits PowerSGD job that must reach
SUCCEEDED with one time-series point per step and Prometheus byte counters equal to what the
ledger predicts, and a 100 000-step job that is cancelled over REST once it reports steps, after
which Ray must report its job STOPPED.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradwire.cli.remote import CoordinatorClient
from gradwire.spec import JobSpec
from tests.e2e.test_train import powersgd_bytes_per_step
from tests.waiting import free_port, wait_for

pytestmark = pytest.mark.slow

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
STEPS = 30


@pytest.fixture(scope="module")
def served(local_ray, tmp_path_factory):
    import uvicorn

    from gradwire.server.app import create_app
    from gradwire.server.service import Coordinator
    from gradwire.server.settings import Settings

    data = tmp_path_factory.mktemp("service")
    settings = Settings(
        port=free_port(), grpc_port=0, database_url=f"sqlite:///{data}/coordinator.db",
        checkpoint_root=str(tmp_path_factory.getbasetemp()),  # the tests' storages are tmp folders
    )  # fmt: skip
    coordinator = Coordinator(
        database_url=settings.database_url, data_dir=data, poll_s=0.5, ray_address=local_ray.dashboard_url
    )
    with coordinator:
        parts = {"store": coordinator.store, "metrics": coordinator.metrics, "control": coordinator.control}
        app = create_app(settings, **parts)
        config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, 30, "uvicorn start")
        with CoordinatorClient(f"http://127.0.0.1:{settings.port}") as client:
            yield client, coordinator
        server.should_exit = True
        thread.join(timeout=10)


def job_body(name: str, storage: Path, *overrides: str) -> dict:
    spec = JobSpec.from_file(SPEC).with_overrides(
        [
            f"name={name}",
            f"steps={STEPS}",
            "workers.count=2",
            "workers.cpus_per_worker=0.5",
            f"checkpoint.storage={storage}",
            *overrides,
        ]
    )
    return spec.model_dump(mode="json")


def prometheus_samples(client: CoordinatorClient) -> dict[tuple[str, frozenset], float]:
    text = client.http.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_submit_run_and_cancel_over_http(served, tmp_path):
    client, coordinator = served
    done = client.submit(job_body("http-digits", tmp_path / "a"), idempotency_key="http-digits-1")
    long = client.submit(job_body("http-long", tmp_path / "b", "steps=100000"))
    assert done["state"] == "QUEUED" and long["state"] == "QUEUED"
    again = client.submit(job_body("http-digits", tmp_path / "a"), idempotency_key="http-digits-1")
    assert again["id"] == done["id"], "the idempotency key made a second job"

    # cancel the long job over REST once it trains; Ray must stop its job
    wait_for(lambda: client.metrics(long["id"])["points"], 300, "first step reports of the long job")
    cancelled = client.cancel(long["id"])
    assert cancelled["state"] == "CANCELLED"
    ray_jobs = coordinator.cluster.jobs_client()
    ray_id = client.get(long["id"])["ray_job_id"]
    status = wait_for(
        lambda: (s := ray_jobs.get_job_status(ray_id)).is_terminal() and s, 90, "Ray stopping the job"
    )
    assert str(status) == "STOPPED", status
    assert client.get(long["id"])["state"] == "CANCELLED"  # Ray's later status did not overwrite it

    # the digits job runs to the end; one point per step; the counters the ledger predicts
    final = client.wait(done["id"], poll_s=1.0, timeout=300)
    assert final["state"] == "SUCCEEDED", final
    events = [e["to_state"] for e in client._call("GET", f"/v1/jobs/{done['id']}/events").json()["events"]]
    assert events == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"], events
    points = client.metrics(done["id"])["points"]
    assert [p["step"] for p in points] == list(range(1, STEPS + 1))

    spec = JobSpec.from_dict(final["spec"])
    warm = spec.compressor_config().start_iter
    compressed, plain = powersgd_bytes_per_step(spec)
    per_rank_sent = warm * plain + (STEPS - warm) * compressed
    assert points[-1]["bytes_sent"] == per_rank_sent
    samples = prometheus_samples(client)
    labels = frozenset({"job_id": done["id"], "compressor": "powersgd"}.items())
    workers = spec.workers.count  # every rank's bytes count
    assert samples[("gradwire_grad_bytes_sent_total", labels)] == workers * per_rank_sent
    assert samples[("gradwire_grad_bytes_uncompressed_total", labels)] == workers * STEPS * plain
    assert samples[("gradwire_train_steps_total", frozenset({"job_id": done["id"]}.items()))] == STEPS
