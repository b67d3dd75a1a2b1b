"""What a job asks of the Ray cluster — its worker group's CPUs and GPUs — and whether that fits.

The scheduler admits a job only when :meth:`Demand.fits_now` says the cluster has room for it
now, and fails it at once when :meth:`Demand.beyond` says the cluster could never hold it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Demand"]

#: slack in resource comparisons: Ray reports fractional CPUs and GPUs as floats
_EPS = 1e-9


@dataclass(frozen=True)
class Demand:
    """The Ray resources a job's worker group takes."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> Demand:
        """From a stored spec, trusted: the REST door validated it (``JobSpec.model_dump(mode=
        "json")``, every field present), or the scheduler did again when it was stored under
        another schema version. Raises ``ValueError`` naming ``workers`` for a spec without it."""
        try:
            w = spec["workers"]
            return cls(int(w["count"]), float(w["cpus_per_worker"]), float(w["gpus_per_worker"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the stored spec has no valid workers section: {err!r}") from err

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def beyond(self, total: Mapping[str, float]) -> str | None:
        """Why the job can never run on a cluster of this ``total`` size, or ``None``."""
        for kind, need, per, name in (
            ("CPU", self.cpus, self.cpus_per_worker, "cpus_per_worker"),
            ("GPU", self.gpus, self.gpus_per_worker, "gpus_per_worker"),
        ):
            have = total.get(kind, 0.0)
            if need > have + _EPS:
                return (
                    f"workers.count={self.workers} × workers.{name}={per:g} needs {need:g} {kind}s, "
                    f"but the whole Ray cluster has {have:g}; lower workers.count or workers.{name}"
                )
        return None

    def fits_now(
        self,
        resources: Mapping[str, Mapping[str, float]],
        *,
        committed: Iterable[Demand],
        pending: Iterable[Demand],
    ) -> bool:
        """Whether the job can be launched now on a cluster with these ``{"total": ..., "available":
        ...}`` resources: what Ray reports available, less what is ``pending`` (launched but not
        placed by Ray yet), must cover it, and together with everything ``committed`` (all
        launched jobs) it must stay within the total."""
        used, waiting = _sum(committed), _sum(pending)
        total, available = resources["total"], resources["available"]
        for i, (kind, need) in enumerate((("CPU", self.cpus), ("GPU", self.gpus))):
            if need <= 0:
                continue
            if need > available.get(kind, 0.0) - waiting[i] + _EPS:
                return False
            if used[i] + need > total.get(kind, 0.0) + _EPS:
                return False
        return True

    def __str__(self) -> str:
        gpus = f" and {self.gpus_per_worker:g} GPU" if self.gpus else ""
        return f"{self.workers} workers × {self.cpus_per_worker:g} CPU{gpus}"


def _sum(demands: Iterable[Demand]) -> tuple[float, float]:
    cpus = gpus = 0.0
    for d in demands:
        cpus, gpus = cpus + d.cpus, gpus + d.gpus
    return cpus, gpus
