"""Configuration models of the built-in compressors (torch-free).

The root package and the server import this module to validate a job's
compression section without importing torch, so it must stay free of torch and
of every other gradwire layer. Each model's JSON schema is what the REST API
serves for that compressor.

Which error-feedback rule may wrap which compressor is decided here, once:
EF21, EF21-SGDM and EControl update a shared estimate with the mean of the
workers' decoded messages (Richtárik et al. 2021, Alg. 1 line 3; Gao et al. 2024,
step 5), so they need a contractive compressor whose aggregate *is* that mean.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FeedbackName = Literal["none", "ef", "ef21", "ef21-sgdm", "econtrol"]
FEEDBACK_RULES: tuple[str, ...] = ("none", "ef", "ef21", "ef21-sgdm", "econtrol")
ESTIMATE_RULES = frozenset({"ef21", "ef21-sgdm", "econtrol"})


_FEEDBACK = "error-feedback rule around the compressor: none, ef, ef21, ef21-sgdm, econtrol"


_MIN_RATE = (
    "compress a tensor only if its plain bytes are at least this many times its compressed "
    "bytes; the others join the uncompressed all-reduce"
)


class CompressorConfig(BaseModel):
    """Parameters every compressor accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: feedback rules that are mathematically sound around this compressor
    supported_feedback: ClassVar[frozenset[str]] = frozenset(FEEDBACK_RULES)
    #: why the others are refused (shown in the error)
    feedback_note: ClassVar[str] = ""

    feedback: FeedbackName = Field("none", description=_FEEDBACK)
    eta: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="momentum of ef21-sgdm (0, 1] or feedback strength of econtrol [0, 1]",
    )
    start_iter: int = Field(0, ge=0, description="steps sent as a plain all-reduce first")
    min_compression_rate: float = Field(
        1.0,
        ge=0.0,
        description=_MIN_RATE,
    )
    seed: int = Field(0, ge=0, description="seed shared by all ranks (random projections, Rand-k)")
    nonfinite: Literal["propagate", "raise"] = Field(
        "propagate",
        description="NaN/Inf in any rank's gradient: 'propagate' returns NaN on every rank "
        "and leaves compressor state untouched; 'raise' raises NonFiniteGradientError on every rank",
    )

    @model_validator(mode="after")
    def _check_feedback(self) -> CompressorConfig:
        name = self.registry_name()
        if self.feedback not in self.supported_feedback:
            ok = ", ".join(sorted(self.supported_feedback))
            raise ValueError(
                f"feedback={self.feedback!r} cannot be combined with compressor {name!r}: "
                f"{self.feedback_note} Use one of: {ok}."
            )
        if self.eta is not None and self.feedback not in ("ef21-sgdm", "econtrol"):
            raise ValueError(
                f"eta is a parameter of feedback 'ef21-sgdm' and 'econtrol', not of {self.feedback!r}"
            )
        if self.feedback == "ef21-sgdm" and self.eta is not None and self.eta == 0.0:
            raise ValueError("eta must be in (0, 1] for feedback 'ef21-sgdm' (eta=0 never updates)")
        return self

    @classmethod
    def registry_name(cls) -> str:
        return getattr(cls, "name", cls.__name__)

    def resolved_eta(self) -> float:
        """η with the rule's default (0.1 for both, as tuned in Sadiev et al.)."""
        return 0.1 if self.eta is None else self.eta


class NoneConfig(CompressorConfig):
    """Plain all-reduce of fp32 gradients: the baseline."""

    name: ClassVar[str] = "none"


class Fp16Config(CompressorConfig):
    """Cast to float16, all-reduce, cast back (2 bytes per element)."""

    name: ClassVar[str] = "fp16"
    supported_feedback: ClassVar[frozenset[str]] = frozenset({"none", "ef"})
    feedback_note: ClassVar[str] = (
        "16-bit payloads are summed in 16 bit, so the aggregate is not exactly the mean of "
        "the decoded messages that EF21-style estimates track."
    )
    min_compression_rate: float = Field(0.0, ge=0.0, description=_MIN_RATE)


class Bf16Config(Fp16Config):
    """Cast to bfloat16, all-reduce, cast back (2 bytes per element)."""

    name: ClassVar[str] = "bf16"


class PowerSGDConfig(CompressorConfig):
    """Rank-r PowerSGD (Vogels et al., NeurIPS 2019, Alg. 1) with warm start and EF."""

    name: ClassVar[str] = "powersgd"
    supported_feedback: ClassVar[frozenset[str]] = frozenset({"none", "ef"})
    feedback_note: ClassVar[str] = (
        "PowerSGD's output is a low-rank projection of the mean gradient, not a mean of "
        "per-worker messages, so EF21-style estimates are not defined for it."
    )
    feedback: FeedbackName = Field("ef", description=_FEEDBACK)
    rank: int = Field(2, ge=1, description="rank r of the approximation")
    warm_start: bool = Field(True, description="reuse last step's Q (Alg. 1 'reuse query')")
    epsilon: float = Field(
        1e-8,
        ge=0.0,
        description="relative tolerance of the orthonormalisation: a column of P whose part orthogonal "
        "to the earlier columns is at most epsilon times its norm (never below the dtype's rounding) "
        "is dropped, not divided",
    )
    min_compression_rate: float = Field(2.0, ge=0.0, description=_MIN_RATE)


class _SparseBudget(CompressorConfig):
    ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="fraction of each tensor's elements to keep, in (0, 1]; "
        "0.01 if neither ratio nor k is given",
    )
    k: int | None = Field(None, ge=1, description="elements to keep per tensor (capped at its size)")

    @model_validator(mode="after")
    def _one_budget(self) -> _SparseBudget:
        if self.ratio is not None and self.k is not None:
            raise ValueError("give either ratio or k, not both")
        return self

    def budget(self) -> tuple[float | None, int | None]:
        if self.ratio is None and self.k is None:
            return 0.01, None
        return self.ratio, self.k


class TopKConfig(_SparseBudget):
    """Top-k per tensor; values and int32 indices are all-gathered (8 bytes per kept element)."""

    name: ClassVar[str] = "topk"
    feedback: FeedbackName = Field("ef", description=_FEEDBACK)
    select: Literal["auto", "threshold", "exact"] = Field(
        "auto",
        description="how the k largest are found: 'threshold' estimates the k-th largest magnitude "
        "from a seeded sample, takes everything above it in one pass and keeps the k largest of "
        "those (exact torch.topk when the estimate misses), 'exact' runs torch.topk on the whole "
        "tensor, 'auto' is 'threshold' for CPU tensors of 2^17 elements or more and 'exact' "
        "otherwise. The kept set is the same k largest magnitudes either way (up to ties)",
    )


class RandKConfig(_SparseBudget):
    """Rand-k with a seed shared by all ranks, so the kept values can be all-reduced."""

    name: ClassVar[str] = "randk"
    feedback: FeedbackName = Field("ef", description=_FEEDBACK)
    scale: bool = Field(False, description="multiply by d/k (unbiased; not contractive, so only none/ef)")

    @model_validator(mode="after")
    def _scaled_is_unbiased(self) -> RandKConfig:
        if self.scale and self.feedback in ESTIMATE_RULES:
            raise ValueError(
                f"feedback={self.feedback!r} cannot be combined with compressor 'randk' with "
                "scale=true: scaled Rand-k is unbiased, not contractive. Use scale=false, "
                "or feedback none or ef."
            )
        return self


class QSGDConfig(CompressorConfig):
    """QSGD (Alistarh et al., NeurIPS 2017): s levels, stochastic rounding, all-gather."""

    name: ClassVar[str] = "qsgd"
    supported_feedback: ClassVar[frozenset[str]] = frozenset({"none", "ef"})
    feedback_note: ClassVar[str] = (
        "QSGD is unbiased but not contractive (its variance can exceed the signal), which "
        "EF21-style estimates require."
    )
    levels: int = Field(127, ge=1, le=127, description="quantisation levels s (int8 on the wire)")
    bucket_size: int = Field(512, ge=1, description="elements that share one norm")


class SignConfig(CompressorConfig):
    """Scaled sign, C(p) = (‖p‖₁/d)·sign(p), as in EF-SignSGD (Karimireddy et al. 2019); with ``block``
    one scale per ``block`` consecutive elements, as in the blockwise sign of Zheng et al. (2019); with
    ``bits=2`` two magnitude classes per block, each sent at its own mean |x|."""

    name: ClassVar[str] = "sign"
    feedback: FeedbackName = Field("ef", description=_FEEDBACK)
    block: int | None = Field(
        None,
        ge=8,
        le=1 << 24,
        description="elements that share one scale (their mean |x|); none: one scale per tensor",
    )
    bits: int = Field(
        1,
        ge=1,
        le=2,
        description="bits per element: 1 (sign) or 2 (sign, and whether |x| is above its block's mean)",
    )


#: what ``compression: auto`` may choose from: label → (registry name, parameters). The labels are the
#: ones a job reports as ``auto:<label>``.
AUTO_CANDIDATES: dict[str, tuple[str, dict[str, object]]] = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
    "powersgd-r1": ("powersgd", {"rank": 1}),
    "powersgd-r2": ("powersgd", {"rank": 2}),
    "powersgd-r4": ("powersgd", {"rank": 4}),
    "powersgd-r8": ("powersgd", {"rank": 8}),
    "topk-ef21": ("topk", {"feedback": "ef21"}),
}
AutoCandidate = Literal[
    "none", "fp16", "bf16", "powersgd-r1", "powersgd-r2", "powersgd-r4", "powersgd-r8", "topk-ef21"
]


class AutoConfig(CompressorConfig):
    """Chooses among ``candidates`` at run time: measures the link and the step from inside the process
    group, predicts each candidate's step time with the cost model, keeps those whose quality guard
    holds and runs the fastest; measures again every ``remeasure_every`` steps (docs/compressors.md)."""

    name: ClassVar[str] = "auto"
    supported_feedback: ClassVar[frozenset[str]] = frozenset({"none"})
    feedback_note: ClassVar[str] = (
        "auto picks each candidate's own feedback rule (PowerSGD with ef, Top-k with ef21)."
    )
    candidates: list[AutoCandidate] = Field(
        default_factory=lambda: list(AUTO_CANDIDATES),
        min_length=1,
        max_length=len(AUTO_CANDIDATES),
        description="what auto may choose: none, fp16, bf16, powersgd-r1/r2/r4/r8, topk-ef21",
    )
    probe_after: int = Field(
        2, ge=2, le=10_000, description="plain all-reduce steps before the first choice (they time compute)"
    )
    remeasure_every: int = Field(
        200, ge=10, le=1_000_000, description="steps between two measurements of link and step (and choices)"
    )
    guard_every: int = Field(
        10,
        ge=1,
        le=1_000_000,
        description="steps between two checks of the quality guard alone (no probes): a running choice "
        "that fails it is replaced at once by the fastest eligible one",
    )
    probe_reps: int = Field(3, ge=1, le=20, description="timed all-reduces of each of the two probe sizes")
    probe_bytes: int = Field(
        4 << 20,
        ge=64 << 10,
        le=64 << 20,
        description="the largest probe all-reduce's bytes: the large probe is sized to take about 25 ms on "
        "the link, up to this (keep it well above a shaped link's token bucket); plain all-reduces of this "
        "many bytes in the step before a measurement take the large probe's place",
    )
    min_energy: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="quality guard: a PowerSGD rank r (or Top-k) is eligible only if it keeps at least this "
        "fraction of the gradient's energy (squared Frobenius norm) of the matrices it compresses",
    )
    switch_margin: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="switch only if the best prediction is this fraction faster than the running choice's",
    )
    topk_ratio: float = Field(0.01, gt=0.0, le=0.5, description="fraction of each tensor topk-ef21 keeps")
    optimizer: Literal["sgd", "adam", "adamw"] | None = Field(
        None,
        description="the optimizer the reduced gradients feed (a job fills it in from optimizer.name, the "
        "Lightning callback from the Trainer's optimizer): under adam or adamw auto never runs Top-k nor "
        "PowerSGD below adaptive_min_rank, which cost Adam accuracy however much energy they keep; unset, "
        "it follows Adam's rules, which are safe under SGD too (docs/compressors.md)",
    )
    adaptive_min_rank: Literal[1, 2, 4, 8] = Field(
        8, description="the lowest PowerSGD rank auto may run under adam or adamw"
    )
    adaptive_steps_penalty: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="unless the optimizer is sgd, PowerSGD and Top-k are priced at their predicted step "
        "times 1 + this: the extra steps they need under Adam to reach the same accuracy (0.1: PowerSGD "
        "r=8 took about 10 % more steps than uncompressed on the LM, docs/benchmarks.md); 0 ranks every "
        "candidate by step time alone",
    )

    @model_validator(mode="after")
    def _check_auto(self) -> AutoConfig:
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates lists a compressor twice: {self.candidates}")
        if not any(self.optimizer_allows(c) for c in self.candidates):
            under = self.optimizer or "an optimizer auto was not told (pass optimizer='sgd' if it is SGD)"
            raise ValueError(
                f"candidates {self.candidates}: none of them may run under {under} (Top-k and "
                f"PowerSGD below adaptive_min_rank={self.adaptive_min_rank} are left out under Adam)"
            )
        if self.min_compression_rate != 1.0:
            raise ValueError(
                "min_compression_rate is not a parameter of auto: each candidate keeps its own default"
            )
        return self

    def steps_factor(self, label: str) -> float:
        """What ``label``'s predicted step time is multiplied by when auto compares candidates:
        ``1 + adaptive_steps_penalty`` for the candidates that drop part of the gradient (PowerSGD, Top-k)
        under any optimizer but SGD, else 1. fp16 and bf16 only round, and under SGD PowerSGD at the
        ranks the guard allows reached the CNN's target in as many steps as plain all-reduce."""
        name, _ = AUTO_CANDIDATES[label]
        if self.optimizer == "sgd" or name not in ("powersgd", "topk"):
            return 1.0
        return 1.0 + self.adaptive_steps_penalty

    def optimizer_allows(self, label: str) -> bool:
        """Whether ``label`` may run under :attr:`optimizer`: with Adam or AdamW not Top-k, and PowerSGD
        only from :attr:`adaptive_min_rank` (Adam divides each coordinate by its own √v, so a compressor's
        error on a small coordinate becomes a large step; docs/benchmarks.md, "compression: auto").
        An optimizer auto was not told gets Adam's rules: they cost SGD some speed, never accuracy."""
        name, params = AUTO_CANDIDATES[label]
        if self.optimizer == "sgd":
            return True
        if name == "topk":
            return False
        return name != "powersgd" or int(params["rank"]) >= self.adaptive_min_rank  # type: ignore[call-overload]

    def candidate_params(self, label: str) -> tuple[str, dict[str, object]]:
        """Registry name and parameters of one candidate (seed and nonfinite passed on)."""
        if label not in AUTO_CANDIDATES:
            raise ValueError(f"unknown auto candidate {label!r}; known: {', '.join(AUTO_CANDIDATES)}")
        name, params = AUTO_CANDIDATES[label]
        params = {**params, "seed": self.seed, "nonfinite": self.nonfinite}
        if name == "topk":
            params["ratio"] = self.topk_ratio
        return name, params


BUILTIN_CONFIGS: dict[str, type[CompressorConfig]] = {
    cfg.name: cfg
    for cfg in (
        NoneConfig,
        Fp16Config,
        Bf16Config,
        PowerSGDConfig,
        TopKConfig,
        RandKConfig,
        QSGDConfig,
        SignConfig,
        AutoConfig,
    )
}
