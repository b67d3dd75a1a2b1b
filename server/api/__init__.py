"""The coordinator's routers, one per resource: ``/v1/...`` behind bearer auth, probes open, metrics
open unless ``GRADWIRE_METRICS_TOKEN`` is set."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gradwire.server.api import cluster, compressors, health, jobs
from gradwire.server.auth import require_token
from gradwire.server.problems import problem_responses

__all__ = ["open_router", "v1_router"]


def v1_router() -> APIRouter:
    """``/v1``: jobs, compressors, cluster; every route needs a token when tokens are configured."""
    router = APIRouter(
        prefix="/v1",
        dependencies=[Depends(require_token)],
        responses=problem_responses(401, 422, 500),
    )
    for module in (jobs, compressors, cluster):
        router.include_router(module.router)
    return router


def open_router() -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics``: no principal, for probes and Prometheus (``/metrics``
    asks for ``GRADWIRE_METRICS_TOKEN`` when it is set)."""
    router = APIRouter(responses=problem_responses(500))
    router.include_router(health.router)
    return router
