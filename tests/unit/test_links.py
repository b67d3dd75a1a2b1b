"""benchmarks/links.py's bookkeeping: rounds pooled into one summary, saved runs resumed or refused."""

import json

import pytest

from benchmarks import links


def test_step_summary_pools_the_rounds_of_each_method():
    runs = {
        "digits_cnn|1gbit|powersgd:2|0": {"step_seconds": [0.1, 0.3], "bytes_per_step": 41536, "params": 7,
                                          "compress_seconds_per_step": 0.010},
        "digits_cnn|1gbit|powersgd:2|1": {"step_seconds": [0.2], "bytes_per_step": 41536, "params": 7,
                                          "compress_seconds_per_step": 0.020},
        "digits_cnn|1gbit|allreduce|0": {"step_seconds": [0.5], "bytes_per_step": 99, "params": 7},
    }  # fmt: skip
    summary = links.step_summary(runs)
    assert set(summary) == {"digits_cnn|1gbit|powersgd:2", "digits_cnn|1gbit|allreduce"}
    psgd = summary["digits_cnn|1gbit|powersgd:2"]
    assert psgd["steps"] == 3 and psgd["median_ms"] == pytest.approx(200)
    assert psgd["p95_ms"] == pytest.approx(300) and psgd["compress_ms"] == pytest.approx(15)
    assert summary["digits_cnn|1gbit|allreduce"]["compress_ms"] == 0


def test_resume_keeps_runs_and_refuses_files_it_did_not_write(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"curves": {"m|x": []}, "runs": {"m|r|x|0": {}}, "steps": {"stale": 1}}))
    assert links.load_saved(good) == {"curves": {"m|x": []}, "runs": {"m|r|x|0": {}}}
    for name, text in (("other.json", '{"labs": []}'), ("broken.json", "{not json")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SystemExit, match=f"--json {path} cannot be resumed"):
            links.load_saved(path)

