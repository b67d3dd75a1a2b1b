"""PowerSGD under DDP on 2 real gloo ranks, in the cases where a gradient is exactly low rank
or exactly zero.

* torch's own identity check for comm hooks: every gradient is 0.25·ones (rank 1), so the
  reduced gradient must be 0.25 — at r = 1, 2 and 4, for three steps (warm start and error
  feedback included);
* LoRA: a linear layer with frozen W and adapters A (random) and B (zeros). B = 0 makes A's
  gradient exactly zero at step 1; A must still start moving right after, as it does with
  uncompressed training. With r = 2 every adapter matrix is within PowerSGD's rank, so A and
  B must follow the uncompressed trajectory to float rounding; with r = 1 A must move too;
* a branch DDP finds unused at step 1 (``find_unused_parameters=True``: its bucket entries are
  zeros) must train from step 2 on and follow the uncompressed trajectory.

All scenarios run in one pair of rank processes (module fixture); each test checks one.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook
from tests.ranks import run_ranks

pytestmark = pytest.mark.multiprocess

STEPS = 6
RUNS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "powersgd-2": ("powersgd", {"rank": 2, "min_compression_rate": 0}),
    "powersgd-1": ("powersgd", {"rank": 1, "min_compression_rate": 0}),
}


class Constant(nn.Module):
    """torch's hook test model (a 2×2 parameter, output ``p + x``, loss its mean) plus a larger
    matrix and a conv-shaped tensor whose gradients are also 0.25 everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(2, 2))
        self.wide = nn.Parameter(torch.ones(24, 40))
        self.conv = nn.Parameter(torch.ones(6, 4, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.p + x).mean() + 0.25 * self.wide.sum() + 0.25 * self.conv.sum()


def _identity(rank: int) -> dict[int, list[list[torch.Tensor]]]:
    grads: dict[int, list[list[torch.Tensor]]] = {}
    for r in (1, 2, 4):
        model = DDP(Constant())
        state, hook = make_hook("powersgd", rank=r, min_compression_rate=0)
        model.register_comm_hook(state, hook)
        grads[r] = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(torch.ones(2, 2)).backward()
            grads[r].append([p.grad.clone() for p in model.parameters()])
    return grads


class LoRALinear(nn.Module):
    def __init__(self, d_in: int = 16, d_out: int = 12, r: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(d_out, d_in, generator=gen) / 4, requires_grad=False)
        self.A = nn.Parameter(torch.randn(r, d_in, generator=gen) / 4)
        self.B = nn.Parameter(torch.zeros(d_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + (x @ self.A.T) @ self.B.T


def _lora(rank: int, name: str, params: dict) -> dict[str, list[torch.Tensor]]:
    model = DDP(LoRALinear())
    if name != "none":
        state, hook = make_hook(name, **params)
        model.register_comm_hook(state, hook)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    teacher = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(100 + rank)
    trail: dict[str, list[torch.Tensor]] = {"A": [model.module.A.detach().clone()], "B": []}
    for _ in range(STEPS):
        x = torch.randn(8, 16, generator=data)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), x @ teacher.T).backward()
        opt.step()
        trail["A"].append(model.module.A.detach().clone())
        trail["B"].append(model.module.B.detach().clone())
    return trail


class TwoHeads(nn.Module):
    """A frozen trunk and two heads; head ``b`` is used only from step 2 on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(8, 16)
        self.trunk.requires_grad_(False)
        self.a = nn.Linear(16, 2)
        self.b = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.relu(self.trunk(x))
        return self.a(h) + self.b(h) if use_b else self.a(h)


def _unused(rank: int, name: str, params: dict) -> list[torch.Tensor]:
    model = DDP(TwoHeads(), find_unused_parameters=True)
    if name != "none":
        state, hook = make_hook(name, **params)
        model.register_comm_hook(state, hook)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    data = torch.Generator().manual_seed(200 + rank)
    trail = [model.module.b.weight.detach().clone()]
    for step in range(STEPS):
        x, y = torch.randn(8, 8, generator=data), torch.randn(8, 2, generator=data)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x, use_b=step > 0), y).backward()
        opt.step()
        trail.append(model.module.b.weight.detach().clone())
    return trail


def _all_cases(rank: int, world: int) -> dict:
    return {
        "identity": _identity(rank),
        "lora": {label: _lora(rank, *run) for label, run in RUNS.items()},
        "unused": {label: _unused(rank, *run) for label, run in RUNS.items()},
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_all_cases, 2, timeout=240)


def test_constant_gradient_reduces_to_itself(ranks: list[dict]) -> None:
    for result in ranks:
        for r, steps in result["identity"].items():
            for grads in steps:
                for g in grads:
                    torch.testing.assert_close(
                        g, torch.full_like(g, 0.25), rtol=0, atol=1e-6, msg=lambda m, r=r: f"r={r}: {m}"
                    )


def _moved(trail: list[torch.Tensor]) -> float:
    return (trail[-1] - trail[0]).norm().item()


def test_lora_adapter_a_moves_after_its_zero_first_gradient(ranks: list[dict]) -> None:
    for result in ranks:
        lora = result["lora"]
        plain = lora["none"]["A"]
        assert torch.equal(plain[1], plain[0])  # the bug scenario: A's step-1 gradient is exactly zero
        assert _moved(plain) > 0.05
        for label in ("powersgd-2", "powersgd-1"):
            trail = lora[label]["A"]
            assert torch.equal(trail[1], trail[0])
            assert _moved(trail[:3]) > 0.2 * _moved(plain[:3]), f"{label}: A barely moved in 2 steps"
        # r = 2 covers every adapter matrix: the uncompressed trajectory, to float rounding
        for a, b in zip(lora["powersgd-2"]["A"] + lora["powersgd-2"]["B"], plain + lora["none"]["B"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # rank 1: a different, but aligned, path
        da, db = (lora["powersgd-1"]["A"][-1] - plain[0]), (plain[-1] - plain[0])
        assert torch.nn.functional.cosine_similarity(da.reshape(1, -1), db.reshape(1, -1)).item() > 0.5
    for a, b in zip(ranks[0]["lora"]["powersgd-1"]["A"], ranks[1]["lora"]["powersgd-1"]["A"]):
        assert torch.equal(a, b)


def test_branch_unused_at_step_one_still_trains(ranks: list[dict]) -> None:
    for result in ranks:
        unused = result["unused"]
        plain = unused["none"]
        assert torch.equal(plain[1], plain[0]) and _moved(plain) > 0.05
        for label in ("powersgd-2", "powersgd-1"):
            trail = unused[label]
            assert torch.equal(trail[1], trail[0])
            assert _moved(trail) > 0.3 * _moved(plain), f"{label}: the branch barely trained"
        for a, b in zip(unused["powersgd-2"], plain):  # 2×16 heads: within rank 2, so exact
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
