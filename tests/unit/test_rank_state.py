"""Per-rank compressor state that cannot be mixed up, and resumes that are bit-exact under DDP.

On 2 real gloo ranks:

* loading rank 0's state on rank 1 (same world size) raises ``ValueError`` naming both ranks, and
  ``load_own_state`` refuses a list that is partial or out of order;
* kill and resume: train ``CUT`` steps, save, end the processes, start new ones with a new process
  group and a new DDP model, load, train on. The resumed parameters equal the uninterrupted run's
  bit for bit, for QSGD and Rand-k saved per rank (each rank its own ``state_dict``) and for
  PowerSGD, Top-k/EF21 and QSGD saved as Accelerate does (one process writes the list that
  ``gather_state_dicts`` returned; every rank restores its own entry with ``load_own_state``).

The model registers its layers in another order than backward reaches them, and DDP's buckets are
small, so the order in which DDP hands the gradients over on a fresh start differs from the order
after its bucket rebuild: QSGD noise drawn from one stream per device (as gradwire did before)
fails the resume test; drawn per (seed, rank, tensor key, step) it passes.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import gather_state_dicts, load_own_state, make_hook, make_reducer
from tests.ranks import run_ranks

pytestmark = pytest.mark.multiprocess

#: label -> (compressor, params, how the state is saved)
CONFIGS: dict[str, tuple[str, dict, str]] = {
    "qsgd-ef": ("qsgd", {"feedback": "ef", "levels": 4, "bucket_size": 64}, "per-rank"),
    "qsgd": ("qsgd", {"levels": 4, "bucket_size": 64}, "per-rank"),
    "randk-ef": ("randk", {"ratio": 0.2}, "per-rank"),
    "randk-scaled": ("randk", {"ratio": 0.2, "scale": True, "feedback": "none"}, "per-rank"),
    "powersgd": ("powersgd", {"rank": 2}, "gathered"),
    "topk-ef21": ("topk", {"ratio": 0.1, "feedback": "ef21"}, "gathered"),
    "qsgd-ef-gathered": ("qsgd", {"feedback": "ef", "levels": 4, "bucket_size": 64}, "gathered"),
}
CUT, STEPS = 3, 6


class Shuffled(nn.Module):
    """Layers registered mid, stem, head; forward uses stem, mid, head; backward meets them in
    the reverse order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mid = nn.Linear(48, 32)
        self.stem = nn.Linear(16, 48)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7919 * rank + step)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


class _Orders:
    """Hook state wrapper that records, per step, the parameter shapes of each bucket handed over."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, []


def _recording(hook):
    def recording_hook(rec, bucket):
        rec.steps[-1].append(tuple(tuple(p.shape) for p in bucket.parameters()))
        return hook(rec.inner, bucket)

    return recording_hook


def _train(rank: int, label: str, steps: range, load_from: str | None, save_to: str | None) -> dict:
    name, params, how = CONFIGS[label]
    module = Shuffled()
    opt_state = None
    if load_from is not None:
        saved = torch.load(os.path.join(load_from, f"train-{rank}.pt" if how == "per-rank" else "train.pt"))
        module.load_state_dict(saved["model"][label])
        opt_state = saved["optimizer"][label]
    ddp = DDP(module, bucket_cap_mb=0.001)
    state, hook = make_hook(name, **params)
    if load_from is not None:
        if how == "per-rank":
            state.load_state_dict(torch.load(os.path.join(load_from, f"compressor-{label}-{rank}.pt")))
        else:  # one file, written by rank 0, holds every rank's state
            load_own_state(state, torch.load(os.path.join(load_from, f"compressor-{label}.pt")))
    rec = _Orders(state)
    ddp.register_comm_hook(rec, _recording(hook))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad(set_to_none=True)
        rec.steps.append([])
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    out = {"params": [p.detach().clone() for p in module.parameters()], "orders": rec.steps}
    if save_to is not None:
        if how == "per-rank":
            torch.save(state.state_dict(), os.path.join(save_to, f"compressor-{label}-{rank}.pt"))
        else:
            states = gather_state_dicts(state)  # a collective: every rank calls it
            out["gathered"] = states
            if rank == 0:  # as Accelerate's save_state: the main process writes
                torch.save(states, os.path.join(save_to, f"compressor-{label}.pt"))
        out["model"], out["optimizer"] = module.state_dict(), opt.state_dict()
    return out


def _phase(rank: int, world: int, phase: str, folder: str) -> dict:
    out = {}
    for label in CONFIGS:
        if phase == "straight":
            out[label] = _train(rank, label, range(STEPS), None, None)
        elif phase == "first":
            out[label] = _train(rank, label, range(CUT), None, folder)
        else:
            out[label] = _train(rank, label, range(CUT, STEPS), folder, None)
    if phase == "first":  # model and optimizer: every rank's own file, and rank 0's for the gathered
        saved = {"model": {k: v.pop("model") for k, v in out.items()},
                 "optimizer": {k: v.pop("optimizer") for k, v in out.items()}}
        torch.save(saved, os.path.join(folder, f"train-{rank}.pt"))
        if rank == 0:
            torch.save(saved, os.path.join(folder, "train.pt"))
    return out


@functools.cache
def _runs(folder: str) -> dict:
    """Each phase in processes of its own: nothing survives from one to the next but the files."""
    phases = ("straight", "first", "rest")
    return {phase: run_ranks(_phase, 2, phase, folder, timeout=300) for phase in phases}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return _runs(str(tmp_path_factory.mktemp("resume")))


def _assert_resumed(runs: dict, label: str) -> None:
    for rank in (0, 1):
        straight = runs["straight"][rank][label]["params"]
        resumed = runs["rest"][rank][label]["params"]
        first = runs["first"][rank][label]["params"]
        assert not torch.equal(first[0], resumed[0])  # the resumed run did train on
        for a, b in zip(straight, resumed):
            assert torch.equal(a, b), f"{label}: rank {rank} resumed differs from the uninterrupted run"


def _matrices(step: list) -> list:
    return [shape for bucket in step for shape in bucket if len(shape) == 2]


def test_bucket_order_changes_between_a_fresh_start_and_the_rebuild(runs) -> None:
    # the premise of the resume tests: on a fresh start DDP hands the matrices (what QSGD encodes)
    # over in another order than after its bucket rebuild (here: one bucket in registration order,
    # then two in gradient-ready order), and a resumed run starts fresh
    orders = runs["straight"][0]["qsgd"]["orders"]
    resumed = runs["rest"][0]["qsgd"]["orders"]
    assert len(orders) == STEPS and len(resumed) == STEPS - CUT
    assert _matrices(orders[0]) != _matrices(orders[CUT]) and resumed[0] == orders[0]


@pytest.mark.parametrize("label", ["qsgd-ef", "qsgd", "randk-ef", "randk-scaled"])
def test_kill_and_resume_per_rank_state_is_bit_exact(runs, label: str) -> None:
    _assert_resumed(runs, label)


@pytest.mark.parametrize("label", ["powersgd", "topk-ef21", "qsgd-ef-gathered"])
def test_gathered_state_restores_every_rank_bit_exact(runs, label: str) -> None:
    zero, one = runs["first"][0][label]["gathered"], runs["first"][1][label]["gathered"]
    assert [s["rank"] for s in zero] == [0, 1]
    for a, b in zip(zero, one):  # every rank got the same list
        assert a["step"] == b["step"] == CUT and a["feedback"].keys() == b["feedback"].keys()
    # the ranks' own buffers differ, so restoring rank 0's everywhere would not give these results
    buffer = {"powersgd": "e", "topk-ef21": "g_i", "qsgd-ef-gathered": "e"}[label]
    mine, theirs = zero[0]["feedback"], zero[1]["feedback"]
    assert any(not torch.equal(mine[k][buffer], theirs[k][buffer]) for k in mine)
    assert all(t.device.type == "cpu" for s in zero for b in s["feedback"].values() for t in b.values())
    _assert_resumed(runs, label)


# --- refusals --------------------------------------------------------------------------------------


def _mix_up(rank: int, world: int) -> dict:
    r = make_reducer("topk", ratio=0.2, feedback="ef21")
    for step in range(2):
        r.reduce([torch.randn(10, 8, generator=torch.Generator().manual_seed(rank * 10 + step))])
    states = gather_state_dicts(r)
    out = {}
    for label, attempt in (
        ("other rank", lambda: r.load_state_dict(states[1 - rank])),
        ("partial", lambda: load_own_state(r, states[:1])),
        ("reversed", lambda: load_own_state(r, states[::-1])),
        ("not a list", lambda: load_own_state(r, states[0])),
    ):
        try:
            attempt()
            out[label] = None
        except (ValueError, TypeError) as err:
            out[label] = f"{type(err).__name__}: {err}"
    before = r.feedback.state[0]["g_i"].clone()
    load_own_state(r, states)  # its own entry: accepted, and the same buffers
    out["own"] = torch.equal(r.feedback.state[0]["g_i"], before)
    return out


def test_another_ranks_state_is_refused_naming_both_ranks() -> None:
    for rank, got in enumerate(run_ranks(_mix_up, 2, timeout=200)):
        message = got["other rank"]
        assert message.startswith("ValueError") and f"rank {1 - rank} of 2" in message
        assert f"this is rank {rank}" in message
        assert "1 of the 2 ranks" in got["partial"]
        assert "states[0] is rank 1 of 2" in got["reversed"]
        assert got["not a list"].startswith("TypeError")
        assert got["own"]


def test_different_world_size_goes_through_the_shared_state() -> None:
    states, _ = run_ranks(_gathered_ef21, 2, timeout=200)
    one = make_reducer("topk", ratio=0.2, feedback="ef21")
    load_own_state(one, states)  # this process is a group of one
    assert one.step == 2
    for key, buffers in one.feedback.state.items():
        assert torch.equal(buffers["g"], states[0]["feedback"][key]["g"])
        assert torch.equal(buffers["g_i"], buffers["g"])  # rebuilt from the shared estimate


def _gathered_ef21(rank: int, world: int) -> list:
    r = make_reducer("topk", ratio=0.2, feedback="ef21")
    for step in range(2):
        r.reduce([torch.randn(10, 8, generator=torch.Generator().manual_seed(rank * 10 + step))])
    return gather_state_dicts(r)
