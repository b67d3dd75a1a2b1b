"""Top-k by an estimated threshold (``select="threshold"``/``"auto"``) against exact ``torch.topk``.

Without ties at the k-th magnitude the kept set must be exactly torch.topk's; with ties the kept
magnitudes must still be the k largest. The payload stays 8k bytes, and error feedback built on it
follows the same trajectory as with exact selection.
"""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from gradwire.compressors import make_reducer
from gradwire.compressors.config import TopKConfig
from gradwire.compressors.sparse import TopK


def _indices(topk: TopK, payload: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return topk._split(payload, like)[1].sort().values


def _exact_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x.abs(), k, sorted=False).indices.sort().values


INPUTS = {
    "normal": lambda g, d: torch.randn(d, generator=g),
    "heavy-tailed": lambda g, d: torch.randn(d, generator=g) / torch.rand(d, generator=g).clamp_min(1e-6),
    "uniform": lambda g, d: torch.rand(d, generator=g) - 0.5,
    "mostly-tiny": lambda g, d: (
        torch.randn(d, generator=g) * torch.where(torch.rand(d, generator=g) < 0.02, 1.0, 1e-6)
    ),
    "float64": lambda g, d: torch.randn(d, generator=g, dtype=torch.float64),
}


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("d,ratio", [(150_000, 0.01), (262_144, 0.001), (40_000, 0.05), (3_000, 0.01)])
def test_same_indices_as_torch_topk_on_random_inputs(kind, d, ratio):
    topk = TopK(TopKConfig(ratio=ratio, select="threshold"))
    for trial in range(4):
        x = INPUTS[kind](torch.Generator().manual_seed(trial), d)
        k = topk.kept(d)
        payload = topk.encode(x, key=trial, step=trial)
        assert payload.numel() == k * (x.element_size() + 4) == topk.payload_nbytes(x.shape, x.dtype)
        assert torch.equal(_indices(topk, payload, x), _exact_indices(x, k))
        exact = TopK(TopKConfig(ratio=ratio, select="exact"))
        assert torch.equal(topk.decode(payload, x, 0, 0), exact.decode(exact.encode(x, 0, 0), x, 0, 0))
    assert topk.selections["threshold"] >= 3, topk.selections  # the estimate was used, not the fallback


def test_ties_keep_the_k_largest_magnitudes():
    # integers in [-20, 20]: thousands of ties at the k-th magnitude
    x = torch.randint(-20, 21, (200_000,), generator=torch.Generator().manual_seed(1)).float()
    topk = TopK(TopKConfig(ratio=0.01, select="threshold"))
    k = topk.kept(x.numel())
    payload = topk.encode(x, key=0, step=0)
    values, idx = topk._split(payload, x)
    assert topk.selections["threshold"] == 1
    assert idx.unique().numel() == k  # distinct positions
    assert torch.equal(values, x[idx])  # the values sent are the input's at those positions
    assert torch.equal(values.abs().sort().values, torch.topk(x.abs(), k).values.sort().values)


def test_a_missed_estimate_falls_back_to_exact_topk():
    class Loose(TopK):
        MISS = 0.7  # a threshold near the sample's k-th largest: misses about half the time

    topk = Loose(TopKConfig(ratio=0.01, select="threshold"))
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    k = topk.kept(x.numel())
    for step in range(40):
        payload = topk.encode(x, key=3, step=step)
        assert torch.equal(_indices(topk, payload, x), _exact_indices(x, k))
    assert topk.selections["fallback"] > 0 and topk.selections["threshold"] > 0, topk.selections


def test_sparse_input_with_zero_threshold_falls_back():
    # 99.5 % exact zeros, k = 1 %: the threshold estimate is 0 and everything is a candidate
    g = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(200_000, generator=g) < 0.005, torch.randn(200_000, generator=g), 0.0)
    topk = TopK(TopKConfig(ratio=0.01, select="threshold"))
    k = topk.kept(x.numel())
    values, _ = topk._split(topk.encode(x, key=0, step=0), x)
    assert topk.selections["fallback"] == 1
    assert torch.equal(values.abs().sort().values, torch.topk(x.abs(), k).values.sort().values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_entries_are_kept(bad):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    x[12_345] = bad
    topk = TopK(TopKConfig(ratio=0.01, select="threshold"))
    decoded = topk.decode(topk.encode(x, key=0, step=0), x, 0, 0)
    assert topk.selections["threshold"] == 1  # one bad entry is rarely sampled: no fallback
    assert torch.equal(decoded[12_345:12_346].isnan(), x[12_345:12_346].isnan())
    assert not torch.isfinite(decoded[12_345])


def test_nan_in_the_sample_falls_back_and_keeps_it():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(5))
    x[::50] = float("nan")  # 2 % NaN: the sample's top r is NaN, the candidates are everything
    topk = TopK(TopKConfig(ratio=0.01, select="threshold"))
    values, _ = topk._split(topk.encode(x, key=0, step=0), x)
    assert topk.selections["fallback"] == 1
    assert values.isnan().all()  # 4000 NaN ≥ k = 2000: torch.topk keeps only NaN


def test_sample_seeded_by_seed_rank_key_and_step(monkeypatch):
    import gradwire.compressors.sparse as sparse

    seen = []
    real = sparse.seeded_generator

    def recording(device, *parts):
        seen.append(parts)
        return real(device, *parts)

    monkeypatch.setattr(sparse, "seeded_generator", recording)
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(6))
    topk = TopK(TopKConfig(ratio=0.01, select="threshold", seed=9))
    topk.setup(2, 4)
    first = topk.encode(x, key=5, step=7)
    assert seen == [(9, 2, 5, 7)]
    assert torch.equal(topk.encode(x, key=5, step=7), first)  # no generator state carried over


def test_auto_picks_threshold_only_for_large_cpu_tensors():
    topk = TopK(TopKConfig(ratio=0.01))
    assert TopKConfig().select == "auto"
    assert topk.uses_threshold(torch.zeros(TopK.AUTO_MIN_NUMEL))
    assert not topk.uses_threshold(torch.zeros(TopK.AUTO_MIN_NUMEL - 1))
    assert not TopK(TopKConfig(select="exact")).uses_threshold(torch.zeros(10**6))
    assert TopK(TopKConfig(select="threshold")).uses_threshold(torch.zeros(10))
    with pytest.raises(pydantic.ValidationError):
        TopKConfig(select="approximate")


@pytest.mark.parametrize("feedback", ["none", "ef", "ef21", "ef21-sgdm", "econtrol"])
def test_feedback_trajectories_equal_exact_selection(feedback):
    """Same outputs and same feedback buffers, bit for bit, over several steps (no ties)."""
    shapes = [(512, 300), (64, 3, 3, 3), (300,)]  # 153,600 elements: above auto's floor
    params = {"ratio": 0.01, "feedback": feedback, "min_compression_rate": 0}
    if feedback in ("ef21-sgdm", "econtrol"):
        params["eta"] = 0.3
    fast = make_reducer("topk", select="auto", **params)
    exact = make_reducer("topk", select="exact", **params)
    for step in range(4):
        g = [
            torch.randn(s, generator=torch.Generator().manual_seed(10 * step + i))
            for i, s in enumerate(shapes)
        ]
        out_fast, out_exact = fast.reduce([t.clone() for t in g]), exact.reduce([t.clone() for t in g])
        for a, b in zip(out_fast, out_exact):
            assert torch.equal(a, b)
        for key, buffers in exact.feedback.state.items():
            for name, t in buffers.items():
                assert torch.equal(fast.feedback.state[key][name], t), (step, key, name)
    used = fast.compressor.selections
    assert used["threshold"] >= 3 and used["fallback"] == 0, used
    assert exact.compressor.selections["threshold"] == 0
    assert fast.stats()["bytes_sent"] == exact.stats()["bytes_sent"]
    k = math.ceil(0.01 * 512 * 300)
    assert k * 8 <= fast.stats()["bytes_sent"]
