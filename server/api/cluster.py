"""``/v1/cluster``: the Ray cluster's resources, in total, free and in use.

The numbers come from the scheduler side (:meth:`JobControl.cluster`); when it cannot reach the
cluster, or none is attached, the answer is a 503 problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from gradwire.server.auth import get_services
from gradwire.server.control import ClusterUnavailable, Services
from gradwire.server.problems import problem_responses

__all__ = ["ClusterResources", "router"]

router = APIRouter(prefix="/cluster", tags=["cluster"])


class ClusterResources(BaseModel):
    """Ray resources by name (``CPU``, ``GPU``, ``memory`` in bytes, custom resources...)."""

    total: dict[str, float] = Field(description="what the cluster has")
    available: dict[str, float] = Field(description="what is free now")
    used: dict[str, float] = Field(description="total minus available")


def _amounts(value: Any, part: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise ClusterUnavailable(f"the scheduler reported no {part!r} resources")
    amounts = {str(k): float(v) for k, v in value.items()}
    return {k: v for k, v in amounts.items() if math.isfinite(v)}


def cluster_resources(services: Services) -> ClusterResources:
    """The cluster's resources via the control; raises :class:`ClusterUnavailable`."""
    report = services.control.cluster()
    if not isinstance(report, Mapping):
        raise ClusterUnavailable("the scheduler reported no resources")
    total = _amounts(report.get("total"), "total")
    available = _amounts(report.get("available", {}), "available")
    used = {name: max(0.0, amount - available.get(name, 0.0)) for name, amount in total.items()}
    return ClusterResources(total=total, available=available, used=used)


@router.get(
    "",
    response_model=ClusterResources,
    summary="Cluster resources",
    responses=problem_responses(503),
)
def get_cluster(services: Annotated[Services, Depends(get_services)]) -> ClusterResources:
    return cluster_resources(services)
