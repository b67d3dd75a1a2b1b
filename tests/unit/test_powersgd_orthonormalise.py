"""PowerSGD's orthonormalisation: the CPU Householder-QR path gives Gram–Schmidt's result.

``orthonormalise`` tries one batched float64 QR first and falls back to the column-by-column
Gram–Schmidt (which drops dependent columns) unless every column is clearly independent. These
tests pin that the fast path returns what the loop returns, that it is taken on full-rank input,
and that rank-deficient, nearly dependent and non-finite inputs still take the loop.
"""

from __future__ import annotations

import pytest
import torch

import gradwire.compressors.powersgd as powersgd
from gradwire.compressors.powersgd import orthonormalise, tolerance


def gram_schmidt(p: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = p.shape[-2]
    x = p.reshape(-1, a, p.shape[-1]).to(torch.float64)
    floor = torch.linalg.vector_norm(x, dim=1, keepdim=True).mul_(tolerance(epsilon, p.dtype, a))
    return powersgd._gram_schmidt(x, floor, p)


@pytest.fixture
def loop_calls(monkeypatch):
    calls = []
    real = powersgd._gram_schmidt

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(powersgd, "_gram_schmidt", counting)
    return calls


@pytest.mark.parametrize("shape", [(1, 512, 8), (3, 64, 8), (2, 1000, 4), (5, 40, 1), (48, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_rank_takes_the_qr_path_and_equals_gram_schmidt(shape, dtype, loop_calls):
    p = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)
    fast, kept = orthonormalise(p, 1e-8)
    assert loop_calls == []  # no fallback on full-rank input
    assert kept.all() and kept.shape == (*p.shape[:-2], p.shape[-1])
    # row-major like the loop's: LAPACK's column-major Q made the later matmuls ~15 ms slower per step
    assert fast.is_contiguous()
    slow, slow_kept = gram_schmidt(p, 1e-8)
    assert torch.equal(kept, slow_kept)
    # same columns, same signs (R_jj > 0, as Gram–Schmidt's), to rounding
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fast, slow, rtol=0, atol=tol)
    eye = torch.eye(p.shape[-1], dtype=torch.float64)
    gram = fast.double().transpose(-1, -2) @ fast.double()
    torch.testing.assert_close(gram, eye.expand_as(gram), rtol=0, atol=tol)


def test_dependent_nearly_dependent_and_nonfinite_inputs_take_the_loop(loop_calls):
    gen = torch.Generator().manual_seed(5)
    u, w = torch.randn(64, 1, generator=gen), torch.randn(64, 1, generator=gen)
    dependent = torch.cat([u, w, 2 * u - w], dim=1)
    _, kept = orthonormalise(dependent, 1e-8)
    assert kept.tolist() == [True, True, False] and len(loop_calls) == 1
    # independent part 2·tol of its norm: kept, but too close to the test for the QR's verdict
    tol = tolerance(1e-3, torch.float32, 64)
    nearly = torch.cat([u, u + 2 * tol * w * u.norm() / w.norm()], dim=1)
    assert orthonormalise(nearly, 1e-3)[1].tolist() == [True, True] and len(loop_calls) == 2
    # one rank-deficient matrix in a batch sends the whole batch through the loop
    batch = torch.stack([torch.randn(64, 3, generator=gen), dependent])
    assert orthonormalise(batch, 1e-8)[1].tolist() == [[True] * 3, [True, True, False]]
    assert len(loop_calls) == 3
    bad = torch.randn(64, 3, generator=gen)
    bad[7, 1] = float("nan")
    out, _ = orthonormalise(bad, 1e-8)
    assert out[:, 1:].isnan().any() and len(loop_calls) == 4  # a NaN still spreads
    zero = torch.zeros(64, 2)
    out, kept = orthonormalise(zero, 1e-8)
    assert kept.tolist() == [False, False] and torch.equal(out, zero)


@pytest.mark.parametrize("r", [1, 2, 4, 5])
def test_low_rank_product_matches_the_batched_matmul(r: int) -> None:
    """Claim: the outer-product sum used on CPU for r <= 4 (and the GEMM above) is P̂ Q'ᵀ."""
    gen = torch.Generator().manual_seed(r)
    p_hat, qt = torch.randn(3, 17, r, generator=gen), torch.randn(3, r, 29, generator=gen)
    out = torch.full((3, 17, 29), float("nan"))
    assert powersgd.low_rank_product(p_hat, qt, out) is out
    torch.testing.assert_close(out, torch.bmm(p_hat, qt), rtol=1e-6, atol=1e-6)
