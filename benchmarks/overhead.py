"""gradwire's per-step overhead on Ray Train: the runtime with compressor ``none`` vs plain DDP.

Both arms are Ray Train ``TorchTrainer`` fits of the same job on the same loopback Ray (2 workers,
gloo): the same data, batches (:class:`~gradwire.worker.sampler.PartitionSampler`), model,
optimizer and schedule.

* **gradwire** — :func:`gradwire.worker.runtime.train_loop`: DDP with the gradwire hook and
  compressor ``none`` (the byte ledger, non-finite detection), per-step measurement and a
  telemetry report per step (JSONL sink; the gRPC client queues the same way);
* **plain DDP** — a loop written the way a user would without gradwire: Ray Train's
  ``prepare_model`` (DDP with torch's built-in all-reduce), forward, backward, step.

Each arm times its own loop from the first step to the last (setup, Ray start-up and the final
checkpoint are outside). Arms alternate, ``--repeats`` times each, and the ratio of medians is
quoted: the machine is shared and noisy, so only side-by-side numbers mean anything.

    python benchmarks/overhead.py [--steps 300] [--repeats 3] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from gradwire.spec import JobSpec  # noqa: E402

BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"

WORKLOADS = {
    # name: (model params, batch size) on digits; the wider MLP has a more realistic step time
    "mlp-64x64": ({"hidden": [64, 64]}, 32),
    "mlp-512x512": ({"hidden": [512, 512]}, 128),
}


def job(model_params: dict[str, Any], batch_size: int, steps: int, storage: str) -> JobSpec:
    return JobSpec.from_dict(
        {
            "name": "overhead",
            "model": {"name": "mlp", "params": model_params},
            "data": {"dataset": "digits", "batch_size": batch_size},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "steps": steps,
            "workers": {"count": 2, "cpus_per_worker": 1},
            "compression": {"name": "none"},
            "checkpoint": {"storage": storage},
        }
    )


def plain_ddp_loop(config: dict[str, Any]) -> None:
    """The baseline: the same job without gradwire (torch's own DDP all-reduce, no telemetry)."""
    import ray.train
    import ray.train.torch
    import torch

    from gradwire.worker.models import build_model
    from gradwire.worker.partition import partition_indices
    from gradwire.worker.runtime import evaluate_model, load_data, make_optimizer, partition_labels, to_device
    from gradwire.worker.sampler import PartitionSampler
    from gradwire.worker.steps import loss_fn

    spec = JobSpec.from_dict(config["spec"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    data = load_data(spec)
    shares = partition_indices(partition_labels(data), world_size, seed=spec.seed)
    sampler = PartitionSampler(shares, spec.data.batch_size, spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(spec.optimizer, model.parameters())
    device = ray.train.torch.get_device()

    started = time.perf_counter()
    for step in range(spec.steps):
        x, y = to_device(data, sampler.indices(rank, step), device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    evaluate_model(model.module, data, device)  # the gradwire arm evaluates after its last step too
    seconds = time.perf_counter() - started
    metrics = {"wall_seconds": seconds, "step": spec.steps, "loss": float(loss)}
    # Ray Train (V2) hands back the metrics of the latest checkpointed report
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "done.txt").write_text(str(spec.steps))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def fit_plain(spec: JobSpec) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        plain_ddp_loop,
        train_loop_config={"spec": spec.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=spec.workers.count, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"plain-{time.time_ns()}", storage_path=spec.checkpoint.storage),
    )
    return dict(trainer.fit().metrics or {})


def fit_gradwire(spec: JobSpec) -> dict[str, Any]:
    from gradwire.worker.launch import run_job

    unique = spec.with_overrides([f"name=gradwire-{time.time_ns() % 10**9}"])
    return run_job(unique)


def measure(steps: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gw-overhead-") as storage:
        for name, (params, batch) in WORKLOADS.items():
            spec = job(params, batch, steps, storage)
            times: dict[str, list[float]] = {"plain": [], "gradwire": []}
            fit_plain(spec)  # warm-up: first fits pay for imports and worker start-up
            for _ in range(repeats):
                for arm, fit in (("plain", fit_plain), ("gradwire", fit_gradwire)):
                    metrics = fit(spec)
                    per_step = float(metrics["wall_seconds"]) / steps
                    times[arm].append(per_step)
                    print(f"{name:12s} {arm:9s} {1e3 * per_step:7.3f} ms/step", flush=True)
            plain, ours = statistics.median(times["plain"]), statistics.median(times["gradwire"])
            rows.append({"workload": name, "plain_ms": 1e3 * plain, "gradwire_ms": 1e3 * ours, **times})
    return rows


def render(rows: list[dict[str, Any]], steps: int, repeats: int) -> str:
    lines = [
        BEGIN,
        "## Runtime overhead on Ray Train (`benchmarks/overhead.py`)",
        "",
        f"Measured {dt.date.today()} on {platform.machine()} ({os.cpu_count()} shared cores), "
        f"Python {platform.python_version()}; 2 Ray Train workers (gloo, loopback), digits, {steps} steps "
        f"per fit, arms alternated, median of {repeats} fits each. The gradwire arm is the real runtime "
        "with compressor `none` (hook, byte ledger, non-finite check, one telemetry report per step); "
        "the plain arm is DDP with torch's own all-reduce and nothing else. Loop time only (Ray "
        "start-up, data loading and checkpoints excluded).",
        "",
        "| workload | plain DDP ms/step (min–max) | gradwire `none` ms/step (min–max) | median ratio − 1 |",
        "|:---|---:|---:|---:|",
    ]
    noisy = False
    for row in rows:
        overhead = row["gradwire_ms"] / row["plain_ms"] - 1
        cells = [row["workload"]]
        for arm in ("plain", "gradwire"):
            times = [1e3 * t for t in row[arm]]
            cells.append(f"{statistics.median(times):.2f} ({min(times):.2f}–{max(times):.2f})")
            noisy |= (max(times) - min(times)) / statistics.median(times) > 0.06
        cells.append(f"{100 * overhead:+.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    if noisy:
        lines += [
            "",
            "The spread between fits of the same arm is wider than the 3 % target: on this shared "
            "machine the run does not resolve gradwire's overhead either way. What gradwire adds per "
            "step, measured in-process: one telemetry report (30–40 µs), the ledger and step "
            "bookkeeping (a few µs), and for `none` the all-reduce is DDP's own asynchronous one plus a "
            "float64 sum of the bucket for the non-finite check.",
        ]
    lines += ["", "Command: `python benchmarks/overhead.py`", END, ""]
    return "\n".join(lines)


def write(out: Path, section: str) -> None:
    write_section(out, section, BEGIN, END)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    from gradwire.worker.launch import start_local_ray

    start_local_ray(num_cpus=2)
    rows = measure(args.steps, args.repeats)
    section = render(rows, args.steps, args.repeats)
    print(section)
    write(args.out, section)


if __name__ == "__main__":
    main()
