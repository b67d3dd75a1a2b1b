"""The byte ledger: one place that counts what goes on the wire.

Two figures per collective, both for *this* rank:

* payload bytes — the size of the buffer this rank contributes to the collective
  (the figure docs/algorithms.md's formulas give: PowerSGD ``4·r·Σ(a+b)``, Top-k ``8k``);
* wire bytes — what a ring algorithm actually sends for it: ``2(n−1)/n · S`` for
  an all-reduce of S bytes, ``(n−1) · S`` for an all-gather of S bytes per rank.

The uncompressed side is what a plain all-reduce of the same gradients would
have cost, so ``bytes_uncompressed / bytes_sent`` is the compression ratio and
``wire_bytes_uncompressed / wire_bytes_sent`` the traffic saving (they differ
for all-gather compressors: Top-k only saves traffic when k < d/n).
"""

from __future__ import annotations

from dataclasses import dataclass

#: an all-reduce of at most this many bytes between exactly 2 gloo ranks runs as one all-gather and a
#: local sum (:meth:`Communicator.all_reduce_mean`): each rank sends its S bytes once and receives the
#: other's, which are the ring's bytes, in one exchange instead of the ring's two (reduce-scatter,
#: then all-gather), with the same result to the bit (a sum of two numbers does not depend on their
#: order). Such payloads are latency-bound; above this size the ring's pipelining is as fast.
PAIR_GATHER_MAX_BYTES = 1 << 20


def pair_gathers(nbytes: float, world_size: int) -> bool:
    """Whether an all-reduce of ``nbytes`` runs as the 2-rank all-gather above (on gloo)."""
    return world_size == 2 and nbytes <= PAIR_GATHER_MAX_BYTES


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> float:
    return 2.0 * (world_size - 1) / world_size * nbytes


def ring_all_gather_bytes(nbytes: int, world_size: int) -> float:
    return float((world_size - 1) * nbytes)


@dataclass
class ByteLedger:
    """Cumulative counters of one rank (plain ints and floats, so it pickles and logs)."""

    bytes_sent: int = 0
    bytes_uncompressed: int = 0
    wire_bytes_sent: float = 0.0
    wire_bytes_uncompressed: float = 0.0
    collectives: int = 0

    def record_all_reduce(self, nbytes: int, world_size: int) -> None:
        self.bytes_sent += nbytes
        self.wire_bytes_sent += ring_all_reduce_bytes(nbytes, world_size)
        self.collectives += 1

    def record_all_gather(self, nbytes: int, world_size: int) -> None:
        self.bytes_sent += nbytes
        self.wire_bytes_sent += ring_all_gather_bytes(nbytes, world_size)
        self.collectives += 1

    def record_uncompressed(self, nbytes: int, world_size: int) -> None:
        """What a plain all-reduce of ``nbytes`` of gradients would have cost."""
        self.bytes_uncompressed += nbytes
        self.wire_bytes_uncompressed += ring_all_reduce_bytes(nbytes, world_size)

    def as_dict(self) -> dict[str, float]:
        # read on every training step: a shallow copy, not dataclasses.asdict's deep one
        return dict(vars(self))

    def load(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            if hasattr(self, key):
                setattr(self, key, type(getattr(self, key))(value))
