"""benchmarks/exchange_trace.py on a real netlab: both ranks traced, every exchange of the hook seen.

Needs root and network namespaces (CI runs as root); skipped with the reason elsewhere."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import exchange_trace
from benchmarks.netlab import support_problem

PROBLEM = support_problem()
pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(PROBLEM is not None, reason=f"netlab cannot run here: {PROBLEM}"),
]


def test_the_trace_sees_powersgd_s_two_exchanges_per_step_on_both_ranks():
    args = argparse.Namespace(
        model="digits_cnn", method="powersgd:2", rate="1gbit", workers=2, steps=6, warmup=3
    )
    summary = exchange_trace.measure(args)["summary"]
    assert summary["exchanges per step"]["median"] == 2  # P and Q; the plain first steps left out
    for name in ("step", "forward + backward", "hook", "compute-only step"):
        assert summary[name]["median"] > 0, name
    # the hook holds its waits, and a wait holds the exchange it waited for
    assert summary["hook"]["median"] >= summary["waits in the hook"]["median"] > 0
    assert summary["skew between the ranks' issues"]["median"] >= 0
    assert summary["exchange once both are in"]["median"] > 0
