"""Rates and the tc parameters that make a link of a given rate.

Rates are bits per second, SI prefixes (1 kbit = 1000 bit), as ``tc`` reads them. ``tc`` itself reads
a bare number as *bytes* per second and ``mbps`` as megabytes per second, so this module only hands
it explicit units (``...bit`` for rates, ``...b`` for byte sizes) and refuses the ambiguous
``bps``-style spellings instead of guessing.

Parameters (see docs/netlab.md for the measurements behind them):

* burst (the token bucket depth) = max(``MIN_BURST_BYTES``, ``BURST_SECONDS`` of traffic at the rate).
  It must hold the largest packet the device hands over in one piece: 64 KiB on ``lo`` (its MTU is
  65536) and 64 KiB GSO super-packets on veth; a bucket smaller than a non-GSO packet drops that packet
  for good, and transfers stall. At high rates the bucket also has to cover the time between two timer
  wake-ups, or the link runs below its rate.
* limit (the queue in front of the bucket) = burst + max(``MIN_QUEUE_BYTES``, ``QUEUE_SECONDS`` of traffic
  at the rate): deep enough that TCP keeps the link busy, short enough that ACKs queued behind data
  (both directions of a link busy, as in a ring all-reduce) do not slow the reverse flow; with a 50 ms
  queue, opposite flows on one link measured 0.85-0.92 of the rate instead of 0.95.
* htb (alternative to tbf): one class, rate = ceil = the rate, the same burst for ``burst`` and ``cburst``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_BURST_BYTES = 128 * 1024
BURST_SECONDS = 0.002
MIN_QUEUE_BYTES = 128 * 1024
QUEUE_SECONDS = 0.01
QDISCS = ("tbf", "htb")

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*([a-z]*)\s*$")


def parse_rate(rate: str | int | None) -> int | None:
    """``"100mbit"`` -> 100_000_000 bits/s. Units: bit, kbit, mbit, gbit (any case: ``"1Gbit"``); an int
    is bits/s. ``None`` or ``"none"`` (also ``"unshaped"``) -> None, an unshaped link. Anything else,
    or a rate that is not positive, raises ValueError naming it."""
    if rate is None:
        return None
    if isinstance(rate, bool):
        raise ValueError(f"rate {rate!r} is not a rate: give e.g. '100mbit', '1gbit' or None")
    if isinstance(rate, int):
        if rate <= 0:
            raise ValueError(f"rate {rate!r} must be positive (bits per second)")
        return rate
    if not isinstance(rate, str):
        raise ValueError(f"rate {rate!r} is not a rate: give a string such as '100mbit', '1gbit' or None")
    text = rate.strip().lower()
    if text in ("none", "unshaped"):
        return None
    match = _RATE_RE.match(text)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(
            f"rate {rate!r} is not understood: give a number with one of the units "
            f"{', '.join(_UNITS)} (bits per second, SI prefixes), e.g. '100mbit', or 'none'"
        )
    bits = float(match.group(1)) * _UNITS[match.group(2)]
    if bits < 1:
        raise ValueError(f"rate {rate!r} must be positive (at least 1 bit/s)")
    return round(bits)


def format_rate(bits: int | None) -> str:
    """100_000_000 -> '100mbit'; None -> 'unshaped'."""
    if bits is None:
        return "unshaped"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale and bits % scale == 0:
            return f"{bits // scale}{unit}"
    return f"{bits}bit"


@dataclass(frozen=True)
class Shape:
    """The qdisc parameters for one direction of one link."""

    rate_bits: int
    burst_bytes: int
    limit_bytes: int
    qdisc: str = "tbf"

    @classmethod
    def for_rate(cls, rate_bits: int, qdisc: str = "tbf") -> Shape:
        if qdisc not in QDISCS:
            raise ValueError(f"qdisc {qdisc!r} is not one of {', '.join(QDISCS)}")
        per_second = rate_bits / 8
        burst = max(MIN_BURST_BYTES, round(per_second * BURST_SECONDS))
        limit = burst + max(MIN_QUEUE_BYTES, round(per_second * QUEUE_SECONDS))
        return cls(rate_bits, burst, limit, qdisc)

    def tc_commands(self, dev: str) -> list[list[str]]:
        """The ``tc`` argument lists (without ``tc -n NS``) that put this shape on ``dev``'s egress."""
        rate = f"{self.rate_bits}bit"
        if self.qdisc == "tbf":
            return [[
                "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                "burst", f"{self.burst_bytes}b", "limit", f"{self.limit_bytes}b",
            ]]
        # htb: one class that all traffic falls into (default 1); the leaf queue is a byte-limited fifo
        return [
            ["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
            [
                "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", rate,
                "ceil", rate, "burst", f"{self.burst_bytes}b", "cburst", f"{self.burst_bytes}b",
                "quantum", "200000",
            ],
            ["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "bfifo", "limit",
             f"{self.limit_bytes}b"],
        ]

    def describe(self) -> str:
        return (
            f"{self.qdisc} rate {format_rate(self.rate_bits)} burst {self.burst_bytes} B "
            f"limit {self.limit_bytes} B"
        )
