"""An exact gradient code and its decoder (Tandon, Lei, Dimakis, Karampatziakis, ICML 2017).

The job's data is cut into ``n`` partitions with gradients ``g_j`` (sums over the
partition's samples). Worker ``i`` sends ``m_i = Σ_j B[i, j] g_j`` (row ``i`` of the
encoding matrix). For any set ``F`` of at least ``n − s`` survivors the master finds
``a`` with ``aᵀ B_F = 1ᵀ`` and recovers ``Σ_{i∈F} a_i m_i = Σ_j g_j``
(docs/algorithms.md §5.1).

Decoding (§5.3): least squares on ``B_Fᵀ a = 1`` in float64. With more than ``n − s``
survivors every one of them is used and the minimum-norm solution is returned (it
amplifies round-off less than picking ``n − s``). Codes built with groups (fractional
repetition, §5.2) decode exactly instead: coefficient 1 for the lowest-indexed
survivor of each group, 0 for everybody else. Every solution is checked: a relative
residual ``‖aᵀB_F − 1‖ / ‖1‖`` above ``RESIDUAL_TOL`` raises :class:`UndecodableError`.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from fractions import Fraction

import torch

#: relative residual above which a decode is rejected (an ill-conditioned or invalid code)
RESIDUAL_TOL = 1e-8
#: survivor sets whose coefficients are kept (least recently used are dropped first)
CACHE_SIZE = 4096


class UndecodableError(ValueError):
    """The survivors' messages do not determine the full gradient."""


def require_ints(**values: object) -> None:
    """Raise ``ValueError`` naming the first argument that is not an int (bools are refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r}")


def check_code_params(n: int, s: int) -> None:
    """Raise ``ValueError`` unless ``(n, s)`` describes a possible gradient code."""
    require_ints(n=n, s=s)
    if n < 1:
        raise ValueError(f"need at least one worker, got n={n}")
    if s < 0:
        raise ValueError(f"the number of stragglers s must be >= 0, got s={s}")
    if s >= n:
        raise ValueError(f"s={s} stragglers out of n={n} workers leaves nobody to decode from; need s < n")


class GradientCode:
    """An ``(n, s)`` gradient code: encoding matrix ``B`` (n×n, float64) and its decoder.

    Build one with :func:`~gradwire.compressors.coding.fractional_repetition`,
    :func:`~gradwire.compressors.coding.cyclic_repetition` or :meth:`from_matrix`.
    ``load`` is the fraction of the data the busiest worker computes, ``(s + 1)/n``
    for both constructions of the paper (an exact :class:`~fractions.Fraction`).
    """

    def __init__(
        self,
        B: torch.Tensor,
        s: int,
        *,
        supports: Sequence[Sequence[int]] | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        name: str = "custom",
        seed: int | None = None,
        worst_condition: float | None = None,
    ) -> None:
        if not isinstance(B, torch.Tensor):
            B = torch.as_tensor(B)
        if B.dim() != 2 or B.shape[0] != B.shape[1]:
            raise ValueError(f"the encoding matrix must be square n×n, got shape {tuple(B.shape)}")
        n = B.shape[0]
        check_code_params(n, s)
        self.n = n
        self.s = int(s)
        self.name = name
        #: the seed the matrix was drawn with (cyclic repetition), else None
        self.seed = seed
        #: largest cond(B_F) seen over the survivor sets checked at construction, if checked
        self.worst_condition = worst_condition
        self.B = B.detach().to(device="cpu", dtype=torch.float64).clone()
        if not bool(torch.isfinite(self.B).all()):
            raise ValueError("the encoding matrix has non-finite entries")
        if supports is None:
            supports = [torch.nonzero(row).flatten().tolist() for row in self.B]
        self._supports = [sorted(int(j) for j in sup) for sup in supports]
        if len(self._supports) != n:
            raise ValueError(f"need one support per worker ({n}), got {len(self._supports)}")
        self._groups = [sorted(g) for g in groups] if groups is not None else None
        self._cache: OrderedDict[tuple[int, ...], dict[int, float]] = OrderedDict()

    @classmethod
    def from_matrix(cls, B: torch.Tensor | Sequence[Sequence[float]], s: int) -> GradientCode:
        """A code from an explicit encoding matrix (e.g. the n = 3, s = 1 example of docs/algorithms.md §5.3).

        Nothing is checked up front; a survivor set the matrix cannot serve raises
        :class:`UndecodableError` when it is decoded.
        """
        return cls(torch.as_tensor(B, dtype=torch.float64), s, name="custom")

    def __repr__(self) -> str:
        return f"GradientCode(name={self.name!r}, n={self.n}, s={self.s})"

    @property
    def load(self) -> Fraction:
        """Fraction of the data computed by the busiest worker: ``(s + 1)/n`` for FR and CR."""
        return Fraction(max(len(sup) for sup in self._supports), self.n)

    def _check_worker(self, worker: int) -> int:
        worker = operator.index(worker)
        if not 0 <= worker < self.n:
            raise ValueError(f"worker {worker} out of range for n={self.n} workers")
        return worker

    def partitions(self, worker: int) -> list[int]:
        """The data partitions worker ``worker`` computes: the support of row ``worker`` of ``B``."""
        return list(self._supports[self._check_worker(worker)])

    def encode_weights(self, worker: int) -> dict[int, float]:
        """Row ``worker`` of ``B`` on its support: the message is ``Σ_j weight_j · g_j``."""
        worker = self._check_worker(worker)
        return {j: float(self.B[worker, j]) for j in self._supports[worker]}

    def _check_survivors(self, survivors: Iterable[int]) -> list[int]:
        ids = [operator.index(i) for i in survivors]
        bad = [i for i in ids if not 0 <= i < self.n]
        if bad:
            raise ValueError(f"survivor ids {bad} out of range for n={self.n} workers")
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"survivor ids must be distinct; repeated: {dupes}")
        return ids

    def decode(self, survivors: Iterable[int]) -> torch.Tensor:
        """Coefficients ``a`` (float64, one per survivor, in the given order) with ``aᵀ B[survivors] = 1ᵀ``.

        Needs at least ``n − s`` distinct survivors; fewer raise :class:`UndecodableError`
        (even where a lucky set would do, e.g. one member of every FR group). Results are
        cached per survivor set.
        """
        ids = self._check_survivors(survivors)
        need = self.n - self.s
        if len(ids) < need:
            raise UndecodableError(
                f"{len(ids)} survivors cannot decode an (n={self.n}, s={self.s}) gradient code; "
                f"need at least n - s = {need}"
            )
        key = tuple(sorted(ids))
        coefficients = self._cache.get(key)
        if coefficients is None:
            coefficients = self._solve(key)
            self._cache[key] = coefficients
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return torch.tensor([coefficients[i] for i in ids], dtype=torch.float64)

    def _solve(self, key: tuple[int, ...]) -> dict[int, float]:
        if self._groups is not None:
            a = torch.zeros(len(key), dtype=torch.float64)
            alive = set(key)
            for group in self._groups:
                first = next((w for w in group if w in alive), None)
                if first is None:
                    raise UndecodableError(f"no survivor in group {group}; survivors {list(key)}")
                a[key.index(first)] = 1.0
        else:
            system = self.B[list(key)].T  # n equations, one unknown per survivor
            ones = torch.ones(self.n, 1, dtype=torch.float64)
            a = torch.linalg.lstsq(system, ones, driver="gelsd").solution.flatten()
        residual = self.residual(key, a)
        if not residual < RESIDUAL_TOL:
            raise UndecodableError(
                f"survivors {list(key)} do not decode: relative residual ‖aᵀB_F − 1‖/‖1‖ = {residual:.3g} "
                f"(tolerance {RESIDUAL_TOL:g}); the code is ill-conditioned or invalid for this set"
            )
        return dict(zip(key, a.tolist()))

    def residual(self, survivors: Sequence[int], coefficients: torch.Tensor) -> float:
        """Relative residual ``‖aᵀ B_F − 1‖₂ / √n`` of coefficients for a survivor list."""
        combo = coefficients.to(torch.float64) @ self.B[list(survivors)]
        return float(torch.linalg.vector_norm(combo - 1.0)) / math.sqrt(self.n)

    def combine(self, survivors: Sequence[int], messages: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Σ_i a_i m_i`` in float64: the sum of all partition gradients from the survivors' messages."""
        survivors = list(survivors)
        if len(messages) != len(survivors):
            raise ValueError(f"got {len(messages)} messages for {len(survivors)} survivors")
        a = self.decode(survivors)
        total = torch.zeros_like(messages[0], dtype=torch.float64)
        for coefficient, message in zip(a.tolist(), messages):
            total += coefficient * message.to(torch.float64)
        return total
