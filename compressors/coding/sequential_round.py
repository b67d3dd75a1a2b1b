"""Live sequential gradient coding (SR-SGC, M-SGC) on real ranks over all-reduce (docs/algorithms.md §6).

What a *job* is here. A job ``t`` is one full gradient ``Σ_p g_p`` over job ``t``'s data,
computed at parameters that are fixed when job ``t`` starts (round ``t``). The runner does not
care where those parameters come from: independent jobs (several models, or hyper-parameter
variants, trained side by side), or one model trained with *delayed* gradients (the update with
job ``t``'s gradient is applied by round ``t + T + 1``). The caller's ``compute(task, cancel)``
returns the message of a :class:`~gradwire.compressors.coding.tasks.Task`,
``Σ_{(p, w) ∈ task.weights} w · g_p`` of job ``task.job``, one tensor per entry of ``like``.
The runner itself never updates parameters.

One round ``r`` (every rank calls :meth:`SequentialRound.step` for every round):

1. Every rank holds an identical replica of the scheme's scheduler and computes the tasks
   ``scheduler.assign(r)[rank]`` in a compute thread (injected straggling: after computing,
   a flagged rank waits ``(slowdown − 1)×`` its compute time, or ``delay_s``).
2. Agreement on who straggled (on the process group's store; no clocks are compared). A rank
   whose tasks are done takes a ticket (``store.add``) and writes its rank under it. The rank
   with ticket 1 (the fastest) is the *decider*: it waits until its own clock reaches
   ``max((1 + mu)·e, e + slack_s)`` after its round start (``e``: its own compute time) or
   until all ranks have arrived, then reads the ticket counter ``k`` and publishes it. Ranks
   with tickets ``1..k`` are on time; every other rank straggled — the same set everywhere,
   since the store serialises the counter.
3. If that straggler set would break the scheme's (B, W, λ) model given the rounds before
   (``scheduler.conforms``), the round instead waits for every rank and reports no
   stragglers (the reference harness's rule, docs/algorithms.md §6.1) — slower, never wrong.
   Final stragglers cancel their computation at once and contribute nothing for round ``r``.
4. ``scheduler.report(r, stragglers)``; each on-time rank keeps its round-``r`` task results.
   For every job that became decodable in round ``r`` each rank sums
   ``coefficient · result`` over its own contributions in ``scheduler.combination(job)``, and
   one all-reduce (sum) of all those jobs' buffers gives every rank each job's exact full
   gradient. Rounds in which no job completes do no collective at all.

Load per round is what the scheduler assigns (``scheduler.load(r)``); it equals ``scheme.load``
in steady state. A job that is not decodable by round ``t + scheme.delay`` is listed in
:attr:`SequentialRound.late_jobs` (it cannot happen under conforming patterns).

Only torch is needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.coding.sgc import SequentialScheme
from gradwire.compressors.coding.stragglers import StragglerModel, injected_delay
from gradwire.compressors.coding.tasks import Task

POLL_S = 0.002


@dataclass(frozen=True)
class SequentialReport:
    """What one rank saw of one round."""

    round: int
    #: stragglers reported to the scheduler (the same on every rank)
    stragglers: list[int]
    #: ranks that were late but the round waited for them (their set broke the model)
    fallback: bool
    #: this rank's load this round (fraction of one job's data)
    load: Fraction
    #: jobs decoded at the end of this round -> full gradient (one tensor per entry of `like`)
    completed: dict[int, list[torch.Tensor]]
    #: seconds the round took on this rank (all-reduce included)
    round_s: float
    #: this rank was a straggler and dropped its tasks
    abandoned: bool
    #: ranks the attached straggler model flagged (None without one)
    flagged: list[int] | None = None


@dataclass
class _Work:
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    results: list[list[torch.Tensor]] | None = None
    error: BaseException | None = None
    seconds: float = 0.0


class SequentialRound:
    """Runs a :class:`SequentialScheme` live: one :meth:`step` per round, identical results on all ranks."""

    def __init__(
        self,
        scheme: SequentialScheme,
        compute: Callable[[Task, threading.Event], Sequence[torch.Tensor]],
        like: Sequence[torch.Tensor],
        *,
        num_jobs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        store: Any = None,
        prefix: str = "gradwire/sgc",
        mu: float = 0.5,
        slack_s: float = 0.02,
        stragglers: StragglerModel | None = None,
        delay_s: float | None = None,
        timeout: float = 300.0,
        poll_s: float = POLL_S,
    ) -> None:
        self.rank = dist.get_rank() if rank is None else int(rank)
        self.world_size = dist.get_world_size() if world_size is None else int(world_size)
        if scheme.n != self.world_size:
            raise ValueError(f"the scheme has n={scheme.n} workers but the world has {self.world_size} ranks")
        if not mu >= 0 or not slack_s >= 0:
            raise ValueError(f"mu and slack_s must be >= 0, got mu={mu}, slack_s={slack_s}")
        self.scheme, self.compute = scheme, compute
        self.like = [t.detach() for t in like]
        self.scheduler = scheme.scheduler(num_jobs)
        self.store = dist.distributed_c10d._get_default_store() if store is None else store
        self.prefix = prefix.rstrip("/")
        self.mu, self.slack_s = float(mu), float(slack_s)
        self.stragglers, self.delay_s = stragglers, delay_s
        self.timeout, self.poll_s = float(timeout), float(poll_s)
        self.next_round = 0
        self._results: dict[tuple[int, Task], list[torch.Tensor]] = {}
        self.done_jobs: dict[int, int] = {}  # job -> round decoded
        self.late_jobs: list[int] = []
        self.fallback_rounds = 0

    # -- helpers -----------------------------------------------------------------------
    def _key(self, r: int, name: str) -> str:
        return f"{self.prefix}/r{r}/{name}"

    def _start(self, tasks: list[Task], r: int) -> _Work:
        work = _Work()
        slowdown = 1.0 if self.stragglers is None else self.stragglers.slowdown_for(r, self.rank)

        def run() -> None:
            started = time.perf_counter()
            try:
                out = []
                for task in tasks:
                    if work.cancel.is_set():
                        return
                    out.append(
                        [g.detach().to(t.dtype) for g, t in zip(self.compute(task, work.cancel), self.like)]
                    )
                if slowdown > 1.0:
                    work.cancel.wait(injected_delay(slowdown, time.perf_counter() - started, self.delay_s))
                work.results = out
            except BaseException as err:
                work.error = err
            finally:
                work.seconds = time.perf_counter() - started
                work.done.set()

        threading.Thread(target=run, name=f"sgc-{r}-rank-{self.rank}", daemon=True).start()
        return work

    def _arrive(self, r: int) -> int:
        ticket = int(self.store.add(self._key(r, "count"), 1))
        self.store.set(self._key(r, f"slot{ticket}"), str(self.rank))
        return ticket

    def _wait_done(self, work: _Work, r: int) -> None:
        if not work.done.wait(self.timeout):
            raise TimeoutError(f"round {r}: rank {self.rank}'s tasks did not finish within {self.timeout:g}s")
        if work.error is not None:
            raise RuntimeError(f"rank {self.rank}: a task of round {r} failed") from work.error

    # -- the round -----------------------------------------------------------------------
    def step(self) -> SequentialReport:
        r = self.next_round
        self.next_round += 1
        n = self.world_size
        started = time.perf_counter()
        plan = self.scheduler.assign(r)
        mine = plan[self.rank]
        flagged = (
            None
            if self.stragglers is None
            else [w for w in range(n) if self.stragglers.slowdown_for(r, w) > 1.0]
        )
        work = self._start(mine, r)

        ticket, deadline, close = None, None, None
        limit = started + self.timeout
        close_key = self._key(r, "close")
        while close is None:
            if ticket is None and work.done.is_set():
                self._wait_done(work, r)
                ticket = self._arrive(r)
                if ticket == 1:  # the decider
                    e = time.perf_counter() - started
                    deadline = started + max((1.0 + self.mu) * e, e + self.slack_s)
            if deadline is not None:
                count = int(self.store.add(self._key(r, "count"), 0))
                if count == n or time.perf_counter() >= deadline:
                    self.store.set(close_key, str(count))
                    close = count
                    break
            if self.store.check([close_key]):
                close = int(self.store.get(close_key))
                break
            if time.perf_counter() > limit:
                raise TimeoutError(
                    f"round {r}: rank {self.rank} saw no straggler decision in {self.timeout:g}s"
                )
            work.done.wait(self.poll_s)
        slots = [self._key(r, f"slot{k}") for k in range(1, close + 1)]
        self.store.wait(slots, timedelta(seconds=self.timeout))
        on_time = {int(self.store.get(k)) for k in slots}
        late = sorted(set(range(n)) - on_time)
        fallback = bool(late) and not self.scheduler.conforms(late)
        if fallback:  # the set breaks the model: wait for everybody, report nobody
            self.fallback_rounds += 1
            if ticket is None:
                self._wait_done(work, r)
                ticket = self._arrive(r)
            self.store.wait([self._key(r, f"slot{n}")], timedelta(seconds=self.timeout))
            late = []
        abandoned = self.rank in late
        if abandoned:
            work.cancel.set()
        else:
            self._wait_done(work, r)
            for task, result in zip(mine, work.results or []):
                self._results[(r, task)] = result
        self.scheduler.report(r, late)

        # decode every job that became decodable this round: one all-reduce for all of them
        new = [j for j in self.scheduler.completed_jobs() if j not in self.done_jobs]
        completed: dict[int, list[torch.Tensor]] = {}
        if new:
            sizes = [t.numel() for t in self.like]
            buffer = torch.zeros(len(new), sum(sizes), dtype=self.like[0].dtype)
            for row, job in enumerate(new):
                for c in self.scheduler.combination(job):
                    if c.worker == self.rank and c.coefficient != 0.0:
                        flat = torch.cat(
                            [g.reshape(-1).to(buffer.dtype) for g in self._results[(c.round, c.task)]]
                        )
                        buffer[row].add_(flat, alpha=c.coefficient)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            for row, job in enumerate(new):
                pieces = torch.split(buffer[row], sizes)
                completed[job] = [p.reshape(t.shape).to(t.dtype) for p, t in zip(pieces, self.like)]
                self.done_jobs[job] = r
            gone = set(new)
            for key in [k for k in self._results if k[1].job in gone]:
                del self._results[key]
        job = r - self.scheme.delay
        if self.scheduler.has_job(job) and job not in self.done_jobs and job not in self.late_jobs:
            self.late_jobs.append(job)
        if self.rank == 0 and r >= 16:  # every rank left round r − 16 long ago
            old = r - 16
            for k in range(1, n + 1):
                self.store.delete_key(self._key(old, f"slot{k}"))
            self.store.delete_key(self._key(old, "count"))
            self.store.delete_key(self._key(old, "close"))
        return SequentialReport(
            round=r,
            stragglers=late,
            fallback=fallback,
            load=self.scheduler.load(r)[self.rank],
            completed=completed,
            round_s=time.perf_counter() - started,
            abandoned=abandoned,
            flagged=flagged,
        )
