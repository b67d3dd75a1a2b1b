"""PowerSGD is exact on gradients of rank ≤ r, never keeps a degenerate warm-start Q, and
Top-k keeps exactly ⌈ratio·d⌉ elements.

* Gradients of every rank 1..r (float32, r = 1, 2, 4, 8, several steps with warm start)
  come back with relative error < 1e-5; so does 0.25·ones, at every r. On full-rank
  gradients the output is the rank-r projection ``P̂ P̂ᵀ M`` of the paper's Algorithm 1
  with ``P̂`` from ``torch.linalg.qr`` (the epfml library's orthonormalisation).
* 2 gloo ranks whose gradients are full rank but whose mean has rank ≤ r give that mean,
  and what one process gives on the mean.
* An all-zero first gradient (warm start) followed by random ones gives, bit for bit, what
  a fresh reducer gives on the random ones, and that is not zero. A Q with a NaN or with two
  equal columns (loaded from a state) is redrawn too.
* A Q made from a P̂ that kept every column skips that check, and the outputs are bit for bit
  those of a reducer that checks every step.
* Top-k's budget over a sweep of decimal ratios and sizes equals ``⌈ratio·d⌉`` in integer
  arithmetic, and the reducer keeps that many elements.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradwire.compressors import make_reducer
from gradwire.compressors.powersgd import independent_columns, orthonormalise
from gradwire.compressors.sparse import topk_budget
from tests.ranks import run_ranks

SHAPES = [(48, 40), (40, 48), (16, 4, 3, 3)]


def low_rank(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> torch.Tensor:
    a, b = shape[0], math.prod(shape[1:])
    m = torch.randn(a, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, b, generator=gen, dtype=torch.float64
    )
    return (m / m.norm()).to(torch.float32).reshape(shape)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_gradients_of_rank_up_to_r_come_back_exact(r: int) -> None:
    gen = torch.Generator().manual_seed(r)
    worst = 0.0
    for s in range(1, r + 1):
        reducer = make_reducer("powersgd", rank=r, min_compression_rate=0, feedback="none")
        for _ in range(4):  # warm start: Q comes from the previous gradient
            grads = [low_rank(shape, s, gen) for shape in SHAPES] + [low_rank(SHAPES[0], s, gen)]
            outs = reducer.reduce(grads)
            worst = max(worst, *(rel_err(o, g) for o, g in zip(outs, grads)))
    print(f"r={r}: worst relative error over ranks 1..{r}: {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("r", [1, 2, 3, 4, 8])
def test_constant_gradient_is_exact_at_every_rank(r: int) -> None:
    reducer = make_reducer("powersgd", rank=r, min_compression_rate=0)
    for _ in range(3):
        grads = [torch.full((2, 2), 0.25), torch.full((64, 32), 0.25), torch.full((8, 3, 3, 3), 0.25)]
        for out in reducer.reduce(grads):
            torch.testing.assert_close(out, torch.full_like(out, 0.25), rtol=0, atol=1e-6)


@pytest.mark.parametrize("r", [1, 2, 4])
def test_full_rank_output_is_the_qr_projection_of_the_paper(r: int) -> None:
    gen = torch.Generator().manual_seed(10 + r)
    reducer = make_reducer("powersgd", rank=r, min_compression_rate=0, feedback="none")
    m = torch.randn(48, 40, generator=gen)
    q0 = reducer.compressor._draw(0, 40, r, 0, m)  # the seeded first Q of key 0
    p_hat = torch.linalg.qr(m.double() @ q0.double()).Q
    expected = p_hat @ (p_hat.T @ m.double())
    out = reducer.reduce([m])[0]
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out, m) > 0.1  # a rank-r approximation of a full-rank matrix, not m itself


def test_orthonormalise_drops_dependent_columns_and_keeps_the_rest() -> None:
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(30, 1, generator=gen)
    w = torch.randn(30, 1, generator=gen)
    p = torch.cat([u, 2 * u, w, torch.zeros(30, 1), u - 3 * w], dim=1)
    basis, kept = orthonormalise(p, 1e-8)
    assert kept.tolist() == [True, False, True, False, False]
    assert independent_columns(p, 1e-8).tolist() == kept.tolist()  # the Q check: same test
    assert torch.equal(basis[:, ~kept], torch.zeros(30, 3))
    live = basis[:, kept].double()
    torch.testing.assert_close(live.T @ live, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
    # the kept columns span u and w
    span = live @ live.T
    for v in (u, w):
        torch.testing.assert_close(span @ v.double(), v.double(), rtol=0, atol=1e-5)
    # a larger epsilon is a larger tolerance: a column with a 1e-4 independent part goes
    nearly = torch.cat([u, u + 1e-4 * w * u.norm() / w.norm()], dim=1)
    assert orthonormalise(nearly, 1e-8)[1].tolist() == [True, True]
    assert orthonormalise(nearly, 1e-3)[1].tolist() == [True, False]
    assert independent_columns(nearly, 1e-3).tolist() == [True, False]
    # batched, as PowerSGD calls it: each matrix on its own
    both = torch.stack([p[:, :3], torch.cat([w, u, w], dim=1)])
    assert orthonormalise(both, 1e-8)[1].tolist() == [[True, False, True], [True, True, False]]


@pytest.mark.parametrize("r", [1, 2, 4])
def test_zero_first_gradient_then_random_matches_a_fresh_reducer(r: int) -> None:
    """Claim: after one all-zero step, every output equals (torch.equal) the output of a fresh
    reducer fed the same later gradients, and is non-zero."""
    params = {"rank": r, "min_compression_rate": 0, "warm_start": True}
    zero_first, fresh = make_reducer("powersgd", **params), make_reducer("powersgd", **params)
    shapes = [(64, 32), (64, 32), (16, 4, 3, 3)]
    zero_first.reduce([torch.zeros(s) for s in shapes])
    gen = torch.Generator().manual_seed(r)
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        a, b = zero_first.reduce(grads), fresh.reduce(grads)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
            assert x.norm() > 1.0  # the gradients have norm 20-45; a rank-r part of them


def test_zero_gradient_of_one_tensor_does_not_stop_it_for_good() -> None:
    reducer = make_reducer("powersgd", rank=2, min_compression_rate=0)
    gen = torch.Generator().manual_seed(0)
    reducer.reduce([torch.randn(20, 30, generator=gen), torch.zeros(20, 30)])
    later = torch.randn(20, 30, generator=gen)
    out = reducer.reduce([torch.randn(20, 30, generator=gen), later])[1]
    assert out.norm() > 0.1 * later.norm()


def test_skipping_the_check_of_a_sound_q_changes_no_output() -> None:
    """Claim: outputs are torch.equal to a reducer forced to check its Q every step, over steps that
    mix full-rank, rank-1 (P̂ drops a column) and all-zero gradients; and the skip does happen."""
    params = {"rank": 2, "min_compression_rate": 0}
    skipping, checking = make_reducer("powersgd", **params), make_reducer("powersgd", **params)
    gen = torch.Generator().manual_seed(3)
    shapes = [(64, 32), (64, 32), (16, 4, 3, 3)]
    kinds = ["full", "full", "rank1", "full", "zero", "full", "full"]
    skipped = 0
    for kind in kinds:
        if kind == "full":
            grads = [torch.randn(s, generator=gen) for s in shapes]
        elif kind == "rank1":
            grads = [low_rank(s, 1, gen) for s in shapes]
        else:
            grads = [torch.zeros(s) for s in shapes]
        skipped += len(skipping.compressor._sound)
        checking.compressor._sound.clear()
        for x, y in zip(skipping.reduce(grads), checking.reduce(grads)):
            assert torch.equal(x, y)
    assert skipped > 0


@pytest.mark.parametrize("bad", ["nan", "equal-columns", "zero"])
def test_degenerate_loaded_q_is_redrawn(bad: str) -> None:
    gen = torch.Generator().manual_seed(1)
    saver = make_reducer("powersgd", rank=2, min_compression_rate=0, feedback="none")
    saver.reduce([torch.randn(30, 20, generator=gen)])
    state = saver.state_dict()
    q = state["compressor_state"]["q"][0]
    if bad == "nan":
        q[3, 1] = float("nan")
    elif bad == "equal-columns":
        q[:, 1] = q[:, 0]
    else:
        q.zero_()
    loaded = make_reducer("powersgd", rank=2, min_compression_rate=0, feedback="none")
    loaded.load_state_dict(state)
    m = low_rank((30, 20), 2, gen)
    out = loaded.reduce([m])[0]
    assert rel_err(out, m) < 1e-5  # both columns live: a rank-2 gradient is exact


def _two_ranks_low_rank_mean(rank: int, world: int) -> dict[int, list[torch.Tensor]]:
    outs: dict[int, list[torch.Tensor]] = {}
    for r in (1, 2, 4):
        gen = torch.Generator().manual_seed(7)  # the same on both ranks
        reducer = make_reducer("powersgd", rank=r, min_compression_rate=0, feedback="none")
        outs[r] = []
        for _ in range(3):
            mean = low_rank((48, 40), max(1, r - 1), gen)
            spread = torch.randn(48, 40, generator=gen) * 0.1  # full rank, cancels in the mean
            outs[r].append(reducer.reduce([mean + spread if rank == 0 else mean - spread])[0])
    return outs


@pytest.mark.multiprocess
def test_two_ranks_give_the_low_rank_mean_and_what_one_process_gives() -> None:
    two = run_ranks(_two_ranks_low_rank_mean, 2)
    for r in (1, 2, 4):
        gen = torch.Generator().manual_seed(7)
        one = make_reducer("powersgd", rank=r, min_compression_rate=0, feedback="none")
        for step in range(3):
            mean = low_rank((48, 40), max(1, r - 1), gen)
            torch.randn(48, 40, generator=gen)  # keep the generator in step with the ranks
            single = one.reduce([mean])[0]
            assert torch.equal(two[0][r][step], two[1][r][step])
            assert rel_err(two[0][r][step], mean) < 1e-5
            assert rel_err(two[0][r][step], single) < 1e-5


def exact_ceil(numerator: int, denominator: int, d: int) -> int:
    return -(-numerator * d // denominator)


def test_topk_budget_is_exact_over_a_sweep_of_ratios() -> None:
    ratios = [(i, 100) for i in range(1, 101)] + [(i, 1000) for i in range(1, 1000, 7)]
    ratios += [(1, 3), (2, 3), (1, 7)]  # non-decimal fractions: exact on their float's repr
    differs = 0
    for num, den in ratios:
        ratio = num / den
        # the decimal the float reads as: num/den itself for the decimal ratios
        written = (num, den) if den in (100, 1000) else _decimal(ratio)
        for d in range(1, 1201):
            expected = max(1, min(d, exact_ceil(*written, d)))
            assert topk_budget(d, ratio, None) == expected, (ratio, d)
            differs += expected != max(1, min(d, math.ceil(ratio * d)))
    assert differs > 100  # the float formula gets many of these wrong (0.07·100 → 8)
    assert topk_budget(100, 0.07, None) == 7 and topk_budget(50, 0.14, None) == 7
    assert topk_budget(10, None, 30) == 10 and topk_budget(10, 1e-9, None) == 1


def _decimal(ratio: float) -> tuple[int, int]:
    digits = repr(ratio)
    assert "e" not in digits
    whole, frac = digits.split(".")
    return int(whole + frac), 10 ** len(frac)


@pytest.mark.parametrize(
    ("ratio", "d", "k"), [(0.07, 100, 7), (0.14, 50, 7), (0.17, 300, 51), (0.29, 100, 29)]
)
def test_topk_reducer_keeps_the_exact_budget(ratio: float, d: int, k: int) -> None:
    reducer = make_reducer("topk", ratio=ratio, feedback="none", min_compression_rate=0)
    grad = torch.arange(1, d + 1, dtype=torch.float32).reshape(d // 10, 10)
    out = reducer.reduce([grad])[0]
    assert int((out != 0).sum()) == k
    assert reducer.stats()["bytes_sent"] == 8 * k
