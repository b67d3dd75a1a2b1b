"""Agreement on who finished a round first: the survivor set of a coded round.

A coded round (docs/algorithms.md §5.5) needs every rank to learn the *same*
first ``n − s`` finishers, in the same order, so that all of them compute the same
decoding coefficients. :class:`RoundBarrier` is that agreement::

    barrier.arrive(r, rank)                     # "my message for round r is ready"
    first = barrier.survivors(r, need, timeout)  # the first `need` arrivals, same on every rank

:class:`StoreRoundBarrier` implements it on a torch.distributed key-value store
(``TCPStore``, or the default process group's store). ``store.add(counter, 1)`` is
atomic on the store's server and returns a distinct, increasing ticket per call, which
orders the arrivals: the ``k``-th arrival writes its rank under slot ``k``, and readers
wait for slots ``1 … need``. Nothing depends on clocks, and every reader sees the same
slots, so the survivor list is identical everywhere.

Only torch is needed (no extra services).
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import Any

import torch.distributed as dist


class RoundBarrier(ABC):
    """Orders the ranks' arrivals in each round and reports the first ``need`` of them."""

    @abstractmethod
    def arrive(self, round: int, rank: int) -> None:
        """Record that ``rank`` finished ``round`` (call at most once per rank and round)."""

    @abstractmethod
    def survivors(self, round: int, need: int, timeout: float) -> list[int]:
        """Block until ``need`` ranks arrived for ``round``; return the first ``need`` in arrival order.

        The list is the same on every rank. Raises :class:`TimeoutError` (naming the round and
        how many ranks had arrived) when fewer than ``need`` arrive within ``timeout`` seconds.
        """

    @abstractmethod
    def arrived(self, round: int) -> int:
        """How many ranks have arrived for ``round`` so far (does not block)."""

    def release(self, round: int) -> None:
        """Forget ``round`` (free its state). Call only once no rank will touch that round again."""


def _check_round(round: int) -> int:
    round = operator.index(round)
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    return round


class StoreRoundBarrier(RoundBarrier):
    """A :class:`RoundBarrier` on a torch.distributed store (``TCPStore``, ``PrefixStore``, ...).

    Keys, all under ``prefix``: ``{prefix}/r{round}/count`` (the ticket counter) and
    ``{prefix}/r{round}/slot{k}`` (the rank that took ticket ``k``). Use a distinct prefix
    for every independent sequence of rounds that shares a store (two trainings in one
    process group, say); rounds of one sequence must be numbered consistently on all ranks.

    Every rank must call the methods from one thread at a time: a store client serialises
    its requests, and a blocking :meth:`survivors` would hold up an :meth:`arrive` issued
    from another thread of the same process.
    """

    def __init__(self, store: Any, world_size: int, prefix: str = "gradwire/coded") -> None:
        world_size = operator.index(world_size)
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not isinstance(prefix, str) or not prefix.strip("/"):
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        self.store = store
        self.world_size = world_size
        self.prefix = prefix.rstrip("/")

    @classmethod
    def from_default_group(cls, prefix: str = "gradwire/coded") -> StoreRoundBarrier:
        """A barrier on the default process group's store (``dist.init_process_group`` first)."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "StoreRoundBarrier.from_default_group needs an initialised default process group"
            )
        store = dist.distributed_c10d._get_default_store()
        return cls(store, dist.get_world_size(), prefix=prefix)

    def _key(self, round: int, name: str) -> str:
        return f"{self.prefix}/r{round}/{name}"

    def _check_rank(self, rank: int) -> int:
        rank = operator.index(rank)
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for world_size={self.world_size}")
        return rank

    def arrive(self, round: int, rank: int) -> None:
        round, rank = _check_round(round), self._check_rank(rank)
        ticket = int(self.store.add(self._key(round, "count"), 1))
        if ticket > self.world_size:
            raise RuntimeError(
                f"round {round}: arrival number {ticket} exceeds world_size={self.world_size}; "
                "a rank arrived twice, or two sequences of rounds share the prefix "
                f"{self.prefix!r} (give each its own)"
            )
        self.store.set(self._key(round, f"slot{ticket}"), str(rank))

    def arrived(self, round: int) -> int:
        return int(self.store.add(self._key(_check_round(round), "count"), 0))

    def survivors(self, round: int, need: int, timeout: float) -> list[int]:
        round = _check_round(round)
        need = operator.index(need)
        if not 1 <= need <= self.world_size:
            raise ValueError(f"need must be in 1..world_size={self.world_size}, got {need}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        keys = [self._key(round, f"slot{k}") for k in range(1, need + 1)]
        try:
            self.store.wait(keys, timedelta(seconds=timeout))
        except Exception as err:  # the store raises DistStoreError/RuntimeError on timeout
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            try:
                count = self.arrived(round)
            except Exception:  # the store itself is gone: report what we know
                count = -1
            got = "an unknown number of" if count < 0 else str(count)
            raise TimeoutError(
                f"round {round}: {got} of {self.world_size} ranks arrived within {timeout:g}s; "
                f"needed {need} (store error: {err})"
            ) from err
        ranks = [int(self.store.get(key)) for key in keys]
        if len(set(ranks)) != len(ranks):
            raise RuntimeError(
                f"round {round}: a rank arrived twice ({ranks}); arrive() must be called once per round"
            )
        return ranks

    def release(self, round: int) -> None:
        round = _check_round(round)
        for k in range(1, self.world_size + 1):
            self.store.delete_key(self._key(round, f"slot{k}"))
        self.store.delete_key(self._key(round, "count"))
