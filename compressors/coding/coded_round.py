"""One round of straggler-tolerant, gradient-coded data-parallel training on real ranks.

Every rank ``i`` computes its coded message ``c_i = Σ_j w_ij g_j`` over the partitions the
code gives it (``code.partitions(i)``, weights ``code.encode_weights(i)``). The ranks agree
on the first ``n − s`` finishers through a :class:`~gradwire.compressors.coding.barrier.RoundBarrier`,
each computes the decoding coefficients ``a`` of that survivor set, and all ranks all-reduce
``a_i · c_i`` (stragglers and survivors with ``a_i = 0`` send zeros). The sum is
``Σ_i a_i c_i = Σ_j g_j``: the full gradient, exactly (docs/algorithms.md §5,
§5.5)::

    code = fractional_repetition(4, 1)
    coded = CodedRound(code)                               # default reducer: plain all-reduce
    mine = {j: batches[j] for j in code.partitions(rank)}
    total, report = coded.step(
        lambda cancel: coded_gradient(model, loss_fn, mine, code.encode_weights(rank), cancel=cancel),
        like=list(model.parameters()),
    )                                                      # total[k] = Σ_j g_j for parameter k

How a straggler is dropped without delaying the others. A collective needs every rank, so
even a straggler must join the all-reduce; it just must not make it wait. The message is
computed in a *compute thread*; the rank's main thread polls two things every ``poll_s``:
its own computation, and the barrier's arrival count.

* Its computation finished first: it arrives at the barrier and waits (blocking) for the
  first ``n − s`` arrivals. If it is among them it sends ``a_i · c_i``, else zeros.
* ``n − s`` other ranks arrived first: it is a straggler. It never arrives for that round,
  sets the ``cancel`` event handed to the computation (a cooperative compute function stops;
  any result is discarded), and joins the all-reduce with zeros at once.

So the all-reduce starts as soon as ``n − s`` ranks have finished, plus one poll interval.
All barrier calls run on the main thread (a store client serialises its requests). With
more than ``s`` slow ranks the round still waits for the ``(n − s)``-th arrival: slower,
never a partial or wrong gradient. When a straggler model is attached, rounds in which it
flags more than ``s`` ranks are counted (``over_tolerance_rounds``).

A dropped computation that does not watch ``cancel`` keeps running in its (daemon) thread
and competes for CPU with the next round; its result and any exception it raises (e.g.
autograd noticing that the optimiser changed the parameters in place) are discarded.

Only aggregates that are a function of the *sum* of the messages stay exact after the
straggler's message is replaced by zeros: the all-reduce compressors ``none``, ``fp16``,
``bf16`` and ``powersgd`` (whose rounds all-reduce linear sketches of the summed matrix).
``topk``, ``randk``, ``qsgd`` and ``sign`` are refused (see :data:`REFUSED`).
"""

from __future__ import annotations

import inspect
import operator
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradwire.compressors.coding.barrier import RoundBarrier, StoreRoundBarrier
from gradwire.compressors.coding.gradient_code import GradientCode
from gradwire.compressors.coding.stragglers import StragglerModel, injected_delay

#: compressors whose aggregate depends only on the sum of the ranks' messages
LINEAR_COMPRESSORS = frozenset({"none", "fp16", "bf16", "powersgd"})

#: compressors a coded round refuses, and why
REFUSED: dict[str, str] = {
    "topk": "each rank keeps the k largest entries of its own message, so the aggregate is not a "
    "linear function of the coded messages and the decoding coefficients do not carry through it",
    "randk": "its error feedback (and its unbiasing scale) acts on each rank's own message, so "
    "scaled coded messages with zeros from stragglers no longer decode to the full gradient",
    "qsgd": "it quantises each rank's message with a norm-dependent random rounding and all-gathers "
    "every rank's payload; the aggregate is not linear in the coded messages",
    "sign": "it all-gathers each rank's scaled sign vector; signs of coded messages do not combine "
    "into the sign (or any function) of the full gradient",
}

#: one partition's (inputs, targets)
Batch = tuple[torch.Tensor, torch.Tensor]

#: how often a waiting main thread polls its computation and the barrier (seconds)
POLL_S = 0.002


class ComputeCancelled(Exception):
    """Raised by :func:`coded_gradient` when the round no longer needs this rank's message."""


def check_linear_compressor(name: str) -> None:
    """Raise ``ValueError`` unless compressor ``name`` keeps a coded round exact."""
    if name in LINEAR_COMPRESSORS:
        return
    why = REFUSED.get(name, "it is not known to aggregate linearly in the ranks' messages")
    raise ValueError(
        f"compressor {name!r} cannot be used in a coded round: {why}. "
        f"Use one of: {', '.join(sorted(LINEAR_COMPRESSORS))}"
    )


def coded_gradient(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    partition_batches: Mapping[int, Batch] | Sequence[Batch],
    weights: Mapping[int, float],
    *,
    cancel: threading.Event | None = None,
) -> list[torch.Tensor]:
    """This worker's coded message ``Σ_j w_j g_j``, one tensor per trainable parameter.

    ``partition_batches[j]`` is the ``(inputs, targets)`` batch of partition ``j`` for every
    ``j`` in ``weights`` (``code.encode_weights(rank)``). ``g_j`` is the gradient of
    ``loss_fn(model(inputs_j), targets_j)``, summed if ``loss_fn`` returns per-sample losses
    (``reduction="none"``) — so with per-sample or ``"sum"`` losses ``Σ_j g_j`` is the gradient
    of the total loss over the whole data set. One forward per partition (normalisation layers
    see each partition on its own), one backward for the weighted sum; the gradient goes
    through :func:`torch.autograd.grad`, so ``.grad`` fields are left alone and an abandoned
    computation touches no shared state. Between forwards ``cancel`` is checked:
    :class:`ComputeCancelled` is raised once it is set.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total: torch.Tensor | None = None
    for j, w in weights.items():
        if cancel is not None and cancel.is_set():
            raise ComputeCancelled(f"partition {j}")
        if w == 0.0:
            continue
        inputs, targets = partition_batches[j]
        loss = loss_fn(model(inputs), targets)
        term = (loss.sum() if loss.dim() > 0 else loss) * float(w)
        total = term if total is None else total + term
    if total is None:  # every weight is zero: the message is zero
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@dataclass(frozen=True)
class RoundReport:
    """What one rank saw of one coded round."""

    #: the round number
    round: int
    #: the first n − s ranks to finish, in arrival order (the same on every rank)
    survivors: list[int]
    #: every other rank, sorted (their messages were replaced by zeros)
    stragglers: list[int]
    #: seconds from the start of the round until this rank knew the survivor set
    waited_s: float
    #: decoding coefficient a_i of every survivor (float64 values)
    coefficients: dict[int, float]
    #: fraction of the data this rank computes: len(code.partitions(rank)) / n
    load: float
    #: this rank's rank
    rank: int = 0
    #: True when this rank was a straggler and dropped its computation
    abandoned: bool = False
    #: seconds this rank's computation took (None when it was abandoned)
    compute_s: float | None = None
    #: seconds for the whole round on this rank, all-reduce included
    round_s: float = 0.0
    #: ranks the attached straggler model flagged for this round (None without a model)
    flagged: list[int] | None = None
    #: more ranks were flagged than the code tolerates (the round waited for a flagged rank)
    over_tolerance: bool = False
    #: payload bytes this rank put on the wire in the round's all-reduce (the reducer's ledger)
    bytes_sent: int = 0

    @property
    def coefficient(self) -> float:
        """This rank's coefficient (0.0 when it is a straggler)."""
        return self.coefficients.get(self.rank, 0.0)


@dataclass
class _Job:
    """A computation running in a compute thread."""

    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[torch.Tensor] | None = None
    error: BaseException | None = None
    seconds: float = 0.0


def _takes_cancel(compute: Callable[..., Any]) -> bool:
    try:
        inspect.signature(compute).bind(threading.Event())
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume it takes the event
        return True
    return True


class CodedRound:
    """Coded data-parallel rounds over ``world_size`` ranks, one :meth:`step` per round.

    ``code`` is an ``(n, s)`` gradient code with ``n = world_size``; rank ``i`` is worker ``i``.
    ``reducer`` is a :class:`~gradwire.compressors.reducer.Reducer`, a compressor name, or
    None for ``make_reducer("none")`` (a plain all-reduce); only the linear compressors of
    :data:`LINEAR_COMPRESSORS` are accepted. ``barrier`` defaults to a
    :class:`~gradwire.compressors.coding.barrier.StoreRoundBarrier` on the default group's
    store under ``prefix`` (give every concurrent CodedRound its own prefix).

    ``stragglers`` (optional) injects and accounts stragglers: a worker the model flags in a
    round waits, after computing, ``delay_s`` seconds (or ``(slowdown − 1)×`` its compute time
    when ``delay_s`` is None) before its message counts as ready — cancelled at once when the
    round no longer needs it. Rounds with more than ``s`` flagged workers are counted.
    """

    def __init__(
        self,
        code: GradientCode,
        reducer: Any = None,
        barrier: RoundBarrier | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        timeout: float = 300.0,
        poll_s: float = POLL_S,
        prefix: str = "gradwire/coded",
        stragglers: StragglerModel | None = None,
        delay_s: float | None = None,
    ) -> None:
        if not isinstance(code, GradientCode):
            raise TypeError(f"code must be a GradientCode, got {type(code).__name__}")
        distributed = dist.is_available() and dist.is_initialized()
        if rank is None or world_size is None:
            if not distributed:
                raise ValueError("pass rank and world_size, or initialise the default process group first")
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        self.rank, self.world_size = operator.index(rank), operator.index(world_size)
        if code.n != self.world_size:
            raise ValueError(
                f"the code has n={code.n} workers but the world has {self.world_size} ranks; "
                "a coded round needs one worker per rank"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} out of range for world_size={self.world_size}")
        if not timeout > 0 or not poll_s > 0:
            raise ValueError(f"timeout and poll_s must be > 0, got timeout={timeout}, poll_s={poll_s}")
        if delay_s is not None and not delay_s >= 0:
            raise ValueError(f"delay_s must be >= 0 seconds, got {delay_s}")
        self.code = code
        self.need = code.n - code.s
        self.reducer = self._make_reducer(reducer)
        if barrier is None:
            barrier = StoreRoundBarrier.from_default_group(prefix=prefix)
        if not isinstance(barrier, RoundBarrier):
            raise TypeError(f"barrier must be a RoundBarrier, got {type(barrier).__name__}")
        self.barrier = barrier
        self.timeout, self.poll_s = float(timeout), float(poll_s)
        self.stragglers, self.delay_s = stragglers, delay_s
        self.load = len(code.partitions(self.rank)) / code.n
        self.next_round = 0
        self.rounds = 0
        self.abandoned_rounds = 0
        self.over_tolerance_rounds = 0

    @staticmethod
    def _make_reducer(reducer: Any) -> Any:
        from gradwire.compressors import make_reducer

        if reducer is None:
            return make_reducer("none")
        if isinstance(reducer, str):
            check_linear_compressor(reducer)
            return make_reducer(reducer)
        name = getattr(reducer, "name", None)
        if not isinstance(name, str) or not callable(getattr(reducer, "reduce", None)):
            raise TypeError(f"reducer must be a gradwire Reducer or a compressor name, got {reducer!r}")
        check_linear_compressor(name)
        return reducer

    def stats(self) -> dict[str, int]:
        return {
            "rounds": self.rounds,
            "abandoned_rounds": self.abandoned_rounds,
            "over_tolerance_rounds": self.over_tolerance_rounds,
        }

    # --- the round -------------------------------------------------------------------------
    def _flagged(self, round: int) -> list[int] | None:
        if self.stragglers is None:
            return None
        return [w for w in range(self.world_size) if self.stragglers.slowdown_for(round, w) > 1.0]

    def _start(self, compute: Callable[..., Sequence[torch.Tensor]], round: int) -> _Job:
        job = _Job()
        pass_cancel = _takes_cancel(compute)
        slowdown = 1.0 if self.stragglers is None else self.stragglers.slowdown_for(round, self.rank)

        def run() -> None:
            started = time.perf_counter()
            try:
                result = compute(job.cancel) if pass_cancel else compute()
                if slowdown > 1.0:  # injected straggling, cut short when the round moves on
                    job.cancel.wait(injected_delay(slowdown, time.perf_counter() - started, self.delay_s))
                job.result = list(result)
            except BaseException as err:  # handed to the main thread (or discarded if abandoned)
                job.error = err
            finally:
                job.seconds = time.perf_counter() - started
                job.done.set()

        threading.Thread(target=run, name=f"coded-round-{round}-rank-{self.rank}", daemon=True).start()
        return job

    def _message(self, job: _Job, like: list[torch.Tensor], round: int) -> list[torch.Tensor]:
        got = job.result or []
        if len(got) != len(like) or any(g.shape != t.shape for g, t in zip(got, like)):
            raise ValueError(
                f"round {round}: the computation returned shapes {[tuple(g.shape) for g in got]}, "
                f"expected {[tuple(t.shape) for t in like]} (one tensor per entry of `like`)"
            )
        return [g.detach().to(dtype=t.dtype, device=t.device) for g, t in zip(got, like)]

    def step(
        self,
        compute: Callable[..., Sequence[torch.Tensor]],
        like: Sequence[torch.Tensor],
        round: int | None = None,
    ) -> tuple[list[torch.Tensor], RoundReport]:
        """Run one coded round; returns ``(Σ_j g_j per tensor, report)``, identical on every rank.

        ``compute`` returns this rank's coded message (a list of tensors shaped like ``like``);
        it runs in a compute thread and is called as ``compute(cancel)`` when it accepts one
        argument (``cancel`` is a ``threading.Event`` set when the round drops this rank), else
        as ``compute()``. It must not mutate state shared with the main thread (use
        :func:`coded_gradient`, which calls ``torch.autograd.grad``). ``like`` gives the shapes
        and dtypes of the messages (e.g. the trainable parameters). Every rank must call
        ``step`` for every round, with the same round numbers (default: 0, 1, 2, ...).

        A computation that raises, or returns the wrong shapes, raises here before this rank
        arrives at the barrier; like any failure inside a collective job, the other ranks are
        then left waiting in this round's all-reduce (until the process group's timeout).
        """
        like = [t.detach() for t in like]
        if not like:
            raise ValueError("like must name at least one tensor")
        if round is None:
            round = self.next_round
        round = operator.index(round)
        self.next_round = round + 1
        started = time.perf_counter()
        flagged = self._flagged(round)
        job = self._start(compute, round)

        survivors: list[int] | None = None
        ready: list[torch.Tensor] | None = None  # this rank's checked message, once computed
        deadline = started + self.timeout
        while survivors is None:
            if job.done.wait(self.poll_s):
                if job.error is not None:
                    raise RuntimeError(
                        f"rank {self.rank}: the coded-gradient computation of round {round} failed"
                    ) from job.error
                ready = self._message(job, like, round)  # check shapes before becoming a survivor
                self.barrier.arrive(round, self.rank)
                left = max(deadline - time.perf_counter(), self.poll_s)
                survivors = self.barrier.survivors(round, self.need, left)
            elif self.barrier.arrived(round) >= self.need:
                survivors = self.barrier.survivors(round, self.need, self.timeout)
            elif time.perf_counter() > deadline:
                raise TimeoutError(
                    f"round {round}: rank {self.rank} waited {self.timeout:g}s; its computation is not "
                    f"done and only {self.barrier.arrived(round)} of the {self.need} needed ranks arrived"
                )
        known = time.perf_counter()
        abandoned = self.rank not in survivors
        if abandoned:
            job.cancel.set()  # a cooperative computation stops; its result and errors are never read
        elif ready is None:  # cannot happen: only ranks that arrived are survivors
            raise RuntimeError(f"round {round}: rank {self.rank} is listed as a survivor but never arrived")

        a = self.code.decode(survivors).tolist()
        coefficients = dict(zip(survivors, a))
        mine = coefficients.get(self.rank, 0.0)
        if abandoned or mine == 0.0:
            message = [torch.zeros_like(t) for t in like]
        else:
            message = [g * mine for g in ready]  # type: ignore[union-attr]
        sent_before = self.reducer.stats()["bytes_sent"]
        means = self.reducer.reduce(message)
        bytes_sent = int(self.reducer.stats()["bytes_sent"] - sent_before)
        total = [m * self.world_size for m in means]  # the reducer returns the mean over ranks
        if self.rank == 0:  # every rank has read the survivors once the all-reduce is done
            self.barrier.release(round)

        over = flagged is not None and len(flagged) > self.code.s
        self.rounds += 1
        self.abandoned_rounds += int(abandoned)
        self.over_tolerance_rounds += int(over)
        report = RoundReport(
            round=round,
            survivors=list(survivors),
            stragglers=sorted(set(range(self.world_size)) - set(survivors)),
            waited_s=known - started,
            coefficients=coefficients,
            load=self.load,
            rank=self.rank,
            abandoned=abandoned,
            compute_s=None if abandoned else job.seconds,
            round_s=time.perf_counter() - started,
            flagged=flagged,
            over_tolerance=over,
            bytes_sent=bytes_sent,
        )
        return total, report
