"""The reducer: compressor + error feedback + communicator over a list of tensors.

``reduce(tensors)`` returns the approximate cross-rank mean of each tensor. Per call:

* tensors that are 1-D, too small to gain from compression, new to an estimate
  rule (its dense first round), or in warm-up (``step < start_iter``) travel
  uncompressed in **one** batched all-reduce, in flight while the compressed
  tensors are exchanged (or, for a compressor that ``fuses_plain`` such as PowerSGD,
  inside its first all-reduce: one collective fewer);
* a NaN or Inf in any rank's input shows in what every rank receives: the plain
  all-reduce, and the compressed payloads of every compressor that declares
  ``reveals_nonfinite`` (Top-k keeps it, PowerSGD's P carries it, QSGD's norms and
  sign's scale absorb it); for the others the all-reduce carries one extra element,
  NaN iff a rank's input was non-finite. So every rank takes the same decision
  without an extra pass over the gradients: with ``nonfinite="propagate"`` all
  outputs are NaN on every rank (so an AMP grad scaler skips the step) and no state
  changes; with ``"raise"`` every rank raises :class:`NonFiniteGradientError`.
  Either way ``stats()["nonfinite_steps"]`` counts it.

The reducer binds to its process group lazily (see ``communicator.py``): at construction if
``torch.distributed`` is initialised, else at the first ``reduce``; the compressor's ``setup(rank,
world_size)`` runs then. Its state is per rank: ``load_state_dict`` refuses another rank's state
(same world size), and :func:`gather_state_dicts` / :func:`load_own_state` move every rank's state
through one checkpoint written by one process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.communicator import Communicator
from gradwire.compressors.compressor import Compressor
from gradwire.compressors.config import CompressorConfig
from gradwire.compressors.feedback import make_feedback

STATE_VERSION = 1


class NonFiniteGradientError(FloatingPointError):
    """Some rank's gradient held NaN or Inf (raised on every rank at once)."""


def all_finite(tensors: torch.Tensor | Sequence[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` (one tensor, or several: one device sync for all) is
    finite. A sum in the tensor's own dtype is non-finite whenever an element is (NaN and ±inf
    propagate through addition), so only a sum that overflowed from finite values needs the exact
    float64 one: ten times cheaper than always summing in float64 (0.02 against 0.21 ms for 300 k
    floats on one core, the larger part of the hook's cost over torch's own; docs/benchmarks.md,
    "Runtime overhead")."""
    group = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not group:
        return True
    sums = [t.sum() for t in group]
    quick = sums[0] if len(sums) == 1 else torch.stack([s.to(torch.float64) for s in sums]).sum()
    if torch.isfinite(quick).item():
        return True
    return all(bool(torch.isfinite(t.sum(dtype=torch.float64)).item()) for t in group)


def resolved(value: torch.Tensor) -> torch.futures.Future:
    """A future that already holds ``value`` (what a comm hook returns for a bucket it reduced itself)."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(value)
    return future


class Reducer:
    def __init__(self, config: CompressorConfig, compressor: Compressor, process_group: Any = None):
        self.config = config
        self.compressor = compressor
        self.comm = Communicator(process_group)
        self.feedback = make_feedback(config.feedback, config.resolved_eta())
        self.step = 0
        self.nonfinite_steps = 0
        self.compress_seconds = 0.0
        self.communicate_seconds = 0.0
        #: the compressor was set up for the group the communicator is bound to
        self._ready = False
        if self.comm.bound:
            self.bind()

    def bind(self) -> None:
        """Bind to the process group now and set the compressor up for this rank. ``reduce``,
        ``state_dict`` and ``load_state_dict`` do it first thing; once bound, it checks that the
        group still has the world size and rank it was bound to."""
        if self._ready:
            self.comm.check()
            return
        self.comm.bind()
        self.compressor.setup(self.comm.rank, self.comm.world_size)
        self._ready = True

    def set_process_group(self, process_group: Any) -> None:
        """The process group of a reducer that is not bound yet (one unpickled, say)."""
        self.comm.set_process_group(process_group)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ready"] = False  # the copy sets its compressor up again when it binds
        return state

    @property
    def name(self) -> str:
        return self.compressor.name

    # --- the step ------------------------------------------------------------------------
    def reduce(
        self,
        tensors: Sequence[torch.Tensor],
        keys: Sequence[int] | None = None,
        advance: bool = True,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Approximate mean of each tensor across ranks (new tensors; inputs untouched).

        ``keys`` name each tensor's state slot (default: its position); ``advance``
        ends the step (the DDP hook passes it only with the last bucket); ``out``
        receives the results instead of new tensors (it may alias the inputs).
        """
        self.bind()
        tensors = list(tensors)
        keys = list(range(len(tensors))) if keys is None else list(keys)
        self._check(tensors, keys)
        if out is not None and [o.shape for o in out] != [t.shape for t in tensors]:
            raise ValueError("out must hold one tensor of each input's shape, in order")
        if not tensors:
            return []
        started = time.perf_counter()
        self.comm.ledger.record_uncompressed(
            sum(t.numel() * t.element_size() for t in tensors), self.comm.world_size
        )
        compress, plain = self._partition(tensors, keys)
        plain_flat = self._plain_flat(tensors, plain)
        fused = self.compressor.fuses_plain and plain_flat is not None
        pending_plain = None if plain_flat is None or fused else self.comm.all_reduce_mean(plain_flat)
        inputs = [self.feedback.prepare(keys[i], tensors[i]) for i in compress]
        compressed_keys = [keys[i] for i in compress]
        args = (inputs, compressed_keys, self.step, self.comm, self.feedback.needs_local)
        extra: dict[str, Any] = {"plain": plain_flat} if fused else {}
        if out is not None and self._may_write_into_out():
            # not where the rule reads the input after the exchange and it is the caller's tensor
            # (EF's first step sends g itself, and e = g - local needs it)
            extra["into"] = [
                None if self.feedback.needs_local and inputs[j] is tensors[i] else out[i]
                for j, i in enumerate(compress)
            ]
        pending = self.compressor.exchange(*args, **extra)
        self.compress_seconds += time.perf_counter() - started

        waited = time.perf_counter()
        plain_out = pending_plain.wait() if pending_plain is not None else None
        exchanged = pending.wait()
        if fused:
            plain_out = exchanged.plain
        done = time.perf_counter()
        self.communicate_seconds += done - waited  # includes PowerSGD's Q-round math

        probes = [exchanged.probe, None if plain_out is None else plain_out.sum(dtype=torch.float64)]
        if not torch.isfinite(torch.stack([p for p in probes if p is not None]).sum()).item():
            return self._nonfinite(tensors, advance, out)

        outputs: list[torch.Tensor | None] = [None] * len(tensors)
        exchanged.commit()
        for j, i in enumerate(compress):
            if exchanged.local is not None:
                self.feedback.commit_local(keys[i], tensors[i], inputs[j], exchanged.local[j])
            result = self.feedback.output(keys[i], exchanged.aggregates[j])
            if out is not None:
                outputs[i] = out[i].copy_(result)
            else:
                outputs[i] = result.clone() if exchanged.reused else result
        offset = 0
        for i in plain:
            n = tensors[i].numel()
            mean = plain_out[offset : offset + n].view(tensors[i].shape)
            offset += n
            if self.feedback.estimates and self.compressor.should_compress(
                tensors[i], self.config.min_compression_rate
            ):  # seed the estimate of a tensor that will be compressed later
                self.feedback.init_dense(keys[i], tensors[i], mean)
            outputs[i] = mean if out is None else out[i].copy_(mean)
        if advance:
            self.step += 1
        self.compress_seconds += time.perf_counter() - done
        return outputs  # type: ignore[return-value]

    def _may_write_into_out(self) -> bool:
        """Whether the compressor may write its aggregates into ``out`` before the step is judged
        finite (saving one copy of each): only when the feedback rule returns the aggregate itself
        and reads, after the exchange, no tensor of the caller's (``none``; ``ef`` reads its own
        ``g + e`` buffer, except on its first step: see :meth:`reduce`), and a non-finite step
        would overwrite ``out`` anyway (``nonfinite: propagate``; ``raise`` leaves it untouched)."""
        return (
            self.compressor.writes_into
            and not self.feedback.estimates
            and self.config.nonfinite == "propagate"
        )

    def reduce_bucket(
        self, tensors: list[torch.Tensor], keys: list[int], advance: bool, buffer: torch.Tensor
    ) -> torch.futures.Future:
        """One DDP bucket, for the comm hook: ``tensors`` are views of ``buffer`` and receive the results
        (:meth:`reduce` with ``out=tensors``), in the call; the future returned holds ``buffer``."""
        self.reduce(tensors, keys=keys, advance=advance, out=tensors)
        return resolved(buffer)

    @property
    def passthrough(self) -> bool:
        """``none`` without feedback: the bucket is all-reduced as it is, as DDP's own hook does."""
        return self.compressor.identity and self.feedback.name == "none"

    def reduce_flat_async(self, flat: torch.Tensor, advance: bool = True) -> torch.futures.Future:
        """Mean of the 1-D ``flat`` over ranks, in place, as a future (only when :attr:`passthrough`).

        What DDP's default hook does, plus the ledger and the non-finite check: the all-reduce runs
        while backward goes on, and the check (:func:`all_finite`, no collective) runs in the future's
        callback. ``communicate_seconds`` counts from launch to completion.
        """
        if not self.passthrough:
            raise RuntimeError(f"reduce_flat_async needs 'none' without feedback, not {self.name!r}")
        self.bind()
        nbytes = flat.numel() * flat.element_size()
        self.comm.ledger.record_uncompressed(nbytes, self.comm.world_size)
        launched = time.perf_counter()
        future = self.comm.all_reduce_mean(flat).future()

        def finish(done: torch.futures.Future) -> torch.Tensor:
            done.value()  # re-raises a failed collective
            self.communicate_seconds += time.perf_counter() - launched
            if not all_finite(flat):
                self._nonfinite([flat], advance, [flat])  # raises with nonfinite="raise"
                return flat
            if advance:
                self.step += 1
            return flat

        return future.then(finish)

    def _partition(self, tensors: list[torch.Tensor], keys: list[int]) -> tuple[list[int], list[int]]:
        """Indices to compress and indices to send plain this step."""
        if self.compressor.identity and self.feedback.name == "none":
            return [], list(range(len(tensors)))  # nothing to encode: one plain all-reduce for all
        warm = self.step < self.config.start_iter
        compress = [
            i
            for i, t in enumerate(tensors)
            if not warm
            and not self.feedback.needs_dense_init(keys[i])
            and self.compressor.should_compress(t, self.config.min_compression_rate)
        ]
        chosen = set(compress)
        return compress, [i for i in range(len(tensors)) if i not in chosen]

    def _plain_flat(self, tensors: list[torch.Tensor], plain: list[int]) -> torch.Tensor | None:
        """Every uncompressed tensor (plus the non-finite flag if needed) in one flat buffer, for one
        all-reduce of its own or a ride in the compressor's first one (``fuses_plain``)."""
        parts = [tensors[i].reshape(-1) for i in plain]
        if not self.compressor.reveals_nonfinite:
            # 0, or NaN if any element is non-finite (Inf·0 = NaN); summed by the all-reduce.
            # Sums run in float64 so that large finite gradients never overflow into a false alarm.
            flag = torch.stack([t.sum(dtype=torch.float64) for t in tensors]).sum() * 0.0
            parts.append(flag.to(tensors[0].dtype).reshape(1))
        return torch.cat(parts) if parts else None

    def _nonfinite(
        self, tensors: list[torch.Tensor], advance: bool, out: Sequence[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        self.compressor.rollback()
        self.nonfinite_steps += 1
        if advance:
            self.step += 1
        if self.config.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"a gradient held NaN or Inf on some rank at step {self.step - 1}; "
                "compressor state was left unchanged"
            )
        if out is not None:
            for o in out:  # (a sparse gradient, which 'none' passes through: its values)
                (o._values() if o.is_sparse else o).fill_(float("nan"))
            return list(out)
        return [torch.full_like(t, float("nan")) for t in tensors]

    def _check(self, tensors: list[torch.Tensor], keys: list[int]) -> None:
        if len(keys) != len(tensors):
            raise ValueError(f"got {len(tensors)} tensors but {len(keys)} keys")
        if len(set(keys)) != len(keys):
            raise ValueError("keys must be unique within one reduce() call")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors[{i}] is {type(t).__name__}, not a torch.Tensor")
            if not t.is_floating_point():
                raise TypeError(f"tensors[{i}] has dtype {t.dtype}; gradients must be floating point")
            if t.dtype != tensors[0].dtype or t.device != tensors[0].device:
                raise ValueError(
                    f"tensors[{i}] is {t.dtype} on {t.device} but tensors[0] is "
                    f"{tensors[0].dtype} on {tensors[0].device}; reduce one dtype and device per call"
                )

    # --- reporting and state -------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Cumulative counters of this rank (bytes are exact, see ``ledger.py``)."""
        return {
            **self.comm.ledger.as_dict(),
            "steps": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "compress_seconds": self.compress_seconds,
            "communicate_seconds": self.communicate_seconds,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (binds to the process group first: call it after ``init_process_group``)."""
        self.bind()
        return {
            "version": STATE_VERSION,
            "compressor": self.compressor.name,
            "config": self.config.model_dump(),
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "step": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "ledger": self.comm.ledger.as_dict(),
            "feedback": self.feedback.state_dict(),
            "compressor_state": self.compressor.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`.

        Same world size: the state must be this rank's own (a state saved by another rank raises
        ``ValueError`` naming both ranks); everything is restored and the run continues bit for bit.
        Different world size: the step counter, PowerSGD's Q and the shared
        estimates of EF21/EControl carry over; per-worker buffers are rebuilt from
        the shared estimate (so ``ĝ = mean ĝ_i`` still holds); EF residuals start
        afresh. The byte ledger restarts at zero.

        Binds to the process group first (call it after ``init_process_group``). To restore every
        rank from one checkpoint file, see :func:`gather_state_dicts` and :func:`load_own_state`.
        """
        self._validate(state)
        self.bind()
        same_world = state["world_size"] == self.comm.world_size
        if same_world and int(state["rank"]) != self.comm.rank:
            raise ValueError(
                f"state was saved by rank {state['rank']} of {state['world_size']}, and this is rank "
                f"{self.comm.rank}: error buffers belong to the rank that made them. Load each rank's "
                "own state (gather_state_dicts() on save, load_own_state() on restore)"
            )
        self._load(state, same_world)

    def _load(self, state: dict[str, Any], same_world: bool) -> None:
        self.step = int(state["step"])
        self.feedback.load_state_dict(state["feedback"], same_world)
        self.compressor.load_state_dict(state["compressor_state"], same_world)
        if same_world:
            self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
            self.comm.ledger.load(state.get("ledger", {}))

    def _validate(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"a reducer state is a dict from state_dict(), not {type(state).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported reducer state version {state.get('version')!r}")
        if state["compressor"] != self.compressor.name:
            raise ValueError(
                f"state was saved by compressor {state['compressor']!r}, "
                f"this reducer runs {self.compressor.name!r}"
            )
        saved_feedback = state["config"].get("feedback")
        if saved_feedback != self.config.feedback:
            raise ValueError(
                f"state was saved with feedback {saved_feedback!r}, "
                f"this reducer uses {self.config.feedback!r}"
            )


# --- one checkpoint for every rank ----------------------------------------------------------------


def _reducer_of(target: Any) -> Reducer:
    reducer = getattr(target, "reducer", target)  # a HookState holds its reducer
    if not isinstance(reducer, Reducer):
        raise TypeError(f"expected a gradwire HookState or Reducer, not {type(target).__name__}")
    return reducer


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


def gather_state_dicts(target: Any) -> list[dict[str, Any]]:
    """Every rank's ``state_dict()``, on every rank: entry ``i`` is rank ``i``'s (tensors on CPU).

    A collective over the group of ``target`` (a :class:`~gradwire.compressors.hook.HookState` or a
    :class:`Reducer`): call it on every rank at the same point, between steps. Whatever one process
    writes of the list is then enough to restore every rank with :func:`load_own_state`. Outside a
    process group it returns ``[state_dict()]``.
    """
    reducer = _reducer_of(target)
    mine = _on_cpu(reducer.state_dict())  # binds to the group first
    comm = reducer.comm
    if not comm.distributed or comm.world_size == 1:
        return [mine]
    states: list[Any] = [None] * comm.world_size
    dist.all_gather_object(states, mine, group=comm.group)
    return [_on_cpu(s) for s in states]


#: version of the dict :func:`all_ranks_checkpoint` makes
CHECKPOINT_VERSION = 1


def all_ranks_checkpoint(target: Any) -> dict[str, Any]:
    """Every rank's state as one checkpoint entry that a single process writes (a collective, as
    :func:`gather_state_dicts`): what the Lightning callback and the Accelerate recipe store."""
    states = gather_state_dicts(target)
    return {
        "version": CHECKPOINT_VERSION,
        "compressor": _reducer_of(target).name,
        "world_size": len(states),
        "states": states,
    }


def restore_all_ranks(target: Any, checkpoint: dict[str, Any]) -> None:
    """Load this rank's own state from an :func:`all_ranks_checkpoint` entry (no collective)."""
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"gradwire compressor checkpoint of version {checkpoint.get('version')!r}; "
            f"this gradwire reads version {CHECKPOINT_VERSION}"
        )
    running = _reducer_of(target).name
    if checkpoint.get("compressor") != running:
        raise ValueError(
            f"the checkpoint holds compressor {checkpoint.get('compressor')!r} state, "
            f"this run compresses with {running!r}"
        )
    load_own_state(target, checkpoint["states"])


def load_own_state(target: Any, states: Sequence[dict[str, Any]]) -> None:
    """Restore ``target`` from a list made by :func:`gather_state_dicts` (entry ``i``: rank ``i``).

    Same world size: this rank loads its own entry, so the run continues bit for bit. Another world
    size: the shared parts carry over as :meth:`Reducer.load_state_dict` describes for a world-size
    change (the step, PowerSGD's Q, the EF21/EControl estimates; per-rank buffers are rebuilt or
    dropped). No collective; call it after ``init_process_group``.
    """
    reducer = _reducer_of(target)
    if isinstance(states, dict) or not isinstance(states, Sequence) or not states:
        raise TypeError("states must be the non-empty list that gather_state_dicts() returned")
    for state in states:
        reducer._validate(state)
    saved_world = int(states[0]["world_size"])
    for i, state in enumerate(states):
        if int(state["world_size"]) != saved_world or int(state["rank"]) != i:
            raise ValueError(
                f"states[{i}] is rank {state['rank']} of {state['world_size']}, expected rank {i} of "
                f"{saved_world}: pass the list gather_state_dicts() returned, in its order"
            )
    if len(states) != saved_world:
        raise ValueError(
            f"states holds {len(states)} of the {saved_world} ranks' states of the saved run; "
            "save the whole list gather_state_dicts() returned"
        )
    reducer.bind()
    if saved_world == reducer.comm.world_size:
        reducer._load(states[reducer.comm.rank], same_world=True)
    else:  # the shared parts are the same in every entry
        reducer._load(states[0], same_world=False)
