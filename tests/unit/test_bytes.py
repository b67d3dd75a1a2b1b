"""Byte accounting: stats() equals the analytic payload of docs/algorithms.md for the model's shapes."""

from __future__ import annotations

import math

import pytest
import torch

from gradwire.compressors import make_reducer
from tests.ranks import run_ranks

# a small CNN: conv weights, biases, a linear layer, and a small matrix that PowerSGD skips
SHAPES = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 512), (10,), (4, 3)]
F32 = 4
FLAG = 4  # Rand-k's one-element non-finite word (its k positions cannot reveal a NaN elsewhere)


def matrix(shape):
    return shape[0], math.prod(shape[1:])


def split(shapes, compressed_bytes, plain_rate=1.0, flag=0):
    """Bytes sent given a per-tensor payload rule: compressed payloads + plain tensors."""
    sent = flag
    for s in shapes:
        d = math.prod(s)
        payload = compressed_bytes(s)
        if len(s) >= 2 and F32 * d >= plain_rate * payload:
            sent += payload
        else:
            sent += F32 * d
    return sent


def powersgd_bytes(r):
    def rule(s):
        a, b = matrix(s)
        return F32 * min(r, a, b) * (a + b)

    return rule


def sign_block_bytes(block):
    return lambda s: math.ceil(math.prod(s) / 8) + F32 * math.ceil(math.prod(s) / block)


EXPECTED = {
    "none": ({}, lambda s: F32 * math.prod(s), 1.0),
    "fp16": ({}, lambda s: 2 * math.prod(s), 0.0),
    "bf16": ({}, lambda s: 2 * math.prod(s), 0.0),
    "powersgd-2": ({"rank": 2}, powersgd_bytes(2), 2.0),
    "powersgd-4": ({"rank": 4}, powersgd_bytes(4), 2.0),
    "topk": ({"ratio": 0.01}, lambda s: 8 * math.ceil(0.01 * math.prod(s)), 1.0),
    "topk-k": ({"k": 7}, lambda s: 8 * min(7, math.prod(s)), 1.0),
    "randk": ({"ratio": 0.05}, lambda s: F32 * math.ceil(0.05 * math.prod(s)), 1.0, FLAG),
    "qsgd": ({"bucket_size": 128}, lambda s: math.prod(s) + F32 * math.ceil(math.prod(s) / 128), 1.0),
    "sign": ({}, lambda s: math.ceil(math.prod(s) / 8) + F32, 1.0),
    "sign-block": ({"block": 64}, sign_block_bytes(64), 1.0),
    "sign-2bit": ({"block": 64, "bits": 2}, lambda s: 2 * sign_block_bytes(64)(s), 1.0),
}


def _name(label):
    return label.split("-")[0]


@pytest.mark.parametrize("label", sorted(EXPECTED))
def test_bytes_after_one_step_match_formula(label):
    params, rule, rate, *flag = EXPECTED[label]
    reducer = make_reducer(_name(label), **params)
    reducer.reduce([torch.randn(s) for s in SHAPES])
    stats = reducer.stats()
    total = sum(math.prod(s) for s in SHAPES)
    assert stats["bytes_uncompressed"] == F32 * total
    assert stats["bytes_sent"] == split(SHAPES, rule, rate, *flag)


def test_powersgd_rank2_formula_spelled_out():
    # 4·r·Σ(a+b) over compressed matrices + 4·d_unc
    reducer = make_reducer("powersgd", rank=2)
    reducer.reduce([torch.randn(s) for s in SHAPES])
    compressed = [(16, 9), (32, 144), (10, 512)]  # (4, 3) fails min_compression_rate=2
    d_unc = 16 + 32 + 10 + 12
    assert reducer.stats()["bytes_sent"] == 4 * 2 * sum(a + b for a, b in compressed) + 4 * d_unc


def _ranked_bytes(rank, world):
    out = {}
    for name, params in (("topk", {"ratio": 0.01}), ("powersgd", {"rank": 2})):
        reducer = make_reducer(name, **params)
        torch.manual_seed(rank)
        for _ in range(2):
            reducer.reduce([torch.randn(s) for s in SHAPES])
        out[name] = reducer.stats()
    return out


@pytest.mark.multiprocess
def test_wire_bytes_follow_ring_costs_on_four_ranks():
    world = 4
    results = run_ranks(_ranked_bytes, world)
    total = sum(math.prod(s) for s in SHAPES)
    ring = 2 * (world - 1) / world
    for stats in results:
        topk, psgd = stats["topk"], stats["powersgd"]
        # Top-k: values+indices all-gathered ((n-1)·S); biases + flag all-reduced
        gathered = sum(8 * math.ceil(0.01 * math.prod(s)) for s in SHAPES if len(s) >= 2)
        reduced = topk["bytes_sent"] / 2 - gathered
        assert topk["wire_bytes_sent"] == pytest.approx(2 * ((world - 1) * gathered + ring * reduced))
        assert topk["wire_bytes_uncompressed"] == pytest.approx(2 * ring * F32 * total)
        # PowerSGD: everything is an all-reduce
        assert psgd["wire_bytes_sent"] == pytest.approx(ring * psgd["bytes_sent"])
        assert psgd["bytes_sent"] == 2 * split(SHAPES, powersgd_bytes(2), 2.0)
