"""Bearer-token auth on /v1, open probes and metrics, and the settings that guard the network."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gradwire.server.app import create_app
from gradwire.server.settings import Settings
from gradwire.server.store import JobStore

TOKENS = ("s3cret-alpha-token", "s3cret-beta-token")
SPEC = {
    "name": "auth-check",
    "model": {"name": "mlp"},
    "data": {"dataset": "digits", "batch_size": 16},
    "optimizer": {"lr": 0.1},
    "steps": 20,
}


pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(host="0.0.0.0", tokens=",".join(TOKENS), database_url=f"sqlite:///{tmp_path}/a.db")
    with JobStore(settings.database_url) as store:
        yield TestClient(create_app(settings, store=store))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_401(response: Any, error: str | None = None) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:gradwire:problem:unauthenticated"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert (f'error="{error}"' in challenge) if error else ("error=" not in challenge)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/job-000000000000"),
        ("POST", "/v1/jobs/job-000000000000:cancel"),
        ("DELETE", "/v1/jobs/job-000000000000"),
        ("GET", "/v1/jobs/job-000000000000/metrics"),
        ("GET", "/v1/jobs/job-000000000000/logs"),
        ("GET", "/v1/jobs/job-000000000000/events"),
        ("GET", "/v1/compressors"),
        ("GET", "/v1/cluster"),
    ],
)
def test_every_v1_route_needs_a_token(client: TestClient, method: str, url: str) -> None:
    assert_401(client.request(method, url))
    assert_401(client.request(method, url, headers=bearer("not-a-valid-token")), "invalid_token")
    assert_401(client.request(method, url, headers={"Authorization": f"Basic {TOKENS[0]}"}))
    assert client.request(method, url, headers=bearer(TOKENS[1])).status_code != 401


def test_the_token_check_comes_before_input_checks(client: TestClient) -> None:
    assert_401(client.get("/v1/jobs?limit=0"))
    assert_401(client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}))
    assert client.get("/v1/jobs?limit=0", headers=bearer(TOKENS[0])).status_code == 422


def test_valid_tokens_work(client: TestClient) -> None:
    """The bare-token form of GRADWIRE_TOKENS (from before principals): each token is a principal
    named by its fingerprint, and sees the jobs it submitted."""
    response = client.post("/v1/jobs", json=SPEC, headers=bearer(TOKENS[0]))
    assert response.status_code == 202
    owner = response.json()["owner"]
    assert owner.startswith("token:") and TOKENS[0] not in owner
    listed = client.get("/v1/jobs", headers=bearer(TOKENS[0])).json()
    assert [job["id"] for job in listed["items"]] == [response.json()["id"]]
    assert client.get("/v1/jobs", headers=bearer(TOKENS[1])).json()["items"] == []  # another principal


@pytest.mark.parametrize("url", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"])
def test_probes_metrics_and_docs_are_open(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code in (200, 503)  # /readyz is 503 here: no cluster is attached
    assert response.status_code != 401


def test_tokens_never_reach_bodies_or_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = client.get("/v1/jobs", headers=bearer("wrong-" + TOKENS[0]))
    right = client.post("/v1/jobs", json={**SPEC, "steps": -1}, headers=bearer(TOKENS[0]))
    assert right.status_code == 422
    for text in (wrong.text, right.text, caplog.text, str(wrong.headers), str(right.headers)):
        assert all(token not in text for token in TOKENS)


def test_auth_is_off_without_tokens_on_loopback(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/b.db")
    assert not settings.auth_enabled
    with JobStore(settings.database_url) as store:
        assert TestClient(create_app(settings, store=store)).get("/v1/jobs").status_code == 200


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [({"host": "0.0.0.0"}, "GRADWIRE_HOST"), ({"grpc_host": "10.1.2.3"}, "GRADWIRE_GRPC_HOST")],
)
def test_binding_beyond_loopback_needs_tokens(overrides: dict[str, str], variable: str) -> None:
    with pytest.raises(ValidationError, match=f"{variable}=.*GRADWIRE_TOKENS"):
        Settings(**overrides)
    assert Settings(**overrides, tokens=TOKENS[0]).auth_enabled
    for host in ("127.0.0.1", "localhost", "::1"):
        assert Settings(host=host, grpc_host=host).host == host


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWIRE_TOKENS", f" {TOKENS[0]} , {TOKENS[1]} ,")
    monkeypatch.setenv("GRADWIRE_PORT", "9001")
    monkeypatch.setenv("GRADWIRE_ALLOW_IMPORT_PATHS", "true")
    monkeypatch.setenv("GRADWIRE_MAX_WORKERS_PER_JOB", "8")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    settings = Settings()
    assert [t.get_secret_value() for t in settings.tokens] == list(TOKENS)
    assert (settings.port, settings.allow_import_paths, settings.max_workers_per_job) == (9001, True, 8)
    assert settings.ray_address == "ray://head:10001"
    assert all(token not in repr(settings) for token in TOKENS)
    monkeypatch.setenv("GRADWIRE_TOKENS", f'["{TOKENS[1]}"]')
    monkeypatch.setenv("GRADWIRE_RAY_ADDRESS", "auto")
    assert [t.get_secret_value() for t in Settings().tokens] == [TOKENS[1]]


def test_defaults_and_telemetry_address() -> None:
    settings = Settings()
    assert (settings.host, settings.port, settings.grpc_port) == ("127.0.0.1", 8000, 50051)
    assert settings.database_url == "sqlite:///.gradwire/coordinator.db"
    assert (settings.tokens, settings.allow_import_paths, settings.ray_address) == ((), False, None)
    assert settings.max_body_bytes == 1 << 20
    assert settings.telemetry_address() == "127.0.0.1:50051"
    assert Settings(grpc_port=0).telemetry_address(bound_port=41234) == "127.0.0.1:41234"
    assert Settings(telemetry_public_address="head:50051").telemetry_address(41234) == "head:50051"


def test_a_bad_token_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(tokens="has space-in-it")
    assert "has space" not in str(caught.value)
