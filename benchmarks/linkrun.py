#!/usr/bin/env python
"""One rank of a data-parallel training run for the link benchmarks (run once per rank).

Every rank reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and GLOO_SOCKET_IFNAME) from the
environment, as ``benchmarks.netlab.Lab.run_ranks`` sets them, trains ``--model`` with DDP over
gloo and the gradient reduction ``--method``, and rank 0 writes ``--out`` (JSON):

    {"model", "method", "workers", "params", "step_seconds": [slowest rank's time, per timed step],
     "bytes_per_step", "wire_bytes_per_step", "evals": [{"step", "wall_seconds", "test_accuracy",
     "test_loss"}], "target_accuracy", "compress_seconds_per_step", "communicate_seconds_per_step"}

Methods: ``allreduce`` (DDP's own), ``compute-only`` (no communication at all: the floor),
``torch-powersgd:R`` (torch's ``powerSGD_hook``; one bucket, with several it deadlocks on gloo; gradwire
hooks get the same one bucket unless ``--overlap``),
and gradwire's ``fp16``, ``bf16``, ``powersgd:R``, ``topk:ef``, ``topk:ef21``, ``topk:econtrol``
(1 %), ``qsgd``, ``none``; a gradwire method with ``+overlap`` (``powersgd:2+overlap``) runs the hook
with ``overlap=True`` on 1 MB buckets, so a layer whose gradient is ready early is reduced while
backward goes on. Evaluation pauses the clock: ``wall_seconds`` is training time only.

``--methods A,B,C`` trains one model per method in the same processes, the methods taking turns
``--turn`` steps at a time (warm-up first), and writes ``{"runs": [one record per method]}``: every
method, and the ``compute-only`` floor, then sees the same drift of a shared machine
(``benchmarks/costmodel.py`` measures this way).

    python -m benchmarks.netlab --workers 4 --rate 100mbit --topology shared -- \\
        python benchmarks/linkrun.py --model digits_cnn --method powersgd:2 --steps 30 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from gradwire.compressors import make_hook
from gradwire.compressors.ledger import ring_all_reduce_bytes
from gradwire.worker.datasets import Dataset, get_dataset
from gradwire.worker.models import build_model


class DigitsCNN(nn.Module):
    """1.07 M parameters: two 3×3 convs (32, 64 channels) on the 8×8 image, then a 4096→256→10 MLP.
    Most parameters sit in the first linear layer, whose gradient is ready early in backward, while
    most of backward's compute is in the convolutions that follow it."""

    def __init__(self, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Sequential(nn.Linear(64 * 64, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


#: The two workloads: a 1.07 M-parameter CNN on 8×8 digits (SGD) and a small causal transformer
#: LM on tiny_text (Adam). Sizes chosen so that communication matters on a 100 Mbit/s link.
WORKLOADS: dict[str, dict[str, Any]] = {
    "digits_cnn": {
        "dataset": ("digits", {}),
        "model": (DigitsCNN, {}),
        "optimizer": ("sgd", 0.05),
        "target": 0.95,
    },
    "tiny_lm": {
        "dataset": ("tiny_text", {"context": 32, "num_sequences": 4096}),
        "model": ("transformer_lm", {"d_model": 128, "layers": 4, "heads": 4}),
        "optimizer": ("adam", 0.003),
        "target": 0.55,
    },
}

#: gradwire methods: registry name and parameters.
GRADWIRE: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "topk:ef": ("topk", {"ratio": 0.01, "feedback": "ef"}),
    "topk:ef21": ("topk", {"ratio": 0.01, "feedback": "ef21"}),
    "topk:econtrol": ("topk", {"ratio": 0.01, "feedback": "econtrol"}),
    "qsgd": ("qsgd", {}),
}
TORCH_START_ITER = 2  # torch's hook needs > 1 with error feedback or warm start
ONE_BUCKET_MB = 1024.0


OVERLAP_SUFFIX = "+overlap"
#: DDP bucket cap of a ``+overlap`` method: small enough that the CNN's large linear layer, whose
#: gradient is ready first, is a bucket of its own, reduced while backward computes the convolutions
OVERLAP_BUCKET_MB = 1.0


def split_overlap(method: str) -> tuple[str, bool]:
    """``("powersgd:2", True)`` for ``powersgd:2+overlap``: a gradwire method with the hook's
    ``overlap=True`` and several buckets (torch's hook deadlocks on gloo with more than one)."""
    if method.endswith(OVERLAP_SUFFIX):
        return method[: -len(OVERLAP_SUFFIX)], True
    return method, False


def parse_method(method: str) -> tuple[str, dict[str, Any]]:
    """``(kind, params)``: kind is allreduce, compute-only, torch-powersgd or a registry name."""
    method, overlap = split_overlap(method)
    if overlap and (method in ("allreduce", "compute-only") or method.startswith("torch-")):
        raise ValueError(f"{OVERLAP_SUFFIX!r} is for gradwire methods, not {method!r}")
    if method in ("allreduce", "compute-only"):
        return method, {}
    if method in GRADWIRE:
        return GRADWIRE[method]
    name, _, rank = method.partition(":")
    if name in ("powersgd", "torch-powersgd") and rank.isdigit() and int(rank) >= 1:
        return name, {"rank": int(rank)}
    known = ["allreduce", "compute-only", "torch-powersgd:R", "powersgd:R", *GRADWIRE]
    raise ValueError(
        f"unknown method {method!r}; expected one of {', '.join(known)} (gradwire's with an optional "
        f"{OVERLAP_SUFFIX!r})"
    )


def torch_psgd_bytes(model: nn.Module, rank: int) -> int:
    """Payload bytes torch's hook sends per step after warm-up, by its own rule: a matrix is
    compressed when ``a·b > 2·r·(a+b)`` (min_compression_rate 2), the rest is all-reduced."""
    total = 0
    for p in model.parameters():
        a = p.shape[0]
        b = p.numel() // a
        if p.ndim > 1 and a * b > 2 * min(rank, a, b) * (a + b):
            total += 4 * min(rank, a, b) * (a + b)
        else:
            total += 4 * p.numel()
    return total


def attach(ddp: DistributedDataParallel, kind: str, params: dict[str, Any], overlap: bool = False) -> Any:
    """Register the method's comm hook; returns gradwire's hook state (or None)."""
    if kind == "compute-only":
        ddp.register_comm_hook(None, noop_hook)
    elif kind == "torch-powersgd":
        state = torch_psgd.PowerSGDState(
            process_group=None, matrix_approximation_rank=params["rank"],
            start_powerSGD_iter=TORCH_START_ITER, use_error_feedback=True, warm_start=True,
        )  # fmt: skip
        ddp.register_comm_hook(state, torch_psgd.powerSGD_hook)
    elif kind != "allreduce":
        state, hook = make_hook(kind, overlap=overlap, **params)
        ddp.register_comm_hook(state, hook)
        return state
    return None


def loss_and_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    logits = model(x)
    if logits.ndim == 3:  # language model: per next token
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    loss = F.cross_entropy(logits, y)
    return loss, int((logits.argmax(-1) == y).sum()), int(y.numel())


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    model.eval()
    loss, correct, count = loss_and_correct(model, data.x_test, data.y_test)
    model.train()
    return correct / count, float(loss)


class Trainer:
    """One method's DDP model, hook and optimizer; ``step()`` trains one batch and returns its seconds."""

    def __init__(self, args: argparse.Namespace, data: Dataset, method: str, rank: int) -> None:
        work = WORKLOADS[args.model]
        self.method, (self.kind, self.params) = method, parse_method(method)
        if self.kind == "powersgd":
            # by default gradwire's PowerSGD starts as torch's hook must: TORCH_START_ITER plain steps
            # (with Adam, the LM's optimizer, starting compressed from step 0 slows learning markedly)
            self.params = {**self.params, "start_iter": args.psgd_start}
        if self.kind == "auto":  # auto is told the optimizer, as a job's spec tells it
            self.params = {**self.params, "optimizer": work["optimizer"][0]}
        self.data, self.batch = data, args.batch
        torch.manual_seed(args.seed)  # the same initial model on every rank (and for every method)
        model_name, model_params = work["model"]
        if isinstance(model_name, str):
            self.model = build_model(model_name, data.num_features, data.num_classes, **model_params)
        else:
            self.model = model_name(data.num_features, data.num_classes, **model_params)
        # torch's hook deadlocks on gloo with several buckets; gradwire's hooks get the same one bucket
        # (fewest collectives per step) unless --overlap or --bucket-mb say otherwise
        overlap = args.overlap or split_overlap(method)[1]
        if args.bucket_mb is not None:
            cap = args.bucket_mb
        elif split_overlap(method)[1]:
            cap = OVERLAP_BUCKET_MB
        else:
            cap = ONE_BUCKET_MB if self.kind != "allreduce" and not overlap else None
        self.ddp = DistributedDataParallel(self.model, bucket_cap_mb=cap)
        self.state = attach(self.ddp, self.kind, self.params, overlap)
        opt_name, lr = work["optimizer"]
        lr = args.lr or lr
        self.opt = (torch.optim.SGD(self.ddp.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
                    else torch.optim.Adam(self.ddp.parameters(), lr=lr))  # fmt: skip
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own batches
        self.step_times: list[float] = []
        self.before: dict[str, float] | None = None  # hook counters when the timed steps began

    def step(self) -> float:
        idx = torch.randint(len(self.data.y_train), (self.batch,), generator=self.gen)
        started = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss, _, _ = loss_and_correct(self.ddp, self.data.x_train[idx], self.data.y_train[idx])
        loss.backward()
        self.opt.step()
        return time.perf_counter() - started

    def start_timing(self) -> None:
        if self.state is not None:
            self.before = self.state.stats()

    def record(self, args: argparse.Namespace, world: int, evals: list[dict[str, float]]) -> dict[str, Any]:
        """The run's JSON record (a collective: every rank calls it, in the same order)."""
        per_rank: list[list[float] | None] = [None] * world
        dist.all_gather_object(per_rank, self.step_times)
        slowest = [max(times) for times in zip(*per_rank)]  # type: ignore[arg-type]
        numel = sum(p.numel() for p in self.model.parameters())
        steps = len(self.step_times)
        hook_seconds = {"compress_seconds": 0.0, "communicate_seconds": 0.0}
        if self.state is not None:
            after, before = self.state.stats(), self.before or {}
            payload = (after["bytes_sent"] - before.get("bytes_sent", 0.0)) / steps
            wire = (after["wire_bytes_sent"] - before.get("wire_bytes_sent", 0.0)) / steps
            for key in hook_seconds:
                hook_seconds[key] = (after[key] - before.get(key, 0.0)) / steps
        elif self.kind == "compute-only":
            payload = wire = 0.0
        else:
            payload = float(torch_psgd_bytes(self.model, self.params["rank"]) if self.kind == "torch-powersgd"
                            else 4 * numel)  # fmt: skip
            wire = ring_all_reduce_bytes(int(payload), world)
        ranks_hook: list[dict[str, float] | None] = [None] * world
        dist.all_gather_object(ranks_hook, hook_seconds)
        return {
            "model": args.model, "method": self.method, "workers": world, "params": numel,
            "batch_per_rank": args.batch, "warmup": args.warmup, "steps": steps,
            "step_seconds": slowest, "bytes_per_step": payload, "wire_bytes_per_step": wire,
            "evals": evals, "target_accuracy": WORKLOADS[args.model]["target"],
            # gradwire hooks: per step and rank (mean over ranks): compression math, and launch to
            # completion of the collectives (PowerSGD's Q-round math included)
            **{f"{key}_per_step": sum(h[key] for h in ranks_hook) / world for key in hook_seconds},  # type: ignore[index]
        }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Train ``--method`` (or, with ``--methods``, each method in turn ``--turn`` steps at a time: the
    machine's drift falls on all of them alike). Rank 0 returns the record (``{"runs": [...]}`` with
    ``--methods``)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=dt.timedelta(seconds=300))
    data_name, data_params = WORKLOADS[args.model]["dataset"]
    data = get_dataset(data_name, seed=args.seed, **data_params)
    trainers = [Trainer(args, data, method, rank) for method in args.methods or [args.method]]
    evals: list[dict[str, float]] = []
    if args.methods:
        for t in trainers:
            for _ in range(args.warmup):
                t.step()
            t.start_timing()
        for first in range(0, args.steps, args.turn):
            for t in trainers:
                t.step_times += [t.step() for _ in range(min(args.turn, args.steps - first))]
    else:
        t, wall = trainers[0], 0.0
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                t.start_timing()
            elapsed = t.step()
            if step >= args.warmup:
                t.step_times.append(elapsed)
            wall += elapsed
            done = step + 1
            if args.eval_every and (done % args.eval_every == 0 or done == args.warmup + args.steps):
                accuracy, test_loss = evaluate(t.model, data)
                evals.append(
                    {"step": done, "wall_seconds": wall, "test_accuracy": accuracy, "test_loss": test_loss}
                )
                dist.barrier()  # every rank evaluated; the clock starts again together
    records = [t.record(args, world, evals) for t in trainers]
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"runs": records} if args.methods else records[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(WORKLOADS), default="digits_cnn")
    parser.add_argument("--method", default="allreduce")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="examples per rank and step")
    parser.add_argument("--eval-every", type=int, default=0, help="0: no evaluation")
    parser.add_argument("--lr", type=float, default=None, help="default: the workload's")
    parser.add_argument("--bucket-mb", type=float, default=None, help="DDP bucket cap (default: DDP's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap", action="store_true", help="gradwire: reduce buckets in a thread")
    parser.add_argument("--psgd-start", type=int, default=TORCH_START_ITER,
                        help="gradwire PowerSGD: plain all-reduced steps first (default: as torch's hook)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated: train these in turn, --turn steps each (no evaluation)")
    parser.add_argument("--turn", type=int, default=2, help="--methods: steps per method and turn")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",") if args.methods else None
    for method in args.methods or [args.method]:
        try:
            parse_method(method)  # fail before any rank connects
        except ValueError as err:
            parser.error(str(err))
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1 or args.turn < 1:
        parser.error("--steps, --turn, --batch and --threads must be >= 1 and --warmup >= 0")
    if args.psgd_start < 0:
        parser.error(f"--psgd-start must be >= 0, not {args.psgd_start}")
    if args.methods and args.eval_every:
        parser.error("--eval-every needs a single --method")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    if result is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


def exit_now() -> None:
    """Leave a finished rank process without the interpreter's teardown: with torch 2.13, gloo
    sometimes aborts there after ``destroy_process_group`` ("terminate called without an active
    exception", with torch's own comm hooks too; pytorch/pytorch#190489), which would fail a run whose
    results are already written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_now()
