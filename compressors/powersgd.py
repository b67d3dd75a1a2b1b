"""PowerSGD: rank-r power iteration with warm start (Vogels, Karimireddy, Jaggi,
NeurIPS 2019, arXiv:1905.13727, Algorithm 1).

Per matrix ``M_i`` (a conv weight ``[out, in, kh, kw]`` is viewed as
``out × in·kh·kw``) and the shared ``Q`` (``b × r``), one step is:

1. ``P = mean_i M_i Q``            — all-reduce of all P's in one buffer;
2. ``P̂ = orthonormalise(P)``       — Gram–Schmidt that drops dependent columns (below);
3. ``Q = mean_i M_iᵀ P̂``           — all-reduce of all Q's in one buffer;
4. output ``P̂ Qᵀ = P̂ P̂ᵀ mean_i M_i``, identical on every rank; Q is kept (warm start).

Orthonormalisation, for every r (:func:`orthonormalise`): Gram–Schmidt in float64 with
each projection done twice, and a column whose part orthogonal to the previous columns is
at most ``tol`` times its own norm is set to zero instead of being normalised, with
``tol = max(epsilon, eps(dtype), a · eps(float64))``. ``epsilon`` (config, default 1e-8)
is therefore a *relative* tolerance for "this column adds no new direction", not a term
added to the norms: P̂ is always orthonormal columns plus zero columns, so ``P̂ P̂ᵀ`` is
an orthogonal projection, and a gradient of rank ≤ r (0.25·ones, a rank-1 gradient with
r = 2) comes back exact to float rounding. Where P has full column rank the result is the
QR / Gram–Schmidt of the paper code and of torch's hook, up to the sign of each column,
which cancels in ``P̂ P̂ᵀ``. On CPU a batched float64 Householder QR stands in for the
column loop whenever every column is clearly independent (same result, signs included).

Degenerate Q. A dropped column of P̂ gives a zero column of the next Q, and ``P = MQ``
then has a zero column for ever: one all-zero gradient (a LoRA adapter whose partner
starts at zero, a parameter DDP finds unused at step 1) would switch that tensor's
compression off for good. So before each step that starts from a kept Q (warm start, or
one loaded by ``load_state_dict``), every column of it that is zero, depends on the
previous ones, or belongs to a Q holding a NaN/Inf is replaced by the same column of the
tensor's seeded random Q. Q is the output of an
all-reduce, hence identical on every rank, and so is this decision: ranks never diverge.
A tensor whose first gradient is all zero therefore gets, from its second gradient on,
bit for bit what a fresh reducer computes from those gradients.

Matrices of the same shape are stacked and multiplied in one batched matmul.

Layout. P and Q are computed, and travel, transposed: ``Pᵀ = Qᵀ Mᵀ`` (``r × a`` per matrix) and
``Q'ᵀ = P̂ᵀ M`` (``r × b``), each the product of a matrix of r contiguous rows with M. The same
numbers as ``M Q`` and ``Mᵀ P̂`` (up to the order of float sums), but a GEMM whose output has r
columns runs 5-20× slower on CPU (MKL, one thread: 2.9 ms vs 0.5 ms for a 256 × 4096 gradient at
r = 2; ``Mᵀ P̂`` 7.5 ms vs 0.4 ms). Torch's ``powerSGD_hook`` multiplies in the slow layout. The
all-reduce is element-wise, so the wire bytes are the same; Q is kept and checkpointed as ``b × r``.
The error-feedback memory uses the aggregated reconstruction (``e_i = M_i − P̂Qᵀ``,
as the paper code and torch's hook do), so this compressor reports the aggregate as
its "local" decode.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from gradwire.compressors.communicator import Communicator, Pending
from gradwire.compressors.compressor import Compressor, Exchanged
from gradwire.compressors.config import PowerSGDConfig


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    return shape[0], shape.numel() // shape[0]


def m_rows(p_hat: torch.Tensor) -> int:
    return p_hat.shape[1]


def tolerance(epsilon: float, dtype: torch.dtype, rows: int) -> float:
    """Relative size below which a column's part orthogonal to the columns before it counts as
    zero: ``epsilon``, but never below the rounding unit of ``dtype`` or of float64 sums of
    ``rows`` terms."""
    return max(epsilon, torch.finfo(dtype).eps, rows * torch.finfo(torch.float64).eps)


def independent_columns(q: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Which columns of each matrix in the batch ``q`` are finite and not (numerically) in the
    span of the columns before them: the same test as :func:`orthonormalise`, read off the
    diagonal of a float64 Householder QR (``|R_jj|`` is the norm of the part of ``q_j``
    orthogonal to ``q_1..q_{j-1}``), in a fixed number of kernels whatever r is."""
    x = q.to(torch.float64)
    residual = torch.linalg.qr(x, mode="r").R.diagonal(dim1=-2, dim2=-1).abs()
    # NaN compares False, so a non-finite column (and every column after it) is not independent
    return residual > tolerance(epsilon, q.dtype, x.shape[-2]) * torch.linalg.vector_norm(x, dim=-2)


#: on CPU, up to this rank the output ``P̂ Q'ᵀ`` is summed from r outer products (one pass over the
#: output each) rather than a GEMM of inner dimension r: 0.15 vs 0.67 ms for a 256 × 4096 output at
#: r = 2, 0.31 vs 0.55 ms at r = 4 (MKL, one thread); above it the GEMM wins
OUTER_PRODUCT_MAX_RANK = 4


def low_rank_product(p_hat: torch.Tensor, qt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = p_hat @ qt`` for batches of ``a × r`` and ``r × b`` matrices."""
    r = p_hat.shape[-1]
    if out.device.type != "cpu" or r > OUTER_PRODUCT_MAX_RANK:
        return torch.bmm(p_hat, qt, out=out)
    torch.mul(p_hat[:, :, 0:1], qt[:, 0:1, :], out=out)
    for j in range(1, r):
        out.addcmul_(p_hat[:, :, j : j + 1], qt[:, j : j + 1, :])
    return out


def orthonormalise(p: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal columns spanning the columns of each matrix ``p[..., :, :]`` (``a × r``,
    ``a ≥ r``), and which of the ``r`` columns were kept (bool, ``p.shape[:-2] + (r,)``).

    Gram–Schmidt in float64, column by column, each projection done twice ("twice is
    enough": the second pass removes what rounding left of the first). Column ``j`` is
    treated as dependent on the columns before it, and set to zero, when the part of it
    orthogonal to them has norm ``≤ tol · ‖p_j‖`` with
    ``tol = max(epsilon, eps(p.dtype), a · eps(float64))``: no more than the rounding
    level of the input, or of the float64 projections. So the result is always a set of
    orthonormal columns plus zero columns, ``P̂ P̂ᵀ`` is an orthogonal projection, and a
    gradient of rank below r is reproduced, not scaled up by a normalised rounding error.
    A zero column is dropped; a NaN or Inf spreads to the result.

    On CPU one batched float64 Householder QR comes first: when every column of every matrix
    is clearly independent (``|R_jj| > 4 · tol · ‖p_j‖``, the same test with a margin for the
    two methods' different rounding) Gram–Schmidt would keep every column too, and its result
    is the QR's ``Q`` with each column's sign set so that ``R_jj > 0``, as Gram–Schmidt's; that
    ``Q`` is returned. Otherwise (a dependent or nearly dependent column, a NaN or Inf) the
    Gram–Schmidt below runs. (The column loop costs ~r·6 small kernels, 10-20× the QR on CPU.
    On GPUs the QR path's test would cost a host sync, so they keep the loop.)
    """
    a, r = p.shape[-2], p.shape[-1]
    x = p.reshape(-1, a, r).to(torch.float64)
    floor = torch.linalg.vector_norm(x, dim=1, keepdim=True).mul_(tolerance(epsilon, p.dtype, a))
    if x.device.type == "cpu":
        q, rr = torch.linalg.qr(x)
        diag = rr.diagonal(dim1=-2, dim2=-1).unsqueeze(1)  # (batch, 1, r)
        if bool((diag.abs() > 4 * floor).all()):  # False for NaN: then Gram–Schmidt shows it
            q.mul_(diag.sign())
            kept = torch.ones((*p.shape[:-2], r), dtype=torch.bool, device=p.device)
            # row-major, as the loop's: LAPACK's column-major Q slows the matmuls that use P̂
            return q.to(p.dtype, memory_format=torch.contiguous_format).contiguous().reshape(p.shape), kept
    return _gram_schmidt(x, floor, p)


def _gram_schmidt(x: torch.Tensor, floor: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`orthonormalise`'s column loop on ``x`` (float64, ``batch × a × r``)."""
    r = x.shape[-1]
    out = torch.empty_like(x)
    dropped = []
    for j in range(r):
        v = x[:, :, j : j + 1]
        if j:
            done = out[:, :, :j]
            for _ in range(2):
                v = torch.baddbmm(v, done, done.transpose(1, 2) @ v, alpha=-1)
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        dependent = norm <= floor[:, :, j : j + 1]  # False for NaN: a non-finite input stays visible
        out[:, :, j : j + 1] = v * torch.where(dependent, 0.0, norm.reciprocal())
        dropped.append(dependent)
    kept = ~torch.cat(dropped, dim=2).reshape(*p.shape[:-2], r)
    return out.to(p.dtype).reshape(p.shape), kept


class PowerSGD(Compressor):
    name = "powersgd"
    # P = M·Q is non-finite wherever a row of M is (Q's entries are finite, and
    # Inf·0 is NaN), and every rank receives the all-reduced P
    reveals_nonfinite = True
    # the uncompressed tensors ride along in the P all-reduce: two collectives per step, not three
    fuses_plain = True
    # the output P̂ Q'ᵀ of a matrix alone in its shape group is written into the reducer's ``out``
    writes_into = True

    def __init__(self, config: PowerSGDConfig):
        self.rank_r = config.rank
        self.warm_start = config.warm_start
        self.epsilon = config.epsilon
        self.seed = config.seed
        self._q: dict[int, torch.Tensor] = {}
        # keys whose kept Q needs no degeneracy check: made here from a P̂ that kept all r columns
        self._sound: set[int] = set()
        # each tensor's seeded first Q (warm start only), which also replaces degenerate columns
        self._draws: dict[int, torch.Tensor] = {}
        # model-sized buffers reused across steps (allocating them each step costs as much
        # as the matmuls): name, group keys, shape, dtype, device -> (tensor, last step used)
        self._scratch: dict[tuple, tuple[torch.Tensor, int]] = {}

    def _buffer(self, name: str, group: tuple[int, ...], shape: tuple[int, ...],
                like: torch.Tensor, step: int) -> torch.Tensor:
        key = (name, group, shape, like.dtype, like.device)
        found = self._scratch.get(key)
        buf = found[0] if found is not None else torch.empty(shape, dtype=like.dtype, device=like.device)
        self._scratch[key] = (buf, step)
        return buf

    def _forget_stale(self, step: int) -> None:
        """Drop buffers of bucket layouts no longer seen (DDP rebuilds buckets once)."""
        self._scratch = {k: v for k, v in self._scratch.items() if v[1] >= step - 1}

    def _rank(self, a: int, b: int) -> int:
        return min(self.rank_r, a, b)

    def payload_nbytes(self, shape, dtype):
        a, b = matrix_shape(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return itemsize * self._rank(a, b) * (a + b)

    def _draw(self, key: int, b: int, r: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """The random Q that every rank draws identically from ``(seed, key)`` (and the step
        without warm start). With warm start it is drawn once per tensor and kept on the
        device: it is also what replaces a degenerate Q (see :meth:`_usable`)."""
        salt = 0 if self.warm_start else step
        kept = self._draws.get(key)
        if kept is not None and (kept.shape, kept.dtype, kept.device) == ((b, r), like.dtype, like.device):
            return kept
        gen = torch.Generator().manual_seed(hash((self.seed, key, salt)) & 0x7FFF_FFFF_FFFF)
        q = torch.randn((b, r), generator=gen, dtype=torch.float64).to(like.device, like.dtype)
        if self.warm_start:
            self._draws[key] = q
        return q

    def _start_q(self, keys: list[int], b: int, r: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """The batch of Q's of ``keys``: each tensor's kept Q (warm start), its degenerate
        columns redrawn, else the seeded random Q.

        A Q this compressor made from a P̂ that kept all r columns is not degenerate: ``Q = Mᵀ P̂``
        with P̂ orthonormal columns in the range of M has full column rank (a zero column comes only
        from a dropped column of P̂, a NaN only from a step the reducer rolled back). Such Q's skip
        the check, which costs a float64 QR per shape and step; a loaded one is checked."""
        kept = [self._q.get(key) for key in keys]
        if all(key in self._sound and k is not None and k.shape == (b, r) for key, k in zip(keys, kept)):
            return torch.stack([k.to(like.device, like.dtype) for k in kept])  # type: ignore[union-attr]
        drawn = torch.stack([self._draw(key, b, r, step, like) for key in keys])
        if all(q is None or q.shape != (b, r) for q in kept):
            return drawn
        q = torch.stack([d if k is None or k.shape != (b, r) else k.to(like.device, like.dtype)
                         for k, d in zip(kept, drawn)])
        return self._usable(q, drawn)

    def _usable(self, q: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """``q`` (a batch of kept Q's) with every degenerate column replaced by the same
        column of the seeded draw ``drawn``.

        A column is degenerate when it is zero or depends on the previous columns (the test
        of :func:`orthonormalise`, see :func:`independent_columns`), and every column of a Q
        that holds a NaN or Inf is.
        A zero column would stay zero forever (``P = MQ`` has a zero column, which is
        dropped, so the next ``Q = MᵀP̂`` has one too): one all-zero gradient, such as a
        LoRA adapter's at step 1 or a DDP parameter unused at step 1, would otherwise switch
        that tensor's compression off for good. Q is identical on every rank (it is the
        output of the Q all-reduce), so every rank redraws the same columns.
        """
        independent = independent_columns(q, self.epsilon)
        finite = torch.isfinite(q).all(dim=-2).all(dim=-1, keepdim=True)
        return torch.where((independent & finite).unsqueeze(-2), q, drawn)

    def exchange(self, inputs, keys, step, comm: Communicator, need_local, plain=None, into=None):
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, x in enumerate(inputs):
            groups[matrix_shape(x.shape)].append(i)
        plan = []
        for (a, b), members in groups.items():
            group = tuple(keys[i] for i in members)
            if len(members) == 1:  # a view, no copy
                m = inputs[members[0]].reshape(1, a, b)
            else:
                m = self._buffer("m", group, (len(members), a, b), inputs[members[0]], step)
                torch.stack([inputs[i].reshape(a, b) for i in members], out=m)
            r = self._rank(a, b)
            # Qᵀ (batch × r × b), rows contiguous: see "Layout" in the module docstring
            qt = self._start_q([keys[i] for i in members], b, r, step, m).transpose(1, 2).contiguous()
            plan.append((members, m, qt))
        self._forget_stale(step)
        if not plan:
            pending_plain = None if plain is None else comm.all_reduce_mean(plain)
            return Pending(None, lambda: Exchanged(
                [], [] if need_local else None, plain=None if pending_plain is None else pending_plain.wait()
            ))  # fmt: skip

        p_parts = [torch.bmm(qt, m.transpose(1, 2)).reshape(-1) for _, m, qt in plan]  # Pᵀ = Qᵀ Mᵀ
        n_p = sum(part.numel() for part in p_parts)
        p_all = torch.cat(p_parts if plain is None else [*p_parts, plain])
        pending_p = comm.all_reduce_mean(p_all)

        def finish() -> Exchanged:
            p_sum = pending_p.wait()
            plain_mean = None if plain is None else p_sum[n_p:]
            p_hats, sound, offset = [], set(), 0
            for members, m, qt in plan:
                batch, r, a = m.shape[0], qt.shape[1], m.shape[1]
                pt = p_sum[offset : offset + batch * r * a].view(batch, r, a)
                p_hat, kept = orthonormalise(pt.transpose(1, 2), self.epsilon)
                p_hats.append(p_hat)
                offset += batch * r * a
                if kept.device.type == "cpu":  # (on a GPU reading the mask would cost a sync per step)
                    sound.update(keys[i] for i, whole in zip(members, kept.all(dim=-1).tolist()) if whole)
            # Q'ᵀ = P̂ᵀ M, with P̂ᵀ made contiguous (a × r floats: cheap)
            q_all = torch.cat([torch.bmm(ph.transpose(1, 2).contiguous(), m).reshape(-1)
                               for (_, m, _), ph in zip(plan, p_hats)])
            q_mean = comm.all_reduce_mean(q_all).wait()
            outputs: list[torch.Tensor | None] = [None] * len(inputs)
            new_q: dict[int, torch.Tensor] = {}
            offset = 0
            for (members, _, qt), ph in zip(plan, p_hats):
                n = qt.numel()
                qmt = q_mean[offset : offset + n].view(qt.shape)
                offset += n
                group = tuple(keys[i] for i in members)
                shape = (len(members), m_rows(ph), qmt.shape[2])
                target = None if into is None or len(members) > 1 else into[members[0]]  # may be None
                if target is not None and target.is_contiguous():  # the M it aliases is read already
                    approx = target.view(shape)
                else:
                    approx = self._buffer("approx", group, shape, ph, step)
                low_rank_product(ph, qmt, approx)
                for j, i in enumerate(members):
                    outputs[i] = approx[j].view(inputs[i].shape)
                    new_q[keys[i]] = qmt[j].t()  # kept as Q (b × r), the layout of state_dict()
            aggregates = [o for o in outputs if o is not None]

            def commit() -> None:
                if self.warm_start:
                    self._q.update(new_q)
                    self._sound.difference_update(new_q)
                    self._sound.update(sound)

            probe = p_sum.sum(dtype=torch.float64) + q_mean.sum(dtype=torch.float64)
            return Exchanged(
                aggregates, aggregates if need_local else None, commit, probe, reused=True, plain=plain_mean
            )

        return Pending(None, finish)

    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: v.detach().cpu().clone() for k, v in self._q.items()}}

    def load_state_dict(self, state, same_world):
        # Q is identical on every rank, so it carries over to any world size.
        self._q = {int(k): v.clone() for k, v in state.get("q", {}).items()}
        self._sound = set()  # a loaded Q is checked before its first use
