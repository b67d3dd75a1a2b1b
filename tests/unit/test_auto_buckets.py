"""benchmarks/auto_buckets.py: the section it writes from its measurements."""

import argparse

from benchmarks.auto_buckets import BEGIN, END, render


def test_the_section_gives_auto_against_none_and_auto_s_choices():
    def run(ms, choices=()):
        return {"median_ms": ms, "choices": list(choices)}

    found = {"load": [0.5, 1.5], "rates": {
        "1gbit": {"allreduce": run(170.0), "none": run(160.0), "auto": run(168.0, ["none"])},
        "unshaped": {"allreduce": run(150.0), "none": run(150.0), "auto": run(150.0, ["none", "bf16"])},
    }}  # fmt: skip
    args = argparse.Namespace(model="tiny_lm", steps=30, bucket_mb=1.0)
    text = render(found, args, "python benchmarks/auto_buckets.py")
    assert text.startswith(BEGIN) and text.rstrip().endswith(END)
    assert "| 1gbit | 170.0 | 160.0 | 168.0 | 1.05× | none |" in text
    assert "| unshaped | 150.0 | 150.0 | 150.0 | 1.00× | none → bf16 |" in text
    assert "1-minute load 0.5–1.5" in text
