"""The arithmetic of the side-by-side benchmarks: the overhead benchmark's arm order, median
interval and verdict, and the PowerSGD-vs-torch figures (ratio, floor + wire bound, Amdahl limit)."""

import math

import pytest

from benchmarks import overhead, powersgd_lead


def test_arms_alternate_order_every_round():
    assert overhead.arm_order(0) == ("plain", "torch-hook", "hook", "runtime")
    assert overhead.arm_order(1) == ("runtime", "hook", "torch-hook", "plain")
    assert overhead.arm_order(2) == overhead.arm_order(0)


def test_median_interval_is_the_binomial_order_statistics():
    values = [float(v) for v in range(10)]  # shuffled order must not matter
    # n = 10: P(Bin(10, 1/2) <= 1) = 11/1024 <= 2.5 % < P(<= 2) = 56/1024, so k = 1
    assert overhead.median_interval(values[::-1]) == (1.0, 8.0)
    many = [float(v) for v in range(40)]
    low, high = overhead.median_interval(many)
    # n = 40: k = 13 (P(<= 13) = 1.9 %, P(<= 14) = 4.0 %)
    cumulative = sum(math.comb(40, i) for i in range(14)) / 2**40
    assert cumulative <= 0.025 < cumulative + math.comb(40, 14) / 2**40
    assert (low, high) == (13.0, 26.0)
    assert overhead.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few for 95 %: the range
    with pytest.raises(ValueError, match="at least one value"):
        overhead.median_interval([])


def test_overhead_verdict_needs_the_whole_interval_on_one_side_of_the_target():
    def row(low, high):
        return {"runtime_interval": (low, high)}

    assert overhead.verdict(row(-0.01, 0.02)) == "met"
    assert overhead.verdict(row(0.04, 0.09)) == "missed"
    assert overhead.verdict(row(0.01, 0.05)) == "not resolved"


def test_summarise_pairs_the_arms_within_each_round():
    plain = [0.010, 0.020, 0.010, 0.020, 0.010, 0.020, 0.010]
    turns = {"plain": plain, "torch-hook": [p * 1.01 for p in plain], "hook": [p * 1.01 for p in plain],
             "runtime": [p * 1.05 for p in plain]}  # fmt: skip
    row = overhead.summarise("w", turns)
    # the drift between rounds (10 vs 20 ms) cancels in the paired ratios
    assert row["runtime_overhead"] == pytest.approx(0.05)
    assert row["hook_overhead"] == pytest.approx(0.01)
    assert row["runtime_interval"] == pytest.approx((0.05, 0.05))


def _run(method, ms, wire=0.0, payload=0.0):
    return {"method": method, "step_seconds": [ms / 1000] * 3, "wire_bytes_per_step": wire,
            "bytes_per_step": payload, "compress_seconds_per_step": 0.001,
            "communicate_seconds_per_step": 0.002}  # fmt: skip


def test_powersgd_case_gives_ratio_bound_and_amdahl_limit():
    runs = [_run("compute-only", 10.0), _run("torch-powersgd:2", 20.0),
            _run("powersgd:2", 12.0, wire=12_500, payload=12_500)]  # fmt: skip
    c = powersgd_lead.case(runs, "100mbit", 2)
    assert c["wire_ms"] == pytest.approx(1.0)  # 12.5 kB at 100 Mbit/s
    assert c["step_ratio"] == pytest.approx(0.6)
    assert c["bound_ratio"] == pytest.approx(12.0 / 11.0)
    assert c["amdahl"] == pytest.approx(11.0 / 20.0)
    assert c["compress_ms"] == pytest.approx(1.0) and c["communicate_ms"] == pytest.approx(2.0)


def test_the_gemm_profile_takes_each_models_largest_compressed_matrices():
    assert powersgd_lead.model_matrices("digits_cnn") == [
        ("classifier.0.weight", (256, 4096)), ("features.2.weight", (64, 288))
    ]  # fmt: skip
    assert [shape for _, shape in powersgd_lead.model_matrices("tiny_lm")] == [(512, 128), (128, 512)]


def test_a_step_target_below_the_amdahl_limit_is_called_out_of_reach():
    assert powersgd_lead.step_verdict({"step_ratio": 0.7, "amdahl": 0.9}) == "met"
    assert powersgd_lead.step_verdict({"step_ratio": 0.95, "amdahl": 0.9}) == "out of reach"
    assert powersgd_lead.step_verdict({"step_ratio": 0.8, "amdahl": 0.5}) == "missed"


def test_time_to_accuracy_takes_each_seed_seed_zero_under_the_old_key():
    target = powersgd_lead.WORKLOADS["digits_cnn"]["target"]

    def curve(step_at_target):
        return [{"step": s, "test_accuracy": target if s >= step_at_target else 0.5} for s in (20, 40, 60)]

    results = {"curves": {"2|digits_cnn|powersgd:2": curve(40), "2|digits_cnn|powersgd:2|s1": curve(20),
                          "2|digits_cnn|powersgd:2|s2": curve(99), "2|digits_cnn|powersgd:2|s4": curve(20)}}
    assert powersgd_lead.curve_key(2, "digits_cnn", "powersgd:2", 0) == "2|digits_cnn|powersgd:2"
    # seeds 0..2 (seed 3 is missing, so seed 4 is not read); seed 2 never reaches the target
    assert powersgd_lead.seed_times(results, "2", "digits_cnn", "powersgd:2", 10.0) == [0.4, 0.2, None]
