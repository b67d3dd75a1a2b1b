"""``compression: auto``: the compressor chosen at run time, from the link and the step as measured.

    state, hook = make_hook("auto")                     # or make_reducer("auto", ...)
    ddp.register_comm_hook(state, hook)
    current_choice(state)                               # "auto:powersgd-r4" once it has chosen

:class:`AutoReducer` runs an ordinary :class:`~gradwire.compressors.reducer.Reducer` for the candidate it
has chosen (plain all-reduce until the first choice) and, every so often, measures and chooses again:

1. **Measure** (at the first bucket of step ``probe_after``, then every ``remeasure_every`` steps, on
   every rank at the same point of the same step): ``probe_reps`` timed all-reduces of 4 KiB and of a
   large probe sized to take about 25 ms on this link (at most ``probe_bytes``; one 256 KiB all-reduce
   tells the size) on the reducer's own process group, unless the plain all-reduces of the step before,
   timed in the call, moved enough bytes to take the large probe's place (:meth:`AutoReducer.measure`);
   the step's
   compute time (from one step start to the next, less the time spent in this reducer: the median of the
   steps since the last measurement); the running candidate's compression seconds per step and its
   communication seconds (median step; the job's first step left out); and, from the
   gradients of the step before, the quality figures of the guard (below). One all-reduce (MAX) of
   these numbers gives every rank the same ones: the slowest rank's times, the least communication (the
   rank that waited least for a peer) and the lowest energy fraction.
2. **Fit** α and B to the probes with the cost model's ring formulas
   (:func:`gradwire.compressors.costmodel.fit_link`); where the running choice moves at least the large
   probe's bytes per step and its exchanges took longer in the step than that link explains, the lower
   bandwidth they imply replaces the probes' (:meth:`AutoReducer.link_of_step`).
3. **Predict** each candidate's step time: the cost model's traffic for the buckets DDP handed over
   (:func:`~gradwire.compressors.costmodel.step_traffic`), compute + compression + α–β communication
   (:func:`~gradwire.compressors.costmodel.predict_step`, nothing assumed hidden behind backward). The
   running choice is not predicted but priced by what it measured: compute + its compression + its
   communication per step. That is what its steps cost, overlap with backward included (plain
   all-reduce runs as futures in the DDP hook, below), where the model would count all of it.
   Compression seconds: measured for candidates that have run, else a per-element rate of this
   machine's calibration (``benchmarks/costmodel.py``).
4. **Guard**: PowerSGD rank r is eligible only if the best rank-r approximation of the compressed
   matrices keeps at least ``min_energy`` of their energy, Σ‖M_r‖²/Σ‖M‖² (Eckart–Young: the top r
   squared singular values; estimated by a randomized range finder of 8 columns and two power
   iterations, as PowerSGD itself estimates the top subspace), so when the energy of the low ranks falls
   the smallest eligible rank rises. Top-k is eligible if its k largest entries keep ``min_energy``;
   fp16 if no gradient entry exceeds its range. ``none`` and ``bf16`` always are. Under Adam or AdamW
   (``optimizer``, filled in by a job from its spec) Top-k and PowerSGD below ``adaptive_min_rank`` (8)
   never are: there they lose accuracy however much energy they keep (on our LM a rank 1 chosen at step
   3, where one direction held 90 % of the energy, cost 60 more steps to the target).
   docs/algorithms.md, "Choosing the compressor at run time", gives the sources.
5. **Choose** the fastest eligible candidate, each priced at its predicted step times
   :meth:`~gradwire.compressors.config.AutoConfig.steps_factor` (unless the optimizer is SGD, PowerSGD and
   Top-k pay ``adaptive_steps_penalty``, 10 %, for the extra steps they need to the same accuracy);
   switch only if it is priced ``switch_margin`` below the running one (plain all-reduce before the first
   choice), or the running one lost its eligibility.
   The predictions rest on a few timed steps and probes, so one a few per cent faster than the running
   choice is no reason to switch. The inputs are the same on every rank, so is the choice: no rank ever
   runs another compressor than its peers.

**In the DDP hook**, while auto runs plain all-reduce it hands DDP each bucket's all-reduce as a future
(:meth:`AutoReducer.reduce_bucket`), as ``make_hook("none")`` and DDP's own hook do, so it runs while
backward computes the next buckets; the time backward waits for it after the last bucket is that step's
communication. The step before each measurement is the exception: each bucket's all-reduce is waited for
in the call and timed, a probe of the link (:meth:`AutoReducer.timing_exchanges`). A compressing
candidate runs in the hook call (or on the hook's thread with ``overlap=True``).

**Switching keeps error feedback sound by carrying the residual over.** With error feedback the sum of
what was sent plus the ranks' mean residual equals the sum of the mean gradients (nothing is lost, only
delayed). On a switch the old reducer's residuals ``e_i`` (feedback ``ef``: PowerSGD, Top-k with EF) are
added to the next gradient this rank hands to the new reducer, once. So the invariant holds across the
switch: into ``none`` the residual is sent exactly, into another EF compressor it enters its input
``g + e``. Resetting instead would drop up to one step's worth of untransmitted gradient per switch.
EF21's buffers are estimates of the gradient, not a debt, and start afresh with the new reducer's dense
first round (nothing to carry).

Binding, pickling and checkpoints follow the reducer's rules: ``state_dict()`` holds the choice, its
history, the measured compression times and the running reducer's state; loading it rebuilds that
reducer. The probes are not gradient bytes: they are counted in ``stats()["probe_bytes"]``, not in
``bytes_sent``.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from gradwire.compressors.communicator import Communicator
from gradwire.compressors.config import AUTO_CANDIDATES, AutoConfig, CompressorConfig
from gradwire.compressors.costmodel import (
    CompressTime,
    Link,
    Shape,
    bandwidth_for,
    bucket_terms,
    collective_terms,
    fit_link,
    numel,
    predict_step,
    step_traffic,
)
from gradwire.compressors.reducer import Reducer, resolved
from gradwire.compressors.registry import parse_config, plugin

STATE_VERSION = 1
#: the smaller probe: its time is mostly α
SMALL_PROBE_BYTES = 4096
#: the sizing probe, timed once: it absorbs a shaper's burst and tells how large the large probe must be
SIZING_PROBE_BYTES = 256 << 10
#: the large probe is sized to take about this long on the link: long beside α's jitter (a few ms on a
#: loaded machine, which a 1 MiB probe at 1 Gbit/s could not outweigh), short enough that a slow link
#: does not spend half a second being measured (2 MiB × 3 at 100 Mbit/s did)
PROBE_TARGET_S = 0.025
#: fp16's largest finite value: a gradient entry above it (after dividing by the world size, as the
#: communicator does before a 16-bit all-reduce) would overflow
FP16_MAX = 65504.0
#: PowerSGD ranks the guard measures (the candidates' ranks)
GUARD_RANKS = (1, 2, 4, 8)
#: compression cost of a candidate that has not run yet: ``call_ms + ns_per_element · elements`` per
#: step, as ``benchmarks/costmodel.py`` fitted them on this project's 2-core test machine
#: (gradwire/cli/calibration.json, "rates"); once a candidate has run, its measured seconds replace these
PRIOR_RATES: dict[str, tuple[float, float]] = {
    "none": (0.0169, 0.073),
    "fp16": (0.0, 6.14),
    "bf16": (0.118, 0.905),
    "powersgd": (0.509, 3.15),
    "topk": (0.62, 6.45),
}


class AutoChoiceError(RuntimeError):
    """A choice that cannot be made (an unknown candidate, a switch outside a step boundary)."""


def optimizer_kind(optimizer: Any) -> str:
    """What auto's ``optimizer`` field needs to know of a torch optimizer: ``"sgd"`` for
    ``torch.optim.SGD``, ``"adamw"`` for ``AdamW``, and ``"adam"`` (Adam's rules, the safe ones) for every
    other optimizer, since most scale each coordinate by its own statistics as Adam does. Wrappers that
    hold the optimizer as ``.optimizer`` (Lightning's ``LightningOptimizer``, Accelerate's
    ``AcceleratedOptimizer``) are unwrapped."""
    inner = optimizer
    for _ in range(4):  # a wrapper of a wrapper at most, in practice
        if not isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            break
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            "optimizer: expected 'sgd', 'adam', 'adamw' or a torch.optim.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if isinstance(inner, torch.optim.SGD):
        return "sgd"
    return "adamw" if isinstance(inner, torch.optim.AdamW) else "adam"


def with_optimizer_kind(params: dict[str, Any]) -> dict[str, Any]:
    """auto's ``params`` with a torch optimizer given as ``optimizer`` replaced by its kind."""
    told = params.get("optimizer")
    if told is None or isinstance(told, str):
        return params
    return {**params, "optimizer": optimizer_kind(told)}


def not_a_compressor(config: CompressorConfig) -> Any:
    """The registry's factory for ``auto``: it is a reducer of reducers, built by ``make_reducer`` and
    ``make_hook``, not a compressor of single tensors."""
    raise AutoChoiceError(
        "'auto' chooses among compressors at run time and is not a compressor itself: build it with "
        "gradwire.compressors.make_reducer('auto', ...) or make_hook('auto', ...)"
    )


# --- the quality guard's measurements --------------------------------------------------------------


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The matrix PowerSGD compresses for a tensor: first dimension × the rest."""
    return t.reshape(t.shape[0], -1)


def rank_energies(m: torch.Tensor, ranks: Sequence[int] = GUARD_RANKS, generator: Any = None) -> list[float]:
    """Energy (squared Frobenius norm) of the best rank-r approximation of ``m`` for each r, estimated
    with a randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4): ``max(ranks)`` random
    columns, two power iterations, the singular values of ``m`` projected on the subspace found. Never
    above the true best-rank-r energy (a projection keeps at most that)."""
    m = m.detach().double()
    a, b = m.shape
    width = min(max(ranks), a, b)
    q = torch.randn(b, width, dtype=m.dtype, generator=generator)
    for _ in range(2):
        p, _ = torch.linalg.qr(m @ q)
        q, _ = torch.linalg.qr(m.T @ p)
    p, _ = torch.linalg.qr(m @ q)
    sq = torch.linalg.svdvals(p.T @ m).square()
    return [float(sq[: min(r, width)].sum()) for r in ranks]


def topk_energy(t: torch.Tensor, ratio: float) -> float:
    """Energy of the ``ceil(ratio·d)`` entries of largest magnitude."""
    flat = t.detach().reshape(-1).double().square()
    k = max(1, min(flat.numel(), math.ceil(ratio * flat.numel())))
    return float(torch.topk(flat, k, sorted=False).values.sum())


class GuardFigures:
    """What the guard needs of one step's gradients on this rank, summed over its buckets."""

    def __init__(self) -> None:
        self.matrix_energy = 0.0  # Σ‖M‖² of the matrices PowerSGD would compress
        self.rank_energy = [0.0] * len(GUARD_RANKS)
        self.all_energy = 0.0  # Σ‖g‖² of every tensor Top-k would compress
        self.topk_energy = 0.0
        self.max_abs = 0.0

    def add(self, tensors: Sequence[torch.Tensor], topk_ratio: float, generator: Any) -> None:
        for t in tensors:
            if t.numel() == 0:
                continue
            self.max_abs = max(self.max_abs, float(t.detach().abs().max()))
            if t.dim() < 2:
                continue
            energy = float(t.detach().double().square().sum())
            self.matrix_energy += energy
            for i, e in enumerate(rank_energies(as_matrix(t), GUARD_RANKS, generator)):
                self.rank_energy[i] += e
            self.all_energy += energy
            self.topk_energy += topk_energy(t, topk_ratio)

    def fractions(self) -> list[float]:
        """Kept energy per guard rank, then Top-k's (1.0 when there is nothing to compress)."""
        ranks = [e / self.matrix_energy if self.matrix_energy > 0 else 1.0 for e in self.rank_energy]
        topk = self.topk_energy / self.all_energy if self.all_energy > 0 else 1.0
        return [min(1.0, f) for f in [*ranks, topk]]


# --- the reducer ------------------------------------------------------------------------------------


class AutoReducer(Reducer):
    """A :class:`Reducer` that runs the candidate it chose and chooses again as it measures.

    It overrides every public method of :class:`Reducer` (it holds a reducer rather than a compressor),
    so it serves wherever a reducer does: the DDP hook, ``gather_state_dicts`` and ``load_own_state``.
    """

    def __init__(self, config: AutoConfig, process_group: Any = None):
        if not isinstance(config, AutoConfig):
            raise TypeError(f"AutoReducer needs an AutoConfig, not {type(config).__name__}")
        self.config = config
        if config.optimizer is None:
            warnings.warn(
                "compression auto was not told the optimizer, so it follows Adam's rules: no Top-k and no "
                f"PowerSGD below rank {config.adaptive_min_rank}. Pass optimizer='sgd' (or the torch "
                "optimizer) to let it choose them under SGD",
                UserWarning,
                stacklevel=3,
            )
        self.comm = Communicator(process_group)
        self.step = 0
        #: the running choice's label; None until the first choice (a plain all-reduce runs meanwhile)
        self.choice: str | None = None
        #: (step, label, reason) of every choice
        self.history: list[tuple[int, str, str]] = []
        #: the last decision's inputs and predictions (the same on every rank)
        self.last_decision: dict[str, Any] = {}
        self.next_decision = max(config.probe_after, config.start_iter)
        self.inner = self._build("none")
        self.measured_compress: dict[str, float] = {}  # label → seconds per step (rank-agreed)
        self.carry: dict[int, torch.Tensor] = {}  # residuals of the previous choice, one step to go
        self.probe_seconds = 0.0
        self.probe_bytes = 0
        self._last_start: float | None = None  # when the previous step's first bucket came
        self._buckets = 0  # buckets of the current step reduced so far
        self._retired = {"compress_seconds": 0.0, "communicate_seconds": 0.0, "nonfinite_steps": 0}
        self._reset_window()
        self._generator = torch.Generator().manual_seed(config.seed)
        if self.comm.bound:
            self.bind()

    def _reset_window(self) -> None:
        self._step_started: float | None = None
        self._hook_seconds = 0.0  # time inside reduce() since the step started
        self._compute: list[float] = []
        self._step_communicate = 0.0  # the running reducer's communication seconds in the current step
        self._communicate: list[float] = []  # ... in each step of the window since the last switch
        self._handed: float | None = None  # when a step's last bucket went off as a future
        self._completions: list[float] = []  # when that step's bucket futures completed
        self._window_compress = self.inner.compress_seconds
        self._window_steps = 0
        self._exchanges: list[tuple[int, float]] = []  # (bytes, seconds) of plain buckets timed in the call
        self._guard: GuardFigures | None = None
        self._shapes: list[list[Shape]] = []

    def _build(self, label: str) -> Reducer:
        name, params = self.config.candidate_params(label)
        config = parse_config(name, params)
        inner = Reducer(config, plugin(name).factory()(config), self.comm.group)
        inner.comm = self.comm  # one ledger and one channel (the hook's own group) for every choice
        return inner

    # --- binding and the reducer surface -------------------------------------------------------
    def bind(self) -> None:
        self.comm.bind()
        self.inner.bind()

    def set_process_group(self, process_group: Any) -> None:
        self.comm.set_process_group(process_group)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = self._generator.get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(state["_generator"])
        self.__dict__.update(state, _generator=generator)
        self.inner.comm = self.comm  # one communicator again after unpickling

    @property
    def name(self) -> str:
        return "auto"

    @property
    def passthrough(self) -> bool:
        return False

    @property
    def compressor(self) -> Any:
        return self.inner.compressor

    @property
    def feedback(self) -> Any:
        return self.inner.feedback

    def current_choice(self) -> str:
        """``auto:<label>`` of the running candidate (``auto:measuring`` before the first choice): what
        a job reports as its compressor."""
        return f"auto:{self.choice or 'measuring'}"

    def reduce_flat_async(self, flat: torch.Tensor, advance: bool = True) -> torch.futures.Future:
        raise RuntimeError("reduce_flat_async needs 'none' without feedback, not 'auto'")

    # --- the step -------------------------------------------------------------------------------
    def reduce(
        self,
        tensors: Sequence[torch.Tensor],
        keys: Sequence[int] | None = None,
        advance: bool = True,
        out: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        tensors = list(tensors)
        keys = list(range(len(tensors))) if keys is None else list(keys)
        entered = self._enter(tensors, keys)
        return self._reduce_here(tensors, keys, advance, out, entered)

    def reduce_bucket(
        self, tensors: list[torch.Tensor], keys: list[int], advance: bool, buffer: torch.Tensor
    ) -> torch.futures.Future:
        """One DDP bucket (the hook without ``overlap``). While auto runs plain all-reduce and owes no
        residual to these keys, the bucket's all-reduce is returned as a future (in the step before a
        measurement, :meth:`timing_exchanges`, once it has completed), as DDP's own hook does,
        so it runs while backward computes the next buckets; the time backward then waits for it after
        the last bucket counts as this step's communication, not as compute. Otherwise the bucket is
        reduced in the call."""
        entered = self._enter(tensors, keys)
        if not self.inner.passthrough or any(k in self.carry for k in keys):
            self._reduce_here(tensors, keys, advance, tensors, entered)
            return resolved(buffer)
        if self.timing_exchanges():  # DDP's own bucket all-reduced as ever, but waited for here and timed
            launched = time.perf_counter()
            self.inner.reduce_flat_async(buffer, advance).wait()
            seconds = time.perf_counter() - launched
            self._exchanges.append((buffer.numel() * buffer.element_size(), seconds))
            self._leave(entered, advance, seconds)
            return resolved(buffer)
        future = self.inner.reduce_flat_async(buffer, advance)
        self._leave(entered, advance, 0.0)  # its communication is timed when it completes
        if advance:
            self._handed = time.perf_counter()

        def completed(done: torch.futures.Future) -> torch.Tensor:
            self._completions.append(time.perf_counter())
            return done.value()  # re-raises a failed all-reduce, or a non-finite step under "raise"

        return future.then(completed)

    def _enter(self, tensors: list[torch.Tensor], keys: list[int]) -> float:
        """Before a bucket is reduced: a step's first bucket closes the previous step's timing and may
        decide or check the guard (collectives, every rank at the same bucket); the step before a decision
        or a guard check gathers its guard figures. Returns when this bucket's hook time starts."""
        self.bind()
        entered = time.perf_counter()
        if self._step_started is None:  # the first bucket of a step
            self._begin_step(entered)
            if self.comm.world_size == 1 and self.choice is None:
                self.choice = "none"
                self.history.append((self.step, "none", "one rank: nothing to send"))
            elif self.step >= self.next_decision:
                if self._shapes and self.comm.world_size > 1:
                    self.decide()
                    entered = time.perf_counter()  # the probes are not this step's hook time
                elif self.comm.world_size > 1:
                    self.next_decision = self.step + 1  # no shapes seen yet: gather them this step
            elif self._guard is not None and self.last_decision:
                self.check_guard()
                entered = time.perf_counter()
        deciding = self.step + 1 == self.next_decision
        checking = self.last_decision and (self.step + 1) % self.config.guard_every == 0
        if deciding or checking:  # the step before a decision or a guard check: its guard figures
            if deciding:
                self._shapes.append([tuple(t.shape) for t in tensors])
            if self._guard is None:
                self._guard = GuardFigures()
            self._guard.add(tensors, self.config.topk_ratio, self._generator)
        return entered

    def _reduce_here(
        self,
        tensors: list[torch.Tensor],
        keys: list[int],
        advance: bool,
        out: Sequence[torch.Tensor] | None,
        entered: float,
    ) -> list[torch.Tensor]:
        """The running reducer's ``reduce`` in the call, with any residual carried over a switch."""
        if self.carry:
            tensors = [t + self.carry.pop(k).to(t) if k in self.carry else t for t, k in zip(tensors, keys)]
        before, timing = self.inner.communicate_seconds, self.timing_exchanges()
        result = self.inner.reduce(tensors, keys=keys, advance=advance, out=out)
        communicated = self.inner.communicate_seconds - before
        if timing:  # one all-reduce of the bucket's bytes: a probe of the link at the gradient's size
            self._exchanges.append((sum(t.numel() * t.element_size() for t in tensors), communicated))
        self._leave(entered, advance, communicated)
        return result

    def timing_exchanges(self) -> bool:
        """Whether this step's buckets are timed as probes of the link: the step before a decision, while
        auto runs plain all-reduce (each bucket one all-reduce, waited for in the call so that backward
        does not run during it; in the DDP hook on DDP's own bucket, no copy made, so the step costs what
        a plain step does but for the overlap). :meth:`measure` fits the link to them in place of the
        large probe where they move enough bytes."""
        return self.step + 1 == self.next_decision and self.inner.passthrough and self.comm.world_size > 1

    def _leave(self, entered: float, advance: bool, communicate: float) -> None:
        self._step_communicate += communicate
        self._hook_seconds += time.perf_counter() - entered
        self._buckets += 1
        if advance:
            self.step += 1
            self._window_steps += 1
            self._step_started = None
            self._buckets = 0

    def _begin_step(self, now: float) -> None:
        """A step's first bucket: the previous step's compute is the time since its first bucket less
        the time spent in this reducer and, where its plain all-reduce ran as a future, the time backward
        waited for it after the last bucket (which is also that step's communication)."""
        waited = max([0.0, *(t - self._handed for t in self._completions)]) if self._handed else 0.0
        if self._last_start is not None:
            self._compute.append(max(0.0, now - self._last_start - self._hook_seconds - waited))
            if self.step > 1:  # the job's first exchange also pays one-time costs
                self._communicate.append(self._step_communicate + waited)
        self._last_start = self._step_started = now
        self._hook_seconds = 0.0
        self._step_communicate = 0.0
        self._handed, self._completions = None, []

    # --- measuring and choosing -------------------------------------------------------------
    def _probe(self, nbytes: int, reps: int, untimed: int = 0) -> float:
        """Least seconds of ``reps`` all-reduces of ``nbytes`` (after ``untimed`` more): the machine's
        noise (a descheduled rank, the kernel's network work) only ever adds time, so the least is the
        link's (a median of 3 still let two slow 4 KiB probes of 3 inflate α, and with it B, 2×)."""
        x = torch.zeros(max(1, nbytes // 4))
        group = self.comm.channel
        times = []
        for i in range(reps + untimed):
            started = time.perf_counter()
            dist.all_reduce(x, group=group)
            if i >= untimed:
                times.append(time.perf_counter() - started)
        self.probe_bytes += (reps + untimed) * x.numel() * 4
        return min(times)

    def _large_probe(self) -> tuple[str, int, float]:
        """The large probe, ``(collective, bytes, least seconds)`` on this rank: one sizing probe, then
        the large one, sized from the sizing probe's slowest-rank time (every rank must run the same
        all-reduces) to take about ``PROBE_TARGET_S``, at most ``probe_bytes``."""
        sizing = min(SIZING_PROBE_BYTES, self.config.probe_bytes)
        sizing_s = torch.tensor([self._probe(sizing, 1)], dtype=torch.float64)
        dist.all_reduce(sizing_s, op=dist.ReduceOp.MAX, group=self.comm.channel)
        wanted = sizing * PROBE_TARGET_S / max(float(sizing_s), 1e-6)
        large = 4 * (int(min(max(wanted, sizing), self.config.probe_bytes)) // 4)
        return ("all_reduce", large, self._probe(large, self.config.probe_reps))

    def exchanges_resolve(self, exchanges: list[tuple[str, int, float]], small_s: float) -> bool:
        """Whether the plain buckets timed the step before resolve the link's bandwidth as well as the
        large probe would: together they moved at least ``probe_bytes`` (the large probe's most), or
        their time beyond one small probe's each is at least the large probe's ``PROBE_TARGET_S``."""
        moved = sum(nbytes for _, nbytes, _ in exchanges)
        beyond = sum(seconds for _, _, seconds in exchanges) - len(exchanges) * small_s
        return bool(exchanges) and (moved >= self.config.probe_bytes or beyond >= PROBE_TARGET_S)

    def measure(self) -> dict[str, Any]:
        """This step's rank-agreed measurements (a collective: every rank calls it at the same point).

        The link's samples: the 4 KiB probe (after one untimed, which warms the connections), and either
        the plain buckets the step before timed in the call (:meth:`timing_exchanges`), where they
        resolve the bandwidth (:meth:`exchanges_resolve`), or the large probe. The buckets are probes
        the training ran anyway: on a slow link they spare the sizing and large probes' seconds."""
        started = time.perf_counter()
        shapes = self._shapes or [[]]
        small_s = self._probe(SMALL_PROBE_BYTES, self.config.probe_reps, untimed=1)
        # MAX: the slowest rank's small probe; of the negated: each bucket's least time over the ranks
        # (the rank that arrived last at it waited for no peer). Every rank timed the same buckets.
        first = torch.tensor([small_s] + [-seconds for _, seconds in self._exchanges], dtype=torch.float64)
        dist.all_reduce(first, op=dist.ReduceOp.MAX, group=self.comm.channel)
        small_s, *negated = first.tolist()
        exchanges = [("all_reduce", nbytes, -t) for (nbytes, _), t in zip(self._exchanges, negated)]
        large = [] if self.exchanges_resolve(exchanges, small_s) else [self._large_probe()]
        compute = statistics.median(self._compute) if self._compute else 0.0
        steps = max(1, self._window_steps)
        compress = (self.inner.compress_seconds - self._window_compress) / steps
        communicate = statistics.median(self._communicate) if self._communicate else 0.0
        guard = (self._guard or GuardFigures()).fractions()
        mine = [seconds for _, _, seconds in large] + [compute, compress]
        mine += [self._guard.max_abs if self._guard else 0.0]
        # MAX of the negated: every rank gets the lowest fraction, and the least communication (the rank
        # that arrived last at each exchange waited for no peer)
        mine += [-f for f in guard] + [-communicate]
        agreed = torch.tensor(mine, dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.comm.channel)
        values = agreed.tolist()
        if large:
            (kind, nbytes, _), large_s = large[0], values.pop(0)
            samples = [(kind, nbytes, large_s)]
        else:
            samples = exchanges
        self.probe_seconds += time.perf_counter() - started
        n = len(GUARD_RANKS)
        return {
            "probes": [("all_reduce", SMALL_PROBE_BYTES, small_s), *samples],
            "link_from": "probes" if large else "exchanges",
            "compute_s": values[0], "compress_s": values[1], "max_abs": values[2],
            "rank_energy": dict(zip(GUARD_RANKS, (-v for v in values[3 : 3 + n]))),
            "topk_energy": -values[3 + n], "communicate_s": -values[4 + n], "shapes": shapes,
            "communicate_steps": len(self._communicate),  # the same on every rank: steps run in lockstep
        }  # fmt: skip

    def agreed_guard(self) -> dict[str, Any]:
        """The guard figures of the step before, the same on every rank (the lowest energy fractions, the
        largest entry): one all-reduce."""
        figures = self._guard or GuardFigures()
        self._guard = None
        agreed = torch.tensor([figures.max_abs] + [-f for f in figures.fractions()], dtype=torch.float64)
        if self.comm.world_size > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.comm.channel)
        values = agreed.tolist()
        return {"max_abs": values[0], "rank_energy": dict(zip(GUARD_RANKS, (-v for v in values[1:-1]))),
                "topk_energy": -values[-1]}  # fmt: skip

    def check_guard(self) -> str:
        """Between two measurements: if the running choice fails the guard now, run the fastest eligible
        candidate at the last measured link and compute (a collective; returns the choice)."""
        m = self.agreed_guard()
        n, last = self.comm.world_size, self.last_decision
        current = self.choice or "none"
        if self.guard_holds(current, m, n):
            return current
        eligible = {label: self.guard_holds(label, m, n) for label in self.config.candidates}
        allowed = [c for c in self.config.candidates if eligible[c]] or ["none"]
        link = Link(last["bandwidth"], last["alpha_s"])
        predictions = self.predict(last["shapes"], n, link, last["compute_s"], sorted({*allowed, "none"}))
        priced = self.priced(predictions)
        best = min(allowed, key=lambda c: priced[c])
        self.last_decision = {
            **last, "step": self.step, "predicted_s": predictions, "priced_s": priced, "eligible": eligible,
            "rank_energy": m["rank_energy"], "topk_energy": m["topk_energy"], "choice": best,
        }  # fmt: skip
        self.switch_to(best, f"{current} failed the quality guard")
        return best

    def decide(self) -> str:
        """Measure, predict, guard, and switch if that pays (a collective; returns the choice)."""
        m = self.measure()
        n = self.comm.world_size
        if self.choice is not None:
            self.measured_compress[self.choice] = m["compress_s"]
        probed = fit_link(m["probes"], n)
        link, seen_by = self.link_of_step(probed, m, n)
        predictions, eligible = self.predict(m["shapes"], n, link, m["compute_s"]), {}
        for label in self.config.candidates:
            eligible[label] = self.guard_holds(label, m, n)
        allowed = [c for c in self.config.candidates if eligible[c]] or ["none"]
        if "none" not in predictions:
            predictions.update(self.predict(m["shapes"], n, link, m["compute_s"], ["none"]))
        current = self.choice
        if m["communicate_steps"]:  # the running choice costs what it measured (module doc, step 3)
            predictions[current or "none"] = m["compute_s"] + m["compress_s"] + m["communicate_s"]
        priced = self.priced(predictions)
        best = min(allowed, key=lambda c: priced[c])  # ties: the first listed
        if current is None:  # the first steps ran a plain all-reduce: the first choice is a switch from it
            reason = "first choice"
            keep = priced["none"] * (1.0 - self.config.switch_margin)
            if "none" in allowed and priced[best] >= keep:
                best = "none"  # not worth leaving plain all-reduce for
        elif current not in allowed:
            reason = f"{current} failed the quality guard"
        elif priced[best] < priced[current] * (1.0 - self.config.switch_margin):
            reason = f"priced {priced[best] * 1e3:.1f} ms/step vs {priced[current] * 1e3:.1f}"
        else:
            best, reason = current, ""
        self.last_decision = {
            "step": self.step, "alpha_s": link.latency, "bandwidth": link.bandwidth,
            "bandwidth_from": seen_by, "probed_bandwidth": probed.bandwidth, "link_from": m["link_from"],
            "link_samples": [list(sample) for sample in m["probes"]], "running": current or "none",
            "communicate_s": m["communicate_s"], "compute_s": m["compute_s"], "predicted_s": predictions,
            "priced_s": priced, "eligible": eligible,
            "rank_energy": m["rank_energy"], "topk_energy": m["topk_energy"], "choice": best,
            "shapes": m["shapes"],
        }  # fmt: skip
        if best != current:
            self.switch_to(best, reason)
        self.next_decision = self.step + self.config.remeasure_every
        self._reset_window()
        self._last_start = self._step_started = time.perf_counter()  # the probes are not compute
        return best

    def priced(self, predictions: dict[str, float]) -> dict[str, float]:
        """What auto compares: each predicted step time times the candidate's
        :meth:`~gradwire.compressors.config.AutoConfig.steps_factor` (under Adam, PowerSGD and Top-k pay
        for the extra steps they need to the same accuracy)."""
        return {label: seconds * self.config.steps_factor(label) for label, seconds in predictions.items()}

    def link_of_step(self, probed: Link, m: dict[str, Any], n: int) -> tuple[Link, str]:
        """The link the candidates are priced on, and where its bandwidth comes from: ``"probes"`` (the
        fit of the probes, ``probed``) or ``"step"``.

        The probes time the link alone, between two steps (so do the step before's buckets, reduced in
        the hook call while backward waits, where they stand in for the large probe). In the step the
        same bytes share the rank's
        core with the kernel's network work and DDP's copies: on this project's 2-core test machine the
        CNN's steps with a plain all-reduce of 4.3 MB ran 8-14 ms over its compute-only floor on a veth
        link where the probes had resolved no transfer time at all, so the cost model priced that
        all-reduce as free (docs/benchmarks.md, "compression: auto"). The step's own exchanges are the
        hook's closest measure of that cost. So when the running choice (plain all-reduce before the
        first choice) moves at least as many bytes per step as the large probe, enough to resolve a
        bandwidth as well as the probe does, the bandwidth its measured communication implies (least
        over the ranks, median over the steps) replaces the probes' where it is lower. The running
        choice is then priced by what it measured, and every other candidate on the same link. A choice
        that moves fewer bytes (PowerSGD) says little about the bandwidth, and the probes' fit stands.
        """
        if m["communicate_s"] <= 0 or not m["probes"]:
            return probed, "probes"
        name, params = self.config.candidate_params(self.choice or "none")
        traffic = step_traffic(m["shapes"], parse_config(name, params))
        largest = max(nbytes for _, nbytes, _ in m["probes"])
        _, probe_volume = collective_terms("all_reduce", largest, n, probed.topology)
        if sum(bucket_terms(traffic, n, probed)[1]) < probe_volume:
            return probed, "probes"
        seen = bandwidth_for(traffic, n, probed, m["communicate_s"])
        if seen is None or seen >= probed.bandwidth:
            return probed, "probes"
        return Link(seen, probed.latency, probed.topology), "step"

    def predict(
        self,
        shapes: list[list[Shape]],
        n: int,
        link: Link,
        compute_s: float,
        labels: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Predicted seconds per step of each candidate (the cost model, nothing hidden behind backward)."""
        elements = sum(numel(s) for bucket in shapes for s in bucket)
        out = {}
        for label in labels or self.config.candidates:
            name, params = self.config.candidate_params(label)
            config = parse_config(name, params)
            traffic = step_traffic(shapes, config)
            if label in self.measured_compress:
                compress = CompressTime(self.measured_compress[label])
            else:
                call_ms, ns = PRIOR_RATES[name]
                compress = CompressTime((call_ms * 1e6 + ns * elements) / 1e9)
            out[label] = predict_step(traffic, n, link, compute_s, compress.seconds(n)).step_s
        return out

    def guard_holds(self, label: str, m: dict[str, Any], n: int) -> bool:
        if not self.config.optimizer_allows(label):
            return False
        name, params = self.config.candidate_params(label)
        if name == "powersgd":
            return m["rank_energy"][int(params["rank"])] >= self.config.min_energy  # type: ignore[call-overload]
        if name == "topk":
            return m["topk_energy"] >= self.config.min_energy
        if name == "fp16":
            return m["max_abs"] / n < FP16_MAX
        return True

    def switch_to(self, label: str, reason: str = "asked") -> None:
        """Run ``label`` from the next bucket on, carrying the old reducer's EF residuals (module doc).
        Call it on every rank at the same step boundary (``decide`` does)."""
        if label not in AUTO_CANDIDATES:
            raise AutoChoiceError(f"unknown auto candidate {label!r}; known: {', '.join(AUTO_CANDIDATES)}")
        if self._buckets:
            raise AutoChoiceError(
                f"switch between steps, not inside one ({self._buckets} bucket(s) of step {self.step} "
                "were reduced already)"
            )
        old = self.inner
        if old.feedback.name == "ef":
            for key, buffers in old.feedback.state.items():
                residual = buffers.get("e")
                if residual is not None:
                    pending = self.carry.get(key)
                    self.carry[key] = residual.clone() if pending is None else pending + residual
        for key in ("compress_seconds", "communicate_seconds", "nonfinite_steps"):
            self._retired[key] += getattr(old, key)
        self.inner = self._build(label)
        # the window's compression and communication per step are the new choice's from here on
        self._window_compress, self._window_steps = 0.0, 0
        self._communicate = []
        self.choice = label
        self.history.append((self.step, label, reason))

    # --- reporting and state ----------------------------------------------------------------
    @property
    def compress_seconds(self) -> float:  # type: ignore[override]
        return self._retired["compress_seconds"] + self.inner.compress_seconds

    @property
    def communicate_seconds(self) -> float:  # type: ignore[override]
        return self._retired["communicate_seconds"] + self.inner.communicate_seconds

    @property
    def nonfinite_steps(self) -> int:  # type: ignore[override]
        return int(self._retired["nonfinite_steps"]) + self.inner.nonfinite_steps

    def stats(self) -> dict[str, float]:
        return {
            **self.comm.ledger.as_dict(),
            "steps": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "compress_seconds": self.compress_seconds,
            "communicate_seconds": self.communicate_seconds,
            "auto_switches": float(max(0, len(self.history) - 1)),
            "probe_seconds": self.probe_seconds,
            "probe_bytes": float(self.probe_bytes),
        }

    def state_dict(self) -> dict[str, Any]:
        self.bind()
        return {
            "version": STATE_VERSION,
            "compressor": "auto",
            "config": self.config.model_dump(),
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "step": self.step,
            "choice": self.choice,
            "history": [list(h) for h in self.history],
            "next_decision": self.next_decision,
            "measured_compress": dict(self.measured_compress),
            "carry": {k: v.detach().cpu().clone() for k, v in self.carry.items()},
            "ledger": self.comm.ledger.as_dict(),
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._validate(state)
        self.bind()
        same_world = state["world_size"] == self.comm.world_size
        if same_world and int(state["rank"]) != self.comm.rank:
            raise ValueError(
                f"state was saved by rank {state['rank']} of {state['world_size']}, and this is rank "
                f"{self.comm.rank}: load each rank's own state (load_own_state)"
            )
        self._load(state, same_world)

    def _validate(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"an auto reducer state is a dict from state_dict(), not {type(state).__name__}")
        if state.get("compressor") != "auto":
            raise ValueError(
                f"state was saved by compressor {state.get('compressor')!r}, this reducer runs 'auto'"
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported auto reducer state version {state.get('version')!r}")
        choice = state.get("choice")
        if choice is not None and choice not in AUTO_CANDIDATES:
            raise ValueError(f"state holds unknown auto choice {choice!r}")

    def _load(self, state: dict[str, Any], same_world: bool) -> None:
        self.choice = state["choice"]
        self.inner = self._build(self.choice or "none")
        self.inner.load_state_dict(state["inner"])  # this rank's own, or the shared parts (another world)
        if same_world:
            self.carry = {int(k): v.clone() for k, v in state.get("carry", {}).items()}
            self.comm.ledger.load(state.get("ledger", {}))
        else:
            self.carry = {}  # residuals belong to the ranks that made them (as the reducer's own EF)
        self.step = int(state["step"])
        self.history = [tuple(h) for h in state.get("history", [])]  # type: ignore[misc]
        self.next_decision = int(state["next_decision"])
        self.measured_compress = {str(k): float(v) for k, v in state.get("measured_compress", {}).items()}
        self._retired = {"compress_seconds": 0.0, "communicate_seconds": 0.0, "nonfinite_steps": 0}
        self._reset_window()
