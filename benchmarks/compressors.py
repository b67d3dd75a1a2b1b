#!/usr/bin/env python
"""Benchmark gradwire's compressors on two real ranks (gloo over loopback, CPU).

What it measures, per model (ResNet-18 and a small transformer LM, gradients with
the models' exact parameter shapes, random values seeded per rank):

1. ``reducer.reduce(grads)`` for every built-in compressor: wall time per step
   (encode + collectives + decode; median over ``--repeats`` after warm-up, the
   slower of the two ranks per step) and the bytes this rank puts on the wire.
2. PowerSGD inside DDP, side by side: torch's ``powerSGD_hook`` and gradwire's
   ``make_hook("powersgd")`` on the same module (one bucket), same tensors, same
   settings. The hook's cost is (forward+backward with the hook) minus
   (forward+backward with torch's ``noop_hook``).
3. Top-k encode versus a bare ``torch.topk`` on one thread.

Results are printed and written into ``--out`` between the markers
``<!-- compressors:begin -->`` and ``<!-- compressors:end -->``; the rest of the
file is left alone.

    python benchmarks/compressors.py                 # full run, ~2-5 minutes on 2 cores
    python benchmarks/compressors.py --quick         # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.report import render, write_section
from benchmarks.workloads import (
    MODELS,
    PSGD_RANKS,
    REDUCER_CONFIGS,
    RESNET18_NUMEL,
    TORCH_START_ITER,
    FixedGradients,
    Shape,
    make_grads,
    numel,
    resnet18_shapes,
)
from gradwire.compressors import make_hook, make_reducer

WORLD = 2
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slowest_rank(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per step, the slower rank's time (a step ends when both ranks have it)."""
    return [max(step) for step in zip(*per_rank)]


# --- 1. reducer.reduce ----------------------------------------------------------------


def bench_reducers(grads: list[torch.Tensor], repeats: int, warmup: int) -> list[dict[str, Any]]:
    reducers = [make_reducer(name, **params) for _label, name, params in REDUCER_CONFIGS]
    for _ in range(warmup):
        for reducer in reducers:
            reducer.reduce(grads)
    before = [reducer.stats() for reducer in reducers]
    times: list[list[float]] = [[] for _ in reducers]
    for _ in range(repeats):  # round robin, so drifting load hits every config alike
        for j, reducer in enumerate(reducers):
            dist.barrier()
            t0 = time.perf_counter()
            reducer.reduce(grads)
            times[j].append(time.perf_counter() - t0)
    rows = []
    for (label, name, _params), reducer, own, start in zip(
        REDUCER_CONFIGS, reducers, times, before
    ):
        end = reducer.stats()
        per_step = {k: (end[k] - start[k]) / repeats for k in end}
        per_rank: list[list[float]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(per_rank, own)
        rows.append(
            {
                "label": label,
                "name": name,
                "feedback": reducer.config.feedback,
                "times": slowest_rank(per_rank),
                "bytes_sent": per_step["bytes_sent"],
                "bytes_uncompressed": per_step["bytes_uncompressed"],
                "wire_bytes_sent": per_step["wire_bytes_sent"],
                "wire_bytes_uncompressed": per_step["wire_bytes_uncompressed"],
                "collectives": per_step["collectives"],
                "compress_s": per_step["compress_seconds"],
                "communicate_s": per_step["communicate_seconds"],
            }
        )
    return rows


# --- 2. PowerSGD inside DDP -----------------------------------------------------------


def ddp_variants() -> list[tuple[str, Callable[[], tuple[Any, Any]]]]:
    """(label, factory returning (state, hook) or (None, None) for DDP's built-in all-reduce)."""
    variants: list[tuple[str, Callable[[], tuple[Any, Any]]]] = [
        ("noop_hook (no communication)", lambda: (None, noop_hook)),
        ("built-in all-reduce (no hook)", lambda: (None, None)),
    ]
    for r in PSGD_RANKS:
        for batch in (False, True):

            def torch_factory(r: int = r, batch: bool = batch) -> tuple[Any, Any]:
                state = torch_psgd.PowerSGDState(
                    process_group=None,
                    matrix_approximation_rank=r,
                    start_powerSGD_iter=TORCH_START_ITER,
                    min_compression_rate=2,
                    use_error_feedback=True,
                    warm_start=True,
                    batch_tensors_with_same_shape=batch,
                )
                return state, torch_psgd.powerSGD_hook

            variants.append((f"torch powerSGD_hook r={r} batch={batch}", torch_factory))

        def gradwire_factory(r: int = r) -> tuple[Any, Any]:
            return make_hook("powersgd", rank=r)

        variants.append((f"gradwire powersgd r={r}", gradwire_factory))
    return variants


def bench_ddp(
    shapes: Sequence[tuple[str, Shape]], coeffs: list[torch.Tensor], repeats: int, warmup: int
) -> list[dict[str, Any]]:
    variants = ddp_variants()
    models = []
    for _label, factory in variants:
        ddp = DistributedDataParallel(FixedGradients(shapes, coeffs), bucket_cap_mb=4096)
        state, hook = factory()
        if hook is not None:
            ddp.register_comm_hook(state, hook)
        models.append((ddp, state))

    def step(ddp: DistributedDataParallel) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        ddp().backward()
        elapsed = time.perf_counter() - t0
        ddp.module.zero_grad(set_to_none=True)
        return elapsed

    # Untimed: torch's hook runs plain all-reduces for its first TORCH_START_ITER steps,
    # then `warmup` compressed ones; every variant gets the same number.
    for _ in range(TORCH_START_ITER + warmup):
        for ddp, _state in models:
            step(ddp)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):  # round robin, so drift hits every variant alike
        for j, (ddp, _state) in enumerate(models):
            times[j].append(step(ddp))

    rows = []
    for (label, _factory), (ddp, state), own in zip(variants, models, times):
        buckets = ddp._get_ddp_logging_data().get("rebuilt_bucket_sizes", "")
        n_buckets = len([b for b in str(buckets).replace(",", " ").split() if b])
        if n_buckets != 1:
            raise RuntimeError(f"{label}: expected one DDP bucket, got sizes {buckets!r}")
        per_rank: list[list[float]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(per_rank, own)
        ratio = None
        if isinstance(state, torch_psgd.PowerSGDState):
            ratio = state.compression_stats()[0]
        elif state is not None and hasattr(state, "stats"):
            s = state.stats()
            ratio = s["bytes_uncompressed"] / s["bytes_sent"] if s["bytes_sent"] else None
        rows.append({"label": label, "times": slowest_rank(per_rank), "ratio": ratio})
    return rows


# --- the ranks --------------------------------------------------------------------------


def rank_main(rank: int, init: str, opts: dict[str, Any], out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        results: dict[str, Any] = {}
        for m, key in enumerate(opts["models"]):
            shapes = MODELS[key][1]()
            grads = make_grads(shapes, seed=1000 * m + rank)
            started = time.perf_counter()
            results[key] = {
                "reducers": bench_reducers(grads, opts["repeats"], opts["warmup"]),
                "ddp": bench_ddp(shapes, grads, opts["repeats"], opts["warmup"]),
            }
            if rank == 0:
                print(f"  {key}: {time.perf_counter() - started:.0f} s", flush=True)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# --- 3. Top-k encode vs torch.topk ------------------------------------------------------


def bench_topk(repeats: int) -> list[dict[str, Any]]:
    from gradwire.compressors.config import TopKConfig
    from gradwire.compressors.sparse import TopK

    torch.set_num_threads(1)
    shapes = resnet18_shapes()
    grads = make_grads(shapes, seed=7)
    largest = max(range(len(shapes)), key=lambda i: numel(shapes[i][1]))
    cases = [
        (f"largest ResNet-18 tensor `{shapes[largest][0]}`", grads[largest].reshape(-1)),
        ("all ResNet-18 gradients, flattened", torch.cat([g.reshape(-1) for g in grads])),
    ]
    topk = TopK(TopKConfig(ratio=0.01))
    rows = []
    for label, flat in cases:
        k = topk.kept(flat.numel())
        fns = {
            "encode": lambda flat=flat: topk.encode(flat, key=0, step=0),
            "topk": lambda flat=flat, k=k: torch.topk(flat.abs(), k),
            "topk_unsorted": lambda flat=flat, k=k: torch.topk(flat.abs(), k, sorted=False),
        }
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(2):  # warm-up
            for fn in fns.values():
                fn()
        for _ in range(max(repeats, 5)):  # interleaved
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rows.append({"label": label, "numel": flat.numel(), "k": k, "times": times})
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per config")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--models", default="resnet18,transformer", help="comma-separated: resnet18, transformer"
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (2 steps, 1 warm-up)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave --out alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 2, 1
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    assert sum(numel(s) for _, s in resnet18_shapes()) == RESNET18_NUMEL

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    opts = {"models": models, "repeats": args.repeats, "warmup": args.warmup}
    print(
        f"spawning {WORLD} gloo ranks: models={models} repeats={args.repeats} warmup={args.warmup}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        init = f"tcp://127.0.0.1:{free_port()}"
        mp.spawn(rank_main, args=(init, opts, out), nprocs=WORLD, join=True)
        results = json.loads(Path(out).read_text())
    print("top-k encode vs torch.topk", flush=True)
    topk_rows = bench_topk(args.repeats)

    meta = {
        "command": "python "
        + " ".join(
            shlex.quote(a)
            for a in (sys.argv if argv is None else ["benchmarks/compressors.py", *argv])
        ),
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_before": load_before,
        "library": library_version(),
        "load_after": os.getloadavg()[0],
    }
    section = render(results, topk_rows, meta)
    print()
    print(section)
    if not args.no_write:
        write_section(args.out, section)
        print(f"wrote {args.out}")
    print(f"total {time.perf_counter() - started:.0f} s")


def library_version() -> str:
    """Which gradwire.compressors was measured: git HEAD (+ whether its sources differ
    from it) and a hash of the source files actually imported."""
    import hashlib
    import subprocess

    import gradwire.compressors as lib

    src = Path(lib.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    desc = f"sources sha256 {digest.hexdigest()[:12]}"
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "diff", "--quiet", "HEAD", "--", "."], timeout=10
        ).returncode
        desc = f"git {head}{' + uncommitted changes' if dirty else ''}, {desc}"
    except (OSError, subprocess.SubprocessError):
        pass
    return desc


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
