"""gradwire.compressors — gradient compression for data-parallel PyTorch.

Public surface (a contract)::

    from gradwire.compressors import available, make_reducer, make_hook

    reducer = make_reducer("topk", ratio=0.01, feedback="ef21")
    means = reducer.reduce([p.grad for p in model.parameters()])

    state, hook = make_hook("powersgd", rank=2)
    ddp_model.register_comm_hook(state, hook)
    current_choice(state)                   # "powersgd"; with make_hook("auto"): "auto:powersgd-r4"

    states = gather_state_dicts(state)      # every rank's state, on every rank (a collective)
    load_own_state(state, states)           # on resume: this rank's entry (or a world-size change)

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
    "choice_history",
    "config_schemas",
    "current_choice",
    "gather_state_dicts",
    "load_own_state",
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

    if name == "auto":  # a reducer of reducers: it runs the compressor it chooses
        from gradwire.compressors.auto import AutoReducer, with_optimizer_kind

        config = parse_config(name, with_optimizer_kind(params))  # optimizer may be the torch optimizer
        return AutoReducer(config, process_group)  # type: ignore[arg-type]
    config = parse_config(name, params)
    from gradwire.compressors.registry import plugin

    compressor = plugin(name).factory()(config)
    return Reducer(config, compressor, process_group)


def make_hook(
    name: str, process_group: Any = None, *, overlap: bool = False, **params: Any
) -> tuple[HookState, Any]:
    """``(state, hook)`` for ``ddp.register_comm_hook(state, hook)``.

    It may be called before ``init_process_group`` (Lightning's ``DDPStrategy(ddp_comm_state=state,
    ddp_comm_hook=hook)`` does): the state binds to the process group when the hook first runs. The
    state pickles (``torch.save``, Lightning's ``spawn``) without its process group and binds again
    at first use; see ``gradwire.compressors.hook``.

    ``overlap=True``: buckets are reduced by a background thread while backward goes on (see
    ``gradwire.compressors.hook``); with more than one rank this makes a process group of the same
    ranks for the hook's collectives (at binding), so use the hook on every rank, as DDP does. It pays
    when buckets are large and the link is the bottleneck; on latency-bound links every extra bucket
    adds collectives, and one bucket without overlap is faster (docs/benchmarks.md, links).
    """
    from gradwire.compressors.hook import HookState, reducer_hook

    return HookState(make_reducer(name, process_group, **params), overlap=overlap), reducer_hook


def current_choice(state: HookState | Reducer) -> str:
    """The compressor a hook state or reducer runs now: its registry name, or for ``auto`` the running
    choice as ``auto:<candidate>`` (``auto:measuring`` before its first choice). What the worker reports
    as a step's compressor; it changes when ``auto`` switches."""
    reducer = getattr(state, "reducer", state)
    choice = getattr(reducer, "current_choice", None)
    return choice() if callable(choice) else str(reducer.name)


def choice_history(state: HookState | Reducer) -> list[tuple[int, str, str]]:
    """``(step, choice, why)`` of every choice ``auto`` made, in order (empty for another compressor):
    what ``gradwire train``'s summary lists."""
    reducer = getattr(state, "reducer", state)
    return [tuple(h) for h in getattr(reducer, "history", [])]  # type: ignore[misc]


def gather_state_dicts(state: HookState | Reducer) -> list[dict[str, Any]]:
    """Every rank's ``state_dict()``, on every rank: entry ``i`` is rank ``i``'s, tensors on CPU.

    ``state`` is a hook state from :func:`make_hook` or a reducer from :func:`make_reducer`. A
    collective over its process group: call it on every rank at the same point, between steps.
    Saving the list from one process (Accelerate's ``save_state``, Lightning's checkpoint) is
    then enough to restore every rank with :func:`load_own_state`.
    """
    from gradwire.compressors.reducer import gather_state_dicts as gather

    return gather(state)


def load_own_state(state: HookState | Reducer, states: list[dict[str, Any]]) -> None:
    """Load this rank's entry of ``states`` (a list from :func:`gather_state_dicts`) into ``state``.

    Same world size: this rank's own buffers, so the run continues bit for bit. Another world size:
    the shared parts (step, PowerSGD's Q, EF21/EControl estimates) carry over and per-rank buffers
    are rebuilt or dropped, as ``Reducer.load_state_dict`` does for a world-size change. Raises
    ``ValueError`` if the list is not a whole, ordered one. No collective.
    """
    from gradwire.compressors.reducer import load_own_state as load

    load(state, states)
