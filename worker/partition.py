"""Which training examples each worker sees.

* ``iid`` — a seeded shuffle cut into ``world_size`` shares whose sizes differ by at most one.
* ``dirichlet`` — label-skewed shares after Hsu, Qi and Brown, "Measuring the effects of
  non-identical data distribution for federated visual classification" (2019): for every
  class ``c`` draw ``p_c ~ Dir(α·1)`` over the workers and give worker ``k`` the fraction
  ``p_c[k]`` of class ``c``. Small α puts most of a class on few workers (very uneven label
  mixes); large α tends to iid.
* :func:`coded_partitions` — the ``n`` data partitions of a gradient code
  (``gradwire.compressors.coding``): worker ``i`` then computes the partitions
  ``code.partitions(i)`` tells it to, not a share of its own.

Each function is deterministic for a seed, so every rank computes the same assignment
locally without communicating. A spec's partition section unpacks straight into
:func:`partition_indices`: ``partition_indices(y, n, seed=spec.seed, **spec.data.partition.model_dump())``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch


def partition_indices(
    labels: torch.Tensor | np.ndarray | Sequence[int],
    world_size: int,
    kind: str = "iid",
    alpha: float | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """One sorted int64 index tensor per worker; together they cover every example exactly once.

    Every worker gets at least one example (so ``len(labels) >= world_size`` is required).
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if len(y) < world_size:
        raise ValueError(f"{len(y)} examples cannot give each of {world_size} workers one")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        if alpha is not None:
            raise ValueError("alpha is a parameter of the 'dirichlet' partition; 'iid' takes none")
        shares = np.array_split(rng.permutation(len(y)), world_size)
    elif kind == "dirichlet":
        if alpha is None or not alpha > 0:
            raise ValueError(f"the 'dirichlet' partition needs alpha > 0, got {alpha}")
        owners = _dirichlet_owners(y, world_size, alpha, rng)
        shares = [np.flatnonzero(owners == k) for k in range(world_size)]
    else:
        raise ValueError(f"unknown partition kind {kind!r}; available: dirichlet, iid")
    return [torch.from_numpy(np.sort(share).astype(np.int64)) for share in shares]


def _dirichlet_owners(y: np.ndarray, world_size: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """The worker of every example under per-class Dir(α) proportions, no worker left empty."""
    owners = np.empty(len(y), dtype=np.int64)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        p = rng.dirichlet(np.full(world_size, alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # underflow at tiny α: all mass on one worker
            p = np.eye(world_size)[rng.integers(world_size)]
        cuts = np.round(np.cumsum(p)[:-1] * len(members)).astype(np.int64)
        for worker, chunk in enumerate(np.split(members, cuts)):
            owners[chunk] = worker
    # Empty workers (likely at small α) take one example each from the largest share, picked from
    # that share's most frequent class, which changes the label mixes as little as possible.
    counts = np.bincount(owners, minlength=world_size)
    for empty in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        mine = np.flatnonzero(owners == donor)
        values, freq = np.unique(y[mine], return_counts=True)
        candidates = mine[y[mine] == values[np.argmax(freq)]]
        owners[candidates[rng.integers(len(candidates))]] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return owners


def coded_partitions(
    num_samples: int,
    n: int,
    seed: int = 0,
    *,
    sizes: Sequence[Fraction | float] | None = None,
) -> list[torch.Tensor]:
    """``n`` disjoint partitions of a seeded shuffle of ``range(num_samples)`` for a gradient code.

    Equal sizes (differing by at most one) by default, as the repetition codes of Tandon et al.
    (ICML 2017) assume; ``sizes`` gives each partition's fraction of the data instead (for
    example a sequential code's ``partition_sizes``), rounded by largest remainder.
    """
    if n < 1:
        raise ValueError(f"need at least one partition, got n={n}")
    if num_samples < n:
        raise ValueError(f"{num_samples} examples cannot fill {n} non-empty partitions")
    order = np.random.default_rng(seed).permutation(num_samples)
    if sizes is None:
        parts = np.array_split(order, n)
    else:
        counts = _largest_remainder(num_samples, sizes, n)
        parts = np.split(order, np.cumsum(counts)[:-1])
    return [torch.from_numpy(np.sort(part).astype(np.int64)) for part in parts]


def _largest_remainder(total: int, sizes: Sequence[Fraction | float], n: int) -> np.ndarray:
    if len(sizes) != n:
        raise ValueError(f"sizes has {len(sizes)} entries for n={n} partitions")
    fractions = [Fraction(s).limit_denominator(10**9) for s in sizes]
    if any(f <= 0 for f in fractions) or abs(float(sum(fractions)) - 1.0) > 1e-9:
        raise ValueError(f"sizes must be positive fractions summing to 1, got {list(sizes)}")
    exact = [f * total / sum(fractions) for f in fractions]
    counts = np.array([int(e) for e in exact], dtype=np.int64)
    by_remainder = sorted(range(n), key=lambda j: exact[j] - counts[j], reverse=True)
    for j in by_remainder[: total - int(counts.sum())]:
        counts[j] += 1
    if np.any(counts == 0):
        raise ValueError(f"{total} examples leave a partition empty with sizes {list(sizes)}")
    return counts
