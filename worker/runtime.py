"""The train loop that Ray Train's ``TorchTrainer`` runs on every worker.

One readable loop, top to bottom: set up (spec, data, model, the step — DDP with the gradwire
hook, or a gradient-coded round —, optimizer, resume, telemetry), then per step: this rank's
batches → forward, backward and reduce (:mod:`gradwire.worker.steps`) → optimizer step →
telemetry report, with evaluation and checkpoints at the steps the spec asks for. Metrics
reported to Ray are every rank's own; the driver shows rank 0's.

A checkpoint directory holds ``model.pt`` and ``optimizer.pt`` (rank 0; the same on every rank),
``rank{r}.pt`` per rank (compressor and error-feedback state, coded-round position, torch RNG
state; with ``onebit_adam``, whose moments and error-feedback residuals are each rank's own, the
optimizer's state too, and ``optimizer.pt`` records how many ranks saved one, so a group of
another size refuses to resume) and ``progress.json`` (the step reached and the worker group's
attempt). The attempt is Ray Train's restore count as the loop sees it: 0 for a group that starts
fresh (or from another run's checkpoint, ``resume_from``), and the saved attempt + 1 for a group
that Ray Train hands this run's own checkpoint (``ray.train.get_checkpoint()``: it restored the
group after a worker failed, or the run is resumed). Every step report carries it, with the node's
address (:func:`node_address`), so the coordinator sees restores and placement from the workers
themselves. A group lost before Ray Train registered the run's first checkpoint starts again from
step 0 as attempt 0. The data order is a function of the step (:mod:`gradwire.worker.sampler`), so
resuming from a checkpoint continues the same trajectory.

A step with non-finite gradients stops the job on every rank at once, before the optimizer
applies them; the final report (and checkpoint: the last finite state) carries ``stopped``
with the reason. (``onebit_adam`` after its warm-up finds them in ``optimizer.step()``, when each
rank's moments already took them in: its saved moments are then not finite, the parameters are.)
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradwire.policy import ENV as POLICY_ENV
from gradwire.policy import PATH_PARAMS, JobPolicy, resolve_under
from gradwire.protos import telemetry_pb2 as pb
from gradwire.spec import JobSpec, OptimizerSpec
from gradwire.worker.datasets import DATASETS, Dataset, get_dataset
from gradwire.worker.models import build_model
from gradwire.worker.partition import partition_indices
from gradwire.worker.sampler import PartitionSampler
from gradwire.worker.steps import (
    CodedStep,
    DdpStep,
    NonFiniteStep,
    OptimizerHook,
    StepTimes,
    loss_fn,
    optimizer_step,
    straggler_model,
)
from gradwire.worker.telemetry import make_telemetry

LEDGER_KEYS = ("bytes_sent", "bytes_uncompressed", "compress_seconds", "communicate_seconds")


def train_loop(config: dict[str, Any]) -> None:
    """Run one job's share on this worker.

    ``config``: ``spec`` (a JobSpec as a JSON-like dict); optional ``job_id`` (default: the
    spec's name), ``telemetry`` (a coordinator's gRPC address; without it reports go to
    ``telemetry-rank{r}.jsonl`` in ``run_dir``), ``run_dir``, ``resume_from`` (a checkpoint
    folder of another run, loaded while this run has no checkpoint of its own) and ``fault``
    (tests and chaos experiments: ``{"rank", "step", "marker"}`` SIGKILLs that rank's process
    once at that step).
    """
    import ray.train
    import ray.train.torch

    # the coordinator's policy (its driver passes what the job's environment held): refused
    # again here, before any file is opened or any module imported
    policy = job_policy(config)
    spec = JobSpec.from_dict(config["spec"]).confined(policy)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # cpu, or this worker's GPU

    # --- data: the whole set on every worker; partition j is what rank j trains on without a code
    data = load_data(spec, policy)
    shares = partition_indices(
        partition_labels(data), world_size, seed=spec.seed, **spec.data.partition.model_dump()
    )
    sampler = PartitionSampler(shares, spec.data.batch_size, spec.seed)
    # every rank takes the same number of steps, so an epoch budget counts the smallest share
    total_steps = spec.steps or spec.epochs * min(sampler.batches_per_epoch(j) for j in range(world_size))

    # --- model and step: same init on every rank ------------------------------------------------
    torch.manual_seed(spec.seed)
    model = build_model(
        spec.model.name, data.num_features, data.num_classes,
        allow_import_paths=policy is None or policy.allow_import_paths, **spec.model.params,
    )  # fmt: skip
    # the optimizer is built before the step (onebit_adam's brings the DDP hook that averages, and
    # after its warm-up compresses, the steps), so the model moves to its device first: a move
    # after it may give the module new parameter objects (torch's Module.cuda documents this)
    model = model.to(device)
    optimizer = make_optimizer(spec.optimizer, model.parameters(), total_steps=total_steps)
    coded = spec.stragglers is not None and spec.stragglers.code in ("fractional", "cyclic")
    if coded:
        train_step: DdpStep | CodedStep = CodedStep(model, spec, rank, world_size, device)
    else:
        injected = straggler_model(spec.injection(), world_size)  # code 'none': everyone waits
        own_hook = OptimizerHook(optimizer, spec.optimizer.name) if per_rank_optimizer(optimizer) else None
        train_step = DdpStep(
            model,
            spec.run_compression(),
            ray.train.torch.prepare_model,
            rank=rank,
            stragglers=injected,
            optimizer_hook=own_hook,
        )
    partitions = train_step.partitions or [rank]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if optimised != {id(p) for p in train_step.module.parameters()}:  # would train nothing, silently
        raise RuntimeError("the optimizer does not hold the trained module's parameters")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec.optimizer, total_steps))

    step, attempt = 0, 0
    checkpoint = ray.train.get_checkpoint()  # this run's newest, after a restart or with --resume
    restored = checkpoint is not None  # Ray Train restored this run: the group is a new attempt
    if checkpoint is None and config.get("resume_from"):  # the run starts from another run's
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step, saved_attempt = load_checkpoint(
                Path(folder), rank, train_step, optimizer, scheduler, world_size=world_size
            )
        attempt = saved_attempt + 1 if restored else 0
    start_step = step
    node = node_address()

    telemetry = make_telemetry(
        config.get("telemetry"),
        config.get("job_id") or spec.name,
        rank,
        run_dir=config.get("run_dir") or ".",
    )
    kill_at = config.get("fault") or {}
    run = RunState(start_step=step)
    try:
        # --- the loop ---------------------------------------------------------------------------
        while step < total_steps:
            batches = {j: to_device(data, sampler.indices(j, step), device) for j in partitions}
            maybe_kill(kill_at, rank, step)
            learning_rate = optimizer.param_groups[0]["lr"]  # the rate this step uses
            try:
                times = train_step(batches, step)
                optimizer_step(optimizer, train_step, times)
            except NonFiniteStep as err:
                run.stopped = f"{err}; the job stopped instead of training on non-finite values"
                break
            scheduler.step()
            step += 1
            run.record(times)

            last = step == total_steps
            evaluate_now = last or every(spec.evaluation.every_steps, step)
            save_now = last or every(spec.checkpoint.every_steps, step)
            evaluation = evaluate_model(train_step.module, data, device) if evaluate_now else None
            telemetry.report(
                step_report(
                    step,
                    times,
                    train_step.stats(),
                    attempt=attempt,
                    node=node,
                    compressor=train_step.compressor(),
                    learning_rate=learning_rate,
                    samples=sum(len(targets) for _, targets in batches.values()),
                    epoch=sampler.epoch(partitions[0], step - 1),
                    evaluation=evaluation,
                )
            )
            if last:  # flush the reports first, so the final metrics count what was sent and dropped
                telemetry.close(timeout=5.0)
            if evaluate_now or save_now:
                metrics = run.metrics(step, train_step, telemetry, evaluation)
                report(
                    metrics, step, rank, train_step, optimizer, scheduler, save=save_now, attempt=attempt,
                    world_size=world_size,
                )  # fmt: skip
        if run.stopped or start_step >= total_steps:  # stopped early, or restored a finished run
            evaluation = evaluate_model(train_step.module, data, device)
            metrics = run.metrics(step, train_step, telemetry, evaluation)
            # Ray Train hands back the metrics of the latest checkpoint, so stopping saves one too:
            # the state before the non-finite step, which was never applied
            report(
                metrics, step, rank, train_step, optimizer, scheduler, save=True, attempt=attempt,
                world_size=world_size,
            )  # fmt: skip
    finally:
        telemetry.close(timeout=5.0)


# --- pieces of the loop -------------------------------------------------------------------------


class RunState:
    """What the loop keeps across steps for its reports."""

    def __init__(self, start_step: int) -> None:
        self.start_step = start_step
        self.started = time.perf_counter()
        self.loss = float("nan")
        self.stragglers = 0
        self.wait_s = 0.0
        self.compute_s = 0.0
        self.stopped: str | None = None

    def record(self, times: StepTimes) -> None:
        if math.isfinite(times.loss):  # a straggler that dropped its work reports no loss
            self.loss = times.loss
        self.stragglers += len(times.stragglers)
        self.wait_s += times.wait_s
        self.compute_s += times.compute_s

    def metrics(
        self, step: int, train_step: Any, telemetry: Any, evaluation: tuple[float, float] | None
    ) -> dict[str, Any]:
        """This rank's metrics: the step, the last loss, times, the byte ledger and telemetry counters."""
        stats = train_step.stats()
        metrics: dict[str, Any] = {
            "step": step,
            "start_step": self.start_step,
            "loss": self.loss,
            "wall_seconds": time.perf_counter() - self.started,
            "compute_seconds": self.compute_s,
            "wait_seconds": self.wait_s,
            "stragglers": self.stragglers,
            "telemetry_sent": telemetry.sent,
            "telemetry_dropped": telemetry.dropped,
            **{key: stats[key] for key in LEDGER_KEYS},
        }
        if evaluation is not None:
            metrics["eval_loss"], metrics["accuracy"] = evaluation
        choices = train_step.compressor_choices()
        if choices:  # compression: auto; gradwire train's summary lists them
            metrics["compressor_choices"] = [list(choice) for choice in choices]
        if self.stopped:
            metrics["stopped"] = self.stopped
        return metrics


def job_policy(config: dict[str, Any] | None = None) -> JobPolicy | None:
    """The job's policy: ``config["policy"]`` (the JSON its driver found in the environment),
    else the environment's own (:data:`gradwire.policy.ENV`); ``None`` outside a coordinator."""
    text = (config or {}).get("policy")
    return JobPolicy.from_env({POLICY_ENV: text} if text else None)


def load_data(spec: JobSpec, policy: JobPolicy | None = None) -> Dataset:
    """The spec's dataset; its ``seed`` defaults to the job's seed where the dataset takes one.

    Under a coordinator's ``policy`` the spec is confined again first (:class:`PolicyError`: a
    file outside the data roots, an import path not allowed), and each file parameter is
    replaced by its resolved path, so what is opened is what was checked. Without a policy
    (``gradwire train`` on your own machine) ``module:function`` datasets are accepted.
    """
    params = dict(spec.data.params)
    if policy is not None:
        spec.confined(policy)
        for key in PATH_PARAMS & set(params):
            if isinstance(params[key], str):
                params[key] = resolve_under(params[key], policy.data_roots)
    allow = policy is None or policy.allow_import_paths
    factory = DATASETS.resolve(spec.data.dataset, allow_import_paths=allow)
    try:
        takes_seed = "seed" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature
        takes_seed = False
    if takes_seed:
        params.setdefault("seed", spec.seed)
    return get_dataset(spec.data.dataset, allow_import_paths=allow, **params)


def partition_labels(data: Dataset) -> torch.Tensor:
    """Labels for partitioning: a classifier's labels; one dummy label per sequence otherwise."""
    return data.y_train if data.y_train.dim() == 1 else torch.zeros(len(data.y_train), dtype=torch.int64)


def to_device(data: Dataset, indices: torch.Tensor, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return data.x_train[indices].to(device), data.y_train[indices].to(device)


def every(interval: int | None, step: int) -> bool:
    return interval is not None and step % interval == 0


def maybe_kill(fault: dict[str, Any], rank: int, step: int) -> None:
    """Fault injection: SIGKILL this process once (``fault["marker"]`` remembers it happened).

    ``fault["wait_s"]`` seconds pass first: Ray Train's controller takes in reported checkpoints
    when it polls the workers (every 2 s by default), so a worker lost sooner after a checkpoint
    restarts from the one before.
    """
    if not fault or fault.get("rank") != rank or fault.get("step") != step:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    time.sleep(float(fault.get("wait_s", 0.0)))
    marker.write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def step_report(
    step: int,
    times: StepTimes,
    stats: dict[str, Any],
    *,
    attempt: int,
    node: str,
    compressor: str,
    learning_rate: float,
    samples: int,
    epoch: int,
    evaluation: tuple[float, float] | None,
) -> pb.StepReport:
    """The step's ``StepReport`` (protos/telemetry.proto), the one shape it travels in from here
    to the coordinator's store and metrics; byte counters are running totals. The telemetry sink
    fills in ``job_id``, ``rank`` and ``wall_time`` (now)."""
    report = pb.StepReport(
        step=step,
        loss=times.loss,
        compute_s=times.compute_s,
        compress_s=times.compress_s,
        communicate_s=times.communicate_s,
        wait_s=times.wait_s,
        bytes_sent=int(stats["bytes_sent"]),
        bytes_uncompressed=int(stats["bytes_uncompressed"]),
        stragglers=times.stragglers,
        compressor=compressor,
        samples=samples,
        learning_rate=float(learning_rate),
        epoch=epoch,
        attempt=attempt,
        node_address=node,
    )
    if evaluation is not None:
        report.accuracy = evaluation[1]
    return report


def node_address() -> str:
    """The address of the node this worker runs on: Ray's node IP inside a Ray worker, else the
    host's own address (empty when it has none)."""
    import ray

    if ray.is_initialized():
        import ray.util

        return ray.util.get_node_ip_address()
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def make_optimizer(
    spec: OptimizerSpec, params: Any, *, total_steps: int | None = None
) -> torch.optim.Optimizer:
    """The spec's optimizer. ``onebit_adam`` needs ``total_steps`` (the job's steps) unless its
    ``freeze_step`` is written, and refuses a ``freeze_step`` that leaves no compressed step; its
    DDP hook is ``optimizer.comm_hook()`` (:class:`~gradwire.worker.steps.OptimizerHook`)."""
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    if spec.name != "onebit_adam":
        raise ValueError(f"optimizer.name: unknown optimizer {spec.name!r}")
    from gradwire.compressors.onebit_adam import OneBitAdam

    if total_steps is None and spec.freeze_step is None:
        raise ValueError(
            "optimizer.freeze_step: onebit_adam's default is 5 % of the job's steps, unknown here"
        )
    if total_steps is not None and spec.freeze_step is not None and spec.freeze_step >= total_steps:
        raise ValueError(
            f"optimizer.freeze_step={spec.freeze_step} leaves no compressed step in this job's "
            f"{total_steps} steps; need freeze_step < the steps"
        )
    return OneBitAdam(
        params,
        lr=spec.lr,
        weight_decay=spec.weight_decay,
        freeze_step=spec.freeze_step if total_steps is None else spec.onebit_freeze_step(total_steps),
        variance=spec.onebit_variance(),
        refresh_every=spec.refresh_every,
        space=spec.onebit_space(),
        compressor=spec.onebit_compressor(),
        compressor_params=spec.onebit_compressor_params(),
        warmup_dtype=spec.onebit_warmup_dtype(),
    )


def per_rank_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether each rank's optimizer state is its own (OneBitAdam: error-feedback residuals, and
    per-rank moments with variance 'local'), so each rank saves and loads its own."""
    from gradwire.compressors.onebit_adam import OneBitAdam

    return isinstance(optimizer, OneBitAdam)


def lr_factor(spec: OptimizerSpec, total_steps: int):
    """The learning-rate multiplier at each step: linear warm-up, then the spec's schedule."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        if spec.schedule == "cosine":
            progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if spec.schedule == "step":
            assert spec.step_size is not None
            return spec.gamma ** ((step - spec.warmup_steps) // spec.step_size)
        return 1.0

    return factor


@torch.no_grad()
def evaluate_model(module: nn.Module, data: Dataset, device: Any) -> tuple[float, float]:
    """(loss, accuracy) on the test split, without DDP's collectives."""
    module.eval()
    logits = module(data.x_test.to(device))
    targets = data.y_test.to(device)
    loss = float(loss_fn(logits, targets))
    accuracy = float((logits.argmax(dim=-1) == targets).float().mean())
    return loss, accuracy


def report(
    metrics: dict[str, Any],
    step: int,
    rank: int,
    train_step: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    save: bool,
    attempt: int = 0,
    world_size: int = 1,
) -> None:
    """``ray.train.report`` on every rank; with ``save``, each rank adds its files to the checkpoint
    (:func:`save_checkpoint`)."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(
            Path(folder), step, rank, train_step, optimizer, scheduler, attempt=attempt, world_size=world_size
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def save_checkpoint(
    out: Path,
    step: int,
    rank: int,
    train_step: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    attempt: int,
    world_size: int,
) -> None:
    """This rank's files of a checkpoint in ``out``: ``rank{rank}.pt`` (with the optimizer's state
    when it is per rank), and on rank 0 the model, ``optimizer.pt`` and ``progress.json`` (the step
    and the worker group's ``attempt``)."""
    per_rank = per_rank_optimizer(optimizer)
    own: dict[str, Any] = {"step": train_step.state_dict(), "rng": torch.get_rng_state()}
    if per_rank:
        own["optimizer"] = optimizer.state_dict()
    torch.save(own, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(train_step.module.state_dict(), out / "model.pt")
        shared = {
            "optimizer": None if per_rank else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "optimizer_ranks": world_size if per_rank else None,  # rank{r}.pt hold the optimizer
        }
        torch.save(shared, out / "optimizer.pt")
        (out / "progress.json").write_text(json.dumps({"step": step, "attempt": attempt}))


def load_checkpoint(
    folder: Path,
    rank: int,
    train_step: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    world_size: int,
) -> tuple[int, int]:
    """Restore what :func:`save_checkpoint` saved; returns the step to continue from and the
    worker-group attempt that saved it (0 for a checkpoint written before attempts were recorded).
    A per-rank optimizer state (onebit_adam) is loaded from this rank's own file, and only in a
    group of the size that saved it (``ValueError`` naming both sizes otherwise)."""
    saved = torch.load(folder / "optimizer.pt")
    ranks = saved.get("optimizer_ranks")
    if ranks is not None and ranks != world_size:
        raise ValueError(
            f"checkpoint {folder}: the optimizer state (onebit_adam: each rank's moments and "
            f"error-feedback residuals) was saved by {ranks} ranks, one file each, and this group has "
            f"{world_size}; resume with workers.count={ranks}"
        )
    if (ranks is not None) != per_rank_optimizer(optimizer):
        saved_kind = "per rank (onebit_adam)" if ranks is not None else "one for all ranks"
        raise ValueError(
            f"checkpoint {folder}: its optimizer state is {saved_kind}, and this job's optimizer "
            f"{type(optimizer).__name__} keeps {'one per rank' if ranks is None else 'one for all'}: "
            "resume with the optimizer that saved it"
        )
    train_step.module.load_state_dict(torch.load(folder / "model.pt", map_location="cpu"))
    own = folder / f"rank{rank}.pt"
    rank_file = own if own.exists() else folder / "rank0.pt"  # the world size changed
    state = torch.load(rank_file)
    optimizer.load_state_dict(saved["optimizer"] if ranks is None else state["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    train_step.load_state_dict(state["step"])
    if own.exists():
        torch.set_rng_state(state["rng"])
    progress = json.loads((folder / "progress.json").read_text())
    return int(progress["step"]), int(progress.get("attempt", 0))
