"""PowerSGD: rank-r power iteration with warm start (Vogels, Karimireddy, Jaggi,
NeurIPS 2019, arXiv:1905.13727, Algorithm 1).

Per matrix ``M_i`` (a conv weight ``[out, in, kh, kw]`` is viewed as
``out × in·kh·kw``) and the shared ``Q`` (``b × r``), one step is:

1. ``P = mean_i M_i Q``            — all-reduce of all P's in one buffer;
2. ``P̂ = orthonormalise(P)``       — QR (column normalisation for r = 1);
3. ``Q = mean_i M_iᵀ P̂``           — all-reduce of all Q's in one buffer;
4. output ``P̂ Qᵀ = P̂ P̂ᵀ mean_i M_i``, identical on every rank; Q is kept (warm start).

Matrices of the same shape are stacked and multiplied in one batched matmul.
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


class PowerSGD(Compressor):
    name = "powersgd"
    # P = M·Q is non-finite wherever a row of M is (Q's entries are finite, and
    # Inf·0 is NaN), and every rank receives the all-reduced P
    reveals_nonfinite = True
    # the uncompressed tensors ride along in the P all-reduce: two collectives per step, not three
    fuses_plain = True

    def __init__(self, config: PowerSGDConfig):
        self.rank_r = config.rank
        self.warm_start = config.warm_start
        self.epsilon = config.epsilon
        self.seed = config.seed
        self._q: dict[int, torch.Tensor] = {}
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

    def _start_q(self, key: int, b: int, r: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Last step's Q (warm start), else a random Q that every rank draws identically."""
        q = self._q.get(key)
        if q is not None and q.shape == (b, r):
            return q.to(like.device, like.dtype)
        salt = 0 if self.warm_start else step
        gen = torch.Generator().manual_seed(hash((self.seed, key, salt)) & 0x7FFF_FFFF_FFFF)
        return torch.randn((b, r), generator=gen, dtype=torch.float64).to(like.device, like.dtype)

    def _orthonormalise(self, p: torch.Tensor) -> torch.Tensor:
        """Orthonormal columns spanning those of each ``p`` in the batch: Gram–Schmidt
        for r ≤ 2 (cheap, and accurate enough at that rank), QR above."""
        if p.dtype in (torch.float16, torch.bfloat16):  # eps and norms need float32 range
            return self._orthonormalise(p.float()).to(p.dtype)
        if p.shape[-1] > 2:
            return torch.linalg.qr(p, mode="reduced").Q
        first = p[..., :1] / (torch.linalg.vector_norm(p[..., :1], dim=-2, keepdim=True) + self.epsilon)
        if p.shape[-1] == 1:
            return first
        second = p[..., 1:] - first * (first * p[..., 1:]).sum(dim=-2, keepdim=True)
        second = second / (torch.linalg.vector_norm(second, dim=-2, keepdim=True) + self.epsilon)
        return torch.cat([first, second], dim=-1)

    def exchange(self, inputs, keys, step, comm: Communicator, need_local, plain=None):
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
            q = torch.stack([self._start_q(keys[i], b, r, step, m) for i in members])
            plan.append((members, m, q))
        self._forget_stale(step)
        if not plan:
            pending_plain = None if plain is None else comm.all_reduce_mean(plain)
            return Pending(None, lambda: Exchanged(
                [], [] if need_local else None, plain=None if pending_plain is None else pending_plain.wait()
            ))  # fmt: skip

        p_parts = [torch.bmm(m, q).reshape(-1) for _, m, q in plan]
        n_p = sum(part.numel() for part in p_parts)
        p_all = torch.cat(p_parts if plain is None else [*p_parts, plain])
        pending_p = comm.all_reduce_mean(p_all)

        def finish() -> Exchanged:
            p_sum = pending_p.wait()
            plain_mean = None if plain is None else p_sum[n_p:]
            p_hats, offset = [], 0
            for _, m, q in plan:
                n = m.shape[0] * m.shape[1] * q.shape[2]
                p = p_sum[offset : offset + n].view(m.shape[0], m.shape[1], q.shape[2])
                p_hats.append(self._orthonormalise(p))
                offset += n
            q_all = torch.cat([torch.bmm(m.transpose(1, 2), ph).reshape(-1)
                               for (_, m, _), ph in zip(plan, p_hats)])
            q_mean = comm.all_reduce_mean(q_all).wait()
            outputs: list[torch.Tensor | None] = [None] * len(inputs)
            new_q: dict[int, torch.Tensor] = {}
            offset = 0
            for (members, _, q), ph in zip(plan, p_hats):
                n = q.numel()
                qm = q_mean[offset : offset + n].view(q.shape)
                offset += n
                group = tuple(keys[i] for i in members)
                approx = self._buffer("approx", group, (len(members), m_rows(ph), qm.shape[1]), ph, step)
                torch.bmm(ph, qm.transpose(1, 2), out=approx)
                for j, i in enumerate(members):
                    outputs[i] = approx[j].view(inputs[i].shape)
                    new_q[keys[i]] = qm[j]
            aggregates = [o for o in outputs if o is not None]

            def commit() -> None:
                if self.warm_start:
                    self._q.update(new_q)

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
