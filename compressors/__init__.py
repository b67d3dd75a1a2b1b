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


def make_hook(name: str, process_group: Any = None, **params: Any) -> tuple[HookState, Any]:
    """``(state, hook)`` for ``ddp.register_comm_hook(state, hook)``."""
    from gradwire.compressors.hook import HookState, reducer_hook

    return HookState(make_reducer(name, process_group, **params)), reducer_hook
