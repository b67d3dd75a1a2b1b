"""Adapter from a :class:`Reducer` to ``DistributedDataParallel.register_comm_hook``.

    state, hook = make_hook("powersgd", rank=2)
    ddp.register_comm_hook(state, hook)

State is keyed by parameter (the order in which this process first sees each
parameter), never by bucket index, so DDP's bucket rebuild after the first step
does not reset error buffers. Keys are stable across runs of the same model,
which is what makes ``state_dict()`` resumable.

Compressor ``none`` without feedback returns the all-reduce's own future, as DDP's default hook
does (a single collective per bucket cannot deadlock).

Every other configuration, with ``make_hook(..., overlap=True)`` and more than one rank, hands each
bucket to one background thread of the hook's own and returns at once, so a bucket is encoded,
exchanged and decoded while backward goes on computing the next buckets' gradients; DDP waits for
the results at the end of backward. The thread takes buckets in the order DDP hands them over
(the same on every rank) and issues their collectives on a process group of the hook's own
(``dist.new_group()`` of the same ranks, made by :func:`make_hook`), so they never interleave with
collectives the training code or DDP itself issue on the default group. Nothing is launched from
inside a future callback, which is what deadlocks torch's ``powerSGD_hook`` on gloo with more than
one bucket (gloo's worker threads block in the callbacks waiting for the nested all-reduce).

By default (``overlap=False``) each bucket's collectives run to completion inside the hook call:
simpler, no thread, but a bucket's communication does not overlap the rest of backward.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations
# against the real dist.GradBucket and torch.futures.Future classes.
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.reducer import Reducer


class HookState:
    """The object passed as ``state`` to DDP; also what you checkpoint."""

    def __init__(self, reducer: Reducer, overlap: bool = False):
        self.reducer = reducer
        self._keys: dict[int, int] = {}
        self.overlap = bool(overlap) and not reducer.passthrough and reducer.comm.world_size > 1
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._last_handed = 0.0  # perf_counter() when the step's last bucket was handed over
        #: seconds backward waited for communication after handing over its last bucket (overlap only)
        self.exposed_seconds = 0.0

    def submit(self, job: Any) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradwire-hook")
        self._worker.submit(job)

    def close(self) -> None:
        """Stop the background thread (a later bucket starts a new one)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def key_for(self, param: torch.Tensor) -> int:
        pid = id(param)
        if pid not in self._keys:
            self._keys[pid] = len(self._keys)
        return self._keys[pid]

    def stats(self) -> dict[str, float]:
        with self._lock:
            exposed = self.exposed_seconds
        return {**self.reducer.stats(), "overlap": float(self.overlap), "exposed_seconds": exposed}

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
    buffer, last = bucket.buffer(), bucket.is_last()
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    if not state.overlap:
        state.reducer.reduce(views, keys=keys, advance=last, out=views)
        future.set_result(buffer)
        return future
    if last:
        state._last_handed = time.perf_counter()

    def reduce_bucket() -> None:
        try:
            state.reducer.reduce(views, keys=keys, advance=last, out=views)
        except BaseException as err:  # DDP re-raises it from loss.backward()
            future.set_exception(err)
            return
        if last:
            with state._lock:
                state.exposed_seconds += time.perf_counter() - state._last_handed
        future.set_result(buffer)

    state.submit(reduce_bucket)
    return future
