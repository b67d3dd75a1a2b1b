"""Which examples each step uses: a stateless, seeded order per data partition and epoch.

Partition ``j``'s batch at step ``t`` is a pure function of ``(seed, j, t)``: epoch
``e = t // batches_per_epoch(j)`` shuffles the partition with a generator seeded by
``(seed, j, e)``, and the step takes the next ``batch_size`` of that order. Nothing needs
saving to resume the data order exactly: a checkpoint's step number is the sampler
position. The same function serves DDP (rank ``j`` uses partition ``j``) and gradient
coding (rank ``i`` uses every partition the code gives it), so a coded run sees the very
batches the uncoded run sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch


class PartitionSampler:
    """Batches of example indices for each of ``len(shares)`` partitions."""

    def __init__(self, shares: Sequence[torch.Tensor], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if any(len(share) == 0 for share in shares):
            raise ValueError("every partition needs at least one example")
        self.shares = [torch.as_tensor(share, dtype=torch.int64) for share in shares]
        self.seed = int(seed)
        # a partition smaller than the batch is used whole in every step
        self.batch_sizes = [min(batch_size, len(share)) for share in self.shares]
        self._order = lru_cache(maxsize=64)(self._shuffled)

    def batches_per_epoch(self, partition: int) -> int:
        return len(self.shares[partition]) // self.batch_sizes[partition]

    def epoch(self, partition: int, step: int) -> int:
        return step // self.batches_per_epoch(partition)

    def _shuffled(self, partition: int, epoch: int) -> torch.Tensor:
        seed = np.random.SeedSequence([self.seed, partition, epoch]).generate_state(2)
        generator = torch.Generator().manual_seed(int(seed[0]) << 32 | int(seed[1]))
        share = self.shares[partition]
        return share[torch.randperm(len(share), generator=generator)]

    def indices(self, partition: int, step: int) -> torch.Tensor:
        """Example indices of ``partition``'s batch at ``step`` (0-based)."""
        per_epoch = self.batches_per_epoch(partition)
        size = self.batch_sizes[partition]
        position = (step % per_epoch) * size
        return self._order(partition, step // per_epoch)[position : position + size]
