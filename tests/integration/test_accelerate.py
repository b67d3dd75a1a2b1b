"""gradwire's Accelerate recipe under torchrun: 2 CPU processes on gloo, a real ``Accelerator``.

This file is also the training script; the test starts it with

    .venv/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \\
        tests/integration/test_accelerate.py OUT_DIR

and every process runs three trainings, each with a new ``Accelerator`` and ``attach()`` after
``prepare()``: FULL epochs uninterrupted; HALF epochs then ``save_state``; a fresh model that
``load_state``s that folder and trains the remaining epochs. Each process writes what it saw to
OUT_DIR. The test checks that ranks end bit-identical, that bytes sent stay below the uncompressed
bytes, that ``load_state`` gave each process its own error buffers (rank 1's, not rank 0's) and that
the resumed run equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.state_compare import bitwise_equal, residuals

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
FULL, HALF = 4, 2  # epochs; 64 samples, batch 8 per process, 2 processes: 4 steps per epoch
LAUNCH_TIMEOUT = 240


# --- the training script (runs in every process) -----------------------------------------------


def _script(out: Path) -> None:
    from accelerate import Accelerator
    from torch import nn

    from gradwire.compressors.accelerate_recipe import attach

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    y = x @ torch.randn(16, 4, generator=g) + 0.1 * torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, y)
    folder = out / "half-state"

    def train(tag: str, epochs: int, save: bool = False, load: bool = False) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
        accelerator = Accelerator(cpu=True)
        ddp, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        if tag == "full":  # the model before prepare() is refused with a clear error
            try:
                attach(accelerator, model, "powersgd", rank=2)
            except TypeError as err:
                assert "DistributedDataParallel" in str(err), err
            else:
                raise AssertionError("attach() accepted a model that is not DistributedDataParallel")
        state = attach(accelerator, ddp, "powersgd", rank=2)
        restored = None
        if load:
            accelerator.load_state(str(folder))
            restored = state.state_dict()
        for _ in range(epochs):
            for inputs, targets in loader:
                optimizer.zero_grad()
                accelerator.backward(nn.functional.mse_loss(ddp(inputs), targets))
                optimizer.step()
        if save:
            accelerator.save_state(str(folder))  # every process takes part; the main one writes
        accelerator.wait_for_everyone()
        torch.save(
            {
                "restored": restored,
                "end_state": state.state_dict(),
                "stats": state.stats(),
                "params": torch.cat([p.detach().reshape(-1) for p in ddp.parameters()]).clone(),
            },
            out / f"{tag}-rank{accelerator.process_index}.pt",
        )

    train("full", FULL)
    train("half", HALF, save=True)
    train("resume", FULL - HALF, load=True)


# --- the test -----------------------------------------------------------------------------------


def test_accelerate_torchrun_ranks_identical_and_resume_exact(tmp_path: Path) -> None:
    from tests.waiting import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONWARNINGS="ignore",
    )
    command = [
        str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(Path(__file__).resolve()), str(tmp_path),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    print(f"torchrun + accelerate: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )

    runs = {
        tag: [torch.load(tmp_path / f"{tag}-rank{r}.pt") for r in range(2)]
        for tag in ("full", "half", "resume")
    }
    for tag, ranks in runs.items():
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), f"{tag}: ranks' parameters differ"
        for r, got in enumerate(ranks):
            assert 0 < got["stats"]["bytes_sent"] < got["stats"]["bytes_uncompressed"], (tag, r, got["stats"])
    full, half, resumed = runs["full"], runs["half"], runs["resume"]
    assert not torch.equal(half[0]["params"], full[0]["params"])  # training moved the parameters

    # save_state wrote one file holding both processes' states, each as that process had it
    (custom,) = sorted((tmp_path / "half-state").glob("custom_checkpoint_*.pkl"))
    entry = torch.load(custom, weights_only=True)  # plain types: loads without pickle
    assert entry["compressor"] == "powersgd" and [s["rank"] for s in entry["states"]] == [0, 1]
    for r in range(2):
        assert bitwise_equal(entry["states"][r], half[r]["end_state"])

    # load_state gave each process its own buffers back: rank 1 got rank 1's, which differ from rank 0's
    saved = [residuals(half[r]["end_state"]) for r in range(2)]
    assert saved[0] and not bitwise_equal(saved[0], saved[1])
    for r in range(2):
        assert bitwise_equal(residuals(resumed[r]["restored"]), saved[r]), (
            f"rank {r} did not get its own state"
        )
    assert not bitwise_equal(residuals(resumed[1]["restored"]), saved[0])

    # and the resumed run is the uninterrupted one, bit for bit
    for r in range(2):
        assert torch.equal(resumed[r]["params"], full[r]["params"]), f"rank {r}: resumed differs"
        assert bitwise_equal(residuals(resumed[r]["end_state"]), residuals(full[r]["end_state"]))
        assert resumed[r]["end_state"]["step"] == full[r]["end_state"]["step"] == FULL * 4


if __name__ == "__main__":
    _script(Path(sys.argv[1]))
