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
    packed as bytes — ``8k`` bytes for fp32 (docs/algorithms.md §2.3).
    """

    name = "topk"
    collective = "all_gather"
    # torch.topk ranks NaN above everything and |±Inf| above every finite value, so a
    # non-finite input is always among the kept values that every rank receives
    reveals_nonfinite = True

    def __init__(self, config: TopKConfig):
        self.ratio, self.k = config.budget()

    def kept(self, numel: int) -> int:
        return topk_budget(numel, self.ratio, self.k)

    def payload_nbytes(self, shape, dtype):
        return self.kept(shape.numel()) * (_itemsize(dtype) + 4)

    def encode(self, x, key, step):
        k = self.kept(x.numel())
        if k == x.numel():
            idx = torch.arange(k, device=x.device, dtype=torch.int32)
            values = x
        else:
            idx = torch.topk(x.abs(), k, sorted=False).indices
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
