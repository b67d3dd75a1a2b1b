"""Quantisers gathered as bytes: QSGD (int8 levels + per-bucket norms) and scaled sign."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwire.compressors.compressor import ElementwiseCompressor, as_dtype, seeded_generator
from gradwire.compressors.config import QSGDConfig, SignConfig


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class QSGD(ElementwiseCompressor):
    """QSGD with s levels (Alistarh et al., NeurIPS 2017, §3.1).

    Per bucket of ``bucket_size`` elements: ``l_j = ⌊s·|x_j|/‖x‖ + u_j⌋`` with
    ``u_j ~ U[0, 1)`` (stochastic rounding, unbiased), sent as the signed int8
    ``sign(x_j)·l_j`` plus the bucket's norm in the gradient's dtype.
    Payload per tensor: ``d + itemsize·⌈d/bucket_size⌉`` bytes.

    The rounding noise ``u`` of a tensor comes from a generator seeded with (seed, rank, key, step):
    private to the rank, independent of bucket order, nothing to checkpoint (a resumed run draws
    what the uninterrupted one drew).
    """

    name = "qsgd"
    collective = "all_gather"
    reveals_nonfinite = True  # every element enters its bucket's norm, which is sent

    def __init__(self, config: QSGDConfig):
        self.levels = config.levels
        self.bucket = config.bucket_size
        self.seed = config.seed

    def payload_nbytes(self, shape, dtype):
        numel = shape.numel()
        return numel + _itemsize(dtype) * math.ceil(numel / self.bucket)

    def encode(self, x, key, step):
        numel = x.numel()
        buckets = math.ceil(numel / self.bucket)
        padded = torch.zeros(buckets * self.bucket, dtype=x.dtype, device=x.device)
        padded[:numel] = x
        rows = padded.view(buckets, self.bucket)
        # in float64: squares of large float32 (or float16) gradients overflow their dtype
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=torch.float64).to(x.dtype)
        scaled = rows.abs() * (self.levels / norms.clamp_min(torch.finfo(x.dtype).tiny))
        gen = seeded_generator(x.device, self.seed, self.rank, key, step)
        noise = torch.rand(rows.shape, generator=gen, device=x.device, dtype=x.dtype)
        levels = torch.floor(scaled + noise).clamp_(max=self.levels)
        signed = (levels * torch.sign(rows)).to(torch.int8).view(-1)[:numel]
        return torch.cat([signed.view(torch.uint8), norms.view(-1).contiguous().view(torch.uint8)])

    def _unpack(self, payload: torch.Tensor, like: torch.Tensor):
        numel = like.numel()
        levels = as_dtype(payload[..., :numel], torch.int8).to(like.dtype)
        norms = as_dtype(payload[..., numel:], like.dtype)
        return levels, norms

    def probe(self, received, like):
        return self._unpack(received, like)[1].sum(dtype=torch.float64)

    def decode(self, payload, like, key, step):
        levels, norms = self._unpack(payload, like)
        scale = norms.repeat_interleave(self.bucket, dim=-1)[..., : like.numel()]
        return levels * scale / self.levels

    def decode_mean(self, payloads, like, key, step):
        return self.decode(payloads, like, key, step).mean(dim=0)

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        """Nothing to restore: the noise is a function of (seed, rank, key, step). (A state saved
        before that held an ``"rng"`` entry; it is ignored.)"""


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A 1-D bool tensor as bytes, eight flags to a byte (the last byte padded with zeros)."""
    bits = torch.zeros(math.ceil(flags.numel() / 8) * 8, dtype=torch.uint8, device=flags.device)
    bits[: flags.numel()] = flags.to(torch.uint8)
    return (bits.view(-1, 8) * _BIT_WEIGHTS.to(flags.device)).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` flags of ``packed`` (bytes in the last dim) as a bool tensor."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :numel]


class ScaledSign(ElementwiseCompressor):
    """``C(p) = (‖p‖₁/d)·sign(p)`` per tensor, as in EF-SignSGD (Karimireddy et al.,
    ICML 2019, Alg. 1): one bit per element, packed eight to a byte, plus the scale.
    Payload per tensor: ``⌈d/8⌉ + itemsize`` bytes. Zeros are sent as +scale.

    With ``block = B`` each run of B consecutive elements (the last one shorter) has its own scale, its
    mean |x|, as in the blockwise scaled sign of Zheng, Huang and Kwok (NeurIPS 2019): ``⌈d/B⌉``
    scales, so elements of different magnitude in one tensor are not all sent at the tensor's mean.

    With ``bits = 2`` a second bit per element says whether its |x| is above its block's mean |x|, and
    the two halves are sent at their own mean magnitudes (two scales per block): a 4-level code whose
    levels are the centroids of its two magnitude classes, close to the optimal 2-bit quantiser of a
    Gaussian (Lloyd 1982, Max 1960). Payload ``2·⌈d/8⌉ + 2·itemsize`` per block.

    Every group of elements (a block, or a magnitude class in it) is sent at its own mean |x| with the
    right signs, so ``‖C(p) − p‖² = ‖p‖² − Σ_g ‖p_g‖₁² / |g| ≤ ‖p‖² − ‖p‖₁²/d``: a contraction at least
    as tight as the per-tensor scaled sign, and error feedback applies as before.
    """

    name = "sign"
    collective = "all_gather"
    reveals_nonfinite = True  # every element enters a scale (its group's mean |x|), which is sent

    def __init__(self, config: SignConfig):
        self.block = config.block
        self.bits = config.bits

    def _block_size(self, numel: int) -> int:
        return min(self.block, numel) if self.block else numel

    def payload_nbytes(self, shape, dtype):
        numel = shape.numel()
        blocks = math.ceil(numel / self._block_size(numel))
        return self.bits * (math.ceil(numel / 8) + _itemsize(dtype) * blocks)

    def encode(self, x, key, step):
        numel, size = x.numel(), self._block_size(x.numel())
        blocks = math.ceil(numel / size)
        magnitude, pad = x.abs(), blocks * size - numel
        if pad:  # only a last short block needs it: no copy for the per-tensor scale
            magnitude = torch.nn.functional.pad(magnitude, (0, pad))
        magnitude = magnitude.view(blocks, size)
        counts = torch.full((blocks,), float(size), dtype=torch.float64, device=x.device)
        counts[-1] = numel - (blocks - 1) * size
        sums = magnitude.sum(dim=1, dtype=torch.float64)
        flags = [_pack_bits(x >= 0)]
        if self.bits == 1:
            scales = sums / counts
        else:  # the padding (zeros) is never above a mean magnitude, so it stays out of the large class
            large = magnitude > (sums / counts).to(x.dtype).unsqueeze(1)
            large_sums = (magnitude * large).sum(dim=1, dtype=torch.float64)
            large_counts = large.sum(dim=1).to(torch.float64)
            small = (sums - large_sums) / (counts - large_counts).clamp_min(1)
            scales = torch.stack([small, large_sums / large_counts.clamp_min(1)], dim=1).flatten()
            flags.append(_pack_bits(large.flatten()[:numel]))
        return torch.cat([*flags, scales.to(x.dtype).view(torch.uint8)])

    def probe(self, received, like):
        scales = received[..., self.bits * math.ceil(like.numel() / 8) :]
        return as_dtype(scales, like.dtype).sum(dtype=torch.float64)

    def decode(self, payload, like, key, step):
        numel, size = like.numel(), self._block_size(like.numel())
        nbytes = math.ceil(numel / 8)
        signs = _unpack_bits(payload[..., :nbytes], numel).to(like.dtype) * 2 - 1
        scales = as_dtype(payload[..., self.bits * nbytes :], like.dtype)
        if self.bits == 2:
            large = _unpack_bits(payload[..., nbytes : 2 * nbytes], numel)
            small_scale = scales[..., 0::2].repeat_interleave(size, dim=-1)[..., :numel]
            large_scale = scales[..., 1::2].repeat_interleave(size, dim=-1)[..., :numel]
            return signs * torch.where(large, large_scale, small_scale)
        return signs * scales.repeat_interleave(size, dim=-1)[..., :numel]

    def decode_mean(self, payloads, like, key, step):
        return self.decode(payloads, like, key, step).mean(dim=0)
