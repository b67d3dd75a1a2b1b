"""One training step's forward, backward and gradient reduction, in the two ways a job can run.

* :class:`DdpStep` — the model wrapped in DDP with the gradwire comm hook: each rank computes
  its own share's batch, the hook compresses and averages the gradients during backward. With
  an :class:`OptimizerHook` (``optimizer: {name: onebit_adam}``) the hook is the optimizer's
  own instead: it averages the gradients of the warm-up steps, and afterwards the optimizer
  compresses and averages its steps in ``optimizer.step()`` (:func:`optimizer_step` counts it).
* :class:`CodedStep` — a gradient code (``stragglers: {code: fractional|cyclic}``): each rank
  computes the partitions the code gives it, :class:`~gradwire.compressors.coding.CodedRound`
  decodes the full gradient from the first ``n − s`` finishers, stragglers are left out.

Both leave the averaged gradient in ``p.grad`` and return a :class:`StepTimes`; the caller
runs the optimiser. Partition ``j``'s batch is the one rank ``j`` would use without a code, so
a coded run and an uncoded run over the same data follow the same trajectory (up to float
rounding: the decoded sum is exact in exact arithmetic).

Non-finite gradients end the job, identically on every rank: the reducer detects them across
ranks (``nonfinite`` in the compression config; ``"raise"`` raises, ``"propagate"`` counts
them in ``nonfinite_steps``), and the coded path checks the decoded gradient, which every rank
holds identically. :class:`NonFiniteStep` carries the reason.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: what NonFiniteGradientError says, also when DDP re-raises it from a hook's future
NONFINITE_MESSAGE = "held NaN or Inf"

#: one partition's (inputs, targets)
Batch = tuple[torch.Tensor, torch.Tensor]


class NonFiniteStep(FloatingPointError):
    """A step produced NaN or Inf gradients; training on would be training on garbage."""


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; the class dimension is the last one (classifiers and language models)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class StepTimes:
    """What one rank measured in one step (seconds; bytes are the ledger's running totals)."""

    loss: float
    compute_s: float = 0.0
    compress_s: float = 0.0
    communicate_s: float = 0.0
    wait_s: float = 0.0
    stragglers: list[int] = field(default_factory=list)


class OptimizerHook:
    """The DDP hook of an optimizer that averages its own steps (OneBitAdam), with what
    :class:`DdpStep` reads from a compression hook: the byte ledger and seconds, and the name of
    what runs (``onebit_adam:sign``). The optimizer's state is saved with the optimizer, per rank
    (:mod:`gradwire.worker.runtime`), so this holds none of its own."""

    def __init__(self, optimizer: Any, name: str) -> None:
        self.optimizer = optimizer
        self.name = name

    def comm_hook(self) -> tuple[Any, Any]:
        return self.optimizer.comm_hook()

    def stats(self) -> dict[str, Any]:
        return self.optimizer.stats()

    def compressor(self) -> str:
        from gradwire.compressors import current_choice

        return f"{self.name}:{current_choice(self.optimizer.reducer)}"

    def averages_gradients(self) -> bool:
        """Whether the coming backward's gradients are averaged by the hook (the warm-up steps), so
        every rank holds the same ones after it."""
        return not self.optimizer.compressing

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                "this rank's step state holds a compressor's state, but the job's optimizer "
                "runs its own hook: was the checkpoint saved by a job with another optimizer?"
            )


def optimizer_step(optimizer: torch.optim.Optimizer, train_step: Any, times: StepTimes) -> None:
    """``optimizer.step()``, adding to ``times`` the compress and communicate seconds the step
    spent (an :class:`OptimizerHook`'s optimizer compresses and averages there; others spend
    none). A non-finite value it detects raises :class:`NonFiniteStep` on every rank."""
    from gradwire.compressors.reducer import NonFiniteGradientError

    if getattr(train_step, "optimizer_hook", None) is None:  # a torch optimizer: nothing to count
        optimizer.step()
        return
    before = train_step.stats()
    try:
        optimizer.step()
    except NonFiniteGradientError as err:  # the reducer checks across ranks: every rank raises
        raise NonFiniteStep(f"non-finite optimizer step ({err})") from err
    after = train_step.stats()
    times.compress_s += after["compress_seconds"] - before["compress_seconds"]
    times.communicate_s += after["communicate_seconds"] - before["communicate_seconds"]


class DdpStep:
    """Forward and backward through DDP; the gradwire hook reduces the gradients inside backward
    (or, given ``optimizer_hook``, the optimizer's own hook, and ``compression`` must be none)."""

    def __init__(
        self,
        model: nn.Module,
        compression: Any,
        prepare_model: Any,
        *,
        rank: int = 0,
        stragglers: Any = None,
        optimizer_hook: OptimizerHook | None = None,
    ) -> None:
        from gradwire.compressors import make_hook

        self.model = prepare_model(model)  # Ray Train wraps it in DDP (gloo on CPU, NCCL on GPU)
        self.optimizer_hook = optimizer_hook
        if optimizer_hook is not None:
            if compression.name != "none":
                raise ValueError(
                    f"compression {compression.name!r} and the optimizer's own hook cannot both reduce "
                    "the gradients (DDP takes one hook); use compression 'none'"
                )
            self.hook_state: Any = optimizer_hook
            self.model.register_comm_hook(*optimizer_hook.comm_hook())
        else:
            self.hook_state, hook = make_hook(compression.name, **compression.params())
            self.model.register_comm_hook(self.hook_state, hook)
        self.partitions = None  # this rank's own share only
        # injected stragglers without a code (``stragglers: {code: none, inject: ...}``): a flagged
        # rank computes ``slowdown`` times longer, and every other rank waits for it in the all-reduce
        self.rank, self.stragglers = rank, stragglers
        self._last_compute_s: float | None = None

    @property
    def module(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def stats(self) -> dict[str, Any]:
        return self.hook_state.stats()

    def compressor(self) -> str:
        """The compressor the hook runs now (``auto:<choice>`` for ``auto``, ``onebit_adam:<its
        compressor>`` for the optimizer's hook): the step report's."""
        from gradwire.compressors import current_choice

        if self.optimizer_hook is not None:
            return self.optimizer_hook.compressor()
        return current_choice(self.hook_state)

    def compressor_choices(self) -> list[tuple[int, str, str]]:
        """``(step, choice, why)`` of each choice ``auto`` made (empty for a fixed compressor)."""
        from gradwire.compressors import choice_history

        if self.optimizer_hook is not None:
            return []
        return choice_history(self.hook_state)

    def state_dict(self) -> dict[str, Any]:
        return {"compressor": self.hook_state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hook_state.load_state_dict(state["compressor"])

    def __call__(self, batches: Mapping[int, Batch], step: int) -> StepTimes:
        from gradwire.compressors.reducer import NonFiniteGradientError, all_finite

        ((x, y),) = batches.values()
        before = self.stats()
        averaged = self.optimizer_hook is not None and self.optimizer_hook.averages_gradients()
        started = time.perf_counter()
        self.model.train()
        loss = loss_fn(self.model(x), y)
        for p in self.module.parameters():
            p.grad = None
        self._straggle(step, time.perf_counter() - started)
        try:
            loss.backward()  # the hook compresses and averages the gradients here
        except (NonFiniteGradientError, RuntimeError) as err:  # nonfinite="raise": on every rank at once
            if not isinstance(err, NonFiniteGradientError) and NONFINITE_MESSAGE not in str(err):
                raise  # (DDP re-raises an error from an asynchronous hook's future as a RuntimeError)
            message = f"step {step}: non-finite gradients ({err}); loss here {float(loss):.4g}"
            raise NonFiniteStep(message) from err
        elapsed = time.perf_counter() - started
        after = self.stats()
        if after["nonfinite_steps"] > before["nonfinite_steps"]:  # nonfinite="propagate": every rank sees it
            message = f"step {step}: non-finite gradients on some rank; loss here {float(loss):.4g}"
            raise NonFiniteStep(message)
        if averaged and not all_finite(
            [p.grad for p in self.module.parameters() if p.grad is not None]
        ):  # the mean: the same on every rank; one sync for all parameters
            raise NonFiniteStep(f"step {step}: non-finite mean gradients; loss here {float(loss):.4g}")
        compress = after["compress_seconds"] - before["compress_seconds"]
        communicate = after["communicate_seconds"] - before["communicate_seconds"]
        compute = max(0.0, elapsed - compress - communicate)
        self._last_compute_s = compute
        return StepTimes(
            loss=float(loss.detach()),
            compute_s=compute,
            compress_s=compress,
            communicate_s=communicate,
        )

    def _straggle(self, step: int, forward_s: float) -> None:
        """Sleep out an injected slowdown before backward (whose all-reduce the others wait in)."""
        if self.stragglers is None:
            return
        from gradwire.compressors.coding.stragglers import injected_delay

        slowdown = self.stragglers.slowdown_for(step, self.rank)
        if slowdown > 1.0:
            # the step's compute time: the last step's, or 3× the forward (backward ≈ 2× forward)
            compute = self._last_compute_s if self._last_compute_s is not None else 3 * forward_s
            time.sleep(injected_delay(slowdown, compute))


def straggler_model(injection: Any, n: int) -> Any:
    """The injected straggler model of a spec's ``stragglers.inject`` section (None without one)."""
    from gradwire.compressors.coding.stragglers import Bernoulli, Bursty

    if injection is None or injection.model == "none":
        return None
    if injection.model == "bernoulli":
        return Bernoulli(injection.p, slowdown=injection.slowdown, seed=injection.seed)
    return Bursty(injection.B, injection.W, injection.lam, injection.seed, n=n, slowdown=injection.slowdown)


class CodedStep:
    """A gradient-coded step: this rank's coded message, decoded across the first n − s finishers."""

    def __init__(self, model: nn.Module, spec: Any, rank: int, world_size: int, device: torch.device) -> None:
        from gradwire.compressors import make_reducer
        from gradwire.compressors.coding import CodedRound, coded_gradient
        from gradwire.compressors.coding.constructions import cyclic_repetition, fractional_repetition

        st = spec.stragglers
        if st.code == "fractional":
            self.code = fractional_repetition(world_size, st.s)
        else:
            self.code = cyclic_repetition(world_size, st.s, seed=spec.seed)
        self.model = model.to(device)  # no DDP: the coded round does the reduction
        self.module = self.model
        self.world_size = world_size
        self.reducer = make_reducer(spec.compression.name, **spec.run_compression().params())
        self.round = CodedRound(
            self.code,
            self.reducer,
            stragglers=straggler_model(spec.injection(), world_size),
            prefix=f"gradwire/{spec.name}/coded",
        )
        self.partitions = self.code.partitions(rank)
        self.weights = self.code.encode_weights(rank)
        self._coded_gradient = coded_gradient
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def stats(self) -> dict[str, Any]:
        return {**self.reducer.stats(), **self.round.stats()}

    def compressor(self) -> str:
        from gradwire.compressors import current_choice

        return current_choice(self.reducer)

    def compressor_choices(self) -> list[tuple[int, str, str]]:
        from gradwire.compressors import choice_history

        return choice_history(self.reducer)

    def state_dict(self) -> dict[str, Any]:
        return {"compressor": self.reducer.state_dict(), "coded": {"next_round": self.round.next_round}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reducer.load_state_dict(state["compressor"])
        self.round.next_round = int(state["coded"]["next_round"])

    def __call__(self, batches: Mapping[int, Batch], step: int) -> StepTimes:
        self.model.train()
        losses: list[torch.Tensor] = []

        def recorded_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(logits, targets)
            losses.append(loss.detach())
            return loss

        def compute(cancel: Any) -> list[torch.Tensor]:
            return self._coded_gradient(self.model, recorded_loss, batches, self.weights, cancel=cancel)

        before = self.reducer.stats()
        total, report = self.round.step(compute, like=self.params, round=step)
        mean = [t / self.world_size for t in total]  # Σ_j g_j over n partitions → their mean
        if not all(bool(torch.isfinite(g).all()) for g in mean):  # identical on every rank
            raise NonFiniteStep(f"step {step}: the decoded gradient is not finite")
        for p, g in zip(self.params, mean):
            p.grad = g
        after = self.reducer.stats()
        compute_s = report.compute_s or 0.0
        done = list(losses)  # an abandoned computation may have stopped part-way
        return StepTimes(
            loss=float(torch.stack(done).mean()) if done else float("nan"),
            compute_s=compute_s,
            compress_s=after["compress_seconds"] - before["compress_seconds"],
            communicate_s=after["communicate_seconds"] - before["communicate_seconds"],
            wait_s=max(0.0, report.waited_s - compute_s),
            stragglers=list(report.stragglers),
        )
