"""Bounds on what a job may ask for (gradwire/policy.py Limits, from the settings), the queued-job
caps (429 with Retry-After), control characters in names, and request-metric labels that an
invented HTTP method cannot grow. The real app on a real SQLite store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gradwire.server.app import create_app
from gradwire.server.control import NullControl
from gradwire.server.settings import Settings
from gradwire.server.store import JobStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"


pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


@pytest.fixture
def spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    stores: list[JobStore] = []

    def make(**settings: Any) -> TestClient:
        store = JobStore(f"sqlite:///{tmp_path / f'jobs{len(stores)}.db'}")
        stores.append(store)
        app = create_app(Settings(**settings), store=store, control=NullControl(store))
        return TestClient(app, raise_server_exceptions=False)

    yield make
    for store in stores:
        store.close()


def set_path(spec: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


# (field as the 422 names it, where to put the value, value); every bound of Limits, at its default
OVER_DEFAULTS = [
    ("model.params.hidden", "model.params.hidden", 10**8),
    ("model.params.hidden[1]", "model.params.hidden", [64, 10**8]),
    ("model.params.hidden", "model.params.hidden", [8] * 1025),  # a list of widths is a depth
    ("model.params.layers", "model.params.layers", 10**5),
    ("data.params.samples", "data.params.samples", 10**12),
    ("data.params.separation", "data.params.separation", 1e300),  # any other number
    ("data.params.note", "data.params.note", "x" * 5000),  # any string
    ("data.batch_size", "data.batch_size", 10**12),
    ("steps", "steps", 10**7),
    ("workers.count", "workers.count", 65),
    ("workers.cpus_per_worker", "workers.cpus_per_worker", 1e-6),
    ("workers.cpus_per_worker", "workers.cpus_per_worker", 1e6),
    ("workers.gpus_per_worker", "workers.gpus_per_worker", 1e300),
    ("checkpoint.keep", "checkpoint.keep", 10**6),
    ("model.name", "model.name", "m" * 300),
    ("checkpoint.storage", "checkpoint.storage", "c" * 5000),
]


@pytest.mark.parametrize(
    ("field", "where", "value"), OVER_DEFAULTS, ids=[f"{w}={str(v)[:12]}" for _, w, v in OVER_DEFAULTS]
)
def test_each_default_bound_is_a_422_naming_the_field(
    make_client: Any, spec: dict, field: str, where: str, value: Any
) -> None:
    set_path(spec, where, value)
    response = make_client(allow_import_paths=True).post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"] == "urn:gradwire:problem:limit-exceeded"
    assert field in {e["field"] for e in body["errors"]}


def test_epochs_are_bounded(make_client: Any, spec: dict) -> None:
    spec.pop("steps")
    spec["epochs"] = 10_001
    spec["optimizer"].pop("warmup_steps", None)
    response = make_client().post("/v1/jobs", json=spec)
    assert response.status_code == 422 and {e["field"] for e in response.json()["errors"]} == {"epochs"}


def test_900_kb_of_params_is_refused(make_client: Any, spec: dict) -> None:
    spec["model"]["params"]["blob"] = ["abcdefgh"] * 90_000  # ~990 KB as JSON, under the body limit
    response = make_client(max_body_bytes=2 << 20).post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == ["model.params"]
    assert "bytes as JSON" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize(
    ("setting", "where", "ok", "over"),
    [
        ("max_batch_size", "data.batch_size", 32, 33),
        ("min_cpus_per_worker", "workers.cpus_per_worker", 0.5, 0.25),
        ("max_cpus_per_worker", "workers.cpus_per_worker", 2.0, 3.0),
        ("max_gpus_per_worker", "workers.gpus_per_worker", 1.0, 2.0),
        ("max_param_width", "model.params.hidden", 64, 65),
        ("max_param_depth", "model.params.layers", 3, 4),
        ("max_param_count", "data.params.samples", 100, 101),
        ("max_param_number", "data.params.separation", 5.0, 5.5),
        ("max_string_length", "data.params.note", "x" * 30, "x" * 31),
        ("max_name_length", "model.name", "mlp", "mlp-three"),
        ("max_checkpoints_kept", "checkpoint.keep", 2, 3),
    ],
)
def test_each_bound_is_a_setting(
    make_client: Any, spec: dict, setting: str, where: str, ok: Any, over: Any
) -> None:
    limit = {"max_batch_size": 32, "min_cpus_per_worker": 0.5, "max_cpus_per_worker": 2.0,
             "max_gpus_per_worker": 1.0, "max_param_width": 64, "max_param_depth": 3,
             "max_param_count": 100, "max_param_number": 5.0, "max_string_length": 30,
             "max_name_length": 8, "max_checkpoints_kept": 2}[setting]  # fmt: skip
    client = make_client(**{setting: limit})
    set_path(spec, where, ok)
    assert client.post("/v1/jobs", json=spec).status_code == 202
    set_path(spec, where, over)
    response = client.post("/v1/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert where in {e["field"] for e in response.json()["errors"]}


def test_params_bytes_is_a_setting(make_client: Any, spec: dict) -> None:
    client = make_client(max_params_bytes=100)
    spec["model"]["params"] = {"hidden": [64] * 10}
    assert client.post("/v1/jobs", json=spec).status_code == 202
    spec["model"]["params"] = {"hidden": [64] * 40}
    assert client.post("/v1/jobs", json=spec).status_code == 422


@pytest.mark.parametrize("name", ["abc\n", "abc\r", "a\tb", "abc\x00", "\nabc"])
def test_a_name_with_control_characters_is_refused(make_client: Any, spec: dict, name: str) -> None:
    spec["name"] = name
    response = make_client().post("/v1/jobs", json=spec)
    assert response.status_code == 422
    assert {e["field"] for e in response.json()["errors"]} == {"name"}


# --- queue caps -------------------------------------------------------------------------------


def test_the_total_queue_cap_is_429_with_retry_after(make_client: Any, spec: dict) -> None:
    client = make_client(max_queued_jobs=2, queue_full_retry_after_s=7)
    assert [client.post("/v1/jobs", json=spec).status_code for _ in range(2)] == [202, 202]
    full = client.post("/v1/jobs", json=spec)
    assert full.status_code == 429 and full.headers["retry-after"] == "7"
    assert full.json()["type"] == "urn:gradwire:problem:queue-full"
    assert "GRADWIRE_MAX_QUEUED_JOBS" in full.json()["detail"]
    first = client.get("/v1/jobs").json()["items"][0]["id"]
    assert client.post(f"/v1/jobs/{first}:cancel").status_code == 200  # a place frees up
    assert client.post("/v1/jobs", json=spec).status_code == 202
    assert client.get("/v1/jobs").json()["total"] == 3


def test_the_per_token_cap_counts_each_tokens_own_queued_jobs(make_client: Any, spec: dict) -> None:
    client = make_client(tokens="alpha-token,beta-token", max_queued_jobs_per_token=2)
    alpha, beta = ({"Authorization": f"Bearer {t}"} for t in ("alpha-token", "beta-token"))
    assert [client.post("/v1/jobs", json=spec, headers=alpha).status_code for _ in range(2)] == [202, 202]
    full = client.post("/v1/jobs", json=spec, headers=alpha)
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert "GRADWIRE_MAX_QUEUED_JOBS_PER_TOKEN" in full.json()["detail"]
    assert client.post("/v1/jobs", json=spec, headers=beta).status_code == 202  # beta has its own share
    owners = {job["id"]: job for job in client.get("/v1/jobs", headers=alpha).json()["items"]}
    assert len(owners) == 2  # alpha lists its own jobs only (server/principals.py)
    store: JobStore = client.app.state.services.store
    assert store.list().total == 3  # owners are stored as token fingerprints, never the token
    assert all("alpha-token" not in (job.owner or "") for job in store.list().items)


def test_an_idempotent_replay_is_answered_when_the_queue_is_full(make_client: Any, spec: dict) -> None:
    client = make_client(max_queued_jobs=1)
    first = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202
    again = client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert client.post("/v1/jobs", json=spec, headers={"Idempotency-Key": "k2"}).status_code == 429


# --- request metric labels --------------------------------------------------------------------


def method_labels(client: TestClient) -> set[str]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {
        s.labels["method"]
        for family in families
        if family.name == "gradwire_http_requests"
        for s in family.samples
        if "method" in s.labels
    }


def test_invented_http_methods_add_no_label_values(make_client: Any) -> None:
    client = make_client()
    client.get("/v1/jobs")
    before = method_labels(client)
    for i in range(30):
        client.request(f"INVENTED{i}", "/v1/jobs")
        client.request(f"X{i}", f"/nowhere/{i}")
    after = method_labels(client)
    assert not any(m.startswith(("INVENTED", "X")) for m in after)
    assert after - before <= {"other"} and "other" in after
    assert after <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "other"}
