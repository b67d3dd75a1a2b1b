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


class ScaledSign(ElementwiseCompressor):
    """``C(p) = (‖p‖₁/d)·sign(p)`` per tensor, as in EF-SignSGD (Karimireddy et al.,
    ICML 2019, Alg. 1): one bit per element, packed eight to a byte, plus the scale.
    Payload per tensor: ``⌈d/8⌉ + itemsize`` bytes. Zeros are sent as +scale.
    """

    name = "sign"
    collective = "all_gather"
    reveals_nonfinite = True  # every element enters the scale ‖p‖₁/d, which is sent

    def __init__(self, config: SignConfig):
        pass

    def payload_nbytes(self, shape, dtype):
        return math.ceil(shape.numel() / 8) + _itemsize(dtype)

    def encode(self, x, key, step):
        numel = x.numel()
        scale = (x.abs().sum(dtype=torch.float64) / numel).to(x.dtype).reshape(1)
        bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8, device=x.device)
        bits[:numel] = (x >= 0).to(torch.uint8)
        packed = (bits.view(-1, 8) * _BIT_WEIGHTS.to(x.device)).sum(dim=1, dtype=torch.uint8)
        return torch.cat([packed, scale.view(torch.uint8)])

    def probe(self, received, like):
        return as_dtype(received[..., math.ceil(like.numel() / 8) :], like.dtype).sum(dtype=torch.float64)

    def decode(self, payload, like, key, step):
        numel = like.numel()
        nbytes = math.ceil(numel / 8)
        packed = payload[..., :nbytes]
        scale = as_dtype(payload[..., nbytes:], like.dtype)
        bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(like.device)).ne(0)
        signs = bits.reshape(*packed.shape[:-1], nbytes * 8)[..., :numel].to(like.dtype) * 2 - 1
        return signs * scale

    def decode_mean(self, payloads, like, key, step):
        return self.decode(payloads, like, key, step).mean(dim=0)
