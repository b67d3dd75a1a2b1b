"""A hook state built before ``init_process_group``, and one that went through pickle.

Lightning's documented path, ``DDPStrategy(ddp_comm_state=state, ddp_comm_hook=hook)``, builds the
state before the process group exists; with ``start_method="spawn"`` it also pickles it to the
workers. On 2 real gloo ranks with different data per rank:

* a state made before ``init_process_group`` (PowerSGD, Top-k with EF21, and with ``overlap=True``)
  binds at the hook's first call: the ranks stay bit-identical, bytes go on the wire, and the run
  equals one whose state was made after ``init_process_group``, bit for bit;
* a state made in the parent process and pickled into spawned workers does the same;
* ``pickle`` and ``torch.save`` round trips of a trained state, continued on a new DDP model,
  give the uninterrupted run bit for bit.
"""

from __future__ import annotations

import copy as copy_module
import io
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook
from gradwire.compressors.communicator import ProcessGroupMismatch
from tests.ranks import run_ranks

pytestmark = pytest.mark.multiprocess

CONFIGS: dict[str, tuple[str, dict]] = {
    "powersgd": ("powersgd", {"rank": 2}),
    "topk-ef21": ("topk", {"ratio": 0.1, "feedback": "ef21"}),
    "powersgd-overlap": ("powersgd", {"rank": 2, "overlap": True}),
    "topk-ef21-overlap": ("topk", {"ratio": 0.1, "feedback": "ef21", "overlap": True}),
}
STEPS = 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data
    return torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def _train(rank: int, state, hook, steps: range, module: nn.Module | None = None, opt_state=None) -> dict:
    ddp = DDP(module if module is not None else _model(), bucket_cap_mb=0.005)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    state.close()
    return {
        "params": [p.detach().clone() for p in ddp.parameters()],
        "module": ddp.module,
        "opt": opt.state_dict(),
        "stats": state.stats(),
    }


# --- built before init_process_group ----------------------------------------------------------------


def _before_init(rank: int, world: int, tmp: str) -> dict:
    out: dict = {}
    for label, (name, params) in CONFIGS.items():  # the reference: made with the group in place
        state, hook = make_hook(name, **params)
        got = _train(rank, state, hook, range(STEPS))
        out[label, "after"] = {"params": got["params"], "stats": got["stats"]}
    # as Lightning does: the states exist before the process group does
    dist.destroy_process_group()
    early = {label: make_hook(name, **params) for label, (name, params) in CONFIGS.items()}
    out["bound before init"] = [s.reducer.comm.bound for s, _ in early.values()]
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    for label, (state, hook) in early.items():
        got = _train(rank, state, hook, range(STEPS))
        out[label, "before"] = {"params": got["params"], "stats": got["stats"]}
    return out


def _spawned(rank: int, world: int, states: dict | None) -> dict:
    # ``states`` were made in the parent process and pickled to this one by mp.spawn (None: make
    # them here, after init_process_group, for the reference run)
    if states is None:
        states = {label: make_hook(name, **params) for label, (name, params) in CONFIGS.items()}
    out = {}
    for label, (state, hook) in states.items():
        got = _train(rank, state, hook, range(STEPS))
        out[label] = {"params": got["params"], "stats": got["stats"]}
    return out


def _assert_same_run(zero: dict, one: dict, reference: dict | None) -> None:
    for a, b in zip(zero["params"], one["params"]):
        assert torch.equal(a, b), "the ranks drifted apart"
    for got in (zero, one):
        assert got["stats"]["bytes_sent"] > 0 and got["stats"]["steps"] == STEPS
        assert got["stats"]["bytes_sent"] < got["stats"]["bytes_uncompressed"]
        if reference is not None:
            assert all(torch.equal(a, b) for a, b in zip(got["params"], reference["params"]))


def test_state_made_before_init_process_group_binds_at_first_use(tmp_path) -> None:
    zero, one = run_ranks(_before_init, 2, str(tmp_path), timeout=300)
    assert zero["bound before init"] == [False] * len(CONFIGS)
    for label in CONFIGS:
        _assert_same_run(zero[label, "before"], one[label, "before"], None)
        # and it is the same run as with the state made after init_process_group
        for got in (zero, one):
            for a, b in zip(got[label, "before"]["params"], got[label, "after"]["params"]):
                assert torch.equal(a, b), label
        assert zero[label, "before"]["stats"]["bytes_sent"] == zero[label, "after"]["stats"]["bytes_sent"]
        assert zero[label, "before"]["stats"]["overlap"] == float(label.endswith("overlap"))


def test_state_pickled_into_spawned_workers_binds_there() -> None:
    states = {label: make_hook(name, **params) for label, (name, params) in CONFIGS.items()}
    assert not any(s.reducer.comm.bound for s, _ in states.values())  # no group in this process
    zero, one = run_ranks(_spawned, 2, states, timeout=300)
    reference, _ = run_ranks(_spawned, 2, None, timeout=300)
    for label in CONFIGS:
        _assert_same_run(zero[label], one[label], reference[label])


# --- pickle round trips -----------------------------------------------------------------------------


def _through_torch_save(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _round_trips(rank: int, world: int) -> dict:
    out: dict = {}
    cut = 3
    for label, (name, params) in CONFIGS.items():
        state, hook = make_hook(name, **params)
        straight = _train(rank, state, hook, range(STEPS))
        state, hook = make_hook(name, **params)
        first = _train(rank, state, hook, range(cut))
        for how, copy in (
            ("pickle", pickle.loads(pickle.dumps(state))),
            ("torch.save", _through_torch_save(state)),
        ):
            module = _model()
            module.load_state_dict(first["module"].state_dict())
            # (a deep copy: SGD's load_state_dict keeps the momentum tensors it is given)
            rest = _train(rank, copy, hook, range(cut, STEPS), module, copy_module.deepcopy(first["opt"]))
            out[label, how] = {
                "same": all(torch.equal(a, b) for a, b in zip(straight["params"], rest["params"])),
                "steps": rest["stats"]["steps"],
                "moved": not torch.equal(first["params"][0], rest["params"][0]),
            }
        dist.barrier()
    # a copy of another rank's state refuses to bind here
    state, hook = make_hook("topk", ratio=0.1, feedback="ef21")
    _train(rank, state, hook, range(2))
    theirs = [None] * world
    dist.all_gather_object(theirs, pickle.dumps(state))
    try:
        _train(rank, pickle.loads(theirs[1 - rank]), hook, range(2, 3))
    except Exception as err:  # raised by the hook inside backward: the message is the point
        out["other rank"] = f"{type(err).__name__}: {err}"
    return out


def test_pickled_state_continues_bit_for_bit() -> None:
    for rank, got in enumerate(run_ranks(_round_trips, 2, timeout=300)):
        for label in CONFIGS:
            for how in ("pickle", "torch.save"):
                result = got[label, how]
                assert result["moved"] and result["steps"] == STEPS, (label, how)
                assert result["same"], f"{label} after a {how} round trip differs from the uninterrupted run"
        message = got["other rank"]
        assert f"made on rank {1 - rank} of 2" in message and f"on rank {rank} of 2" in message


def test_explicit_process_group_does_not_travel_silently() -> None:
    run_ranks(_explicit_group, 2, timeout=200)


def _explicit_group(rank: int, world: int) -> None:
    solo = dist.new_group([0])
    if rank != 0:
        return
    state, _ = make_hook("topk", ratio=0.5, process_group=solo)
    state.reducer.reduce([torch.randn(4, 4)])
    copy = pickle.loads(pickle.dumps(state))
    with pytest.raises(ProcessGroupMismatch, match=r"explicit process group of ranks \[0\]"):
        copy.reducer.reduce([torch.randn(4, 4)])
    copy.set_process_group(solo)  # given again, it binds and runs
    assert len(copy.reducer.reduce([torch.randn(4, 4)])) == 1
