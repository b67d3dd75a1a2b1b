"""Collectives over any torch.distributed process group, counted in the ledger.

Nothing here is backend-specific: the same calls run on gloo (CPU) and NCCL
(GPU). Every collective is launched asynchronously and returns a
:class:`Pending`; independent collectives (the uncompressed all-reduce and
PowerSGD's P round, say) are in flight together. Outside a process group the
communicator acts as a group of one, so all the math runs in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.ledger import ByteLedger

# torch >= 2.11 names it all_gather_single; all_gather_into_tensor is the older name
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


class Communicator:
    def __init__(self, process_group: Any = None, ledger: ByteLedger | None = None):
        self.group = process_group
        self.ledger = ledger if ledger is not None else ByteLedger()
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            self.distributed = True
        else:
            self.world_size, self.rank, self.distributed = 1, 0, False

    def all_reduce_mean(self, flat: torch.Tensor) -> Pending:
        """Mean over ranks, in place. Divides first, as torch's allreduce_hook does, so
        16-bit payloads do not overflow in the sum."""
        self.ledger.record_all_reduce(flat.numel() * flat.element_size(), self.world_size)
        if self.world_size > 1:
            flat.div_(self.world_size)
        if not self.distributed:
            return Pending(None, lambda: flat)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return Pending(work, lambda: flat)

    def all_gather(self, flat: torch.Tensor) -> Pending:
        """Every rank's 1-D ``flat`` (same length everywhere), stacked as ``[world, len]``."""
        self.ledger.record_all_gather(flat.numel() * flat.element_size(), self.world_size)
        if not self.distributed:
            return Pending(None, lambda: flat.unsqueeze(0))
        out = flat.new_empty(self.world_size * flat.numel())
        work = _all_gather_flat(out, flat, group=self.group, async_op=True)
        return Pending(work, lambda: out.view(self.world_size, flat.numel()))
