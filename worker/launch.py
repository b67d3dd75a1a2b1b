"""Start (or join) Ray and run one JobSpec with Ray Train's ``TorchTrainer``.

    from gradwire.worker.launch import run_job
    metrics = run_job(JobSpec.from_file("examples/specs/digits-powersgd.yaml"))

Without an address (argument or ``RAY_ADDRESS``) a single-machine Ray is started bound to
loopback only (docs/runtime.md, "Ray on one machine") and shut down again at the end;
a Ray already initialised in this process, or a cluster given by address, is used as is.

Ray reads its binding settings when it is first imported, so this module imports ``ray`` only
inside functions, after :func:`start_local_ray` has set the environment. Import ray yourself
earlier only with ``local_ray_env()`` already in ``os.environ``, or Ray listens on every
interface.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from gradwire.policy import ENV as POLICY_ENV
from gradwire.policy import JobPolicy
from gradwire.ray_env import apply_local_ray_env, local_ray_env, ray_temp_dir  # noqa: F401 - re-exported
from gradwire.spec import JobSpec, Problem, SpecError
from gradwire.worker import runs

#: restarts of the worker group after a worker dies (Ray Train's FailureConfig)
MAX_FAILURES = 2


class NotEnoughResourcesError(RuntimeError):
    """The cluster cannot host the worker group the spec asks for."""


def start_local_ray(num_cpus: int | None = None) -> None:
    """A new single-machine Ray (``ray.init(address="local")``) on 127.0.0.1 only, without the
    dashboard. Never one that happens to run already: ``ray.init()`` without an address would join
    the last cluster ``ray start`` made in the same temp dir (a coordinator's embedded head, say)."""
    apply_local_ray_env()
    import ray

    temp_dir = ray_temp_dir()
    Path(temp_dir).mkdir(parents=True, exist_ok=True)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        log_to_driver=True,
    )


def check_resources(spec: JobSpec) -> None:
    """Fail before any worker starts if the cluster lacks the CPUs (or GPUs) the spec asks for."""
    import ray

    available = ray.cluster_resources()
    workers = spec.workers
    for kind, per_worker, field in (
        ("CPU", workers.cpus_per_worker, "workers.cpus_per_worker"),
        ("GPU", workers.gpus_per_worker, "workers.gpus_per_worker"),
    ):
        needed = workers.count * per_worker
        have = available.get(kind, 0.0)
        if needed > have + 1e-9:
            raise NotEnoughResourcesError(
                f"workers.count={workers.count} × {field}={per_worker} needs {needed:g} {kind}s, "
                f"but the Ray cluster has {have:g}; lower workers.count or {field}"
            )


def storage_path(spec: JobSpec) -> str:
    storage = spec.checkpoint.storage
    return storage if "://" in storage else str(Path(storage).resolve())


def run_dir(spec: JobSpec, job_id: str | None = None) -> Path:
    """Where the run's local files go (telemetry JSONL): Ray Train's run folder when storage is
    a local directory, else ``.gradwire/runs/<run name>`` (:func:`runs.run_name`: the job id if
    given, else the spec's name)."""
    storage = spec.checkpoint.storage
    base = Path(".gradwire/runs").resolve() if "://" in storage else Path(storage_path(spec))
    return base / runs.run_name(spec, job_id)


def run_folder(spec: JobSpec, job_id: str | None = None) -> str:
    """Ray Train's run folder: ``<checkpoint.storage>/<run name>`` (a local path or a URI)."""
    storage = storage_path(spec)
    name = runs.run_name(spec, job_id)
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else str(Path(storage) / name)


def prepare_run(spec: JobSpec, job_id: str | None = None, *, resume: bool = False) -> dict[str, Any]:
    """Before Ray starts: decide whose checkpoints this job may continue.

    Refuses (:class:`runs.RunConflict`) a run folder that already holds a run unless ``resume``,
    and ``resume`` without one; resolves ``resume_from`` (a path; a job id is the coordinator's to
    resolve) to one checkpoint folder (:class:`SpecError` at ``resume_from``). Returns the
    ``train_loop`` options: ``resume_from`` (or nothing) and ``changed`` (the fields in which a
    resumed run's recorded spec differs from this one).
    """
    if spec.resume_job():
        message = (
            f"{spec.resume_from!r} is a coordinator job id; only the coordinator resolves those "
            "(submit the spec there). gradwire train resumes from a path: a run folder "
            "(<checkpoint.storage>/<run name>) or one of its checkpoint_* folders"
        )
        raise SpecError([Problem("resume_from", message)])
    options: dict[str, Any] = {}
    if spec.resume_path():
        options["resume_from"] = runs.resolve_checkpoint(spec.resume_path())
    options["changed"] = runs.check_run(run_folder(spec, job_id), spec, resume=resume)
    return options


def check_runnable(spec: JobSpec) -> None:
    """Refuse, before any worker starts, what the spec allows but this runtime cannot run."""
    st = spec.stragglers
    if st is not None and st.code in ("sr-sgc", "m-sgc"):
        raise SpecError(
            [
                Problem(
                    "stragglers.code",
                    f"{st.code!r}: sequential gradient codes run on live ranks through "
                    "gradwire.compressors.coding.SequentialRound (see benchmarks/stragglers.py); "
                    "the Ray Train runtime trains with 'fractional' or 'cyclic' codes",
                )
            ]
        )


def make_trainer(spec: JobSpec, loop_config: dict[str, Any] | None = None):
    """Ray Train's TorchTrainer for ``spec``; ``loop_config`` adds ``train_loop`` options
    (``job_id``, ``telemetry``, ``fault``, ``resume_from``; see
    :func:`gradwire.worker.runtime.train_loop`). The run is named by ``job_id`` when given,
    else by the spec's name (:func:`runs.run_name`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gradwire.worker.runtime import train_loop

    workers = spec.workers
    job_id = (loop_config or {}).get("job_id")
    config = {
        "spec": spec.model_dump(mode="json"),
        "run_dir": str(run_dir(spec, job_id)),
        **(loop_config or {}),
    }
    return TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=workers.count,
            use_gpu=workers.gpus_per_worker > 0,
            resources_per_worker={"CPU": workers.cpus_per_worker}
            | ({"GPU": workers.gpus_per_worker} if workers.gpus_per_worker > 0 else {}),
        ),
        run_config=RunConfig(
            name=runs.run_name(spec, job_id),
            storage_path=storage_path(spec),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    )


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    job_id: str | None = None,
    telemetry: str | None = None,
    loop_config: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``spec`` to the end and return rank 0's final metrics (plus ``checkpoint``, and
    ``changed`` when a resumed run's spec changed).

    The run is ``<checkpoint.storage>/<job_id or spec.name>``. A folder that already holds a run
    is continued only with ``resume`` (else :class:`runs.RunConflict`, naming the fields that
    differ); ``resume_from`` in the spec (a path) starts the run from that checkpoint.

    Under a coordinator, the job's environment holds its policy (:data:`gradwire.policy.ENV`):
    the spec is confined by it first (:class:`gradwire.spec.PolicyError`, before Ray starts) and
    the workers get it again.

    ``telemetry`` is a coordinator's gRPC address (default ``GRADWIRE_TELEMETRY_ADDRESS``);
    without one, each rank writes ``telemetry-rank{r}.jsonl`` in :func:`run_dir`. A job that
    stopped on non-finite gradients returns normally with ``metrics["stopped"]`` set.
    """
    policy = JobPolicy.from_env()  # set by a coordinator's scheduler; None for gradwire train
    spec = spec.confined(policy)  # PolicyError before anything is opened, imported or started
    check_runnable(spec)
    telemetry = telemetry or os.environ.get("GRADWIRE_TELEMETRY_ADDRESS") or None
    prepared = prepare_run(spec, job_id, resume=resume)
    changed = prepared.pop("changed")
    options = {"job_id": job_id or spec.name, "telemetry": telemetry, **prepared, **(loop_config or {})}
    if policy is not None:  # the workers check again, whatever environment Ray gives them
        options["policy"] = policy.to_env()[POLICY_ENV]
    address = address or os.environ.get("RAY_ADDRESS")
    started_here = False
    if not _ray_initialized():
        if address:
            import ray

            ray.init(address=address)
        else:
            start_local_ray()
        started_here = True
    try:
        check_resources(spec)
        runs.write_record(run_folder(spec, job_id), spec, runs.run_name(spec, job_id))
        result = make_trainer(spec, options).fit()
        metrics = dict(result.metrics or {})
        if result.checkpoint is not None:
            metrics["checkpoint"] = result.checkpoint.path
        if changed:
            metrics["changed"] = changed
        return metrics
    finally:
        if started_here:
            import ray

            ray.shutdown()


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # not imported yet: certainly not initialised
    return ray is not None and ray.is_initialized()
