"""PowerSGD writes its output straight into the reducer's ``out`` (as DDP's hook passes the bucket's
own views) without changing a single bit, and only where that is safe.

* With ``out`` aliasing the inputs, as the hook calls it, every output over several steps is
  ``torch.equal`` to a reducer that returns new tensors, for feedback ``none`` and ``ef``, with a
  shape group of one matrix (written in place) and one of two (stacked, then copied).
* The matrix alone in its shape group gets no output buffer of the compressor's own: it was written
  into ``out``.
* ``nonfinite: raise`` leaves ``out`` (here: the inputs) untouched when a rank's gradient holds a
  NaN, as before: the compressor is not handed ``out`` then.
"""

from __future__ import annotations

import pytest
import torch

from gradwire.compressors import make_reducer
from gradwire.compressors.reducer import NonFiniteGradientError

SHAPES = [(64, 48), (32, 4, 3, 3), (32, 4, 3, 3), (64,)]


def grads(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("feedback", ["none", "ef"])
def test_writing_into_aliased_out_changes_no_bit(feedback: str) -> None:
    params = {"rank": 2, "min_compression_rate": 0, "feedback": feedback}
    in_place, fresh = make_reducer("powersgd", **params), make_reducer("powersgd", **params)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        g = grads(gen)
        want = fresh.reduce([t.clone() for t in g])
        got = in_place.reduce(g, out=g)  # as the hook: out are the inputs themselves
        for x, y, buffer in zip(got, want, g):
            assert x.data_ptr() == buffer.data_ptr()
            assert torch.equal(x, y)
    own_outputs = [key for key in in_place.compressor._scratch if key[0] == "approx"]
    assert [key[1] for key in own_outputs] == [(1, 2)]  # only the stacked pair of 4×3×3 convs


def test_nonfinite_raise_leaves_out_untouched() -> None:
    reducer = make_reducer("powersgd", rank=2, min_compression_rate=0, nonfinite="raise")
    gen = torch.Generator().manual_seed(6)
    reducer.reduce(grads(gen))  # a finite step first: warm Q and error buffers exist
    g = grads(gen)
    g[0][3, 5] = float("nan")
    before = [t.clone() for t in g]
    with pytest.raises(NonFiniteGradientError):
        reducer.reduce(g, out=g)
    for now, then in zip(g, before):
        assert torch.equal(now.isnan(), then.isnan())
        assert torch.equal(now.nan_to_num(), then.nan_to_num())
