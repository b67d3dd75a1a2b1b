"""`gradwire plan`'s side of the α–β cost model: this machine's calibration file and the parsing of
bandwidths and latencies a user types.

The model itself (bytes per collective, ring formulas, the step prediction) is
:mod:`gradwire.compressors.costmodel`, shared with ``compression: auto``; its names are re-exported
here so that ``gradwire.cli.costmodel`` stays the one import for the command and the benchmarks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradwire.compressors.config import CompressorConfig
from gradwire.compressors.costmodel import (
    DDP_BUCKET_BYTES,
    DDP_FIRST_BUCKET_BYTES,
    MODELLED,
    TOPOLOGIES,
    Collective,
    CompressTime,
    Link,
    Shape,
    StepPrediction,
    StepTraffic,
    UnmodelledCompressorError,
    all_gather_seconds,
    all_reduce_seconds,
    collective_terms,
    compresses,
    config_label,
    ddp_bucket_indices,
    ddp_buckets,
    dense_step,
    numel,
    payload_nbytes,
    predict_step,
    reduce_collectives,
    step_traffic,
)

__all__ = [
    "CALIBRATION_PATH",
    "DDP_BUCKET_BYTES",
    "DDP_FIRST_BUCKET_BYTES",
    "MODELLED",
    "TOPOLOGIES",
    "Calibration",
    "Collective",
    "CompressTime",
    "Link",
    "Shape",
    "StepPrediction",
    "StepTraffic",
    "UnmodelledCompressorError",
    "all_gather_seconds",
    "all_reduce_seconds",
    "collective_terms",
    "compresses",
    "config_label",
    "ddp_bucket_indices",
    "ddp_buckets",
    "dense_step",
    "model_key",
    "numel",
    "parse_bandwidth",
    "parse_latency",
    "payload_nbytes",
    "predict_step",
    "reduce_collectives",
    "step_traffic",
]

CALIBRATION_PATH = Path(__file__).with_name("calibration.json")


def model_key(model: str, model_params: Mapping[str, Any], dataset: str,
              data_params: Mapping[str, Any], batch_size: int) -> str:
    """The calibration file's key of a spec's model and batch."""
    canon = json.dumps({"model": model, "params": dict(model_params), "data": dataset,
                        "data_params": dict(data_params), "batch": batch_size}, sort_keys=True)
    return re.sub(r"\s+", "", canon)


@dataclass
class Calibration:
    """This machine's measurements (``gradwire/cli/calibration.json``, written by benchmarks/costmodel.py).

    ``latency_s``: α of one gloo message between two hosts (veth, unshaped); ``efficiency``: goodput /
    nominal rate of a shaped link; ``models``: per model key, ``compute_ms`` (forward + backward +
    optimizer), ``windows`` (per DDP bucket, the fraction of compute still to come when the bucket is
    ready) and, per configuration label, ``compress_ms`` and ``per_rank_ms``; ``rates``: per compressor name,
    fitted ``compress_ms = call_ms + ns_per_element·d/1e6`` (and ``per_rank_ns_per_element``) for models
    that were not measured.
    """

    latency_s: float = 100e-6
    efficiency: float = 1.0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> Calibration:
        path = path or CALIBRATION_PATH
        if not path.exists():
            return cls(source=f"{path} (missing: defaults)")
        data = json.loads(path.read_text())
        return cls(
            latency_s=float(data["latency_s"]),
            efficiency=float(data.get("efficiency", 1.0)),
            models=dict(data.get("models", {})),
            rates=dict(data.get("rates", {})),
            source=str(path),
        )

    def compute_s(self, key: str) -> float | None:
        entry = self.models.get(key)
        return None if entry is None else entry["compute_ms"] / 1e3

    def windows(self, key: str, compute_s: float) -> list[float] | None:
        """Per bucket, the backward compute left when it is handed over (stored as fractions of compute)."""
        fractions = self.models.get(key, {}).get("windows")
        return None if fractions is None else [f * compute_s for f in fractions]

    def compress_time(self, key: str, config: CompressorConfig, elements: int) -> CompressTime | None:
        """Measured for this model and configuration, else from the compressor's fitted rates."""
        measured = self.models.get(key, {}).get("compress", {}).get(config_label(config))
        if measured is not None:
            return CompressTime(measured["compress_ms"] / 1e3, measured.get("per_rank_ms", 0.0) / 1e3)
        rate = self.rates.get(config.registry_name())
        if rate is None:
            return None
        base = rate["call_ms"] / 1e3 + rate["ns_per_element"] * elements / 1e9
        return CompressTime(base, rate.get("per_rank_ns_per_element", 0.0) * elements / 1e9)


# --- parsing user input ----------------------------------------------------------------------

_BANDWIDTH_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)(bit|bps)(/s)?$")
_LATENCY_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(ns|us|µs|ms|s)$")
_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_bandwidth(text: str) -> float:
    """``"10Gbit"``, ``"100mbit/s"``, ``"1.5Gbps"`` -> bytes per second (SI prefixes, bits)."""
    raw = str(text).strip()
    if raw.startswith("-"):
        raise ValueError(f"bandwidth {text!r} is negative; give a positive rate such as 10Gbit")
    match = _BANDWIDTH_RE.match(raw.lower())
    if not match:
        raise ValueError(
            f"bandwidth {text!r} is not understood: give a number and a unit in bits per second, "
            "e.g. 100Mbit, 1Gbit, 10gbit, 1.5Gbit/s (units bit, kbit, Mbit, Gbit, Tbit)"
        )
    bits = float(match.group(1)) * _PREFIX[match.group(2)]
    if not (bits > 0 and math.isfinite(bits)):
        raise ValueError(f"bandwidth {text!r} must be positive")
    return bits / 8


def parse_latency(text: str) -> float:
    """``"20us"``, ``"0.5ms"``, ``"0"`` -> seconds."""
    raw = str(text).strip()
    if raw.startswith("-"):
        raise ValueError(f"latency {text!r} is negative; give 0 or more, e.g. 20us")
    if raw in ("0", "0.0"):
        return 0.0
    match = _LATENCY_RE.match(raw.lower())
    if not match:
        raise ValueError(
            f"latency {text!r} is not understood: give a number and a unit, e.g. 20us, 0.5ms, 1s"
        )
    seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"latency {text!r} is not finite")
    return seconds
