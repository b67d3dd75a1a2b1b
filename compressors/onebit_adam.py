"""Adam that compresses its momentum, not the gradient, once the second moment is frozen.

The 1-bit Adam scheme (Tang et al., ICML 2021, arXiv:2102.02888), with the variance-refresh
schedule of 0/1 Adam (Lu et al., ICLR 2023, arXiv:2202.06009) as an option:

* **Warm-up** (the first ``freeze_step`` steps): plain Adam on the mean gradient. The DDP hook of
  :meth:`OneBitAdam.comm_hook` all-reduces each bucket as DDP's own hook would.
* **Freeze**: the second moment ``v`` (and its bias correction) stops changing. The ranks check, in
  one small all-reduce at the first step (and the first after a load) and again at the freeze, that
  they run the same ``freeze_step`` and policy, are at the same step and hold the same ``v``; if not,
  :class:`FreezeMismatchError` is raised on every rank (from ``backward``) instead of diverging.
* **Compressed stage**: the hook sends nothing; each rank forms its own momentum
  ``m_i = β1·m + (1−β1)·g_i`` from its local gradient, and a gradwire reducer (any compressor with
  error feedback, scaled sign by default: one bit per element) returns the mean ``m`` of the
  compressed ``m_i``, identical on every rank. The update is ``x ← x − lr·m̂ / (√v̂ + ε)`` with the
  frozen ``v̂``, so the parameters stay bit-identical across ranks.
* ``variance="doubling"`` (after 0/1 Adam's variance policy): after the freeze, steps
  ``2·freeze_step, 4·freeze_step, …`` are again full-precision Adam steps that update ``v`` from the
  mean gradient (log₂ of the run's length of them in all), for runs whose gradient scale drifts;
  ``variance="periodic"`` with ``refresh_every=K`` makes every K-th step after the freeze one.
* ``variance="local"`` (with ``space="update"``) never freezes: after the warm-up each rank keeps
  updating its own ``m_i`` and ``v_i`` from its own gradients, and what is compressed (with error
  feedback) and averaged is each rank's Adam step ``m̂_i / (√v̂_i + ε)``; every rank applies the same
  mean, so the parameters stay identical while the moments are per rank (as the per-worker inner
  AdamW of DiLoCo, Douillard et al. 2023, with one local step between averages).
* ``space="update"`` compresses ``m_i / (√v̂ + ε)`` instead of ``m_i``: with ``v`` frozen and equal on
  every rank the mean is the same, but the compressor's error lands where Adam's step is taken (a
  scaled sign gives every element of a tensor the same *step*, not the same momentum, so elements
  with a small ``v`` are not thrown far).

Use it with DDP (the hook is required: without it DDP would all-reduce every gradient as well)::

    ddp = DistributedDataParallel(model)
    opt = OneBitAdam(ddp.parameters(), lr=3e-3, freeze_step=10, variance="local", space="update",
                     compressor_params={"bits": 2}, warmup_dtype="bfloat16")
    ddp.register_comm_hook(*opt.comm_hook())   # sign + EF (1 bit unless bits=2)

``warmup_dtype="bfloat16"`` all-reduces the gradients of the full-precision steps in bfloat16 (half
the bytes, float32's range), as torch's ``bf16_compress_hook`` does.

On the small LM of ``benchmarks/adam.py`` a v frozen after 5 % of the steps broke Adam whatever the
compressor, while ``variance="local"`` with 2-bit sign steps (``compressor_params={"bits": 2}``)
after a 5 % bfloat16 warm-up ended −0.1 to +3.4 points against uncompressed Adam on five seeds at
11.8× fewer bytes (the 1-bit sign: 0.6–3.0 points below at 12.5×; docs/benchmarks.md, "Compression
with Adam"). ``variance="local"`` also takes EF21 estimates of the steps (``feedback: ef21``), which
lost 15–20 points there.

``opt.stats()`` has the reducer's byte ledger (warm-up gradients and compressed momentum alike), and
``state_dict()`` this rank's state: the error-feedback residuals belong to the rank that made them,
so a state is refused by another rank or another world size (save every rank's, as DDP users save
per-rank RNG state). docs/compressors.md ("Which compressor with which optimizer") says when to use it.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations against the real
# dist.GradBucket and torch.futures.Future classes.
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.reducer import Reducer
from gradwire.compressors.registry import parse_config, plugin

#: what may compress the momentum: compressors that take error feedback ("ef")
MOMENTUM_COMPRESSORS = ("sign", "powersgd", "topk", "randk", "qsgd", "fp16", "bf16")
VARIANCE_POLICIES = ("frozen", "doubling", "periodic", "local")
#: what the compressor sees: the momentum (1-bit Adam), or the momentum divided by the frozen √v̂ + ε
SPACES = ("momentum", "update")
#: how the gradients travel on full-precision steps (the warm-up, variance refreshes)
WARMUP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_VERSION = 1


class FreezeMismatchError(RuntimeError):
    """Ranks reached the variance freeze at different steps or with different second moments."""


class MissingHookError(RuntimeError):
    """A step ran in a multi-rank group without the optimizer's DDP hook having run in backward."""


def _momentum_reducer(compressor: str, params: dict[str, Any], process_group: Any, variance: str) -> Reducer:
    if compressor not in MOMENTUM_COMPRESSORS:
        raise ValueError(
            f"compressor={compressor!r} cannot compress OneBitAdam's momentum; use one of "
            f"{', '.join(MOMENTUM_COMPRESSORS)}"
        )
    for field in ("start_iter", "nonfinite"):
        if field in params:
            raise ValueError(
                f"{field} is set by OneBitAdam (freeze_step is its warm-up; a non-finite momentum "
                "always raises), not a parameter to pass"
            )
    feedback = params.get("feedback", "ef")
    allowed = ("ef", "ef21") if variance == "local" else ("ef",)
    if feedback not in allowed:
        raise ValueError(
            f"feedback={feedback!r}: OneBitAdam compresses its momentum with error feedback 'ef' "
            "(Tang et al. 2021); EF21-style estimates would replace the momentum itself (they may "
            "estimate the ranks' Adam steps with variance='local')"
        )
    config = parse_config(compressor, {**params, "feedback": feedback, "nonfinite": "raise"})
    return Reducer(config, plugin(compressor).factory()(config), process_group)


def doubling_refreshes(freeze_step: int, steps: int) -> list[int]:
    """The steps (0-based) below ``steps`` at which ``variance="doubling"`` runs a full-precision
    Adam step after the freeze: ``2·freeze_step, 4·freeze_step, …``."""
    out, t = [], 2 * freeze_step
    while t < steps:
        out.append(t)
        t *= 2
    return out


class OneBitAdam(torch.optim.Optimizer):
    """Adam with a frozen second moment and compressed, error-compensated momentum after
    ``freeze_step`` plain steps (see the module's docstring). ``weight_decay`` is decoupled (AdamW).

    ``compressor`` and ``compressor_params`` choose how the momentum travels (a gradwire compressor
    that takes error feedback ``ef``; ``sign`` by default); ``process_group`` is the DDP model's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        freeze_step: int,
        variance: str = "frozen",
        refresh_every: int | None = None,
        space: str = "momentum",
        compressor: str = "sign",
        compressor_params: dict[str, Any] | None = None,
        warmup_dtype: str = "float32",
        process_group: Any = None,
    ):
        checks = [
            ("lr", lr, math.isfinite(lr) and lr > 0, "a finite number > 0"),
            ("betas[0]", betas[0], 0.0 <= betas[0] < 1.0, "in [0, 1)"),
            ("betas[1]", betas[1], 0.0 <= betas[1] < 1.0, "in [0, 1)"),
            ("eps", eps, math.isfinite(eps) and eps > 0, "a finite number > 0"),
            ("weight_decay", weight_decay, math.isfinite(weight_decay) and weight_decay >= 0, ">= 0"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"OneBitAdam: {name}={value!r} must be {expected}")
        if isinstance(freeze_step, bool) or not isinstance(freeze_step, int) or freeze_step < 1:
            raise ValueError(
                f"OneBitAdam: freeze_step={freeze_step!r} must be an int >= 1 (Adam's second moment "
                "needs at least one full-precision step before it is frozen)"
            )
        if variance not in VARIANCE_POLICIES:
            raise ValueError(
                f"OneBitAdam: variance={variance!r} must be one of {', '.join(VARIANCE_POLICIES)}"
            )
        if (variance == "periodic") != (refresh_every is not None):
            raise ValueError(
                f"OneBitAdam: refresh_every={refresh_every!r} goes with variance='periodic' and only with it "
                f"(variance={variance!r})"
            )
        if refresh_every is not None and (
            isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 2
        ):
            raise ValueError(f"OneBitAdam: refresh_every={refresh_every!r} must be an int >= 2")
        if space not in SPACES:
            raise ValueError(f"OneBitAdam: space={space!r} must be one of {', '.join(SPACES)}")
        if warmup_dtype not in WARMUP_DTYPES:
            raise ValueError(
                f"OneBitAdam: warmup_dtype={warmup_dtype!r} must be one of {', '.join(WARMUP_DTYPES)} "
                "(bfloat16 keeps float32's range, so it cannot overflow where float32 did not)"
            )
        if variance == "local" and space != "update":
            raise ValueError(
                "OneBitAdam: variance='local' needs space='update' (each rank's v differs, so only the "
                "ranks' Adam steps, not their momenta, can be averaged)"
            )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.freeze_step = freeze_step
        self.variance = variance
        self.refresh_every = refresh_every
        self.space = space
        self.warmup_dtype = warmup_dtype
        self.reducer = _momentum_reducer(compressor, dict(compressor_params or {}), process_group, variance)
        #: steps taken (the next step's 0-based index)
        self.steps_taken = 0
        #: steps whose second moment was updated (its bias correction after the freeze)
        self.variance_steps = 0
        self.dense_steps = 0
        #: the freeze was checked across ranks (by the hook, at the first compressed step)
        self.freeze_checked = False
        #: the schedule was checked across ranks since this run started or loaded a state
        self.agreed = False
        self._hook_calls = 0

    # --- the schedule ------------------------------------------------------------------------
    def dense(self, step: int) -> bool:
        """Whether 0-based ``step`` is a full-precision Adam step (gradients all-reduced, v updated)."""
        if step < self.freeze_step:
            return True
        if self.variance == "local":
            return False
        if self.refresh_every:
            return (step - self.freeze_step) % self.refresh_every == 0 and step > self.freeze_step
        if self.variance == "doubling":
            ratio = step // self.freeze_step
            return step % self.freeze_step == 0 and ratio >= 2 and ratio & (ratio - 1) == 0
        return False

    @property
    def compressing(self) -> bool:
        """Whether the coming step sends compressed momentum (and the hook sends nothing)."""
        return not self.dense(self.steps_taken)

    # --- the DDP hook --------------------------------------------------------------------------
    def comm_hook(self) -> tuple["OneBitAdam", Any]:
        """``(state, hook)`` for ``ddp.register_comm_hook``: the mean gradient on dense steps, the
        local gradient (nothing sent) on compressed ones."""
        return self, onebit_adam_hook

    def _reduce_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        if buffer.layout != torch.strided:
            raise TypeError("OneBitAdam's hook needs dense gradients (build embeddings with sparse=False)")
        comm = self.reducer.comm
        multi = comm.distributed and comm.world_size > 1
        if (
            multi
            and self._hook_calls == 0
            and (not self.agreed or (self.compressing and not self.freeze_checked))
        ):
            self._agree()  # before this step's first collective of ours: all ranks or none go on
        self._hook_calls += 1
        if self.compressing or not multi:
            if not self.compressing:  # a group of one: the mean is the gradient itself, nothing sent
                comm.ledger.record_uncompressed(buffer.numel() * buffer.element_size(), comm.world_size)
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(buffer)
            return future
        comm.ledger.record_uncompressed(buffer.numel() * buffer.element_size(), comm.world_size)
        dtype = WARMUP_DTYPES[self.warmup_dtype]
        if buffer.dtype != torch.float32 or dtype == torch.float32:
            return comm.all_reduce_mean(buffer).future()
        wire = buffer.to(dtype)  # divided and summed in bfloat16, as torch's bf16_compress_hook
        return comm.all_reduce_mean(wire).future().then(lambda done: buffer.copy_(done.value()))

    def _agree(self) -> None:
        """Check that every rank runs the same schedule: one all-reduce (MAX) of ``[step,
        freeze_step, variance policy, space, Σv]`` and their negatives, at a run's first step (and the
        first after a load) and at the freeze. Every rank sees the same result, so all raise or none does."""
        comm = self.reducer.comm
        total = sum(float(s["v"].sum(dtype=torch.float64)) for s in self.state.values() if "v" in s)
        if self.variance == "local" and self.steps_taken > self.freeze_step:
            total = 0.0  # each rank's own v since the freeze
        policy = [
            VARIANCE_POLICIES.index(self.variance) + 10 * (self.refresh_every or 0),
            SPACES.index(self.space),
            list(WARMUP_DTYPES).index(self.warmup_dtype),
        ]
        mine = [self.steps_taken, self.freeze_step, *policy, total]
        probe = torch.tensor(mine + [-x for x in mine], dtype=torch.float64)
        comm.ledger.record_all_reduce(probe.numel() * probe.element_size(), comm.world_size)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=comm.group)
        high, low = probe[: len(mine)].tolist(), [0.0 - x for x in probe[len(mine) :].tolist()]  # not -0.0
        if high != low:
            names = ("step", "freeze_step", "variance policy", "space", "warmup_dtype", "sum of v")
            differ = ", ".join(f"{n} {lo!r}..{hi!r}" for n, lo, hi in zip(names, low, high) if lo != hi)
            raise FreezeMismatchError(
                f"ranks disagree on OneBitAdam's schedule ({differ}). Every rank must build OneBitAdam "
                "with the same freeze_step, variance and warmup_dtype, load its own state and take every step"
            )
        self.agreed = True
        if self.compressing:
            self.freeze_checked = True

    # --- the step --------------------------------------------------------------------------------
    def _params(self) -> list[tuple[int, dict[str, Any], torch.Tensor]]:
        out, key = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                out.append((key, group, p))
                key += 1
        return out

    def _check_hook(self) -> None:
        comm = self.reducer.comm
        if comm.distributed and comm.world_size > 1 and self._hook_calls == 0:
            raise MissingHookError(
                f"step {self.steps_taken}: OneBitAdam's DDP hook did not run during backward, so the "
                "gradients were either averaged by DDP's own all-reduce (sending every byte the "
                "compressor should save) or not averaged at all. Register it: "
                "ddp.register_comm_hook(*optimizer.comm_hook())"
            )
        self._hook_calls = 0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reducer.bind()
        self._check_hook()
        dense = self.dense(self.steps_taken)
        entries = self._params()
        for key, _, p in entries:
            if p.grad is None:
                raise ValueError(
                    f"parameter {key} (shape {tuple(p.shape)}) has no gradient at step {self.steps_taken}: "
                    "OneBitAdam exchanges every parameter's momentum on every rank each step; leave "
                    "parameters that do not train out of the optimizer"
                )
            if p.grad.is_sparse:
                raise TypeError(f"parameter {key} has a sparse gradient; OneBitAdam needs dense ones")
        t = self.steps_taken + 1
        if dense:
            refresh = self.steps_taken >= self.freeze_step
            before = [self.denominator(p, group) for _, group, p in entries] if refresh else None
            self.variance_steps += 1
            self.dense_steps += 1
            for _, group, p in entries:
                beta1, beta2 = group["betas"]
                state = self._state_of(p)
                state["m"].lerp_(p.grad, 1 - beta1)  # torch.optim.Adam's arithmetic, bit for bit
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denoms = [self.denominator(p, group) for _, group, p in entries]
            if before is not None and self.space == "update":  # residuals are in units of the old update
                for (key, _, _), old, new in zip(entries, before, denoms):
                    residual = self.reducer.feedback.state.get(key, {}).get("e")
                    if residual is not None:
                        residual.mul_(old).div_(new)
        elif self.variance == "local":
            self._local_step(entries, t)
        else:
            denoms = [self.denominator(p, group) for _, group, p in entries]
            local = [
                torch.lerp(self._state_of(p)["m"], p.grad, 1 - group["betas"][0]) for _, group, p in entries
            ]
            if self.space == "update":  # v is frozen and equal on every rank: mean(m_i/D) = mean(m_i)/D
                local = [m.div_(d) for m, d in zip(local, denoms)]
            means = self._reduce(local, entries)
            for (_, _, p), mean, d in zip(entries, means, denoms):
                self.state[p]["m"].copy_(mean.mul_(d) if self.space == "update" else mean)
        if dense or self.variance != "local":
            for (_, group, p), denom in zip(entries, denoms):
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(self.state[p]["m"], denom, value=-group["lr"] / (1 - group["betas"][0] ** t))
        self.steps_taken = t
        return loss

    def _reduce(self, tensors: list[torch.Tensor], entries: list[tuple[int, dict[str, Any], torch.Tensor]]):
        """The compressed mean over ranks (with error feedback). A 1-D tensor travels as a 1 × d row,
        so elementwise compressors encode it too (PowerSGD's size rule still sends it plain)."""
        rows = [x.view(1, -1) if x.dim() == 1 else x for x in tensors]
        means = self.reducer.reduce(rows, keys=[key for key, _, _ in entries])
        return [mean.view_as(x) for mean, x in zip(means, tensors)]

    def _local_step(self, entries: list[tuple[int, dict[str, Any], torch.Tensor]], t: int) -> None:
        """``variance="local"``: each rank's own Adam step from its own moments, compressed with error
        feedback; every rank applies the same mean of the decoded steps."""
        self.variance_steps += 1
        steps = []
        for _, group, p in entries:
            beta1, beta2 = group["betas"]
            state = self._state_of(p)
            state["m"].lerp_(p.grad, 1 - beta1)
            state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            steps.append(state["m"] / self.denominator(p, group))
        for (_, group, p), mean in zip(entries, self._reduce(steps, entries)):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(mean, alpha=-group["lr"] / (1 - group["betas"][0] ** t))

    def denominator(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Adam's ``√v̂ + ε`` as torch computes it (v̂ with the bias correction of the steps that updated v)."""
        bias = math.sqrt(1 - group["betas"][1] ** self.variance_steps)
        return (self._state_of(p)["v"].sqrt() / bias).add_(group["eps"])

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    # --- reporting and state -------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """This rank's cumulative counters: the byte ledger (gradients on dense steps, momentum
        payloads after the freeze), the momentum reducer's seconds and non-finite count, and the
        step counts."""
        return {
            **self.reducer.stats(),
            "steps": self.steps_taken,
            "dense_steps": self.dense_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state plus this rank's: the schedule, the momentum reducer (its
        error-feedback residuals) and the ledger. Call it after ``init_process_group``."""
        state = super().state_dict()
        self.reducer.bind()
        comm = self.reducer.comm
        state["onebit"] = {
            "version": STATE_VERSION,
            "rank": comm.rank,
            "world_size": comm.world_size,
            "freeze_step": self.freeze_step,
            "variance": self.variance,
            "refresh_every": self.refresh_every,
            "space": self.space,
            "steps_taken": self.steps_taken,
            "variance_steps": self.variance_steps,
            "dense_steps": self.dense_steps,
            "freeze_checked": self.freeze_checked,
            "reducer": self.reducer.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` of this same rank in a group of the same size
        (anything else raises ``ValueError`` naming the difference)."""
        if not isinstance(state_dict, dict) or "onebit" not in state_dict:
            raise ValueError("not a OneBitAdam state: it has no 'onebit' entry (a torch.optim.Adam state?)")
        mine = state_dict["onebit"]
        if mine.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported OneBitAdam state version {mine.get('version')!r}")
        self.reducer.bind()
        comm = self.reducer.comm
        if (mine["rank"], mine["world_size"]) != (comm.rank, comm.world_size):
            raise ValueError(
                f"this state was saved by rank {mine['rank']} of {mine['world_size']} and this is rank "
                f"{comm.rank} of {comm.world_size}: its error-feedback residuals belong to that rank. "
                "Load each rank's own state, in a group of the same size"
            )
        for field in ("freeze_step", "variance", "refresh_every", "space"):
            if mine[field] != getattr(self, field):
                raise ValueError(
                    f"this state was saved with {field}={mine[field]!r}, this optimizer has "
                    f"{field}={getattr(self, field)!r}"
                )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "onebit"})
        self.reducer.load_state_dict(mine["reducer"])
        self.steps_taken = int(mine["steps_taken"])
        self.variance_steps = int(mine["variance_steps"])
        self.dense_steps = int(mine["dense_steps"])
        self.freeze_checked = bool(mine["freeze_checked"])
        self.agreed = False  # the next step checks again that every rank loaded the same point


def onebit_adam_hook(state: OneBitAdam, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook of :class:`OneBitAdam` (register ``optimizer.comm_hook()``)."""
    return state._reduce_bucket(bucket)
