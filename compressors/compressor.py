"""The compressor contract: what goes on the wire for a list of tensors.

A compressor turns each worker's tensors into payloads, runs the collectives
that aggregate them, and returns, per tensor, the aggregate (the approximate
mean across ranks) and — when an error-feedback rule asks for it — this
worker's own decoded message. Error feedback itself lives in ``feedback.py``;
the reducer wires the two together.

Two families:

* :class:`ElementwiseCompressor` encodes each tensor on its own. A *linear* one
  (``collective = "all_reduce"``: identity, fp16, bf16, shared-seed Rand-k) has
  payloads that can be summed; the others (Top-k, QSGD, sign) pack bytes that
  are all-gathered and decoded per rank. All tensors of one call travel in one
  collective.
* Compressors that run their own rounds (PowerSGD) override :meth:`exchange`.

Randomness. A compressor that draws random numbers seeds a fresh generator per tensor and step
with :func:`stream_seed` — ``(seed, rank, key, step)`` for noise private to a rank (QSGD's
rounding), ``(seed, key, step)`` for choices every rank must share (Rand-k's positions) — rather
than drawing from one stream per device. Its draws then depend on nothing but the tensor's key and
the step: not on the order DDP hands buckets over (which differs between a fresh start and a run
after DDP's bucket rebuild), so a resumed run draws exactly what the uninterrupted one drew, and no
RNG state needs saving.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from gradwire.compressors.communicator import Communicator, Pending


@dataclass
class Exchanged:
    """What one exchange returns once its collectives are done."""

    aggregates: list[torch.Tensor]
    #: this worker's decoded messages (None where the feedback rule does not need them)
    local: list[torch.Tensor] | None
    #: applies state changes (warm-start Q, RNG); the reducer skips it on non-finite steps
    commit: Callable[[], None] = field(default=lambda: None)
    #: a scalar read off the received buffers that is non-finite iff some rank's input was
    probe: torch.Tensor | None = None
    #: the aggregates live in buffers the compressor reuses next step (copy them out)
    reused: bool = False
    #: the mean of the ``plain`` buffer a ``fuses_plain`` compressor carried in its first round
    plain: torch.Tensor | None = None


class Compressor(ABC):
    name: ClassVar[str]
    #: whether the received buffers reveal a NaN/Inf in any rank's input (then the
    #: reducer needs no separate flag; otherwise it adds one element to its all-reduce)
    reveals_nonfinite: ClassVar[bool] = False
    #: sends tensors unchanged (``none``): without feedback every tensor joins the plain all-reduce
    identity: ClassVar[bool] = False
    #: ``exchange(..., plain=flat)`` all-reduces the reducer's uncompressed tensors inside its first
    #: all-reduce (one collective fewer per step) and returns their mean as ``Exchanged.plain``
    fuses_plain: ClassVar[bool] = False
    #: ``exchange(..., into=tensors)`` may write each aggregate straight into ``into[i]`` (the
    #: reducer's ``out``), once it has read ``inputs[i]`` for the last time: one copy fewer per step
    writes_into: ClassVar[bool] = False
    #: this rank's place in the group (set by :meth:`setup`; a lone compressor is rank 0 of 1)
    rank: int = 0
    world_size: int = 1

    def setup(self, rank: int, world_size: int) -> None:
        """Called by the reducer when it binds to its process group (at construction if
        ``torch.distributed`` is initialised then, else at its first use; again after unpickling).
        Must not discard state that ``load_state_dict`` restored."""
        self.rank, self.world_size = rank, world_size

    @abstractmethod
    def payload_nbytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        """Bytes this rank puts on the wire for one tensor of ``shape``."""

    def should_compress(self, t: torch.Tensor, min_compression_rate: float) -> bool:
        """Matrices (and higher) whose compressed size is small enough; the rest go plain."""
        if t.dim() < 2:
            return False
        return t.numel() * t.element_size() >= min_compression_rate * self.payload_nbytes(
            t.shape, t.dtype
        )

    @abstractmethod
    def exchange(
        self,
        inputs: Sequence[torch.Tensor],
        keys: Sequence[int],
        step: int,
        comm: Communicator,
        need_local: bool,
    ) -> Pending:
        """Start aggregating ``inputs``; the Pending resolves to :class:`Exchanged`."""

    def rollback(self) -> None:
        """Undo what a discarded (non-finite) step changed, such as RNG draws."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], same_world: bool) -> None:
        """Restore state; ``same_world`` is False when the world size changed."""


class ElementwiseCompressor(Compressor):
    """A compressor that encodes each tensor independently of the others."""

    collective: ClassVar[Literal["all_reduce", "all_gather"]]

    @abstractmethod
    def encode(self, x: torch.Tensor, key: int, step: int) -> torch.Tensor:
        """1-D payload of the flat tensor ``x`` (uint8 for all-gather compressors)."""

    @abstractmethod
    def decode(self, payload: torch.Tensor, like: torch.Tensor, key: int, step: int) -> torch.Tensor:
        """Dense flat tensor (dtype and device of ``like``) from one payload."""

    def decode_mean(
        self, payloads: torch.Tensor, like: torch.Tensor, key: int, step: int
    ) -> torch.Tensor:
        """Mean of the decoded payloads, one per rank (rows of ``payloads``)."""
        total = torch.zeros_like(like)
        for row in payloads:
            total += self.decode(row, like, key, step)
        return total.div_(payloads.shape[0])

    def probe(self, received: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """Scalar from one tensor's received payload(s), non-finite iff an input was."""
        return None

    def commit_step(self) -> None:
        """Advance internal state (RNG) after a finite step."""

    def exchange(self, inputs, keys, step, comm, need_local):
        flats = [x.reshape(-1) for x in inputs]
        payloads = [self.encode(x, k, step) for x, k in zip(flats, keys)]
        local = (
            [self.decode(p, x, k, step) for p, x, k in zip(payloads, flats, keys)]
            if need_local
            else None
        )
        sizes = [p.numel() for p in payloads]
        if not payloads:
            return Pending(None, lambda: Exchanged([], [] if need_local else None))
        buffer = torch.cat(payloads)
        reducing = self.collective == "all_reduce"
        pending = comm.all_reduce_mean(buffer) if reducing else comm.all_gather(buffer)

        def finish() -> Exchanged:
            result = pending.wait()
            aggregates, probes = [], []
            parts = result.split(sizes) if reducing else result.split(sizes, dim=1)
            for part, x, k in zip(parts, flats, keys):
                decoded = self.decode(part, x, k, step) if reducing else self.decode_mean(part, x, k, step)
                aggregates.append(decoded)
                if self.reveals_nonfinite:
                    probes.append(self.probe(part, x))
            shaped = [a.view(t.shape) for a, t in zip(aggregates, inputs)]
            local_shaped = None if local is None else [lo.view(t.shape) for lo, t in zip(local, inputs)]
            probe = torch.stack(probes).sum() if probes else None
            return Exchanged(shaped, local_shaped, self.commit_step, probe)

        return Pending(None, finish)


def as_dtype(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the bytes of ``buf`` (uint8, last dim) as ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if buf.dim() > 1 or buf.storage_offset() % itemsize or not buf.is_contiguous():
        buf = torch.empty(buf.shape, dtype=buf.dtype, device=buf.device).copy_(buf)
    return buf.view(dtype)


def stream_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (seed, rank, key, step...), the same in every process
    and Python version (a hash of their decimal text)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def seeded_generator(device: torch.device, *parts: int) -> torch.Generator:
    """A new generator on ``device`` seeded with :func:`stream_seed` of ``parts``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(*parts))
    return gen


def budget(numel: int, ratio: float | None, k: int | None) -> int:
    """Elements kept by a sparsifier: ⌈ratio·numel⌉ or k, at least 1, at most numel."""
    kept = k if k is not None else math.ceil((ratio or 0.0) * numel)
    return max(1, min(numel, kept))
