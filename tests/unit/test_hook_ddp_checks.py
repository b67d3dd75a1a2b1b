"""The checks torch runs on its own comm hooks, applied to gradwire's hook on 2 real gloo ranks.

* compressor ``none`` gives hook-less DDP's parameters bit for bit: default settings,
  ``gradient_as_bucket_view``, ``static_graph``, and uneven inputs under ``Join`` (rank 1 runs
  out of batches first and shadows rank 0's collectives with zero gradients);
* every compressor keeps the ranks bit-identical under the same options, and what must be
  shared (PowerSGD's Q, EF21's estimate, the step counter) stays shared under ``Join``;
* a sparse gradient is refused at once, naming the cause ('none' without feedback passes it
  through, as DDP does);
* a state used in a group of another world size, after its group is gone, or first alone and
  then inside a group, refuses with an error that names the cause.
"""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.compressors import make_hook, make_reducer
from gradwire.compressors.communicator import ProcessGroupMismatch
from gradwire.compressors.hook import SparseGradientError
from tests.ranks import run_ranks

pytestmark = pytest.mark.multiprocess

VARIANTS: dict[str, dict] = {
    "default": {},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "static_graph": {"static_graph": True},
    "join": {},  # rank 0: 5 batches, rank 1: 3, under torch.distributed.algorithms.join.Join
}
COMPRESSORS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "none-ef": ("none", {"feedback": "ef"}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "powersgd": ("powersgd", {"rank": 2, "min_compression_rate": 0}),
    "topk-ef": ("topk", {"ratio": 0.1}),
    "topk-ef21": ("topk", {"ratio": 0.1, "feedback": "ef21"}),
    "randk-ef": ("randk", {"ratio": 0.2}),
    "qsgd-ef": ("qsgd", {"feedback": "ef", "levels": 8}),
    "sign-ef": ("sign", {}),
}
STEPS = 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))


def _train(rank: int, variant: str, hook: tuple | None) -> dict:
    ddp = DDP(_model(), bucket_cap_mb=0.002, **VARIANTS[variant])  # a few buckets
    if hook is not None:
        ddp.register_comm_hook(*hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batches = (STEPS if rank == 0 else 3) if variant == "join" else STEPS

    def run() -> None:
        for _ in range(batches):
            x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()

    if variant == "join":
        with Join([ddp]):
            run()
    else:
        run()
    return {"params": [p.detach().clone() for p in ddp.parameters()]}


def _all_runs(rank: int, world: int) -> dict:
    out: dict = {}
    for variant in VARIANTS:
        out[(variant, "ddp")] = _train(rank, variant, None)
        for label, (name, params) in COMPRESSORS.items():
            state, hook = make_hook(name, **params)
            got = _train(rank, variant, (state, hook))
            got["stats"] = state.stats()
            got["state"] = state.state_dict()
            out[(variant, label)] = got
        dist.barrier()
    return out


@functools.cache
def _results() -> tuple[dict, ...]:
    return tuple(run_ranks(_all_runs, 2, timeout=400))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_none_is_hookless_ddp_bit_for_bit(variant: str) -> None:
    for r, ranks in enumerate(_results()):
        ddp, ours = ranks[(variant, "ddp")], ranks[(variant, "none")]
        for a, b in zip(ddp["params"], ours["params"]):
            assert torch.equal(a, b), f"{variant}: rank {r} differs from DDP without a hook"
        assert ours["stats"]["bytes_sent"] == ours["stats"]["bytes_uncompressed"] > 0
    # the runs did train: parameters moved away from the initial ones
    start = list(_model().parameters())
    assert not torch.equal(_results()[0][(variant, "ddp")]["params"][0], start[0].detach())


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("label", list(COMPRESSORS))
def test_every_compressor_keeps_ranks_identical(variant: str, label: str) -> None:
    zero, one = (ranks[(variant, label)] for ranks in _results())
    for a, b in zip(zero["params"], one["params"]):
        assert torch.equal(a, b), f"{label} under {variant}: ranks differ"
    for got in (zero, one):
        # the joined rank shadows the 2 steps it has no data for, so its step counter (which
        # seeds Rand-k's shared positions and QSGD's noise) stays in line with rank 0's
        assert got["stats"]["steps"] == STEPS
        assert got["stats"]["bytes_sent"] > 0
    # what every rank must hold identically stays identical, even for the joined rank
    q0, q1 = (got["state"]["compressor_state"].get("q", {}) for got in (zero, one))
    assert q0.keys() == q1.keys() and all(torch.equal(q0[k], q1[k]) for k in q0)
    if label == "powersgd":
        assert q0
    if label == "topk-ef21":
        f0, f1 = zero["state"]["feedback"], one["state"]["feedback"]
        assert f0 and f0.keys() == f1.keys()
        assert all(torch.equal(f0[k]["g"], f1[k]["g"]) for k in f0)


# --- sparse gradients -------------------------------------------------------------------------------


class _Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(24, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(idx).flatten(1))


def _sparse(rank: int, world: int) -> dict:
    out: dict = {}
    idx = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(rank))
    for label, hook in (
        ("ddp", None),
        ("none", make_hook("none")),
        ("none-ef", make_hook("none", feedback="ef")),
        ("topk", make_hook("topk", ratio=0.1)),
        ("powersgd", make_hook("powersgd")),
    ):
        model = DDP(_Bag())
        if hook is not None:
            model.register_comm_hook(*hook)
        try:
            model(idx).sum().backward()
            grad = model.module.embed.weight.grad
            out[label] = ("ok", grad.to_dense().clone(), hook[0].stats() if hook else None)
        except Exception as err:  # what backward raised is what the test checks
            out[label] = ("raised", f"{type(err).__name__}: {err}", None)
        dist.barrier()
    return out


def test_sparse_gradient_is_refused_at_once_naming_the_cause() -> None:
    for ranks in run_ranks(_sparse, 2, timeout=200):
        for label in ("none-ef", "topk", "powersgd"):
            kind, message, _ = ranks[label]
            assert kind == "raised", label
            assert SparseGradientError.__name__ in message or "sparse gradient" in message
            assert "(50, 8)" in message and "sparse=False" in message, message
        # 'none' without feedback all-reduces the sparse gradient as DDP itself does
        kind, grad, stats = ranks["none"]
        assert kind == "ok" and torch.equal(grad, ranks["ddp"][1])
        assert 0 < stats["bytes_sent"] < stats["bytes_uncompressed"]  # indices and values, not 50x8


# --- a state used in a group it was not made for --------------------------------------------------------


def _misuse(rank: int, world: int, tmp: str) -> dict:
    out: dict = {}
    bound = make_reducer("topk", ratio=0.5, feedback="ef21")
    bound.reduce([torch.randn(6, 4)])
    out["pickled"] = pickle.dumps(bound)
    # 1. the same process group, destroyed under it
    dist.destroy_process_group()
    try:
        bound.reduce([torch.randn(6, 4)])
    except ProcessGroupMismatch as err:
        out["destroyed"] = str(err)
    # 2. used alone (a group of one), then inside a 2-rank group
    alone = make_reducer("topk", ratio=0.5)
    alone.reduce([torch.randn(6, 4)])
    # 3. each rank in a 1-rank group of its own: a state bound to 2 ranks
    dist.init_process_group("gloo", init_method=f"file://{tmp}/solo{rank}", rank=0, world_size=1)
    try:
        bound.reduce([torch.randn(6, 4)])
    except ProcessGroupMismatch as err:
        out["other world"] = str(err)
    try:  # a copy of rank r of 2 unpickled in a group of one
        pickle.loads(out["pickled"]).reduce([torch.randn(6, 4)])
    except ProcessGroupMismatch as err:
        out["unpickled"] = str(err)
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pair", rank=rank, world_size=world)
    try:
        alone.reduce([torch.randn(6, 4)])
    except ProcessGroupMismatch as err:
        out["alone then group"] = str(err)
    return out


def test_state_used_in_another_group_refuses_naming_the_cause(tmp_path) -> None:
    for rank, got in enumerate(run_ranks(_misuse, 2, str(tmp_path), timeout=200)):
        assert "no longer initialised" in got["destroyed"]
        assert f"rank {rank} of a 2-rank" in got["other world"] and "rank 0 of 1" in got["other world"]
        assert f"made on rank {rank} of 2" in got["unpickled"] and "rank 0 of 1" in got["unpickled"]
        assert "group of one" in got["alone then group"] and "2-rank" in got["alone then group"]
        # and in a process with no group at all, the 2-rank state refuses too
        with pytest.raises(ProcessGroupMismatch, match=f"made on rank {rank} of 2"):
            pickle.loads(got["pickled"]).reduce([torch.randn(6, 4)])
