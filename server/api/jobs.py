"""``/v1/jobs``: submit, list, read, cancel and delete jobs; their events, metrics and logs.

Submission (``POST /v1/jobs``) takes a JobSpec as JSON and answers ``202 Accepted`` with the
stored job and ``Location: /v1/jobs/{id}``. With an ``Idempotency-Key`` header, repeating the
request returns the job the key first created with ``200 OK`` (and the same ``Location``),
without queueing another; the same key with a different spec is a 422 problem.

Listing is in submission order (``order=newest`` reverses it) and pages with a cursor: pass the
``next_cursor`` of one page as ``after`` to get the next (``next`` is that URL, ready to follow).
The cursor stays valid while jobs are added or deleted.

Ownership (server/principals.py): a job's ``owner`` is the principal that submitted it. A
principal lists, reads, cancels and deletes its own jobs only; another principal's job is a 404,
word for word the answer for a job that does not exist. Admins see every job. Idempotency keys
are per principal, and ``resume_from`` may name only a job the submitter can see.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from gradwire.server.admission import QueueGate
from gradwire.server.auth import PrincipalDep, get_services
from gradwire.server.control import Services
from gradwire.server.principals import Principal
from gradwire.server.problems import FieldError, ProblemError, problem_responses
from gradwire.server.records import JobEvent, JobNotFound, JobPoint, JobRecord, RankPlacement
from gradwire.server.resume import check_resume
from gradwire.server.states import JobState
from gradwire.spec import SPEC_SCHEMA_VERSION, JobSpec, PolicyError
from gradwire.spec_io import unique_json_object

__all__ = ["JobEvents", "JobLinks", "JobList", "JobMetrics", "JobResource", "router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])

ServicesDep = Annotated[Services, Depends(get_services)]
JobId = Annotated[str, Path(min_length=1, max_length=64, description="the job's id, e.g. job-0123456789ab")]
JSON_TYPES = ("application/json", "text/json")
MAX_DEPTH = 32  # a spec needs about 5; deeper documents only cost memory and recursion
QUEUE = QueueGate()  # the queue caps (server/admission.py)


class JobLinks(BaseModel):
    self_: str = Field(alias="self", serialization_alias="self")
    events: str
    metrics: str
    logs: str
    cancel: str


class JobResource(BaseModel):
    """A job: its spec and where it is in its life (QUEUED → STARTING → RUNNING → ...)."""

    id: str
    name: str
    owner: str | None = Field(description="the principal that submitted it (null: stored before owners)")
    state: JobState
    priority: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    reason: str = Field(description="why the last state change happened")
    restarts: int
    attempt: int = Field(description="the worker group's attempt: 0, then n after Ray Train's n-th restore")
    compressor: str | None = Field(description="the compressor rank 0 reported last (null before any report)")
    ray_job_id: str | None
    spec: dict[str, Any] = Field(description="the JobSpec, defaults filled in")
    placement: list[RankPlacement] | None = Field(
        None, description="where each rank reported from last (answers about one job; null in lists)"
    )
    links: JobLinks

    @classmethod
    def of(cls, job: JobRecord, placement: list[RankPlacement] | None = None) -> JobResource:
        base = f"/v1/jobs/{job.id}"
        links = JobLinks.model_validate(
            {"self": base, "events": f"{base}/events", "metrics": f"{base}/metrics",
             "logs": f"{base}/logs", "cancel": f"{base}:cancel"}
        )  # fmt: skip
        fields = job.model_dump(include=set(cls.model_fields) - {"links", "placement"})
        return cls(**fields, placement=placement, links=links)


class JobList(BaseModel):
    items: list[JobResource]
    total: int = Field(description="jobs matching the filters, over all pages")
    next: str | None = Field(description="URL of the next page; null on the last")
    next_cursor: int | None = Field(description="pass as `after` for the next page (opaque)")


class JobEvents(BaseModel):
    job: str
    events: list[JobEvent] = Field(description="state changes, oldest first; the first is the submission")


class JobMetrics(BaseModel):
    job: str
    rank: int | None = Field(description="the rank shown; null when every rank is")
    points: list[JobPoint] = Field(description="one per reported step (and rank), in step order")


# --- submission --------------------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf, which JSON cannot carry back out
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth_exceeds(document: Any, limit: int) -> bool:
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            stack.extend(
                (child, depth + 1) for child in (value.values() if isinstance(value, dict) else value)
            )
    return False


async def _spec_document(request: Request) -> Any:
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise ProblemError(
            415, f"send the job spec as application/json, not {media!r}", kind="unsupported-media"
        )
    raw = await request.body()
    try:
        document = json.loads(
            raw, object_pairs_hook=unique_json_object, parse_float=_finite, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ProblemError(400, f"the body is not valid JSON: {err}", kind="malformed-json") from None
    if _depth_exceeds(document, MAX_DEPTH):
        raise ProblemError(400, f"the body nests deeper than {MAX_DEPTH} levels", kind="malformed-json")
    return document


def _confined(spec: JobSpec, services: Services) -> JobSpec:
    """The spec as this coordinator's policy places it (gradwire/policy.py: limits, import paths,
    data roots, checkpoint root); a 422 naming each refused field otherwise."""
    try:
        return spec.confined(services.policy)
    except PolicyError as err:
        titles = {"limit-exceeded": "Job exceeds limits", "import-path-refused": "Import paths refused",
                  "path-refused": "Path refused"}  # fmt: skip
        details = {"limit-exceeded": "the job asks for more than this coordinator allows",
                   "import-path-refused": "import-path plugins are disabled",
                   "path-refused": "the job names files or folders not allowed here"}  # fmt: skip
        errors = [FieldError(field=v.path, message=v.message) for v in err.violations]
        kind = err.kind
        raise ProblemError(422, details[kind], kind=kind, title=titles[kind], errors=errors) from None


@router.post(
    "",
    status_code=202,
    response_model=JobResource,
    summary="Submit a job",
    responses={
        200: {"model": JobResource, "description": "an Idempotency-Key seen before: the job it created"},
        **problem_responses(400, 413, 415, 429),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
        }
    },
)
async def submit_job(
    request: Request,
    response: Response,
    services: ServicesDep,
    principal: PrincipalDep,
    priority: Annotated[int, Query(ge=-1000, le=1000, description="higher runs first")] = 0,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=256)
    ] = None,
) -> JobResource:
    document = await _spec_document(request)  # only the body is read on the event loop
    job, created = await run_in_threadpool(
        _queue_job, services, document, priority, idempotency_key, principal
    )
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobResource.of(job, placement=services.store.placement(job.id))


def _queue_job(
    services: Services, document: Any, priority: int, key: str | None, principal: Principal
) -> tuple[JobRecord, bool]:
    spec = JobSpec.from_dict(document)  # SpecError: 422 naming each field
    spec = _confined(spec, services)
    check_resume(spec, services.store, principal)  # a job id it can see, finished; never a path
    owner = principal.name
    with QUEUE.lock:  # the caps are checked and the job inserted together
        QUEUE.check(services.store, services.settings, owner, key)  # 429 with Retry-After
        job, created = services.store.create(
            spec, priority=priority, idempotency_key=key, owner=owner, spec_version=SPEC_SCHEMA_VERSION
        )
    if created:
        services.control.wake()
    return job, created


# --- reading -----------------------------------------------------------------------------------


@router.get("", response_model=JobList, summary="List jobs")
def list_jobs(
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    state: Annotated[
        list[JobState] | None, Query(description="keep jobs in these states (repeatable)")
    ] = None,
    name: Annotated[str | None, Query(min_length=1, max_length=128, description="exact job name")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    after: Annotated[
        int | None, Query(ge=0, le=2**63 - 1, description="cursor from a previous page's next_cursor")
    ] = None,
    order: Annotated[Literal["oldest", "newest"], Query(description="submission order")] = "oldest",
) -> JobList:
    page = services.store.list(
        state=state, name=name, owner=principal.owner_filter, limit=limit, after=after,
        newest_first=order == "newest",
    )  # fmt: skip
    next_url = None
    if page.next_after is not None:
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "after"]
        next_url = f"{request.url.path}?{urlencode([*query, ('after', str(page.next_after))])}"
    items = [JobResource.of(job) for job in page.items]
    return JobList(items=items, total=page.total, next=next_url, next_cursor=page.next_after)


@router.get("/{job_id}", response_model=JobResource, summary="Get a job", responses=problem_responses(404))
def get_job(job_id: JobId, services: ServicesDep, principal: PrincipalDep) -> JobResource:
    job = _visible_job(job_id, services, principal)
    return JobResource.of(job, placement=services.store.placement(job_id))


def _visible_job(job_id: str, services: Services, principal: Principal) -> JobRecord:
    """The job, if ``principal`` may see it; otherwise the very 404 of a job that does not exist."""
    job = services.store.get(job_id)
    if not principal.can_see(job.owner):
        raise JobNotFound(job_id)
    return job


@router.get("/{job_id}/events", response_model=JobEvents, summary="A job's state history",
            responses=problem_responses(404))  # fmt: skip
def job_events(job_id: JobId, services: ServicesDep, principal: PrincipalDep) -> JobEvents:
    _visible_job(job_id, services, principal)
    return JobEvents(job=job_id, events=services.store.events(job_id))


@router.get("/{job_id}/metrics", response_model=JobMetrics, summary="A job's training time series",
            responses=problem_responses(404))  # fmt: skip
def job_metrics(
    job_id: JobId,
    services: ServicesDep,
    principal: PrincipalDep,
    rank: Annotated[int, Query(ge=0, le=65535, description="whose reports to show")] = 0,
    all_ranks: Annotated[bool, Query(description="every rank's reports (rank is then ignored)")] = False,
    max_points: Annotated[
        int, Query(ge=2, le=100_000, description="thin longer series to this many evenly spaced points")
    ] = 1000,
) -> JobMetrics:
    _visible_job(job_id, services, principal)
    shown = None if all_ranks else rank
    points = services.store.points(job_id, rank=shown, max_points=max_points)
    return JobMetrics(job=job_id, rank=shown, points=points)


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    summary="A job's driver log",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **problem_responses(404, 503),
    },
)
def job_logs(job_id: JobId, services: ServicesDep, principal: PrincipalDep) -> PlainTextResponse:
    _visible_job(job_id, services, principal)  # 404 for an unknown job, or another principal's
    text = services.control.logs(job_id)
    if text is None:
        raise ProblemError(404, f"job {job_id} has no logs (yet)", kind="no-logs", title="No logs")
    return PlainTextResponse(text)


# --- changing ----------------------------------------------------------------------------------


@router.post(
    "/{job_id}:cancel",
    response_model=JobResource,
    summary="Cancel a job",
    description="A queued job is cancelled at once (200). A launched job is asked to stop (202); "
    "it reaches CANCELLED when its Ray job has stopped. A finished job cannot be cancelled (409).",
    responses={
        202: {"model": JobResource, "description": "stopping; poll the job for CANCELLED"},
        **problem_responses(404, 409, 503),
    },
)
def cancel_job(
    job_id: JobId, response: Response, services: ServicesDep, principal: PrincipalDep
) -> JobResource:
    job = _visible_job(job_id, services, principal)
    if job.terminal:
        raise ProblemError(409, f"job {job_id} already finished ({job.state.value}); nothing to cancel",
                           kind="state-conflict", title="Job state conflict")  # fmt: skip
    job = services.control.cancel(job_id)
    if not job.terminal:
        response.status_code = 202
    return JobResource.of(job, placement=services.store.placement(job.id))


@router.delete(
    "/{job_id}",
    status_code=204,
    response_class=Response,
    summary="Delete a finished job",
    description="Removes the job with its events and metrics; only SUCCEEDED, FAILED or CANCELLED jobs.",
    responses=problem_responses(404, 409),
)
def delete_job(job_id: JobId, services: ServicesDep, principal: PrincipalDep) -> Response:
    _visible_job(job_id, services, principal)
    services.store.delete(job_id)
    services.metrics.forget_job(job_id)
    return Response(status_code=204)
