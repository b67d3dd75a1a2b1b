"""gradwire's per-step overhead on Ray Train: the runtime with compressor ``none`` vs plain DDP,
the arms taking turns inside the same worker processes.

One Ray Train ``TorchTrainer`` fit (2 workers, gloo, loopback). Every worker builds three copies of
the same job (same data, batches from :class:`~gradwire.worker.sampler.PartitionSampler`, model
initialisation, optimizer) and runs them in turns of ``--turn`` steps, the order alternating every
round (A B C D, then D C B A), so the drift of a shared machine falls on every arm alike:

* **plain** — what a user writes without gradwire: Ray Train's ``prepare_model`` (DDP with torch's
  built-in all-reduce), forward, backward, optimizer step;
* **torch-hook** — the same loop with torch's own Python ``allreduce_hook`` registered: what any
  Python comm hook costs over DDP's built-in C++ all-reduce;
* **hook** — the same loop with gradwire's DDP hook for ``none`` registered (byte ledger, the
  non-finite check): what the hook alone costs;
* **runtime** — the runtime's own step pieces, in the order :func:`gradwire.worker.runtime.train_loop`
  runs them: :class:`~gradwire.worker.steps.DdpStep` (the hook, its counters before and after),
  optimizer and learning-rate schedule, :class:`~gradwire.worker.runtime.RunState`, and one telemetry
  report per step (:func:`~gradwire.worker.runtime.step_report` into the JSONL sink the runtime uses
  without a coordinator).

Each turn is timed on every rank; a turn's time is the slowest rank's. The overhead is the median
over rounds of ``runtime turn / plain turn`` (paired within a round), with a distribution-free 95 %
interval of that median (order statistics of the binomial), so "within ±3 %" is a claim the run
can check. The hook arm splits the overhead into hook and loop bookkeeping.

    python benchmarks/overhead.py [--rounds 40] [--turn 10] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
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
ARMS = ("plain", "torch-hook", "hook", "runtime")
#: what the runtime arm's step is made of, timed inside it (seconds per step, summed over its steps)
PIECES = ("ddp_step", "optimizer", "report")
#: the target: the runtime costs at most this much over plain DDP
TARGET = 0.03

WORKLOADS = {
    # name: (model params, batch size) on digits; the wider MLP has a more realistic step time
    "mlp-64x64": ({"hidden": [64, 64]}, 32),
    "mlp-512x512": ({"hidden": [512, 512]}, 128),
    "mlp-2048x2048": ({"hidden": [2048, 2048]}, 128),  # 4.3 M parameters: a step of tens of ms
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


def arm_order(round_index: int) -> tuple[str, ...]:
    """A B C D on even rounds, D C B A on odd ones: no arm always runs first after a switch."""
    return ARMS if round_index % 2 == 0 else ARMS[::-1]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: the order statistics ``k`` and
    ``n − 1 − k`` with ``P(Binomial(n, ½) ≤ k) ≤ (1 − confidence) / 2``, k as large as allowed.
    With fewer than 6 values no such interval exists and the whole range is returned."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    tail, k, cumulative = (1 - confidence) / 2, -1, 0.0
    for i in range(n):
        cumulative += math.comb(n, i) / 2**n
        if cumulative > tail:
            break
        k = i
    if k < 0:
        return ordered[0], ordered[-1]
    return ordered[k], ordered[n - 1 - k]


def turns_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the three arms in turns; rank 0 reports every turn's slowest-rank time."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from gradwire.compressors import make_hook
    from gradwire.worker.models import build_model
    from gradwire.worker.partition import partition_indices
    from gradwire.worker.runtime import (
        RunState,
        load_data,
        lr_factor,
        make_optimizer,
        node_address,
        partition_labels,
        step_report,
        to_device,
    )
    from gradwire.worker.sampler import PartitionSampler
    from gradwire.worker.steps import DdpStep, loss_fn, optimizer_step
    from gradwire.worker.telemetry import make_telemetry

    spec = JobSpec.from_dict(config["spec"])
    rounds, turn = int(config["rounds"]), int(config["turn"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    data = load_data(spec)
    shares = partition_indices(partition_labels(data), world_size, seed=spec.seed)
    sampler = PartitionSampler(shares, spec.data.batch_size, spec.seed)

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(spec.seed)
        return build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)

    plain = ray.train.torch.prepare_model(fresh_model())
    plain_opt = make_optimizer(spec.optimizer, plain.parameters())
    torch_hooked = ray.train.torch.prepare_model(fresh_model())
    torch_hooked.register_comm_hook(None, default_hooks.allreduce_hook)
    torch_hooked_opt = make_optimizer(spec.optimizer, torch_hooked.parameters())
    hooked = ray.train.torch.prepare_model(fresh_model())
    hook_state, hook = make_hook(spec.compression.name, **spec.compression.params())
    hooked.register_comm_hook(hook_state, hook)
    hooked_opt = make_optimizer(spec.optimizer, hooked.parameters())
    runtime = DdpStep(fresh_model(), spec.compression, ray.train.torch.prepare_model, rank=rank)
    runtime_opt = make_optimizer(spec.optimizer, runtime.module.parameters())
    total = 2 * rounds * turn  # the schedule's horizon: the steps the runtime arm takes, and more
    scheduler = torch.optim.lr_scheduler.LambdaLR(runtime_opt, lr_factor(spec.optimizer, total))
    run_dir = tempfile.mkdtemp(prefix="gw-overhead-")
    telemetry = make_telemetry(None, "overhead", rank, run_dir=run_dir)
    run, node = RunState(start_step=0), node_address()
    steps = dict.fromkeys(ARMS, 0)
    pieces = dict.fromkeys(PIECES, 0.0)

    def plain_step(model: Any, optimizer: Any, step: int) -> None:
        x, y = to_device(data, sampler.indices(rank, step), device)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def runtime_step(step: int) -> None:
        started = time.perf_counter()
        batches = {rank: to_device(data, sampler.indices(rank, step), device)}
        times = runtime(batches, step)
        stepped = time.perf_counter()
        learning_rate = runtime_opt.param_groups[0]["lr"]
        optimizer_step(runtime_opt, runtime, times)
        scheduler.step()
        optimised = time.perf_counter()
        run.record(times)
        telemetry.report(
            step_report(
                step + 1, times, runtime.stats(), attempt=0, node=node, compressor=spec.compression.name,
                learning_rate=learning_rate, samples=len(batches[rank][1]),
                epoch=sampler.epoch(rank, step), evaluation=None,
            )
        )  # fmt: skip
        pieces["ddp_step"] += stepped - started
        pieces["optimizer"] += optimised - stepped
        pieces["report"] += time.perf_counter() - optimised

    def one(arm: str) -> None:
        step = steps[arm]
        if arm == "plain":
            plain_step(plain, plain_opt, step)
        elif arm == "torch-hook":
            plain_step(torch_hooked, torch_hooked_opt, step)
        elif arm == "hook":
            plain_step(hooked, hooked_opt, step)
        else:
            runtime_step(step)
        steps[arm] = step + 1

    for arm in ARMS:  # warm-up: DDP's bucket rebuild after the first step, allocator, caches
        for _ in range(max(3, turn)):
            one(arm)
    pieces = dict.fromkeys(PIECES, 0.0)
    mine: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for index in range(rounds):
        for arm in arm_order(index):
            started = time.perf_counter()
            for _ in range(turn):
                one(arm)
            mine[arm].append((time.perf_counter() - started) / turn)
    timed = rounds * turn
    timed_pieces = {k: v / timed for k, v in pieces.items()}
    profile: list[dict[str, Any]] = []
    profile_steps = int(config.get("profile_steps", 0))
    if profile_steps:  # where the runtime arm's time goes: cProfile over more of its steps, every rank
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(profile_steps):
            one("runtime")
        profiler.disable()
        profile = profile_rows(pstats.Stats(profiler), profile_steps)
    telemetry.close(timeout=5.0)
    every: list[Any] = [None] * world_size
    dist.all_gather_object(every, mine)
    slowest = {arm: [max(r[arm][i] for r in every) for i in range(rounds)] for arm in ARMS}
    metrics = {"turns": slowest, "pieces": timed_pieces, "profile": profile,
               "telemetry_sent": telemetry.sent, "hook_steps": hook_state.stats()["steps"]}  # fmt: skip
    # Ray Train (V2) hands back the metrics of the latest checkpointed report
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "done.txt").write_text("done")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def profile_rows(stats: Any, steps: int, top: int = 10, ours_ms: float = 0.01) -> list[dict[str, Any]]:
    """From a cProfile run, by inclusive time: the ``top`` functions, and every function of this
    repository that took at least ``ours_ms`` per step (calls, own and inclusive ms per step)."""
    rows = []
    for (filename, _line, name), (_, calls, own, inclusive, _) in stats.stats.items():
        path, ours = filename.replace("\\", "/"), False
        if "/site-packages/" in path:  # a library's (also from a virtual environment inside the repository)
            path = path.split("/site-packages/", 1)[1]
        elif path.startswith(str(ROOT) + "/"):
            path, ours = path[len(str(ROOT)) + 1 :], True
        rows.append({"function": f"{path}:{name}" if path != "~" else name, "calls": calls / steps,
                     "own_ms": 1e3 * own / steps, "inclusive_ms": 1e3 * inclusive / steps,
                     "ours": ours})  # fmt: skip
    rows.sort(key=lambda r: -r["inclusive_ms"])
    return [r for i, r in enumerate(rows) if i < top or (r["ours"] and r["inclusive_ms"] >= ours_ms)]


def fit_turns(spec: JobSpec, rounds: int, turn: int, profile_steps: int = 0) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        turns_loop,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "rounds": rounds,
            "turn": turn,
            "profile_steps": profile_steps,
        },
        scaling_config=ScalingConfig(num_workers=spec.workers.count, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"overhead-{time.time_ns()}", storage_path=spec.checkpoint.storage),
    )
    return dict(trainer.fit().metrics or {})


def summarise(
    name: str,
    turns: dict[str, list[float]],
    pieces: dict[str, float] | None = None,
    profile: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Per-step medians and each arm's paired ratio to plain with its interval; ``pieces``: the
    runtime step's parts (seconds per step)."""
    row: dict[str, Any] = {"workload": name, "turns": turns, "pieces": pieces or {}, "profile": profile or []}
    for arm in ARMS:
        row[f"{arm}_ms"] = 1e3 * statistics.median(turns[arm])
    for arm in ARMS[1:]:
        ratios = [a / b for a, b in zip(turns[arm], turns["plain"])]
        row[f"{arm}_overhead"] = statistics.median(ratios) - 1
        low, high = median_interval(ratios)
        row[f"{arm}_interval"] = (low - 1, high - 1)
    return row


def measure(rounds: int, turn: int, profile_steps: int = 0) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gw-overhead-") as storage:
        for name, (params, batch) in WORKLOADS.items():
            spec = job(params, batch, 2 * rounds * turn + profile_steps, storage)
            metrics = fit_turns(spec, rounds, turn, profile_steps)
            row = summarise(name, metrics["turns"], metrics.get("pieces"), metrics.get("profile"))
            rows.append(row)
            print(f"{name:12s} " + "  ".join(f"{arm} {row[f'{arm}_ms']:.3f} ms" for arm in ARMS)
                  + f"  runtime {100 * row['runtime_overhead']:+.1f} %", flush=True)  # fmt: skip
    return rows


def verdict(row: dict[str, Any]) -> str:
    low, high = row["runtime_interval"]
    if high <= TARGET:
        return "met"
    if low > TARGET:
        return "missed"
    return "not resolved"


def render(rows: list[dict[str, Any]], rounds: int, turn: int, command: str, load: str) -> str:
    lines = [
        BEGIN,
        "## Runtime overhead on Ray Train (`benchmarks/overhead.py`)",
        "",
        f"Measured {dt.date.today()} on {platform.machine()} ({os.cpu_count()} shared cores, 1-minute "
        f"load {load} at the start), Python {platform.python_version()}; one Ray Train fit per workload, "
        f"2 workers (gloo, loopback), digits. In every worker four arms take turns of {turn} steps, "
        f"{rounds} rounds, the order reversed every other round: *plain* (Ray Train's DDP with torch's "
        "built-in all-reduce, forward, backward, step), *torch hook* (the same loop with torch's Python "
        "`allreduce_hook`: what any Python comm hook costs), *hook* (the same loop with gradwire's "
        "`none` hook: byte "
        "ledger, non-finite check) and *runtime* (the runtime's step: `DdpStep`, optimizer and "
        "schedule, one telemetry report per step into the JSONL sink). A turn's time is the slowest "
        "rank's; the overhead is the median over rounds of the paired ratio to *plain*, with a "
        "distribution-free 95 % interval of that median.",
        "",
        "| workload | plain ms/step | torch hook | gradwire hook | runtime | torch hook − plain "
        "| gradwire hook − plain | runtime − plain (95 % interval) | target ≤ 3 % |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|:--|",
    ]
    for row in rows:
        low, high = row["runtime_interval"]
        lines.append(
            f"| {row['workload']} | {row['plain_ms']:.2f} | {row['torch-hook_ms']:.2f} "
            f"| {row['hook_ms']:.2f} | {row['runtime_ms']:.2f} | {100 * row['torch-hook_overhead']:+.1f} % "
            f"| {100 * row['hook_overhead']:+.1f} % | {100 * row['runtime_overhead']:+.1f} % "
            f"({100 * low:+.1f} … {100 * high:+.1f} %) | {verdict(row)} |"
        )
    lines += ["", "Where it goes (medians of the arms, ms per step; the runtime step's parts on rank 0, "
              "mean ms per step, timed inside its arm):", ""]  # fmt: skip
    for row in rows:
        parts = row["pieces"]
        line = (
            f"- {row['workload']}: any Python comm hook (torch's) "
            f"{row['torch-hook_ms'] - row['plain_ms']:+.2f}; "
            f"gradwire's hook over torch's {row['hook_ms'] - row['torch-hook_ms']:+.2f}; the runtime's loop "
            f"over gradwire's hook {row['runtime_ms'] - row['hook_ms']:+.2f}."
        )
        if parts:
            line += (
                f" Runtime step: `DdpStep` (forward, backward with the hook, its counters) "
                f"{1e3 * parts['ddp_step']:.2f}, optimizer and schedule {1e3 * parts['optimizer']:.2f}, "
                f"`RunState` and the telemetry report {1e3 * parts['report']:.2f}."
            )
        lines.append(line)
    for row in rows:
        if not row.get("profile"):
            continue
        lines += ["", f"Profile of the runtime arm, {row['workload']} (cProfile on rank 0 over the steps "
                  "named in the command, after the timed rounds; cProfile's own cost inflates Python-heavy "
                  "entries; ms per step):", "",
                  "| function | calls/step | own ms | inclusive ms |", "|:--|--:|--:|--:|"]  # fmt: skip
        for entry in row["profile"]:
            lines.append(f"| `{entry['function']}` | {entry['calls']:.0f} | {entry['own_ms']:.3f} "
                         f"| {entry['inclusive_ms']:.3f} |")  # fmt: skip
    lines += ["", f"Command: `{command}`", END, ""]
    return "\n".join(lines)


def write(out: Path, section: str) -> None:
    write_section(out, section, BEGIN, END)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40, help="turns of each arm")
    parser.add_argument("--turn", type=int, default=10, help="steps per turn")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="then profile STEPS more runtime steps (cProfile, rank 0): where they go")
    args = parser.parse_args(argv)
    if args.rounds < 6 or args.turn < 1:
        parser.error(f"--rounds must be >= 6 (a 95 % interval needs 6) and --turn >= 1, not {args.rounds}")

    from gradwire.worker.launch import start_local_ray

    load = f"{os.getloadavg()[0]:.1f}"
    start_local_ray(num_cpus=2)
    rows = measure(args.rounds, args.turn, args.profile)
    command = "python benchmarks/overhead.py"
    if (args.rounds, args.turn) != (40, 10):
        command += f" --rounds {args.rounds} --turn {args.turn}"
    if args.profile:
        command += f" --profile {args.profile}"
    section = render(rows, args.rounds, args.turn, command, load)
    print(section)
    write(args.out, section)


if __name__ == "__main__":
    main()
