"""The α–β cost model of one data-parallel step: bytes and seconds per compressor (torch-free).

It lives in the compressor library so that ``compression: auto`` (``compressors/auto.py``) predicts
with the same formulas as ``gradwire plan`` (``gradwire/cli/costmodel.py`` adds the calibration file
and the parsing of user input).

What one step sends is read off the code, not guessed: DDP hands the gradients to the hook in buckets
(:func:`ddp_buckets`), and each bucket is one ``Reducer.reduce`` call (``compressors/reducer.py``),
which issues, per call (:func:`reduce_collectives`):

* one all-reduce of every tensor sent plain (1-D tensors, tensors the compressor would not shrink
  by ``min_compression_rate``, and all tensors during warm-up or an EF21-style dense first round),
  plus one flag element for compressors that do not reveal NaN/Inf in their payloads (Rand-k);
  ``none`` without feedback is this all-reduce alone;
* for the compressed tensors: fp16/bf16/Rand-k one all-reduce of their payloads, Top-k/QSGD/sign
  one all-gather of their byte payloads, PowerSGD an all-reduce of all P's (carrying the plain
  tensors too, so it issues no separate plain all-reduce) and then one of all Q's.

Byte counts follow the ledger (``compressors/ledger.py``): *payload* bytes are the buffer a rank
hands to a collective, *wire* bytes what a ring sends for it. Seconds follow the α–β model, with
``α`` the cost of one message and ``B`` the link's bandwidth (bytes/s), for a ring over n ranks:

* all-reduce of m bytes: reduce-scatter + all-gather, 2(n−1) steps of m/n bytes each:
  ``2(n−1)·α + 2(n−1)/n · m/B`` when every host has its own full-duplex link ("switch"), and
  ``2(n−1)·α + 2(n−1) · m/B`` when all hosts share one link ("shared": all n ranks' traffic crosses it);
* all-gather of m bytes per rank: n−1 steps of m bytes each: ``(n−1)·α + (n−1) · m/B`` (switch),
  ``(n−1)·α + n(n−1) · m/B`` (shared).

Step time = compute (forward + backward + optimizer) + the compression and communication that backward
does not hide. DDP hands a bucket to the hook as soon as its gradients are ready; the gradwire hook
reduces the buckets in order on one background thread (``none`` without feedback: asynchronous
all-reduces, which gloo runs in order), so a bucket's work overlaps the backward of the layers before it,
and what is left when backward ends is exposed (:func:`predict_step`; without measured ready times,
nothing overlaps and the prediction is an upper bound). Within a bucket PowerSGD's P and Q rounds run one
after the other; collectives launched together (the plain all-reduce beside the compressed one) share
the link: their bandwidth terms add, their latency terms overlap.

Shaped lab links (``tc tbf``) also have a token bucket of ``burst`` bytes: the bytes of a step that
fit in the tokens gathered while the link was idle pass at line speed. With ``burst = 0`` (a real
link) the model is exactly α–β; see :func:`predict_step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gradwire.compressors.config import ESTIMATE_RULES, CompressorConfig
from gradwire.compressors.ledger import pair_gathers

Shape = tuple[int, ...]
TOPOLOGIES = ("switch", "shared")
DDP_FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 << 20  # DDP's default bucket_cap_mb = 25

#: compressors whose received buffers reveal a NaN/Inf (else the plain all-reduce carries a flag)
_REVEALS_NONFINITE = {"none", "fp16", "bf16", "powersgd", "topk", "qsgd", "sign"}
_GATHERING = {"topk", "qsgd", "sign"}
MODELLED = ("none", "fp16", "bf16", "powersgd", "topk", "randk", "qsgd", "sign")


class UnmodelledCompressorError(ValueError):
    """A compressor (a plug-in) whose wire format the cost model does not know."""


# --- shapes and DDP buckets ------------------------------------------------------------------


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def ddp_bucket_indices(
    shapes: Sequence[Shape],
    itemsize: int = 4,
    first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES,
    bucket_bytes: int = DDP_BUCKET_BYTES,
) -> list[list[int]]:
    """The buckets (parameter indices) DDP hands to a comm hook after its first step (it rebuilds them
    then). Gradients become ready roughly in reverse order of the parameters, so the parameters are
    taken from the last; a bucket closes once it holds at least its cap (1 MiB for the first, 25 MiB
    after), as ``compute_bucket_assignment_by_size`` does. (Step 0 runs as a single bucket.)
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    size, cap = 0, first_bucket_bytes
    for i in reversed(range(len(shapes))):
        current.append(i)
        size += numel(shapes[i]) * itemsize
        if size >= cap:
            buckets.append(current)
            current, size, cap = [], 0, bucket_bytes
    if current:
        buckets.append(current)
    return buckets


def ddp_buckets(shapes: Sequence[Shape], itemsize: int = 4, **caps: int) -> list[list[Shape]]:
    """:func:`ddp_bucket_indices` as shapes."""
    return [[tuple(shapes[i]) for i in b] for b in ddp_bucket_indices(shapes, itemsize, **caps)]


# --- what one reduce() call sends ------------------------------------------------------------


@dataclass(frozen=True)
class Collective:
    """One collective of one rank: ``kind`` all_reduce | all_gather, ``nbytes`` its buffer (the ledger's
    payload bytes). Collectives of one ``reduce()`` call with the same ``round`` are in flight together."""

    kind: str
    nbytes: int
    round: int = 0

    def wire_bytes(self, n: int) -> float:
        """What this rank sends for it in a ring (ledger.py's formulas)."""
        if self.kind == "all_reduce":
            return 2.0 * (n - 1) / n * self.nbytes
        return float((n - 1) * self.nbytes)


def _budget(d: int, ratio: float | None, k: int | None) -> int:
    kept = k if k is not None else math.ceil((ratio or 0.0) * d)  # compressors/compressor.py:budget
    return max(1, min(d, kept))


def _sparse_budget(config: Any) -> tuple[float | None, int | None]:
    return config.budget()


def _powersgd_rank(config: Any, shape: Shape) -> tuple[int, int, int]:
    a = shape[0]
    b = numel(shape) // a
    return a, b, min(config.rank, a, b)


def payload_nbytes(config: CompressorConfig, shape: Shape, itemsize: int = 4) -> int:
    """Bytes a rank puts on the wire for one compressed tensor (each compressor's ``payload_nbytes``)."""
    name, d = config.registry_name(), numel(shape)
    if name == "none":
        return d * itemsize
    if name in ("fp16", "bf16"):
        return d * 2
    if name == "powersgd":
        a, b, r = _powersgd_rank(config, shape)
        return itemsize * r * (a + b)
    if name == "topk":
        return _budget(d, *_sparse_budget(config)) * (itemsize + 4)
    if name == "randk":
        return _budget(d, *_sparse_budget(config)) * itemsize
    if name == "qsgd":
        return d + itemsize * math.ceil(d / config.bucket_size)
    if name == "sign":
        blocks = math.ceil(d / config.block) if config.block else 1
        return config.bits * (math.ceil(d / 8) + itemsize * blocks)
    raise UnmodelledCompressorError(
        f"the cost model does not know compressor {name!r}; it models {', '.join(MODELLED)}"
    )


def compresses(config: CompressorConfig, shape: Shape, itemsize: int = 4) -> bool:
    """``Compressor.should_compress``: matrices whose payload is small enough."""
    if len(shape) < 2:
        return False
    return numel(shape) * itemsize >= config.min_compression_rate * payload_nbytes(config, shape, itemsize)


def dense_step(config: CompressorConfig, step: int) -> bool:
    """Whether ``step`` sends everything plain: warm-up, or the dense first round of EF21-style rules."""
    first = 1 if config.feedback in ESTIMATE_RULES else 0
    return step < max(config.start_iter, first)


def reduce_collectives(
    shapes: Sequence[Shape], config: CompressorConfig, itemsize: int = 4, step: int | None = None
) -> list[Collective]:
    """The collectives one ``Reducer.reduce`` call over tensors of ``shapes`` issues (``step``: the
    reducer's step counter; None for the steady state after warm-up)."""
    name = config.registry_name()
    if name not in MODELLED:
        payload_nbytes(config, (1, 1))  # raises UnmodelledCompressorError
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        return []
    if name == "none" and config.feedback == "none":
        return [Collective("all_reduce", sum(map(numel, shapes)) * itemsize)]
    dense = step is not None and dense_step(config, step)
    chosen = [s for s in shapes if not dense and compresses(config, s, itemsize)]
    plain = sum(map(numel, shapes)) - sum(map(numel, chosen))
    flag = 0 if name in _REVEALS_NONFINITE else 1
    out = []
    if name == "powersgd" and chosen:  # the plain tensors ride in the P all-reduce (fuses_plain)
        ranks = [_powersgd_rank(config, s) for s in chosen]
        out.append(Collective("all_reduce", itemsize * (plain + sum(a * r for a, _, r in ranks))))
        out.append(Collective("all_reduce", itemsize * sum(b * r for _, b, r in ranks), round=1))
        return out
    if plain + flag:
        out.append(Collective("all_reduce", (plain + flag) * itemsize))
    if chosen:
        kind = "all_gather" if name in _GATHERING else "all_reduce"
        out.append(Collective(kind, sum(payload_nbytes(config, s, itemsize) for s in chosen)))
    return out


@dataclass(frozen=True)
class StepTraffic:
    """What one rank sends in one step: the collectives of each bucket, in order."""

    buckets: tuple[tuple[Collective, ...], ...]
    dense_bytes: int  # a plain fp32 all-reduce's payload (the ledger's bytes_uncompressed)
    bucket_bytes: tuple[int, ...] = ()  # each bucket's gradient bytes

    @property
    def collectives(self) -> list[Collective]:
        return [c for bucket in self.buckets for c in bucket]

    @property
    def payload_bytes(self) -> int:
        return sum(c.nbytes for c in self.collectives)

    def wire_bytes(self, n: int) -> float:
        return sum(c.wire_bytes(n) for c in self.collectives)


def step_traffic(
    buckets: Sequence[Sequence[Shape]], config: CompressorConfig, itemsize: int = 4, step: int | None = None
) -> StepTraffic:
    per_bucket = tuple(tuple(reduce_collectives(b, config, itemsize, step)) for b in buckets)
    sizes = tuple(sum(numel(s) for s in b) * itemsize for b in buckets)
    return StepTraffic(per_bucket, sum(sizes), sizes)


# --- seconds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network: ``bandwidth`` bytes/s per link, ``latency`` α seconds per message, ``topology`` switch
    (a full-duplex link per host) or shared (one link for all), ``burst`` a token bucket's depth in
    bytes (tc tbf in the lab; 0 for a real link)."""

    bandwidth: float
    latency: float
    topology: str = "switch"
    burst: float = 0.0

    def __post_init__(self) -> None:
        if not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ValueError(f"bandwidth must be a positive number of bytes/s, got {self.bandwidth!r}")
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"latency must be >= 0 seconds, got {self.latency!r}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if not self.burst >= 0:
            raise ValueError(f"burst must be >= 0 bytes, got {self.burst!r}")


def collective_terms(kind: str, nbytes: float, n: int, topology: str = "switch") -> tuple[int, float]:
    """(messages in sequence, bytes across the busiest link) of one ring collective on n ranks."""
    if n < 1:
        raise ValueError(f"need at least one worker, got n={n}")
    if n == 1:
        return 0, 0.0
    if kind == "all_reduce":
        steps, per_rank = 2 * (n - 1), 2.0 * (n - 1) / n * nbytes
    elif kind == "all_gather":
        steps, per_rank = n - 1, float((n - 1) * nbytes)
    else:
        raise ValueError(f"unknown collective {kind!r}")
    return steps, per_rank * (n if topology == "shared" else 1)


def reducer_terms(kind: str, nbytes: float, n: int, topology: str = "switch") -> tuple[int, float]:
    """:func:`collective_terms` of a collective as the reducer's communicator runs it on gloo: an
    all-reduce of at most ``PAIR_GATHER_MAX_BYTES`` between 2 ranks is one all-gather (ledger.py),
    one message instead of two, the same bytes. The link probes of :func:`fit_link` are ring
    all-reduces and keep :func:`collective_terms`."""
    if kind == "all_reduce" and pair_gathers(nbytes, n):
        return collective_terms("all_gather", nbytes, n, topology)
    return collective_terms(kind, nbytes, n, topology)


def all_reduce_seconds(nbytes: float, n: int, link: Link) -> float:
    steps, busiest = collective_terms("all_reduce", nbytes, n, link.topology)
    return steps * link.latency + busiest / link.bandwidth


def all_gather_seconds(nbytes: float, n: int, link: Link) -> float:
    steps, busiest = collective_terms("all_gather", nbytes, n, link.topology)
    return steps * link.latency + busiest / link.bandwidth


def bucket_terms(traffic: StepTraffic, n: int, link: Link) -> tuple[list[float], list[float]]:
    """Per bucket of ``traffic``: its α seconds (per round, the longest chain of messages of the
    collectives in flight together) and the bytes its collectives put across the busiest link."""
    latencies, volumes = [], []
    for bucket in traffic.buckets:
        latency, volume = 0.0, 0.0
        for rnd in sorted({c.round for c in bucket}):
            terms = [reducer_terms(c.kind, c.nbytes, n, link.topology) for c in bucket if c.round == rnd]
            latency += max(steps for steps, _ in terms) * link.latency
            volume += sum(busiest for _, busiest in terms)
        latencies.append(latency)
        volumes.append(volume)
    return latencies, volumes


def bandwidth_for(traffic: StepTraffic, n: int, link: Link, seconds: float) -> float | None:
    """The bandwidth at which ``traffic``'s collectives take ``seconds`` on ``link``'s α and topology
    (no token bucket, nothing hidden): what a step's measured communication says about the link, the
    inverse of :func:`predict_step`'s ``comm_s``. None when the traffic moves no bytes or ``seconds``
    does not exceed its α terms (nothing left for the bandwidth to explain)."""
    latencies, volumes = bucket_terms(traffic, n, link)
    transfer = seconds - sum(latencies)
    if sum(volumes) <= 0 or not transfer > 0:
        return None
    return sum(volumes) / transfer


@dataclass(frozen=True)
class StepPrediction:
    compute_s: float
    compress_s: float
    latency_s: float  # α terms
    transfer_s: float  # bandwidth terms (after the token bucket, if any)
    payload_bytes: int
    wire_bytes: float
    exposed_s: float  # compression + communication not hidden behind backward

    @property
    def comm_s(self) -> float:
        return self.latency_s + self.transfer_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s


def predict_step(
    traffic: StepTraffic,
    n: int,
    link: Link,
    compute_s: float = 0.0,
    compress_s: float = 0.0,
    windows: Sequence[float] | None = None,
    spare_cores: bool = True,
) -> StepPrediction:
    """Predicted step time of ``traffic`` on ``n`` workers.

    Latency: per bucket and round, the longest chain of messages of the collectives in flight
    together, times α. Bandwidth: V = the bytes all collectives put across the busiest link; a token
    bucket of depth b refills at B while the link is idle (for G = compute + compression + latency
    seconds per step), so ``max(0, V − min(b, B·G)) / B`` seconds remain (``V / B`` for b = 0).

    Overlap: ``windows[i]`` is the backward compute still to come when DDP hands bucket i to the hook.
    The hook works through the buckets in order on one thread (``none``: gloo runs the asynchronous
    all-reduces in order), each taking its share of compression (by elements) plus its latency and
    transfer; what runs past the end of backward is exposed. Without ``windows`` nothing overlaps:
    exposed = compression + communication. Without ``spare_cores`` (more busy threads than cores, as
    when n ranks share this machine's 2 cores) compression competes with backward for the cores and is
    never hidden; only communication overlaps.
    """
    if n > 1 and windows is not None and len(windows) != len(traffic.buckets):
        raise ValueError(f"got {len(windows)} overlap windows for {len(traffic.buckets)} buckets")
    latencies, volumes = bucket_terms(traffic, n, link)
    latency, volume = sum(latencies), sum(volumes)
    idle = compute_s + compress_s + latency
    transfer = max(0.0, volume - min(link.burst, link.bandwidth * idle)) / link.bandwidth
    sizes = traffic.bucket_bytes
    finish = -math.inf
    for i, (lat, vol) in enumerate(zip(latencies, volumes)):
        work = lat + (transfer * vol / volume if volume else 0.0)
        work += compress_s * sizes[i] / sum(sizes) if spare_cores else 0.0
        handed = -(windows[i] if windows is not None and n > 1 else 0.0)
        finish = max(handed, finish) + work
    exposed = (max(0.0, finish) if traffic.buckets else 0.0) + (0.0 if spare_cores else compress_s)
    return StepPrediction(
        compute_s, compress_s, latency, transfer, traffic.payload_bytes, traffic.wire_bytes(n), exposed
    )


# --- compression time -----------------------------------------------


@dataclass(frozen=True)
class CompressTime:
    """Compression seconds per step: ``base_s`` at one worker (encode, decode, feedback) plus, for
    all-gather compressors, ``per_rank_s`` for decoding each further rank's payload."""

    base_s: float
    per_rank_s: float = 0.0

    def seconds(self, n: int) -> float:
        return self.base_s + self.per_rank_s * max(0, n - 1)


def config_label(config: CompressorConfig) -> str:
    """A short name of a configuration: ``powersgd r=2``, ``topk 1% ef``, ``qsgd s=127``."""
    name = config.registry_name()
    if name == "powersgd":
        text = f"powersgd r={config.rank}"
    elif name in ("topk", "randk"):
        ratio, k = _sparse_budget(config)
        text = f"{name} {ratio * 100:g}%" if k is None else f"{name} k={k}"
    elif name == "qsgd":
        text = f"qsgd s={config.levels}"
    elif name == "sign":
        text = "sign" + (f" {config.bits}-bit" if config.bits != 1 else "")
        text += f" block={config.block}" if config.block else ""
    else:
        text = name
    default_feedback = type(config).model_fields["feedback"].default
    if config.feedback != default_feedback or (config.feedback != "none" and name != "powersgd"):
        text += f" {config.feedback}"
    return text


# --- fitting α and B to timed collectives ------------------------------------------------------


#: the bandwidth (bytes/s) :func:`fit_link` gives a link whose transfer time its probes could not resolve
UNRESOLVED_BANDWIDTH = 1e15


def fit_link(samples: Sequence[tuple[str, float, float]], n: int, topology: str = "switch") -> Link:
    """The :class:`Link` whose ring formulas best explain timed collectives on ``n`` ranks.

    ``samples``: ``(kind, nbytes, seconds)``, kind all_reduce or all_gather. Each collective costs
    ``steps·α + volume/B`` (:func:`collective_terms`), linear in α and 1/B, so this is least squares on
    those two unknowns (with two sizes, the exact solution). A fit that would make α or 1/B negative
    (timing noise) pins that term at zero and fits the other one alone; bandwidth is capped at
    ``UNRESOLVED_BANDWIDTH`` bytes/s (a link whose transfer time the probes could not resolve). Without
    burst: a real link's.
    """
    if n < 2:
        raise ValueError(f"fitting a link needs at least 2 ranks, got n={n}")
    rows = []
    for kind, nbytes, seconds in samples:
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"a timed {kind} of {nbytes} bytes took {seconds!r} s: not a duration")
        steps, volume = collective_terms(kind, nbytes, n, topology)
        rows.append((float(steps), float(volume), float(seconds)))
    if len({volume for _, volume, _ in rows}) < 2:
        raise ValueError("fitting a link needs collectives of at least two sizes")
    ss = sum(s * s for s, _, _ in rows)
    sv = sum(s * v for s, v, _ in rows)
    vv = sum(v * v for _, v, _ in rows)
    st = sum(s * t for s, _, t in rows)
    vt = sum(v * t for _, v, t in rows)
    det = ss * vv - sv * sv
    alpha, inverse_b = ((st * vv - sv * vt) / det, (ss * vt - sv * st) / det) if det > 0 else (-1.0, -1.0)
    if inverse_b <= 0:  # transfer time below what the probes resolve: latency alone
        alpha, inverse_b = max(0.0, st / ss), 0.0
    elif alpha < 0:  # latency below what the probes resolve: bandwidth alone
        alpha, inverse_b = 0.0, vt / vv
    bandwidth = UNRESOLVED_BANDWIDTH if inverse_b <= 1 / UNRESOLVED_BANDWIDTH else 1.0 / inverse_b
    return Link(bandwidth=bandwidth, latency=alpha, topology=topology)
