"""Open endpoints for probes and Prometheus: ``/healthz``, ``/readyz``, ``/metrics`` (no auth).

- ``/healthz``: 200 while the process serves requests (liveness).
- ``/readyz``: 200 when the job store answers a query and the cluster reports its resources;
  otherwise a 503 problem whose ``checks`` say which part failed (readiness).
- ``/metrics``: the coordinator's Prometheus exposition. ``gradwire_jobs`` is recounted from the
  store at each scrape, so it is right even after jobs were deleted. Its series name every job, so
  with ``GRADWIRE_METRICS_TOKEN`` set it answers only a request bearing that token (401 otherwise).
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from gradwire.server.auth import get_services, require_metrics_token
from gradwire.server.control import ClusterUnavailable, Services
from gradwire.server.problems import problem_response, problem_responses

__all__ = ["Health", "Readiness", "router"]

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])
ServicesDep = Annotated[Services, Depends(get_services)]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, str]


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health()


def _database_check(services: Services) -> str:
    try:
        with services.store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as err:  # any failure means not ready; the log has the details
        log.warning("readiness: database unreachable: %s", type(err).__name__)
        return "unreachable"
    return "ok"


def _cluster_check(services: Services) -> str:
    try:
        services.control.cluster()
    except ClusterUnavailable as err:
        return f"unavailable: {err}"
    except Exception as err:
        log.warning("readiness: cluster check failed: %s", type(err).__name__)
        return "unavailable"
    return "ok"


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: job store and cluster reachable",
    responses=problem_responses(503),
)
def readyz(request: Request, services: ServicesDep) -> Readiness | JSONResponse:
    checks = {"database": _database_check(services), "cluster": _cluster_check(services)}
    failed = sorted(name for name, result in checks.items() if result != "ok")
    if failed:
        detail = "not ready: " + "; ".join(f"{name} {checks[name]}" for name in failed)
        return problem_response(request, 503, detail, kind="not-ready", title="Not ready", checks=checks)
    return Readiness(checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    description="Open unless GRADWIRE_METRICS_TOKEN is set; then send it as a bearer token.",
    dependencies=[Depends(require_metrics_token)],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **problem_responses(401)},
)
def metrics(services: ServicesDep) -> Response:
    try:
        services.metrics.set_job_counts(services.store.counts_by_state())
    except Exception as err:  # serve the rest of the metrics even when the database is down
        log.warning("metrics: could not count jobs: %s", type(err).__name__)
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)
