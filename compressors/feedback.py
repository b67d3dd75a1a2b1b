"""Error-feedback rules around a compressor ``C``.

Every rule keeps per-tensor state keyed by a stable tensor key (a parameter's
slot, never a DDP bucket index). One step for one tensor runs, in order:

``p = prepare(key, g)``      the vector handed to the compressor;
``commit_local(...)``        update this worker's buffers from its own decoded message;
``output(key, aggregate)``   update the shared estimate and return the step's gradient.

The reducer calls the last two only when every rank's gradient was finite, so a
NaN never enters the buffers. Gradient-unit conventions throughout (the
learning rate lives in the optimizer; docs/algorithms.md §2.2).

Rules (docs/algorithms.md §2–4):

* ``none``      ``p = g``; output the aggregate.
* ``ef``        ``p = g + e``; ``e ← p − C(p)`` (Seide et al. 2014; Karimireddy et al.
  2019). For PowerSGD ``C(p)`` is the aggregated reconstruction (Vogels et al. 2019).
* ``ef21``      ``c_i = C(g_i − ĝ_i)``; ``ĝ_i += c_i``; ``ĝ += mean_i c_i`` and the
  output is ``ĝ`` (Richtárik, Sokolov, Fatkhullin 2021, Alg. 1).
* ``ef21-sgdm`` as ef21 on the momentum ``v_i = (1−η)v_i + η g_i`` (Fatkhullin et al. 2023).
* ``econtrol``  ``Δ_i = C(η e_i + g_i − h_i)``; ``e_i += g_i − h_i − Δ_i``; ``h_i += Δ_i``;
  ``h += mean_i Δ_i`` and the output is ``h`` (Gao, Islamov, Stich 2024).

The estimate rules (ef21, ef21-sgdm, econtrol) start from one uncompressed round,
``ĝ_i⁰ = g_i⁰`` and ``ĝ⁰ = mean_i g_i⁰`` (as the reference code does), taken on the
first step a tensor is seen (or on every warm-up step).
"""

from __future__ import annotations

from typing import Any

import torch

Buffers = dict[str, torch.Tensor]


class Feedback:
    name = "none"
    #: the rule needs this worker's own decoded message
    needs_local = False
    #: the rule tracks an estimate that starts from a dense round
    estimates = False

    def __init__(self, eta: float = 0.0):
        self.eta = eta
        self.state: dict[int, Buffers] = {}

    def needs_dense_init(self, key: int) -> bool:
        return self.estimates and key not in self.state

    def prepare(self, key: int, g: torch.Tensor) -> torch.Tensor:
        return g

    def commit_local(self, key: int, g: torch.Tensor, p: torch.Tensor, local: torch.Tensor) -> None:
        """Update this worker's buffers after a finite step."""

    def output(self, key: int, aggregate: torch.Tensor) -> torch.Tensor:
        return aggregate

    def init_dense(self, key: int, g: torch.Tensor, mean: torch.Tensor) -> None:
        """A step that was sent uncompressed (warm-up or the first round)."""

    # --- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[int, dict[str, torch.Tensor]]:
        return {k: {n: t.detach().cpu().clone() for n, t in b.items()} for k, b in self.state.items()}

    def load_state_dict(self, state: dict[Any, dict[str, torch.Tensor]], same_world: bool) -> None:
        if same_world:
            self.state = {int(k): {n: t.clone() for n, t in b.items()} for k, b in state.items()}
        else:
            rebuilt = {int(k): self.reshard(b) for k, b in state.items()}
            self.state = {k: b for k, b in rebuilt.items() if b}

    def reshard(self, buffers: dict[str, torch.Tensor]) -> Buffers:
        """Per-worker buffers for a new world size: rebuilt from the shared ones."""
        return {}

    def place(self, key: int, like: torch.Tensor) -> Buffers:
        """This key's buffers on the device and dtype of ``like`` (after a load)."""
        buffers = self.state.get(key, {})
        for name, t in buffers.items():
            if t.device != like.device or t.dtype != like.dtype:
                buffers[name] = t.to(like.device, like.dtype)
        return buffers


class NoFeedback(Feedback):
    name = "none"


class ErrorFeedback(Feedback):
    name = "ef"
    needs_local = True

    def __init__(self, eta: float = 0.0):
        super().__init__(eta)
        self._scratch: dict[int, torch.Tensor] = {}  # p = g + e, reused every step

    def prepare(self, key, g):
        e = self.place(key, g).get("e")
        if e is None:
            return g
        p = self._scratch.get(key)
        if p is None or p.shape != g.shape or p.dtype != g.dtype or p.device != g.device:
            p = self._scratch[key] = torch.empty_like(g)
        return torch.add(g, e, out=p)

    def commit_local(self, key, g, p, local):
        e = self.state.get(key, {}).get("e")
        if e is None:
            self.state[key] = {"e": p - local}
        else:
            torch.sub(p, local, out=e)  # in place: no allocation per step

    def reshard(self, buffers):
        # A residual belongs to the worker that made it; a new world starts with none
        # (at most one step's worth of unsent gradient per old worker is dropped).
        return {}


class _SharedEstimate(Feedback):
    """Rules whose output is a shared estimate updated by the mean decoded message."""

    needs_local = True
    estimates = True
    #: the buffer holding the shared estimate (identical on every rank)
    shared = ""

    def output(self, key, aggregate):
        estimate = self.state[key][self.shared]
        estimate += aggregate
        return estimate.clone()


class EF21(_SharedEstimate):
    name = "ef21"
    shared = "g"

    def prepare(self, key, g):
        return g - self.place(key, g)["g_i"]

    def commit_local(self, key, g, p, local):
        self.state[key]["g_i"] += local

    def init_dense(self, key, g, mean):
        self.state[key] = {"g_i": g.clone(), "g": mean.clone()}

    def reshard(self, buffers):
        # g_i = g on every new worker keeps the invariant g = mean_i g_i.
        return {"g": buffers["g"].clone(), "g_i": buffers["g"].clone()}


class EF21SGDM(EF21):
    name = "ef21-sgdm"

    def __init__(self, eta: float = 0.1):
        super().__init__(eta)
        self._next_v: dict[int, torch.Tensor] = {}

    def prepare(self, key, g):
        b = self.place(key, g)
        v = b["v"] + self.eta * (g - b["v"])
        self._next_v[key] = v
        return v - b["g_i"]

    def commit_local(self, key, g, p, local):
        super().commit_local(key, g, p, local)
        self.state[key]["v"] = self._next_v.pop(key)

    def init_dense(self, key, g, mean):
        self.state[key] = {"g_i": g.clone(), "g": mean.clone(), "v": g.clone()}

    def reshard(self, buffers):
        g = buffers["g"]
        return {"g": g.clone(), "g_i": g.clone(), "v": g.clone()}


class EControl(_SharedEstimate):
    name = "econtrol"
    shared = "h"

    def prepare(self, key, g):
        b = self.place(key, g)
        return self.eta * b["e"] + g - b["h_i"]

    def commit_local(self, key, g, p, local):
        b = self.state[key]
        b["e"] += g - b["h_i"] - local
        b["h_i"] += local

    def init_dense(self, key, g, mean):
        self.state[key] = {"e": torch.zeros_like(g), "h_i": g.clone(), "h": mean.clone()}

    def reshard(self, buffers):
        h = buffers["h"]
        return {"e": torch.zeros_like(h), "h_i": h.clone(), "h": h.clone()}


RULES: dict[str, type[Feedback]] = {
    cls.name: cls for cls in (NoFeedback, ErrorFeedback, EF21, EF21SGDM, EControl)
}


def make_feedback(name: str, eta: float) -> Feedback:
    return RULES[name](eta)
