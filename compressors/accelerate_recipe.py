"""Gradwire compression in a Hugging Face Accelerate training loop.

    from gradwire.compressors.accelerate_recipe import attach

    accelerator = Accelerator()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = attach(accelerator, model, "powersgd", rank=2)   # after prepare(), on every process
    ...
    accelerator.save_state("ckpt")    # includes every process's compressor state
    accelerator.load_state("ckpt")    # each process gets its own back

:func:`attach` registers gradwire's hook on the ``DistributedDataParallel`` model that
``prepare()`` returned and registers a small object with ``accelerator.register_for_checkpointing``.
Accelerate calls that object's ``state_dict()`` on every process during ``save_state`` and writes
the main process's result (``custom_checkpoint_<i>.pkl``), so ``state_dict()`` gathers every
process's compressor state there (a collective); ``load_state`` hands the file to every process,
which loads its own entry. As with every object registered for checkpointing, register the same
objects in the same order in the run that saves and the run that loads.

This module imports ``accelerate``; ``gradwire.compressors`` itself never does.
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from gradwire.compressors import make_hook
from gradwire.compressors.reducer import all_ranks_checkpoint, restore_all_ranks


class CompressorCheckpoint:
    """What ``accelerator.register_for_checkpointing`` keeps: every process's state of one hook."""

    def __init__(self, hook_state: Any, name: str):
        self.hook_state = hook_state
        self.name = name

    def state_dict(self) -> dict[str, Any]:
        """Collective: accelerate's ``save_state`` calls it on every process."""
        return all_ranks_checkpoint(self.hook_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_all_ranks(self.hook_state, state)


def attach(
    accelerator: Accelerator,
    model: Any,
    name: str,
    *,
    overlap: bool = False,
    checkpoint: bool = True,
    **params: Any,
) -> Any:
    """Compress ``model``'s gradient exchange with compressor ``name``; returns the ``HookState``
    (``stats()``, ``state_dict()``).

    ``model`` is what ``accelerator.prepare`` returned; call this on every process, before the first
    backward. ``params`` are the compressor's parameters; ``overlap`` is :func:`make_hook`'s. For
    ``"auto"``, pass ``optimizer=`` the optimizer ``prepare`` returned: under Adam auto leaves out the
    candidates that cost Adam accuracy (not told, it assumes Adam).
    ``checkpoint=False`` leaves the compressor state out of ``save_state``/``load_state``.
    """
    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            f"attach() needs the DistributedDataParallel model that accelerator.prepare() returns with "
            f"several processes (torchrun or accelerate launch); got {type(model).__name__} with "
            f"distributed_type={accelerator.distributed_type} and {accelerator.num_processes} "
            f"process(es). FSDP and DeepSpeed exchange gradients their own way and are not supported."
        )
    if model._comm_hooks:
        raise RuntimeError(
            "this DistributedDataParallel model has a communication hook already (e.g. from "
            "DistributedDataParallelKwargs(comm_hook=...)); DDP takes one"
        )
    hook_state, hook = make_hook(name, overlap=overlap, **params)
    model.register_comm_hook(hook_state, hook)
    if checkpoint:
        accelerator.register_for_checkpointing(CompressorCheckpoint(hook_state, name))
    return hook_state
