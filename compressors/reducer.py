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
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from gradwire.compressors.communicator import Communicator
from gradwire.compressors.compressor import Compressor
from gradwire.compressors.config import CompressorConfig
from gradwire.compressors.feedback import make_feedback

STATE_VERSION = 1


class NonFiniteGradientError(FloatingPointError):
    """Some rank's gradient held NaN or Inf (raised on every rank at once)."""


class Reducer:
    def __init__(self, config: CompressorConfig, compressor: Compressor, process_group: Any = None):
        self.config = config
        self.compressor = compressor
        self.comm = Communicator(process_group)
        self.compressor.setup(self.comm.rank, self.comm.world_size)
        self.feedback = make_feedback(config.feedback, config.resolved_eta())
        self.step = 0
        self.nonfinite_steps = 0
        self.compress_seconds = 0.0
        self.communicate_seconds = 0.0

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
        pending = (
            self.compressor.exchange(*args, plain=plain_flat) if fused else self.compressor.exchange(*args)
        )
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

    @property
    def passthrough(self) -> bool:
        """``none`` without feedback: the bucket is all-reduced as it is, as DDP's own hook does."""
        return self.compressor.identity and self.feedback.name == "none"

    def reduce_flat_async(self, flat: torch.Tensor, advance: bool = True) -> torch.futures.Future:
        """Mean of the 1-D ``flat`` over ranks, in place, as a future (only when :attr:`passthrough`).

        What DDP's default hook does, plus the ledger and the non-finite check: the all-reduce runs
        while backward goes on, and the check (a float64 sum, no collective) runs in the future's
        callback. ``communicate_seconds`` counts from launch to completion.
        """
        if not self.passthrough:
            raise RuntimeError(f"reduce_flat_async needs 'none' without feedback, not {self.name!r}")
        nbytes = flat.numel() * flat.element_size()
        self.comm.ledger.record_uncompressed(nbytes, self.comm.world_size)
        launched = time.perf_counter()
        pending = self.comm.all_reduce_mean(flat)
        work = pending._work
        if work is None:  # not distributed: done already
            future: torch.futures.Future = torch.futures.Future()
            future.set_result([flat])
        else:
            future = work.get_future()

        def finish(done: torch.futures.Future) -> torch.Tensor:
            done.value()  # re-raises a failed collective
            self.communicate_seconds += time.perf_counter() - launched
            if not torch.isfinite(flat.sum(dtype=torch.float64)).item():
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
            return [o.fill_(float("nan")) for o in out]
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

        Same world size: everything is restored and the run continues bit for bit.
        Different world size: the step counter, PowerSGD's Q and the shared
        estimates of EF21/EControl carry over; per-worker buffers are rebuilt from
        the shared estimate (so ``ĝ = mean ĝ_i`` still holds); EF residuals and
        QSGD's per-rank RNG start afresh. The byte ledger restarts at zero.
        """
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
        same_world = state["world_size"] == self.comm.world_size
        self.step = int(state["step"])
        self.feedback.load_state_dict(state["feedback"], same_world)
        self.compressor.load_state_dict(state["compressor_state"], same_world)
        if same_world:
            self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
            self.comm.ledger.load(state.get("ledger", {}))
