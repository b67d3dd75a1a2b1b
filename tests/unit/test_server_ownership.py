"""Ownership (issue 17): each token is a principal, a principal sees and acts on its own jobs only,
an admin on all; idempotency keys and resume_from are per principal; /metrics can require a token;
no token ever appears in a response, a log line or an error. The real app over FastAPI's TestClient
and a real SQLite job store."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gradwire.server.app import create_app
from gradwire.server.principals import derived_name
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore

ALICE, BOB, ROOT, SCRAPE = "alice-T0k3n-aaaa", "bob-T0k3n-bbbb", "root-T0k3n-cccc", "prom-T0k3n-dddd"
LEGACY = "legacy-T0k3n-eeee"  # a bare token, as GRADWIRE_TOKENS held before principals
SECRETS = (ALICE, BOB, ROOT, SCRAPE, LEGACY)
TOKENS = f"alice:{ALICE},bob:{BOB},root:{ROOT},{LEGACY}"
SPEC = {
    "name": "owned",
    "model": {"name": "mlp"},
    "data": {"dataset": "digits", "batch_size": 16},
    "optimizer": {"lr": 0.1},
    "steps": 20,
}


pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


class Seen:
    """Every response the tests received, to check afterwards that no token is in any of them."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def record(self, response: Any) -> Any:
        self.texts += [response.text, str(dict(response.headers))]
        return response


@pytest.fixture
def seen(caplog: pytest.LogCaptureFixture) -> Iterator[Seen]:
    caplog.set_level(logging.DEBUG)
    seen = Seen()
    yield seen
    for text in [*seen.texts, caplog.text]:
        assert all(secret not in text for secret in SECRETS)


class Api:
    def __init__(self, client: TestClient, store: JobStore, seen: Seen) -> None:
        self.client, self.store, self.seen = client, store, seen

    def call(self, token: str | None, method: str, url: str, **kwargs: Any) -> Any:
        headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        return self.seen.record(self.client.request(method, url, headers=headers, **kwargs))

    def submit(self, token: str | None, spec: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        response = self.call(token, "POST", "/v1/jobs", json=spec or SPEC, **kwargs)
        assert response.status_code in (200, 202), response.text
        return response.json()

    def ids(self, token: str | None) -> list[str]:
        response = self.call(token, "GET", "/v1/jobs")
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["items"]]


def make_api(tmp_path: Path, seen: Seen, **settings: Any) -> Iterator[Api]:
    config = Settings(database_url=f"sqlite:///{tmp_path}/jobs.db", **settings)
    with JobStore(config.database_url) as store:
        yield Api(TestClient(create_app(config, store=store)), store, seen)


@pytest.fixture
def api(tmp_path: Path, seen: Seen) -> Iterator[Api]:
    yield from make_api(tmp_path, seen, tokens=TOKENS, admins="root")


def not_found(response: Any, job_id: str) -> dict[str, Any]:
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["type"] == "urn:gradwire:problem:job-not-found"
    return {k: (v.replace(job_id, "ID") if isinstance(v, str) else v) for k, v in body.items()}


JOB_ROUTES = [
    ("GET", "/v1/jobs/{id}"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/metrics"),
    ("GET", "/v1/jobs/{id}/metrics?all_ranks=true"),
    ("GET", "/v1/jobs/{id}/logs"),
    ("POST", "/v1/jobs/{id}:cancel"),
    ("DELETE", "/v1/jobs/{id}"),
]


def test_each_principal_sees_only_its_own_jobs_and_the_admin_sees_both(api: Api) -> None:
    mine = api.submit(ALICE)
    theirs = api.submit(BOB)
    assert (mine["owner"], theirs["owner"]) == ("alice", "bob")
    assert api.ids(ALICE) == [mine["id"]]
    assert api.ids(BOB) == [theirs["id"]]
    assert api.ids(ROOT) == [mine["id"], theirs["id"]]
    listed = api.call(ALICE, "GET", "/v1/jobs?state=QUEUED&order=newest").json()
    assert listed["total"] == 1 and [j["owner"] for j in listed["items"]] == ["alice"]
    assert api.call(ALICE, "GET", f"/v1/jobs?name={SPEC['name']}").json()["total"] == 1
    assert api.call(ROOT, "GET", f"/v1/jobs/{mine['id']}").json()["owner"] == "alice"


def test_paging_counts_only_the_principals_jobs(api: Api) -> None:
    for token in (ALICE, BOB, ALICE, BOB, ALICE):
        api.submit(token)
    first = api.call(ALICE, "GET", "/v1/jobs?limit=2").json()
    second = api.call(ALICE, "GET", first["next"]).json()
    assert (first["total"], len(first["items"]), len(second["items"]), second["next"]) == (3, 2, 1, None)
    assert {j["owner"] for j in first["items"] + second["items"]} == {"alice"}


@pytest.mark.parametrize(("method", "route"), JOB_ROUTES)
def test_another_principals_job_answers_exactly_like_a_missing_one(api: Api, method: str, route: str) -> None:
    job = api.submit(ALICE)
    api.call(ALICE, "POST", f"/v1/jobs/{job['id']}:cancel")  # finished: DELETE may act on it too
    missing = "job-000000000000"
    hidden = not_found(api.call(BOB, method, route.format(id=job["id"])), job["id"])
    assert hidden == not_found(api.call(BOB, method, route.format(id=missing)), missing)
    after = api.store.get(job["id"])  # bob's cancel or delete did nothing
    assert (after.state, after.owner) == (JobState.CANCELLED, "alice")
    assert api.store.events(job["id"])[-1].reason == "cancelled by request"


def test_owner_and_admin_act_where_others_cannot(api: Api) -> None:
    mine, theirs = api.submit(ALICE), api.submit(BOB)
    api.store.add_points(mine["id"], [{"rank": 0, "step": 1, "wall_time": 1.7e9, "loss": 0.5}])
    points = api.call(ALICE, "GET", f"/v1/jobs/{mine['id']}/metrics").json()["points"]
    assert [p["step"] for p in points] == [1]
    events = api.call(ALICE, "GET", f"/v1/jobs/{mine['id']}/events").json()["events"]
    assert [e["to_state"] for e in events] == ["QUEUED"]
    logs = api.call(ALICE, "GET", f"/v1/jobs/{mine['id']}/logs")  # its own: the job is there, logs are not
    assert logs.status_code == 404 and logs.json()["type"] == "urn:gradwire:problem:no-logs"
    # bob cannot cancel alice's job; alice can; the admin can cancel bob's
    assert api.call(BOB, "POST", f"/v1/jobs/{mine['id']}:cancel").status_code == 404
    assert api.store.get(mine["id"]).state is JobState.QUEUED
    assert api.call(ALICE, "POST", f"/v1/jobs/{mine['id']}:cancel").json()["state"] == "CANCELLED"
    assert api.call(ROOT, "POST", f"/v1/jobs/{theirs['id']}:cancel").json()["state"] == "CANCELLED"
    # deleting: bob cannot delete alice's finished job; alice can; the admin can delete bob's
    assert api.call(BOB, "DELETE", f"/v1/jobs/{mine['id']}").status_code == 404
    assert api.store.get(mine["id"]).owner == "alice"
    assert api.call(ALICE, "DELETE", f"/v1/jobs/{mine['id']}").status_code == 204
    assert api.call(ROOT, "DELETE", f"/v1/jobs/{theirs['id']}").status_code == 204
    assert api.store.list().total == 0


def test_idempotency_keys_are_per_principal(api: Api) -> None:
    key = {"Idempotency-Key": "nightly-1"}
    alices = api.submit(ALICE, headers=key)
    bobs = api.submit(BOB, {**SPEC, "steps": 7}, headers=key)  # the same key, another spec: no conflict
    assert alices["id"] != bobs["id"] and (alices["owner"], bobs["owner"]) == ("alice", "bob")
    again = api.call(ALICE, "POST", "/v1/jobs", json=SPEC, headers=key)
    assert (again.status_code, again.json()["id"]) == (200, alices["id"])
    again = api.call(BOB, "POST", "/v1/jobs", json={**SPEC, "steps": 7}, headers=key)
    assert (again.status_code, again.json()["id"]) == (200, bobs["id"])
    conflict = api.call(ALICE, "POST", "/v1/jobs", json={**SPEC, "steps": 7}, headers=key)
    assert conflict.status_code == 422 and bobs["id"] not in conflict.text  # alice's own job only
    assert api.store.list().total == 2


def test_resume_from_names_only_a_job_the_principal_can_see(api: Api) -> None:
    done = api.submit(ALICE)
    api.call(ALICE, "POST", f"/v1/jobs/{done['id']}:cancel")
    resume = {**SPEC, "resume_from": done["id"]}
    refused = api.call(BOB, "POST", "/v1/jobs", json=resume)
    missing = api.call(BOB, "POST", "/v1/jobs", json={**SPEC, "resume_from": "job-000000000000"})
    assert refused.status_code == missing.status_code == 422
    assert refused.json()["errors"][0]["field"] == "resume_from"
    assert refused.json()["errors"][0]["message"].replace(done["id"], "ID") == missing.json()["errors"][0][
        "message"
    ].replace("job-000000000000", "ID")
    assert api.submit(ALICE, resume)["owner"] == "alice"
    assert api.submit(ROOT, resume)["owner"] == "root"


def test_a_bare_token_is_a_principal_named_by_its_fingerprint(api: Api) -> None:
    job = api.submit(LEGACY)
    assert job["owner"] == derived_name(LEGACY) and job["owner"].startswith("token:")
    assert api.ids(LEGACY) == [job["id"]] and api.ids(ALICE) == []
    assert job["id"] in api.ids(ROOT)


def test_a_bare_token_can_be_made_admin_by_its_derived_name(tmp_path: Path, seen: Seen) -> None:
    for api in make_api(tmp_path, seen, tokens=TOKENS, admins=derived_name(LEGACY)):
        job = api.submit(ALICE)
        assert api.ids(LEGACY) == [job["id"]]


def test_jobs_from_before_owners_are_seen_by_admins_only(api: Api) -> None:
    old, _ = api.store.create(SPEC)  # owner NULL, as rows stored before ownership
    assert api.ids(ALICE) == [] and api.ids(ROOT) == [old.id]
    assert api.call(ALICE, "GET", f"/v1/jobs/{old.id}").status_code == 404


def test_without_tokens_the_one_anonymous_principal_sees_everything(tmp_path: Path, seen: Seen) -> None:
    for api in make_api(tmp_path, seen):
        old, _ = api.store.create(SPEC)
        job = api.submit(None, headers={"Idempotency-Key": "k"})
        assert job["owner"] == "anonymous"
        assert api.submit(None, headers={"Idempotency-Key": "k"})["id"] == job["id"]
        assert api.ids(None) == [old.id, job["id"]]
        assert api.call(None, "POST", f"/v1/jobs/{old.id}:cancel").status_code == 200
        assert api.call(None, "DELETE", f"/v1/jobs/{old.id}").status_code == 204
        assert api.call(None, "GET", "/metrics").status_code == 200


def test_the_environment_names_principals_and_admins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADWIRE_TOKENS", TOKENS)
    monkeypatch.setenv("GRADWIRE_ADMINS", " root ")
    monkeypatch.setenv("GRADWIRE_METRICS_TOKEN", SCRAPE)
    settings = Settings()
    roles = {p.principal.name: p.principal.role for p in settings.principals}
    assert roles == {"alice": "user", "bob": "user", "root": "admin", derived_name(LEGACY): "user"}
    assert all(secret not in repr(settings) + str(settings.principals) for secret in SECRETS)
    monkeypatch.setenv("GRADWIRE_TOKENS", json.dumps([f"alice:{ALICE}", f"root:{ROOT}"]))
    assert [p.principal.admin for p in Settings().principals] == [False, True]


@pytest.mark.parametrize(
    ("tokens", "admins", "message"),
    [
        (f"al/ice:{ALICE}", "", "entry 1: the part before ':' is not a principal name"),
        (f"alice:{ALICE},alice:{BOB}", "", "'alice' is named more than once"),
        (f"alice:{ALICE},bob:{ALICE}", "", "share one token"),
        (f"alice:{ALICE},bob:", "", "entry 2: principal 'bob' has an empty token"),
        (f"anonymous:{ALICE}", "", "reserved"),
        (f"alice:{ALICE}", "root", "GRADWIRE_ADMINS names ['root']"),
        (f"alice:replace-me-{ALICE}", "", "placeholder"),
    ],
)
def test_bad_principal_configuration_is_refused_without_echoing_a_token(
    tokens: str, admins: str, message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(tokens=tokens, admins=admins)
    assert message in str(raised.value)
    assert all(secret not in str(raised.value) for secret in SECRETS)


@pytest.fixture
def guarded(tmp_path: Path, seen: Seen) -> Iterator[Api]:
    yield from make_api(tmp_path, seen, tokens=TOKENS, admins="root", metrics_token=SCRAPE)


def test_metrics_requires_its_token_when_set(guarded: Api) -> None:
    job = guarded.submit(ALICE)
    for token in (None, "wrong-" + SCRAPE, ALICE, ROOT):  # principals' tokens are not the scrape token
        response = guarded.call(token, "GET", "/metrics")
        assert response.status_code == 401, token
        assert response.headers["www-authenticate"].startswith("Bearer ")
        assert job["id"] not in response.text
    scraped = guarded.call(SCRAPE, "GET", "/metrics")
    assert scraped.status_code == 200 and "gradwire_jobs" in scraped.text
    assert guarded.call(SCRAPE, "GET", "/v1/jobs").status_code == 401  # and it opens nothing else
    assert guarded.call(None, "GET", "/healthz").status_code == 200  # probes stay open


def test_metrics_stay_open_without_a_metrics_token(api: Api) -> None:
    assert api.call(None, "GET", "/metrics").status_code == 200
