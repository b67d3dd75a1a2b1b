"""Collectives over any torch.distributed process group, counted in the ledger.

Nothing here is backend-specific: the same calls run on gloo (CPU) and NCCL
(GPU). Every collective is launched asynchronously and returns a
:class:`Pending`; independent collectives (the uncompressed all-reduce and
PowerSGD's P round, say) are in flight together. Outside a process group the
communicator acts as a group of one, so all the math runs in one process.

Binding. A communicator learns its rank and world size from its process group when it is
*bound*: at construction if ``torch.distributed`` is initialised by then, otherwise at the first
collective (or the first ``bind()``). That lets a DDP hook be built before
``init_process_group``, as Lightning's ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``
does. Once bound, every :meth:`check` verifies that the group still has the world size it was
bound to and raises :class:`ProcessGroupMismatch` if not (a state made for N ranks used in a group
of M, a group destroyed under it, or a communicator first used alone in a process that now runs a
multi-rank group and would otherwise silently send nothing).

Pickling drops the process group (it cannot travel, like torch's ``PowerSGDState``); the copy binds
again at first use, to the default group, and refuses to bind to a rank or world size other than
the one it was pickled on. A copy of one that was given an explicit process group refuses to bind
until :meth:`set_process_group` gives it one again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.ledger import ByteLedger, pair_gathers

# torch >= 2.11 names it all_gather_single; all_gather_into_tensor is the older name
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ProcessGroupMismatch(RuntimeError):
    """The process group a communicator runs in is not the one its state was made for."""


def dist_initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


class Pending:
    """A collective in flight; ``wait()`` returns its result."""

    def __init__(self, work: Any, result: Callable[[], Any]):
        self._work = work
        self._result = result

    def wait(self) -> Any:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._result()

    def future(self) -> torch.futures.Future:
        """The collective as a torch future whose value is :meth:`wait`'s result (what a DDP hook
        returns); a failed collective fails the future."""
        if self._work is None:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(self._result())
            return done

        def result(finished: torch.futures.Future) -> Any:
            finished.value()  # re-raises what failed the collective
            return self._result()

        return self._work.get_future().then(result)


class Communicator:
    def __init__(self, process_group: Any = None, ledger: ByteLedger | None = None):
        #: the group given by the caller (None: the default group)
        self.group = process_group
        #: the group the collectives run on: ``group`` unless a DDP hook gave itself its own
        self.channel = process_group
        self.ledger = ledger if ledger is not None else ByteLedger()
        self._bound = False
        self._world_size, self._rank, self._distributed = 1, 0, False
        #: (rank, world size) bound to before pickling: the copy must bind to the same
        self._expected: tuple[int, int] | None = None
        #: ranks of an explicit process group that pickling dropped (None: there was none)
        self._lost_group: list[int] | None = None
        if dist_initialised():
            self.bind()

    # --- binding ---------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        return self._bound

    @property
    def world_size(self) -> int:
        if not self._bound:
            self.bind()
        return self._world_size

    @property
    def rank(self) -> int:
        if not self._bound:
            self.bind()
        return self._rank

    @property
    def distributed(self) -> bool:
        if not self._bound:
            self.bind()
        return self._distributed

    def set_process_group(self, process_group: Any) -> None:
        """Give a communicator that is not bound yet (say, just unpickled) its process group."""
        if self._bound:
            raise ProcessGroupMismatch(
                "this communicator is already bound to its process group; build a new one "
                "(and load_state_dict) to run on another"
            )
        self.group = self.channel = process_group
        self._lost_group = None

    def bind(self) -> None:
        """Read rank and world size off the process group (or a group of one outside
        ``torch.distributed``); if bound already, :meth:`check` instead."""
        if self._bound:
            self.check()
            return
        if self._lost_group is not None:
            raise ProcessGroupMismatch(
                f"this state was pickled while it ran on an explicit process group of ranks "
                f"{self._lost_group}; a process group does not survive pickling. Call "
                "set_process_group(group) with a group of those ranks before its first use"
            )
        if dist_initialised():
            world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            if rank < 0:
                raise ProcessGroupMismatch("this process is not a member of the given process group")
            distributed = True
        else:
            world, rank, distributed = 1, 0, False
        if self._expected is not None and self._expected != (rank, world):
            was_rank, was_world = self._expected
            raise ProcessGroupMismatch(
                f"this state was made on rank {was_rank} of {was_world} and unpickled on rank {rank} "
                f"of {world}: its buffers belong to rank {was_rank} of a {was_world}-rank run. Unpickle "
                "each rank's own copy, or rebuild the hook and use load_own_state()"
            )
        self._world_size, self._rank, self._distributed = world, rank, distributed
        self._expected = None
        self._bound = True

    def check(self) -> None:
        """Raise :class:`ProcessGroupMismatch` if the group no longer matches what this was bound to."""
        initialised = dist_initialised()
        if self._distributed:
            if not initialised:
                raise ProcessGroupMismatch(
                    f"this state runs on rank {self._rank} of a {self._world_size}-rank process group, "
                    "but torch.distributed is no longer initialised (destroy_process_group was called); "
                    "build a new hook or reducer and load_state_dict() into it"
                )
            try:
                world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            except (RuntimeError, ValueError) as err:
                raise ProcessGroupMismatch(
                    f"the process group this state was bound to is gone ({err}); build a new hook "
                    "or reducer and load_state_dict() into it"
                ) from err
            if (world, rank) != (self._world_size, self._rank):
                raise ProcessGroupMismatch(
                    f"this state was bound to rank {self._rank} of a {self._world_size}-rank process "
                    f"group and is now used on rank {rank} of {world}; a hook or reducer serves the "
                    "group it was first used in: build a new one (load_own_state() carries the state over)"
                )
        elif initialised and dist.get_world_size(self.group) > 1:
            raise ProcessGroupMismatch(
                "this state was first used outside torch.distributed (as a group of one) and a "
                f"{dist.get_world_size(self.group)}-rank process group is now initialised: it would "
                "send nothing. Build the hook or reducer, or first call its reduce, state_dict or "
                "load_state_dict, after init_process_group"
            )

    def __getstate__(self) -> dict[str, Any]:
        """Drop the process groups (they cannot be pickled); remember where this was bound."""
        state = self.__dict__.copy()
        group = state["group"]
        if group is not None and group is not dist.GroupMember.WORLD:
            try:
                state["_lost_group"] = dist.get_process_group_ranks(group)
            except (RuntimeError, ValueError):  # a destroyed group: still refuse, ranks unknown
                state["_lost_group"] = []
        if self._bound:
            state["_expected"] = (self._rank, self._world_size)
        state.update(group=None, channel=None, _bound=False)
        state.update(_world_size=1, _rank=0, _distributed=False)
        return state

    # --- collectives -----------------------------------------------------------------------
    def all_reduce_mean(self, flat: torch.Tensor) -> Pending:
        """Mean over ranks, in place. Divides first, as torch's allreduce_hook does, so
        16-bit payloads do not overflow in the sum. On gloo between 2 ranks a payload of at most
        ``PAIR_GATHER_MAX_BYTES`` is all-gathered and summed here in rank order: the ring's bytes
        in one exchange instead of two, the same result to the bit (ledger.py)."""
        world = self.world_size
        if flat.is_sparse:  # gloo all-reduces a sparse tensor by gathering every rank's indices and values
            values, indices = flat._values(), flat._indices()
            nbytes = values.numel() * values.element_size() + indices.numel() * indices.element_size()
            self.ledger.record_all_gather(nbytes, world)
        else:
            self.ledger.record_all_reduce(flat.numel() * flat.element_size(), world)
        if world > 1:
            flat.div_(world)
        if not self._distributed:
            return Pending(None, lambda: flat)
        nbytes = flat.numel() * flat.element_size()
        if not flat.is_sparse and pair_gathers(nbytes, world) and dist.get_backend(self.channel) == "gloo":
            half = flat.numel()
            both = flat.new_empty(2 * half)
            work = _all_gather_flat(both, flat, group=self.channel, async_op=True)
            return Pending(work, lambda: torch.add(both[:half], both[half:], out=flat))
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.channel, async_op=True)
        return Pending(work, lambda: flat)

    def all_gather(self, flat: torch.Tensor) -> Pending:
        """Every rank's 1-D ``flat`` (same length everywhere), stacked as ``[world, len]``."""
        world = self.world_size
        self.ledger.record_all_gather(flat.numel() * flat.element_size(), world)
        if not self._distributed:
            return Pending(None, lambda: flat.unsqueeze(0))
        out = flat.new_empty(world * flat.numel())
        work = _all_gather_flat(out, flat, group=self.channel, async_op=True)
        return Pending(work, lambda: out.view(world, flat.numel()))
