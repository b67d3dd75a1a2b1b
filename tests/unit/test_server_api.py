"""The coordinator's REST API on a real store (a SQLite file, and a PostgreSQL server: ``store_url``
in tests/conftest.py) and real metrics: every route and error path."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gradwire.compressors import available
from gradwire.server.app import create_app
from gradwire.server.control import ClusterUnavailable, JobControl, NullControl, cancel_queued
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.records import JobRecord
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore
from gradwire.spec import JobSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
PROBLEM = "application/problem+json"


pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


class FakeScheduler:
    """A JobControl with a cluster: launched jobs are 'asked to stop' and stay as they are."""

    def __init__(self, store: JobStore) -> None:
        self.store, self.asked_to_stop, self.wakes = store, [], 0
        self.log_text: dict[str, str] = {}
        self.reachable = True

    def cancel(self, job_id: str) -> JobRecord:
        job = self.store.get(job_id)
        if job.state is JobState.QUEUED:
            return cancel_queued(self.store, job_id)
        self.asked_to_stop.append(job_id)
        return job

    def logs(self, job_id: str) -> str | None:
        return self.log_text.get(job_id)

    def cluster(self) -> dict[str, Any]:
        if not self.reachable:
            raise ClusterUnavailable("ray is down")
        return {"total": {"CPU": 8, "GPU": 1}, "available": {"CPU": 6, "GPU": 1}}

    def wake(self) -> None:
        self.wakes += 1


@dataclass
class Api:
    client: TestClient
    store: JobStore
    metrics: CoordinatorMetrics
    control: Any

    def submit(self, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        response = self.client.post("/v1/jobs", json=body, **kwargs)
        assert response.status_code == 202, response.text
        return response.json()


@pytest.fixture
def spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


@pytest.fixture
def make_api(store_url: str, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    stores: list[JobStore] = []

    def make(control: Callable[[JobStore], JobControl] = FakeScheduler, **settings: Any) -> Api:
        # SQLite: a file per app; PostgreSQL: the test's database, shared by the test's apps
        sqlite = f"sqlite:///{tmp_path / f'jobs{len(stores)}.db'}"
        store = JobStore(sqlite if store_url.startswith("sqlite") else store_url)
        stores.append(store)
        ctl = control(store)
        app = create_app(
            Settings(**settings), store=store, control=ctl
        )  # the app makes and feeds its metrics
        return Api(TestClient(app, raise_server_exceptions=False), store, app.state.services.metrics, ctl)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


def problem(response: Any, status: int, kind: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"]
    if kind is not None:
        assert body["type"] == f"urn:gradwire:problem:{kind}"
    return body


def fields(body: dict[str, Any]) -> set[str]:
    return {e["field"] for e in body["errors"]}


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


# --- submission ---------------------------------------------------------------------------------


def test_submit_returns_202_with_location_and_the_job(api: Api, spec: dict[str, Any]) -> None:
    response = api.client.post("/v1/jobs?priority=5", json=spec)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["state"] == "QUEUED" and job["name"] == "digits-powersgd" and job["priority"] == 5
    placed = JobSpec.from_dict(spec).confined(Settings().job_policy())  # storage: the checkpoint root
    assert job["spec"] == placed.model_dump(mode="json")
    assert job["spec"]["checkpoint"]["storage"] == str(Path(".gradwire/checkpoints").resolve())
    assert job["links"]["cancel"] == f"/v1/jobs/{job['id']}:cancel"
    assert api.control.wakes == 1
    assert api.client.get(response.headers["location"]).json() == job


def test_idempotency_key_returns_the_same_job(api: Api, spec: dict[str, Any]) -> None:
    key = {"Idempotency-Key": "client-42"}
    first = api.client.post("/v1/jobs", json=spec, headers=key)
    again = api.client.post("/v1/jobs", json=spec, headers=key)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert api.client.get("/v1/jobs").json()["total"] == 1 and api.control.wakes == 1
    spec["steps"] = 300
    body = problem(api.client.post("/v1/jobs", json=spec, headers=key), 422, "idempotency-conflict")
    assert first.json()["id"] in body["detail"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s.update(bogus=1), "bogus"),
        (lambda s: s["optimizer"].update(lrr=0.1), "optimizer.lrr"),
        (lambda s: s["compression"].update(name="zstd"), "compression.name"),
        (lambda s: s["compression"].update(rank=0), "compression.rank"),
        (lambda s: s.update(stragglers={"code": "fractional", "s": 2}), "stragglers.s"),
        (lambda s: s["optimizer"].update(lr=-0.1), "optimizer.lr"),
    ],
    ids=[
        "unknown-key",
        "unknown-nested-key",
        "bad-compressor",
        "bad-compressor-param",
        "impossible-code",
        "negative-lr",
    ],
)
def test_bad_spec_is_422_naming_the_field(api: Api, spec: dict[str, Any], change: Any, field: str) -> None:
    change(spec)
    body = problem(api.client.post("/v1/jobs", json=spec), 422, "invalid-spec")
    assert field in fields(body), body
    assert api.client.get("/v1/jobs").json()["total"] == 0


@pytest.mark.parametrize(
    ("content", "headers", "status", "kind"),
    [
        (b'{"name": "x",', {}, 400, "malformed-json"),
        (b'{"name": "a", "name": "b"}', {}, 400, "malformed-json"),
        (b'{"optimizer": {"lr": NaN}}', {}, 400, "malformed-json"),
        (b'{"optimizer": {"lr": 1e999}}', {}, 400, "malformed-json"),
        (b"[" * 50 + b"]" * 50, {}, 400, "malformed-json"),
        (b"name: x", {"content-type": "application/yaml"}, 415, "unsupported-media"),
        (b"[1, 2]", {}, 422, "invalid-spec"),
    ],
    ids=["truncated", "duplicate-key", "nan", "overflow", "too-deep", "yaml", "not-an-object"],
)
def test_unreadable_bodies(api: Api, content: bytes, headers: dict[str, str], status: int, kind: str) -> None:
    headers = {"content-type": "application/json", **headers}
    problem(api.client.post("/v1/jobs", content=content, headers=headers), status, kind)


@pytest.mark.parametrize(
    ("limits", "change", "field"),
    [
        ({"max_workers_per_job": 2}, None, "workers.count"),
        ({"max_steps_per_job": 100}, None, "steps"),
        ({"max_epochs_per_job": 2}, lambda s: (s.pop("steps"), s.update(epochs=3)), "epochs"),
    ],
)
def test_limits_name_the_field(
    make_api: Any, spec: dict[str, Any], limits: Any, change: Any, field: str
) -> None:
    if change:
        change(spec)
    body = problem(make_api(**limits).client.post("/v1/jobs", json=spec), 422, "limit-exceeded")
    assert fields(body) == {field}


@pytest.mark.parametrize(("section", "key"), [("model", "name"), ("data", "dataset")])
def test_import_paths_need_the_operators_consent(
    make_api: Any, spec: dict[str, Any], section: str, key: str
) -> None:
    spec[section][key] = "my_lab.plugins:build"
    body = problem(make_api().client.post("/v1/jobs", json=spec), 422, "import-path-refused")
    assert fields(body) == {f"{section}.{key}"}
    assert make_api(allow_import_paths=True).client.post("/v1/jobs", json=spec).status_code == 202


def test_body_over_the_limit_is_413(make_api: Any, spec: dict[str, Any]) -> None:
    api = make_api(max_body_bytes=200)
    problem(api.client.post("/v1/jobs", json=spec), 413, "body-too-large")
    chunks = iter([b'{"name": "' + b"x" * 150, b"y" * 150 + b'"}'])  # chunked: no Content-Length
    problem(api.client.post("/v1/jobs", content=chunks), 413, "body-too-large")
    assert api.client.get("/v1/jobs").json()["total"] == 0


def test_invalid_query_parameters_are_dotted(api: Api, spec: dict[str, Any]) -> None:
    body = problem(api.client.post("/v1/jobs?priority=9999", json=spec), 422, "invalid-request")
    assert fields(body) == {"query.priority"}
    body = problem(api.client.get("/v1/jobs?limit=0&state=DONE"), 422, "invalid-request")
    assert fields(body) == {"query.limit", "query.state.0"}


# --- listing ------------------------------------------------------------------------------------


def test_list_filters_and_pages_with_a_stable_cursor(api: Api, spec: dict[str, Any]) -> None:
    ids = [api.submit({**spec, "name": f"run-{i % 2}"})["id"] for i in range(5)]
    api.client.post(f"/v1/jobs/{ids[1]}:cancel")
    seen, url, pages = [], "/v1/jobs?limit=2&state=QUEUED&state=CANCELLED", 0
    while url:
        page = api.client.get(url).json()
        assert page["total"] == 5 + (pages > 0)  # one more job arrives after the first page
        seen += [job["id"] for job in page["items"]]
        if pages == 0:
            ids.append(api.submit(spec)["id"])
        url, pages = page["next"], pages + 1
    assert seen == ids and pages == 3
    assert page["next_cursor"] is None
    queued = api.client.get("/v1/jobs", params={"state": "QUEUED"}).json()
    assert [j["id"] for j in queued["items"]] == [i for i in ids if i != ids[1]] and queued["total"] == 5
    named = api.client.get("/v1/jobs", params={"name": "run-0", "order": "newest"}).json()
    assert [j["id"] for j in named["items"]] == [ids[4], ids[2], ids[0]]


# --- one job ------------------------------------------------------------------------------------


def test_unknown_job_and_route_and_method(api: Api) -> None:
    for method, url in [("GET", "/v1/jobs/job-000000000000"), ("GET", "/v1/jobs/nope/events"),
                        ("POST", "/v1/jobs/nope:cancel"), ("DELETE", "/v1/jobs/nope"),
                        ("GET", "/v1/jobs/nope/metrics"), ("GET", "/v1/jobs/nope/logs")]:  # fmt: skip
        problem(api.client.request(method, url), 404, "job-not-found")
    assert problem(api.client.get("/v2/nothing"), 404)["type"] == "about:blank"
    body = problem(api.client.put("/v1/jobs"), 405)
    assert body["instance"] == "/v1/jobs" and api.client.put("/v1/jobs").headers["allow"] == "POST"


def test_cancel_a_queued_job(api: Api, spec: dict[str, Any]) -> None:
    job = api.submit(spec)
    response = api.client.post(f"/v1/jobs/{job['id']}:cancel")
    assert response.status_code == 200 and response.json()["state"] == "CANCELLED"
    events = api.client.get(f"/v1/jobs/{job['id']}/events").json()["events"]
    assert [(e["from_state"], e["to_state"]) for e in events] == [(None, "QUEUED"), ("QUEUED", "CANCELLED")]
    assert events[-1]["reason"] == "cancelled by request"
    body = problem(api.client.post(f"/v1/jobs/{job['id']}:cancel"), 409, "state-conflict")
    assert "CANCELLED" in body["detail"]


def test_cancel_a_running_job_asks_the_scheduler(make_api: Any, spec: dict[str, Any]) -> None:
    api = make_api()
    job = api.submit(spec)
    api.store.transition(job["id"], JobState.STARTING, "admitted")
    api.store.transition(job["id"], JobState.RUNNING, "workers up")
    response = api.client.post(f"/v1/jobs/{job['id']}:cancel")
    assert response.status_code == 202 and response.json()["state"] == "RUNNING"
    assert api.control.asked_to_stop == [job["id"]]
    bare = make_api(control=NullControl)  # no scheduler: nobody could stop it
    other = bare.submit(spec)
    bare.store.transition(other["id"], JobState.STARTING, "admitted")
    problem(bare.client.post(f"/v1/jobs/{other['id']}:cancel"), 503, "cluster-unavailable")


def test_delete_only_finished_jobs(api: Api, spec: dict[str, Any]) -> None:
    job = api.submit(spec)
    problem(api.client.delete(f"/v1/jobs/{job['id']}"), 409, "job-not-terminal")
    api.client.post(f"/v1/jobs/{job['id']}:cancel")
    response = api.client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 204 and response.content == b""
    problem(api.client.get(f"/v1/jobs/{job['id']}"), 404, "job-not-found")


def test_a_job_shows_its_placement_attempt_and_compressor(api: Api, spec: dict[str, Any]) -> None:
    job = api.submit(spec)
    assert job["placement"] == [] and job["attempt"] == 0 and job["compressor"] is None
    api.store.set_placement(job["id"], [(0, 0, "10.0.0.1", 1), (1, 0, "10.0.0.2", 1)])
    api.store.set_placement(job["id"], [(1, 1, "10.0.0.7", 21)])  # rank 1 restored on another node
    api.store.set_fields(job["id"], compressor="powersgd")
    got = api.client.get(f"/v1/jobs/{job['id']}").json()
    assert [(p["rank"], p["node_address"], p["attempt"], p["since_step"]) for p in got["placement"]] == [
        (0, "10.0.0.1", 0, 1), (1, "10.0.0.7", 1, 21),
    ]  # fmt: skip
    assert got["compressor"] == "powersgd"
    listed = api.client.get("/v1/jobs").json()["items"]
    assert [j["placement"] for j in listed] == [None]  # lists leave placement out


def test_metrics_time_series(api: Api, spec: dict[str, Any]) -> None:
    job_id = api.submit(spec)["id"]
    points = [
        {"rank": r, "step": s, "wall_time": 1e9 + s, "loss": 1 / (s + 1), "bytes_sent": 10 * s,
         "bytes_uncompressed": 100 * s, "stragglers": [3] if s == 4 else []}
        for s in range(10) for r in (0, 1)
    ]  # fmt: skip
    api.store.add_points(job_id, points)
    body = api.client.get(f"/v1/jobs/{job_id}/metrics").json()
    assert (
        body["job"] == job_id and body["rank"] == 0 and [p["step"] for p in body["points"]] == list(range(10))
    )
    assert body["points"][4]["stragglers"] == 1 and body["points"][9]["bytes_sent"] == 90
    assert {p["rank"] for p in api.client.get(f"/v1/jobs/{job_id}/metrics?rank=1").json()["points"]} == {1}
    assert len(api.client.get(f"/v1/jobs/{job_id}/metrics?all_ranks=true").json()["points"]) == 20
    thin = api.client.get(f"/v1/jobs/{job_id}/metrics?max_points=3").json()["points"]
    assert [p["step"] for p in thin] == [0, 5, 9]  # evenly spaced, first and last kept
    assert fields(problem(api.client.get(f"/v1/jobs/{job_id}/metrics?max_points=1"), 422)) == {
        "query.max_points"
    }


def test_logs_come_from_the_scheduler(api: Api, spec: dict[str, Any]) -> None:
    job_id = api.submit(spec)["id"]
    problem(api.client.get(f"/v1/jobs/{job_id}/logs"), 404, "no-logs")
    api.control.log_text[job_id] = "step 1 loss 2.3\n"
    response = api.client.get(f"/v1/jobs/{job_id}/logs")
    assert response.status_code == 200 and response.text == "step 1 loss 2.3\n"
    assert response.headers["content-type"].startswith("text/plain")


def test_unexpected_errors_leak_nothing(api: Api, spec: dict[str, Any], caplog: Any) -> None:
    def broken(job_id: str) -> str:
        raise RuntimeError("postgresql://admin:hunter2@db/jobs refused")

    api.control.logs = broken
    body = problem(api.client.get(f"/v1/jobs/{api.submit(spec)['id']}/logs"), 500)
    assert "hunter2" not in str(body) and "Traceback" not in str(body) and body["incident"] in body["detail"]
    assert body["incident"] in caplog.text  # the operator can find it


# --- compressors, cluster, probes, metrics, docs ------------------------------------------------


def test_compressors_list_their_schemas(api: Api) -> None:
    schemas = api.client.get("/v1/compressors").json()["compressors"]
    assert sorted(schemas) == available()
    assert "rank" in schemas["powersgd"]["properties"] and "ratio" in schemas["topk"]["properties"]


def test_serving_compressors_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom fastapi.testclient import TestClient\n"
        "from gradwire.server.app import create_app\nfrom gradwire.server.settings import Settings\n"
        f"client = TestClient(create_app(Settings(database_url='sqlite:///{tmp_path}/t.db')))\n"
        "assert client.get('/v1/compressors').status_code == 200\n"
        "print(sorted(m for m in ('torch', 'ray', 'gradwire.worker') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_cluster_and_readiness(make_api: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api = make_api()
    cluster = api.client.get("/v1/cluster").json()
    assert cluster["used"] == {"CPU": 2.0, "GPU": 0.0} and cluster["total"]["CPU"] == 8
    assert api.client.get("/healthz").json() == {"status": "ok"}
    assert api.client.get("/readyz").json() == {
        "status": "ready",
        "checks": {"database": "ok", "cluster": "ok"},
    }
    api.control.reachable = False
    problem(api.client.get("/v1/cluster"), 503, "cluster-unavailable")
    body = problem(api.client.get("/readyz"), 503, "not-ready")
    assert body["checks"] == {"database": "ok", "cluster": "unavailable: ray is down"}
    from sqlalchemy import create_engine

    monkeypatch.setattr(api.store, "_engine", create_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))
    assert problem(api.client.get("/readyz"), 503)["checks"]["database"] == "unreachable"
    assert api.client.get("/healthz").status_code == 200
    problem(make_api(control=NullControl).client.get("/v1/cluster"), 503, "cluster-unavailable")


def test_prometheus_metrics_count_jobs_and_transitions(api: Api, spec: dict[str, Any]) -> None:
    ids = [api.submit(spec)["id"] for _ in range(3)]
    api.client.post(f"/v1/jobs/{ids[0]}:cancel")
    response = api.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = scrape(api.client)
    assert samples[("gradwire_jobs", (("state", "QUEUED"),))] == 2
    assert samples[("gradwire_jobs", (("state", "CANCELLED"),))] == 1
    assert samples[("gradwire_job_transitions_total", (("from", "QUEUED"), ("to", "CANCELLED")))] == 1


def test_docs_work_offline(api: Api) -> None:
    for page in ("/docs", "/redoc"):
        html = api.client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        assert not re.findall(r"https?://", html.text), (
            "the docs page must not load anything from the internet"
        )
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert any(a.endswith(".js") for a in assets)
        for asset in assets:
            assert asset.startswith("/") and api.client.get(asset).status_code == 200, asset


def test_openapi_declares_bodies_and_problems(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components and {"JobSpec", "Problem", "JobResource"} <= set(
        components
    )
    submit = schema["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobSpec")
    assert {"200", "202", "400", "401", "413", "415", "422"} <= set(submit["responses"])
    assert "/v1/jobs/{job_id}:cancel" in schema["paths"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', str(schema).replace("'", '"')))
    assert refs <= set(components), refs - set(components)


def test_metrics_passed_in_are_left_to_their_owner(tmp_path: Path, spec: dict[str, Any]) -> None:
    with JobStore(f"sqlite:///{tmp_path}/own.db") as store:
        metrics = CoordinatorMetrics()
        store.add_listener(lambda job, src, dst, reason: metrics.observe_transition(src, dst))  # the owner's
        client = TestClient(create_app(Settings(), store=store, metrics=metrics))
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        client.post(f"/v1/jobs/{job_id}:cancel")
        key = ("gradwire_job_transitions_total", (("from", "QUEUED"), ("to", "CANCELLED")))
        assert scrape(client)[key] == 1  # counted once, by the owner's listener
