"""The problems and the multi-worker driver behind ``benchmarks/convergence.py``.

**Problem** (the EF21 paper's logistic-regression experiment, Richtárik, Sokolov, Fatkhullin 2021,
§ experiments; docs/algorithms.md §3.1): worker ``i`` holds ``m_i`` rows ``a_j`` with labels
``b_j ∈ {−1, +1}`` and

    f_i(x) = (1/m_i) Σ_j log(1 + exp(−b_j a_jᵀx)) + λ Σ_k x_k² / (1 + x_k²),   f = (1/n) Σ_i f_i.

The regulariser is non-convex. Its Hessian is ``(1/m_i) A_iᵀ diag(σ(1−σ)) A_i + λ diag((2 − 6x²)/(1+x²)³)``
and ``σ(1−σ) ≤ 1/4``, ``(2 − 6x²)/(1+x²)³ ≤ 2``, so ``L_i = λ_max(A_iᵀA_i)/(4 m_i) + 2λ`` (equality
at ``x = 0``) and ``L = λ_max((1/n) Σ_i A_iᵀA_i/(4 m_i)) + 2λ``.

Data: scikit-learn's bundled 8×8 digits (1797 × 64, no download), pixels scaled to [0, 1] plus a
constant feature (d = 65), label +1 for digits 5–9. The rows are split over the workers by the
*digit* (10 classes) with ``gradwire.worker.partition``'s Dirichlet(α) split, so at small α each
worker sees few digits: heterogeneous ``f_i``.

**Driver** (:class:`Workers`): n workers in one process. Each worker owns the compressor and the
feedback-rule objects of its own ``make_reducer(...)`` (the library's Top-k ``encode``/``decode``/
``decode_mean`` and ``feedback.prepare``/``commit_local``/``output``/``init_dense``), and one round
runs them in the order ``Reducer.reduce`` does, with the all-gather replaced by stacking the n
payloads. :func:`gloo_trajectory` runs the same problem through ``Reducer.reduce`` on real gloo
ranks so the two can be compared iterate by iterate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from gradwire.compressors import make_reducer
from gradwire.compressors.compressor import ElementwiseCompressor
from gradwire.worker.partition import partition_indices

KEY = 0  # the one tensor's state slot


# --- the problem -------------------------------------------------------------------------------


@dataclass
class LogisticProblem:
    """Non-convex regularised logistic regression split over workers (float64)."""

    features: list[torch.Tensor]  # A_i: [m_i, d]
    labels: list[torch.Tensor]  # b_i: [m_i] in {−1, +1}
    lam: float = 0.1
    _stacked: dict[str, torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels) or not self.features:
            raise ValueError("need one label vector per worker's feature matrix, and at least one worker")
        for i, (a, b) in enumerate(zip(self.features, self.labels)):
            if a.ndim != 2 or b.shape != (a.shape[0],) or a.shape[0] == 0:
                raise ValueError(f"worker {i}: features must be [m, d] and labels [m] with m >= 1")
        owner = torch.cat([torch.full((len(b),), i) for i, b in enumerate(self.labels)])
        sizes = torch.tensor([float(len(b)) for b in self.labels], dtype=torch.float64)
        self._stacked = {"a": torch.cat(self.features), "b": torch.cat(self.labels), "owner": owner}
        self._stacked["inv_m"] = (1.0 / sizes)[owner]

    @property
    def n(self) -> int:
        return len(self.features)

    @property
    def d(self) -> int:
        return int(self.features[0].shape[1])

    def _reg_grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.lam * 2.0 * x / (1.0 + x * x) ** 2

    def local_grads(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, d]``: row i is ``∇f_i(x)`` (all workers at once)."""
        s = self._stacked
        margin = s["b"] * (s["a"] @ x)
        coef = -s["b"] * torch.sigmoid(-margin) * s["inv_m"]
        grads = torch.zeros(self.n, self.d, dtype=x.dtype).index_add_(0, s["owner"], s["a"] * coef[:, None])
        return grads + self._reg_grad(x)

    def minibatch_grads(self, x: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
        """``[n, d]``: row i is a ``batch``-sample estimate of ``∇f_i(x)`` (uniform, with replacement)."""
        rows = []
        for a, b in zip(self.features, self.labels):
            idx = torch.randint(len(b), (batch,), generator=gen)
            ai, bi = a[idx], b[idx]
            rows.append(-(ai * (bi * torch.sigmoid(-bi * (ai @ x)))[:, None]).mean(0))
        return torch.stack(rows) + self._reg_grad(x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_grads(x).mean(0)

    def loss(self, x: torch.Tensor) -> float:
        per_worker = [
            torch.nn.functional.softplus(-b * (a @ x)).mean() for a, b in zip(self.features, self.labels)
        ]
        return float(torch.stack(per_worker).mean() + self.lam * (x * x / (1.0 + x * x)).sum())

    def smoothness(self) -> np.ndarray:
        """``L_i = λ_max(A_iᵀA_i)/(4 m_i) + 2λ`` per worker."""
        return np.array(
            [float(torch.linalg.eigvalsh(a.T @ a)[-1]) / (4 * len(a)) + 2 * self.lam for a in self.features]
        )

    def global_smoothness(self) -> float:
        """``L = λ_max((1/n) Σ_i A_iᵀA_i/(4 m_i)) + 2λ`` (≤ the arithmetic mean of the ``L_i``)."""
        mean = sum(a.T @ a / (4 * len(a)) for a in self.features) / self.n
        return float(torch.linalg.eigvalsh(mean)[-1]) + 2 * self.lam


def digits_split(n_workers: int, dirichlet_alpha: float, seed: int) -> list[torch.Tensor]:
    """Row indices of the digits set per worker: Dirichlet(α) over the 10 digit classes."""
    from sklearn.datasets import load_digits

    digit = load_digits().target
    return partition_indices(digit, n_workers, kind="dirichlet", alpha=dirichlet_alpha, seed=seed)


def digits_problem(
    n_workers: int, dirichlet_alpha: float, seed: int = 0, lam: float = 0.1, scales: list[float] | None = None
) -> LogisticProblem:
    """The binarised digits problem (module docstring); ``scales[i]`` multiplies worker i's features
    (makes the ``L_i`` differ on purpose; ``None``: no scaling)."""
    from sklearn.datasets import load_digits

    if scales is not None and (len(scales) != n_workers or min(scales) <= 0):
        raise ValueError(f"scales must hold {n_workers} positive numbers, got {scales}")
    data = load_digits()
    a = torch.tensor(np.hstack([data.data / 16.0, np.ones((len(data.data), 1))]), dtype=torch.float64)
    b = torch.tensor(np.where(data.target >= 5, 1.0, -1.0), dtype=torch.float64)
    parts = digits_split(n_workers, dirichlet_alpha, seed)
    scale = [1.0] * n_workers if scales is None else scales
    return LogisticProblem([a[p] * s for p, s in zip(parts, scale)], [b[p] for p in parts], lam)


# --- step sizes (EF21 Theorem 1; EF21-W, Richtárik, Gasanov, Burlachenko 2024) -------------------


def ef21_theta_beta(alpha: float) -> tuple[float, float]:
    """``θ = 1 − sqrt(1 − α)``, ``β = (1 − α)/(1 − sqrt(1 − α))`` for a compressor with contraction α."""
    if not 0 < alpha <= 1:
        raise ValueError(f"the contraction parameter alpha must be in (0, 1], got {alpha}")
    root = math.sqrt(1.0 - alpha)
    return 1.0 - root, (1.0 - alpha) / (1.0 - root) if alpha < 1 else 0.0


def ef21_step(big_l: float, l_tilde: float, alpha: float) -> float:
    """``γ = 1/(L + L̃·sqrt(β/θ))``: EF21 with ``L̃ = L_QM``, EF21-W with ``L̃ = L_AM``."""
    theta, beta = ef21_theta_beta(alpha)
    return 1.0 / (big_l + l_tilde * math.sqrt(beta / theta))


def quadratic_mean(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


# --- the driver --------------------------------------------------------------------------------


class Workers:
    """n workers, each with the compressor and feedback objects of its own ``make_reducer``.

    ``weights`` (EF21-W): worker i feeds ``∇f_i / (n w_i)`` to its rule and the aggregate is
    ``Σ_i w_i · decode(c_i)`` instead of the plain mean (docs/algorithms.md §3.3).
    """

    def __init__(self, n: int, name: str, weights: np.ndarray | None = None, **params):
        if n < 1:
            raise ValueError(f"need at least one worker, got {n}")
        reducers = [make_reducer(name, **params) for _ in range(n)]
        if not isinstance(reducers[0].compressor, ElementwiseCompressor):
            raise ValueError(f"the driver runs element-wise compressors (Top-k, Rand-k...), not {name!r}")
        self.config = reducers[0].config
        self.compressors = [r.compressor for r in reducers]
        self.rules = [r.feedback for r in reducers]
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.shape != (n,) or np.any(weights <= 0) or not math.isclose(weights.sum(), 1.0):
                raise ValueError(f"weights must be {n} positive numbers summing to 1")
        self.weights = weights
        self.step = 0

    def exchange(self, grads: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One round: the direction every worker steps along and the bits each worker sent.

        ``grads`` is ``[n, d]``. The order of calls is ``Reducer.reduce``'s for one compressed
        tensor: a dense round for a rule's first step, else prepare → encode → decode (own) →
        aggregate → commit_local → output.
        """
        n, d = grads.shape
        shape = (1, d)  # a matrix, as the reducer compresses only tensors with ndim >= 2
        inputs = [g.view(shape) for g in grads]
        if self.weights is not None:
            inputs = [g / (n * w) for g, w in zip(inputs, self.weights)]
        comp = self.compressors[0]
        if not comp.should_compress(inputs[0], self.config.min_compression_rate):
            raise ValueError(f"{comp.name} would send a {shape} tensor uncompressed; lower k or ratio")
        if self.rules[0].needs_dense_init(KEY):
            mean = self._aggregate([g.reshape(-1) for g in inputs]).view(shape)
            for rule, g in zip(self.rules, inputs):
                rule.init_dense(KEY, g, mean)
            self.step += 1
            return mean.reshape(-1), 8 * d * grads.element_size()
        prepared = [rule.prepare(KEY, g) for rule, g in zip(self.rules, inputs)]
        flats = [p.reshape(-1) for p in prepared]
        payloads = [c.encode(x, KEY, self.step) for c, x in zip(self.compressors, flats)]
        local = [c.decode(p, x, KEY, self.step) for c, p, x in zip(self.compressors, payloads, flats)]
        if self.weights is None:
            aggregate = comp.decode_mean(torch.stack(payloads), flats[0], KEY, self.step)
        else:
            aggregate = self._aggregate(local)
        out = None
        for rule, g, p, lo in zip(self.rules, inputs, prepared, local):
            if rule.needs_local:
                rule.commit_local(KEY, g, p, lo.view(shape))
            result = rule.output(KEY, aggregate.view(shape))
            out = result if out is None else out  # identical on every worker
        for c in self.compressors:
            c.commit_step()
        self.step += 1
        return out.reshape(-1), 8 * payloads[0].numel() * payloads[0].element_size()

    def _aggregate(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        if self.weights is None:
            return torch.stack(vectors).mean(0)
        return sum(float(w) * v for w, v in zip(self.weights, vectors))


@dataclass
class Trace:
    """What one run recorded: ‖∇f(x_t)‖² at the recorded rounds and the bits each worker had sent."""

    label: str
    rounds: np.ndarray
    grad_norm_sq: np.ndarray
    bits: np.ndarray
    iterates: torch.Tensor  # x at the recorded rounds, [records, d]

    def tail(self, fraction: float = 0.25) -> np.ndarray:
        """‖∇f‖² over the last ``fraction`` of the recorded rounds."""
        return self.grad_norm_sq[-max(1, round(fraction * len(self.grad_norm_sq))) :]

    def first_below(self, threshold: float) -> int | None:
        """The first recorded round with ‖∇f‖² ≤ threshold (None if never)."""
        hits = np.flatnonzero(self.grad_norm_sq <= threshold)
        return int(self.rounds[hits[0]]) if hits.size else None

    def bits_at(self, round_: int | None) -> float | None:
        if round_ is None:
            return None
        return float(self.bits[np.searchsorted(self.rounds, round_)])


def run(
    problem: LogisticProblem,
    workers: Workers,
    gamma: float,
    rounds: int,
    label: str,
    batch: int | None = None,
    seed: int = 0,
    every: int = 1,
) -> Trace:
    """``rounds`` steps ``x ← x − γ·direction`` from ``x = 0`` with full (``batch=None``) or
    minibatch local gradients; ‖∇f(x_t)‖² (exact) is recorded every ``every`` rounds and at the end."""
    x = torch.zeros(problem.d, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    kept_rounds, norms, bits_log, xs = [], [], [], []
    bits = 0
    for t in range(rounds + 1):
        full = problem.local_grads(x) if (batch is None or t % every == 0 or t == rounds) else None
        if t % every == 0 or t == rounds:
            kept_rounds.append(t)
            norms.append(float((full.mean(0) ** 2).sum()))
            bits_log.append(bits)
            xs.append(x)
        if t == rounds:
            break
        grads = full if batch is None else problem.minibatch_grads(x, batch, gen)
        direction, sent = workers.exchange(grads)
        bits += sent
        x = x - gamma * direction
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{label}: the iterate diverged at round {t} (γ = {gamma:g})")
    return Trace(
        label, np.array(kept_rounds), np.array(norms), np.array(bits_log, dtype=np.float64), torch.stack(xs)
    )


# --- the same run on real gloo ranks ----------------------------------------------------------


def gloo_trajectories(
    rank: int, world: int, dirichlet_alpha: float, seed: int, configs: list, gamma: float, rounds: int
) -> list[list[torch.Tensor]]:
    """Rank ``rank`` of runs through ``Reducer.reduce`` over the world process group, one per
    ``(compressor, params)`` in ``configs``: every rank holds worker ``rank``'s data, reduces its full
    local gradient and steps. Returns each run's iterates."""
    torch.set_num_threads(1)
    problem = digits_problem(world, dirichlet_alpha, seed)
    runs = []
    for name, params in configs:
        reducer = make_reducer(name, **params)
        x = torch.zeros(problem.d, dtype=torch.float64)
        iterates = [x]
        for _ in range(rounds):
            g = problem.local_grads(x)[rank].view(1, -1)
            x = x - gamma * reducer.reduce([g])[0].reshape(-1)
            iterates.append(x)
        runs.append(iterates)
    return runs


def driver_trajectory(
    world: int, dirichlet_alpha: float, seed: int, config: tuple, gamma: float, rounds: int
) -> list[torch.Tensor]:
    """The iterates :class:`Workers` produces for one run of :func:`gloo_trajectories`."""
    name, params = config
    problem = digits_problem(world, dirichlet_alpha, seed)
    workers = Workers(world, name, **params)
    x = torch.zeros(problem.d, dtype=torch.float64)
    iterates = [x]
    for _ in range(rounds):
        x = x - gamma * workers.exchange(problem.local_grads(x))[0]
        iterates.append(x)
    return iterates
