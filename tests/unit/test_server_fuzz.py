"""Property-based run of the coordinator's REST API against its own served OpenAPI (schemathesis).

The app is the real one (``create_app``) on a SQLite file with :class:`NullControl` and bearer
auth on; requests go through schemathesis' in-process ASGI transport, never a socket. Every
operation the served ``/openapi.json`` lists is exercised:

* positive cases (data the schema allows) with the token;
* negative cases (data the schema forbids) with the token, for operations that take input;
* a few cases without the token: every ``/v1`` route must answer 401, the open routes as usual.

Generated job ids almost never name a job, so half of the path parameters are drawn from jobs that
exist (queued, running, cancelled, with and without telemetry), and half of the submissions carry
a real, valid spec (with idempotency keys from a small pool, so replays and key conflicts happen).

Each response must be:

* no 5xx, except a 503 the operation documents whose problem says the cluster is unavailable (a
  ``NullControl`` has no cluster: ``/v1/cluster`` and ``/readyz`` answer 503 by design);
* conform to the operation's documented responses: status code, content type, headers, body
  schema (schemathesis' conformance checks).

Runs are derandomized (the same cases on every run) with a fixed number of examples per operation;
about 400 requests in all.

Defects the run turned up are kept below as regression tests: a non-finite loss in a telemetry
point (a straggler rank reports NaN; a diverged run inf) is stored and served as null, and
``create_app``'s lifespan can run twice on one app.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis  # the dev extra's pin; a missing install must fail, not skip, the acceptance test
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gradwire.server.app import create_app
from gradwire.server.control import NullControl
from gradwire.server.principals import derived_name
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore

TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: 503 problems that only say "no cluster here": what a NullControl coordinator answers by design.
NO_CLUSTER_PROBLEMS = frozenset(
    {"urn:gradwire:problem:cluster-unavailable", "urn:gradwire:problem:not-ready"}
)
#: Examples per operation and mode; operations without input have one distinct request.
POSITIVE_EXAMPLES = {"POST /v1/jobs": 60, "GET /v1/jobs": 40}
POSITIVE_DEFAULT = 25
NEGATIVE_EXAMPLES = 12
UNAUTHENTICATED_EXAMPLES = 3
#: Failures are reported, not shrunk for minutes: the first failing example is precise enough.
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Target:
    """The app under test, its schema, and the jobs that exist in its store."""

    schema: Any
    store: JobStore
    seeded: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)  # the seeded ones and those the run submitted
    statuses: dict[str, set[int]] = field(default_factory=dict)
    requests: int = 0


def _valid_spec(name: str) -> dict[str, Any]:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["name"] = name
    return spec


def _seed(store: JobStore) -> list[str]:
    """Jobs in every kind of state (finished ones to delete), one with telemetry from two ranks."""
    owner = derived_name(TOKEN)  # the bare token's principal, who sees them (server/principals.py)
    ids = [store.create(_valid_spec(f"seed-{i}"), owner=owner)[0].id for i in range(8)]
    _queued, running, succeeded, cancelled, failed, cancelled_2, failed_2, with_points = ids
    for job in (running, succeeded):
        store.transition(job, JobState.STARTING, "fuzz seed")
        store.transition(job, JobState.RUNNING, "fuzz seed", ray_job_id=f"raysubmit_{job}")
    store.transition(succeeded, JobState.SUCCEEDED, "fuzz seed")
    for job in (cancelled, cancelled_2):
        store.transition(job, JobState.CANCELLED, "fuzz seed")
    for job in (failed, failed_2):
        store.transition(job, JobState.FAILED, "fuzz seed")
    points = [
        {"rank": rank, "step": step, "wall_time": 1.7e9 + step, "loss": 2.0 / (step + 1),
         "accuracy": None if step % 10 else 0.5, "compute_s": 0.01, "bytes_sent": 100 * step,
         "bytes_uncompressed": 1000 * step, "stragglers": [1] if step % 7 == 0 else []}
        for rank in (0, 1)
        for step in range(50)
    ]  # fmt: skip
    store.add_points(with_points, points)
    return ids


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    """A fresh app and store per test: schemathesis ends an app's lifespan after each test, and
    ``create_app`` cannot run its lifespan twice (see ``test_app_lifespan_runs_twice``)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):  # an operator's GRADWIRE_* settings must not change the app
            if name.upper().startswith("GRADWIRE_") or name.upper() == "RAY_ADDRESS":
                patch.delenv(name)
        store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
        settings_ = Settings(tokens=(TOKEN,), database_url=f"sqlite:///{tmp_path / 'unused.db'}")
        app = create_app(settings_, store=store, control=NullControl(store))
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        seeded = _seed(store)
        made = Target(schema=schema, store=store, seeded=seeded, job_ids=list(seeded))
        yield made
        store.close()


def _operations(target: Target) -> list[Any]:
    operations = [result.ok() for result in target.schema.get_all_operations()]
    served = {(method.upper(), path) for path, item in target.schema.raw_schema["paths"].items()
              for method in item}  # fmt: skip
    assert {(op.method.upper(), op.path) for op in operations} == served
    return operations


def _takes_input(operation: Any) -> bool:
    raw = operation.definition.raw
    return bool(raw.get("parameters")) or "requestBody" in raw


def _allowed_5xx(operation: Any, response: Any) -> bool:
    if response.status_code != 503 or "503" not in operation.definition.raw.get("responses", {}):
        return False
    try:
        kind = json.loads(response.content).get("type")
    except ValueError:
        return False
    return kind in NO_CLUSTER_PROBLEMS


def _shown(headers: Any) -> dict[str, str]:
    return {k: "Bearer <token>" if k.lower() == "authorization" else v for k, v in headers.items()}


def _describe(case: Any, response: Any) -> str:
    body = response.content[:600].decode("utf-8", "replace")
    return (
        f"{case.operation.label}: {case.method} {response.request.url}\n"
        f"  request headers: {_shown(response.request.headers)}\n"
        f"  request body: {str(case.body)[:400] if case.body is not None else None}\n"
        f"  -> {response.status_code} {response.headers.get('content-type')}: {body}"
    )


def _exercise(target: Target, case: Any, headers: dict[str, str]) -> Any:
    response = case.call(headers=headers)
    target.requests += 1
    target.statuses.setdefault(case.operation.label, set()).add(response.status_code)
    if response.status_code >= 500 and not _allowed_5xx(case.operation, response):
        raise AssertionError("server error\n" + _describe(case, response))
    case.validate_response(response, checks=CHECKS)
    if response.status_code == 202 and case.operation.label == "POST /v1/jobs":
        target.job_ids.append(json.loads(response.content)["id"])
    return response


def _steer(target: Target, data: st.DataObject, case: Any) -> None:
    """Point half the cases at real jobs, and give half the submissions a valid spec."""
    if "job_id" in (case.path_parameters or {}) and data.draw(st.booleans(), label="known job"):
        known = st.sampled_from(target.seeded) | st.sampled_from(target.job_ids)
        case.path_parameters["job_id"] = data.draw(known, label="job_id")
    if case.operation.label == "POST /v1/jobs" and data.draw(st.booleans(), label="valid spec"):
        fresh = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)
        name = data.draw(st.sampled_from(["fuzz-a", "fuzz-b"]) | fresh, label="name")
        spec = _valid_spec(name)
        spec["steps"] = data.draw(st.sampled_from([1, 400, 2_000_000]), label="steps")
        case.body = spec
        key = data.draw(st.none() | st.sampled_from(["key-a", "key-b", "key-c"]), label="key")
        if key is None:
            (case.headers or {}).pop("Idempotency-Key", None)
        else:
            case.headers = {**(case.headers or {}), "Idempotency-Key": key}


def _run(target: Target, operation: Any, mode: GenerationMode, examples: int, test: Callable) -> str | None:
    """Run ``test(case, data)`` over ``examples`` cases of ``operation``; the failure text, if any."""

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        test(case, data)

    try:
        run()
    except Exception as exc:
        return f"--- {operation.label} ({mode.value}) ---\n{exc}"
    return None


def test_positive_cases_conform(target: Target) -> None:
    def test(case: Any, data: st.DataObject) -> None:
        _steer(target, data, case)
        _exercise(target, case, AUTH)

    failures = []
    for operation in _operations(target):
        examples = POSITIVE_EXAMPLES.get(operation.label, POSITIVE_DEFAULT if _takes_input(operation) else 1)
        failures.append(_run(target, operation, GenerationMode.POSITIVE, examples, test))
    found = [f for f in failures if f]
    assert not found, "\n\n".join(found)
    assert target.requests >= 250, target.requests
    # the steering worked: the run reached the success paths, not only 404 and 422
    # (202: created; an idempotent replay's 200 is not always drawn, test_server_api.py checks it)
    assert 202 in target.statuses["POST /v1/jobs"], target.statuses
    assert 200 in target.statuses["GET /v1/jobs/{job_id}"], target.statuses
    assert 200 in target.statuses["GET /v1/jobs/{job_id}/metrics"], target.statuses
    assert 204 in target.statuses["DELETE /v1/jobs/{job_id}"], target.statuses


def test_negative_cases_conform(target: Target) -> None:
    def test(case: Any, data: st.DataObject) -> None:
        _exercise(target, case, AUTH)

    failures = [
        _run(target, operation, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, test)
        for operation in _operations(target)
        if _takes_input(operation)
    ]
    found = [f for f in failures if f]
    assert not found, "\n\n".join(found)
    assert target.requests >= 80, target.requests


def test_without_token(target: Target) -> None:
    def test(case: Any, data: st.DataObject) -> None:
        (case.headers or {}).pop("Authorization", None)
        response = _exercise(target, case, {})
        protected = case.operation.path.startswith("/v1/")
        assert (response.status_code == 401) == protected, _describe(case, response)
        if protected:
            assert response.headers["www-authenticate"][0].startswith("Bearer"), _describe(case, response)

    failures = []
    for operation in _operations(target):
        examples = UNAUTHENTICATED_EXAMPLES if _takes_input(operation) else 1
        failures.append(_run(target, operation, GenerationMode.POSITIVE, examples, test))
    found = [f for f in failures if f]
    assert not found, "\n\n".join(found)
    assert target.statuses["POST /v1/jobs"] == {401}, target.statuses


# --- regressions: defects the run found (fixed) ------------------------------------------------


def test_metrics_with_infinite_loss_conform(target: Target) -> None:
    job_id = target.job_ids[0]
    target.store.add_points(job_id, [{"rank": 0, "step": 1, "wall_time": 1.7e9, "loss": float("inf")}])
    operation = target.schema.find_operation_by_label("GET /v1/jobs/{job_id}/metrics")
    case = operation.Case(path_parameters={"job_id": job_id})
    response = case.call(headers=AUTH)
    assert response.status_code == 200
    case.validate_response(response, checks=CHECKS)


def test_point_with_nan_loss_is_stored(target: Target) -> None:
    job_id = target.job_ids[0]
    points = [
        {"rank": 1, "step": 1, "wall_time": 1.7e9, "loss": float("nan")},  # a straggler's dropped work
        {"rank": 1, "step": 2, "wall_time": 1.7e9 + 1, "loss": 0.5},
    ]
    assert target.store.add_points(job_id, points) == 2


def test_app_lifespan_runs_twice(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    app = create_app(Settings(tokens=(TOKEN,)), store=store, control=NullControl(store))
    for round_ in range(2):
        with TestClient(app, headers=AUTH) as client:
            job = client.post("/v1/jobs", json=_valid_spec(f"twice-{round_}")).json()
            assert client.post(f"/v1/jobs/{job['id']}:cancel").status_code == 200
            scrape = client.get("/metrics").text
            counted = f'gradwire_job_transitions_total{{from="QUEUED",to="CANCELLED"}} {round_ + 1}.0'
            assert counted in scrape, scrape
    store.close()
