"""Specs confined by policy (gradwire/policy.py): data roots, the checkpoint root, URIs, import
paths and bounds, refused with a 422 naming the field at the REST door (the real app, a real SQLite
store) and again by the worker (``gradwire train`` as the scheduler launches it, and the train
loop's data loading) when a spec reaches it around the door; no file content in any message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from gradwire.policy import ENV, JobPolicy, Limits
from gradwire.server.app import create_app
from gradwire.server.control import NullControl
from gradwire.server.ray_jobs import failure_reason
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore
from gradwire.spec import JobSpec, PolicyError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
PROBLEM = "application/problem+json"
SECRET = "api_key=sk-live-0123456789abcdef"


pytestmark = pytest.mark.usefixtures("clean_environment")  # tests/conftest.py


@pytest.fixture
def spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """A data root with a CSV inside, a secret outside, and a checkpoint root."""
    data, outside, checkpoints = tmp_path / "data", tmp_path / "outside", tmp_path / "checkpoints"
    for folder in (data, outside, checkpoints):
        folder.mkdir()
    (data / "ok.csv").write_text("a,label\n1,0\n2,1\n")
    (outside / "secret.csv").write_text(f"{SECRET}\n1\n")
    return {"data": data, "outside": outside, "checkpoints": checkpoints, "tmp": tmp_path}


@pytest.fixture
def client(tmp_path: Path, roots: dict[str, Path]) -> Iterator[Callable[..., TestClient]]:
    stores: list[JobStore] = []

    def make(**settings: Any) -> TestClient:
        settings = {
            "data_roots": (str(roots["data"]),),
            "checkpoint_root": str(roots["checkpoints"]),
            **settings,
        }
        store = JobStore(f"sqlite:///{tmp_path / f'jobs{len(stores)}.db'}")
        stores.append(store)
        app = create_app(Settings(**settings), store=store, control=NullControl(store))
        return TestClient(app, raise_server_exceptions=False)

    yield make
    for store in stores:
        store.close()


def refused(response: Any, kind: str) -> dict[str, str]:
    """The 422 problem's {field: message}."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:gradwire:problem:{kind}"
    return {e["field"]: e["message"] for e in body["errors"]}


def csv_spec(spec: dict[str, Any], path: Any) -> dict[str, Any]:
    spec["data"] = {"dataset": "csv", "params": {"path": path}, "batch_size": 8}
    return spec


# --- the REST door ----------------------------------------------------------------------------


def test_a_file_under_a_data_root_is_accepted(client: Any, spec: dict, roots: dict) -> None:
    response = client().post("/v1/jobs", json=csv_spec(spec, str(roots["data"] / "ok.csv")))
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "where",
    [
        "outside",  # another folder
        "dotdot",  # <root>/../outside/secret.csv
        "symlink",  # <root>/link.csv -> ../outside/secret.csv
        "symlinked-folder",  # <root>/sub -> ../outside
        "relative",  # data/ok.csv: relative to what?
        "uri",
        "nul",
    ],
)
def test_files_outside_the_data_roots_are_422_naming_the_field(
    client: Any, spec: dict, roots: dict, where: str
) -> None:
    data, outside = roots["data"], roots["outside"]
    (data / "link.csv").symlink_to(outside / "secret.csv")
    (data / "sub").symlink_to(outside, target_is_directory=True)
    path = {
        "outside": str(outside / "secret.csv"),
        "dotdot": f"{data}/../outside/secret.csv",
        "symlink": str(data / "link.csv"),
        "symlinked-folder": str(data / "sub" / "secret.csv"),
        "relative": "data/ok.csv",
        "uri": "file:///etc/passwd",
        "nul": f"{data}/ok.csv\x00",
    }[where]
    errors = refused(client().post("/v1/jobs", json=csv_spec(spec, path)), "path-refused")
    assert set(errors) == {"data.params.path"}
    assert SECRET not in json.dumps(errors)


def test_without_data_roots_file_datasets_are_refused_with_the_setting_named(
    client: Any, spec: dict, roots: dict
) -> None:
    body = csv_spec(spec, str(roots["data"] / "ok.csv"))
    errors = refused(client(data_roots=()).post("/v1/jobs", json=body), "path-refused")
    assert "no data roots are configured" in errors["data.params.path"]
    assert "GRADWIRE_DATA_ROOTS" in errors["data.params.path"]


def test_any_path_parameter_of_any_dataset_or_model_is_confined(client: Any, spec: dict, roots: dict) -> None:
    spec["model"]["params"]["path"] = "/etc/passwd"  # a plug-in's weights, say
    errors = refused(client(allow_import_paths=True).post("/v1/jobs", json=spec), "path-refused")
    assert set(errors) == {"model.params.path"}


def test_checkpoint_storage_defaults_to_the_root_and_stays_under_it(
    client: Any, spec: dict, roots: dict
) -> None:
    api, root = client(), roots["checkpoints"]
    spec.pop("checkpoint", None)
    job = api.post("/v1/jobs", json=spec).json()
    assert job["spec"]["checkpoint"]["storage"] == str(root.resolve())  # the job's run: <root>/<job id>
    spec["checkpoint"] = {"storage": "team-a"}  # relative: under the root
    job = api.post("/v1/jobs", json=spec).json()
    assert job["spec"]["checkpoint"]["storage"] == str(root.resolve() / "team-a")
    assert api.get(f"/v1/jobs/{job['id']}").json()["spec"]["checkpoint"]["storage"] == str(root / "team-a")


@pytest.mark.parametrize(
    "storage",
    ["{outside}", "../outside", "team/../../outside", "{root}/link", "s3://bucket/ckpt", "gs://b/x"],
)
def test_checkpoint_storage_outside_the_root_or_a_uri_is_422(
    client: Any, spec: dict, roots: dict, storage: str
) -> None:
    (roots["checkpoints"] / "link").symlink_to(roots["outside"], target_is_directory=True)
    spec["checkpoint"] = {"storage": storage.format(outside=roots["outside"], root=roots["checkpoints"])}
    errors = refused(client().post("/v1/jobs", json=spec), "path-refused")
    assert set(errors) == {"checkpoint.storage"}


def test_uris_need_an_allowed_prefix(client: Any, spec: dict) -> None:
    api = client(checkpoint_uris=("s3://team-bucket/gradwire/",))
    spec["checkpoint"] = {"storage": "s3://team-bucket/gradwire/exp1"}
    assert api.post("/v1/jobs", json=spec).status_code == 202
    for storage in ("s3://other-bucket/x", "s3://team-bucket/gradwire/../../elsewhere"):
        spec["checkpoint"] = {"storage": storage}
        assert set(refused(api.post("/v1/jobs", json=spec), "path-refused")) == {"checkpoint.storage"}


@pytest.mark.parametrize(("section", "key"), [("model", "name"), ("data", "dataset")])
def test_import_paths_are_422_unless_allowed(client: Any, spec: dict, section: str, key: str) -> None:
    spec[section][key] = "my_lab.plugins:build"
    assert set(refused(client().post("/v1/jobs", json=spec), "import-path-refused")) == {f"{section}.{key}"}


def test_data_roots_setting_is_os_pathsep_separated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADWIRE_DATA_ROOTS", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    monkeypatch.setenv("GRADWIRE_CHECKPOINT_URIS", "s3://x/, gs://y/")
    settings = Settings()
    assert settings.data_roots == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert settings.job_policy().checkpoint_uris == ("s3://x/", "gs://y/")
    monkeypatch.setenv("GRADWIRE_DATA_ROOTS", "relative/data")
    with pytest.raises(ValueError, match="not an absolute path"):
        Settings()


# --- the worker, for a spec that went around the door ------------------------------------------


def policy_env(roots: dict[str, Path], **changes: Any) -> dict[str, str]:
    policy = JobPolicy(data_roots=(str(roots["data"]),), checkpoint_root=str(roots["checkpoints"]), **changes)
    return policy.to_env()


def run_train(spec: dict[str, Any], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``gradwire train`` as the scheduler launches it (its entrypoint), with the job's environment."""
    path = cwd / "job-0123456789ab.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "gradwire.cli", "train", str(path), "--job-id", "job-0123456789ab",
               "--no-progress"]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWIRE_")}
    return subprocess.run(command, env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("what", ["data", "storage", "import"])
def test_the_driver_refuses_what_the_door_would_before_ray_starts(spec: dict, roots: dict, what: str) -> None:
    if what == "data":
        body, field = csv_spec(spec, str(roots["outside"] / "secret.csv")), "data.params.path"
    elif what == "storage":
        body, field = {**spec, "checkpoint": {"storage": str(roots["outside"])}}, "checkpoint.storage"
    else:
        body, field = {**spec, "model": {"name": "os:system"}}, "model.name"
    done = run_train(body, policy_env(roots), roots["tmp"])
    assert done.returncode == 2, done.stderr
    assert field in done.stderr and "invalid job spec" in done.stderr
    assert "Started a local Ray instance" not in done.stdout + done.stderr
    assert not (roots["outside"] / "job-0123456789ab").exists()  # no run folder written there
    assert SECRET not in done.stdout + done.stderr


def test_a_garbled_policy_is_refused_not_ignored(spec: dict, roots: dict) -> None:
    with pytest.raises(ValueError, match=ENV):
        JobPolicy.from_env({ENV: "{not json"})
    done = run_train(spec, {ENV: "[1, 2]"}, roots["tmp"])
    assert done.returncode != 0 and ENV in done.stderr


def test_the_train_loop_data_loading_refuses_around_the_door(spec: dict, roots: dict) -> None:
    from gradwire.worker.runtime import job_policy, load_data

    policy = job_policy({"policy": policy_env(roots)[ENV]})
    assert policy is not None and not policy.allow_import_paths
    outside = JobSpec.from_dict(csv_spec(spec, str(roots["outside"] / "secret.csv")))
    with pytest.raises(PolicyError) as err:
        load_data(outside, policy)
    assert [p.path for p in err.value.problems] == ["data.params.path"]
    plugin = JobSpec.from_dict(
        {**spec, "data": {"dataset": "tests.unit.test_worker_datasets:tiny", "batch_size": 4}}
    )
    with pytest.raises(PolicyError, match="import path"):
        load_data(plugin, policy)  # the worker used to allow import paths always
    inside = JobSpec.from_dict(csv_spec(spec, str(roots["data"] / "ok.csv")))
    assert load_data(inside, policy).num_features == 1


def test_the_environment_carries_the_policy_unchanged(roots: dict) -> None:
    policy = JobPolicy(
        data_roots=(str(roots["data"]),), checkpoint_root=str(roots["checkpoints"]),
        checkpoint_uris=("s3://b/",), allow_import_paths=True, limits=Limits(max_width=7),
    )  # fmt: skip
    assert JobPolicy.from_env(policy.to_env()) == policy
    assert JobPolicy.from_env({}) is None  # gradwire train on one's own machine: no policy


# --- no file content in any response or log line ----------------------------------------------


def test_file_contents_never_reach_a_reason_a_response_or_a_log(
    client: Any, spec: dict, roots: dict, tmp_path: Path
) -> None:
    """A CSV inside the root whose first line is a secret: the worker's error (a real traceback
    from the train loop's data loading, run with the job's environment) is what the job's log
    holds; the scheduler's failure_reason makes the stored reason from it; GET shows the job."""
    planted = roots["data"] / "planted.csv"
    planted.write_text(f"{SECRET}\n{SECRET},1\n")
    badvalue = roots["data"] / "badvalue.csv"
    badvalue.write_text(f"x,label\n{SECRET},1\n")
    api = client()
    store: JobStore = api.app.state.services.store
    for path in (planted, badvalue):
        response = api.post("/v1/jobs", json=csv_spec(dict(spec), str(path)))
        assert response.status_code == 202, response.text
        job = response.json()
        script = (
            "import json, sys\n"
            "from gradwire.spec import JobSpec\n"
            "from gradwire.worker.runtime import job_policy, load_data\n"
            "load_data(JobSpec.from_dict(json.loads(sys.argv[1])), job_policy())\n"
        )
        clean = {k: v for k, v in os.environ.items() if not k.startswith("GRADWIRE_")}
        done = subprocess.run(
            [sys.executable, "-c", script, json.dumps(job["spec"])], env={**clean, **policy_env(roots)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        log = done.stdout + done.stderr
        assert done.returncode == 1 and "ValueError" in log and path.name in log
        assert SECRET not in log and "sk-live" not in log
        info = type("Info", (), {"driver_exit_code": 1})()
        store.transition(job["id"], JobState.STARTING, "launched")
        store.transition(job["id"], JobState.FAILED, failure_reason(info, log))
        shown = api.get(f"/v1/jobs/{job['id']}").text + api.get(f"/v1/jobs/{job['id']}/events").text
        assert "ValueError" in shown and SECRET not in shown and "sk-live" not in shown
