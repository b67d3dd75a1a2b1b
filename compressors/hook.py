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
simpler, no thread, but a bucket's communication does not overlap the rest of backward. The exception
is ``auto`` while it runs plain all-reduce: it returns the all-reduce's own future, as ``none`` does
(``Reducer.reduce_bucket``).

Binding and pickling. The state binds to its process group when the hook first runs (or at
``make_hook`` if ``torch.distributed`` is initialised by then): the reducer reads rank and world
size, the compressor is set up, and with ``overlap=True`` the hook's own group is made. So a state
built before ``init_process_group`` (Lightning's ``DDPStrategy(ddp_comm_state=...)``) works; one
used in a group of another world size, or after its group is gone, raises
:class:`~gradwire.compressors.communicator.ProcessGroupMismatch`. Like torch's ``PowerSGDState``, a
state pickles without its process groups, thread and lock (``torch.save(state)``, Lightning's
``spawn``) and binds again at first use: to the default group, on the rank and world size it was
pickled on. One given an explicit process group refuses to bind after unpickling until
``set_process_group(group)`` names one again.

The hook serves dense gradients only: a sparse gradient (``nn.Embedding(sparse=True)``) raises at
once, naming the parameter's shape, unless the compressor is ``none`` without feedback, which
all-reduces the sparse tensor as DDP itself does.
"""

# No `from __future__ import annotations` here: DDP checks the hook's annotations
# against the real dist.GradBucket and torch.futures.Future classes.
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.communicator import dist_initialised
from gradwire.compressors.reducer import Reducer


class SparseGradientError(TypeError):
    """DDP handed the hook a sparse gradient, which gradwire's compressors cannot encode."""


class HookState:
    """The object passed as ``state`` to DDP; also what you checkpoint."""

    def __init__(self, reducer: Reducer, overlap: bool = False):
        self.reducer = reducer
        self._keys: dict[int, int] = {}
        #: overlap as asked for; it takes effect at binding if the group has more than one rank
        self.overlap_requested = bool(overlap) and not reducer.passthrough
        self._overlap = False
        self._bound = False
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._last_handed = 0.0  # perf_counter() when the step's last bucket was handed over
        #: seconds backward waited for communication after handing over its last bucket (overlap only)
        self.exposed_seconds = 0.0
        if dist_initialised():
            self.bind()

    @property
    def overlap(self) -> bool:
        """Whether buckets are reduced on the hook's own thread (known once bound)."""
        return self._overlap if self._bound else self.overlap_requested

    def bind(self) -> None:
        """Bind the reducer to its process group and, for ``overlap``, make the hook's own group of
        the same ranks (a collective: every rank binds at the same point, as the hook's first call
        does). Once bound, check that the group still matches."""
        if self._bound:
            self.reducer.bind()
            return
        self.reducer.bind()
        comm = self.reducer.comm
        if self.overlap_requested and comm.world_size > 1:
            ranks = None if comm.group is None else dist.get_process_group_ranks(comm.group)
            comm.channel = dist.new_group(ranks)
            self._overlap = True
        self._bound = True

    def set_process_group(self, process_group: Any) -> None:
        """The process group of a state that is not bound yet (one unpickled, say)."""
        if self._bound:
            raise RuntimeError("this hook state is bound already; build a new one with make_hook()")
        self.reducer.set_process_group(process_group)

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

    def __getstate__(self) -> "dict[str, Any]":
        """Everything but the process groups (see ``communicator.py``), the thread and the lock; the
        parameter keys are dropped too (they are ``id()``s of this process's parameters) and are
        given again, in the same order, when the copy first sees the model's buckets."""
        self.close()  # let a bucket in flight finish before copying
        state = self.__dict__.copy()
        del state["_lock"]
        state.update(_worker=None, _keys={}, _bound=False, _overlap=False)
        return state

    def __setstate__(self, state: "dict[str, Any]") -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _shapes(bucket: dist.GradBucket) -> str:
    return ", ".join(str(tuple(p.shape)) for p in bucket.parameters())


def _bucket_views(bucket: dist.GradBucket, name: str) -> list[torch.Tensor]:
    buffer = bucket.buffer()
    if buffer.layout != torch.strided:
        raise SparseGradientError(
            f"the parameter of shape {_shapes(bucket)} has a sparse gradient ({buffer.layout}); "
            f"gradwire compressors need dense gradients, and {name!r} cannot encode it: build the "
            "layer with sparse=False (nn.Embedding(..., sparse=False)) or use compressor 'none' "
            "without feedback"
        )
    views, offset = [], 0
    for grad in bucket.gradients():
        views.append(buffer[offset : offset + grad.numel()].view(grad.shape))
        offset += grad.numel()
    if offset != buffer.numel():
        raise RuntimeError(
            f"DDP bucket layout not understood: the gradients of parameters of shapes {_shapes(bucket)} "
            f"hold {offset} elements and the bucket buffer {buffer.numel()}; gradwire's hook cannot "
            "serve this bucket"
        )
    return views


def reducer_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state.bind()  # the first call binds to the process group; later ones check it still matches
    if state.reducer.passthrough:  # 'none': one asynchronous all-reduce of the bucket, like DDP's own
        return state.reducer.reduce_flat_async(bucket.buffer(), advance=bucket.is_last())
    views = _bucket_views(bucket, state.reducer.name)
    keys = [state.key_for(p) for p in bucket.parameters()]
    buffer, last = bucket.buffer(), bucket.is_last()
    if not state.overlap:  # in the call (auto may hand back its plain all-reduce's own future)
        return state.reducer.reduce_bucket(views, keys, last, buffer)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
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
