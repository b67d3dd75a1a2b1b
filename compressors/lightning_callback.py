"""Gradwire compression in a Lightning ``Trainer``, on CPU and GPU alike.

    from gradwire.compressors.lightning_callback import GradwireCompression

    trainer = Trainer(strategy="ddp", devices=2, callbacks=[GradwireCompression("powersgd", rank=2)])

The callback registers gradwire's hook on the ``DistributedDataParallel`` model that Lightning
builds, once that model exists (``on_fit_start``). Lightning's own route,
``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``, registers hooks on CUDA devices only and
silently ignores them on CPU; the callback works on every device, and it refuses to run next to
a ``ddp_comm_hook`` (DDP takes one hook, and which one ran would depend on the device).

Checkpoints: Lightning builds the checkpoint on every rank and writes rank 0's copy. The callback's
``state_dict()`` therefore gathers every rank's compressor state (a collective, which is why it
must run on all ranks, as ``trainer.save_checkpoint`` does) and the checkpoint holds them all;
on resume (``trainer.fit(model, ckpt_path=...)``) each rank loads its own entry.

This module imports ``lightning``; ``gradwire.compressors`` itself never does.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from gradwire.compressors import make_hook, parse_config
from gradwire.compressors.auto import optimizer_kind, with_optimizer_kind
from gradwire.compressors.reducer import all_ranks_checkpoint, restore_all_ranks


class GradwireCompression(Callback):
    """Compress DDP's gradient exchange with gradwire compressor ``name``.

    ``params`` are the compressor's parameters (``config_schemas()``), checked here so a typo fails
    before any process starts; ``overlap`` is :func:`gradwire.compressors.make_hook`'s.
    ``log_stats`` logs this rank's cumulative ``gradwire/bytes_sent``, ``gradwire/bytes_uncompressed``
    and ``gradwire/compression_ratio`` after every training batch (they land in
    ``trainer.callback_metrics``, which is also how the launching process of ``ddp_spawn`` sees them).
    """

    def __init__(self, name: str, *, overlap: bool = False, log_stats: bool = True, **params: Any):
        super().__init__()
        if name == "auto":
            params = with_optimizer_kind(params)  # optimizer may be the torch optimizer
        parse_config(name, params)  # unknown compressor or bad parameter: raise now, naming it
        self.name = name
        self.params = dict(params)
        self.overlap = overlap
        self.log_stats = log_stats
        self.hook_state: Any = None  # gradwire's HookState, made on every rank by on_fit_start
        self._hook: Any = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's entry, loaded once the hook exists

    # --- checks and attaching -----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # validate/test/predict run without DDP's gradient exchange
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise RuntimeError(
                f"GradwireCompression compresses DistributedDataParallel's gradient exchange and needs "
                f"one of Lightning's DDP strategies (strategy='ddp', 'ddp_spawn', 'ddp_fork', "
                f"'ddp_notebook' or a DDPStrategy); this Trainer runs {type(strategy).__name__}. "
                f"With a single device there is nothing to exchange: leave the callback out."
            )
        if getattr(strategy, "_ddp_comm_hook", None) is not None:
            raise RuntimeError(
                "the DDP strategy was given a ddp_comm_hook and GradwireCompression is in the callbacks: "
                "DDP takes one communication hook, so use one of them. (Lightning registers "
                "ddp_comm_hook on CUDA devices only and ignores it on CPU; the callback works on both.)"
            )
        mine = [c for c in trainer.callbacks if isinstance(c, GradwireCompression)]
        if len(mine) > 1:
            raise RuntimeError(f"{len(mine)} GradwireCompression callbacks: DDP takes one hook, pass one")
        if trainer.world_size == 1:
            rank_zero_warn(
                "GradwireCompression with a single process: gradients are compressed and decompressed "
                "but nothing is exchanged, so nothing is saved."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(
                f"GradwireCompression expected Lightning's DDP strategy to have wrapped the model in "
                f"DistributedDataParallel by on_fit_start, found {type(model).__name__}"
            )
        if self.hook_state is None:  # a second fit() in the same process keeps its buffers
            params = self._auto_told(trainer) if self.name == "auto" else self.params
            self.hook_state, self._hook = make_hook(self.name, overlap=self.overlap, **params)
        if self._pending is not None:
            restore_all_ranks(self.hook_state, self._pending)
            self._pending = None
        model.register_comm_hook(self.hook_state, self._hook)

    def _auto_told(self, trainer: Trainer) -> dict[str, Any]:
        """auto's parameters with ``optimizer`` from the Trainer's optimizers (under Adam auto leaves out
        the candidates that cost Adam accuracy); an ``optimizer`` given that disagrees is refused."""
        kinds = {optimizer_kind(o) for o in trainer.optimizers}
        if not kinds:
            return self.params
        found = kinds.pop() if len(kinds) == 1 else "adam"  # several kinds: the rules safe for all
        given = self.params.get("optimizer")
        if given is not None and given != found:
            names = ", ".join(sorted(type(getattr(o, "optimizer", o)).__name__ for o in trainer.optimizers))
            raise RuntimeError(
                f"GradwireCompression('auto', optimizer={given!r}) but the Trainer's optimizer is {names} "
                f"({found!r}): auto picks its candidates by the optimizer, so leave optimizer out (the "
                "callback reads it from the Trainer) or give the one that trains"
            )
        return {**self.params, "optimizer": found}

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_stats or self.hook_state is None:
            return
        stats = self.hook_state.stats()
        sent, plain = float(stats["bytes_sent"]), float(stats["bytes_uncompressed"])
        values = {"gradwire/bytes_sent": sent, "gradwire/bytes_uncompressed": plain}
        if sent > 0:
            values["gradwire/compression_ratio"] = plain / sent
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.hook_state is not None:
            self.hook_state.close()  # the overlap thread, if any; a later step starts a new one

    def stats(self) -> dict[str, float]:
        """This rank's cumulative counters (``HookState.stats()``); empty before the first fit in this
        process (with ``ddp_spawn`` the launching process never trains: read ``trainer.callback_metrics``)."""
        return {} if self.hook_state is None else self.hook_state.stats()

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's compressor state. A collective once training has started: Lightning calls it on
        every rank while it builds a checkpoint (``trainer.save_checkpoint``, ``ModelCheckpoint``)."""
        if self.hook_state is None:
            return dict(self._pending) if self._pending is not None else {}
        return all_ranks_checkpoint(self.hook_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.hook_state is not None:
            restore_all_ranks(self.hook_state, state_dict)
        else:  # Lightning restores callbacks before it wraps the model in DDP
            self._pending = state_dict
