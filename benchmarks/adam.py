#!/usr/bin/env python
"""Compression with Adam: test accuracy of the small LM after N steps, and bytes per step, for each
way of compressing (2 gloo ranks on loopback, one per core).

The workload is ``tiny_lm`` of ``benchmarks/linkrun.py`` (a 4-layer, d=128 causal transformer on
tiny_text) with its optimizer, Adam at lr 0.003 (constant, torch's betas and eps). Each rank takes
``--batch`` sequences per step (64: the same 128 per step as ``links.py``'s 4 ranks × 32). Accuracy
per step does not depend on the link, so no network lab is needed. Every method trains its own copy of
the model from the same initial weights on the same batches, the methods taking turns ``--turn`` steps
at a time in the same two processes; each is evaluated every ``--eval-every`` steps and at the end.
Bytes are this rank's payload per step from gradwire's ledger, averaged over all steps (warm-up
included), against a plain fp32 all-reduce of the gradients (4 bytes × parameters).

Methods (comma-separated ``--methods``):

* ``allreduce``: DDP's own all-reduce, Adam (the baseline);
* ``powersgd:R:sS``: gradwire PowerSGD rank R with EF, S plain steps first (``:mX`` min compression
  rate X);
* ``topk:RULE:RATIO``: Top-k with feedback RULE (ef, ef21, ef21-sgdm, econtrol), Adam on the result;
* ``onebit:COMP:wW``: ``OneBitAdam`` (compressors/onebit_adam.py): W Adam warm-up steps, then v frozen
  and the momentum compressed by COMP (``sign``, ``sign256`` for one scale per 256 elements,
  ``powersgd4`` for rank 4, ``topk0.01``...) with EF (``:bits2``: the 2-bit sign, ``:ef21``: EF21,
  ``:bf16w``: the warm-up's gradients all-reduced in bfloat16);
  ``:doubling`` adds 0/1 Adam's full-precision variance refreshes at 2W, 4W, ...; ``:pK`` one every K
  steps after the freeze; ``:update`` compresses the momentum divided by the frozen √v̂ + ε (the
  update) instead of the momentum; ``:local`` keeps per-rank moments and compresses the ranks' Adam
  steps

    python benchmarks/adam.py --json /tmp/adam.json --resume --methods allreduce,onebit:sign:w20
    python benchmarks/adam.py --json /tmp/adam.json --render   # the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.linkrun import ONE_BUCKET_MB, WORKLOADS, evaluate, exit_now, loss_and_correct
from benchmarks.sections import write_section
from gradwire.compressors import make_hook
from gradwire.compressors.onebit_adam import OneBitAdam
from gradwire.worker.datasets import get_dataset
from gradwire.worker.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- adam:begin -->", "<!-- adam:end -->"
WORLD = 2
MODEL = "tiny_lm"


def parse_method(method: str) -> dict[str, Any]:
    """``{"kind": "allreduce" | "hook" | "onebit", ...}`` for a method name (see the docstring)."""
    parts = method.split(":")
    head, rest = parts[0], parts[1:]
    try:
        if method == "allreduce":
            return {"kind": "allreduce"}
        if head == "powersgd" and rest:
            params: dict[str, Any] = {"rank": int(rest[0]), "feedback": "ef", "start_iter": 0}
            for opt in rest[1:]:
                if opt[0] == "s":
                    params["start_iter"] = int(opt[1:])
                elif opt[0] == "m":
                    params["min_compression_rate"] = float(opt[1:])
                else:
                    raise ValueError(opt)
            return {"kind": "hook", "name": "powersgd", "params": params}
        if head == "topk" and len(rest) == 2:
            return {"kind": "hook", "name": "topk", "params": {"feedback": rest[0], "ratio": float(rest[1])}}
        if head == "onebit" and len(rest) >= 2 and rest[1][0] == "w":
            comp, cparams = momentum_compressor(rest[0])
            variance, space, every, warmup = "frozen", "momentum", None, "float32"
            for opt in rest[2:]:
                if opt == "doubling":
                    variance = "doubling"
                elif opt == "local":
                    variance, space = "local", "update"
                elif opt[0] == "p":
                    variance, every = "periodic", int(opt[1:])
                elif opt == "update":
                    space = "update"
                elif opt == "bf16w":
                    warmup = "bfloat16"
                elif opt == "bits2":
                    cparams = {**cparams, "bits": 2}
                elif opt == "ef21":
                    cparams = {**cparams, "feedback": "ef21"}
                else:
                    raise ValueError(opt)
            return {"kind": "onebit", "compressor": comp, "compressor_params": cparams,
                    "freeze_step": int(rest[1][1:]), "variance": variance, "space": space,
                    "refresh_every": every, "warmup_dtype": warmup}  # fmt: skip
    except (ValueError, IndexError):
        pass
    raise ValueError(f"cannot read method {method!r}: see benchmarks/adam.py's docstring for the forms")


def momentum_compressor(text: str) -> tuple[str, dict[str, Any]]:
    forms = (
        ("powersgd", "rank", int), ("topk", "ratio", float), ("randk", "ratio", float),
        ("sign", "block", int),
    )  # fmt: skip
    for name, key, cast in forms:
        if text.startswith(name):
            return name, {key: cast(text[len(name) :])} if text != name else {}
    return text, {}


class Run:
    """One method's model, DDP, optimizer and batch stream on this rank."""

    def __init__(self, method: str, data: Any, args: argparse.Namespace, rank: int) -> None:
        spec = parse_method(method)
        work = WORKLOADS[MODEL]
        self.method, self.kind, self.data, self.batch = method, spec["kind"], data, args.batch
        torch.manual_seed(args.seed)  # every method starts from the same weights on every rank
        name, params = work["model"]
        model = build_model(name, data.num_features, data.num_classes, **params)
        self.numel = sum(p.numel() for p in model.parameters())
        cap = None if self.kind == "allreduce" else ONE_BUCKET_MB
        self.ddp = DistributedDataParallel(model, bucket_cap_mb=cap)
        lr = work["optimizer"][1]
        self.state: Any = None
        if self.kind == "onebit":
            names = ("freeze_step", "variance", "refresh_every", "space", "compressor", "compressor_params",
                     "warmup_dtype")  # fmt: skip
            options = {k: spec[k] for k in names}
            self.opt = OneBitAdam(self.ddp.parameters(), lr=lr, **options)
            self.ddp.register_comm_hook(*self.opt.comm_hook())
            self.state = self.opt
        else:
            self.opt = torch.optim.Adam(self.ddp.parameters(), lr=lr)
            if self.kind == "hook":
                self.state, hook = make_hook(spec["name"], **spec["params"])
                self.ddp.register_comm_hook(self.state, hook)
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # same batches for every method
        self.steps, self.seconds, self.evals = 0, 0.0, []

    def step(self) -> None:
        idx = torch.randint(len(self.data.y_train), (self.batch,), generator=self.gen)
        started = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss, _, _ = loss_and_correct(self.ddp, self.data.x_train[idx], self.data.y_train[idx])
        loss.backward()
        self.opt.step()
        self.seconds += time.perf_counter() - started
        self.steps += 1

    def evaluate(self) -> None:
        accuracy, loss = evaluate(self.ddp.module, self.data)
        self.evals.append({"step": self.steps, "test_accuracy": accuracy, "test_loss": loss})

    def record(self) -> dict[str, Any]:
        """This method's result (a collective: the ranks compare a hash of their parameters)."""
        plain = 4.0 * self.numel
        if self.state is None:
            sent, wire = plain, plain * 2 * (WORLD - 1) / WORLD
        else:
            stats = self.state.stats()
            sent, wire = stats["bytes_sent"] / self.steps, stats["wire_bytes_sent"] / self.steps
        digest = hashlib.sha256()
        for p in self.ddp.module.parameters():
            digest.update(p.detach().contiguous().numpy().tobytes())
        digests: list[Any] = [None] * WORLD
        dist.all_gather_object(digests, digest.hexdigest())
        return {
            "method": self.method, "steps": self.steps, "params": self.numel,
            "bytes_per_step": sent, "wire_bytes_per_step": wire, "plain_bytes_per_step": plain,
            "ratio": plain / sent, "evals": self.evals, "final_accuracy": self.evals[-1]["test_accuracy"],
            "seconds_per_step": self.seconds / self.steps, "ranks_identical": len(set(digests)) == 1,
        }  # fmt: skip


def rank_main(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=dt.timedelta(seconds=600))
    data_name, data_params = WORKLOADS[MODEL]["dataset"]
    data = get_dataset(data_name, seed=args.seed, **data_params)
    runs = [Run(method, data, args, rank) for method in args.methods]
    for first in range(0, args.steps, args.turn):
        for run in runs:  # the methods take turns: a shared machine's drift falls on all alike
            for _ in range(min(args.turn, args.steps - first)):
                run.step()
                if run.steps % args.eval_every == 0 or run.steps == args.steps:
                    run.evaluate()
    records = [run.record() for run in runs]
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(records))
    exit_now()  # gloo may abort in the interpreter's teardown (pytorch/pytorch#190489)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="adam-") as tmp:
        out = str(Path(tmp) / "records.json")
        mp.spawn(rank_main, args=(free_port(), args, out), nprocs=WORLD, join=True)
        return json.loads(Path(out).read_text())


LEGEND = [
    "Methods: `allreduce` is DDP's own all-reduce with `torch.optim.Adam`; `powersgd:R:sS` gradwire's "
    "PowerSGD hook, rank R with EF, S plain steps first, Adam on its output; `topk:RULE:RATIO` the Top-k "
    "hook with feedback RULE; `onebit:COMP:wW` is `OneBitAdam` (compressors/onebit_adam.py): W plain Adam "
    "steps, then v frozen and the momentum sent through COMP with EF (`sign` 1 bit per element, "
    "`powersgd4` rank 4); `:doubling` refreshes v in full precision at steps 2W, 4W, …, `:pK` every K "
    "steps; `:update` compresses m/(√v̂+ε) instead of m; `:local` keeps each rank's own m and v (never "
    "frozen) and compresses each rank's Adam step. `signB` gives each run of B elements its own scale; "
    "`:bits2` is the 2-bit sign (a second bit per element says whether its |x| is above the mean, each class "
    "sent at its own mean |x|); `:ef21` replaces EF with EF21 estimates of the steps; `:bf16w` all-reduces "
    "the warm-up's gradients in bfloat16 (half its bytes); `fp16` sends the steps in fp16.",
]


def run_key(method: str, steps: int, batch: int, seed: int) -> str:
    """A run's key in ``--json`` (seed 0's without a suffix, as the first runs were keyed)."""
    return f"{method}|{steps}|{batch}" + (f"|s{seed}" if seed else "")


def setting(run: dict[str, Any]) -> tuple[int, int, int]:
    """What a run is compared within: steps, batch per rank, seed (weights, batches, data)."""
    return run["steps"], run.get("batch", 64), run.get("seed", 0)


def render(saved: dict[str, Any]) -> str:
    runs = list(saved["runs"].values())
    bases = {setting(r): r for r in runs if r["method"] == "allreduce"}
    lines = [
        BEGIN, "## Compression with Adam (`benchmarks/adam.py`)", "",
        f"Commands: {'; '.join(f'`{c}`' for c in saved['commands'])}. Last run {saved['date']} on "
        f"{platform.machine()}, Python {platform.python_version()}, 2 shared cores (1-minute load "
        f"{saved['load']} at the start of the last run), {WORLD} gloo ranks on loopback (one thread each). "
        "Workload `tiny_lm` (4-layer d=128 transformer LM on tiny_text, Adam lr 0.003, 0.8 M parameters), "
        "every method from the same weights on the same batches, the methods of one command taking turns "
        "25 steps at a time. *bytes/step*: this rank's payload from the ledger averaged over every step "
        "(warm-up included); *ratio*: a plain fp32 all-reduce's bytes over the method's; *Δ*: accuracy "
        "points against `allreduce` with the same steps, batch and seed (the seed draws the weights, the "
        "batches and the corpus). The target (issue 18): within 1 point at a ratio of 10 or more.", "",
        "| method | steps | batch/rank | seed | test accuracy | Δ points | bytes/step/rank | ratio | target "
        "| ranks identical | accuracy on the way, % |", "|:--|--:|--:|--:|--:|--:|--:|--:|:--|:--|:--|",
    ]  # fmt: skip
    for run in sorted(runs, key=setting):
        base = bases.get(setting(run))
        acc = run["final_accuracy"]
        delta = 100 * (acc - base["final_accuracy"]) if base else float("nan")
        met = "met" if base and delta >= -1.0 and run["ratio"] >= 10 else "–"
        lines.append(
            f"| {run['method']} | {run['steps']} | {run.get('batch', 64)} | {run.get('seed', 0)} "
            f"| {100 * acc:.1f} % | {delta:+.1f} "
            f"| {run['bytes_per_step']:,.0f} | {run['ratio']:.1f}× | {met} | {run['ranks_identical']} | "
            + " → ".join(f"{100 * e['test_accuracy']:.0f}" for e in run["evals"])
            + " |"
        )
    lines += ["", *LEGEND, "", *saved.get("notes", []), "", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="allreduce", help="comma-separated (see the docstring)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64, help="sequences per rank and step")
    parser.add_argument("--turn", type=int, default=25, help="steps per method and turn")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="results file (kept across runs)")
    parser.add_argument("--resume", action="store_true", help="keep and skip the runs already in --json")
    parser.add_argument("--render", action="store_true", help="write the table from --json and stop")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.turn, args.eval_every) < 1:
        parser.error("--steps, --batch, --turn and --eval-every must be >= 1")
    saved: dict[str, Any] = {"runs": {}, "commands": []}
    if args.json.exists() and (args.resume or args.render):
        saved = json.loads(args.json.read_text())
    if args.render:
        section = render(saved)
        print(section)
        write_section(args.out, section, BEGIN, END)
        return
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        try:
            parse_method(method)
        except ValueError as err:
            parser.error(str(err))
    args.methods = [m for m in methods if run_key(m, args.steps, args.batch, args.seed) not in saved["runs"]]
    if not args.methods:
        print("every method is in --json already")
        return
    load = os.getloadavg()[0]
    for record in measure(args):
        key = run_key(record["method"], args.steps, args.batch, args.seed)
        saved["runs"][key] = {**record, "batch": args.batch, "seed": args.seed}
        print(f"{record['method']:28s} acc {100 * record['final_accuracy']:5.1f} %  "
              f"ratio {record['ratio']:6.1f}x  {1000 * record['seconds_per_step']:.0f} ms/step  "
              f"identical {record['ranks_identical']}", flush=True)  # fmt: skip
    command = f"python benchmarks/adam.py --json F --resume --methods {','.join(args.methods)}"
    if args.steps != 400 or args.batch != 64:
        command += f" --steps {args.steps} --batch {args.batch}"
    if args.seed:
        command += f" --seed {args.seed}"
    saved["commands"].append(command)
    saved["date"], saved["load"] = dt.date.today().isoformat(), f"{load:.1f}"
    args.json.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
