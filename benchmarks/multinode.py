#!/usr/bin/env python
"""PowerSGD vs plain all-reduce across two Ray nodes at 100 Mbit/s, through the whole service stack.

A switch lab (``benchmarks.netlab``) with every link shaped to ``--rate`` (100 Mbit/s): the coordinator
(``gradwire serve``, reaching Ray by its Jobs API address only) in one namespace, a Ray head (0 CPUs)
in another, two worker nodes with 1 CPU each in two more. Jobs go in over REST (``POST /v1/jobs``),
run as Ray jobs (2 workers × 1 CPU: one rank per node, so every all-reduce crosses the shaped links),
their workers stream StepReports to the coordinator, and the time per step is read back from the
coordinator's stored series (``GET /v1/jobs/{id}/metrics``): the median gap between consecutive
steps' ``wall_time`` on rank 0, and the median ``communicate_s``, over the steps after the
compressor's warm-up (``start_iter``) and the first few steps.

The two methods take turns (plain, powersgd, plain, powersgd, ...; ``--rounds`` each), one job at a
time on the same cluster, so slow drift of the machine's load hits both alike. The model is an MLP
on digits with two 1024-wide hidden layers (1.1 M parameters: 4.4 MB of fp32 gradient per step),
large enough that the 100 Mbit/s link, not the CPU, bounds a plain step.

    sudo .venv/bin/python benchmarks/multinode.py --out docs/benchmarks.md     # ~4-6 min here
    sudo .venv/bin/python benchmarks/multinode.py --rounds 1 --steps 30        # smoke run

Needs root and iproute2 (network namespaces, tc). Results are printed and, with ``--out``, written
between ``<!-- multinode:begin -->`` and ``<!-- multinode:end -->`` of that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.netlab import Lab, format_rate  # noqa: E402
from benchmarks.netlab.coordinator import LabCoordinator  # noqa: E402
from benchmarks.netlab.raycluster import LabRayCluster  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from gradwire.spec import JobSpec  # noqa: E402

BEGIN, END = "<!-- multinode:begin -->", "<!-- multinode:end -->"
SPEC = ROOT / "examples" / "specs" / "digits-powersgd.yaml"
HIDDEN = (1024, 1024)
START_ITER = 10  # the compressor's warm-up: steps sent plain
SKIP = 5  # steps after the warm-up left out as well (the first compressed steps settle)
METHODS = {  # the job's compression section
    "plain all-reduce": {"name": "none"},
    "PowerSGD rank 4": {"name": "powersgd", "rank": 4, "feedback": "ef", "start_iter": START_ITER},
}


def job_body(name: str, steps: int, storage: Path, compression: dict[str, Any]) -> dict[str, Any]:
    hidden = "[" + ", ".join(str(h) for h in HIDDEN) + "]"
    spec = JobSpec.from_file(SPEC).with_overrides([
        f"name={name}", f"steps={steps}", "workers.count=2", "workers.cpus_per_worker=1",
        f"model.params.hidden={hidden}", "optimizer.warmup_steps=0", f"checkpoint.every_steps={steps}",
        f"evaluation.every_steps={steps}", f"checkpoint.storage={storage}",
    ])  # fmt: skip
    body = spec.model_dump(mode="json")
    body["compression"] = dict(compression)
    return JobSpec.from_dict(body).model_dump(mode="json")  # validated here, not only at the door


def step_times(points: list[dict[str, Any]], first: int) -> tuple[float, float, int]:
    """(median s between consecutive steps, median communicate_s, steps counted) from ``first`` on."""
    by_step = {p["step"]: p for p in points}
    gaps = [by_step[s]["wall_time"] - by_step[s - 1]["wall_time"] for s in sorted(by_step)
            if s > first and s - 1 in by_step]  # fmt: skip
    comm = [by_step[s]["communicate_s"] for s in sorted(by_step) if s > first]
    if not gaps:
        raise RuntimeError(f"no steps after step {first} in the stored series ({len(points)} points)")
    return statistics.median(gaps), statistics.median(comm), len(gaps)


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, list[tuple[float, float, int]]] = {m: [] for m in METHODS}
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gw-multinode-") as tmp:
        storage = Path(tmp) / "storage"
        with (
            Lab(workers=4, rate=args.rate) as lab,
            LabRayCluster(lab, client=0, head=1, nodes=(2, 3)) as ray,
            LabCoordinator(ray, storage) as coordinator,
        ):
            print(
                f"{lab.describe()}; Ray Jobs API {ray.jobs_address}; coordinator {coordinator.url}",
                flush=True,
            )
            for round_ in range(args.rounds):
                for i, (method, compression) in enumerate(METHODS.items()):
                    name = f"bench-r{round_}-m{i}"
                    body = job_body(name, args.steps, storage / name, compression)
                    job = coordinator.submit(body)
                    final = coordinator.wait(job["id"], timeout=args.job_timeout)
                    if final["state"] != "SUCCEEDED":
                        raise RuntimeError(
                            f"{method} job {job['id']} ended {final['state']}: {final.get('reason')}"
                        )
                    points = coordinator.points(job["id"])
                    measured = step_times(points, START_ITER + SKIP)
                    results[method].append(measured)
                    step_ms, comm_ms, counted = measured[0] * 1e3, measured[1] * 1e3, measured[2]
                    print(f"round {round_ + 1} {method}: {step_ms:.1f} ms/step "
                          f"(communicate {comm_ms:.1f} ms, {counted} steps)", flush=True)  # fmt: skip
    return {
        "results": results,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_s": time.monotonic() - started,
    }


def section(args: argparse.Namespace, measured: dict[str, Any]) -> str:
    results = measured["results"]
    plain = statistics.median(r[0] for r in results["plain all-reduce"])
    rows = []
    for method, runs in results.items():
        step = statistics.median(r[0] for r in runs)
        comm = statistics.median(r[1] for r in runs)
        each = ", ".join(f"{r[0] * 1e3:.0f}" for r in runs)
        rows.append(f"| {method} | {step * 1e3:.1f} | {comm * 1e3:.1f} | {step / plain:.2f} | {each} |")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = f"sudo .venv/bin/python benchmarks/multinode.py --rounds {args.rounds} --steps {args.steps}"
    command += f" --rate {args.rate} --out docs/benchmarks.md"
    load = f"{measured['load_before']:.2f} before, {measured['load_after']:.2f} after"
    params = 64 * HIDDEN[0] + HIDDEN[0] + HIDDEN[0] * HIDDEN[1] + HIDDEN[1] + HIDDEN[1] * 10 + 10
    return f"""{BEGIN}
## Two Ray nodes at {format_rate(args.rate_bits)}: PowerSGD vs plain all-reduce through the service

`{command}`
({date}; 1-minute load {load}; {measured["wall_s"]:.0f} s).

A switch lab (docs/netlab.md) with every link shaped to {format_rate(args.rate_bits)}: `gradwire serve` in one
namespace reaching Ray only by its Jobs API address, a Ray head (0 CPUs) in another, two worker nodes
with 1 CPU each in two more. Each job is submitted over REST (2 workers × 1 CPU, so one rank per
node), runs as a Ray job, and its workers' step reports reach the coordinator over gRPC; the time per
step is read back from the coordinator's stored series: the median gap between consecutive steps'
wall times on rank 0 after step {START_ITER + SKIP} (PowerSGD sends its first {START_ITER} steps plain).
Model: MLP {HIDDEN[0]}-{HIDDEN[1]} on digits, {params:,} parameters ({4 * params / 1e6:.1f} MB of fp32
gradient per step), batch 32 per rank, {args.steps} steps per job. The methods took turns, one job at a
time, {args.rounds} jobs each.

| method | ms/step (median of jobs) | communicate ms/step | vs plain | each job's ms/step |
|:---|---:|---:|---:|:---|
{chr(10).join(rows)}

"communicate" is the worker's own `communicate_s`: the durations of the step's collectives as the
byte ledger times them, summed; DDP launches several buckets at once, so it can exceed the step.
A plain step moves {4 * params / 1e6:.1f} MB each way over the link; at the measured 95.6 Mbit/s of
payload that alone is {4 * params * 8 / 95.6e6 * 1e3:.0f} ms. PowerSGD's step is bound by the CPU, so it
grows with the machine's load; the plain step is bound by the link. Timings on 2 shared cores move
by ±30 %.
{END}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", default="100mbit", help="link rate of every node (default 100mbit)")
    parser.add_argument("--rounds", type=int, default=2, help="jobs per method, taking turns (default 2)")
    parser.add_argument("--steps", type=int, default=60, help="steps per job (default 60)")
    parser.add_argument("--job-timeout", type=float, default=900.0, help="seconds one job may take")
    parser.add_argument("--out", type=Path, help="markdown file to write the section into")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < START_ITER + SKIP + 5:
        parser.error(f"need --rounds >= 1 and --steps >= {START_ITER + SKIP + 5}")
    from benchmarks.netlab import parse_rate

    args.rate_bits = parse_rate(args.rate)
    if args.rate_bits is None:
        parser.error("--rate: give a rate (e.g. 100mbit); this benchmark is about a limited link")
    measured = run(args)
    text = section(args, measured)
    print(text)
    if args.out:
        write_section(args.out, text, BEGIN, END)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
