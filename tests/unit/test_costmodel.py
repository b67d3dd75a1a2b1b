"""The cost model: its bytes equal a real reducer's ledger; its collective costs behave as derived."""

import math

import pytest
import torch

from gradwire.cli.costmodel import (
    Calibration,
    Collective,
    CompressTime,
    Link,
    all_gather_seconds,
    all_reduce_seconds,
    config_label,
    ddp_buckets,
    parse_bandwidth,
    parse_latency,
    payload_nbytes,
    predict_step,
    reduce_collectives,
    step_traffic,
)
from gradwire.compressors import make_reducer
from gradwire.compressors.registry import parse_config
from gradwire.worker.models import build_model
from tests.ranks import run_ranks

#: every built-in compressor, with feedback rules and options that change what goes on the wire
CONFIGS = [
    ("none", {}),
    ("none", {"feedback": "ef"}),
    ("fp16", {}),
    ("bf16", {"start_iter": 2}),
    ("powersgd", {"rank": 2}),
    ("powersgd", {"rank": 4, "min_compression_rate": 1.0}),
    ("topk", {"ratio": 0.01}),
    ("topk", {"k": 7, "feedback": "ef21"}),
    ("topk", {"ratio": 0.05, "feedback": "econtrol"}),
    ("randk", {"ratio": 0.02}),
    ("randk", {"k": 3, "feedback": "ef21-sgdm"}),
    ("qsgd", {"levels": 15, "bucket_size": 100}),
    ("sign", {}),
    ("sign", {"block": 40}),
    ("sign", {"block": 40, "bits": 2}),
]
STEPS = 4


def small_models() -> dict[str, list[torch.Size]]:
    torch.manual_seed(0)
    models = {
        "cnn": build_model("cnn", 64, 10, channels=(4, 8)),
        "mlp": build_model("mlp", 20, 4, hidden=[33, 17]),
        "lm": build_model("transformer_lm", 12, 9, d_model=16, layers=1, heads=2),
    }
    return {name: [p.shape for p in m.parameters()] for name, m in models.items()}


def _ledger_steps(name: str, params: dict, buckets: list[list[torch.Size]]) -> list[dict]:
    """Run STEPS steps of a real reducer, one reduce() per bucket; the ledger's increments per step."""
    reducer = make_reducer(name, **params)
    gen = torch.Generator().manual_seed(reducer.comm.rank + 1)
    per_step, before = [], reducer.stats()
    for _ in range(STEPS):
        key = 0
        for i, bucket in enumerate(buckets):
            grads = [torch.randn(s, generator=gen) for s in bucket]
            reducer.reduce(grads, keys=list(range(key, key + len(grads))), advance=i == len(buckets) - 1)
            key += len(grads)
        after = reducer.stats()
        per_step.append({k: after[k] - before[k] for k in ("bytes_sent", "wire_bytes_sent", "collectives")})
        before = after
    return per_step


def _expected(name: str, params: dict, buckets: list[list[tuple]], n: int) -> list[dict]:
    config = parse_config(name, params)
    out = []
    for step in range(STEPS):
        traffic = step_traffic(buckets, config, step=step)
        out.append({"bytes_sent": traffic.payload_bytes, "wire_bytes_sent": traffic.wire_bytes(n),
                    "collectives": len(traffic.collectives)})
    return out


def test_bytes_equal_a_one_rank_reducers_ledger_for_every_compressor():
    for model, shapes in small_models().items():
        # two buckets, so that each reduce() call's plain all-reduce and flag are counted per call
        buckets = [shapes[len(shapes) // 2:][::-1], shapes[: len(shapes) // 2][::-1]]
        for name, params in CONFIGS:
            got = _ledger_steps(name, params, buckets)
            want = _expected(name, params, [[tuple(s) for s in b] for b in buckets], 1)
            assert got == want, (model, name, params)


def _two_rank_ledgers(rank: int, world: int) -> dict:
    shapes = small_models()["mlp"]
    buckets = [shapes[::-1]]
    return {f"{name} {params}": _ledger_steps(name, params, buckets)[-1] for name, params in CONFIGS}


@pytest.mark.multiprocess
def test_wire_bytes_equal_a_two_rank_gloo_reducers_ledger():
    results = run_ranks(_two_rank_ledgers, 2, timeout=120)
    shapes = [tuple(s) for s in small_models()["mlp"]][::-1]
    for name, params in CONFIGS:
        want = _expected(name, params, [shapes], 2)[-1]
        for rank_result in results:
            got = rank_result[f"{name} {params}"]
            assert got["bytes_sent"] == want["bytes_sent"], (name, params)
            assert got["wire_bytes_sent"] == pytest.approx(want["wire_bytes_sent"]), (name, params)
            assert got["collectives"] == want["collectives"], (name, params)


def test_payload_sizes_equal_the_compressors_own():
    from gradwire.compressors.registry import plugin

    for name, params in CONFIGS:
        config = parse_config(name, params)
        compressor = plugin(name).factory()(config)
        for shape in [(7, 5), (64, 1, 3, 3), (300, 41), (3,)]:
            want = compressor.payload_nbytes(torch.Size(shape), torch.float32)
            assert payload_nbytes(config, shape) == want


def test_the_shapes_of_the_collectives_follow_the_code():
    shapes = [(100, 50), (100,), (10, 100), (10,)]
    plain = (100 + 10) * 4
    none = reduce_collectives(shapes, parse_config("none"))
    assert none == [Collective("all_reduce", (5000 + 100 + 1000 + 10) * 4)]
    fp16 = reduce_collectives(shapes, parse_config("fp16"))  # min rate 0: even 1-D tensors stay plain
    assert fp16 == [Collective("all_reduce", plain), Collective("all_reduce", 6000 * 2)]
    psgd = reduce_collectives(shapes, parse_config("powersgd", {"rank": 2}))
    # the plain tensors ride in PowerSGD's P all-reduce: two collectives, not three
    assert psgd == [Collective("all_reduce", plain + 4 * 2 * (100 + 10)),
                    Collective("all_reduce", 4 * 2 * (50 + 100), round=1)]
    topk = reduce_collectives(shapes, parse_config("topk", {"ratio": 0.01}))
    assert topk == [Collective("all_reduce", plain), Collective("all_gather", (50 + 10) * 8)]
    randk = reduce_collectives(shapes, parse_config("randk", {"ratio": 0.01}))  # + the NaN flag element
    assert randk == [Collective("all_reduce", plain + 4), Collective("all_reduce", (50 + 10) * 4)]
    warm = reduce_collectives(shapes, parse_config("topk", {"start_iter": 3}), step=2)
    assert warm == [Collective("all_reduce", 6110 * 4)]


def test_ddp_buckets_match_torchs_rebuilt_buckets():
    # measured with torch 2.13 DDP: mlp 64 -> [1024, 2048, 1024] -> 10 gives buckets of 2108426 and
    # 2165760 elements after the first step (a 1 MiB first bucket, then 25 MiB)
    shapes = [tuple(p.shape) for p in build_model("mlp", 64, 10, hidden=[1024, 2048, 1024]).parameters()]
    sizes = [sum(math.prod(s) for s in b) for b in ddp_buckets(shapes)]
    assert sizes == [2108426, 2165760]
    assert len(ddp_buckets([(10, 10)] * 5)) == 1


def test_all_reduce_cost_matches_hand_computed_values():
    link = Link(bandwidth=1e9 / 8, latency=20e-6)  # 1 Gbit/s, 20 µs
    # n = 4, 1 MB: 6 messages, each rank sends 2·3/4 MB
    assert all_reduce_seconds(1e6, 4, link) == pytest.approx(6 * 20e-6 + 1.5e6 * 8 / 1e9)
    assert all_gather_seconds(1e6, 4, link) == pytest.approx(3 * 20e-6 + 3e6 * 8 / 1e9)
    assert all_reduce_seconds(1e6, 1, link) == 0.0


def test_all_reduce_cost_is_monotone_in_workers_size_and_inverse_bandwidth():
    link = Link(bandwidth=1.25e8, latency=10e-6)
    slow = Link(bandwidth=1.25e7, latency=10e-6)
    times = [all_reduce_seconds(1e6, n, link) for n in (2, 3, 4, 8, 64, 1024)]
    assert times == sorted(times) and len(set(times)) == len(times)
    sizes = [all_reduce_seconds(m, 8, link) for m in (1e3, 1e4, 1e5, 1e6)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert all_reduce_seconds(1e6, 8, slow) > all_reduce_seconds(1e6, 8, link)


def test_a_shared_link_carries_n_times_a_switch_ports_traffic():
    switch = Link(bandwidth=1.25e8, latency=0.0)
    shared = Link(bandwidth=1.25e8, latency=0.0, topology="shared")
    for n in (2, 4, 16):
        assert all_reduce_seconds(1e6, n, shared) / all_reduce_seconds(1e6, n, switch) == pytest.approx(n)
        assert all_gather_seconds(1e5, n, shared) / all_gather_seconds(1e5, n, switch) == pytest.approx(n)


def test_step_prediction_adds_compute_compression_and_rounds():
    config = parse_config("powersgd", {"rank": 2})
    traffic = step_traffic([[(100, 50), (100,)]], config)
    link = Link(bandwidth=1e6, latency=1e-3)
    got = predict_step(traffic, 4, link, compute_s=0.01, compress_s=0.002)
    # round 0: plain and P in flight together (6 messages), round 1: Q (6 messages)
    p, q, plain = 4 * 2 * 100, 4 * 2 * 50, 400
    assert got.latency_s == pytest.approx(12e-3)
    assert got.transfer_s == pytest.approx(1.5 * (p + q + plain) / 1e6)
    assert got.step_s == pytest.approx(0.012 + got.comm_s)
    # a token bucket as deep as the step's bytes lets them through while the link idles
    bucket = predict_step(traffic, 4, Link(1e6, 1e-3, burst=1e6), compute_s=0.01, compress_s=0.002)
    assert bucket.transfer_s == 0.0


@pytest.mark.parametrize("name,params,n", [("none", {}, 2), ("powersgd", {"rank": 2}, 4), ("fp16", {}, 8)])
def test_bandwidth_for_inverts_the_predicted_communication(name, params, n):
    from gradwire.compressors.costmodel import bandwidth_for

    traffic = step_traffic([[(256, 4096), (64, 32, 3, 3), (256,)]], parse_config(name, params))
    link = Link(bandwidth=3e7, latency=2e-4)
    seconds = predict_step(traffic, n, link).comm_s
    # from any bandwidth the probes gave, the same α: the bandwidth that explains the seconds
    assert bandwidth_for(traffic, n, Link(1e15, 2e-4), seconds) == pytest.approx(3e7)
    assert bandwidth_for(traffic, n, link, 2 * seconds) < 3e7  # slower exchanges, a slower link
    # no time left over the α terms: nothing for a bandwidth to explain
    assert bandwidth_for(traffic, n, link, predict_step(traffic, n, link).latency_s) is None
    assert bandwidth_for(step_traffic([[]], parse_config(name, params)), n, link, seconds) is None


def test_compress_time_grows_with_workers_for_gathering_compressors():
    assert CompressTime(0.002, 0.0005).seconds(5) == pytest.approx(0.004)
    rates = {"call_ms": 1.0, "ns_per_element": 10.0, "per_rank_ns_per_element": 2.0}
    cal = Calibration(rates={"sign": rates})
    got = cal.compress_time("unknown model", parse_config("sign"), 1_000_000)
    assert got == CompressTime(0.011, 0.002)


def test_labels_name_the_parameters_that_matter():
    assert config_label(parse_config("powersgd", {"rank": 4})) == "powersgd r=4"
    assert config_label(parse_config("topk")) == "topk 1% ef"
    assert config_label(parse_config("topk", {"k": 5, "feedback": "ef21"})) == "topk k=5 ef21"
    assert config_label(parse_config("qsgd")) == "qsgd s=127"
    assert config_label(parse_config("sign")) == "sign ef"
    assert config_label(parse_config("sign", {"bits": 2, "block": 256})) == "sign 2-bit block=256 ef"


@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [("100Mbit", 12.5e6), ("1Gbit", 1.25e8), ("10gbit", 1.25e9), ("1.5Gbit/s", 1.875e8), ("25Gbps", 3.125e9)],
)
def test_bandwidths_parse(text, bytes_per_s):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text", ["-1Gbit", "0Gbit", "10", "fast", "10GB", "1e999Gbit"])
def test_bad_bandwidths_are_refused_by_name(text):
    with pytest.raises(ValueError, match="bandwidth"):
        parse_bandwidth(text)


def test_latencies_parse_and_bad_ones_are_refused():
    assert parse_latency("20us") == pytest.approx(20e-6)
    assert parse_latency("0.5ms") == pytest.approx(5e-4)
    assert parse_latency("0") == 0.0
    for bad in ("-5us", "5", "soon"):
        with pytest.raises(ValueError, match="latency"):
            parse_latency(bad)


def test_buckets_handed_over_early_hide_their_work_behind_backward():
    config = parse_config("fp16")
    traffic = step_traffic([[(1000, 100)], [(10, 10)]], config)
    link = Link(bandwidth=1e6, latency=0.0)
    serial = predict_step(traffic, 2, link, compute_s=1.0, compress_s=0.1)
    assert serial.exposed_s == pytest.approx(serial.compress_s + serial.comm_s)
    hidden = predict_step(traffic, 2, link, compute_s=1.0, compress_s=0.1, windows=[10.0, 0.0])
    # only the last (small) bucket's share of compression and transfer is left after backward
    sizes = traffic.bucket_bytes
    assert sizes == (400000, 400)  # fp32 gradients; fp16 payloads of 200000 and 200 bytes
    last = 0.1 * 400 / 400400 + hidden.transfer_s * 200 / 200200
    assert hidden.exposed_s == pytest.approx(last)
    partly = predict_step(traffic, 2, link, compute_s=1.0, compress_s=0.1, windows=[0.05, 0.0])
    assert hidden.step_s < partly.step_s < serial.step_s
    assert predict_step(traffic, 1, link, 1.0, 0.1, windows=[10.0, 0.0]).exposed_s == pytest.approx(0.1)
    busy = predict_step(traffic, 2, link, 1.0, 0.1, windows=[10.0, 0.0], spare_cores=False)
    assert busy.exposed_s == pytest.approx(0.1 + hidden.transfer_s * 200 / 200200)  # compression not hidden


def test_the_validation_models_linkruns_single_bucket():
    """linkrun gives every hook one bucket (ready when backward ends); the benchmark's validation must
    predict that run, not DDP's default two buckets of this model (which would double the collectives)."""
    from benchmarks import costmodel as bench
    from benchmarks.linkrun import ONE_BUCKET_MB, DigitsCNN

    assert bench.ONE_BUCKET["bucket_bytes"] == int(ONE_BUCKET_MB * 2**20)
    shapes = [tuple(p.shape) for p in DigitsCNN().parameters()]
    assert len(ddp_buckets(shapes)) == 2 and len(ddp_buckets(shapes, **bench.ONE_BUCKET)) == 1
    run = {"model": "digits_cnn", "method": "powersgd:2", "step_seconds": [0.2], "bytes_per_step": 41536}
    compute = {"model": "digits_cnn", "method": "compute-only", "step_seconds": [0.05]}
    lab = {"n": 4, "rate": "1gbit", "topology": "switch", "burst": 0, "runs": [compute, run],
           "compress": {"digits_cnn powersgd:2": {"base_s": 0.01, "per_rank_s": 0.0}}}  # fmt: skip
    alpha = 1e-3
    fits = {("1gbit", "switch"): {"bandwidth": 1.25e8, "alpha_s": {4: alpha}}}
    (row,) = bench.validate([lab], fits, {"digits_cnn": {"shapes": shapes}})
    one = step_traffic(ddp_buckets(shapes, **bench.ONE_BUCKET), parse_config("powersgd", {"rank": 2}))
    expected = predict_step(one, 4, Link(1.25e8, alpha, "switch", 0), 0.05, 0.01, None, spare_cores=False)
    assert row["step_ms"] == pytest.approx(expected.step_s * 1e3)
    assert row["exposed_ms"] == pytest.approx(10 + expected.comm_s * 1e3)  # nothing hidden
    assert row["model_bytes"] == 41536 and row["measured_ms"] == pytest.approx(200)


def test_costmodel_replay_refuses_a_missing_file(tmp_path, capsys, monkeypatch):
    from benchmarks import costmodel as bench

    monkeypatch.setattr("sys.argv", ["costmodel.py", "--replay", str(tmp_path / "nope.json")])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--replay" in err and "nope.json: no such file" in err


def test_costmodel_replay_refuses_a_file_that_is_not_its_json(tmp_path, capsys, monkeypatch):
    from benchmarks import costmodel as bench

    for text, why in (("{oops", "not JSON"), ('{"runs": []}', "not a --json file of this benchmark")):
        path = tmp_path / "saved.json"
        path.write_text(text)
        monkeypatch.setattr("sys.argv", ["costmodel.py", "--replay", str(path)])
        with pytest.raises(SystemExit) as exit_info:
            bench.main()
        assert exit_info.value.code == 2 and why in capsys.readouterr().err


def test_alpha_of_training_steps_is_fitted_on_other_labs_and_used_by_the_validation():
    """Runs whose extra time is exactly 3 ms per message give α = 3 ms. Each shaped lab is predicted with
    the α of the *other* labs: a lab whose own runs took 10 ms per message is still predicted with 3 ms
    (so it fails), and the labs with 3 ms runs are predicted exactly."""
    from benchmarks import costmodel as bench
    from benchmarks.linkrun import DigitsCNN

    shapes = [tuple(p.shape) for p in DigitsCNN().parameters()]
    works = {"digits_cnn": {"shapes": shapes}}
    compress = {f"digits_cnn {m}": {"base_s": 0.004, "per_rank_s": 0.0} for m in bench.METHODS}
    compute = 0.05
    fits = {(None, "switch"): {"bandwidth": 2e8, "alpha_s": {4: 1e-5}},
            ("100mbit", "switch"): {"bandwidth": 1.2e7, "alpha_s": {4: 1e-5}},
            ("1gbit", "switch"): {"bandwidth": 1.1e8, "alpha_s": {4: 1e-5}}}  # fmt: skip

    def lab(rate, alpha):  # every method's step exactly as the model says with the lab's B and this α
        link = Link(fits[(rate, "switch")]["bandwidth"], alpha, "switch", 0)
        runs = [{"model": "digits_cnn", "method": "compute-only", "step_seconds": [compute]}]
        for method, (name, params) in bench.METHODS.items():
            one = step_traffic(ddp_buckets(shapes, **bench.ONE_BUCKET), parse_config(name, params))
            step = predict_step(one, 4, link, compute, 0.004, None, spare_cores=False).step_s
            times = [step * 1.01, step, step * 0.99]
            runs.append({"model": "digits_cnn", "method": method, "step_seconds": times, "bytes_per_step": 0})
        return {"n": 4, "rate": rate, "topology": "switch", "burst": 0, "runs": runs, "compress": compress}

    unshaped, slow, fast = lab(None, 3e-3), lab("100mbit", 3e-3), lab("1gbit", 10e-3)
    assert bench.fit_step_alpha([unshaped], fits, works) == {4: pytest.approx(3e-3)}
    rows, used = bench.validate_held_out([unshaped, slow, fast], fits, works)
    assert used[("100mbit", "switch", 4)] == pytest.approx(6.5e-3)  # median of 3 ms and 10 ms runs
    assert used[("1gbit", "switch", 4)] == pytest.approx(3e-3)  # its own 10 ms runs left out
    by_lab = {(r["rate"], r["method"]): r["error"] for r in rows}
    assert len(rows) == 2 * len(bench.METHODS)
    assert all(by_lab[("1gbit", m)] < -0.01 for m in bench.METHODS)  # predicted with 3 ms, took 10 ms
    rows, used = bench.validate_held_out([unshaped, slow], fits, works)
    assert all(abs(r["error"]) < 1e-9 for r in rows)
    assert used == {("100mbit", "switch", 4): pytest.approx(3e-3)}
    with_probe_alpha = bench.validate([slow], fits, works)  # α of the probes: 300× smaller
    assert all(r["error"] < 0 for r in with_probe_alpha)
