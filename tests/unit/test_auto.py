"""compression: auto — the link fit, the quality guard, error feedback across a switch, the config, and
the choice on real gloo ranks (every rank decides the same)."""

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from gradwire.compressors import current_choice, gather_state_dicts, load_own_state, make_hook, make_reducer
from gradwire.compressors.auto import (
    GUARD_RANKS,
    PRIOR_RATES,
    AutoChoiceError,
    AutoReducer,
    GuardFigures,
    rank_energies,
)
from gradwire.compressors.costmodel import UNRESOLVED_BANDWIDTH, Link, collective_terms, fit_link
from gradwire.compressors.registry import parse_config
from gradwire.spec import JobSpec, SpecError
from tests.ranks import run_ranks

ROOT = Path(__file__).resolve().parents[2]


def timed(kind: str, nbytes: int, n: int, link: Link) -> float:
    steps, volume = collective_terms(kind, nbytes, n, link.topology)
    return steps * link.latency + volume / link.bandwidth


# --- the link fit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("bandwidth,latency", [(12.5e6, 200e-6), (125e6, 50e-6), (1.25e9, 20e-6)])
def test_fit_link_recovers_alpha_and_bandwidth_of_a_known_link(n, bandwidth, latency):
    true = Link(bandwidth, latency)
    samples = [(kind, size, timed(kind, size, n, true)) for kind in ("all_reduce", "all_gather")
               for size in (4096, 1 << 20)]  # fmt: skip
    got = fit_link(samples, n)
    assert got.bandwidth == pytest.approx(bandwidth, rel=1e-9)
    assert got.latency == pytest.approx(latency, rel=1e-9)


def test_fit_link_is_least_squares_under_noise_and_pins_unresolvable_terms():
    true, n = Link(12.5e6, 150e-6), 2
    noisy = [("all_reduce", s, timed("all_reduce", s, n, true) * f)
             for s, f in ((4096, 1.03), (4096, 0.97), (2 << 20, 1.02), (2 << 20, 0.98))]  # fmt: skip
    got = fit_link(noisy, n)
    assert got.bandwidth == pytest.approx(12.5e6, rel=0.05) and got.latency == pytest.approx(150e-6, rel=0.1)
    # the larger probe no slower than the small one: bandwidth not resolved, latency alone explains it
    flat = fit_link([("all_reduce", 4096, 1e-3), ("all_reduce", 1 << 20, 0.9e-3)], n)
    assert flat.bandwidth == UNRESOLVED_BANDWIDTH and flat.latency > 0
    # both probes' time in proportion to their bytes: no latency to see
    prop = fit_link([("all_reduce", 4096, 4096 / 1e8), ("all_reduce", 1 << 20, (1 << 20) / 1e8)], n)
    assert prop.latency == pytest.approx(0.0, abs=1e-12) and prop.bandwidth == pytest.approx(1e8, rel=1e-6)


def test_fit_link_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="at least 2 ranks"):
        fit_link([("all_reduce", 4096, 1e-3), ("all_reduce", 8192, 2e-3)], 1)
    with pytest.raises(ValueError, match="two sizes"):
        fit_link([("all_reduce", 4096, 1e-3), ("all_reduce", 4096, 2e-3)], 2)
    with pytest.raises(ValueError, match="not a duration"):
        fit_link([("all_reduce", 4096, math.nan), ("all_reduce", 8192, 2e-3)], 2)


# --- the quality guard ------------------------------------------------------------------------------


def spectrum_matrix(singular_values, a=64, b=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(a, a, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=torch.float64))
    s = torch.zeros(a, b, dtype=torch.float64)
    for i, value in enumerate(singular_values):
        s[i, i] = value
    return u @ s @ v.T


def test_rank_energies_match_the_best_rank_r_approximation():
    m = spectrum_matrix([10.0, 5.0, 3.0, 1.0, 0.5, 0.1] + [0.01] * 20)
    exact = torch.linalg.svdvals(m).square()
    got = rank_energies(m, GUARD_RANKS, torch.Generator().manual_seed(1))
    for r, e in zip(GUARD_RANKS, got):
        assert e == pytest.approx(float(exact[:r].sum()), rel=1e-6)
        assert e <= float(exact[:r].sum()) * (1 + 1e-9)  # a projection never keeps more than Eckart–Young


def test_the_guard_raises_the_minimum_rank_when_the_energy_fraction_drops():
    config = parse_config(
        "auto",
        {"min_energy": 0.8, "candidates": ["powersgd-r1", "powersgd-r2", "powersgd-r4", "powersgd-r8"],
         "optimizer": "sgd"},
    )
    reducer = AutoReducer(config)

    def smallest_eligible(singular_values):
        figures = GuardFigures()
        figures.add([spectrum_matrix(singular_values).float()], 0.01, torch.Generator().manual_seed(0))
        fractions = figures.fractions()
        measured = {"rank_energy": dict(zip(GUARD_RANKS, fractions)), "topk_energy": fractions[-1],
                    "max_abs": 1.0}  # fmt: skip
        ok = [label for label in config.candidates if reducer.guard_holds(label, measured, 2)]
        return ok[0] if ok else None

    assert smallest_eligible([10.0, 1.0, 1.0, 1.0]) == "powersgd-r1"  # 97 % in the top direction
    assert smallest_eligible([4.0, 4.0, 1.0, 1.0, 1.0]) == "powersgd-r2"  # 94 % in two
    assert smallest_eligible([3.0] * 4 + [1.0] * 8) == "powersgd-r4"  # 82 % in four
    assert smallest_eligible([1.0] * 40) is None  # flat: no rank up to 8 keeps 80 %


def test_under_adam_the_guard_leaves_out_top_k_and_powersgd_below_rank_8():
    labels = ["none", "powersgd-r1", "powersgd-r2", "powersgd-r4", "powersgd-r8", "topk-ef21"]
    figures = GuardFigures()
    figures.add([spectrum_matrix([10.0, 1.0, 1.0, 1.0]).float()], 0.5, torch.Generator().manual_seed(0))
    fractions = figures.fractions()
    measured = {"rank_energy": dict(zip(GUARD_RANKS, fractions)), "topk_energy": 1.0, "max_abs": 1.0}

    def eligible(**params):
        reducer = AutoReducer(parse_config("auto", {"candidates": labels, **params}))
        return [label for label in labels if reducer.guard_holds(label, measured, 2)]

    assert fractions[0] > 0.95  # one direction holds the energy: SGD may run rank 1 and Top-k
    assert eligible(optimizer="sgd") == labels
    assert eligible(optimizer="adam") == ["none", "powersgd-r8"]
    with pytest.warns(UserWarning, match="not told the optimizer, so it follows Adam's rules"):
        assert eligible() == ["none", "powersgd-r8"]  # not told: Adam's rules, safe under either
    assert eligible(optimizer="adamw", adaptive_min_rank=4) == ["none", "powersgd-r4", "powersgd-r8"]
    with pytest.raises(ValidationError, match="none of them may run under adam"):
        parse_config("auto", {"optimizer": "adam", "candidates": ["powersgd-r1", "topk-ef21"]})
    with pytest.raises(ValidationError, match="adaptive_min_rank"):
        parse_config("auto", {"adaptive_min_rank": 3})


def test_the_compression_priors_are_the_calibration_s_rates():
    """auto prices a candidate that has not run from PRIOR_RATES, copied from the calibration that
    benchmarks/costmodel.py writes (the compressors may not read the CLI's files): a refit there must be
    copied here, or auto chooses with another machine's costs."""
    rates = json.loads((ROOT / "gradwire" / "cli" / "calibration.json").read_text())["rates"]
    for name, (call_ms, ns_per_element) in PRIOR_RATES.items():
        fitted = rates[name]
        assert call_ms == pytest.approx(fitted["call_ms"], rel=0.01, abs=5e-4), name
        assert ns_per_element == pytest.approx(fitted["ns_per_element"], rel=0.01), name


@pytest.mark.parametrize(
    "predicted,chosen",
    [({"none": 0.100, "bf16": 0.095, "powersgd-r8": 0.093}, "none"),  # 7 % faster: not worth it
     ({"none": 0.100, "bf16": 0.095, "powersgd-r8": 0.080}, "powersgd-r8")],
)  # fmt: skip
def test_the_first_choice_leaves_plain_all_reduce_only_for_a_margin(monkeypatch, predicted, chosen):
    import gradwire.compressors.auto as auto

    config = {"candidates": ["none", "bf16", "powersgd-r8"], "min_energy": 0.0, "switch_margin": 0.1}
    reducer = AutoReducer(parse_config("auto", config))
    measured = {"probes": [], "link_from": "probes", "compute_s": 0.05, "compress_s": 0.0,
                "communicate_s": 0.0, "max_abs": 1.0, "shapes": [[(64, 32)]], "communicate_steps": 0,
                "rank_energy": dict.fromkeys(GUARD_RANKS, 1.0), "topk_energy": 1.0}  # fmt: skip
    monkeypatch.setattr(auto, "fit_link", lambda probes, n: Link(1e8, 1e-4))
    monkeypatch.setattr(reducer, "measure", lambda: measured)
    monkeypatch.setattr(reducer, "predict", lambda *args, **kwargs: dict(predicted))
    assert reducer.decide() == chosen
    assert reducer.history == [(reducer.step, chosen, "first choice")]


def deciding(monkeypatch, config, measured: dict) -> AutoReducer:
    """An auto reducer of 2 ranks (none bound) whose next decision sees ``measured``."""
    reducer = AutoReducer(config)
    monkeypatch.setattr(type(reducer.comm), "world_size", property(lambda self: 2))
    monkeypatch.setattr(reducer, "measure", lambda: measured)
    return reducer


@pytest.mark.parametrize(
    "params,chosen",
    [({"optimizer": "sgd"}, "powersgd-r8"),  # by step time alone
     ({"optimizer": "adam"}, "bf16"),  # PowerSGD priced at 1.1 × 0.190 = 0.209 s
     ({"optimizer": "adamw", "adaptive_steps_penalty": 0.0}, "powersgd-r8")],
)  # fmt: skip
def test_under_adam_powersgd_pays_for_the_extra_steps_it_needs(monkeypatch, params, chosen):
    config = {"candidates": ["none", "bf16", "powersgd-r8"], "min_energy": 0.0, **params}
    reducer = deciding(monkeypatch, parse_config("auto", config), measured_step(0.0))
    monkeypatch.setattr(
        reducer, "predict", lambda *args, **kwargs: {"none": 0.300, "bf16": 0.200, "powersgd-r8": 0.190}
    )
    assert reducer.decide() == chosen
    factor = 1.0 + reducer.config.adaptive_steps_penalty if params["optimizer"] != "sgd" else 1.0
    assert reducer.last_decision["priced_s"] == pytest.approx(
        {"none": 0.300, "bf16": 0.200, "powersgd-r8": 0.190 * factor}
    )
    assert reducer.last_decision["predicted_s"]["powersgd-r8"] == 0.190  # the prediction itself is kept


#: digits_cnn's gradients (1.1 M elements, 4.3 MB in fp32)
CNN_SHAPES = [[(256, 4096), (256,), (64, 32, 3, 3), (64,), (32, 1, 3, 3), (32,), (10, 256), (10,)]]


def measured_step(communicate_s: float, large_s: float = 4e-4) -> dict:
    """A decision's measurements: probes of 4 KiB and of 4 MiB (by default the same time: the fit resolves
    no bandwidth, as on the unshaped lab link), and the running choice's exchanges at ``communicate_s``
    a step (measured in one step unless that is 0)."""
    return {"probes": [("all_reduce", 4096, 4e-4), ("all_reduce", 4 << 20, large_s)], "link_from": "probes",
            "compute_s": 0.010,
            "compress_s": 0.0, "communicate_s": communicate_s, "max_abs": 1.0, "shapes": CNN_SHAPES,
            "rank_energy": dict.fromkeys(GUARD_RANKS, 1.0), "topk_energy": 1.0,
            "communicate_steps": 1 if communicate_s else 0}  # fmt: skip


def test_a_plain_all_reduce_the_probes_cannot_resolve_is_priced_by_what_the_step_measured():
    reducer = AutoReducer(parse_config("auto", {"candidates": ["none", "powersgd-r8"], "optimizer": "sgd"}))
    m = measured_step(0.014)
    probed = fit_link(m["probes"], 2)
    assert probed.bandwidth == UNRESOLVED_BANDWIDTH  # the probes alone: 4.3 MB would cross for free
    blind = reducer.predict(m["shapes"], 2, probed, m["compute_s"])
    assert blind["none"] < blind["powersgd-r8"]

    link, source = reducer.link_of_step(probed, m, 2)
    assert source == "step" and link.latency == probed.latency and link.bandwidth < 1e9
    priced = reducer.predict(m["shapes"], 2, link, m["compute_s"])
    call_ms, ns = PRIOR_RATES["none"]
    elements = sum(math.prod(s) for s in CNN_SHAPES[0])
    # plain all-reduce now costs what its exchanges measured in the step ...
    assert priced["none"] == pytest.approx(0.010 + (call_ms * 1e6 + ns * elements) / 1e9 + 0.014)
    # ... and PowerSGD's 160 kB on the same link are worth the switch
    assert priced["powersgd-r8"] < 0.9 * priced["none"]


def test_the_step_overrides_the_probes_only_when_it_moves_enough_bytes_and_saw_a_slower_link():
    reducer = AutoReducer(parse_config("auto", {"candidates": ["none", "powersgd-r8"], "optimizer": "sgd"}))
    probed = fit_link(measured_step(0.0)["probes"], 2)
    # PowerSGD's 160 kB a step resolve a bandwidth worse than the 4 MiB probe: its 14 ms say nothing
    reducer.switch_to("powersgd-r8")
    assert reducer.link_of_step(probed, measured_step(0.014), 2) == (probed, "probes")
    # a plain all-reduce faster in the step than the probes' link: the probes stand (the lower price wins)
    reducer.switch_to("none")
    slow = Link(1.25e8, 4e-4)  # 4.3 MB take 34 ms at 1 Gbit/s
    assert reducer.link_of_step(slow, measured_step(0.014), 2) == (slow, "probes")
    assert reducer.link_of_step(slow, measured_step(0.050), 2)[1] == "step"
    assert reducer.link_of_step(probed, measured_step(0.0), 2) == (probed, "probes")  # nothing measured


def test_the_first_choice_leaves_a_plain_all_reduce_that_the_step_shows_is_slow(monkeypatch):
    config = parse_config("auto", {"candidates": ["none", "powersgd-r8"], "optimizer": "sgd"})
    chosen = {}
    for communicate_s in (0.0, 0.014):
        reducer = deciding(monkeypatch, config, measured_step(communicate_s))
        chosen[communicate_s] = reducer.decide()
        assert reducer.last_decision["bandwidth_from"] == ("step" if communicate_s else "probes")
        assert reducer.last_decision["communicate_s"] == communicate_s
    assert chosen == {0.0: "none", 0.014: "powersgd-r8"}


def test_the_running_choice_is_priced_by_what_it_measured_overlap_included(monkeypatch):
    # probes of a slow link (4 MiB in 0.35 s): the model counts all of a 4.3 MB all-reduce against plain,
    # but its buckets went off as futures and backward waited only 2 ms for them after the last one
    config = parse_config("auto", {"candidates": ["none", "powersgd-r8"], "optimizer": "sgd"})
    chosen = {}
    for communicate_s in (0.0, 0.002):
        reducer = deciding(monkeypatch, config, measured_step(communicate_s, large_s=0.35))
        chosen[communicate_s] = reducer.decide()
        if communicate_s:
            assert reducer.last_decision["predicted_s"]["none"] == pytest.approx(0.010 + 0.002)
        else:  # nothing measured yet: the model's price
            assert reducer.last_decision["predicted_s"]["none"] > 0.3
    assert chosen == {0.0: "powersgd-r8", 0.002: "none"}


def test_a_job_tells_auto_its_optimizer_and_refuses_another():
    base = yaml.safe_load((ROOT / "examples" / "specs" / "tiny-lm-powersgd.yaml").read_text())
    spec = JobSpec.from_dict({**base, "compression": {"name": "auto"}})
    assert spec.run_compression().params() == {"optimizer": "adam"}
    assert spec.compressor_config().optimizer == "adam"
    written = JobSpec.from_dict({**base, "compression": {"name": "auto", "optimizer": "adam"}})
    assert written.compressor_config().optimizer == "adam"
    with pytest.raises(SpecError, match=r"compression\.optimizer[\s\S]*told 'sgd' but the job's optimizer"):
        JobSpec.from_dict({**base, "compression": {"name": "auto", "optimizer": "sgd"}})
    sgd = JobSpec.from_dict(yaml.safe_load((ROOT / "examples" / "specs" / "digits-auto.yaml").read_text()))
    assert sgd.compressor_config().optimizer == "sgd"
    plain = JobSpec.from_dict(base)  # not auto: the section runs as written
    assert plain.run_compression().params() == {"rank": 4, "feedback": "ef"}


def _ddp_step_of(rank, world, spec_dict):
    from torch.nn.parallel import DistributedDataParallel

    from gradwire.worker.steps import DdpStep

    spec = JobSpec.from_dict(spec_dict)
    step = DdpStep(torch.nn.Linear(8, 2), spec.run_compression(), DistributedDataParallel)
    return step.hook_state.reducer.config.optimizer


def test_the_train_step_of_an_adam_job_runs_auto_under_adam():
    base = yaml.safe_load((ROOT / "examples" / "specs" / "tiny-lm-powersgd.yaml").read_text())
    found = run_ranks(_ddp_step_of, 2, {**base, "compression": {"name": "auto"}}, timeout=120)
    assert found == ["adam", "adam"]


# --- error feedback across a switch -------------------------------------------------------------------


def ef_sum_check(path):
    """Σ sent + residual == Σ gradients through the switches of ``path`` (one process)."""
    reducer = make_reducer("auto")
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 24), (24,), (16, 8, 3)]
    total = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    sent = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for label in path:
        reducer.switch_to(label)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            outs = reducer.reduce(grads)
            for i in range(len(shapes)):
                total[i] += grads[i].double()
                sent[i] += outs[i].double()
    residual = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for key, buffers in reducer.inner.feedback.state.items():
        if "e" in buffers and reducer.inner.feedback.name == "ef":
            residual[key] += buffers["e"].double()
    for key, carried in reducer.carry.items():
        residual[key] += carried.double()
    return total, sent, residual


@pytest.mark.parametrize("path", [["powersgd-r1", "powersgd-r4"], ["powersgd-r2", "none"],
                                  ["powersgd-r1", "fp16", "powersgd-r8"]])  # fmt: skip
def test_a_switch_carries_the_ef_residual_so_nothing_is_lost(path):
    total, sent, residual = ef_sum_check(path)
    for t, s, e in zip(total, sent, residual):
        torch.testing.assert_close(s + e, t, atol=1e-2 if "fp16" in path else 1e-4, rtol=0)
    if path[-1] == "none":  # the residual went out with the first plain step after the switch
        assert all(float(e.abs().max()) == 0 for e in residual)


def test_dropping_the_residual_would_break_the_invariant():
    """The check above has teeth: without the carry, Σ sent + residual misses the old residual."""
    reducer = make_reducer("auto")
    gen = torch.Generator().manual_seed(0)
    reducer.switch_to("powersgd-r1")
    g = [torch.randn(32, 24, generator=gen)]
    out = reducer.reduce(g)[0]
    lost = g[0] - out  # the residual
    assert float(lost.abs().max()) > 0.1
    reducer.switch_to("none")
    assert 0 in reducer.carry
    torch.testing.assert_close(reducer.carry[0], lost)
    g2 = [torch.randn(32, 24, generator=gen)]
    torch.testing.assert_close(reducer.reduce(g2)[0], g2[0] + lost)  # sent with the next step


def _compress_per_step_after_a_switch(rank, world):
    """Plain all-reduce for steps 0-4, PowerSGD asked for from step 5; decisions at steps 2 and 12."""
    import torch.distributed as dist

    reducer = make_reducer("auto", candidates=["none", "powersgd-r2"], probe_after=2, remeasure_every=10,
                           min_energy=0.0, optimizer="sgd", probe_bytes=64 << 10)  # fmt: skip
    gen = torch.Generator().manual_seed(rank)
    for step in range(13):
        if step == 5:
            reducer.switch_to("powersgd-r2")
        if step == 12:
            before = reducer.inner.compress_seconds  # PowerSGD's, over its steps 5-11
        reducer.reduce([torch.randn(64, 32, generator=gen)])
    dist.barrier()
    return {"before": before, "measured": reducer.measured_compress["powersgd-r2"]}


def test_a_switch_starts_the_new_choice_s_compression_time_afresh():
    a, b = run_ranks(_compress_per_step_after_a_switch, 2, timeout=120)
    assert a["measured"] == b["measured"]  # agreed: the slower rank's
    # seven steps of PowerSGD, not the ten steps since the last decision
    assert a["measured"] == pytest.approx(max(a["before"], b["before"]) / 7, rel=1e-9)


def test_switching_inside_a_step_is_refused():
    reducer = make_reducer("auto")
    reducer.reduce([torch.randn(8, 8)], keys=[0], advance=False)
    with pytest.raises(AutoChoiceError, match="not inside one"):
        reducer.switch_to("fp16")
    with pytest.raises(AutoChoiceError, match="unknown auto candidate"):
        make_reducer("auto").switch_to("powersgd-r3")


def test_state_dict_round_trip_restores_the_choice_and_the_running_reducer():
    a = make_reducer("auto")
    a.switch_to("powersgd-r2")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        a.reduce([torch.randn(16, 12, generator=gen)])
    b = make_reducer("auto")
    load_own_state(b, gather_state_dicts(a))
    assert current_choice(b) == "auto:powersgd-r2" and b.step == 3
    g = [torch.randn(16, 12, generator=gen)]
    torch.testing.assert_close(a.reduce([g[0].clone()])[0], b.reduce([g[0].clone()])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="compressor 'powersgd'"):
        b.load_state_dict(make_reducer("powersgd").state_dict())


# --- the config and the spec ------------------------------------------------------------------------


def test_auto_config_bounds_every_field_and_names_it():
    for params, field in [
        ({"candidates": []}, "candidates"), ({"candidates": ["powersgd-r3"]}, "candidates"),
        ({"remeasure_every": 1}, "remeasure_every"), ({"probe_after": 1}, "probe_after"),
        ({"probe_reps": 100}, "probe_reps"), ({"probe_bytes": 1}, "probe_bytes"),
        ({"min_energy": 1.5}, "min_energy"), ({"switch_margin": 1.0}, "switch_margin"),
        ({"topk_ratio": 0.0}, "topk_ratio"), ({"rank": 4}, "rank"),
        ({"adaptive_steps_penalty": -0.1}, "adaptive_steps_penalty"),
    ]:  # fmt: skip
        with pytest.raises(ValidationError) as info:
            parse_config("auto", params)
        assert field in str(info.value), params
    with pytest.raises(ValidationError, match="twice"):
        parse_config("auto", {"candidates": ["none", "none"]})
    with pytest.raises(ValidationError, match="picks each candidate's own feedback"):
        parse_config("auto", {"feedback": "ef"})
    with pytest.raises(ValidationError, match="min_compression_rate is not a parameter of auto"):
        parse_config("auto", {"min_compression_rate": 2.0})


def test_the_spec_takes_compression_auto_and_names_bad_fields():
    base = yaml.safe_load((ROOT / "examples" / "specs" / "digits-baseline.yaml").read_text())
    spec = JobSpec.from_dict({**base, "compression": {"name": "auto", "candidates": ["none", "fp16"]}})
    assert spec.compressor_config().candidates == ["none", "fp16"]
    with pytest.raises(SpecError, match=r"compression\.remeasure_every"):
        JobSpec.from_dict({**base, "compression": {"name": "auto", "remeasure_every": 0}})


# --- on real gloo ranks -------------------------------------------------------------------------------


def _ddp_auto(rank, world, switches, slow_rank):
    """DDP with make_hook('auto'): decisions at steps 2 and 12 (rank ``slow_rank`` computes slower, so the
    ranks' own timings differ), then forced switches at the steps in ``switches``."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    ddp = DistributedDataParallel(model)
    state, hook = make_hook("auto", probe_after=2, remeasure_every=10, probe_bytes=64 << 10)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    w_true = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))
    losses, choices, decisions = [], [], []
    for step in range(30):
        if step in switches:
            state.reducer.switch_to(switches[step])
        x = torch.randn(64, 32, generator=gen)
        y = (x @ w_true).argmax(1)
        if rank == slow_rank:
            time.sleep(0.01)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        choices.append(current_choice(state))
        decision = state.reducer.last_decision
        if decision and decision["step"] not in [d["step"] for d in decisions]:
            decisions.append(dict(decision))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dist.barrier()
    return {"params": params, "losses": losses, "choices": choices, "decisions": decisions,
            "history": state.reducer.history}  # fmt: skip


def test_every_rank_decides_the_same_and_switching_mid_training_keeps_ddp_consistent():
    switches = {15: "powersgd-r1", 19: "topk-ef21", 23: "powersgd-r4", 27: "none"}
    results = run_ranks(_ddp_auto, 2, switches, 1, timeout=180)
    a, b = results
    assert a["decisions"] and len(a["decisions"]) >= 2  # at steps 2 and 12
    assert a["decisions"] == b["decisions"]  # the same inputs, predictions and choice on every rank
    assert a["history"] == b["history"] and a["choices"] == b["choices"]
    forced = [(step, label) for step, label, reason in a["history"] if reason == "asked"]
    assert forced == list(switches.items())
    # Top-1 % keeps far less than 90 % of the energy: the guard check at the next multiple of 10 replaces it
    assert (20, "topk-ef21 failed the quality guard") in [(step, why) for step, _, why in a["history"]]
    assert all(d["choice"] in d["predicted_s"] and d["eligible"][d["choice"]] for d in a["decisions"])
    assert torch.equal(a["params"], b["params"])  # bitwise the same model on both ranks after the switches
    first, last = sum(a["losses"][:5]) / 5, sum(a["losses"][-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_gradwire_plan_of_an_auto_spec_compares_auto_s_candidates():
    import json

    from typer.testing import CliRunner

    from gradwire.cli import app

    spec = ROOT / "examples" / "specs" / "digits-auto.yaml"
    args = ["plan", str(spec), "--bandwidth", "100Mbit", "--compute-ms", "5", "--json"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    found = json.loads(done.output)
    assert [r["compressor"] for r in found["rows"]][:8] == [
        "none", "fp16", "bf16", "powersgd r=1", "powersgd r=2", "powersgd r=4", "powersgd r=8", "topk 1% ef21"
    ]  # fmt: skip
    assert any("compression: auto measures the link" in note for note in found["notes"])


@pytest.mark.parametrize("optimizer,marked", [({"name": "sgd", "lr": 0.1}, "powersgd r=8"),
                                              ({"name": "adam", "lr": 0.003}, "fp16 or bf16")])
def test_gradwire_plan_marks_what_auto_would_run_priced_as_auto_prices(tmp_path, optimizer, marked):
    import json

    from typer.testing import CliRunner

    from gradwire.cli import app

    spec = yaml.safe_load((ROOT / "examples" / "specs" / "digits-auto.yaml").read_text())
    path = tmp_path / "auto.yaml"
    candidates = ["none", "fp16", "bf16", "powersgd-r8"]
    path.write_text(yaml.safe_dump({**spec, "optimizer": optimizer,
                                    "compression": {"name": "auto", "candidates": candidates}}))  # fmt: skip
    args = ["plan", str(path), "--bandwidth", "10Mbit", "--compute-ms", "50", "--json"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    rows = {r["compressor"]: r for r in json.loads(done.output)["rows"][:4]}
    # on this link PowerSGD's step is the shortest, by less than the 10 % it pays under Adam
    step = {name: row["step_ms"] for name, row in rows.items()}
    assert step["powersgd r=8"] < min(step["fp16"], step["bf16"]) < 1.1 * step["powersgd r=8"]
    spec_rows = [name for name, row in rows.items() if row.get("spec")]
    assert len(spec_rows) == 1 and spec_rows[0] in marked.split(" or "), spec_rows


def _ddp_auto_plain_as_futures(rank, world):
    """The same model and batches through make_hook("none") and make_hook("auto") (which keeps plain
    all-reduce: its only candidate), several buckets each; how auto's buckets were reduced is counted."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from gradwire.compressors.reducer import Reducer

    calls = {"async": 0, "in_call": 0, "none": 0, "waited_steps": set(), "open_steps": set(),
             "buckets_of_step_11": 0}
    flat_async, in_call = Reducer.reduce_flat_async, Reducer.reduce

    def counted_async(self, *args, **kwargs):
        calls["async"] += self.comm is auto_state.reducer.comm
        calls["none"] += self is states[0].reducer  # make_hook("none"): one call per bucket
        return flat_async(self, *args, **kwargs)

    def counted_in_call(self, *args, **kwargs):
        calls["in_call"] += self.comm is auto_state.reducer.comm and type(self) is Reducer
        return in_call(self, *args, **kwargs)

    bucket = AutoReducer.reduce_bucket

    def seen_bucket(self, *args, **kwargs):  # which steps returned their buckets' all-reduce still open
        step, future = self.step, bucket(self, *args, **kwargs)
        calls["waited_steps" if future.done() else "open_steps"].add(step)
        calls["buckets_of_step_11"] += step == 11
        return future

    Reducer.reduce_flat_async, Reducer.reduce = counted_async, counted_in_call
    AutoReducer.reduce_bucket = seen_bucket
    models, states = [], []
    for name, params in (("none", {}), ("auto", {"candidates": ["none"], "probe_after": 2,
                                                 "remeasure_every": 10, "probe_bytes": 64 << 10})):
        torch.manual_seed(0)
        # DDP's first bucket takes up to 1 MiB whatever the cap: a 2 MiB layer makes a second one
        model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512),
                                    torch.nn.ReLU(), torch.nn.Linear(512, 4))  # fmt: skip
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)
        state, hook = make_hook(name, **params)
        ddp.register_comm_hook(state, hook)
        models.append((model, ddp, torch.optim.SGD(ddp.parameters(), lr=0.05)))
        states.append(state)
    auto_state = states[1]
    gen = torch.Generator().manual_seed(rank)
    for _ in range(14):
        x = torch.randn(8, 16, generator=gen)
        for _, ddp, opt in models:
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
    dist.barrier()
    params = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m, _, _ in models]
    decision = auto_state.reducer.last_decision
    keys = ("step", "compute_s", "communicate_s", "choice", "link_from", "link_samples", "probed_bandwidth")
    return {"params": params, "calls": calls, "decision": {k: decision[k] for k in keys},
            "model_bytes": sum(p.numel() * 4 for p in models[1][0].parameters()),
            "buckets": calls["buckets_of_step_11"],
            "probe_bytes": auto_state.stats()["probe_bytes"]}  # fmt: skip


@pytest.fixture(scope="module")
def plain_as_futures():
    return run_ranks(_ddp_auto_plain_as_futures, 2, timeout=180)


def test_auto_running_plain_all_reduce_hands_ddp_the_all_reduce_s_future(plain_as_futures):
    a, b = plain_as_futures
    for found in (a, b):
        assert torch.equal(found["params"][0], found["params"][1])  # bit for bit what make_hook("none") does
        # every bucket of every step went off as DDP's own all-reduce; none was copied and reduced in the call
        assert found["calls"]["in_call"] == 0, found["calls"]
        assert found["calls"]["none"] > 14, found["calls"]  # more than one bucket a step
        assert found["calls"]["async"] == found["calls"]["none"], found["calls"]
        # and returned to DDP open, so that backward went on, except in the steps before the decisions (at
        # steps 2 and 12): there each was waited for and timed, a probe of the link at the gradient's size
        assert {1, 11} <= found["calls"]["waited_steps"] and not {1, 11} & found["calls"]["open_steps"]
        assert len(found["calls"]["open_steps"]) > 5, found["calls"]
    assert a["decision"] == b["decision"]  # the same agreed numbers on both ranks
    assert a["decision"]["step"] == 12 and a["decision"]["choice"] == "none"
    assert a["decision"]["compute_s"] > 0 and a["decision"]["communicate_s"] >= 0


def test_the_step_before_a_decision_times_its_buckets_in_place_of_the_large_probe(plain_as_futures):
    a, _ = plain_as_futures
    decision, buckets = a["decision"], a["buckets"]
    # the model's 2.2 MB of buckets outweigh probe_bytes (64 KiB): the link is fitted to the 4 KiB probe
    # and to each bucket of step 11, with its bytes as DDP handed them over
    assert decision["link_from"] == "exchanges"
    small, *exchanges = decision["link_samples"]
    assert small[:2] == ["all_reduce", 4096] and len(exchanges) == buckets > 1
    assert sum(nbytes for _, nbytes, _ in exchanges) == a["model_bytes"]
    assert fit_link([tuple(s) for s in decision["link_samples"]], 2).bandwidth == decision["probed_bandwidth"]
    # so the sizing and large probes never ran: two decisions of 4 all-reduces of 4 KiB each
    assert a["probe_bytes"] == 2 * 4 * 4096


def test_buckets_resolve_the_link_when_they_move_probe_bytes_or_take_the_large_probe_s_time():
    reducer = AutoReducer(parse_config("auto", {"optimizer": "sgd", "probe_bytes": 4 << 20}))
    small_s = 1e-3
    assert reducer.exchanges_resolve([("all_reduce", 4 << 20, 2e-3)], small_s)  # probe_bytes moved
    # 1 MiB in 30 ms: 29 ms beyond α, longer than the large probe's 25 ms
    assert reducer.exchanges_resolve([("all_reduce", 1 << 20, 0.030)], small_s)
    # ten buckets of 100 kB in 3.4 ms each: 34 ms, of which 10 ms is their ten small probes' time
    assert not reducer.exchanges_resolve([("all_reduce", 100_000, 3.4e-3)] * 10, small_s)
    assert not reducer.exchanges_resolve([], small_s)  # none timed: a decision while compressing


def _ddp_auto_overlap(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    # DDP's first bucket takes up to 1 MiB whatever the cap: the 2 MiB layer makes a second one
    model = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512),
                                torch.nn.ReLU(), torch.nn.Linear(512, 4))  # fmt: skip
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)  # buckets reduced on the hook's thread
    state, hook = make_hook("auto", overlap=True, probe_after=2, remeasure_every=10, guard_every=3,
                            probe_bytes=64 << 10)  # fmt: skip
    buckets = []

    def counted(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buckets[-1] += 1
        return hook(state, bucket)

    ddp.register_comm_hook(state, counted)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gen = torch.Generator().manual_seed(rank)
    for step in range(16):
        if step == 6:
            state.reducer.switch_to("powersgd-r2")
        x = torch.randn(8, 16, generator=gen)
        opt.zero_grad()
        buckets.append(0)
        ddp(x).square().mean().backward()
        opt.step()
    assert not torch.equal(before, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    dist.barrier()
    return {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
            "history": state.reducer.history, "overlap": state.overlap, "buckets": buckets}  # fmt: skip


def test_auto_under_the_overlapping_hook_with_several_buckets():
    a, b = run_ranks(_ddp_auto_overlap, 2, timeout=120)
    assert min(a["buckets"][1:]) >= 2, a["buckets"]  # several buckets a step once DDP rebuilt them
    assert a["overlap"] and a["history"] == b["history"] and len(a["history"]) >= 2
    assert torch.equal(a["params"], b["params"])


def test_auto_is_told_the_optimizer_by_the_torch_optimizer_itself():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    from gradwire.compressors.auto import optimizer_kind

    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd, adam, adamw = torch.optim.SGD(params, lr=0.1), torch.optim.Adam(params), torch.optim.AdamW(params)

    class Wrapped(torch.optim.Optimizer):  # as Accelerate's AcceleratedOptimizer: an Optimizer holding one
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert [optimizer_kind(o) for o in (sgd, adam, adamw)] == ["sgd", "adam", "adamw"]
    assert optimizer_kind(torch.optim.RMSprop(params)) == "adam"  # per-coordinate scaling: Adam's rules
    assert optimizer_kind(Wrapped(sgd)) == "sgd" and optimizer_kind(LightningOptimizer(adamw)) == "adamw"
    state, _ = make_hook("auto", optimizer=Wrapped(adam))
    assert state.reducer.config.optimizer == "adam"
    with pytest.raises(TypeError, match=r"optimizer: expected 'sgd', 'adam', 'adamw' or a torch\.optim"):
        make_hook("auto", optimizer=3.0)


def test_a_probe_counts_its_least_time_as_noise_only_adds(monkeypatch):
    import gradwire.compressors.auto as auto

    reducer = AutoReducer(parse_config("auto", {"optimizer": "sgd"}))
    # an untimed warm-up, then three timed all-reduces, two of them slowed by the machine: the link's
    # time is the fast one (a median would take a slowed one, and inflate α)
    delays = iter([0.05, 0.03, 0.002, 0.03])
    monkeypatch.setattr(auto.dist, "all_reduce", lambda x, group=None: time.sleep(next(delays)))
    assert 0.002 <= reducer._probe(4096, 3, untimed=1) < 0.02
    assert reducer.probe_bytes == 4 * 4096
