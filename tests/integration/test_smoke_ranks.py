import torch

from gradwire.compressors import make_reducer
from tests.ranks import run_ranks


def _mean_of_ranks(rank, world):
    torch.manual_seed(rank)
    t = [torch.randn(16, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    r = make_reducer("none")
    return [x.clone() for x in t], r.reduce(t)


def test_plain_mean_over_two_ranks():
    results = run_ranks(_mean_of_ranks, 2)
    inputs = [r[0] for r in results]
    for j in range(2):
        expected = sum(inp[j] for inp in inputs) / 2
        for _, out in results:
            torch.testing.assert_close(out[j], expected)
