"""Sparsifiers: Top-k (all-gather of values and int32 indices) and shared-seed Rand-k."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from gradwire.compressors.compressor import ElementwiseCompressor, as_dtype, budget, seeded_generator
from gradwire.compressors.config import RandKConfig, TopKConfig


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def topk_budget(numel: int, ratio: float | None, k: int | None) -> int:
    """Elements Top-k keeps of a tensor of ``numel``: ``min(k, numel)``, or ``⌈ratio·numel⌉``
    computed exactly on the ratio as written in decimal (its shortest ``repr``), at least 1.

    ``math.ceil(0.07 * 100)`` is 8, because the float product is 7.000000000000001; as a
    fraction, ``0.07 = 7/100`` and the budget is 7.
    """
    if k is None:
        k = math.ceil(Fraction(repr(float(ratio or 0.0))) * numel)
    return max(1, min(numel, k))


class TopK(ElementwiseCompressor):
    """Keeps the k largest-magnitude entries of each tensor (contractive, α = k/d).

    Wire format per tensor: k values in the gradient's dtype, then k int32 indices,
    packed as bytes — ``8k`` bytes for fp32 (docs/algorithms.md §2.3). The k are found by
    ``torch.topk`` or, on large CPU tensors, through a sampled threshold (``select``, §2.1);
    both keep the same k largest magnitudes (up to ties at the k-th), and the payload is
    exactly what is sent, so error feedback sees the true ``C(p)``.
    """

    name = "topk"
    collective = "all_gather"
    # torch.topk ranks NaN above everything and |±Inf| above every finite value (the threshold
    # path keeps every NaN and ±Inf as a candidate, or falls back to torch.topk), so a
    # non-finite input is always among the kept values that every rank receives
    reveals_nonfinite = True

    #: ``select="auto"`` estimates a threshold for CPU tensors at least this large (below it
    #: ``torch.topk`` is as fast as the sampling: measured crossover about 2^16 on one thread)
    AUTO_MIN_NUMEL = 1 << 17
    #: most magnitudes sampled to estimate the threshold
    SAMPLE = 16384
    #: bound on the chance that the estimate misses (fewer than k elements above it), which
    #: costs an exact torch.topk but never changes the result
    MISS = 1e-4

    def __init__(self, config: TopKConfig):
        self.ratio, self.k = config.budget()
        self.select = config.select
        self.seed = config.seed
        #: how each tensor's k were found: "exact", "threshold", "fallback" (estimate missed)
        self.selections = {"exact": 0, "threshold": 0, "fallback": 0}

    def kept(self, numel: int) -> int:
        return topk_budget(numel, self.ratio, self.k)

    def uses_threshold(self, x: torch.Tensor) -> bool:
        if self.select == "auto":
            return x.device.type == "cpu" and x.numel() >= self.AUTO_MIN_NUMEL
        return self.select == "threshold"

    def select_indices(self, a: torch.Tensor, k: int, key: int, step: int) -> torch.Tensor:
        """Positions (int64) of the ``k`` largest entries of the magnitudes ``a`` (flat,
        ``k < numel``), in no particular order; NaN ranks above everything, as in torch.topk."""
        if self.uses_threshold(a):
            idx = self._threshold_select(a, k, key, step)
            if idx is not None:
                self.selections["threshold"] += 1
                return idx
            self.selections["fallback"] += 1
        else:
            self.selections["exact"] += 1
        return torch.topk(a, k, sorted=False).indices

    def _threshold_select(self, a: torch.Tensor, k: int, key: int, step: int) -> torch.Tensor | None:
        """The k largest via an estimated threshold (docs/algorithms.md §2.1), or None when the
        estimate misses.

        ``m`` magnitudes drawn with replacement (generator seeded by (seed, rank, key, step));
        ``t`` = the r-th largest of them, r chosen by Bernstein's inequality so that
        P(fewer than k of ``a`` are ≥ t) ≤ MISS whatever the distribution. Every element with
        ``|x| ≥ t`` (and every NaN) is a candidate; when there are at least k, the k largest
        candidates are the k largest of ``a``, since everything else is below ``t``.
        """
        d = a.numel()
        m = min(self.SAMPLE, max(1024, d // 32))
        mean = m * k / d  # expected sampled elements among the true k largest
        log = math.log(1 / self.MISS)
        r = math.ceil(mean + log / 3 + math.sqrt((log / 3) ** 2 + 2 * mean * log))
        if 4 * r > m:  # the candidates would be a quarter of the tensor or more: no gain
            return None
        gen = seeded_generator(a.device, self.seed, self.rank, key, step)
        sample = a[torch.randint(d, (m,), generator=gen, device=a.device)]
        # the r-th largest sampled magnitude; NaN if a NaN is among the top r (then no
        # element is below it, the candidates are everything and the exact path runs)
        threshold = torch.topk(sample, r, sorted=False).values.min()
        candidates = (a < threshold).logical_not_().nonzero().squeeze(1)  # |x| ≥ t, or NaN
        found = candidates.numel()
        if found < k or 2 * found > d:
            return None
        if found == k:
            return candidates
        return candidates[torch.topk(a[candidates], k, sorted=False).indices]

    def payload_nbytes(self, shape, dtype):
        return self.kept(shape.numel()) * (_itemsize(dtype) + 4)

    def encode(self, x, key, step):
        k = self.kept(x.numel())
        if k == x.numel():
            idx = torch.arange(k, device=x.device, dtype=torch.int32)
            values = x
        else:
            idx = self.select_indices(x.abs(), k, key, step)
            values = x[idx]
            idx = idx.to(torch.int32)
        return torch.cat([values.contiguous().view(torch.uint8), idx.view(torch.uint8)])

    def _split(self, payload: torch.Tensor, like: torch.Tensor):
        k = self.kept(like.numel())
        cut = k * like.element_size()
        values = as_dtype(payload[..., :cut], like.dtype)
        idx = as_dtype(payload[..., cut:], torch.int32).long()
        return values, idx

    def decode(self, payload, like, key, step):
        values, idx = self._split(payload, like)
        return torch.zeros_like(like).index_put_((idx,), values)

    def probe(self, received, like):
        return self._split(received, like)[0].sum(dtype=torch.float64)

    def decode_mean(self, payloads, like, key, step):
        values, idx = self._split(payloads, like)
        total = torch.zeros_like(like).index_add_(0, idx.reshape(-1), values.reshape(-1))
        return total.div_(payloads.shape[0])


class RandK(ElementwiseCompressor):
    """Keeps k coordinates drawn from a seed shared by all ranks (same support everywhere),
    so the kept values are all-reduced: ``4k`` bytes per tensor for fp32.

    Unscaled it is contractive in expectation (α = k/d); with ``scale`` the values are
    multiplied by d/k, which makes it unbiased.
    """

    name = "randk"
    collective = "all_reduce"

    def __init__(self, config: RandKConfig):
        self.ratio, self.k = config.budget()
        self.scale = config.scale
        self.seed = config.seed
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def payload_nbytes(self, shape, dtype):
        return budget(shape.numel(), self.ratio, self.k) * _itemsize(dtype)

    def indices(self, numel: int, key: int, step: int, device: torch.device) -> torch.Tensor:
        """k distinct positions, the same on every rank (same seed, same device type).

        Drawn on the tensor's device. For k ≤ d/4 it oversamples with replacement and
        keeps a uniform k-subset of the distinct draws — O(k log k) instead of the O(d)
        of a full permutation, which dominated the step on GPUs.
        """
        cached = self._cache.get((key, step))
        if cached is not None and cached.device == device:
            return cached
        k = budget(numel, self.ratio, self.k)
        gen = seeded_generator(device, self.seed, key, step)  # no rank: the choice is shared
        chosen = None
        if 4 * k <= numel:
            draws = torch.randint(numel, (k + k // 4 + 32,), generator=gen, device=device)
            distinct = torch.unique(draws)
            if distinct.numel() >= k:
                pick = torch.randperm(distinct.numel(), generator=gen, device=device)[:k]
                chosen = distinct[pick]
        if chosen is None:
            chosen = torch.randperm(numel, generator=gen, device=device)[:k]
        self._cache = {kk: v for kk, v in self._cache.items() if kk[1] == step}
        self._cache[(key, step)] = chosen
        return chosen

    def encode(self, x, key, step):
        return x[self.indices(x.numel(), key, step, x.device)]

    def decode(self, payload, like, key, step):
        idx = self.indices(like.numel(), key, step, like.device)
        values = payload.to(like.dtype)
        if self.scale:
            values = values * (like.numel() / idx.numel())
        return torch.zeros_like(like).index_put_((idx,), values)
