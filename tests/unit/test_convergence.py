"""The convergence benchmark's building blocks (benchmarks/convergence_problems.py, _report.py).

The smoothness constants against a finite-difference Hessian, the Dirichlet split, the driver against
``Reducer.reduce`` on real gloo ranks, EF21-W's equivalence with EF21, and claim 1 of the benchmark
(EF21 converges where Top-k without feedback stalls) on a short run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from benchmarks import convergence_report as report
from benchmarks.convergence_problems import (
    Workers,
    digits_problem,
    digits_split,
    driver_trajectory,
    ef21_step,
    ef21_theta_beta,
    gloo_trajectories,
    quadratic_mean,
    run,
)
from tests.ranks import run_ranks

K = 7  # Top-k budget of the benchmark


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny tensor ops: intra-op threads only add contention on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hessian(grad, x: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central finite differences of ``grad`` (symmetrised)."""
    cols = []
    for j in range(len(x)):
        e = torch.zeros_like(x)
        e[j] = h
        cols.append((grad(x + e) - grad(x - e)) / (2 * h))
    hess = torch.stack(cols, dim=1)
    return 0.5 * (hess + hess.T)


def _top_eig(m: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(m)[-1])


def test_smoothness_constants_bound_the_hessian_and_are_attained_at_zero():
    problem = digits_problem(3, 0.5, seed=0)
    lis = problem.smoothness()
    zero = torch.zeros(problem.d, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    points = [torch.randn(problem.d, generator=gen, dtype=torch.float64) for _ in range(2)]
    for i in range(problem.n):
        grad_i = lambda x, i=i: problem.local_grads(x)[i]  # noqa: E731
        # σ' = 1/4 and the regulariser's curvature 2λ are both attained at x = 0: the bound is tight
        assert _top_eig(_hessian(grad_i, zero)) == pytest.approx(lis[i], rel=1e-7)
        for x in points:
            assert _top_eig(_hessian(grad_i, x)) <= lis[i] * (1 + 1e-7)
    big_l = problem.global_smoothness()
    assert _top_eig(_hessian(problem.grad, zero)) == pytest.approx(big_l, rel=1e-7)
    assert big_l <= lis.mean() + 1e-12  # L ≤ L_AM ≤ L_QM
    assert lis.mean() <= quadratic_mean(lis)


def test_feature_scaling_scales_the_logistic_part_of_l_i():
    plain = digits_problem(4, 0.3, seed=1)
    scaled = digits_problem(4, 0.3, seed=1, scales=[1.0, 2.0, 1.0, 0.5])
    lam2 = 2 * plain.lam
    expected = (plain.smoothness() - lam2) * np.array([1.0, 4.0, 1.0, 0.25]) + lam2
    np.testing.assert_allclose(scaled.smoothness(), expected, rtol=1e-10)


def test_dirichlet_split_is_deterministic_covers_every_row_once_and_is_heterogeneous():
    digit = load_digits().target
    a, b = digits_split(10, 0.1, seed=0), digits_split(10, 0.1, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, digits_split(10, 0.1, seed=1)))
    rows = torch.cat(a).sort().values
    assert torch.equal(rows, torch.arange(len(digit)))  # every row exactly once
    overall = np.bincount(digit, minlength=10) / len(digit)

    def mean_tv(parts):
        mixes = [np.bincount(digit[p.numpy()], minlength=10) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]))

    assert mean_tv(a) > 0.5  # measured 0.67: most workers see a few digits only
    assert mean_tv(digits_split(10, 100.0, seed=0)) < 0.1  # measured 0.03: close to iid


def test_step_size_constants_match_the_closed_forms():
    theta, beta = ef21_theta_beta(0.1)
    assert theta == pytest.approx(0.05132, abs=1e-5)
    assert beta == pytest.approx(17.5381, abs=1e-3)
    assert ef21_step(1.0, 2.0, 1.0) == pytest.approx(1.0)  # no compression: γ = 1/L
    assert ef21_step(1.0, 1.0, 0.1) > ef21_step(1.0, 2.0, 0.1)  # a smaller L̃ (L_AM) allows more
    with pytest.raises(ValueError, match="alpha"):
        ef21_theta_beta(0.0)


def _ef21_gamma(problem) -> float:
    lis = problem.smoothness()
    return ef21_step(problem.global_smoothness(), quadratic_mean(lis), K / problem.d)


def test_claim_1_ef21_converges_where_topk_alone_stalls():
    problem = digits_problem(10, 0.1, seed=0)
    gamma = _ef21_gamma(problem)
    rounds, x_level = 600, 3e-3  # measured at 600 rounds: EF21 ≈ 3e-4, Top-k alone ≈ 1.6e-2
    ef21 = run(problem, Workers(10, "topk", k=K, feedback="ef21"), gamma, rounds, "ef21", every=100)
    plain = run(problem, Workers(10, "topk", k=K, feedback="none"), gamma, rounds, "none", every=100)
    assert ef21.grad_norm_sq[-1] < x_level < plain.grad_norm_sq[-1]
    assert plain.grad_norm_sq[-1] > 0.7 * plain.grad_norm_sq[len(plain.rounds) // 2]  # no longer moving
    # bits: k float64 values + k int32 indices per round, plus EF21's one dense round
    assert plain.bits[-1] == rounds * K * 12 * 8
    assert ef21.bits[-1] == (rounds - 1) * K * 12 * 8 + problem.d * 8 * 8


def test_ef21_w_with_top_k_is_ef21_under_the_rescaling():
    problem = digits_problem(10, 0.1, seed=0, scales=[0.2] * 8 + [1.0, 1.0])
    lis = problem.smoothness()
    gamma = ef21_step(problem.global_smoothness(), float(lis.mean()), K / problem.d)
    weighted = Workers(10, "topk", weights=lis / lis.sum(), k=K, feedback="ef21")
    plain = Workers(10, "topk", k=K, feedback="ef21")
    a = run(problem, weighted, gamma, 200, "ef21-w", every=1)
    b = run(problem, plain, gamma, 200, "ef21", every=1)
    torch.testing.assert_close(a.iterates, b.iterates, atol=1e-12, rtol=0)
    assert not torch.equal(a.iterates[1], a.iterates[-1])  # it did move


def test_driver_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="element-wise"):
        Workers(2, "powersgd", rank=1)
    with pytest.raises(ValueError, match="summing to 1"):
        Workers(2, "topk", weights=np.array([0.5, 0.6]), k=1)
    with pytest.raises(ValueError, match="uncompressed"):
        Workers(2, "topk", k=60, feedback="ef21").exchange(torch.ones(2, 65, dtype=torch.float64))
    with pytest.raises(ValueError, match="scales"):
        digits_problem(3, 0.1, scales=[1.0, 2.0])


CONFIGS = [
    ("topk", {"k": K, "feedback": "none"}),
    ("topk", {"k": K, "feedback": "ef21"}),
    ("topk", {"k": K, "feedback": "econtrol", "eta": 0.1}),
]


@pytest.mark.multiprocess
def test_driver_matches_reducer_on_gloo_ranks():
    world, rounds, gamma = 3, 15, 0.05
    ranks = run_ranks(gloo_trajectories, world, 0.3, 0, CONFIGS, gamma, rounds, timeout=300)
    for j, config in enumerate(CONFIGS):
        driven = driver_trajectory(world, 0.3, 0, config, gamma, rounds)
        assert not torch.equal(driven[0], driven[-1])
        for rank in ranks:
            for x_gloo, x_driver in zip(rank[j], driven, strict=True):
                torch.testing.assert_close(x_gloo, x_driver, atol=1e-12, rtol=0)


def _psgd_result(bytes_per_step: float, accuracies: list[float]) -> dict:
    """A result in linkrun.py's JSON format (the fields the report reads)."""
    evals = [{"step": 10 * (i + 1), "test_accuracy": a} for i, a in enumerate(accuracies)]
    return {"bytes_per_step": bytes_per_step, "evals": evals, "params": 1000, "batch_per_rank": 32}


def test_report_section_names_its_command_in_every_row_and_keeps_other_sections(tmp_path):
    problem = digits_problem(4, 0.3, seed=0)
    gamma = _ef21_gamma(problem)
    labels = {
        "Top-k, no feedback": {"feedback": "none"}, "Top-k + EF": {"feedback": "ef"},
        "Top-k + EF21": {"feedback": "ef21"}, "Top-k + EControl": {"feedback": "econtrol", "eta": 0.1},
    }  # fmt: skip

    def traces(names, batch=None):
        out = {n: run(problem, Workers(4, "topk", k=K, **labels[n]), gamma, 40, n, batch) for n in names}
        out["uncompressed"] = run(problem, Workers(4, "none"), gamma, 40, "uncompressed", batch)
        return out

    weighted = {
        label: run(problem, Workers(4, "topk", k=K, feedback="ef21"), gamma, 40, label)
        for label in ("EF21, γ from L_QM", "EF21-W, γ from L_AM", "EF21, γ from L_AM")
    }
    info = {"L": 3.0, "L_QM": 3.3, "L_AM": 3.2, "L_min": 3.0, "L_max": 3.5, "alpha": K / 65}
    info.update(gamma_qm=gamma, gamma_am=gamma)
    settings = {
        "n": 4, "dirichlet": 0.3, "seed": 0, "k": K, "d": 65, "eta": 0.1, "batch": 8, "scales": [0.2] * 4,
        "psgd_world": 4, "psgd_steps": 20, "psgd_eval_every": 10, "crosscheck_rounds": 0,
        "sizes": [len(b) for b in problem.labels], "psgd_optimizer": "SGD lr 0.05, momentum 0.9",
    }  # fmt: skip
    psgd = {"allreduce": _psgd_result(4000.0, [0.8, 0.9]), "powersgd:2": _psgd_result(40.0, [0.7, 0.89])}
    res = report.Results(
        quick=True, settings=settings, linkrun={m: f"--method {m}" for m in psgd}, info=info,
        full=traces(list(labels)), stochastic=traces(["Top-k + EF", "Top-k + EF21", "Top-k + EControl"], 8),
        weighted=weighted, weighted_info=info, weighted_gap=0.0, gaps={}, psgd=psgd,
    )  # fmt: skip
    images = report.plot_all(res, tmp_path / "img")
    assert all(p.exists() and p.stat().st_size < 150_000 for p in images.values())
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
    section = report.render(res, images, out)
    assert section.startswith(report.BEGIN) and section.rstrip().endswith(report.END)
    rows = [
        line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")
    ]
    assert len(rows) == 4 + 3 + 3 + 4 + 2  # experiments 1, 2, 3 (full, minibatch) and 4
    assert all("`python benchmarks/convergence.py --quick`" in row for row in rows)
    assert "](img/convergence-feedback.png)" in section  # relative to the markdown file
    report.write(out, section)
    report.write(out, section)  # rewriting replaces the section, it does not append a second one
    text = out.read_text()
    assert "keep me" in text and text.count(report.BEGIN) == 1
