"""Blockwise scaled sign: one scale (the block's mean |x|) per ``block`` elements."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from gradwire.compressors.registry import parse_config, plugin


def _sign(**params):
    return plugin("sign").factory()(parse_config("sign", params))


def test_each_block_is_sent_at_its_own_mean_magnitude() -> None:
    x = torch.cat([torch.full((8,), 0.5), -torch.full((8,), 4.0), torch.tensor([1.0, -3.0])])
    codec = _sign(block=8)
    payload = codec.encode(x, 0, 0)
    assert payload.numel() == math.ceil(18 / 8) + 4 * 3 == codec.payload_nbytes(x.shape, x.dtype)
    out = codec.decode(payload, x, 0, 0)
    # the last block is 2 long: its scale is (1 + 3) / 2, not (1 + 3) / 8
    expected = torch.cat([torch.full((8,), 0.5), -torch.full((8,), 4.0), torch.tensor([2.0, -2.0])])
    assert torch.equal(out, expected)
    whole = _sign().decode(_sign().encode(x, 0, 0), x, 0, 0)
    assert torch.equal(whole.abs(), torch.full((18,), float(x.abs().mean())))


def test_block_scales_lose_less_than_one_scale_when_magnitudes_vary() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.linspace(0.01, 10.0, 4096)
    errors = {}
    for block in (None, 256):
        codec = _sign(**({"block": block} if block else {}))
        errors[block] = float((codec.decode(codec.encode(x, 0, 0), x, 0, 0) - x).norm() / x.norm())
    assert errors[256] < 0.85 * errors[None]
    # a contraction on every block: the error is below the input's norm
    assert errors[256] < 1.0


def test_mean_of_ranks_payloads_is_the_mean_of_their_decodes() -> None:
    codec = _sign(block=16)
    a, b = torch.randn(50), torch.randn(50)
    pa, pb = codec.encode(a, 0, 0), codec.encode(b, 0, 0)
    mean = codec.decode_mean(torch.stack([pa, pb]), a, 0, 0)
    assert torch.allclose(mean, (codec.decode(pa, a, 0, 0) + codec.decode(pb, b, 0, 0)) / 2)


def test_a_non_finite_element_shows_in_its_block_scale() -> None:
    codec = _sign(block=8)
    x = torch.randn(40)
    x[33] = float("nan")
    assert not torch.isfinite(codec.probe(codec.encode(x, 0, 0), x))


@pytest.mark.parametrize("block", [0, 7, -8, 1 << 25])
def test_block_out_of_range_is_refused_naming_the_field(block: int) -> None:
    with pytest.raises(ValidationError, match="block"):
        parse_config("sign", {"block": block})


def test_two_bits_send_each_magnitude_class_at_its_own_mean() -> None:
    # first block: mean |x| is 2.5; 1 and 2 are below it (sent at 1.5), 3 and 4 above (sent at 3.5)
    first = torch.tensor([1.0, -4.0, 2.0, -3.0, 1.0, -4.0, 2.0, -3.0])
    # second block: mean 1.4375; 8 is the only large element, the seven 0.5 are sent at 0.5
    second = torch.tensor([0.5, 0.5, -0.5, 8.0, 0.5, -0.5, 0.5, 0.5])
    x = torch.cat([first, second])
    codec = _sign(block=8, bits=2)
    payload = codec.encode(x, 0, 0)
    assert payload.numel() == 2 * (2 + 4 * 2) == codec.payload_nbytes(x.shape, x.dtype)
    expected = torch.cat([first.sign() * torch.tensor([1.5, 3.5] * 4), second])
    assert torch.equal(codec.decode(payload, x, 0, 0), expected)


def test_two_bits_lose_less_than_one_and_keep_every_sign() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    errors = {}
    for bits in (1, 2):
        codec = _sign(bits=bits, block=512)
        out = codec.decode(codec.encode(x, 0, 0), x, 0, 0)
        assert torch.equal(out >= 0, x >= 0)
        errors[bits] = float((out - x).norm() ** 2 / x.norm() ** 2)
    # a Gaussian's 1-bit code keeps 1 - 2/π ≈ 0.36 of its energy as error, a 4-level code about 0.12
    assert errors[1] == pytest.approx(1 - 2 / math.pi, abs=0.02)
    assert errors[2] < 0.14


def test_two_bits_show_a_non_finite_element() -> None:
    codec = _sign(bits=2, block=16)
    x = torch.randn(40)
    x[5] = float("inf")
    assert not torch.isfinite(codec.probe(codec.encode(x, 0, 0), x))


@pytest.mark.parametrize("bits", [0, 3])
def test_bits_other_than_one_or_two_are_refused(bits: int) -> None:
    with pytest.raises(ValidationError, match="bits"):
        parse_config("sign", {"bits": bits})
