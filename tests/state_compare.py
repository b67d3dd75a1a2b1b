"""Comparing saved compressor states in tests: bitwise equality and the error-feedback residuals."""

from __future__ import annotations

from typing import Any

import torch


def bitwise_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(bitwise_equal, a, b))
    return a == b


def residuals(state: dict[str, Any]) -> dict[int, torch.Tensor]:
    """The error-feedback residual ``e`` of every tensor in a reducer state."""
    return {int(k): b["e"] for k, b in state["feedback"].items() if "e" in b}
