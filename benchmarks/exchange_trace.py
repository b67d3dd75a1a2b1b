#!/usr/bin/env python
"""Where a gradwire step's time goes beyond the compute-only floor, traced on every rank of a netlab.

Every rank of one ``benchmarks/linkrun.py --methods compute-only,METHOD`` run (the two take turns, 2
steps at a time, in the same processes) records on the machine's one monotonic clock, shared by all the
lab's namespaces:

* when each step starts and ends, and when DDP hands the comm hook its bucket (backward is done, with
  one bucket) and the hook returns;
* for each of the reducer's all-reduces (``Communicator.all_reduce_mean``): when it is issued, when the
  hook starts to wait for it, and when the wait ends.

Per step it then reports medians, means and 90th percentiles over the timed steps of: the step,
forward + backward, the hook, the waits in the hook's exchanges, the *skew* (how far apart the ranks
issued the same exchange) and the *exchange* time once both were in (the earlier end less the later
issue). A wait much longer than the exchange is one rank waiting for the other to arrive.

    python benchmarks/exchange_trace.py --rate 1gbit --method powersgd:2
    python benchmarks/exchange_trace.py --rate 100mbit --method powersgd:4 --out docs/benchmarks.md

Needs root (network namespaces). With ``--out`` it writes the ``exchange-trace`` section of
docs/benchmarks.md (one section: the last command's rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
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
from benchmarks.links import percentile
from benchmarks.netlab import Lab, support_problem
from benchmarks.netlab.shaping import parse_rate
from benchmarks.sections import write_section
from gradwire.compressors.communicator import Communicator

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- exchange-trace:begin -->", "<!-- exchange-trace:end -->"
FLOOR = "compute-only"


# --- inside the lab: one rank of linkrun, traced ----------------------------------------------------


class Trace:
    """This rank's events: ``(method, what, monotonic seconds)`` for steps and hooks, and one
    ``[issued, waiting, done]`` per exchange."""

    def __init__(self) -> None:
        self.method = "?"
        self.events: list[tuple[str, str, float]] = []
        self.exchanges: list[tuple[str, float, float, float]] = []

    def mark(self, what: str) -> None:
        self.events.append((self.method, what, time.monotonic()))

    def install(self) -> None:
        """Wrap linkrun's trainer step, its hooks and the communicator's all-reduce to record."""
        trace, step, make_hook, noop = self, linkrun.Trainer.step, linkrun.make_hook, linkrun.noop_hook
        all_reduce_mean = Communicator.all_reduce_mean

        def traced_step(trainer: linkrun.Trainer) -> float:
            trace.method = trainer.method
            trace.mark("start")
            seconds = step(trainer)
            trace.mark("end")
            return seconds

        def traced_make_hook(*args: Any, **kwargs: Any) -> Any:
            state, hook = make_hook(*args, **kwargs)

            @functools.wraps(hook)  # DDP reads the hook's signature
            def traced_hook(hook_state: Any, bucket: Any) -> Any:
                trace.mark("hook_in")
                future = hook(hook_state, bucket)
                trace.mark("hook_out")
                return future

            return state, traced_hook

        @functools.wraps(noop)
        def traced_noop(hook_state: Any, bucket: Any) -> Any:
            trace.mark("hook_in")
            return noop(hook_state, bucket)

        def traced_all_reduce_mean(comm: Communicator, flat: Any) -> Any:
            issued = time.monotonic()
            pending = all_reduce_mean(comm, flat)
            wait = pending.wait

            def traced_wait() -> Any:
                waiting = time.monotonic()
                result = wait()
                trace.exchanges.append((trace.method, issued, waiting, time.monotonic()))
                return result

            pending.wait = traced_wait  # type: ignore[method-assign]
            return pending

        linkrun.Trainer.step = traced_step  # type: ignore[method-assign]
        linkrun.make_hook = traced_make_hook
        linkrun.noop_hook = traced_noop
        Communicator.all_reduce_mean = traced_all_reduce_mean  # type: ignore[method-assign]


def rank_main(argv: list[str], trace_dir: Path) -> None:
    trace = Trace()
    trace.install()
    linkrun.main(argv)
    rank = int(os.environ["RANK"])
    record = {"events": trace.events, "exchanges": trace.exchanges}
    (trace_dir / f"rank{rank}.json").write_text(json.dumps(record))


# --- the driver ---------------------------------------------------------------------------------------


def steps_of(events: list[list[Any]], method: str, skip: int) -> list[dict[str, float]]:
    """``method``'s steps as ``{start, end, hook_in, hook_out}`` (the first ``skip`` left out: warm-up and
    the plain first steps)."""
    steps: list[dict[str, float]] = []
    for who, what, t in events:
        if who != method:
            continue
        if what == "start":
            steps.append({"start": t})
        elif steps:
            steps[-1][what] = t
    return [s for s in steps[skip:] if "end" in s and "hook_in" in s]


def figures(values: list[float]) -> dict[str, float]:
    median, mean = statistics.median(values), statistics.mean(values)
    return {"median": median, "mean": mean, "p90": percentile(values, 0.9)}


def summarise(ranks: list[dict[str, Any]], method: str, skip: int) -> dict[str, dict[str, float]]:
    """Millisecond figures per quantity, the ranks pooled (skew and exchange are per pair of ranks)."""
    ms = 1e3
    out: dict[str, list[float]] = {"step": [], "forward + backward": [], "hook": [], "waits in the hook": []}
    floor: list[float] = []
    for rank in ranks:
        for s in steps_of(rank["events"], method, skip):
            out["step"].append(ms * (s["end"] - s["start"]))
            out["forward + backward"].append(ms * (s["hook_in"] - s["start"]))
            out["hook"].append(ms * (s.get("hook_out", s["hook_in"]) - s["hook_in"]))
            inside = [x for x in rank["exchanges"] if x[0] == method and s["start"] <= x[1] <= s["end"]]
            out["waits in the hook"].append(ms * sum(x[3] - x[2] for x in inside))
        floor += [ms * (s["end"] - s["start"]) for s in steps_of(rank["events"], FLOOR, skip)]
    # the exchanges of the timed steps: those issued after the first timed step began, on every rank as
    # many as on rank 0 (every rank runs the same exchanges), the same exchange at the same position
    timed = []
    for rank in ranks:
        first = steps_of(rank["events"], method, skip)[0]["start"]
        timed.append([x for x in rank["exchanges"] if x[0] == method and x[1] >= first])
    count = min(len(x) for x in timed)
    skew, exchange = [], []
    for same in zip(*[x[len(x) - count :] for x in timed]):
        skew.append(ms * (max(x[1] for x in same) - min(x[1] for x in same)))
        exchange.append(ms * max(0.0, min(x[3] for x in same) - max(x[1] for x in same)))
    out["skew between the ranks' issues"] = skew
    out["exchange once both are in"] = exchange
    exchanges_per_step = count / max(1, len(steps_of(ranks[0]["events"], method, skip)))
    result = {name: figures(values) for name, values in out.items() if values}
    result["compute-only step"] = figures(floor)
    result["exchanges per step"] = {"median": exchanges_per_step, "mean": exchanges_per_step, "p90": 0.0}
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    linkrun_args = ["--model", args.model, "--methods", f"{FLOOR},{args.method}", "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--turn", "2"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp, Lab(
        workers=args.workers, rate=None if args.rate == "unshaped" else args.rate, topology="switch"
    ) as lab:
        command = [sys.executable, str(Path(__file__).resolve()), "--rank", tmp, *linkrun_args,
                   "--out", str(Path(tmp) / "r.json")]  # fmt: skip
        lab.run_ranks(command, env={"OMP_NUM_THREADS": "1"}, timeout=900)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.workers)]
        load = os.getloadavg()[0]
    return {"summary": summarise(ranks, args.method, args.warmup), "load": load}


def render(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [
        BEGIN,
        f"## Where a step goes: {args.method} traced on every rank (`benchmarks/exchange_trace.py`)",
        "",
        f"Command: `{command}` — run {when} on {platform.machine()}, Python {platform.python_version()}, "
        f"{args.workers} gloo ranks of 1 thread in a netlab `switch` topology at {args.rate} (1-minute load "
        f"{result['load']:.1f} after the run). {FLOOR} and {args.method} take turns of 2 steps, "
        f"{args.steps} timed steps each after {args.warmup} warm-up steps; the ranks pooled. Every rank "
        "records on the machine's one monotonic clock: step start and end, the hook's start (backward done: "
        "one DDP bucket) and return, and each exchange's issue, wait and end. *skew*: how far apart the "
        "ranks issued the same exchange; *exchange once both are in*: the earlier end less the later issue. "
        "A wait much longer than the exchange is a rank waiting for the other one to arrive.",
        "",
        "| ms | median | mean | p90 |",
        "|:--|--:|--:|--:|",
    ]
    for name, f in result["summary"].items():
        if name == "exchanges per step":
            continue
        lines.append(f"| {name} | {f['median']:.2f} | {f['mean']:.2f} | {f['p90']:.2f} |")
    lines.append("")
    lines.append(f"Exchanges per step: {result['summary']['exchanges per step']['median']:.0f}.")
    lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rank"]:
        rank_main(argv[2:], Path(argv[1]))
        linkrun.exit_now()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(linkrun.WORKLOADS), default="digits_cnn")
    parser.add_argument("--method", default="powersgd:2", help="a linkrun method (gradwire's hooks)")
    parser.add_argument("--rate", default="1gbit", help="unshaped or a tc rate (1gbit, 100mbit)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method (after 2 plain ones)")
    parser.add_argument("--out", type=Path, default=None, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.steps < 1 or args.warmup < linkrun.TORCH_START_ITER:
        parser.error(f"--workers >= 2, --steps >= 1, --warmup >= {linkrun.TORCH_START_ITER} (plain steps)")
    if args.rate != "unshaped" and not parse_rate(args.rate):
        parser.error(f"--rate: {args.rate!r} is not a link rate (say 100mbit, 1gbit)")
    if args.method in ("allreduce", FLOOR) or args.method.startswith("torch-"):
        parser.error(f"--method {args.method!r}: trace one of gradwire's hooks (powersgd:2, topk:ef, ...)")
    problem = support_problem()
    if problem:
        parser.exit(2, f"exchange_trace.py: {problem}\n")
    result = measure(args)
    section = render(result, args, "python benchmarks/exchange_trace.py " + " ".join(argv))
    print(section)
    if args.out:
        write_section(args.out, section, BEGIN, END)


if __name__ == "__main__":
    main()
