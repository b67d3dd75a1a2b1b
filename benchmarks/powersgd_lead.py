#!/usr/bin/env python
"""gradwire's PowerSGD against torch's ``powerSGD_hook``, step for step, on shaped links (netlab).

For each number of ranks, model and link rate, one run of ``benchmarks/linkrun.py --methods`` in
which ``compute-only``, ``torch-powersgd:R`` and ``powersgd:R`` (R = 2, 4) take turns of
``--turn`` steps in the same processes, so a shared machine's drift falls on all of them. Both
PowerSGDs use the same rank, the same plain start (``start_iter`` 2), warm start and error
feedback, and one DDP bucket (torch's hook deadlocks on gloo with more). Reported per case:

* the step ratio gradwire / torch (target ≤ 0.75×);
* the step against its bound: the compute-only floor plus the wire time of gradwire's bytes at the
  link rate (ring all-reduce: ``2(n−1)/n`` of the payload on each rank's own link; target ≤ 1.2×);
* the Amdahl limit of the first target: ``(floor + wire) / torch's step`` is the best ratio any
  gradwire step could reach with every line of its own code free;
* where the step's compression math went: the two GEMMs of a PowerSGD step on each model's largest
  matrices, in torch's hook's layout (``M Q``, ``Mᵀ P̂``) and in gradwire's (``Qᵀ Mᵀ``, ``P̂ᵀ M``),
  one thread, best of 30;
* with ``--curves``: the time to the workload's target accuracy, from each method's accuracy per
  step (trained ``--train-steps`` steps in an unshaped lab of the same ranks) × its median step
  (target ≤ 0.8× torch's); with ``--seeds N`` on N seeds (model, data order), the median over the
  seeds that reach the target.

    python benchmarks/powersgd_lead.py                  # 2 ranks, both models, 100mbit and 1gbit
    python benchmarks/powersgd_lead.py --workers 2 4 --curves

Needs root (network namespaces). Writes the ``powersgd-lead`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.linkrun import WORKLOADS
from benchmarks.links import percentile, run_ranks, time_to
from benchmarks.netlab import Lab, support_problem
from benchmarks.netlab.shaping import parse_rate
from benchmarks.sections import write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- powersgd-lead:begin -->", "<!-- powersgd-lead:end -->"
RANKS = (2, 4)
METHODS = ["compute-only", *[f"{who}:{r}" for r in RANKS for who in ("torch-powersgd", "powersgd")]]
STEP_TARGET, BOUND_TARGET, TTA_TARGET = 0.75, 1.2, 0.8


def model_matrices(model: str, count: int = 2) -> list[tuple[str, tuple[int, int]]]:
    """The ``count`` largest matrices PowerSGD compresses in ``model``, as ``a × b``."""
    from gradwire.worker.datasets import get_dataset
    from gradwire.worker.models import build_model

    work = WORKLOADS[model]
    (data_name, data_params), (maker, params) = work["dataset"], work["model"]
    data = get_dataset(data_name, seed=0, **data_params)
    build = (lambda: build_model(maker, data.num_features, data.num_classes, **params)) if isinstance(
        maker, str
    ) else (lambda: maker(data.num_features, data.num_classes, **params))  # fmt: skip
    found = [(n, (p.shape[0], p.numel() // p.shape[0])) for n, p in build().named_parameters() if p.ndim > 1]
    return sorted(found, key=lambda item: -item[1][0] * item[1][1])[:count]


def gemm_profile(models: list[str], reps: int = 30) -> list[dict[str, Any]]:
    """Best-of-``reps`` seconds of a PowerSGD step's two GEMMs in both layouts, one thread."""
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best(x: Any, y: Any) -> float:
        torch.bmm(x, y)
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            torch.bmm(x, y)
            times.append(time.perf_counter() - started)
        return min(times)

    rows = []
    try:
        for model in models:
            for name, (a, b) in model_matrices(model):
                for r in RANKS:
                    m, q, p = torch.randn(1, a, b), torch.randn(1, b, r), torch.randn(1, a, r)
                    qt, pt = q.transpose(1, 2).contiguous(), p.transpose(1, 2).contiguous()
                    torch_layout = best(m, q) + best(m.transpose(1, 2), p)
                    ours = best(qt, m.transpose(1, 2)) + best(pt, m)
                    rows.append({"model": model, "matrix": f"{name} {a}×{b}", "r": r,
                                 "torch_ms": 1000 * torch_layout, "ours_ms": 1000 * ours})  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return rows


def ordered(runs: dict[str, Any]) -> list[tuple[str, Any]]:
    """Runs by ranks, model, then rate (slowest link first)."""

    def key(item: tuple[str, Any]) -> tuple[int, str, int]:
        workers, model, rate = item[0].split("|")
        return int(workers), model, parse_rate(rate) or 0

    return sorted(runs.items(), key=key)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results.setdefault("runs", {})
    results.setdefault("curves", {})
    for workers in args.workers:
        for model in args.models:
            if args.curves:
                with Lab(workers=workers, rate=None, topology="switch") as lab:
                    for seed in range(args.seeds):
                        for method in METHODS[1:]:
                            key = curve_key(workers, model, method, seed)
                            if key in results["curves"]:
                                continue
                            extra = ["--steps", str(args.train_steps[model]), "--warmup", "0"]
                            extra += ["--eval-every", str(args.eval_every), "--seed", str(seed)]
                            results["curves"][key] = run_ranks(lab, model, method, extra)["evals"]
                            save(results, args.json)
            for rate in args.rates:
                key = f"{workers}|{model}|{rate}"
                if key in results["runs"]:
                    continue
                with Lab(workers=workers, rate=rate, topology="switch") as lab:
                    extra = ["--methods", ",".join(METHODS), "--steps", str(args.steps), "--warmup", "3"]
                    extra += ["--turn", str(args.turn)]
                    results["runs"][key] = {
                        "load": os.getloadavg()[0],
                        "runs": run_ranks(lab, model, METHODS[0], extra)["runs"],
                    }
                save(results, args.json)
                print(summary_line(key, results["runs"][key]["runs"]), flush=True)
    return results


def curve_key(workers: int | str, model: str, method: str, seed: int) -> str:
    """Seed 0's curve under ``workers|model|method`` (as runs before ``--seeds`` stored it)."""
    return f"{workers}|{model}|{method}" + (f"|s{seed}" if seed else "")


def seed_times(results: dict[str, Any], workers: str, model: str, method: str, step_ms: float) -> list:
    """Seconds to the target on each seed trained (None where not reached), seed 0 first."""
    target, out, seed = WORKLOADS[model]["target"], [], 0
    while (curve := results["curves"].get(curve_key(workers, model, method, seed))) is not None:
        out.append(time_to(curve, target, step_ms))
        seed += 1
    return out


def save(results: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=1))


def summary_line(key: str, runs: list[dict[str, Any]]) -> str:
    medians = (f"{r['method']} {1000 * statistics.median(r['step_seconds']):.1f}" for r in runs)
    return key + ": " + ", ".join(medians)


def case(runs: list[dict[str, Any]], rate: str, r: int) -> dict[str, float]:
    """The figures of one rank r in one run: medians (ms), ratios and bounds."""
    by = {run["method"]: run for run in runs}
    median = {m: 1000 * statistics.median(run["step_seconds"]) for m, run in by.items()}
    ours, theirs = by[f"powersgd:{r}"], by[f"torch-powersgd:{r}"]
    rate_bits = parse_rate(rate)
    wire_ms = 1000 * ours["wire_bytes_per_step"] * 8 / rate_bits
    floor = median["compute-only"]
    return {
        "floor_ms": floor, "ours_ms": median[f"powersgd:{r}"], "torch_ms": median[f"torch-powersgd:{r}"],
        "ours_p95_ms": 1000 * percentile(ours["step_seconds"], 0.95),
        "torch_p95_ms": 1000 * percentile(theirs["step_seconds"], 0.95),
        "wire_ms": wire_ms, "bytes": ours["bytes_per_step"],
        "compress_ms": 1000 * ours["compress_seconds_per_step"],
        "communicate_ms": 1000 * ours["communicate_seconds_per_step"],
        "step_ratio": median[f"powersgd:{r}"] / median[f"torch-powersgd:{r}"],
        "bound_ratio": median[f"powersgd:{r}"] / (floor + wire_ms),
        "amdahl": (floor + wire_ms) / median[f"torch-powersgd:{r}"],
    }  # fmt: skip


def render(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    loads = [v["load"] for v in results["runs"].values()]
    lines = [
        BEGIN, "## PowerSGD against torch's `powerSGD_hook` (`benchmarks/powersgd_lead.py`)", "",
        f"Command: `{command}` — run {dt.date.today().isoformat()} on {platform.machine()}, "
        f"Python {platform.python_version()}, {os.cpu_count()} cores shared with other work (1-minute load "
        f"{min(loads):.1f}–{max(loads):.1f} during the runs), gloo ranks of 1 thread in a netlab `switch` "
        "topology (each rank its own full-duplex link of the rate); *load*: the 1-minute load as the run "
        "started. In each run compute-only, torch's "
        f"hook and gradwire at r = 2 and 4 take turns of {args.turn} steps, {args.steps} timed steps "
        "each after 3 warm-up steps; medians of the slowest rank per step. Both PowerSGDs: 2 plain "
        "steps first, warm start, error feedback, one DDP bucket. *bound* = compute-only floor + "
        "gradwire's wire bytes at the link rate; *Amdahl* = bound / torch's step, the lowest ratio "
        "to torch any gradwire step could reach in that run (*out of reach*: Amdahl > 0.75, so no change "
        "to gradwire's hook can meet the target there). *compress*/*comm*: gradwire's hook clocks "
        "per step (comm includes the Q round's math).", "",
        "| ranks | model | link | r | load | floor ms | torch ms | gradwire ms | gradwire / torch (≤ 0.75) "
        "| bound ms | gradwire / bound (≤ 1.2) | Amdahl | compress / comm ms |",
        "|--:|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]  # fmt: skip
    for key, value in ordered(results["runs"]):
        workers, model, rate = key.split("|")
        for r in RANKS:
            c = case(value["runs"], rate, r)
            lines.append(
                f"| {workers} | {model} | {rate} | {r} | {value['load']:.1f} | {c['floor_ms']:.1f} | "
                f"{c['torch_ms']:.1f} | "
                f"{c['ours_ms']:.1f} | {c['step_ratio']:.2f}× {step_verdict(c)} | "
                f"{c['floor_ms'] + c['wire_ms']:.1f} | {c['bound_ratio']:.2f}× "
                f"{mark(c['bound_ratio'] <= BOUND_TARGET)} | {c['amdahl']:.2f} | "
                f"{c['compress_ms']:.1f} / {c['communicate_ms']:.1f} |"
            )
    if results.get("gemm"):
        lines += [
            "", "The two GEMMs of a PowerSGD step on each model's largest matrices (one thread, best of "
            "30): torch's hook multiplies `M Q` and `Mᵀ P̂` (outputs of r columns), gradwire `Qᵀ Mᵀ` and "
            "`P̂ᵀ M` (outputs of r rows), the same numbers in the other layout.", "",
            "| model | matrix | r | torch's layout ms | gradwire's ms | speed-up |",
            "|:--|:--|--:|--:|--:|--:|",
        ]  # fmt: skip
        for g in results["gemm"]:
            lines.append(
                f"| {g['model']} | {g['matrix']} | {g['r']} | {g['torch_ms']:.3f} | {g['ours_ms']:.3f} "
                f"| {g['torch_ms'] / g['ours_ms']:.1f}× |"
            )
    if results["curves"]:
        lines += ["", *time_to_accuracy(results, args)]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def mark(ok: bool) -> str:
    return "met" if ok else "missed"


def step_verdict(c: dict[str, float]) -> str:
    """met, missed, or out of reach: the floor plus the wire alone are over 0.75× torch's step."""
    if c["step_ratio"] <= STEP_TARGET:
        return "met"
    return "out of reach" if c["amdahl"] > STEP_TARGET else "missed"


def time_to_accuracy(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    out = [
        "Time to accuracy: each PowerSGD trained "
        + ", ".join(f"{s} steps ({m})" for m, s in args.train_steps.items())
        + f" in an unshaped lab of the same ranks, evaluated every {args.eval_every} steps; time to target = "
        "first evaluated step at the target × the median step above; over several seeds (model and data "
        "order), the median over the seeds that reached it, and *reached* counts them.",
        "",
        "| ranks | model | link | r | target | seeds | reached torch / gradwire | torch s | gradwire s "
        "| gradwire / torch (≤ 0.8) |",
        "|--:|:--|:--|--:|--:|--:|:-:|--:|--:|--:|",
    ]
    for key, value in ordered(results["runs"]):
        workers, model, rate = key.split("|")
        for r in RANKS:
            c = case(value["runs"], rate, r)
            theirs = seed_times(results, workers, model, f"torch-powersgd:{r}", c["torch_ms"])
            ours = seed_times(results, workers, model, f"powersgd:{r}", c["ours_ms"])
            seeds = min(len(theirs), len(ours))
            if not seeds:
                continue
            reached = [[t for t in times[:seeds] if t is not None] for times in (theirs, ours)]
            medians = [statistics.median(t) if t else None for t in reached]
            cells = ["not reached" if t is None else f"{t:.1f}" for t in medians]
            ratio = "–"
            if medians[0] and medians[1]:
                ratio = f"{medians[1] / medians[0]:.2f}× {mark(medians[1] / medians[0] <= TTA_TARGET)}"
            row = [workers, model, rate, str(r), f"{WORKLOADS[model]['target']:.2f}", str(seeds),
                   f"{len(reached[0])} / {len(reached[1])}", *cells, ratio]  # fmt: skip
            out.append("| " + " | ".join(row) + " |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    parser.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per method")
    parser.add_argument("--turn", type=int, default=2, help="steps per method and turn")
    parser.add_argument("--curves", action="store_true", help="also train for time to accuracy")
    parser.add_argument("--seeds", type=int, default=1, help="--curves: seeds to train each method on")
    parser.add_argument("--json", type=Path, default=None, help="raw results; runs already there are kept")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if any(w < 2 for w in args.workers) or args.steps < 1 or args.turn < 1 or args.seeds < 1:
        parser.error("--workers must be >= 2, --steps, --turn and --seeds >= 1")
    for rate in args.rates:
        if not parse_rate(rate):
            parser.error(f"--rates: {rate!r} is not a link rate (say 100mbit, 1gbit)")
    problem = support_problem()
    if problem:
        parser.exit(2, f"powersgd_lead.py: {problem}\n")
    args.train_steps = {m: {"digits_cnn": 200, "tiny_lm": 400}[m] for m in args.models}
    args.eval_every = 20
    results = measure(args)
    results["gemm"] = gemm_profile(args.models)
    save(results, args.json)
    command = "python benchmarks/powersgd_lead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render(results, args, command.strip())
    print(section)
    write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
