#!/usr/bin/env python
"""``compression: auto`` against every fixed choice it could make, on netlab links (2 gloo ranks, one
per core, ``switch`` topology: each rank its own shaped link).

Per model (``digits_cnn`` with SGD, ``tiny_lm`` with Adam; ``benchmarks/linkrun.py``'s workloads):

1. **Fixed choices, accuracy per step**: each fixed method trained ``--steps`` steps in an unshaped lab,
   evaluated every ``--eval-every``. With the same seeds its accuracy after step t does not depend on
   the link, only the wall time of step t does (as ``benchmarks/links.py`` measures).
2. **Fixed choices, step time per link**: in each shaped lab the fixed methods take turns, ``--turn``
   steps at a time, in the same processes (``linkrun --methods``): median of the slowest rank's step.
   Time to target = first evaluated step at the target × that median.
3. **auto, per link**: a full run of ``compression: auto`` (its defaults, every candidate) in each lab,
   evaluated every ``--eval-every``; its time to target is its own training wall time up to the first
   evaluation at the target (linkrun pauses the clock for evaluation): plain first steps, probes,
   guard checks and switches included. Its choices depend on the link, so it cannot borrow an unshaped
   accuracy curve.

Writes the ``auto`` section of docs/benchmarks.md. Needs root (network namespaces).

    python benchmarks/auto.py --json F                # both models, 4 rates (about 45 min here, loaded)
    python benchmarks/auto.py --models digits_cnn --rates unshaped 100mbit --steps 150
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import linkrun
from benchmarks.links import TARGETS, percentile
from benchmarks.netlab import Lab, NetlabError, support_problem
from benchmarks.sections import write_section
from gradwire.compressors.costmodel import UNRESOLVED_BANDWIDTH

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- auto:begin -->", "<!-- auto:end -->"
#: the fixed choices, as linkrun names them, and the auto candidate each one is
FIXED = {
    "allreduce": "none", "fp16": "fp16", "bf16": "bf16", "powersgd:1": "powersgd-r1",
    "powersgd:2": "powersgd-r2", "powersgd:4": "powersgd-r4", "powersgd:8": "powersgd-r8",
    "topk:ef21": "topk-ef21",
}  # fmt: skip
RATES = ["unshaped", "10gbit", "1gbit", "100mbit"]
DEFAULT_STEPS = {"digits_cnn": 200, "tiny_lm": 200}
#: plain all-reduced steps before compressing: linkrun's PowerSGD (as torch's hook), auto's probe_after
PLAIN_START = {"powersgd": linkrun.TORCH_START_ITER, "auto": 2}
EVAL_EVERY = {"digits_cnn": 10, "tiny_lm": 20}
#: examples per rank and step: 2 ranks × 64, the global batch of links.py's 4 ranks × 32
BATCH = 64


# --- inside the lab: one rank of linkrun, with 'auto' added -------------------------------------------


class AutoTrainer(linkrun.Trainer):
    """linkrun's trainer; its record also holds auto's choices (history and last decision)."""

    def record(self, args: argparse.Namespace, world: int, evals: list[dict[str, float]]) -> dict[str, Any]:
        out = super().record(args, world, evals)
        reducer = getattr(self.state, "reducer", None)
        if reducer is not None and hasattr(reducer, "history"):
            decision = {k: v for k, v in reducer.last_decision.items() if k != "shapes"}
            out["auto"] = {"history": [list(h) for h in reducer.history], "last_decision": decision,
                           "probe_seconds": reducer.probe_seconds}  # fmt: skip
        return out


def rank_main(argv: list[str]) -> None:
    """``linkrun.main(argv)`` with method ``auto`` (``make_hook("auto")``, defaults) known to it."""
    linkrun.GRADWIRE["auto"] = ("auto", {})
    linkrun.Trainer = AutoTrainer  # type: ignore[misc]
    linkrun.main(argv)


# --- the driver ---------------------------------------------------------------------------------------


def run_ranks(lab: Lab, argv: list[str], timeout: float = 1800) -> dict[str, Any]:
    """One linkrun (through :func:`rank_main`) on every rank; a crash in gloo's teardown is retried once."""
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="auto-") as tmp:
            out = Path(tmp) / "r.json"
            try:
                command = [sys.executable, str(Path(__file__).resolve()), "--rank", *argv, "--out", str(out)]
                lab.run_ranks(command, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)
            except NetlabError as err:
                if attempt == 2:
                    raise
                print(f"run failed, trying once more: {str(err).splitlines()[0]}", flush=True)
                continue
            return json.loads(out.read_text())
    raise AssertionError("unreachable")


def first_at(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    return next((p for p in curve if p["test_accuracy"] >= target), None)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"curves": {}, "steps": {}, "auto": {}, "load": []}
    if args.json and args.json.exists():
        results = json.loads(args.json.read_text())

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    for model in args.models:
        train = ["--model", model, "--steps", str(args.steps[model]), "--warmup", "0", "--batch", str(BATCH),
                 "--eval-every", str(args.eval_every[model])]  # fmt: skip
        with Lab(workers=2, rate=None, topology="switch") as lab:
            for method in FIXED:
                key = f"{model}|{method}"
                if key not in results["curves"]:
                    results["curves"][key] = run_ranks(lab, [*train, "--method", method])["evals"]
                    results["load"].append(os.getloadavg()[0])
                    save()
                final = results["curves"][key][-1]["test_accuracy"]
                print(f"{model:10s} {method:12s} accuracy {final:.3f}", flush=True)
        for rate in args.rates:
            with Lab(workers=2, rate=None if rate == "unshaped" else rate, topology="switch") as lab:
                key = f"{model}|{rate}"
                if key not in results["steps"]:
                    methods = ",".join([*FIXED, "auto"])
                    timed = ["--model", model, "--methods", methods, "--steps", str(args.timed),
                             "--warmup", "3", "--turn", str(args.turn), "--batch", str(BATCH)]  # fmt: skip
                    runs = run_ranks(lab, timed)["runs"]
                    results["steps"][key] = {r["method"]: {
                        "choices": [h[1] for h in r.get("auto", {}).get("history", [])],
                        "median_ms": 1e3 * statistics.median(r["step_seconds"]),
                        "p95_ms": 1e3 * percentile(r["step_seconds"], 0.95), "bytes": r["bytes_per_step"],
                    } for r in runs}  # fmt: skip
                    results.setdefault("timed", {})[model] = args.timed
                    results["load"].append(os.getloadavg()[0])
                    save()
                if key not in results["auto"]:
                    found = run_ranks(lab, [*train, "--method", "auto"])
                    results["auto"][key] = {"evals": found["evals"], **found.get("auto", {})}
                    results["load"].append(os.getloadavg()[0])
                    save()
                choices = [h[1] for h in results["auto"][key]["history"]]
                print(f"{model:10s} {rate:9s} auto chose {' → '.join(choices)}", flush=True)
    return results


def auto_ms(history: list[list[Any]], until: int, steps: dict[str, dict[str, float]]) -> float:
    """auto's milliseconds for its first ``until`` steps: each stretch between two of its choices at the
    median step time of the fixed method it ran then (the plain first steps at the all-reduce's)."""
    method_of = {label: method for method, label in FIXED.items()}
    marks = [(0, "none"), *[(int(h[0]), str(h[1])) for h in history]]
    total = 0.0
    for i, (start, label) in enumerate(marks):
        end = min(until, marks[i + 1][0] if i + 1 < len(marks) else until)
        total += max(0, end - start) * steps[method_of[label]]["median_ms"]
    return total


def summarise(results: dict[str, Any], models: list[str], rates: list[str]) -> dict[str, Any]:
    """Per model: time to target of every fixed choice and of auto at every rate, and the verdicts."""
    out: dict[str, Any] = {}
    for model in models:
        target = TARGETS[model]
        table: dict[str, dict[str, float | None]] = {m: {} for m in [*FIXED, "auto"]}
        wall: dict[str, float | None] = {}
        hits = {m: first_at(results["curves"][f"{model}|{m}"], target) for m in FIXED}
        at_target: dict[str, int | None] = {m: None if h is None else int(h["step"]) for m, h in hits.items()}
        for rate in rates:
            steps = results["steps"][f"{model}|{rate}"]
            plain_ms = steps["allreduce"]["median_ms"]
            for method in FIXED:
                hit = first_at(results["curves"][f"{model}|{method}"], target)
                plain = min(PLAIN_START.get(method.partition(":")[0], 0), hit["step"]) if hit else 0
                table[method][rate] = (
                    None
                    if hit is None
                    else (plain * plain_ms + (hit["step"] - plain) * steps[method]["median_ms"]) / 1e3
                )
            found = results["auto"][f"{model}|{rate}"]
            hit = first_at(found["evals"], target)
            wall[rate] = None if hit is None else hit["wall_seconds"]
            at_target[f"auto {rate}"] = None if hit is None else int(hit["step"])
            table["auto"][rate] = (
                None
                if hit is None
                else (auto_ms(found["history"], hit["step"], steps) / 1e3 + found.get("probe_seconds", 0.0))
            )
        verdicts = []
        for rate in rates:
            fixed = {m: table[m][rate] for m in FIXED if table[m][rate] is not None}
            best = min(fixed, key=fixed.__getitem__) if fixed else None
            got = table["auto"][rate]
            ratio = None if got is None or best is None else got / fixed[best]
            verdicts.append(
                {"rate": rate, "best": best, "ratio": ratio, "met": ratio is not None and ratio <= 1.1}
            )
        inf = float("inf")
        sums = {m: sum(inf if table[m][r] is None else table[m][r] for r in rates) for m in table}  # type: ignore[misc]
        beaten = [m for m in FIXED if not sums["auto"] < sums[m]]
        out[model] = {
            "table": table,
            "verdicts": verdicts,
            "sums": sums,
            "not_beaten": beaten,
            "wall": wall,
            "target": target,
            "at_target": at_target,
        }
    return out


def gbit(bytes_per_s: float) -> str:
    return ("beyond what the probes resolve" if bytes_per_s >= UNRESOLVED_BANDWIDTH
            else f"{bytes_per_s * 8 / 1e9:.3g} Gbit/s")  # fmt: skip


def describe_fit(decision: dict[str, Any]) -> str:
    """auto's last decision's link and step, as the choices list prints them."""
    b = gbit(decision["bandwidth"])
    probes = "the step before's buckets" if decision.get("link_from") == "exchanges" else "probes"
    if decision.get("bandwidth_from") == "step":
        probed = gbit(decision["probed_bandwidth"])
        b += f" as the running {decision['running']}'s exchanges saw it ({probes}: {probed})"
    elif probes != "probes":
        b += f" (fitted to {probes} and the 4 KiB probe)"
    text = (f"last fit α = {decision['alpha_s'] * 1e6:.0f} µs, B = {b}, "
            f"compute {decision['compute_s'] * 1e3:.1f} ms")  # fmt: skip
    if "communicate_s" in decision:
        text += f", {decision['running']}'s exchanges {decision['communicate_s'] * 1e3:.1f} ms a step"
    return text


def render(results: dict[str, Any], summary: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    def cell(value: float | None) -> str:
        return "not reached" if value is None or value == float("inf") else f"{value:.1f}"

    load = results.get("load") or [0.0]
    trained = ", ".join(
        f"{args.steps[m]} steps of {m}, evaluated every {args.eval_every[m]}" for m in args.models
    )
    lines = [
        BEGIN, "## compression: auto vs every fixed choice", "",
        f"Command: `{command}` — run {dt.date.today().isoformat()} on {platform.machine()}, Python "
        f"{platform.python_version()}, {os.cpu_count()} cores shared with other work (1-minute load "
        f"{min(load):.1f}–{max(load):.1f} during the runs), 2 gloo ranks (1 thread each, one per core) in a "
        "netlab `switch` topology (each rank its own shaped link).",
        "",
        "Time to target: the first evaluated step at the target accuracy, times step times measured on "
        "that link (timed steps per method as given per model, after 3 warm-up steps, the fixed methods and "
        f"auto taking turns {args.turn} steps at a time in the same processes, so that the machine's "
        "load falls on all alike; median of the slower rank). A fixed choice: its steps × its median "
        "(PowerSGD's 2 plain first steps at the all-reduce's median). auto: each stretch of its run "
        "between two of its choices × the median of the fixed method it ran then (its 2 plain first "
        "steps at the all-reduce's), plus its probe seconds; *auto in the timed run* shows its own "
        "median when it took turns with the others. The step at the target: for the fixed choices from "
        f"one run each in an unshaped lab ({trained}; {BATCH} examples per rank and step; accuracy per "
        "step does not depend on the link), for auto from its own run on each link (its choices depend "
        "on the link). *auto wall*: that run's own training wall time up to the target (evaluation "
        "pauses the clock; every slow step of the loaded machine counts, unlike a median). auto runs "
        "its defaults and may choose among exactly the fixed choices listed (`allreduce` stands for "
        "auto's `none`).",
        "",
    ]  # fmt: skip
    for model in args.models:
        s = summary[model]
        lines += [
            f"**{model}** (target test accuracy {s['target']}; "
            f"{results.get('timed', {}).get(model, args.timed)} timed steps per method and link): time to "
            "target, seconds",
            "",
            "| method | " + " | ".join(args.rates) + " | sum |",
            "|:--" + "|--:" * (len(args.rates) + 1) + "|",
        ]
        for method, row in s["table"].items():
            name = f"**{method}**" if method == "auto" else method
            lines.append(f"| {name} | " + " | ".join(cell(row[r]) for r in args.rates)
                         + f" | {cell(s['sums'][method])} |")  # fmt: skip
        timed_ms = [results["steps"][f"{model}|{r}"].get("auto", {}).get("median_ms") for r in args.rates]
        lines.append("| *auto in the timed run, ms/step* | " + " | ".join(cell(t) for t in timed_ms) + " | |")
        walls = [s["wall"].get(r) for r in args.rates]
        total = None if None in walls else sum(walls)  # type: ignore[arg-type]
        lines.append("| *auto wall* | " + " | ".join(cell(w) for w in walls) + f" | {cell(total)} |")
        lines.append("")
        steps_at = ", ".join(f"{m} {'not reached' if v is None else v}" for m, v in s["at_target"].items())
        lines.append(f"Step at the target (first evaluation at it): {steps_at}.")
        lines.append("")
        lines.append("auto's choices (step, choice, why):")
        lines.append("")
        for rate in args.rates:
            found = results["auto"][f"{model}|{rate}"]
            steps = ", ".join(f"{h[0]}: {h[1]} ({h[2]})" for h in found["history"])
            decision = found.get("last_decision", {})
            fit = f"; {describe_fit(decision)}" if decision else ""
            timed = results["steps"][f"{model}|{rate}"].get("auto", {}).get("choices", [])
            lines.append(f"- {rate}: {steps}{fit}; probes {found.get('probe_seconds', 0.0):.2f} s in all; "
                         f"in the timed run: {' → '.join(timed) or '–'}")  # fmt: skip
        lines.append("")
        for v in s["verdicts"]:
            ratio = "not reached" if v["ratio"] is None else f"{v['ratio']:.2f}×"
            lines.append(f"- {v['rate']}: auto {ratio} the best fixed choice ({v['best']}) "
                         f"(target ≤ 1.1×: {'met' if v['met'] else 'missed'}).")  # fmt: skip
        beaten = "every fixed choice" if not s["not_beaten"] else f"all but {', '.join(s['not_beaten'])}"
        lines.append(f"- Sum over the rates: auto {cell(s['sums']['auto'])} s, strictly below {beaten} "
                     f"(target: every one: {'met' if not s['not_beaten'] else 'missed'}).")  # fmt: skip
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:
        rank_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(DEFAULT_STEPS), default=sorted(DEFAULT_STEPS))
    parser.add_argument("--rates", nargs="+", default=RATES, help="unshaped or a tc rate (10gbit, 100mbit)")
    parser.add_argument(
        "--steps", nargs="+", default=[], help="N or MODEL=N training steps (default: CNN 200, LM 300)"
    )
    parser.add_argument("--eval-every", type=int, default=None, help="default 10 CNN, 20 LM")
    parser.add_argument("--timed", type=int, default=16, help="timed steps per fixed method and link")
    parser.add_argument("--turn", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="keep (and resume from) the raw results")
    args = parser.parse_args(argv)
    steps = dict(DEFAULT_STEPS)
    for item in args.steps:
        model, sep, value = item.rpartition("=")
        if not value.isdigit() or int(value) < 1 or (sep and model not in DEFAULT_STEPS):
            parser.error(
                f"--steps {item!r}: give N or MODEL=N, N >= 1, MODEL one of {', '.join(DEFAULT_STEPS)}"
            )
        for name in [model] if sep else list(steps):
            steps[name] = int(value)
    if (args.eval_every is not None and args.eval_every < 1) or args.timed < 1 or args.turn < 1:
        parser.error("--eval-every, --timed and --turn must be >= 1")
    problem = support_problem()
    if problem:
        parser.exit(2, f"auto.py: {problem}\n")
    args.steps = {m: steps[m] for m in args.models}
    args.eval_every = {m: args.eval_every or EVAL_EVERY[m] for m in args.models}
    started = time.perf_counter()
    results = measure(args)
    summary = summarise(results, args.models, args.rates)
    command = "python benchmarks/auto.py " + " ".join(argv)
    section = render(results, summary, args, command.strip())
    print(section)
    print(f"({time.perf_counter() - started:.0f} s)")
    write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
    if sys.argv[1:2] == ["--rank"]:
        linkrun.exit_now()
