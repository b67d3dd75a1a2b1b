"""End to end over HTTP: jobs never share checkpoints, and resuming one is explicit and exact.

Three digits PowerSGD jobs on the session's real Ray, through a real coordinator (uvicorn on
127.0.0.1), all named ``shared`` and all checkpointing into one folder:

* ``first`` trains 20 steps;
* ``again`` — same name, other settings (40 steps), submitted after ``first`` left its step-20
  checkpoint — must train from step 1: before runs were named by job id, Ray Train handed it
  ``first``'s checkpoint and it trained steps 21..40 only;
* ``resumed`` (40 steps, ``resume_from: <first's id>``) must start at step 21 and end bit for bit
  where ``again``, the uninterrupted run, ends: model, optimizer, both ranks' compressor state and
  every loss of steps 21..40.

The schedule is constant, so 20 and 40 steps share their first 20 learning rates. ``again`` and
``resumed`` run side by side (1 CPU each); refusals (a path, an unknown id, an unfinished job) cost
no fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradwire.cli.remote import ApiError, CoordinatorClient
from gradwire.spec import JobSpec
from tests.e2e.test_runtime import assert_same_state
from tests.e2e.test_service import served  # noqa: F401 - the coordinator fixture

pytestmark = pytest.mark.slow

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
FIRST, TOTAL = 20, 40


def progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "progress.json").read_text())


def body(storage: Path, steps: int, *overrides: str) -> dict:
    spec = JobSpec.from_file(SPEC).with_overrides(
        [
            "name=shared",
            f"steps={steps}",
            "workers.count=2",
            "workers.cpus_per_worker=0.5",
            "optimizer.schedule=constant",
            "optimizer.warmup_steps=5",
            "checkpoint.every_steps=null",  # one checkpoint, at the end
            "evaluation.every_steps=null",
            f"checkpoint.storage={storage}",
            *overrides,
        ]
    )
    return spec.model_dump(mode="json")


def refused(client: CoordinatorClient, document: dict) -> ApiError:
    with pytest.raises(ApiError) as err:
        client.submit(document)
    return err.value


def points(client: CoordinatorClient, job_id: str, rank: int = 0) -> list[dict]:
    return client._call("GET", f"/v1/jobs/{job_id}/metrics", params={"rank": rank}).json()["points"]


def only_checkpoint(run: Path) -> Path:
    found = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(found) == 1, f"{run}: {found}"
    return found[0]


def succeeded(client: CoordinatorClient, job_id: str) -> dict:
    final = client.wait(job_id, poll_s=1.0, timeout=420)
    if final["state"] != "SUCCEEDED":
        events = client._call("GET", f"/v1/jobs/{job_id}/events").json()["events"]
        pytest.fail(f"{job_id} ended {final['state']}: {[e['reason'] for e in events]}")
    return final


def test_jobs_of_one_name_keep_their_checkpoints_and_resume_only_when_asked(served, tmp_path):  # noqa: F811
    client, _ = served
    storage = tmp_path / "checkpoints"
    first = client.submit(body(storage, FIRST))

    # resume_from over REST: a path, an unknown id and an unfinished job are refused at the field
    path = refused(client, body(storage, TOTAL, f"resume_from={storage / first['id']}"))
    assert path.status == 422 and [e["field"] for e in path.problem["errors"]] == ["resume_from"]
    unknown = refused(client, body(storage, TOTAL, "resume_from=job-000000000000"))
    assert unknown.status == 422 and "no job job-000000000000" in str(unknown)
    early = refused(client, body(storage, TOTAL, f"resume_from={first['id']}"))
    assert early.status == 409 and "resume_from" in str(early), str(early)

    succeeded(client, first["id"])
    first_run = storage / first["id"]
    assert progress(only_checkpoint(first_run)) == {"step": 20, "attempt": 0}

    again = client.submit(body(storage, TOTAL))  # same name and storage, 40 steps instead of 20
    resumed = client.submit(body(storage, TOTAL, f"resume_from={first['id']}"))
    assert resumed["spec"]["resume_from"] == first["id"]
    succeeded(client, again["id"])
    succeeded(client, resumed["id"])

    # each job trained in its own run folder, named by its id; none is named after the spec
    assert sorted(p.name for p in storage.iterdir()) == sorted([first["id"], again["id"], resumed["id"]])
    assert progress(only_checkpoint(first_run)) == {"step": 20, "attempt": 0}, "first was changed"

    # the job named like an earlier one trained from step 1, every rank; the resumed one from 21
    for rank in (0, 1):
        assert [p["step"] for p in points(client, again["id"], rank)] == list(range(1, TOTAL + 1)), rank
        assert [p["step"] for p in points(client, resumed["id"], rank)] == list(range(FIRST + 1, TOTAL + 1))

    # resuming continued bit for bit: the same losses from step 21 and the same end state
    uninterrupted = {p["step"]: p["loss"] for p in points(client, again["id"])}
    assert {p["step"]: p["loss"] for p in points(client, resumed["id"])} == {
        s: loss for s, loss in uninterrupted.items() if s > FIRST
    }
    a, b = only_checkpoint(storage / again["id"]), only_checkpoint(storage / resumed["id"])
    for name in ("model.pt", "optimizer.pt", "rank0.pt", "rank1.pt"):
        assert_same_state(torch.load(a / name), torch.load(b / name), name)
    # resume_from starts a new job's run, not a Ray Train restore of it: its group is attempt 0
    assert progress(b) == {"step": 40, "attempt": 0}
