#!/usr/bin/env python
"""Time to accuracy on shaped links: 4 gloo ranks behind a 100 Mbit/s or 1 Gbit/s link (netlab),
plain all-reduce, torch's ``powerSGD_hook`` and gradwire's compressors side by side.

Two measurements per model, combined into time to accuracy:

1. **Step time on each link**: ``--timed`` steps of every method inside a shaped lab (median, p95
   of the slowest rank per step), and the bytes each rank sends per step.
2. **Accuracy per step**: every method trained ``--train-steps`` steps in an unshaped lab,
   evaluated every ``--eval-every`` steps. With the same seeds, the accuracy after step t does not
   depend on how fast the link is, only the wall time of step t does.

Time to a target accuracy on a link = the first evaluated step reaching it × that link's median
step time for the method; the plots draw accuracy against step × median step time. Needs root
(network namespaces); writes the ``links`` section of docs/benchmarks.md and docs/img/links-*.png.

    python benchmarks/links.py --quick            # digits CNN, 6 methods, both rates (~10 min)
    python benchmarks/links.py --models digits_cnn  # every method (28 min here, idle)
    python benchmarks/links.py --json F --resume  # both models (~85 min); F keeps each finished run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.linkrun import TORCH_START_ITER, WORKLOADS
from benchmarks.netlab import Lab, NetlabError, support_problem
from benchmarks.sections import write_section

ROOT = Path(__file__).resolve().parents[1]
LINKRUN = ROOT / "benchmarks" / "linkrun.py"
BEGIN, END = "<!-- links:begin -->", "<!-- links:end -->"
ALL_METHODS = [
    "compute-only", "allreduce", "torch-powersgd:2", "torch-powersgd:4", "fp16", "powersgd:2",
    "powersgd:4", "topk:ef", "topk:ef21", "topk:econtrol", "qsgd",
]  # fmt: skip
QUICK_METHODS = ["compute-only", "allreduce", "torch-powersgd:2", "powersgd:2", "fp16", "topk:ef"]
TARGETS = {model: work["target"] for model, work in WORKLOADS.items()}


def run_ranks(lab: Lab, model: str, method: str, extra: list[str]) -> dict[str, Any]:
    """One linkrun on every rank; a run that crashes is tried once more (gloo's teardown aborts a
    process now and then: ``terminate called without an active exception``), a second crash stops."""
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="links-") as tmp:
            out = Path(tmp) / "r.json"
            argv = [sys.executable, str(LINKRUN), "--model", model, "--method", method, "--out", str(out)]
            argv += extra
            try:
                lab.run_ranks(argv, timeout=1800)
            except NetlabError as err:
                if attempt == 2:
                    raise
                first = str(err).splitlines()[0]
                print(f"{model} {method}: run failed, trying once more: {first}", flush=True)
                continue
            return json.loads(out.read_text())
    raise AssertionError("unreachable")


def checkpoint(results: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=1))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_saved(path: Path) -> dict[str, Any]:
    """The runs a ``--json`` file kept (for ``--resume``); a file that is not one says so."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"links.py: --json {path} cannot be resumed: {err}") from None
    if not isinstance(saved, dict) or not {"curves", "runs"} <= saved.keys():
        raise SystemExit(f"links.py: --json {path} cannot be resumed: not a file this script wrote")
    return {"curves": saved["curves"], "runs": saved["runs"]}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; with ``--json`` each is saved as it finishes and ``--resume`` skips those saved."""
    results: dict[str, Any] = {"curves": {}, "runs": {}}
    if args.resume and args.json.exists():
        results = load_saved(args.json)
    for model in args.models:
        with Lab(workers=args.workers, rate=None, topology=args.topology) as lab:
            for method in args.methods:
                if method == "compute-only" or f"{model}|{method}" in results["curves"]:
                    continue
                extra = ["--steps", str(args.train_steps[model]), "--warmup", "0"]
                extra += ["--eval-every", str(args.eval_every)]
                found = run_ranks(lab, model, method, extra)
                results["curves"][f"{model}|{method}"] = found["evals"]
                checkpoint(results, args.json)
                final = found["evals"][-1]["test_accuracy"]
                print(f"{model:10s} {method:18s} accuracy {final:.3f}", flush=True)
        for rate in args.rates:
            with Lab(workers=args.workers, rate=rate, topology=args.topology) as lab:
                # the methods take turns, --reps rounds: drift of a shared machine falls on all alike
                for rep in range(args.reps):
                    for method in args.methods:
                        slow = method == "allreduce" and rate == "100mbit"
                        timed = args.timed_slow if slow else args.timed
                        key = f"{model}|{rate}|{method}|{rep}"
                        if key not in results["runs"]:
                            extra = ["--steps", str(timed), "--warmup", "3"]
                            found = run_ranks(lab, model, method, extra)
                            found.pop("evals", None)
                            results["runs"][key] = found
                        found = results["runs"][key]
                        checkpoint(results, args.json)
                        median = 1000 * statistics.median(found["step_seconds"])
                        print(f"{model:10s} {rate:8s} {method:18s} {median:8.1f} ms/step", flush=True)
    return results


def step_summary(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per model, rate and method: step times pooled over the rounds (median, p95), bytes and the
    hook's compression time per step (mean over the rounds)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for key, run in runs.items():
        grouped.setdefault(key.rpartition("|")[0], []).append(run)
    summary = {}
    for key, group in grouped.items():
        times = [t for run in group for t in run["step_seconds"]]
        summary[key] = {
            "median_ms": 1000 * statistics.median(times), "p95_ms": 1000 * percentile(times, 0.95),
            "steps": len(times), "bytes": group[0]["bytes_per_step"], "params": group[0]["params"],
            "compress_ms": 1000 * statistics.mean(r.get("compress_seconds_per_step", 0.0) for r in group),
        }  # fmt: skip
    return summary


def time_to(curve: list[dict[str, float]], target: float, step_ms: float) -> float | None:
    for point in curve:
        if point["test_accuracy"] >= target:
            return point["step"] * step_ms / 1000
    return None


def plot(results: dict[str, Any], args: argparse.Namespace, img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for model in args.models:
        for rate in args.rates:
            fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
            for method in args.methods:
                curve = results["curves"].get(f"{model}|{method}")
                step = results["steps"].get(f"{model}|{rate}|{method}")
                if not curve or not step:
                    continue
                ax.plot([p["step"] * step["median_ms"] / 1000 for p in curve],
                        [p["test_accuracy"] for p in curve], marker=".", label=method)  # fmt: skip
            ax.axhline(TARGETS[model], color="grey", linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_xlabel("training wall time, s (log)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{model}, {args.workers} ranks, {rate} {args.topology} link")
            ax.legend(fontsize=7)
            fig.tight_layout()
            name = f"links-{model}-{rate}.png"
            fig.savefig(img_dir / name)
            plt.close(fig)
            names.append(name)
    return names


def render(results: dict[str, Any], args: argparse.Namespace, images: list[str], command: str) -> str:
    lines = [
        BEGIN, "## Time to accuracy on shaped links (`benchmarks/links.py`)", "",
        f"Command: `{command}` — run {dt.date.today().isoformat()} on {platform.machine()}, "
        f"{platform.python_version()}, 2 shared cores, {args.workers} gloo ranks (1 thread each) "
        f"in a netlab `{args.topology}` topology (docs/netlab.md). Step times: median and p95 of the "
        f"slowest rank over {args.reps} × {args.timed} timed steps ({args.reps} × {args.timed_slow} for "
        f"all-reduce at 100 Mbit/s), each run after 3 warm-up steps, the methods taking turns. "
        "*compress ms*: gradwire's compression math per step and rank (the hook's own clock, mean "
        "over the rounds). "
        "Accuracy: " + ", ".join(f"{args.train_steps[m]} steps ({m})" for m in args.models)
        + " per method in an unshaped lab, "
        f"evaluated every {args.eval_every}; time to target = first step at the target × the link's "
        "median step time (accuracy per step does not depend on the link). Both PowerSGDs start with "
        f"{TORCH_START_ITER} plain all-reduced steps (torch's hook needs at least 2 with error feedback; "
        "gradwire's gets the same `start_iter`): without them Adam's moments start from low-rank "
        "gradients and the LM learns far slower.", "",
    ]  # fmt: skip
    for model in args.models:
        target = TARGETS[model]
        for rate in args.rates:
            lines += [f"**{model}, {rate}** (target test accuracy {target:.2f})", "",
                      "| method | step median ms | p95 ms | compress ms | bytes/step/rank | time to target s "
                      "| final acc |", "|:--|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
            for method in args.methods:
                step = results["steps"].get(f"{model}|{rate}|{method}")
                curve = results["curves"].get(f"{model}|{method}", [])
                if step is None:
                    continue
                tta = time_to(curve, target, step["median_ms"]) if curve else None
                final = f"{curve[-1]['test_accuracy']:.3f}" if curve else "–"
                tta_s = "–" if method == "compute-only" else ("not reached" if tta is None else f"{tta:.1f}")
                hook = f"{step['compress_ms']:.1f}" if step.get("compress_ms") else "–"
                lines.append(f"| {method} | {step['median_ms']:.1f} | {step['p95_ms']:.1f} | {hook} | "
                             f"{step['bytes']:,.0f} | {tta_s} | {final} |")  # fmt: skip
            lines += ["", *verdicts(results, model, rate), ""]
    lines += [f"![{name}](img/{name})" for name in images]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def verdicts(results: dict[str, Any], model: str, rate: str) -> list[str]:
    out = []
    steps, curves = results["steps"], results["curves"]
    for r in (2, 4):
        ours = steps.get(f"{model}|{rate}|powersgd:{r}")
        theirs = steps.get(f"{model}|{rate}|torch-powersgd:{r}")
        if not ours or not theirs:
            continue
        ratio = ours["median_ms"] / theirs["median_ms"]
        verdict = "met" if ratio <= 0.75 else "missed"
        out.append(
            f"- PowerSGD r={r}: gradwire {ours['median_ms']:.1f} ms vs torch's hook "
            f"{theirs['median_ms']:.1f} ms per step = {ratio:.2f}× (target ≤ 0.75×: {verdict})."
        )
        target = TARGETS[model]
        tta_ours = time_to(curves.get(f"{model}|powersgd:{r}", []), target, ours["median_ms"])
        tta_theirs = time_to(curves.get(f"{model}|torch-powersgd:{r}", []), target, theirs["median_ms"])
        if tta_ours and tta_theirs:
            ratio = tta_ours / tta_theirs
            out.append(
                f"- Time to {target:.2f}: {tta_ours:.1f} s vs {tta_theirs:.1f} s = {ratio:.2f}× "
                f"(target ≤ 0.8×: {'met' if ratio <= 0.8 else 'missed'})."
            )
        rounds = results.get("runs", {})
        spread = [
            f"{who} " + " / ".join(f"{1000 * statistics.median(run['step_seconds']):.0f}" for run in runs)
            for who in (f"powersgd:{r}", f"torch-powersgd:{r}")
            if (runs := [v for k, v in rounds.items() if k.startswith(f"{model}|{rate}|{who}|")])
        ]
        if spread:  # how far apart the rounds' medians are: the noise a ratio has to beat
            out.append(f"- Median of each round, ms: {'; '.join(spread)}.")
        base, mine = curves.get(f"{model}|allreduce"), curves.get(f"{model}|powersgd:{r}")
        if base and mine:
            gap = 100 * (base[-1]["test_accuracy"] - mine[-1]["test_accuracy"])
            out.append(
                f"- Final accuracy {100 * mine[-1]['test_accuracy']:.1f} % vs uncompressed "
                f"{100 * base[-1]['test_accuracy']:.1f} % (target: at most 0.5 points below: "
                f"{'met' if gap <= 0.5 + 1e-9 else 'missed'})."
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--topology", choices=["shared", "switch"], default="shared")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(TARGETS),
        default=None,
        help="default: the digits CNN with --quick, else both",
    )
    args = parser.parse_args(argv)
    if args.resume and args.json is None:
        parser.error("--resume needs --json FILE (the runs to keep)")
    problem = support_problem()
    if problem:
        parser.exit(2, f"links.py: {problem}\n")
    args.models = args.models or (["digits_cnn"] if args.quick else ["digits_cnn", "tiny_lm"])
    args.methods = QUICK_METHODS if args.quick else ALL_METHODS
    args.rates = ["100mbit", "1gbit"]
    args.timed, args.timed_slow = (15, 6) if args.quick else (20, 8)
    args.reps = 2
    # the LM needs more steps to pass its target than the CNN (about 230 uncompressed)
    steps = {"digits_cnn": 150, "tiny_lm": 400} if args.quick else {"digits_cnn": 200, "tiny_lm": 400}
    args.train_steps, args.eval_every = steps, (10 if args.quick else 20)
    results = measure(args)
    results["steps"] = step_summary(results["runs"])
    args.img_dir.mkdir(parents=True, exist_ok=True)
    images = plot(results, args, args.img_dir)
    command = "python benchmarks/links.py" + (" --quick" if args.quick else "")
    if args.models != (["digits_cnn"] if args.quick else ["digits_cnn", "tiny_lm"]):
        command += " --models " + " ".join(args.models)
    if args.topology != "shared":
        command += f" --topology {args.topology}"
    section = render(results, args, images, command)
    print(section)
    write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
