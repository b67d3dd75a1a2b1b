"""Bad input gets a clear error naming what is wrong; NaN/Inf never propagates silently."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from gradwire.compressors import UnknownCompressorError, available, make_hook, make_reducer
from gradwire.compressors.reducer import NonFiniteGradientError
from tests.ranks import run_ranks


def test_unknown_name_lists_available():
    with pytest.raises(UnknownCompressorError) as info:
        make_reducer("powerSGD")
    message = str(info.value)
    assert "'powerSGD'" in message
    for name in available():
        assert name in message


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("powersgd", {"rank": 0}, "rank"),
        ("powersgd", {"rank": -3}, "rank"),
        ("topk", {"ratio": 0.0}, "ratio"),
        ("topk", {"ratio": 1.5}, "ratio"),
        ("randk", {"ratio": -0.1}, "ratio"),
        ("topk", {"k": 0}, "k"),
        ("topk", {"feedback": "econtrol", "eta": -0.1}, "eta"),
        ("topk", {"feedback": "ef21-sgdm", "eta": 1.5}, "eta"),
        ("qsgd", {"levels": 0}, "levels"),
        ("topk", {"feedback": "ef42"}, "feedback"),
        ("topk", {"ratoi": 0.1}, "ratoi"),
        ("powersgd", {"start_iter": -1}, "start_iter"),
    ],
)
def test_invalid_parameters_name_the_field(name, params, field):
    with pytest.raises(ValidationError) as info:
        make_reducer(name, **params)
    locs = {str(part) for err in info.value.errors() for part in err["loc"]}
    assert field in locs


@pytest.mark.parametrize(
    ("name", "params", "words"),
    [
        ("powersgd", {"feedback": "ef21"}, ["ef21", "powersgd", "ef, none"]),
        ("qsgd", {"feedback": "econtrol"}, ["econtrol", "qsgd", "not contractive"]),
        ("fp16", {"feedback": "ef21-sgdm"}, ["ef21-sgdm", "fp16"]),
        ("randk", {"scale": True, "feedback": "ef21"}, ["ef21", "randk", "unbiased"]),
        ("topk", {"ratio": 0.1, "k": 3}, ["ratio", "k"]),
        ("topk", {"feedback": "ef", "eta": 0.5}, ["eta", "ef"]),
    ],
)
def test_wrong_combinations_are_refused_with_the_combination_named(name, params, words):
    with pytest.raises(ValidationError) as info:
        make_reducer(name, **params)
    text = str(info.value)
    for word in words:
        assert word in text


def test_sound_combinations_are_accepted():
    for feedback in ("none", "ef", "ef21", "ef21-sgdm", "econtrol"):
        make_reducer("topk", feedback=feedback)
        make_reducer("sign", feedback=feedback)
    make_reducer("powersgd", feedback="none")
    make_reducer("topk", feedback="econtrol", eta=0.0)


def test_bad_tensors_are_refused():
    r = make_reducer("topk")
    with pytest.raises(TypeError, match=r"tensors\[1\].*int64"):
        r.reduce([torch.randn(3, 3), torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"tensors\[1\] is torch.float64"):
        r.reduce([torch.randn(3, 3), torch.randn(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="2 tensors but 1 keys"):
        r.reduce([torch.randn(3, 3), torch.randn(3)], keys=[0])
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        r.reduce([[1.0, 2.0]])
    assert r.stats()["steps"] == 0  # nothing was half-done


def test_hook_parameters_are_validated_too():
    with pytest.raises(ValidationError):
        make_hook("powersgd", rank=0)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["topk", "powersgd", "sign", "qsgd", "randk", "fp16", "none"])
def test_nonfinite_propagates_to_every_output_and_leaves_state_untouched(name, bad_value):
    r = make_reducer(name, feedback="ef", min_compression_rate=0)
    good = [torch.randn(12, 10), torch.randn(10)]
    r.reduce(good)
    r.reduce(good)
    before = {k: {n: t.clone() for n, t in b.items()} for k, b in r.feedback.state.items()}
    bad = [torch.randn(12, 10), torch.randn(10)]
    bad[0][3, 4] = bad_value
    out = r.reduce(bad)
    assert all(torch.isnan(o).all() for o in out)
    assert r.stats()["nonfinite_steps"] == 1
    after = r.feedback.state
    assert before.keys() == after.keys()
    for k in before:
        for n in before[k]:
            assert torch.equal(before[k][n], after[k][n])
    # the next finite step is finite again
    assert all(torch.isfinite(o).all() for o in r.reduce(good))


def test_inf_raises_when_asked():
    r = make_reducer("topk", nonfinite="raise")
    bad = [torch.randn(12, 10)]
    bad[0][0, 0] = float("inf")
    with pytest.raises(NonFiniteGradientError, match="NaN or Inf"):
        r.reduce(bad)


RANKED = [
    ("topk", {"ratio": 0.1, "feedback": "ef21"}),
    ("powersgd", {"min_compression_rate": 0}),
    ("randk", {"ratio": 0.1}),
    ("qsgd", {}),
    ("sign", {}),
    ("fp16", {}),
]


def _nonfinite_on_rank_one(rank, world):
    outcomes = {}
    for name, params in RANKED:
        for where in (0, 1):  # in a compressed matrix, in a plain bias
            for mode in ("propagate", "raise"):
                r = make_reducer(name, nonfinite=mode, **params)
                g = [torch.randn(16, 8), torch.randn(8)]
                r.reduce(g)
                if rank == 1:
                    g = [g[0].clone(), g[1].clone()]
                    g[where].view(-1)[2] = float("nan") if where else float("inf")
                try:
                    out = r.reduce(g)
                    result = ("returned", all(bool(torch.isnan(o).all()) for o in out))
                except NonFiniteGradientError:
                    result = ("raised", True)
                outcomes[(name, where, mode)] = result
    return outcomes


@pytest.mark.multiprocess
def test_nonfinite_on_one_rank_is_seen_by_every_rank():
    for outcome in run_ranks(_nonfinite_on_rank_one, 2):
        for (name, where, mode), result in outcome.items():
            expected = ("returned", True) if mode == "propagate" else ("raised", True)
            assert result == expected, (name, where, mode)


@pytest.mark.parametrize("name", ["none", "fp16", "randk", "powersgd", "topk", "sign", "qsgd"])
def test_large_finite_gradients_are_not_mistaken_for_overflow(name):
    # 90,000 ones exceed float16's maximum (65,504) when summed in float16
    big16 = [torch.ones(300, 300, dtype=torch.float16), torch.ones(10, dtype=torch.float16)]
    big32 = [torch.full((300, 300), 1e35), torch.full((10,), 1e35)]
    # (fp16 compression of 1e35 really overflows: that is reported, correctly, as non-finite)
    for grads in (big16, big32) if name != "fp16" else (big16,):
        r = make_reducer(name, min_compression_rate=0)
        out = r.reduce(grads)
        assert r.stats()["nonfinite_steps"] == 0
        assert all(torch.isfinite(o).all() for o in out)
