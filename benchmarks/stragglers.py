"""Straggler benchmark: plain all-reduce vs gradient coding (GC) vs sequential gradient coding (SGC).

4 gloo ranks on this machine. Per round every rank computes the tasks its method gives it:
a real float64 gradient of a small MLP on the task's partitions (cheap) **plus a calibrated
sleep of ``load × JOB_S`` standing in for compute** (``load``: the fraction of one job's data
the rank reads this round), so round times scale with load and are not swamped by the two
shared CPU cores. An injected straggler waits ``(slowdown − 1)×`` its compute time extra
(cancellable: a dropped straggler stops at once). Methods:

* plain: every rank computes its 1/4 of the data and all-reduces (waits for everyone);
* GC FR / CR s=1: ``CodedRound`` with ``fractional_repetition(4, 1)`` / ``cyclic_repetition(4, 1)``;
* SR-SGC / M-SGC (B=1, W=3, λ=2): ``SequentialRound`` (compressors/coding/sequential_round.py).

Straggler patterns: none; Bernoulli p=0.25 with 4× slowdown; Bursty(B=1, W=3, λ=2) with 4×.
Each round starts after a ``dist.barrier()``; a round's time is the slowest rank's time from
the barrier to having the round's result. Load is the per-worker fraction of one job's data.

    python benchmarks/stragglers.py [--quick] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from gradwire.compressors import make_reducer  # noqa: E402
from gradwire.compressors.coding import (  # noqa: E402
    Bernoulli,
    Bursty,
    CodedRound,
    NoStragglers,
    cyclic_repetition,
    fractional_repetition,
    m_sgc,
    sr_sgc,
)
from gradwire.compressors.coding.sequential_round import SequentialRound  # noqa: E402
from tests.ranks import run_ranks  # noqa: E402

WORLD = 4
SGC = (1, 3, 2)  # B, W, λ
SLOWDOWN = 4.0
SAMPLES = 56
FEATURES = 16
MU, SLACK_S = 0.25, 0.03  # SequentialRound deadline rule
BEGIN, END = "<!-- stragglers:begin -->", "<!-- stragglers:end -->"
METHODS = ["plain", "gc-fr", "gc-cr", "sr-sgc", "m-sgc"]
PATTERNS = ["none", "bernoulli", "bursty"]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 1)).double()


def job_data(job: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(job)
    return (
        torch.randn(SAMPLES, FEATURES, generator=g, dtype=torch.float64),
        torch.randn(SAMPLES, 1, generator=g, dtype=torch.float64),
    )


def straggler_model(pattern: str, seed: int):
    if pattern == "none":
        return NoStragglers()
    if pattern == "bernoulli":
        return Bernoulli(0.25, slowdown=SLOWDOWN, seed=seed)
    B, W, lam = SGC
    return Bursty(B, W, lam, seed=seed, n=WORLD, slowdown=SLOWDOWN)


def _grad(model, params, x, y, weights_slices, cancel, load, job_s):
    """Real gradient of Σ w·loss(partition) plus a cancellable sleep of load·job_s standing in for compute."""
    total = None
    for (a, b), w in weights_slices:
        term = ((model(x[a:b]) - y[a:b]) ** 2).sum() * float(w)
        total = term if total is None else total + term
    grads = torch.autograd.grad(total, params)
    cancel.wait(load * job_s)
    return grads


def _bench(rank: int, world: int, rounds: int, job_s: float, seed: int) -> dict:
    torch.set_num_threads(1)
    model = make_model()
    params = list(model.parameters())
    out: dict = {}
    for pattern in PATTERNS:
        for method in METHODS:
            stragglers = straggler_model(pattern, seed)
            times, loads, extra = [], [], {}
            prefix = f"{method}/{pattern}"
            if method == "plain":
                reducer = make_reducer("none")
                size = SAMPLES // WORLD
                for r in range(rounds):
                    x, y = job_data(r)
                    dist.barrier()
                    t0 = time.perf_counter()
                    ev = threading.Event()
                    _grad(model, params, x, y, [((rank * size, (rank + 1) * size), 1.0)], ev, 0.25, job_s)
                    slow = stragglers.slowdown_for(r, rank)
                    if slow > 1.0:
                        time.sleep((slow - 1.0) * (time.perf_counter() - t0))
                    reducer.reduce([g.clone() for g in params])
                    times.append(time.perf_counter() - t0)
                    loads.append(0.25)
            elif method.startswith("gc"):
                code = (
                    fractional_repetition(WORLD, 1)
                    if method == "gc-fr"
                    else cyclic_repetition(WORLD, 1, seed=0)
                )
                coded = CodedRound(code, prefix=prefix, stragglers=stragglers, timeout=120)
                size = SAMPLES // WORLD
                weights = [((j * size, (j + 1) * size), w) for j, w in code.encode_weights(rank).items()]
                load = len(code.partitions(rank)) / WORLD
                over = 0
                for r in range(rounds):
                    x, y = job_data(r)
                    dist.barrier()
                    t0 = time.perf_counter()
                    _, rep = coded.step(
                        lambda cancel, x=x, y=y, ws=weights, ld=load: _grad(
                            model, params, x, y, ws, cancel, ld, job_s
                        ),
                        params,
                    )
                    times.append(time.perf_counter() - t0)
                    loads.append(load)
                    over += int(rep.over_tolerance)
                extra["over_tolerance_rounds"] = over
            else:
                B, W, lam = SGC
                scheme = sr_sgc(WORLD, B, W, lam) if method == "sr-sgc" else m_sgc(WORLD, B, W, lam)
                cuts, start = [], 0
                for size in scheme.partition_sizes:
                    end = start + int(size * SAMPLES)
                    cuts.append((start, end))
                    start = end

                def compute(task, cancel, cuts=cuts):
                    x, y = job_data(task.job)
                    ws = [(cuts[p], w) for p, w in task.weights]
                    return _grad(model, params, x, y, ws, cancel, float(task.load), job_s)

                runner = SequentialRound(
                    scheme,
                    compute,
                    params,
                    prefix=prefix,
                    stragglers=stragglers,
                    mu=MU,
                    slack_s=SLACK_S,
                    timeout=120,
                )
                for _ in range(rounds):
                    dist.barrier()
                    t0 = time.perf_counter()
                    rep = runner.step()
                    times.append(time.perf_counter() - t0)
                    loads.append(float(rep.load))
                extra["fallback_rounds"] = runner.fallback_rounds
                extra["late_jobs"] = len(runner.late_jobs)
                extra["decoded_jobs"] = len(runner.done_jobs)
                extra["delay"] = scheme.delay
                extra["scheme_load"] = float(scheme.load)
            out[(method, pattern)] = {"times": times, "loads": loads, **extra}
    return out


def summarise(results: list[dict], rounds: int) -> dict:
    table = {}
    for key in results[0]:
        times = np.max(np.array([r[key]["times"] for r in results]), axis=0)  # slowest rank per round
        loads = np.array([r[key]["loads"] for r in results])
        row = {k: v for k, v in results[0][key].items() if k not in ("times", "loads")}
        warm = min(2, rounds - 1)  # drop the first rounds (pipeline fill, warm-up)
        row.update(
            mean=float(times[warm:].mean()),
            p95=float(np.percentile(times[warm:], 95)),
            load=float(loads[:, warm:].mean()),
            load_max=float(loads[:, warm:].max()),
        )
        table[key] = row
    return table


def machine() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        rev = "unknown"
    return (
        f"{os.cpu_count()} CPU cores, {platform.platform()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}; git {rev} + uncommitted changes"
    )


def render(table: dict, args, seconds: float, load_before: float, load_after: float) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python benchmarks/stragglers.py" + (" --quick" if args.quick else "")
    base = table[("plain", "none")]["mean"]
    lines = [
        BEGIN,
        "## Straggler benchmark (4 gloo ranks, CPU, loopback)",
        "",
        f"Produced by `{cmd}` on {now} ({args.rounds} rounds per configuration, first 2 dropped; "
        f"{seconds:.0f} s).",
        "",
        f"Machine: {machine()}. 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        "(another CI run shared the 2 cores).",
        "",
        " ".join(
            [
                "**Compute is a calibrated sleep, not real compute**: every task does a real float64",
                "gradient of a 16→32→1 MLP on its partitions (≈1 ms) plus a cancellable sleep of",
                f"`load × {args.job_s:g} s` (`load` = fraction of one job's data). On 2 shared cores,",
                "4 ranks of real compute would be dominated by CPU contention. Injected stragglers wait",
                "3× their compute time extra (4× slowdown). Step time = slowest rank's time from a",
                "per-round `dist.barrier()` until it holds the round's result (first 2 rounds dropped).",
                f"SGC schemes use (B, W, λ) = {SGC} on n = 4: SR-SGC with a (4, 1) code (delay 1),",
                "M-SGC (delay 2). SGC rounds run live with `SequentialRound`: store-based agreement,",
                f"ranks arriving within max({1 + MU:g}·fastest, fastest + {SLACK_S * 1e3:.0f} ms) are on",
                "time; a straggler set that breaks the (B, W, λ) model makes the round wait for",
                "everybody (counted as *fallback rounds*).",
            ]
        ),
        "",
        "| method | pattern | mean step ms | p95 ms | vs own straggler-free | vs plain straggler-free "
        "| load/worker | notes |",
        "|:---|:---|---:|---:|---:|---:|---:|:---|",
    ]
    for (method, pattern), row in table.items():
        own = table[(method, "none")]["mean"]
        notes = []
        for k in ("over_tolerance_rounds", "fallback_rounds", "late_jobs", "decoded_jobs"):
            if k in row:
                notes.append(f"{k.replace('_', ' ')} {row[k]}")
        lines.append(
            f"| {method} | {pattern} | {row['mean'] * 1e3:.0f} | {row['p95'] * 1e3:.0f} | "
            f"{row['mean'] / own:.2f}× | {row['mean'] / base:.2f}× | {row['load']:.3f} | {'; '.join(notes)} |"
        )
    lines += ["", "Targets:", ""]
    for line in targets(table):
        lines.append(f"- {line}")
    lines += ["", interpretation(table), "", END]
    return "\n".join(lines) + "\n"


def targets(table: dict) -> list[str]:
    out = []
    for pattern in ("bernoulli", "bursty"):
        plain = table[("plain", pattern)]["mean"] / table[("plain", "none")]["mean"]
        ok_plain = plain >= 1.75
        out.append(
            f"{pattern}: plain all-reduce mean step {plain:.2f}× its straggler-free (target ≥ 1.75×: "
            f"{'met' if ok_plain else 'NOT met'})"
        )
        for gc in ("gc-fr", "gc-cr"):
            r = table[(gc, pattern)]["mean"] / table[(gc, "none")]["mean"]
            out.append(
                f"{pattern}: {gc} mean step {r:.2f}× its own straggler-free (target ≤ 1.2×: "
                f"{'met' if r <= 1.2 else 'NOT met'})"
            )
    ratio = table[("m-sgc", "bursty")]["load"] / table[("gc-fr", "bursty")]["load"]
    out.append(
        f"M-SGC load per worker {table[('m-sgc', 'bursty')]['load']:.3f} = {ratio:.2f}× GC s=1's "
        f"{table[('gc-fr', 'bursty')]['load']:.3f} (target ≤ 0.85×: {'met' if ratio <= 0.85 else 'NOT met'})"
    )
    return out


def interpretation(table: dict) -> str:
    return " ".join(
        [
            "Interpretation: GC with s = 1 hides one straggler per round but waits whenever two",
            "ranks straggle together — with Bernoulli p = 0.25 on 4 ranks that is ≈26 % of rounds,",
            "so its mean is pulled up by 4× rounds; plain all-reduce waits whenever anyone straggles",
            "(≈68 % of rounds). GC's own straggler-free step is ~2× plain's because each rank",
            "computes twice the data (load 0.5 vs 0.25): the ≤ 1.2× target is relative to GC's own",
            "straggler-free step. SR-SGC has GC's load; M-SGC needs only 9/28 ≈ 0.32 of a job per",
            "worker per round for the same bursty model, at the cost of finishing each job up to",
            "2 rounds later. The SGC runners pay the deadline rule's wait (they cannot know a late",
            "rank is a straggler before the deadline) in every round with a straggler, which GC's",
            "'first n − s arrivals' rule does not. Bernoulli patterns are not (B, W, λ)-bursty, so",
            "the SGC runners wait for everybody in rounds that break the model. Loads are what the",
            "schedulers assigned (what each rank computed); all round times are measured live.",
            "This 2-core machine was shared with a CI run: treat differences under ~10 % as noise.",
        ]
    )


def write(out: Path, section: str) -> None:
    write_section(out, section, BEGIN, END)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per configuration (default 30; 10 quick)"
    )
    parser.add_argument(
        "--job-s", type=float, default=0.32, help="stand-in compute seconds for one whole job"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 10 if args.quick else 30
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = run_ranks(_bench, WORLD, args.rounds, args.job_s, args.seed, timeout=900)
    seconds = time.perf_counter() - started
    table = summarise(results, args.rounds)
    section = render(table, args, seconds, load_before, os.getloadavg()[0])
    print(section)
    if args.out is not None:
        write(args.out, section)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
