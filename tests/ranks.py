"""Run a function on N real gloo ranks (separate processes) and collect their results."""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init: str, fn: Callable, args: tuple, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result: Any = fn(rank, world, *args)
        torch.save({"ok": True, "result": result}, f"{out}.{rank}")
    except BaseException:  # report any failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, f"{out}.{rank}")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo processes; returns each rank's result.

    ``fn`` must be importable (defined at module level in a test module)."""
    with tempfile.TemporaryDirectory() as tmp:
        # a file store: no TCP store server listening on every interface (gloo's own pair
        # sockets stay on loopback through GLOO_SOCKET_IFNAME=lo)
        init = f"file://{os.path.join(tmp, 'store')}"
        out = os.path.join(tmp, "result")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, init, fn, args, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank processes still running after {timeout}s (deadlock?)")
        results = []
        for r in range(world):
            path = f"{out}.{r}"
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} exited with code {procs[r].exitcode} and no result")
            got = torch.load(path, weights_only=False)
            if not got["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{got['error']}")
            results.append(got["result"])
        return results
