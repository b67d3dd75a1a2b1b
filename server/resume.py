"""``resume_from`` on a coordinator: a job resumes another job by id, never by path.

Every job trains in its own Ray Train run, named by its job id (``gradwire train --job-id``), so
jobs never share checkpoints, whatever their names. A job continues another only when its spec
says ``resume_from: <job id>``:

* at submission, :func:`check_resume` refuses a path (422: paths would let a client read any
  folder the cluster can reach), an id the store does not know or the submitter may not see
  (422, the same answer for both: another principal's job is not there for it), and a job that
  has not finished (409: its newest checkpoint is still changing);
* at launch, :func:`driver_spec` replaces the id with that job's run folder,
  ``<its checkpoint.storage>/<its id>``; the driver (``gradwire train``) takes that folder's
  furthest checkpoint (``gradwire.worker.runs.resolve_checkpoint``). A relative storage resolves
  against the driver's working directory, as it did for the job being resumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradwire.server.principals import ANONYMOUS, Principal
from gradwire.server.store import JobNotFound, JobStore
from gradwire.spec import JOB_ID, JobSpec

__all__ = ["check_resume", "driver_spec"]

FIELD = "resume_from"


def check_resume(spec: JobSpec, store: JobStore, principal: Principal = ANONYMOUS) -> None:
    """Refuse a ``resume_from`` this coordinator will not follow for ``principal`` (a problem
    naming the field)."""
    from gradwire.server.problems import FieldError, ProblemError  # fastapi: the API's, not the scheduler's

    if spec.resume_from is None:
        return
    job_id = spec.resume_job()
    if job_id is None:
        message = (
            f"{spec.resume_from!r} is a path; a coordinator resumes only its own jobs, by job id "
            "(job-<12 hex>); paths are for gradwire train"
        )
        raise _invalid(message)
    try:
        job = store.get(job_id)
        if not principal.can_see(job.owner):
            raise JobNotFound(job_id)
    except JobNotFound:
        raise _invalid(f"no job {job_id} on this coordinator") from None
    if not job.terminal:
        raise ProblemError(
            409,
            f"resume_from: job {job_id} is {job.state.value}; a job can resume only a finished job "
            "(SUCCEEDED, FAILED or CANCELLED), whose checkpoints no longer change: wait for it or cancel it",
            kind="state-conflict",
            title="Job state conflict",
            errors=[FieldError(field=FIELD, message=f"job {job_id} has not finished ({job.state.value})")],
        )


def _invalid(message: str) -> Exception:
    from gradwire.server.problems import FieldError, ProblemError

    return ProblemError(
        422,
        "the job spec has 1 problem",
        kind="invalid-spec",
        title="Invalid job spec",
        errors=[FieldError(field=FIELD, message=message)],
    )


def driver_spec(spec: Mapping[str, Any], store: JobStore) -> dict[str, Any]:
    """The spec the Ray job's driver runs: ``resume_from: <job id>`` becomes that job's run folder.
    Raises ``JobNotFound`` when the job was deleted since."""
    resume_from = spec.get(FIELD)  # trusted, as the store keeps it: validated at the door
    if not (isinstance(resume_from, str) and JOB_ID.match(resume_from)):
        return dict(spec)
    storage = str(store.get(resume_from).spec["checkpoint"]["storage"])
    return {**spec, FIELD: f"{storage.rstrip('/')}/{resume_from}"}
