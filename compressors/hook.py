"""Adapter from a :class:`Reducer` to ``DistributedDataParallel.register_comm_hook``.

    state, hook = make_hook("powersgd", rank=2)
    ddp.register_comm_hook(state, hook)

State is keyed by parameter (the order in which this process first sees each
parameter), never by bucket index, so DDP's bucket rebuild after the first step
does not reset error buffers. Keys are stable across runs of the same model,
which is what makes ``state_dict()`` resumable.

Compressor ``none`` without feedback returns the all-reduce's own future, as DDP's default hook
does (a single collective per bucket cannot deadlock). Every other configuration
runs its collectives to completion before returning a finished future:
it never launches a collective from inside a future callback, which is what
deadlocks torch's ``powerSGD_hook`` on gloo with more than one bucket (gloo's
worker threads block in the callbacks waiting for the nested all-reduce). The
cost is that a bucket's communication does not overlap the rest of backward.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations
# against the real dist.GradBucket and torch.futures.Future classes.
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.reducer import Reducer


class HookState:
    """The object passed as ``state`` to DDP; also what you checkpoint."""

    def __init__(self, reducer: Reducer):
        self.reducer = reducer
        self._keys: dict[int, int] = {}

    def key_for(self, param: torch.Tensor) -> int:
        pid = id(param)
        if pid not in self._keys:
            self._keys[pid] = len(self._keys)
        return self._keys[pid]

    def stats(self) -> dict[str, float]:
        return self.reducer.stats()

    def state_dict(self) -> dict[str, Any]:
        return self.reducer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reducer.load_state_dict(state)

    def __getstate__(self) -> "dict[str, Any]":  # it holds a process group, which cannot travel
        raise TypeError(
            "a gradwire hook state does not pickle: save state_dict() and, after rebuilding "
            "the hook with make_hook(), call load_state_dict()"
        )


def _bucket_views(bucket: dist.GradBucket) -> list[torch.Tensor]:
    buffer = bucket.buffer()
    views, offset = [], 0
    for grad in bucket.gradients():
        views.append(buffer[offset : offset + grad.numel()].view(grad.shape))
        offset += grad.numel()
    if offset != buffer.numel():
        raise RuntimeError(
            f"DDP bucket layout not understood: {offset} gradient elements in a buffer of "
            f"{buffer.numel()}"
        )
    return views


def reducer_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    if state.reducer.passthrough:  # 'none': one asynchronous all-reduce of the bucket, like DDP's own
        return state.reducer.reduce_flat_async(bucket.buffer(), advance=bucket.is_last())
    views = _bucket_views(bucket)
    keys = [state.key_for(p) for p in bucket.parameters()]
    state.reducer.reduce(views, keys=keys, advance=bucket.is_last(), out=views)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future
