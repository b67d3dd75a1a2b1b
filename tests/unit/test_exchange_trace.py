"""benchmarks/exchange_trace.py's arithmetic on a trace whose answer is known."""

import pytest

from benchmarks.exchange_trace import FLOOR, summarise

METHOD = "powersgd:2"


def rank_trace(offset: float, late: float) -> dict:
    """Three steps of 10 ms (the first a warm-up), each with two exchanges that this rank issues ``late``
    seconds after the step's mark (in the warm-up step 0.5 ms after it, whatever ``late``: there the ranks
    issue together); plus two compute-only steps of 4 ms."""
    events, exchanges = [], []
    for i in range(3):
        t = offset + i * 0.010
        events += [(METHOD, "start", t), (METHOD, "hook_in", t + 0.004), (METHOD, "hook_out", t + 0.009),
                   (METHOD, "end", t + 0.010)]  # fmt: skip
        for j in range(2):
            issued = t + 0.005 + 0.002 * j + (late if i else 0.0005)
            exchanges.append((METHOD, issued, issued, t + 0.0065 + 0.002 * j))
    for i in range(2):
        t = offset + 1 + i * 0.004
        events += [(FLOOR, "start", t), (FLOOR, "hook_in", t + 0.003), (FLOOR, "end", t + 0.004)]
    return {"events": events, "exchanges": exchanges}


def test_summarise_separates_waiting_for_the_peer_from_the_exchange():
    # rank 1 issues every exchange 1 ms after rank 0; both finish it at the same time
    ranks = [rank_trace(0.0, 0.0), rank_trace(0.0, 0.001)]
    s = summarise(ranks, METHOD, skip=1)
    assert s["step"]["median"] == pytest.approx(10.0)
    assert s["forward + backward"]["median"] == pytest.approx(4.0)
    assert s["hook"]["median"] == pytest.approx(5.0)
    assert s["compute-only step"]["median"] == pytest.approx(4.0)
    assert s["skew between the ranks' issues"]["median"] == pytest.approx(1.0)
    # both in at issue + 1 ms, both done at issue + 1.5 ms
    assert s["exchange once both are in"]["median"] == pytest.approx(0.5)
    # rank 0 waits 1.5 ms per exchange, rank 1 0.5 ms: per step 3 and 1 ms
    assert s["waits in the hook"]["mean"] == pytest.approx(2.0)
    assert s["waits in the hook"]["p90"] == pytest.approx(3.0)
    assert s["exchanges per step"]["median"] == pytest.approx(2.0)
    # the warm-up step's exchanges (no skew) are left out
    assert s["skew between the ranks' issues"]["mean"] == pytest.approx(1.0)
