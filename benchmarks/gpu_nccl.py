"""What only a GPU shows: the NCCL code path and the compressors' speed on the GPU.

One GPU means an NCCL group of one rank (NCCL refuses two ranks on one device),
so this checks that every collective, dtype and hook path runs on NCCL and agrees
with the same computation on gloo/CPU, and times the compressors' GPU kernels.
Writes ``$OUT/gpu.json`` and ``$OUT/gpu.md`` (or ``./gpu-out/``).

    python benchmarks/gpu_nccl.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd
from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.workloads import (
    FixedGradients,
    make_grads,
    resnet18_shapes,
    transformer_shapes,
)
from gradwire.compressors import make_hook, make_reducer
from gradwire.compressors.config import TopKConfig
from gradwire.compressors.sparse import TopK

CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("none", "none", {}),
    ("fp16", "fp16", {}),
    ("bf16", "bf16", {}),
    ("powersgd r=2", "powersgd", {"rank": 2}),
    ("powersgd r=4", "powersgd", {"rank": 4}),
    ("topk 1% ef", "topk", {"ratio": 0.01}),
    ("topk 1% ef21", "topk", {"ratio": 0.01, "feedback": "ef21"}),
    ("topk 1% econtrol", "topk", {"ratio": 0.01, "feedback": "econtrol", "eta": 0.1}),
    ("randk 1%", "randk", {"ratio": 0.01}),
    ("qsgd", "qsgd", {}),
    ("sign", "sign", {}),
]


DEV = "cuda"  # --dry-run switches to CPU + gloo to test this script without a GPU


def cuda_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_against_gloo(gloo: Any, log: list[dict[str, Any]]) -> None:
    """Each compressor on NCCL/GPU vs the same on gloo/CPU: outputs and bytes."""
    shapes = resnet18_shapes()
    for label, name, params in CONFIGS:
        on_gpu = make_reducer(name, **params)
        on_cpu = make_reducer(name, process_group=gloo, **params)
        worst, off, total = 0.0, 0, 0
        for step in range(3):
            grads = make_grads(shapes, seed=step)
            out_gpu = on_gpu.reduce([g.to(DEV) for g in grads])
            out_cpu = on_cpu.reduce(grads)
            for a, b in zip(out_gpu, out_cpu):
                scale = b.abs().max().item() or 1.0
                diff = (a.cpu() - b).abs() / scale
                worst = max(worst, diff.max().item())
                off += int((diff > 1e-3).sum())
                total += b.numel()
        same_bytes = on_gpu.stats()["bytes_sent"] == on_cpu.stats()["bytes_sent"]
        stochastic = name == "qsgd"  # per-device RNG streams differ by design
        # sign is discontinuous: EF round-off between devices may flip an element near 0
        ok = same_bytes and (stochastic or worst < 1e-3 or off <= 1e-5 * total)
        log.append({"check": f"NCCL vs gloo: {label}", "ok": ok,
                    "detail": f"max rel diff {worst:.2e} ({off} of {total} elements off), "
                              f"bytes equal {same_bytes}"})


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(512, 512) for _ in range(8)], nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def check_ddp_buckets(log: list[dict[str, Any]]) -> None:
    """DDP with several buckets on NCCL: runs, and 'none' equals DDP's own all-reduce."""
    x = torch.randn(64, 512, device=DEV)
    y = torch.randint(0, 10, (64,), device=DEV)
    finals = {}
    for label, name, params in [("plain DDP", None, {}), ("none", "none", {}),
                                ("powersgd r=2", "powersgd", {"rank": 2}),
                                ("topk ef21", "topk", {"ratio": 0.05, "feedback": "ef21"}),
                                ("qsgd", "qsgd", {})]:
        torch.manual_seed(0)
        ddp = DDP(Deep().to(DEV), bucket_cap_mb=1)
        seen: set[int] = set()
        if name is not None:
            state, hook = make_hook(name, **params)

            def counting(st, bucket, hook=hook, seen=seen):  # unannotated: DDP checks them
                seen.add(bucket.index())
                return hook(st, bucket)

            ddp.register_comm_hook(state, counting)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        started = time.perf_counter()
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        if DEV == "cuda":
            torch.cuda.synchronize()
        finals[label] = [p.detach().clone() for p in ddp.parameters()]
        log.append({"check": f"DDP on NCCL, {label}", "ok": name is None or len(seen) > 1,
                    "detail": f"{len(seen)} buckets, 5 steps in {time.perf_counter() - started:.2f}s"})
    diff = max((a - b).abs().max().item() for a, b in zip(finals["plain DDP"], finals["none"]))
    log.append({"check": "hook 'none' == DDP all-reduce on NCCL", "ok": diff < 1e-5,
                "detail": f"max param diff {diff:.2e}"})


def check_state_and_nan(log: list[dict[str, Any]]) -> None:
    shapes = transformer_shapes()
    for label, name, params in [("powersgd r=2", "powersgd", {"rank": 2}),
                                ("topk ef21", "topk", {"ratio": 0.01, "feedback": "ef21"}),
                                ("topk econtrol", "topk", {"ratio": 0.01, "feedback": "econtrol"})]:
        grads = [[g.to(DEV) for g in make_grads(shapes, seed=s)] for s in range(6)]
        full = make_reducer(name, **params)
        outs, saved = [], None
        for step, g in enumerate(grads):
            if step == 3:
                saved = full.state_dict()
            out = full.reduce(g)
            if step >= 3:
                outs.append(out)
        resumed = make_reducer(name, **params)
        resumed.load_state_dict(saved)
        again = [resumed.reduce(g) for g in grads[3:]]
        exact = all(torch.equal(a, b) for sa, sb in zip(outs, again) for a, b in zip(sa, sb))
        log.append({"check": f"state round trip on GPU, {label}", "ok": exact,
                    "detail": "bit for bit" if exact else "differs"})
    r = make_reducer("topk", ratio=0.01, feedback="ef21")
    r.reduce([g.to(DEV) for g in make_grads(shapes, seed=0)])
    bad = [g.to(DEV) for g in make_grads(shapes, seed=1)]
    bad[0][0, 0] = float("nan")
    before = {k: {n: t.clone() for n, t in b.items()} for k, b in r.feedback.state.items()}
    out = r.reduce(bad)
    unchanged = all(torch.equal(before[k][n], r.feedback.state[k][n]) for k in before for n in before[k])
    log.append({"check": "NaN on GPU: all outputs NaN, state unchanged",
                "ok": all(torch.isnan(o).all().item() for o in out) and unchanged, "detail": ""})


def speed(repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {"reduce_ms": {}, "ddp_ms": {}, "topk": {}}
    for model, shapes in (("resnet18", resnet18_shapes()), ("transformer", transformer_shapes())):
        grads = [g.to(DEV) for g in make_grads(shapes, seed=0)]
        for label, name, params in CONFIGS:
            reducer = make_reducer(name, **params)
            ms = cuda_ms(lambda reducer=reducer, grads=grads: reducer.reduce(grads), repeats)
            s = reducer.stats()
            result["reduce_ms"][f"{model} | {label}"] = {
                "ms": ms, "ratio": s["bytes_uncompressed"] / s["bytes_sent"]}
        # PowerSGD inside DDP, one bucket, vs torch's hook on the same tensors
        coeffs = [g.clone() for g in grads]
        variants: list[tuple[str, Callable[[], tuple[Any, Any]]]] = [
            ("noop_hook", lambda: (None, noop_hook))]
        for r in (2, 4):
            variants.append((f"torch powerSGD_hook r={r}", lambda r=r: (torch_psgd.PowerSGDState(
                process_group=None, matrix_approximation_rank=r, start_powerSGD_iter=2,
                batch_tensors_with_same_shape=True), torch_psgd.powerSGD_hook)))
            variants.append((f"gradwire powersgd r={r}", lambda r=r: make_hook("powersgd", rank=r)))
        for label, factory in variants:
            module = FixedGradients(shapes, coeffs).to(DEV)
            module.coeffs = coeffs
            ddp = DDP(module, bucket_cap_mb=4096)
            state, hook = factory()
            ddp.register_comm_hook(state, hook)

            def step(ddp: DDP = ddp) -> None:
                ddp().backward()
                ddp.module.zero_grad(set_to_none=True)

            for _ in range(3):
                step()
            result["ddp_ms"][f"{model} | {label}"] = cuda_ms(step, repeats)
    flat = torch.cat([g.reshape(-1) for g in make_grads(resnet18_shapes(), seed=0)]).to(DEV)
    largest = max(make_grads(resnet18_shapes(), seed=0), key=lambda t: t.numel()).reshape(-1).to(DEV)
    for label, t in (("largest ResNet-18 tensor", largest), ("all ResNet-18 gradients, flat", flat)):
        k = max(1, round(0.01 * t.numel()))
        ours = TopK(TopKConfig(k=k))
        result["topk"][label] = {
            "numel": t.numel(),
            "torch.topk ms": cuda_ms(lambda t=t, k=k: torch.topk(t.abs(), k, sorted=False), repeats),
            "gradwire encode ms": cuda_ms(lambda t=t, ours=ours: ours.encode(t, 0, 0), repeats),
        }
    return result


def render(log: list[dict[str, Any]], perf: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"GPU: {meta['gpu']}, torch {meta['torch']}, NCCL {meta['nccl']}, "
             f"median of {meta['repeats']} (CUDA events)", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'ok' if c['ok'] else 'FAILED'} | {c['detail']} |" for c in log]
    lines += ["", "| model / compressor | reduce() ms | compression ratio |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['ms']:.3f} | {v['ratio']:.1f}× |" for k, v in perf["reduce_ms"].items()]
    lines += ["", "| model / DDP step with hook (one bucket) | ms | minus noop_hook |", "|---|---:|---:|"]
    for key, ms in perf["ddp_ms"].items():
        model = key.split(" | ")[0]
        lines.append(f"| {key} | {ms:.3f} | {ms - perf['ddp_ms'][f'{model} | noop_hook']:.3f} |")
    lines += ["", "| Top-k 1 % on | elements | torch.topk ms | gradwire encode ms | ratio |",
              "|---|---:|---:|---:|---:|"]
    for key, v in perf["topk"].items():
        ratio = v["gradwire encode ms"] / v["torch.topk ms"]
        lines.append(f"| {key} | {v['numel']:,} | {v['torch.topk ms']:.3f} | "
                     f"{v['gradwire encode ms']:.3f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="CPU + gloo, to test the script")
    args = parser.parse_args()
    global DEV
    DEV = "cpu" if args.dry_run else "cuda"
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if DEV == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if DEV == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    gloo = dist.new_group(backend="gloo")
    log: list[dict[str, Any]] = []
    for check in (lambda: check_against_gloo(gloo, log), lambda: check_ddp_buckets(log),
                  lambda: check_state_and_nan(log)):
        try:
            check()
        except Exception as exc:  # keep going: report every check
            log.append({"check": "exception", "ok": False, "detail": repr(exc)[:300]})
    perf = speed(args.repeats)
    gpu = DEV == "cuda"
    meta = {"gpu": torch.cuda.get_device_name(0) if gpu else "none (dry run)",
            "torch": torch.__version__, "repeats": args.repeats,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else "-"}
    (out / "gpu.json").write_text(json.dumps({"checks": log, "perf": perf, "meta": meta}, indent=2))
    text = render(log, perf, meta)
    (out / "gpu.md").write_text(text)
    print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
