"""Run isolation without Ray: ``resume_from`` in the spec, the spec fingerprint, the run-folder checks
of ``gradwire train`` and the coordinator's ``resume_from`` rules (real store, real app).

The end-to-end claims (a second job of the same name trains from step 1; resuming continues bit for
bit; ``gradwire train`` refuses and resumes) are in tests/e2e/test_isolation.py and test_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gradwire.server.resume import driver_spec
from gradwire.server.states import JobState
from gradwire.server.store import new_job_id
from gradwire.spec import JOB_ID, JobSpec, SpecError
from gradwire.worker import runs
from tests.unit.test_server_api import Api, fields, make_api, problem  # noqa: F401 - fixtures

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "specs" / "digits-powersgd.yaml"


def example(*overrides: str) -> JobSpec:
    return JobSpec.from_file(EXAMPLE).with_overrides(list(overrides))


# --- the spec field -----------------------------------------------------------------------------


def test_store_ids_are_what_the_spec_calls_a_job_id():
    assert all(JOB_ID.match(new_job_id()) for _ in range(20))


@pytest.mark.parametrize(
    ("value", "job", "path"),
    [
        ("job-0123456789ab", "job-0123456789ab", None),
        ("runs/digits/checkpoint_2024", None, "runs/digits/checkpoint_2024"),
        ("./job-0123456789ab", None, "./job-0123456789ab"),
        ("job-store/job-0123456789ab", None, "job-store/job-0123456789ab"),  # a storage folder named job-…
        ("s3://bucket/runs/job-0123456789ab", None, "s3://bucket/runs/job-0123456789ab"),
    ],
)
def test_resume_from_is_a_job_id_or_a_path(value: str, job: str | None, path: str | None):
    spec = example(f"resume_from={value}")
    assert (spec.resume_job(), spec.resume_path()) == (job, path)


@pytest.mark.parametrize("value", ["job-123", "job-0123456789AB", " job-0123456789ab", "a\nb", ""])
def test_bad_resume_from_is_named(value: str):
    data = example().model_dump(mode="json") | {"resume_from": value}
    with pytest.raises(SpecError) as err:
        JobSpec.from_dict(data)
    assert [p.path for p in err.value.problems] == ["resume_from"]


def test_no_resume_from_by_default():
    spec = example()
    assert spec.resume_from is None and spec.resume_job() is None and spec.resume_path() is None


# --- the fingerprint ----------------------------------------------------------------------------


def test_fingerprint_ignores_what_does_not_change_training():
    base = runs.fingerprint(example())
    for change in (
        "name=other",
        "checkpoint.every_steps=7",
        "checkpoint.storage=/elsewhere",
        "checkpoint.keep=9",
        "evaluation.every_steps=3",
        "resume_from=some/run",
        "compression.rank=4",  # the example's value, now written out
        "compression.warm_start=true",  # a compressor default, written out
    ):
        assert runs.fingerprint(example(change)) == base, change


@pytest.mark.parametrize(
    "change",
    ["optimizer.lr=0.05", "compression.rank=2", "workers.count=2", "steps=401", "seed=1",
     "workers.cpus_per_worker=1.0", "data.batch_size=16"],
)  # fmt: skip
def test_fingerprint_changes_with_training(change: str):
    assert runs.fingerprint(example(change)) != runs.fingerprint(example())


def test_differences_name_each_changed_field():
    old, new = runs.training_view(example()), runs.training_view(example("optimizer.lr=0.05", "steps=80"))
    assert runs.differences(old, new) == ["optimizer.lr: 0.1 → 0.05", "steps: 400 → 80"]
    assert runs.differences(old, old) == []


# --- the run folder (the layout Ray Train and worker/runtime.py write) ---------------------------


def fake_checkpoint(run: Path, name: str, step: int) -> Path:
    folder = run / name
    folder.mkdir(parents=True)
    (folder / "progress.json").write_text(json.dumps({"step": step}))
    return folder


def test_a_fresh_folder_trains_and_resume_without_a_run_is_refused(tmp_path: Path):
    run = tmp_path / "digits-powersgd"
    assert runs.check_run(str(run), example(), resume=False) == []
    with pytest.raises(runs.RunConflict, match="no run to resume"):
        runs.check_run(str(run), example(), resume=True)
    # a record and telemetry but no checkpoint (a run that died early): Ray Train would start over
    runs.write_record(str(run), example(), "digits-powersgd")
    (run / "telemetry-rank0.jsonl").write_text("{}\n")
    assert runs.check_run(str(run), example(), resume=False) == []


def test_an_existing_run_is_refused_naming_the_differences(tmp_path: Path):
    run = tmp_path / "digits-powersgd"
    runs.write_record(str(run), example(), "digits-powersgd")
    fake_checkpoint(run, "checkpoint_2025-01-01_00-00-00.000001", 100)
    fake_checkpoint(run, "checkpoint_2025-01-01_00-00-01.000001", 200)

    other = example("optimizer.lr=0.05", "compression.rank=2", "checkpoint.every_steps=5")
    with pytest.raises(runs.RunConflict) as err:
        runs.check_run(str(run), other, resume=False)
    message = str(err.value)
    assert "optimizer.lr: 0.1 → 0.05" in message and "compression.rank: 4 → 2" in message
    assert "checkpoint" not in message.split("of a different spec")[1].split("Ray Train")[0]
    assert "up to step 200" in message and "--resume" in message and "--set name=" in message

    with pytest.raises(runs.RunConflict, match="this same spec") as same:
        runs.check_run(str(run), example("checkpoint.every_steps=5"), resume=False)
    assert "--resume" in str(same.value)

    assert runs.check_run(str(run), other, resume=True) == [
        "compression.rank: 4 → 2",
        "optimizer.lr: 0.1 → 0.05",
    ]
    assert runs.check_run(str(run), example(), resume=True) == []


def test_a_run_without_record_is_refused_too(tmp_path: Path):
    run = tmp_path / "old"
    (run).mkdir()
    (run / runs.RAY_SNAPSHOT).write_text("{}")
    with pytest.raises(runs.RunConflict, match="not recorded"):
        runs.check_run(str(run), example(), resume=False)


def test_resolve_checkpoint_takes_the_furthest_or_the_one_given(tmp_path: Path):
    run = tmp_path / "run"
    fake_checkpoint(run, "checkpoint_2025-01-01_00-00-09.000000", 40)
    furthest = fake_checkpoint(run, "checkpoint_2025-01-01_00-00-01.000000", 60)
    (run / "checkpoint_2025-01-01_00-00-10.000000").mkdir()  # incomplete: no progress.json
    assert runs.resolve_checkpoint(str(run)) == str(furthest)
    one = run / "checkpoint_2025-01-01_00-00-09.000000"
    assert runs.resolve_checkpoint(str(one)) == str(one)
    for missing, words in (
        (tmp_path / "nothing", "does not exist"),
        (tmp_path, "holds no gradwire checkpoint"),
    ):
        with pytest.raises(SpecError) as err:
            runs.resolve_checkpoint(str(missing))
        assert err.value.problems[0].path == "resume_from" and words in err.value.problems[0].message


# --- the coordinator: job ids only, known and finished; the driver gets the run folder -----------


def test_rest_resume_from_rules(make_api):  # noqa: F811 - the fixture
    api: Api = make_api()
    body = yaml.safe_load(EXAMPLE.read_text())
    first = api.submit(body)

    unknown = problem(api.client.post("/v1/jobs", json=body | {"resume_from": "job-000000000000"}), 422)
    assert fields(unknown) == {"resume_from"} and "no job job-000000000000" in unknown["errors"][0]["message"]
    outside = problem(api.client.post("/v1/jobs", json=body | {"resume_from": "/etc"}), 422, "path-refused")
    assert fields(outside) == {"resume_from"}  # the policy: not under the checkpoint root
    inside = str(Path(first["spec"]["checkpoint"]["storage"]) / first["id"])
    path = problem(api.client.post("/v1/jobs", json=body | {"resume_from": inside}), 422, "invalid-spec")
    assert fields(path) == {"resume_from"} and "is a path" in path["errors"][0]["message"]
    running = problem(api.client.post("/v1/jobs", json=body | {"resume_from": first["id"]}), 409)
    assert fields(running) == {"resume_from"} and "QUEUED" in running["detail"]
    assert api.store.list().total == 1, "a refused job was stored"

    api.client.post(f"/v1/jobs/{first['id']}:cancel")  # queued: CANCELLED at once
    second = api.submit(body | {"resume_from": first["id"]})
    assert second["spec"]["resume_from"] == first["id"]

    # the driver's copy names the first job's run folder: its storage and its id
    driver = driver_spec(api.store.get(second["id"]).spec, api.store)
    assert driver["resume_from"] == inside  # <storage, absolute under the checkpoint root>/<job id>
    assert JobSpec.from_dict(driver).resume_path() == driver["resume_from"]
    assert driver_spec(api.store.get(first["id"]).spec, api.store) == api.store.get(first["id"]).spec
    assert api.store.get(first["id"]).state is JobState.CANCELLED
