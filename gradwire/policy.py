"""What a coordinator lets a job spec ask for: file roots, checkpoint places, import paths and
bounds on every size, count and string (torch-free, standard library only).

A :class:`JobPolicy` is applied to an already valid :class:`gradwire.spec.JobSpec` by
``JobSpec.confined(policy)``, in two places:

* at the REST door (``POST /v1/jobs``), built from the coordinator's settings: every violation is
  a 422 naming the field;
* again by the job's driver and workers before anything is opened or imported
  (``gradwire.worker.launch.run_job``, ``gradwire.worker.runtime.train_loop``). They get the
  policy from the job's environment (:data:`ENV`, set by the scheduler at launch), never from the
  spec, so a spec that reached Ray around the door is refused there too. A malformed value is
  refused (fail closed); no value at all means the driver was not launched by a coordinator
  (``gradwire train`` on your own machine): no policy, the user's own file permissions are the
  boundary.

File paths: in ``model.params`` and ``data.params``, any parameter named in :data:`PATH_PARAMS`
(the built-in ``csv``, ``npz`` and ``parquet`` datasets read ``path``; a plug-in that reads a
file should name its parameter one of these) must be an absolute path that, with every symlink
and ``..`` resolved, lies under one of ``data_roots``; with no roots, file parameters are refused.
``checkpoint.storage`` must resolve under ``checkpoint_root`` (a relative storage is taken
relative to it, and the confined spec carries the absolute path), or start with one of
``checkpoint_uris`` (URIs are refused when there are none). Messages quote the field and the
value the user wrote, never what a file holds. Docs: docs/service.md, "Running it for a team".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

JobSpec = Any  # gradwire.spec.JobSpec, which imports this module (no import back: no cycle)

__all__ = [
    "DEFAULT_STORAGE",
    "ENV",
    "PATH_PARAMS",
    "JobPolicy",
    "Limits",
    "PolicyViolation",
    "resolve_under",
]

#: the environment variable a coordinator's scheduler sets for each job: the policy as JSON
ENV = "GRADWIRE_JOB_POLICY"
#: parameter names (in model.params and data.params) that name a file or folder to read
PATH_PARAMS = frozenset({"path", "paths", "file", "filename", "root", "data_dir", "directory"})
#: ``checkpoint.storage``'s default in a spec; under a policy it means "the checkpoint root"
DEFAULT_STORAGE = ".gradwire/checkpoints"

#: params names by what they size; each is bounded by the Limits field named here
WIDTH_PARAMS = frozenset({"hidden", "width", "d_model", "feedforward", "channels", "features", "context"})
DEPTH_PARAMS = frozenset({"layers", "heads", "depth", "num_layers", "num_heads", "clusters_per_class"})
COUNT_PARAMS = frozenset({"samples", "num_samples", "num_sequences", "num_chars", "classes", "num_classes"})


@dataclass(frozen=True)
class Limits:
    """Bounds on what one job may ask for. Every field is a coordinator setting
    (``GRADWIRE_MAX_<FIELD>`` / ``GRADWIRE_MIN_CPUS_PER_WORKER``), documented in docs/service.md."""

    max_workers: int = 64  # workers.count
    max_steps: int = 1_000_000  # steps
    max_epochs: int = 10_000  # epochs
    max_batch_size: int = 65_536  # data.batch_size
    min_cpus_per_worker: float = 0.1  # workers.cpus_per_worker
    max_cpus_per_worker: float = 256.0
    max_gpus_per_worker: float = 16.0  # workers.gpus_per_worker
    max_width: int = 65_536  # params named in WIDTH_PARAMS (each entry of a list, too)
    max_depth: int = 1_024  # params named in DEPTH_PARAMS; also the length of a list of widths
    max_samples: int = 10_000_000  # params named in COUNT_PARAMS
    max_number: float = 1e9  # the magnitude of any other number in model.params / data.params
    max_string: int = 4_096  # characters of any string in params, and of checkpoint.storage
    max_name: int = 256  # characters of model.name, data.dataset and compression.name
    max_params_bytes: int = 65_536  # model.params and data.params together, as compact JSON
    max_keep: int = 100  # checkpoint.keep


@dataclass(frozen=True)
class PolicyViolation:
    """One refused field: its dotted path, why, and the kind of refusal (the REST problem type:
    ``limit-exceeded``, ``import-path-refused`` or ``path-refused``)."""

    path: str
    message: str
    kind: str


@dataclass(frozen=True)
class JobPolicy:
    """The operator's rules for job specs (see the module docstring).

    ``data_roots``: absolute folders file parameters may name (none: file datasets refused).
    ``checkpoint_root``: the absolute folder checkpoint storage must be under (``None``: any).
    ``checkpoint_uris``: URI prefixes checkpoint storage may start with (none: URIs refused).
    ``allow_import_paths``: accept ``module:function`` models and datasets.
    """

    data_roots: tuple[str, ...] = ()
    checkpoint_root: str | None = None
    checkpoint_uris: tuple[str, ...] = ()
    allow_import_paths: bool = False
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        roots = tuple(os.path.realpath(r) for r in self.data_roots if r)
        object.__setattr__(self, "data_roots", roots)
        if self.checkpoint_root is not None:
            object.__setattr__(self, "checkpoint_root", os.path.realpath(self.checkpoint_root))
        object.__setattr__(self, "checkpoint_uris", tuple(u for u in self.checkpoint_uris if u))

    # --- the job's environment -------------------------------------------------------------------

    def to_env(self) -> dict[str, str]:
        """``{ENV: json}``, for a launched job's environment."""
        return {ENV: json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobPolicy | None:
        """The policy in ``environ`` (default ``os.environ``); ``None`` when there is none.
        A value that does not parse raises ``ValueError``: a job is never run unconfined because
        its policy was garbled."""
        text = (os.environ if environ is None else environ).get(ENV)
        if text is None:
            return None
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(Limits)}
            limits = Limits(**{k: v for k, v in raw.pop("limits", {}).items() if k in known})
            return cls(
                data_roots=tuple(raw.get("data_roots", ())),
                checkpoint_root=raw.get("checkpoint_root"),
                checkpoint_uris=tuple(raw.get("checkpoint_uris", ())),
                allow_import_paths=raw.get("allow_import_paths") is True,
                limits=limits,
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{ENV} in this job's environment is not a job policy: {err}") from None

    # --- checking ------------------------------------------------------------------------------

    def violations(self, spec: JobSpec) -> list[PolicyViolation]:
        """Everything ``spec`` asks for beyond this policy, each naming its field."""
        return [*self._bounds(spec), *self._import_paths(spec), *self._files(spec)]

    def storage(self, spec: JobSpec) -> str:
        """``checkpoint.storage`` as this policy places it: a relative path (the default included)
        under the checkpoint root, absolute and resolved; a URI or an unconfined path as written."""
        storage = spec.checkpoint.storage
        if "://" in storage or self.checkpoint_root is None:
            return storage
        if storage == DEFAULT_STORAGE:
            return self.checkpoint_root
        return os.path.realpath(os.path.join(self.checkpoint_root, storage))

    def _bounds(self, spec: JobSpec) -> list[PolicyViolation]:
        lim = self.limits
        found: list[PolicyViolation] = []

        def over(path: str, value: float | None, limit: float, what: str = "the limit") -> None:
            if value is not None and value > limit:
                found.append(
                    PolicyViolation(path, f"{value:g} exceeds {what} of {limit:g}", "limit-exceeded")
                )

        workers = spec.workers
        over("workers.count", workers.count, lim.max_workers)
        over("steps", spec.steps, lim.max_steps)
        over("epochs", spec.epochs, lim.max_epochs)
        over("data.batch_size", spec.data.batch_size, lim.max_batch_size)
        over("workers.cpus_per_worker", workers.cpus_per_worker, lim.max_cpus_per_worker)
        over("workers.gpus_per_worker", workers.gpus_per_worker, lim.max_gpus_per_worker)
        over("checkpoint.keep", spec.checkpoint.keep, lim.max_keep)
        if workers.cpus_per_worker < lim.min_cpus_per_worker:
            message = (
                f"{workers.cpus_per_worker:g} is below this coordinator's minimum of "
                f"{lim.min_cpus_per_worker:g} CPUs per worker"
            )
            found.append(PolicyViolation("workers.cpus_per_worker", message, "limit-exceeded"))
        for path, name in (("model.name", spec.model.name), ("data.dataset", spec.data.dataset),
                           ("compression.name", spec.compression.name)):  # fmt: skip
            if len(name) > lim.max_name:
                found.append(
                    PolicyViolation(path, f"{len(name)} characters; at most {lim.max_name}", "limit-exceeded")
                )
        if len(spec.checkpoint.storage) > lim.max_string:
            message = f"{len(spec.checkpoint.storage)} characters; at most {lim.max_string}"
            found.append(PolicyViolation("checkpoint.storage", message, "limit-exceeded"))
        size = len(json.dumps([spec.model.params, spec.data.params], separators=(",", ":"), default=str))
        if size > lim.max_params_bytes:
            message = (
                f"model.params and data.params take {size} bytes as JSON; at most {lim.max_params_bytes}"
            )
            found.append(PolicyViolation("model.params", message, "limit-exceeded"))
            return found  # walking a huge document only to list more of the same
        for section, params in (("model.params", spec.model.params), ("data.params", spec.data.params)):
            for key, value in params.items():
                found += self._param_bounds(f"{section}.{key}", str(key), value)
        return found

    def _param_bounds(self, path: str, key: str, value: Any) -> list[PolicyViolation]:
        lim = self.limits
        limit, what = lim.max_number, "the limit on numbers in params"
        if key in WIDTH_PARAMS:
            limit, what = lim.max_width, f"the limit on sizes ({', '.join(sorted(WIDTH_PARAMS))})"
        elif key in DEPTH_PARAMS:
            limit, what = lim.max_depth, f"the limit on depths ({', '.join(sorted(DEPTH_PARAMS))})"
        elif key in COUNT_PARAMS:
            limit, what = lim.max_samples, f"the limit on counts ({', '.join(sorted(COUNT_PARAMS))})"
        found: list[PolicyViolation] = []
        stack: list[tuple[str, Any]] = [(path, value)]
        while stack:
            where, item = stack.pop()
            if isinstance(item, bool) or item is None:
                continue
            if isinstance(item, (int, float)):
                if not math.isfinite(item) or abs(item) > limit:
                    found.append(
                        PolicyViolation(where, f"{item:g} exceeds {what} of {limit:g}", "limit-exceeded")
                    )
            elif isinstance(item, str):
                if len(item) > lim.max_string:
                    message = f"{len(item)} characters; at most {lim.max_string}"
                    found.append(PolicyViolation(where, message, "limit-exceeded"))
            elif isinstance(item, Mapping):
                stack.extend((f"{where}.{k}", v) for k, v in item.items())
            elif isinstance(item, (list, tuple)):
                if key in WIDTH_PARAMS and len(item) > lim.max_depth:
                    message = f"{len(item)} entries exceeds the limit on depths of {lim.max_depth}"
                    found.append(PolicyViolation(where, message, "limit-exceeded"))
                stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
        return found

    def _import_paths(self, spec: JobSpec) -> list[PolicyViolation]:
        if self.allow_import_paths:
            return []
        return [
            PolicyViolation(
                path,
                f"{value!r} is an import path (module:function); this coordinator does not load code "
                "named in a spec (GRADWIRE_ALLOW_IMPORT_PATHS is off)",
                "import-path-refused",
            )
            for path, value in (("model.name", spec.model.name), ("data.dataset", spec.data.dataset))
            if ":" in value
        ]

    def _files(self, spec: JobSpec) -> list[PolicyViolation]:
        found: list[PolicyViolation] = []
        for section, params in (("model.params", spec.model.params), ("data.params", spec.data.params)):
            for key, value in params.items():
                if key not in PATH_PARAMS:
                    continue
                values = value if isinstance(value, (list, tuple)) else [value]
                for i, item in enumerate(values):
                    where = f"{section}.{key}" + (f"[{i}]" if values is value else "")
                    problem = self._data_path_problem(item)
                    if problem:
                        found.append(PolicyViolation(where, problem, "path-refused"))
        problem = self._storage_problem(spec.checkpoint.storage)
        if problem:
            found.append(PolicyViolation("checkpoint.storage", problem, "path-refused"))
        resume = spec.resume_path()
        if resume is not None:
            problem = self._storage_problem(resume, relative_ok=False)
            if problem:
                found.append(PolicyViolation("resume_from", problem, "path-refused"))
        return found

    def _data_path_problem(self, value: Any) -> str | None:
        if not self.data_roots:
            return (
                "this coordinator reads no files named in a spec: no data roots are configured "
                "(the operator sets GRADWIRE_DATA_ROOTS)"
            )
        if not isinstance(value, str):
            return f"a file path must be a string, not {type(value).__name__}"
        if "://" in value:
            return "must be a file path under a data root, not a URI"
        if not os.path.isabs(value):
            return "must be an absolute path under one of the data roots: " + ", ".join(self.data_roots)
        if resolve_under(value, self.data_roots) is None:
            return (
                f"{value!r} is not under a data root (symlinks and '..' are resolved first); "
                "allowed: " + ", ".join(self.data_roots)
            )
        return None

    def _storage_problem(self, value: str, *, relative_ok: bool = True) -> str | None:
        if "://" in value:
            scheme_path = value.split("://", 1)[1]
            if ".." in scheme_path.split("/") or any(not c.isprintable() for c in value):
                return "a URI with '..' segments or control characters is refused"
            if not any(value.startswith(prefix) for prefix in self.checkpoint_uris):
                allowed = (
                    ", ".join(self.checkpoint_uris) or "none (the operator sets GRADWIRE_CHECKPOINT_URIS)"
                )
                return f"{value!r}: URIs must start with an allowed prefix; allowed: {allowed}"
            return None
        if self.checkpoint_root is None:
            return None
        if not relative_ok and not os.path.isabs(value):
            return f"must be an absolute path under the checkpoint root {self.checkpoint_root}"
        base = value if value == DEFAULT_STORAGE else os.path.join(self.checkpoint_root, value)
        if value != DEFAULT_STORAGE and resolve_under(base, (self.checkpoint_root,)) is None:
            return (
                f"{value!r} is not under the checkpoint root {self.checkpoint_root} (symlinks and '..' "
                "are resolved first); leave checkpoint.storage out to use the job's own folder there"
            )
        return None


def resolve_under(path: str, roots: tuple[str, ...]) -> str | None:
    """``path`` with every symlink and ``..`` resolved, if that lies in one of ``roots`` (already
    resolved); else ``None``. A path that cannot be a path (a NUL byte) lies nowhere."""
    try:
        real = os.path.realpath(path)
    except (ValueError, OSError):
        return None
    for root in roots:
        try:
            if os.path.commonpath([real, root]) == root:
                return real
        except ValueError:  # different drives
            continue
    return None
