"""The train loop that Ray Train's ``TorchTrainer`` runs on every worker.

One readable loop, top to bottom: set up (spec, data shard, model, DDP with the gradwire
hook, optimizer, resume), then per step forward → backward (the hook compresses and
reduces the gradients) → optimizer step, with evaluation and checkpoints at the steps the
spec asks for. Metrics reported to Ray are rank 0's; the byte counters come from the
hook's ledger (``HookState.stats()``).

A checkpoint directory holds ``model.pt`` and ``optimizer.pt`` (rank 0; identical on every
rank under DDP), ``compressor-rank{r}.pt`` (each rank's own compressor state: error-feedback
residuals are per rank) and ``progress.json`` (the step reached).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradwire.compressors import make_hook
from gradwire.spec import JobSpec, OptimizerSpec
from gradwire.worker.datasets import Dataset, get_dataset
from gradwire.worker.models import build_model
from gradwire.worker.partition import partition_indices

LEDGER_KEYS = ("bytes_sent", "bytes_uncompressed", "compress_seconds", "communicate_seconds")


def train_loop(config: dict[str, Any]) -> None:
    """Run one job's share on this worker; ``config["spec"]`` is a JobSpec as a JSON-like dict."""
    import ray.train
    import ray.train.torch

    spec = JobSpec.from_dict(config["spec"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    # --- data: the whole set on every worker, then this rank's share ---------------------------
    data = get_dataset(spec.data.dataset, **spec.data.params)
    partition = spec.data.partition
    shares = partition_indices(
        data.y_train, world_size, kind=partition.kind, alpha=getattr(partition, "alpha", None), seed=spec.seed
    )
    device = ray.train.torch.get_device()  # cpu, or this worker's GPU
    x_local, y_local = data.x_train[shares[rank]].to(device), data.y_train[shares[rank]].to(device)
    batch_size = min(spec.data.batch_size, len(y_local))
    batches_per_epoch = len(y_local) // batch_size
    # every rank must take the same number of steps (DDP all-reduces each one), so an epoch
    # budget is counted on the smallest share
    smallest_share = min(len(share) for share in shares)
    total_steps = spec.steps or spec.epochs * max(1, smallest_share // batch_size)

    # --- model: same init on every rank, wrapped in DDP with the gradwire hook -----------------
    torch.manual_seed(spec.seed)
    model = build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)
    model = ray.train.torch.prepare_model(model)
    hook_state, hook = make_hook(spec.compression.name, **spec.compression.params())
    model.register_comm_hook(hook_state, hook)
    optimizer = make_optimizer(spec.optimizer, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(spec.optimizer, total_steps))

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = load_checkpoint(Path(folder), rank, model, optimizer, scheduler, hook_state)
    start_step = step

    # --- the loop ------------------------------------------------------------------------------
    generator = torch.Generator().manual_seed(spec.seed * 1000 + rank)
    order = torch.randperm(len(y_local), generator=generator).to(device)
    started = time.perf_counter()
    loss = torch.tensor(float("nan"))
    eval_every = spec.evaluation.every_steps
    checkpoint_every = spec.checkpoint.every_steps
    while step < total_steps:
        position = (step % batches_per_epoch) * batch_size
        if position == 0:
            order = torch.randperm(len(y_local), generator=generator).to(device)
        batch = order[position : position + batch_size]

        model.train()
        loss = F.cross_entropy(model(x_local[batch]), y_local[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the hook compresses and averages the gradients here
        optimizer.step()
        scheduler.step()
        step += 1

        last = step == total_steps
        evaluate_now = last or (eval_every is not None and step % eval_every == 0)
        save_now = last or (checkpoint_every is not None and step % checkpoint_every == 0)
        if evaluate_now or save_now:
            metrics = progress(
                step, start_step, loss, started, hook_state, model, data, evaluate=evaluate_now
            )
            report(metrics, step, rank, model, optimizer, scheduler, hook_state, save=save_now)

    if start_step >= total_steps:  # restored a run that had already finished: report where it stands
        metrics = progress(step, start_step, loss, started, hook_state, model, data, evaluate=True)
        report(metrics, step, rank, model, optimizer, scheduler, hook_state, save=True)


# --- pieces of the loop -------------------------------------------------------------------------


def make_optimizer(spec: OptimizerSpec, params: Any) -> torch.optim.Optimizer:
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


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
def test_accuracy(model: nn.Module, data: Dataset) -> float:
    model.eval()
    module = getattr(model, "module", model)  # evaluate without DDP's collectives
    device = next(module.parameters()).device
    predicted = module(data.x_test.to(device)).argmax(dim=1).cpu()
    return float((predicted == data.y_test).float().mean())


def progress(
    step: int,
    start_step: int,
    loss: torch.Tensor,
    started: float,
    hook_state: Any,
    model: nn.Module,
    data: Dataset,
    *,
    evaluate: bool,
) -> dict[str, Any]:
    """This rank's metrics: the step, the last loss, wall time and the hook's byte ledger."""
    stats = hook_state.stats()
    metrics = {
        "step": step,
        "start_step": start_step,
        "loss": float(loss.detach()),
        "wall_seconds": time.perf_counter() - started,
        **{key: stats[key] for key in LEDGER_KEYS},
    }
    if evaluate:
        metrics["accuracy"] = test_accuracy(model, data)
    return metrics


def report(
    metrics: dict[str, Any],
    step: int,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hook_state: Any,
    *,
    save: bool,
) -> None:
    """``ray.train.report`` on every rank; with ``save``, each rank adds its files to the checkpoint."""
    import ray.train

    if not save:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        torch.save(hook_state.state_dict(), out / f"compressor-rank{rank}.pt")
        if rank == 0:
            torch.save(getattr(model, "module", model).state_dict(), out / "model.pt")
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                out / "optimizer.pt",
            )
            (out / "progress.json").write_text(json.dumps({"step": step}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def load_checkpoint(
    folder: Path,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hook_state: Any,
) -> int:
    """Restore what :func:`report` saved; returns the step to continue from."""
    getattr(model, "module", model).load_state_dict(torch.load(folder / "model.pt", map_location="cpu"))
    saved = torch.load(folder / "optimizer.pt")
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    own = folder / f"compressor-rank{rank}.pt"
    compressor_file = own if own.exists() else folder / "compressor-rank0.pt"  # world size changed
    hook_state.load_state_dict(torch.load(compressor_file))
    return int(json.loads((folder / "progress.json").read_text())["step"])
