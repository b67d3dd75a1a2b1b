"""Gradient codes (Tandon et al. 2017; docs/algorithms.md §5): exact decoding for every straggler set.

Oracle: messages ``m_i = Σ_j B_ij g_j`` from random partition gradients; for every
survivor set, ``Σ a_i m_i`` must equal ``Σ_j g_j``.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from gradwire.compressors.coding import (
    GradientCode,
    UndecodableError,
    cyclic_repetition,
    fractional_repetition,
)
from gradwire.compressors.coding.constructions import TARGET_CONDITION

D = 16  # gradient length
ALL_CR = [(n, s) for n in range(1, 9) for s in range(n)]
ALL_FR = [(n, s) for n, s in ALL_CR if n % (s + 1) == 0]


def make_code(kind: str, n: int, s: int) -> GradientCode:
    return fractional_repetition(n, s) if kind == "fr" else cyclic_repetition(n, s, seed=n * 100 + s)


def partition_gradients(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def decoded(code: GradientCode, survivors: list[int], messages: torch.Tensor) -> torch.Tensor:
    """Σ a_k m_{survivors[k]} in float64 (messages may be float32)."""
    a = code.decode(survivors)
    assert a.dtype == torch.float64 and a.shape == (len(survivors),)
    return a @ messages[survivors].to(torch.float64)


@pytest.mark.parametrize(("kind", "n", "s"), [("fr", *p) for p in ALL_FR] + [("cr", *p) for p in ALL_CR])
def test_every_survivor_set_of_size_n_minus_s_decodes(kind: str, n: int, s: int) -> None:
    """For EVERY F with |F| = n − s: float64 messages within 1e-10, float32 messages within 1e-5."""
    code = make_code(kind, n, s)
    g = partition_gradients(n, seed=7 * n + s)
    full = g.sum(dim=0)
    m64 = code.B @ g
    m32 = m64.to(torch.float32)
    checked = 0
    for survivors in itertools.combinations(range(n), n - s):
        survivors = list(survivors)
        assert relative_error(decoded(code, survivors, m64), full) < 1e-10
        assert relative_error(decoded(code, survivors, m32), full) < 1e-5
        checked += 1
    assert checked == len(list(itertools.combinations(range(n), s)))


@pytest.mark.parametrize(("kind", "n", "s"), [("fr", *p) for p in ALL_FR] + [("cr", *p) for p in ALL_CR])
def test_more_survivors_decode_and_fewer_raise(kind: str, n: int, s: int) -> None:
    code = make_code(kind, n, s)
    g = partition_gradients(n, seed=11 * n + s)
    full = g.sum(dim=0)
    messages = code.B @ g
    for size in range(n - s + 1, n + 1):  # every larger survivor set
        for survivors in itertools.combinations(range(n), size):
            assert relative_error(decoded(code, list(survivors), messages), full) < 1e-10
    for size in range(n - s):  # every smaller one (sizes 0 … n − s − 1), capped
        for survivors in itertools.islice(itertools.combinations(range(n), size), 20):
            with pytest.raises(UndecodableError, match=f"need at least n - s = {n - s}"):
                code.decode(list(survivors))


def test_fractional_repetition_structure_and_exact_zero_one_decoding() -> None:
    code = fractional_repetition(6, 2)
    blocks = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).to(torch.float64)
    assert torch.equal(code.B, blocks)
    assert code.partitions(4) == [3, 4, 5]
    assert code.encode_weights(1) == {0: 1.0, 1: 1.0, 2: 1.0}
    assert code.load == Fraction(1, 2)
    # survivors given out of order, more than n − s: lowest-indexed member of each group gets 1
    a = code.decode([5, 2, 4, 1, 0])
    assert a.tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    # exact: the float32 sum equals the group sums added in float32
    g = partition_gradients(6, seed=3).to(torch.float32)
    m = code.B.to(torch.float32) @ g
    assert torch.equal(m[1] + m[3], (g[0] + g[1] + g[2]) + (g[3] + g[4] + g[5]))


@pytest.mark.parametrize(("n", "s"), [(5, 2), (7, 3), (8, 4), (6, 5), (4, 0)])
def test_cyclic_repetition_structure(n: int, s: int) -> None:
    code = cyclic_repetition(n, s, seed=1)
    assert code.B.dtype == torch.float64 and code.B.shape == (n, n)
    assert code.load == Fraction(s + 1, n)
    for i in range(n):
        cyclic = sorted((i + k) % n for k in range(s + 1))
        assert code.partitions(i) == cyclic
        assert code.B[i, i] == 1.0
        off_support = [j for j in range(n) if j not in cyclic]
        assert torch.count_nonzero(code.B[i, off_support]) == 0
        assert code.encode_weights(i) == {j: float(code.B[i, j]) for j in cyclic}
    # every row lies in one (n − s)-dimensional space that contains the all-ones vector
    assert int(torch.linalg.matrix_rank(code.B)) == n - s
    with_ones = torch.cat([code.B, torch.ones(1, n, dtype=torch.float64)])
    assert int(torch.linalg.matrix_rank(with_ones)) == n - s


def test_cyclic_repetition_is_seeded_and_conditioning_is_checked() -> None:
    assert torch.equal(cyclic_repetition(7, 3, seed=5).B, cyclic_repetition(7, 3, seed=5).B)
    assert not torch.equal(cyclic_repetition(7, 3, seed=5).B, cyclic_repetition(7, 3, seed=6).B)
    for n, s in ALL_CR:
        code = cyclic_repetition(n, s, seed=n * 100 + s)
        assert code.worst_condition is not None and code.worst_condition <= TARGET_CONDITION
        assert code.seed is not None and code.seed >= n * 100 + s


def test_all_ones_when_s_is_n_minus_one() -> None:
    code = cyclic_repetition(5, 4)
    assert torch.allclose(code.B, torch.ones(5, 5, dtype=torch.float64), atol=1e-12)
    for worker in range(5):
        assert torch.allclose(code.decode([worker]), torch.ones(1, dtype=torch.float64))


def test_worked_example_of_algorithms_md() -> None:
    """n = 3, s = 1: B = [[1/2, 1, 0], [0, 1, −1], [1/2, 0, 1]] (docs/algorithms.md §5.3)."""
    code = GradientCode.from_matrix([[0.5, 1.0, 0.0], [0.0, 1.0, -1.0], [0.5, 0.0, 1.0]], s=1)
    assert code.partitions(0) == [0, 1] and code.partitions(1) == [1, 2] and code.partitions(2) == [0, 2]
    assert code.load == Fraction(2, 3)
    expected = {(0, 1): [2.0, -1.0], (0, 2): [1.0, 1.0], (1, 2): [1.0, 2.0]}
    g = partition_gradients(3, seed=0)
    messages = code.B @ g
    for survivors, coefficients in expected.items():
        a = code.decode(list(survivors))
        assert torch.allclose(a, torch.tensor(coefficients, dtype=torch.float64), atol=1e-12)
        assert relative_error(a @ messages[list(survivors)], g.sum(0)) < 1e-12
    # coefficients follow the order the survivors are given in
    assert torch.allclose(code.decode([1, 0]), torch.tensor([-1.0, 2.0], dtype=torch.float64))


def test_decode_is_cached_and_returns_a_fresh_tensor() -> None:
    code = cyclic_repetition(6, 2, seed=0)
    first = code.decode([0, 2, 3, 5])
    first += 100.0  # must not poison the cache
    again = code.decode([0, 2, 3, 5])
    assert not torch.equal(first, again)
    assert torch.equal(code.decode([5, 3, 2, 0]), again.flip(0))
    assert code.residual([0, 2, 3, 5], again) < 1e-12


def test_combine_helper() -> None:
    code = cyclic_repetition(5, 2, seed=0)
    g = partition_gradients(5, seed=1)
    messages = code.B @ g
    got = code.combine([4, 0, 2], [messages[4], messages[0], messages[2]])
    assert relative_error(got, g.sum(0)) < 1e-10
    with pytest.raises(ValueError, match="3 messages for 2 survivors"):
        code.combine([0, 1], [messages[0]] * 3)


def test_matrix_that_cannot_decode_raises_with_the_residual() -> None:
    code = GradientCode.from_matrix(torch.eye(3), s=1)  # identity does not tolerate a straggler
    with pytest.raises(UndecodableError, match="residual"):
        code.decode([0, 1])
    assert torch.equal(code.decode([0, 1, 2]), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: cyclic_repetition(4, 4), "need s < n"),
        (lambda: cyclic_repetition(4, 7), "need s < n"),
        (lambda: cyclic_repetition(4, -1), "s must be >= 0"),
        (lambda: cyclic_repetition(0, 0), "at least one worker"),
        (lambda: cyclic_repetition(4, 1, seed=-3), "seed must be a non-negative int"),
        (lambda: fractional_repetition(6, 3), r"\(s \+ 1\) to divide n; got n=6, s=3"),
        (lambda: fractional_repetition(3, 3), "need s < n"),
        (lambda: fractional_repetition(4.0, 1), "n must be an int"),
        (lambda: GradientCode.from_matrix(torch.ones(2, 3), s=0), "must be square"),
        (lambda: GradientCode.from_matrix(torch.full((2, 2), float("nan")), s=0), "non-finite"),
    ],
)
def test_impossible_parameters_raise_value_error(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_survivor_ids_raise_value_error() -> None:
    code = cyclic_repetition(5, 1, seed=0)
    with pytest.raises(ValueError, match=r"survivor ids \[5\] out of range for n=5"):
        code.decode([0, 1, 2, 5])
    with pytest.raises(ValueError, match=r"out of range"):
        code.decode([-1, 0, 1, 2])
    with pytest.raises(ValueError, match=r"must be distinct; repeated: \[1\]"):
        code.decode([0, 1, 1, 2])
    with pytest.raises(ValueError, match="worker 9 out of range"):
        code.partitions(9)
    with pytest.raises(UndecodableError):
        code.decode([0, 1])
    assert issubclass(UndecodableError, ValueError)
