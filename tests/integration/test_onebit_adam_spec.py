"""A job spec with ``optimizer: {name: onebit_adam}`` on two real gloo ranks, through the runtime's own
pieces (no Ray): the optimizer that ``make_optimizer`` builds brings the DDP hook the step registers,
the compressed steps send over 10x fewer bytes than a plain all-reduce, the ranks stay bit-identical,
the LR schedule applies, and a checkpoint saved mid-run (each rank its own optimizer state) continues
bit-exactly like an uninterrupted run, while a group of another size refuses it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradwire.spec import JobSpec
from tests.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS, FREEZE, SAVE_AT = 16, 4, 9

SPEC = {
    "name": "onebit",
    "model": {"name": "mlp"},
    "data": {"dataset": "digits", "batch_size": 32},
    "steps": STEPS,
    "workers": {"count": 2},
    "optimizer": {
        "name": "onebit_adam",
        "lr": 0.01,
        "freeze_step": FREEZE,
        "schedule": "cosine",
        "warmup_steps": 2,
    },
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))


def _batch(rank: int, step: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(32, 64, generator=gen)
    return {rank: (x, (x[:, :10] + x[:, 10:20]).argmax(1))}


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().numpy().tobytes())
    return h.hexdigest()


class _Run:
    """What train_loop builds for the spec: optimizer, the step with the optimizer's hook, LambdaLR."""

    def __init__(self, rank: int, spec: JobSpec) -> None:
        from gradwire.worker.runtime import lr_factor, make_optimizer, per_rank_optimizer
        from gradwire.worker.steps import DdpStep, OptimizerHook

        model = _model()
        self.optimizer = make_optimizer(spec.optimizer, model.parameters(), total_steps=STEPS)
        assert per_rank_optimizer(self.optimizer)
        self.step = DdpStep(
            model,
            spec.run_compression(),
            DDP,
            rank=rank,
            optimizer_hook=OptimizerHook(self.optimizer, spec.optimizer.name),
        )
        factor = lr_factor(spec.optimizer, STEPS)
        self.factor = factor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.rank = rank

    def run(self, start: int, stop: int) -> list[dict]:
        from gradwire.worker.steps import optimizer_step

        out = []
        for step in range(start, stop):
            before = self.step.stats()["bytes_sent"]
            lr = self.optimizer.param_groups[0]["lr"]
            times = self.step(_batch(self.rank, step), step)
            grads = _digest(p.grad for p in self.step.module.parameters())
            backward_bytes = self.step.stats()["bytes_sent"] - before
            optimizer_step(self.optimizer, self.step, times)
            self.scheduler.step()
            out.append(
                {
                    "lr": lr,
                    "grads": grads,
                    "backward_bytes": backward_bytes,
                    "bytes": self.step.stats()["bytes_sent"] - before,
                    "compress_s": times.compress_s,
                    "params": _digest(self.step.module.parameters()),
                    "compressor": self.step.compressor(),
                }
            )
        return out


def _plain_bytes_per_step(rank: int) -> int:
    """bytes_sent of one step of the same model through the gradwire hook with compression none."""
    from gradwire.spec import CompressionSpec
    from gradwire.worker.steps import DdpStep

    step = DdpStep(_model(), CompressionSpec(name="none"), DDP, rank=rank)
    step(_batch(rank, 0), 0)
    first = step.stats()["bytes_sent"]
    step(_batch(rank, 1), 1)
    return step.stats()["bytes_sent"] - first


def _nan_in_the_warm_up(rank: int, spec: JobSpec) -> str:
    """A NaN in rank 1's batch at step 0 (warm-up: the optimizer's hook averages the gradients, so the
    step itself checks the mean, the same on every rank)."""
    from gradwire.worker.steps import NonFiniteStep

    run = _Run(rank, spec)
    batch = _batch(rank, 0)
    if rank == 1:
        x, y = batch[rank]
        x = x.clone()
        x[0, 0] = float("nan")
        batch = {rank: (x, y)}
    try:
        run.step(batch, 0)
    except NonFiniteStep as err:
        return str(err)
    return "not refused"


def _ranks(rank: int, world: int, folder: str) -> dict:
    from gradwire.worker.runtime import load_checkpoint, save_checkpoint

    spec = JobSpec.from_dict(SPEC)
    whole = _Run(rank, spec).run(0, STEPS)

    first = _Run(rank, spec)
    head = first.run(0, SAVE_AT)
    save_checkpoint(
        Path(folder), SAVE_AT, rank, first.step, first.optimizer, first.scheduler, attempt=0, world_size=world
    )
    dist.barrier()  # rank 0's shared files are written
    resumed = _Run(rank, spec)
    refused = ""
    try:  # a group of another size: refused before anything is loaded
        load_checkpoint(
            Path(folder), rank, resumed.step, resumed.optimizer, resumed.scheduler, world_size=world + 1
        )
    except ValueError as err:
        refused = str(err)
    step, _attempt = load_checkpoint(
        Path(folder), rank, resumed.step, resumed.optimizer, resumed.scheduler, world_size=world
    )
    tail = resumed.run(step, STEPS)
    return {
        "nan": _nan_in_the_warm_up(rank, spec),
        "whole": whole,
        "head": head,
        "tail": tail,
        "loaded_step": step,
        "plain": _plain_bytes_per_step(rank),
        "refused": refused,
        "lr_factors": [first.factor(s) for s in range(STEPS)],
    }


def test_a_onebit_adam_spec_runs_compressed_identical_and_resumes_bit_exactly(tmp_path: Path):
    results = run_ranks(_ranks, 2, str(tmp_path), timeout=240)
    for r in results:  # one rank's NaN in the warm-up stops the step on every rank
        assert r["nan"].startswith("step 0: non-finite mean gradients"), r["nan"]
    for r in results:
        whole = r["whole"]
        # the optimizer's hook runs and the step reports what runs
        assert {s["compressor"] for s in whole} == {"onebit_adam:sign"}
        # warm-up: the hook averages the gradients during backward; compressed stage: backward sends
        # nothing (the hook is OneBitAdam's, not DDP's all-reduce) and the optimizer step sends the bytes
        assert all(s["backward_bytes"] > 0 for s in whole[:FREEZE])
        # (at the freeze the hook's one small schedule check across ranks is all backward sends)
        assert all(s["backward_bytes"] == 0 for s in whole[FREEZE + 1 :])
        assert 0 < whole[FREEZE]["backward_bytes"] <= 100
        assert all(s["compress_s"] > 0 for s in whole[FREEZE:])
        # after the freeze (and its one-off schedule check), over 10x fewer bytes than a plain all-reduce
        late = [s["bytes"] for s in whole[FREEZE + 1 :]]
        assert max(late) * 10 <= r["plain"], (late, r["plain"])
        # the spec's defaults: the 2-bit sign (more than 1/20 of plain, where one bit would be about
        # 1/32), and a warm-up all-reduced in bfloat16 (half of plain; step 0 also checks the schedule)
        assert min(late) * 20 > r["plain"], (late, r["plain"])
        assert all(2 * s["bytes"] == r["plain"] for s in whole[1:FREEZE]), ([s["bytes"] for s in whole], r)
        # the LR schedule (linear warm-up, then cosine) is what each step used
        lrs = [s["lr"] for s in whole]
        assert lrs == pytest.approx([0.01 * f for f in r["lr_factors"]], rel=1e-12)
        assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]
        # another group size is refused with the cause
        assert "saved by 2 ranks" in r["refused"] and "workers.count=2" in r["refused"]
        assert r["loaded_step"] == SAVE_AT
    a, b = results
    # the ranks' parameters are bit-identical at every step; their local gradients differ once compressed
    assert [s["params"] for s in a["whole"]] == [s["params"] for s in b["whole"]]
    assert [s["grads"] for s in a["whole"][:FREEZE]] == [s["grads"] for s in b["whole"][:FREEZE]]
    assert all(x["grads"] != y["grads"] for x, y in zip(a["whole"][FREEZE:], b["whole"][FREEZE:]))
    # the interrupted run continues bit-exactly like the uninterrupted one, on each rank
    for r in results:
        assert [s["params"] for s in r["head"] + r["tail"]] == [s["params"] for s in r["whole"]]
        assert [s["bytes"] for s in r["tail"][1:]] == [s["bytes"] for s in r["whole"][SAVE_AT + 1 :]]
