"""Dense, all-reduce compatible compressors: identity (the baseline), fp16, bf16."""

from __future__ import annotations

import torch

from gradwire.compressors.compressor import ElementwiseCompressor
from gradwire.compressors.config import CompressorConfig


class Identity(ElementwiseCompressor):
    """Sends the tensor as it is: a plain all-reduce (the uncompressed baseline)."""

    name = "none"
    collective = "all_reduce"
    reveals_nonfinite = True
    identity = True

    def payload_nbytes(self, shape, dtype):
        return shape.numel() * torch.empty((), dtype=dtype).element_size()

    def encode(self, x, key, step):
        return x

    def decode(self, payload, like, key, step):
        return payload.to(like.dtype)

    def probe(self, received, like):
        return received.sum(dtype=torch.float64)


class Cast(ElementwiseCompressor):
    """Casts to a 16-bit float for the wire and back (torch's fp16/bf16_compress_hook)."""

    collective = "all_reduce"
    reveals_nonfinite = True  # NaN and Inf survive the cast (and so does an fp16 overflow)

    def __init__(self, name: str, wire_dtype: torch.dtype):
        self.name = name
        self.wire_dtype = wire_dtype

    def payload_nbytes(self, shape, dtype):
        return shape.numel() * 2

    def encode(self, x, key, step):
        return x.to(self.wire_dtype)

    def decode(self, payload, like, key, step):
        return payload.to(like.dtype)

    def probe(self, received, like):
        return received.sum(dtype=torch.float64)


def build_identity(config: CompressorConfig) -> Identity:
    return Identity()


def build_fp16(config: CompressorConfig) -> Cast:
    return Cast("fp16", torch.float16)


def build_bf16(config: CompressorConfig) -> Cast:
    return Cast("bf16", torch.bfloat16)
