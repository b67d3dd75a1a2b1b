"""Errors as RFC 9457 problem details (``application/problem+json``), for every route and failure.

Each error body is a :class:`Problem`: ``type`` (a URI naming the kind of problem; ``about:blank``
when the HTTP status says it all), ``title``, ``status``, ``detail``, ``instance`` (the request
path) and, for invalid input, ``errors``: one ``{field, message}`` per problem, the field as a
dotted path. Job-spec fields are written as in the spec (``optimizer.lr``); query, header and path
parameters carry their location (``query.limit``, ``header.Idempotency-Key``).

How store and control errors map to statuses:

=============================  ======  =============================================
``JobNotFound``                404     ``urn:gradwire:problem:job-not-found``
``JobNotTerminal``             409     ``urn:gradwire:problem:job-not-terminal``
``StateConflict``              409     ``urn:gradwire:problem:state-conflict``
``IllegalTransition``          409     ``urn:gradwire:problem:state-conflict``
``IdempotencyConflict``        422     ``urn:gradwire:problem:idempotency-conflict``
``SpecError``                  422     ``urn:gradwire:problem:invalid-spec``
``ClusterUnavailable``         503     ``urn:gradwire:problem:cluster-unavailable``
anything else                  500     ``about:blank``; the body has an incident id only
=============================  ======  =============================================

A reused idempotency key with a different spec is 422, as the IETF Idempotency-Key draft
recommends: the request is well-formed but cannot be processed as the key's original request.
"""

from __future__ import annotations

import logging
import secrets
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gradwire.server.control import ClusterUnavailable
from gradwire.server.records import IdempotencyConflict, JobNotFound, JobNotTerminal, StateConflict
from gradwire.server.states import IllegalTransition
from gradwire.spec_io import SpecError

__all__ = [
    "PROBLEM_JSON",
    "FieldError",
    "Problem",
    "ProblemError",
    "install_problem_handlers",
    "problem_response",
    "problem_responses",
]

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
URN = "urn:gradwire:problem:"


class FieldError(BaseModel):
    """One invalid field: its dotted path ('' for the whole document) and what is wrong with it."""

    field: str = Field(description="dotted path, e.g. optimizer.lr or query.limit")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem details object; extension members may follow the standard ones."""

    model_config = ConfigDict(extra="allow")

    type: str = Field("about:blank", description="URI naming the kind of problem")
    title: str = Field(description="short summary of the kind of problem")
    status: int = Field(ge=100, le=599, description="the HTTP status code")
    detail: str | None = Field(None, description="what went wrong with this request")
    instance: str | None = Field(None, description="the request path this problem is about")
    errors: list[FieldError] | None = Field(None, description="each invalid field, for input errors")


class ProblemError(Exception):
    """Raise from a route to answer with a problem; ``kind`` becomes ``urn:gradwire:problem:<kind>``."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        kind: str | None = None,
        title: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail or HTTPStatus(status).phrase)
        self.status, self.detail, self.kind, self.title = status, detail, kind, title
        self.errors, self.headers, self.extensions = errors, headers, extensions


def problem_response(
    request: Request | None,
    status: int,
    detail: str | None = None,
    *,
    kind: str | None = None,
    title: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A ``application/problem+json`` response for ``status``."""
    problem = Problem(
        type=URN + kind if kind else "about:blank",
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path if request is not None else None,
        errors=errors,
        **extensions,
    )
    body = problem.model_dump(mode="json", exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries declaring a problem+json body for each status."""
    content = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {status: {"description": HTTPStatus(status).phrase, "content": content} for status in statuses}


def _dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]  # a body field is named as in the document
    return ".".join(str(p) for p in parts)


# --- handlers ---------------------------------------------------------------------------------


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
    return problem_response(request, exc.status_code, detail, headers=exc.headers)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(field=_dotted(e.get("loc", ())), message=str(e.get("msg", "invalid")))
        for e in exc.errors()
    ]
    noun = "field is" if len(errors) == 1 else "fields are"
    detail = f"{len(errors)} {noun} invalid"
    return problem_response(request, 422, detail, kind="invalid-request", errors=errors)


async def _spec_invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SpecError)
    errors = [FieldError(field=p.path, message=p.message) for p in exc.problems]
    detail = f"the job spec has {len(errors)} problem{'s' * (len(errors) != 1)}"
    return problem_response(
        request, 422, detail, kind="invalid-spec", title="Invalid job spec", errors=errors
    )


async def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request, exc.status, exc.detail, kind=exc.kind, title=exc.title, errors=exc.errors,
        headers=exc.headers, **exc.extensions,
    )  # fmt: skip


def _mapped(status: int, kind: str, title: str) -> Any:
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return problem_response(request, status, str(exc), kind=kind, title=title)

    return handler


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    incident = secrets.token_hex(6)
    # the message may hold anything (a URL with a password...); the log has it, the client does not
    log.error("incident %s: %s %s failed", incident, request.method, request.url.path, exc_info=exc)
    detail = f"the coordinator failed to handle this request; its log has the details (incident {incident})"
    return problem_response(request, 500, detail, incident=incident)


def install_problem_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` raises, and unknown routes and methods, with problem+json."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(SpecError, _spec_invalid)
    app.add_exception_handler(ProblemError, _problem)
    app.add_exception_handler(JobNotFound, _mapped(404, "job-not-found", "Job not found"))
    app.add_exception_handler(JobNotTerminal, _mapped(409, "job-not-terminal", "Job not finished"))
    app.add_exception_handler(StateConflict, _mapped(409, "state-conflict", "Job state conflict"))
    app.add_exception_handler(IllegalTransition, _mapped(409, "state-conflict", "Job state conflict"))
    app.add_exception_handler(
        IdempotencyConflict, _mapped(422, "idempotency-conflict", "Idempotency key reused")
    )
    app.add_exception_handler(ClusterUnavailable, _mapped(503, "cluster-unavailable", "Cluster unavailable"))
    app.add_exception_handler(Exception, _unexpected)
