"""The two exact gradient codes of Tandon et al. (ICML 2017): fractional and cyclic repetition.

Both meet the lower bound on the load: every row of ``B`` has exactly ``s + 1`` nonzeros,
so every worker computes ``(s + 1)/n`` of the data (docs/algorithms.md §5.1).
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch

from gradwire.compressors.coding.gradient_code import GradientCode, check_code_params

#: a cyclic-repetition draw is accepted at once when cond(B_F) stays below this on the checked sets
TARGET_CONDITION = 1e3
#: how many seeds (seed, seed + 1, ...) cyclic_repetition tries before keeping the best draw ...
MAX_DRAWS = 16
#: ... fewer for large n: the checks of all draws together stay within about this many flops
CHECK_BUDGET = 2e9
#: the kept draw is reported with a RuntimeWarning when its worst cond(B_F) exceeds this
WARN_CONDITION = 1e6
#: survivor sets checked at construction: all of them when there are at most this many ...
CHECKED_SETS = 2000
#: ... else this many, sampled with the draw's seed
SAMPLED_SETS = 32


def fractional_repetition(n: int, s: int) -> GradientCode:
    """Fractional repetition (Tandon et al. 2017, §3.1; docs/algorithms.md §5.2); needs ``(s + 1) | n``.

    Workers form ``n/(s+1)`` groups of ``s + 1``; every member of group ``g`` computes the
    partitions ``g(s+1) … g(s+1)+s`` and sends their sum, so ``B`` is block diagonal with
    all-ones blocks. Any ``n − s`` survivors include a member of every group, and the
    decoder adds one message per group (exact in any floating-point format).
    """
    check_code_params(n, s)
    if n % (s + 1):
        raise ValueError(
            f"fractional repetition needs (s + 1) to divide n; got n={n}, s={s} (s + 1 = {s + 1}); "
            "use cyclic_repetition for any s < n"
        )
    size = s + 1
    groups = [list(range(g * size, (g + 1) * size)) for g in range(n // size)]
    B = torch.zeros(n, n, dtype=torch.float64)
    for members in groups:
        B[members[0] : members[-1] + 1, members[0] : members[-1] + 1] = 1.0
    supports = [groups[i // size] for i in range(n)]
    return GradientCode(B, s, supports=supports, groups=groups, name="fractional_repetition")


def _draw_cyclic(n: int, s: int, seed: int) -> torch.Tensor | None:
    """One draw of Tandon et al.'s Algorithm 2 (docs/algorithms.md §5.3); None if a solve is singular."""
    generator = torch.Generator().manual_seed(seed)
    H = torch.empty(s, n, dtype=torch.float64)
    H[:, : n - 1] = torch.randn(s, n - 1, generator=generator, dtype=torch.float64)
    H[:, n - 1] = -H[:, : n - 1].sum(dim=1)  # H·1 = 0, so 1 ∈ null(H)
    B = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        B[i, i] = 1.0
        if s == 0:
            continue
        others = [(i + k) % n for k in range(1, s + 1)]
        try:
            # H b_iᵀ = 0 with b_i[i] = 1: the s×s system H[:, S_i∖{i}] v = −H[:, i]
            B[i, others] = torch.linalg.solve(H[:, others], -H[:, i])
        except RuntimeError:
            return None
    return B if bool(torch.isfinite(B).all()) else None


def _survivor_sets(n: int, s: int, seed: int) -> list[list[int]]:
    """All ``(n − s)``-subsets when there are at most CHECKED_SETS of them, else SAMPLED_SETS seeded ones."""
    if math.comb(n, s) <= CHECKED_SETS:
        return [list(f) for f in itertools.combinations(range(n), n - s)]
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n, generator=generator)[: n - s].tolist()) for _ in range(SAMPLED_SETS)]


def _worst_condition(B: torch.Tensor, sets: list[list[int]]) -> float:
    """max over the given survivor sets F of cond₂(B_F) = σ_max/σ_min."""
    worst = 0.0
    for start in range(0, len(sets), 256):
        batch = torch.stack([B[f] for f in sets[start : start + 256]])
        sigma = torch.linalg.svdvals(batch)
        worst = max(worst, float((sigma[:, 0] / sigma[:, -1]).max()))
    return worst


def cyclic_repetition(
    n: int, s: int, seed: int = 0, *, target_condition: float = TARGET_CONDITION
) -> GradientCode:
    """Cyclic repetition (Tandon et al. 2017, Algorithm 2; docs/algorithms.md §5.3); any ``0 <= s < n``.

    ``H`` (s×n) has i.i.d. N(0, 1) entries in its first n − 1 columns and its last column is
    minus the row sums. Row ``i`` of ``B`` lives on ``{i, …, i+s} mod n`` with ``B[i, i] = 1``
    and solves ``H b_iᵀ = 0``; every row lies in ``null(H)`` ∋ 1, and any ``n − s`` rows span it
    with probability one. All in float64.

    Random ``H`` can be badly conditioned (§5.4; fp32 messages lose about cond(B_F)·1e-9 of
    relative accuracy), so each draw is checked at construction: its worst cond(B_F) over every
    ``(n − s)``-survivor set (a seeded sample of SAMPLED_SETS when there are more than
    CHECKED_SETS) is computed, and a draw above ``target_condition`` is replaced by the draw with
    the next seed (seed + 1, seed + 2, …). After MAX_DRAWS draws (fewer for large n, so that
    the checks stay within CHECK_BUDGET flops: 4 draws at n = 256) the best one is kept, with a
    RuntimeWarning if it is still above WARN_CONDITION (likely for large n: median cond grows
    like 1e4–1e5 at n = 50–100). The seed used and the worst condition number are recorded on
    the code as ``code.seed`` and ``code.worst_condition``.
    """
    check_code_params(n, s)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    sets = _survivor_sets(n, s, seed)
    per_draw = len(sets) * n * (n - s) ** 2  # one SVD of an (n − s) × n matrix per set
    draws = int(min(MAX_DRAWS, max(1, CHECK_BUDGET // per_draw)))
    best: tuple[float, int, torch.Tensor] | None = None
    for attempt in range(draws):
        B = _draw_cyclic(n, s, seed + attempt)
        if B is None:
            continue
        worst = _worst_condition(B, sets)
        if best is None or worst < best[0]:
            best = (worst, seed + attempt, B)
        if worst <= target_condition:
            break
    if best is None:
        raise RuntimeError(f"every cyclic-repetition draw for n={n}, s={s} was singular")
    worst, used_seed, B = best
    if worst > WARN_CONDITION:
        warnings.warn(
            f"cyclic_repetition(n={n}, s={s}): best of {draws} draws has cond(B_F) = {worst:.3g} "
            f"> {WARN_CONDITION:g}; expect decoding error to grow with it (prefer FR when (s+1) | n)",
            RuntimeWarning,
            stacklevel=2,
        )
    supports = [sorted((i + k) % n for k in range(s + 1)) for i in range(n)]
    return GradientCode(
        B, s, supports=supports, name="cyclic_repetition", seed=used_seed, worst_condition=worst
    )


def default_code(n: int, s: int, seed: int = 0) -> GradientCode:
    """Fractional repetition when ``(s + 1) | n`` (exact 0/1 decoding, §5.4), else cyclic repetition."""
    return fractional_repetition(n, s) if n % (s + 1) == 0 else cyclic_repetition(n, s, seed=seed)
