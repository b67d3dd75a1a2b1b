#!/usr/bin/env python
"""``compression: auto`` with several DDP buckets: its plain all-reduce against ``make_hook("none")`` and
DDP's own hook (2 gloo ranks, one per core, netlab ``switch`` topology), the three taking turns in the
same processes.

While auto runs plain all-reduce it hands DDP each bucket's all-reduce as a future (as the other two
do), so the communication of a bucket overlaps the backward of the next ones; auto's compressing
candidates run in the hook call. The other auto benchmark (``benchmarks/auto.py``) gives every gradwire
method one bucket, where nothing can overlap, so it cannot show this. Writes the ``auto-buckets``
section of docs/benchmarks.md. Needs root (network namespaces).

    python benchmarks/auto_buckets.py --rates unshaped 1gbit --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import auto, linkrun
from benchmarks.netlab import Lab, support_problem
from benchmarks.sections import write_section

BEGIN, END = "<!-- auto-buckets:begin -->", "<!-- auto-buckets:end -->"
#: linkrun's names: DDP's own hook, gradwire's plain all-reduce, auto (its defaults, told the optimizer)
METHODS = ["allreduce", "none", "auto"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {"rates": {}, "load": []}
    for rate in args.rates:
        with Lab(workers=2, rate=None if rate == "unshaped" else rate, topology="switch") as lab:
            argv = ["--model", args.model, "--methods", ",".join(METHODS), "--steps", str(args.steps),
                    "--warmup", "3", "--turn", "2", "--batch", str(auto.BATCH),
                    "--bucket-mb", str(args.bucket_mb)]  # fmt: skip
            runs = auto.run_ranks(lab, argv)["runs"]
        found["rates"][rate] = {r["method"]: {
            "median_ms": 1e3 * statistics.median(r["step_seconds"]),
            "choices": [h[1] for h in r.get("auto", {}).get("history", [])],
        } for r in runs}  # fmt: skip
        found["load"].append(os.getloadavg()[0])
    return found


def render(found: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    loads = found["load"]
    lines = [
        BEGIN,
        "## compression: auto with several DDP buckets (`benchmarks/auto_buckets.py`)",
        "",
        f"Command: `{command}` — run {when} on {platform.machine()}, Python {platform.python_version()}, "
        f"2 gloo ranks of 1 thread (one per core) in a netlab `switch` topology (1-minute load "
        f"{min(loads):.1f}–{max(loads):.1f} after the runs). Model {args.model}, DDP buckets of "
        f"{args.bucket_mb:g} MiB (DDP's first bucket takes up to 1 MiB) for all three methods, which take "
        f"turns of 2 steps in the same processes, {args.steps} timed steps each after 3 warm-up steps; "
        "median of the slower rank. *DDP's hook*: no comm hook registered; *none*: `make_hook(\"none\")`; "
        "*auto*: `make_hook(\"auto\")` with its defaults, told the workload's optimizer. *auto / none* is "
        "the claim only where auto ran plain all-reduce (its choices are listed).",
        "",
        "| link | DDP's hook ms | none ms | auto ms | auto / none | auto's choices |",
        "|:--|--:|--:|--:|--:|:--|",
    ]
    for rate, runs in found["rates"].items():
        ddp, none, chosen = runs["allreduce"]["median_ms"], runs["none"]["median_ms"], runs["auto"]
        choices = " → ".join(chosen["choices"]) or "–"
        lines.append(f"| {rate} | {ddp:.1f} | {none:.1f} | {chosen['median_ms']:.1f} | "
                     f"{chosen['median_ms'] / none:.2f}× | {choices} |")  # fmt: skip
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(linkrun.WORKLOADS), default="tiny_lm")
    parser.add_argument("--rates", nargs="+", default=["unshaped", "1gbit"], help="unshaped or a tc rate")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method and link")
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="DDP's bucket_cap_mb for all three")
    parser.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    if args.steps < 1 or not args.bucket_mb > 0:
        parser.error("--steps >= 1 and --bucket-mb > 0")
    problem = support_problem()
    if problem:
        parser.exit(2, f"auto_buckets.py: {problem}\n")
    section = render(measure(args), args, "python benchmarks/auto_buckets.py " + " ".join(argv))
    print(section)
    if args.out:
        write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
