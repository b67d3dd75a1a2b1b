"""Convergence reproductions: the EF21, EF21-W, EControl and PowerSGD papers' claims, on offline data.

1. Top-k without feedback vs EF vs EF21 (Richtárik, Sokolov, Fatkhullin 2021): EF21 converges where
   Top-k alone stalls.
2. EF21 with γ = 1/(L + L_QM·sqrt(β/θ)) vs EF21-W with γ = 1/(L + L_AM·sqrt(β/θ)) (Richtárik, Gasanov,
   Burlachenko 2024): the larger step converges faster when the L_i differ.
3. EControl vs EF vs EF21 (Gao, Islamov, Stich 2024) on heterogeneous data, full and minibatch gradients.
4. PowerSGD rank sweep (Vogels, Karimireddy, Jaggi 2019): test accuracy vs bytes on the digits CNN.

(1)–(3) solve the non-convex logistic regression of ``convergence_problems.py`` with the library's
Top-k and feedback objects driven in one process; the driver is checked against ``Reducer.reduce``
on real gloo ranks. (4) runs ``benchmarks/linkrun.py`` on 4 gloo ranks in an unshaped network namespace.

    python benchmarks/convergence.py [--quick] [--out docs/benchmarks.md] [--img-dir docs/img]

The full mode (about 8 minutes on 2 cores) writes the ``convergence`` section of docs/benchmarks.md and
docs/img/convergence-*.png; ``--quick`` (under 3 minutes) uses fewer rounds and steps and writes
nothing into docs unless ``--out``/``--img-dir`` are given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import convergence_report as report  # noqa: E402
from benchmarks.convergence_problems import (  # noqa: E402
    Trace,
    Workers,
    digits_problem,
    driver_trajectory,
    ef21_step,
    gloo_trajectories,
    quadratic_mean,
    run,
)
from tests.ranks import run_ranks  # noqa: E402

N_WORKERS = 10
DIRICHLET_ALPHA = 0.1
SEED = 0
TOPK = 7  # of d = 65: α = k/d ≈ 0.108
ETA = 0.1  # EControl's feedback strength (≈ α; the library's default)
BATCH = 8  # minibatch per worker in the stochastic runs
#: experiment 2: workers 1–8 have their features scaled by 0.2, workers 9–10 not, so the L_i differ ~10×
WEIGHTED_SCALES = [0.2] * 8 + [1.0, 1.0]
PSGD_WORLD = 4


@dataclass(frozen=True)
class Plan:
    rounds: int  # experiments 1 and 3, full gradients
    stochastic_rounds: int  # experiment 3, minibatches
    weighted_rounds: int  # experiment 2
    every: int  # record ‖∇f‖² every this many rounds
    crosscheck_rounds: int  # 0: skip the gloo check
    psgd_ranks: tuple[int, ...]
    psgd_steps: int
    psgd_eval_every: int


FULL = Plan(4000, 4000, 1500, 10, 40, (1, 2, 4, 8), 100, 10)
QUICK = Plan(1500, 800, 800, 10, 0, (1, 4), 60, 20)

# label → (compressor, its parameters); the Top-k budget is the same for every compressed method
METHODS: dict[str, tuple[str, dict]] = {
    "Top-k, no feedback": ("topk", {"k": TOPK, "feedback": "none"}),
    "Top-k + EF": ("topk", {"k": TOPK, "feedback": "ef"}),
    "Top-k + EF21": ("topk", {"k": TOPK, "feedback": "ef21"}),
    "Top-k + EControl": ("topk", {"k": TOPK, "feedback": "econtrol", "eta": ETA}),
    "uncompressed": ("none", {}),
}


def steps_for(problem) -> dict[str, float]:
    """The theorems' step sizes for this problem (docs/algorithms.md §3.1, §3.3)."""
    lis = problem.smoothness()
    big_l = problem.global_smoothness()
    alpha = TOPK / problem.d
    return {
        "L": big_l,
        "L_QM": quadratic_mean(lis),
        "L_AM": float(lis.mean()),
        "L_min": float(lis.min()),
        "L_max": float(lis.max()),
        "alpha": alpha,
        "gamma_qm": ef21_step(big_l, quadratic_mean(lis), alpha),
        "gamma_am": ef21_step(big_l, float(lis.mean()), alpha),
    }


def run_methods(problem, labels, gamma, rounds, every, batch=None) -> dict[str, Trace]:
    traces = {}
    for label in labels:
        name, params = METHODS[label]
        started = time.perf_counter()
        traces[label] = run(
            problem, Workers(problem.n, name, **params), gamma, rounds, label, batch, SEED, every
        )
        print(f"  {label}: {time.perf_counter() - started:.1f} s", flush=True)
    return traces


def weighted_experiment(plan: Plan) -> tuple[dict[str, Trace], dict[str, float], float]:
    """EF21 (γ_QM), EF21-W (γ_AM, weights L_i/ΣL_j) and EF21 (γ_AM) on the feature-scaled problem;
    also the largest difference between the last two runs' iterates (they are the same method)."""
    problem = digits_problem(N_WORKERS, DIRICHLET_ALPHA, SEED, scales=WEIGHTED_SCALES)
    info = steps_for(problem)
    lis = problem.smoothness()
    runs = {
        "EF21, γ from L_QM": (info["gamma_qm"], None),
        "EF21-W, γ from L_AM": (info["gamma_am"], lis / lis.sum()),
        "EF21, γ from L_AM": (info["gamma_am"], None),
    }
    traces = {}
    for label, (gamma, weights) in runs.items():
        workers = Workers(problem.n, "topk", weights=weights, k=TOPK, feedback="ef21")
        traces[label] = run(problem, workers, gamma, plan.weighted_rounds, label, every=plan.every)
    gap = float((traces["EF21-W, γ from L_AM"].iterates - traces["EF21, γ from L_AM"].iterates).abs().max())
    return traces, info, gap


def crosscheck(plan: Plan) -> dict[str, float]:
    """Largest |x_driver − x_gloo| over the first rounds, per method, on N_WORKERS real gloo ranks."""
    if not plan.crosscheck_rounds:
        return {}
    gamma = steps_for(digits_problem(N_WORKERS, DIRICHLET_ALPHA, SEED))["gamma_qm"]
    labels = ["Top-k, no feedback", "Top-k + EF", "Top-k + EF21", "Top-k + EControl"]
    configs = [METHODS[label] for label in labels]
    common = (DIRICHLET_ALPHA, SEED)
    ranks = run_ranks(
        gloo_trajectories, N_WORKERS, *common, configs, gamma, plan.crosscheck_rounds, timeout=900
    )
    out = {}
    for j, (label, config) in enumerate(zip(labels, configs)):
        driven = driver_trajectory(N_WORKERS, *common, config, gamma, plan.crosscheck_rounds)
        out[label] = max(float((a - b).abs().max()) for rank in ranks for a, b in zip(rank[j], driven))
        print(f"  gloo check {label}: max |Δx| = {out[label]:.2e}", flush=True)
    return out


def powersgd_experiment(plan: Plan, work: Path) -> tuple[dict[str, dict], str]:
    """``linkrun.py --model digits_cnn`` per method on PSGD_WORLD ranks in one unshaped namespace; the
    results by method and the workload's optimizer in words."""
    from benchmarks.linkrun import WORKLOADS
    from benchmarks.netlab import Lab, support_problem

    problem = support_problem()
    if problem is not None:
        raise SystemExit(f"experiment 4 runs its gloo ranks in a network namespace, which failed: {problem}")
    opt, lr = WORKLOADS["digits_cnn"]["optimizer"]
    optimizer = f"SGD lr {lr}, momentum 0.9" if opt == "sgd" else f"{opt} lr {lr}"
    results = {}
    for method in ["allreduce", *[f"powersgd:{r}" for r in plan.psgd_ranks]]:
        out = work / f"{method.replace(':', '-')}.json"
        script = str(ROOT / "benchmarks" / "linkrun.py")
        argv = [sys.executable, script, *linkrun_args(plan, method), "--out", str(out)]
        started = time.perf_counter()
        with Lab(workers=PSGD_WORLD, rate=None, topology="shared") as lab:
            lab.run_ranks(argv, timeout=900)
        results[method] = json.loads(out.read_text())
        print(f"  {method}: {time.perf_counter() - started:.0f} s", flush=True)
    return results, optimizer


def linkrun_args(plan: Plan, method: str) -> list[str]:
    # PowerSGD compresses from the first step, as in the paper (SGD needs no plain start)
    start = ["--psgd-start", "0"] if method.startswith("powersgd") else []
    return [
        "--model", "digits_cnn", "--method", method, "--steps", str(plan.psgd_steps), "--warmup", "0",
        "--eval-every", str(plan.psgd_eval_every), *start,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (under 3 minutes)")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file for the section (full mode: docs/benchmarks.md)"
    )
    parser.add_argument(
        "--img-dir",
        type=Path,
        default=None,
        help="where the plots go (full mode: docs/img; quick: a temporary directory)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if not args.quick:
        args.out = args.out or ROOT / "docs" / "benchmarks.md"
        args.img_dir = args.img_dir or ROOT / "docs" / "img"
    img_dir = args.img_dir or Path(tempfile.mkdtemp(prefix="gradwire-convergence-"))
    torch.set_num_threads(1)
    started = time.perf_counter()

    problem = digits_problem(N_WORKERS, DIRICHLET_ALPHA, SEED)
    info = steps_for(problem)
    print(f"problem: n={problem.n}, d={problem.d}, γ_QM={info['gamma_qm']:.4g}", flush=True)
    print("experiments 1 and 3: full gradients", flush=True)
    full = run_methods(problem, list(METHODS), info["gamma_qm"], plan.rounds, plan.every)
    print(f"experiment 3: minibatch gradients (b = {BATCH})", flush=True)
    stochastic = run_methods(
        problem, ["Top-k + EF", "Top-k + EF21", "Top-k + EControl", "uncompressed"],
        info["gamma_qm"], plan.stochastic_rounds, plan.every, batch=BATCH,
    )  # fmt: skip
    print("experiment 2: EF21 vs EF21-W", flush=True)
    weighted, winfo, wgap = weighted_experiment(plan)
    print("driver vs Reducer on gloo ranks", flush=True)
    gaps = crosscheck(plan)
    print("experiment 4: PowerSGD rank sweep", flush=True)
    with tempfile.TemporaryDirectory(prefix="gradwire-psgd-") as tmp:
        psgd, optimizer = powersgd_experiment(plan, Path(tmp))

    settings = {
        "n": N_WORKERS, "dirichlet": DIRICHLET_ALPHA, "seed": SEED, "k": TOPK, "d": problem.d, "eta": ETA,
        "batch": BATCH, "scales": WEIGHTED_SCALES, "psgd_world": PSGD_WORLD, "psgd_steps": plan.psgd_steps,
        "psgd_eval_every": plan.psgd_eval_every, "crosscheck_rounds": plan.crosscheck_rounds,
        "sizes": [len(b) for b in problem.labels], "psgd_optimizer": optimizer,
    }  # fmt: skip
    res = report.Results(
        quick=args.quick, settings=settings, linkrun={m: " ".join(linkrun_args(plan, m)) for m in psgd},
        info=info, full=full, stochastic=stochastic, weighted=weighted, weighted_info=winfo,
        weighted_gap=wgap, gaps=gaps, psgd=psgd,
    )  # fmt: skip
    images = report.plot_all(res, img_dir)
    res.seconds = time.perf_counter() - started
    section = report.render(res, images, args.out)
    print(section)
    if args.out is not None:
        report.write(args.out, section)
        print(f"wrote {args.out}")
    print(f"plots: {', '.join(str(p) for p in images.values())}")


if __name__ == "__main__":
    main()
