"""gradwire.compressors — gradient compression for data-parallel PyTorch.

Public surface (a contract)::

    from gradwire.compressors import available, make_reducer, make_hook

    reducer = make_reducer("topk", ratio=0.01, feedback="ef21")
    means = reducer.reduce([p.grad for p in model.parameters()])

    state, hook = make_hook("powersgd", rank=2)
    ddp_model.register_comm_hook(state, hook)

This package imports torch lazily: ``available()`` and the config models in
``gradwire.compressors.config`` work without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwire.compressors.registry import (
    CompressorPlugin,
    UnknownCompressorError,
    available,
    config_schemas,
    parse_config,
    register,
)

if TYPE_CHECKING:
    from gradwire.compressors.hook import HookState
    from gradwire.compressors.reducer import Reducer

__all__ = [
    "CompressorPlugin",
    "UnknownCompressorError",
    "available",
    "config_schemas",
    "make_hook",
    "make_reducer",
    "parse_config",
    "register",
]


def make_reducer(name: str, process_group: Any = None, **params: Any) -> Reducer:
    """A reducer for compressor ``name`` over ``process_group`` (default: the world).

    ``params`` are the compressor's config fields (see ``config_schemas()``); bad
    ones raise pydantic's ``ValidationError`` naming the field, an unknown name
    raises :class:`UnknownCompressorError` listing the available ones.
    """
    from gradwire.compressors.reducer import Reducer

    config = parse_config(name, params)
    from gradwire.compressors.registry import plugin

    compressor = plugin(name).factory()(config)
    return Reducer(config, compressor, process_group)


def make_hook(
    name: str, process_group: Any = None, *, overlap: bool = False, **params: Any
) -> tuple[HookState, Any]:
    """``(state, hook)`` for ``ddp.register_comm_hook(state, hook)``.

    ``overlap=True``: buckets are reduced by a background thread while backward goes on (see
    ``gradwire.compressors.hook``); with more than one rank this makes a process group of the same
    ranks for the hook's collectives, so call ``make_hook`` on every rank, as DDP setup does. It pays
    when buckets are large and the link is the bottleneck; on latency-bound links every extra bucket
    adds collectives, and one bucket without overlap is faster (docs/benchmarks.md, links).
    """
    import torch.distributed as dist

    from gradwire.compressors.hook import HookState, reducer_hook

    if overlap and dist.is_available() and dist.is_initialized():
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        if dist.get_world_size(process_group) > 1:
            process_group = dist.new_group(ranks)
    return HookState(make_reducer(name, process_group, **params), overlap=overlap), reducer_hook
