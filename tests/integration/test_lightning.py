"""GradwireCompression in a real Lightning Trainer: 2 CPU processes on gloo.

This file is also the training script. The tests start it with ``python`` (strategy ``ddp``:
Lightning starts rank 1 by running the same command again; ``ddp_spawn``: Lightning spawns both
ranks from the script's process), and every rank writes what it saw to a folder the test reads:

* ``ddp``: one uninterrupted fit of FULL epochs; a fit of HALF epochs followed by
  ``trainer.save_checkpoint``; a new Trainer that resumes from that checkpoint to FULL epochs.
  Ranks must end bit-identical, the resumed run must equal the uninterrupted one bit for bit, the
  checkpoint must hold both ranks' compressor states and each rank must get its own back. Last, a
  Trainer whose DDPStrategy has a ``ddp_comm_hook`` must be refused on both ranks. Then
  ``GradwireCompression("auto")`` on an Adam module must read "adam" from the Trainer, and one told
  ``optimizer="sgd"`` there must be refused.
* ``ddp_spawn``: one fit; ranks identical, bytes sent below the uncompressed bytes, and the
  stats reach the launching process through ``trainer.callback_metrics``.

    python tests/integration/test_lightning.py ddp OUT_DIR     # MASTER_ADDR/MASTER_PORT from the env
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from gradwire.compressors.lightning_callback import GradwireCompression
from tests.state_compare import bitwise_equal, residuals

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[2]
FULL, HALF = 4, 2  # epochs; 64 samples, batch 8 per rank, 2 ranks: 4 steps per epoch
COMPRESSOR = {"name": "powersgd", "rank": 2}  # error feedback by default: per-rank buffers
LAUNCH_TIMEOUT = 240


# --- the training script (runs on every rank) --------------------------------------------------


def _data() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    y = x @ torch.randn(16, 4, generator=g) + 0.1 * torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class AdamRegressor(Regressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Record(pl.Callback):
    """Writes this rank's compressor state at the start and end of training, its params and stats."""

    def __init__(self, tag: str, out: Path) -> None:
        self.tag, self.out = tag, out
        self.start: Any = None

    @staticmethod
    def _gradwire(trainer: pl.Trainer) -> GradwireCompression:
        return next(c for c in trainer.callbacks if isinstance(c, GradwireCompression))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self._gradwire(trainer).hook_state.state_dict()  # after a resume: what was loaded

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gradwire = self._gradwire(trainer)
        torch.save(
            {
                "start_state": self.start,
                "end_state": gradwire.hook_state.state_dict(),
                "stats": gradwire.stats(),
                "params": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]).clone(),
            },
            self.out / f"{self.tag}-rank{trainer.global_rank}.pt",
        )


def _script(mode: str, out: Path) -> None:
    def fit(
        tag: str, strategy: Any, epochs: int, ckpt_path: str | None = None, auto: dict | None = None
    ) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        model = Regressor() if auto is None else AdamRegressor()
        loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=False)
        if auto is None:
            gradwire = GradwireCompression(COMPRESSOR["name"], rank=COMPRESSOR["rank"])
        else:
            gradwire = GradwireCompression("auto", **auto)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_epochs=epochs,
            callbacks=[gradwire, Record(tag, out)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(out),
        )
        trainer.fit(model, loader, ckpt_path=ckpt_path)
        return trainer

    if mode == "ddp":
        fit("full", "ddp", FULL)
        half = fit("half", "ddp", HALF)
        half.save_checkpoint(out / "half.ckpt")  # every rank builds it, rank 0 writes it
        fit("resume", "ddp", FULL, ckpt_path=str(out / "half.ckpt"))
        # a ddp_comm_hook next to the callback is refused on every rank before training starts
        from lightning.pytorch.strategies import DDPStrategy
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        try:
            fit("conflict", DDPStrategy(ddp_comm_hook=allreduce_hook), 1)
        except RuntimeError as err:
            (out / f"conflict-rank{int(os.environ['LOCAL_RANK'])}.txt").write_text(str(err))
        # auto learns the optimizer from the Trainer, and refuses one it is told that disagrees
        trainer = fit("auto", "ddp", 1, auto={"probe_after": 2})
        told = Record._gradwire(trainer).hook_state.reducer.config.optimizer
        (out / f"auto-rank{trainer.global_rank}.txt").write_text(str(told))
        try:
            fit("auto-conflict", "ddp", 1, auto={"optimizer": "sgd"})
        except RuntimeError as err:
            (out / f"auto-conflict-rank{int(os.environ['LOCAL_RANK'])}.txt").write_text(str(err))
    elif mode == "ddp_spawn":
        trainer = fit("spawn", "ddp_spawn", HALF)
        # the launching process trained nothing itself; rank 0's logged stats come back to it
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("gradwire/")}
        torch.save(metrics, out / "spawn-launcher.pt")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


# --- the tests ----------------------------------------------------------------------------------


def _launch(mode: str, out: Path) -> float:
    from tests.waiting import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        PYTHONWARNINGS="ignore",
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode, str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert proc.returncode == 0, (
        f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return time.monotonic() - started


def _load(out: Path, tag: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{tag}-rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lightning-ddp")
    seconds = _launch("ddp", out)
    print(f"lightning ddp script: {seconds:.1f} s")
    return out


def test_ddp_ranks_identical_and_compressed(ddp_run: Path) -> None:
    for tag in ("full", "half", "resume"):
        ranks = _load(ddp_run, tag)
        assert torch.equal(ranks[0]["params"], ranks[1]["params"]), f"{tag}: ranks' parameters differ"
        for r, got in enumerate(ranks):
            stats = got["stats"]
            assert 0 < stats["bytes_sent"] < stats["bytes_uncompressed"], (tag, r, stats)
    full = _load(ddp_run, "full")
    assert full[0]["stats"]["steps"] == FULL * 4
    # training moved the parameters away from their initial values, so equality above means something
    half = _load(ddp_run, "half")
    assert not torch.equal(half[0]["params"], full[0]["params"])


def test_ddp_checkpoint_holds_every_rank_and_resume_is_exact(ddp_run: Path) -> None:
    ckpt = torch.load(ddp_run / "half.ckpt", weights_only=True)  # plain types: loads without pickle
    (entry,) = [v for k, v in ckpt["callbacks"].items() if "GradwireCompression" in k]
    assert entry["compressor"] == "powersgd" and entry["world_size"] == 2
    half = _load(ddp_run, "half")
    for r in range(2):  # the checkpoint holds what each rank had when it was saved
        assert entry["states"][r]["rank"] == r
        assert bitwise_equal(entry["states"][r], half[r]["end_state"]), (
            f"checkpoint entry {r} is not rank {r}'s state"
        )
    saved = [residuals(half[r]["end_state"]) for r in range(2)]
    assert saved[0] and not bitwise_equal(saved[0], saved[1]), (
        "ranks' residuals should differ (else the check is void)"
    )

    resumed = _load(ddp_run, "resume")
    for r in range(2):  # each rank restored its own buffers, not rank 0's
        assert bitwise_equal(residuals(resumed[r]["start_state"]), saved[r]), (
            f"rank {r} did not get its own state back"
        )
    assert not bitwise_equal(residuals(resumed[1]["start_state"]), saved[0])

    full = _load(ddp_run, "full")
    for r in range(2):
        assert torch.equal(resumed[r]["params"], full[r]["params"]), (
            f"rank {r}: resumed run differs from uninterrupted"
        )
        assert bitwise_equal(residuals(resumed[r]["end_state"]), residuals(full[r]["end_state"]))
        assert resumed[r]["stats"]["steps"] == full[r]["stats"]["steps"]


def test_ddp_comm_hook_next_to_the_callback_is_refused(ddp_run: Path) -> None:
    for r in range(2):
        message = (ddp_run / f"conflict-rank{r}.txt").read_text()
        assert "ddp_comm_hook" in message and "ignores it on CPU" in message, message
    assert not list(ddp_run.glob("conflict-rank*.pt")), "the conflicting run trained"


def test_auto_reads_the_trainers_optimizer_and_refuses_another(ddp_run: Path) -> None:
    for r in range(2):
        assert (ddp_run / f"auto-rank{r}.txt").read_text() == "adam"
        message = (ddp_run / f"auto-conflict-rank{r}.txt").read_text()
        assert "optimizer='sgd'" in message and "Adam ('adam')" in message, message
    assert not list(ddp_run.glob("auto-conflict-rank*.pt")), "the conflicting run trained"


def test_ddp_spawn(tmp_path: Path) -> None:
    seconds = _launch("ddp_spawn", tmp_path)
    print(f"lightning ddp_spawn script: {seconds:.1f} s")
    ranks = _load(tmp_path, "spawn")
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["stats"]["steps"] == HALF * 4
    for got in ranks:
        assert 0 < got["stats"]["bytes_sent"] < got["stats"]["bytes_uncompressed"]
    launcher = torch.load(tmp_path / "spawn-launcher.pt")
    assert launcher["gradwire/bytes_sent"] == pytest.approx(ranks[0]["stats"]["bytes_sent"], rel=1e-6)
    assert launcher["gradwire/compression_ratio"] > 1.0


def test_refuses_a_strategy_without_ddp(tmp_path: Path) -> None:
    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        callbacks=[GradwireCompression("powersgd")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(RuntimeError, match="SingleDeviceStrategy"):
        trainer.fit(Tiny(), loader)
    with pytest.raises(ValueError, match="rank"):  # bad parameters fail at construction
        GradwireCompression("powersgd", rank=0)


if __name__ == "__main__":
    _script(sys.argv[1], Path(sys.argv[2]))
