"""The job spec: one pydantic model shared by the CLI, the REST API and the worker (torch-free).

A spec is a YAML or JSON document::

    name: digits-powersgd
    model: {name: mlp, params: {hidden: 64}}
    data: {dataset: digits, batch_size: 32}
    optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
    steps: 300
    workers: {count: 4}
    compression: {name: powersgd, rank: 4}

Load it with :meth:`JobSpec.from_file` (or ``from_yaml`` / ``from_json`` / ``from_dict``) and
change it with :meth:`JobSpec.with_overrides`; every problem is reported at once as a
:class:`SpecError` listing ``field.path: message`` lines. The compression section is checked
by the compressor registry (``gradwire.compressors.registry``, torch-free), and a straggler
section is checked against ``workers.count`` with the arithmetic of ``compressors/coding/``,
re-stated here because that package imports torch. Field reference: docs/spec.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from gradwire.compressors.config import CompressorConfig
from gradwire.compressors.registry import UnknownCompressorError, parse_config
from gradwire.policy import JobPolicy, PolicyViolation
from gradwire.spec_io import (
    Problem,
    SpecError,
    UniqueKeyLoader,
    apply_override,
    blame,
    read_source,
    unique_json_object,
)

#: Compressors whose payloads add up (encode(a) + encode(b) decodes to a + b, up to rounding), so
#: that a coded round's all-reduce of a_i · c_i still yields the full gradient
#: (docs/algorithms.md §5.5). Gathering compressors cannot code.
CODING_COMPRESSORS = ("none", "fp16", "bf16", "powersgd")
#: The version of the JobSpec schema. A coordinator stores it with every spec it validated and
#: trusts those specs afterwards; a stored spec of another version is validated again. Raise it
#: when a change could make a stored spec invalid or mean something else.
SPEC_SCHEMA_VERSION = 1

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

#: a coordinator's job ids (server/store.py: new_job_id); ``resume_from`` in this form names a job
JOB_ID = re.compile(r"^job-[0-9a-f]{12}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Found = list[tuple[tuple[str, ...], str]]  # (field location, message) from a validator


def _raise(title: str, found: Found) -> None:
    """Report several problems from one validator, each at its own field location."""
    if found:
        errors: list[InitErrorDetails] = [
            {"type": PydanticCustomError("job_spec", message), "loc": loc, "input": None}
            for loc, message in found
        ]
        raise ValidationError.from_exception_data(title, errors)


# --- sections ---------------------------------------------------------------------------------


class ModelSpec(_Section):
    """Which model to train."""

    name: str = Field(min_length=1, description="model registry name (entry-point group gradwire.models)")
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the model; the worker validates them"
    )


class IidPartition(_Section):
    """Shuffle the data and give every worker an equal share."""

    kind: Literal["iid"] = "iid"


class DirichletPartition(_Section):
    """Non-iid shares: each class is split across workers in Dirichlet(alpha) proportions."""

    kind: Literal["dirichlet"] = "dirichlet"
    alpha: float = Field(gt=0, description="concentration; small alpha gives very uneven label mixes")


Partition = Annotated[IidPartition | DirichletPartition, Field(discriminator="kind")]


class DataSpec(_Section):
    """Which data, and how it is split across workers."""

    dataset: str = Field(
        min_length=1, description="dataset registry name (entry-point group gradwire.datasets)"
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the dataset; the worker validates them"
    )
    batch_size: int = Field(gt=0, description="examples per step on each worker")
    partition: Partition = Field(default_factory=IidPartition, description="how examples go to workers")


#: OneBitAdam's choices (compressors/onebit_adam.py, which imports torch, so the literals are repeated
#: here; tests/unit/test_spec_onebit_adam.py checks that they agree)
ONEBIT_MOMENTUM_COMPRESSORS = ("sign", "powersgd", "topk", "randk", "qsgd", "fp16", "bf16")
ONEBIT_VARIANCE_POLICIES = ("frozen", "doubling", "periodic", "local")
ONEBIT_SPACES = ("momentum", "update")
ONEBIT_WARMUP_DTYPES = ("float32", "bfloat16")
#: compressor parameters that OneBitAdam sets itself (its warm-up, non-finite policy and error feedback)
ONEBIT_FIXED_PARAMS = ("start_iter", "nonfinite", "feedback")
#: the fields that only onebit_adam takes
ONEBIT_FIELDS = (
    "freeze_step", "variance", "refresh_every", "space", "compressor", "compressor_params", "warmup_dtype",
)  # fmt: skip


def onebit_adam_label(optimizer: Mapping[str, Any]) -> str | None:
    """The compressor a onebit_adam job's workers report, ``onebit_adam:<compressor>``, from its
    stored (validated) optimizer section; ``None`` for another optimizer."""
    if optimizer.get("name") != "onebit_adam":
        return None
    return f"onebit_adam:{optimizer.get('compressor') or 'sign'}"


class OptimizerSpec(_Section):
    """The optimizer and its learning-rate schedule."""

    name: Literal["sgd", "adam", "adamw", "onebit_adam"] = Field(
        "sgd",
        description="torch.optim optimizer, or onebit_adam (gradwire's OneBitAdam: Adam whose steps "
        "travel compressed after freeze_step full-precision steps; compression must be none)",
    )
    lr: float = Field(gt=0, description="peak learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum in [0, 1); sgd only")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (decoupled for adamw and onebit_adam)")
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="learning-rate schedule after warm-up"
    )
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    step_size: int | None = Field(None, ge=1, description="schedule 'step': steps between decays (required)")
    gamma: float = Field(0.1, gt=0, le=1, description="schedule 'step': factor applied at each decay")
    freeze_step: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="onebit_adam: full-precision Adam steps before the compressed stage; "
        "default 5 % of the job's steps (at least 1)",
    )
    variance: Literal["frozen", "doubling", "periodic", "local"] | None = Field(
        None,
        description="onebit_adam: second-moment policy after freeze_step (default 'local': per-rank "
        "moments, the ranks' Adam steps averaged)",
    )
    refresh_every: int | None = Field(
        None, ge=2, le=10_000_000, description="onebit_adam, variance 'periodic': steps between refreshes"
    )
    space: Literal["momentum", "update"] | None = Field(
        None, description="onebit_adam: what is compressed, the momentum or Adam's step (default 'update')"
    )
    compressor: Literal["sign", "powersgd", "topk", "randk", "qsgd", "fp16", "bf16"] | None = Field(
        None, description="onebit_adam: the compressor (with error feedback) of each step (default 'sign')"
    )
    compressor_params: dict[str, Any] | None = Field(
        None,
        max_length=16,
        description="onebit_adam: that compressor's parameters (gradwire compressors NAME), without "
        "start_iter, nonfinite and feedback, which OneBitAdam sets (default for sign: {bits: 2})",
    )
    warmup_dtype: Literal["float32", "bfloat16"] | None = Field(
        None,
        description="onebit_adam: the dtype its warm-up's gradients are all-reduced in (default 'bfloat16', "
        "half the bytes of 'float32')",
    )

    @model_validator(mode="after")
    def _check(self) -> OptimizerSpec:
        found: Found = []
        if self.momentum and self.name != "sgd":
            found.append((("momentum",), f"momentum is an sgd parameter; {self.name} has none"))
        if self.schedule == "step" and self.step_size is None:
            found.append((("step_size",), "schedule 'step' needs step_size"))
        if self.schedule != "step" and self.step_size is not None:
            found.append((("step_size",), f"step_size is unused by schedule {self.schedule!r}"))
        if self.name == "onebit_adam":
            found += self._onebit_problems()
        else:
            for key in ONEBIT_FIELDS:
                if getattr(self, key) is not None:
                    found.append(((key,), f"{key} is a onebit_adam parameter; {self.name} has none"))
        _raise("OptimizerSpec", found)
        return self

    def _onebit_problems(self) -> Found:
        """compressors/onebit_adam.py's rules on the combinations of its options."""
        found: Found = []
        variance, space = self.onebit_variance(), self.onebit_space()
        if variance == "periodic" and self.refresh_every is None:
            found.append((("refresh_every",), "variance 'periodic' needs refresh_every"))
        if variance != "periodic" and self.refresh_every is not None:
            found.append((("refresh_every",), f"refresh_every is unused by variance {variance!r}"))
        if variance == "local" and space != "update":
            message = (
                "variance 'local' needs space 'update' (each rank's v differs, so only the ranks' Adam "
                "steps, not their momenta, can be averaged)"
            )
            found.append((("space",), message))
        params = dict(self.compressor_params or {})
        for key in ONEBIT_FIXED_PARAMS:
            if key in params:
                message = (
                    f"{key} is set by onebit_adam (freeze_step is its warm-up, a non-finite step always "
                    "stops the job, error feedback is 'ef'), not a compressor parameter to pass"
                )
                found.append((("compressor_params", key), message))
                params.pop(key)
        try:
            parse_config(self.onebit_compressor(), {**params, "feedback": "ef", "nonfinite": "raise"})
        except UnknownCompressorError as err:  # the Literal above lists only registered ones
            found.append((("compressor",), str(err)))
        except ValidationError as err:
            for problem in err.errors():
                loc = ("compressor_params", *(str(part) for part in problem["loc"]))
                found.append((loc, problem["msg"]))
        return found

    def onebit_variance(self) -> str:
        """onebit_adam's ``variance``, its default filled in."""
        return self.variance or "local"

    def onebit_space(self) -> str:
        """onebit_adam's ``space``, its default filled in."""
        return self.space or "update"

    def onebit_compressor(self) -> str:
        """onebit_adam's momentum compressor, its default filled in."""
        return self.compressor or "sign"

    def onebit_compressor_params(self) -> dict[str, Any]:
        """onebit_adam's compressor parameters: as written, else the 2-bit sign for ``sign``."""
        if self.compressor_params is not None:
            return dict(self.compressor_params)
        return {"bits": 2} if self.onebit_compressor() == "sign" else {}

    def onebit_warmup_dtype(self) -> str:
        """onebit_adam's ``warmup_dtype``, its default filled in."""
        return self.warmup_dtype or "bfloat16"

    def onebit_freeze_step(self, total_steps: int) -> int:
        """onebit_adam's ``freeze_step``: as written, else 5 % of ``total_steps`` (at least 1)."""
        if self.freeze_step is not None:
            return self.freeze_step
        return max(1, round(0.05 * total_steps))


class WorkersSpec(_Section):
    """The Ray Train worker group."""

    count: int = Field(1, ge=1, description="data-parallel workers (ranks)")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs per worker; fractions allowed")
    gpus_per_worker: float = Field(0.0, ge=0, description="Ray GPUs per worker; 0 trains on CPU with gloo")


class CompressionSpec(BaseModel):
    """A compressor from the registry and its parameters, written flat beside ``name``.

    The parameters are those of the compressor's config model (``gradwire compressors NAME`` or
    ``GET /v1/compressors``); :meth:`config` returns the validated model with its defaults.
    """

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        json_schema_extra={"examples": [{"name": "powersgd", "rank": 4}, {"name": "topk", "ratio": 0.01}]},
    )

    name: str = Field(
        "none", min_length=1, description="compressor registry name; 'none' is plain all-reduce"
    )
    _config: CompressorConfig | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _parse(self) -> CompressionSpec:
        try:
            self._config = parse_config(self.name, self.params())
        except UnknownCompressorError as err:
            _raise("CompressionSpec", [(("name",), str(err))])
        return self

    def params(self) -> dict[str, Any]:
        """The parameters as written (without defaults)."""
        return dict(self.model_extra or {})

    def config(self) -> CompressorConfig:
        """The compressor's validated config, defaults filled in."""
        assert self._config is not None
        return self._config


class UniformInjection(_Section):
    """No injected delays."""

    model: Literal["none"] = "none"


class BernoulliInjection(_Section):
    """Each worker is slowed down independently with probability p in each round."""

    model: Literal["bernoulli"] = "bernoulli"
    p: float = Field(ge=0, le=1, description="probability that a worker straggles in a round")
    slowdown: float = Field(5.0, ge=1, description="a straggler's compute time is multiplied by this")
    seed: int = Field(0, ge=0, description="seed of the straggler pattern")


class BurstyInjection(_Section):
    """Random patterns obeying the (B, W, lam)-bursty model (Krishnan et al., ICLR 2023)."""

    model: Literal["bursty"] = "bursty"
    B: int | None = Field(None, ge=1, description="burst length; default: the code's B (sr-sgc, m-sgc)")
    W: int | None = Field(None, ge=1, description="window; default: the code's W (sr-sgc, m-sgc)")
    lam: int | None = Field(None, ge=0, description="stragglers per window; default: the code's lam")
    slowdown: float = Field(5.0, ge=1, description="a straggler's compute time is multiplied by this")
    seed: int = Field(0, ge=0, description="seed of the straggler pattern")


Injection = Annotated[UniformInjection | BernoulliInjection | BurstyInjection, Field(discriminator="model")]


class RepetitionCodeSpec(_Section):
    """A gradient code of Tandon et al. (ICML 2017) tolerating s stragglers per step, or none."""

    code: Literal["none", "fractional", "cyclic"] = Field(
        description="'none' waits for every worker; 'fractional' needs (s + 1) | workers.count; "
        "'cyclic' works for any s < workers.count"
    )
    s: int = Field(
        0, ge=0, description="stragglers tolerated per step; each worker computes (s + 1)/n of a step"
    )
    inject: Injection | None = Field(None, description="artificial stragglers for experiments")

    @model_validator(mode="after")
    def _check(self) -> RepetitionCodeSpec:
        if self.code == "none" and self.s:
            _raise("RepetitionCodeSpec", [(("s",), "code 'none' tolerates no stragglers; s must be 0")])
        return self


class SequentialCodeSpec(_Section):
    """A sequential gradient code (Krishnan, Ebrahimi, Khisti, ICLR 2023) for the (B, W, lam)-bursty model."""

    code: Literal["sr-sgc", "m-sgc"] = Field(description="selective-repeat or multiplexed SGC")
    B: int = Field(ge=1, description="burst length: a worker straggles in at most B consecutive rounds")
    W: int = Field(ge=2, description="window of rounds; B <= W - 1")
    lam: int = Field(ge=1, description="distinct stragglers per window; lam <= workers.count")
    inject: Injection | None = Field(None, description="artificial stragglers for experiments")

    @model_validator(mode="after")
    def _check(self) -> SequentialCodeSpec:
        # compressors/coding/sgc.py: check_sgc_params; selective_repeat.py: SelectiveRepeatSGC
        B, W = self.B, self.W
        if B > W - 1:
            _raise(
                "SequentialCodeSpec",
                [(("B",), f"burst length B must be smaller than the window W; {B=}, {W=}")],
            )
        if self.code == "sr-sgc" and (W - 1) % B:
            _raise("SequentialCodeSpec", [(("B",), f"sr-sgc needs B to divide W - 1; got {B=}, {W=}")])
        return self

    def s(self) -> int:
        """SR-SGC's per-round code size, s = ceil(B·lam / (W − 1 + B)) (Scheme 1)."""
        return -(-self.B * self.lam // (self.W - 1 + self.B))


Stragglers = Annotated[RepetitionCodeSpec | SequentialCodeSpec, Field(discriminator="code")]


class CheckpointSpec(_Section):
    """When and where checkpoints go (Ray Train's storage)."""

    every_steps: int | None = Field(
        None, ge=1, description="checkpoint every this many steps; None: only at the end"
    )
    keep: int = Field(3, ge=1, description="newest checkpoints kept")
    storage: str = Field(
        ".gradwire/checkpoints",
        min_length=1,
        description="directory or URI (s3://, gs://, ...) for checkpoints",
    )


class EvaluationSpec(_Section):
    """When to evaluate on held-out data."""

    every_steps: int | None = Field(
        None, ge=1, description="evaluate every this many steps; None: only at the end"
    )


# --- the job ----------------------------------------------------------------------------------


class JobSpec(_Section):
    """One training job: what to train, on how many workers, with which compressor."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, title="JobSpec")

    name: str = Field(description="job name: a DNS label (lowercase letters, digits, '-'; at most 63)")
    seed: int = Field(0, ge=0, description="seed of model init, data order and partitioning")
    model: ModelSpec
    data: DataSpec
    optimizer: OptimizerSpec
    steps: int | None = Field(None, gt=0, description="optimizer steps to run (give steps or epochs)")
    epochs: int | None = Field(
        None, gt=0, description="passes over each worker's share (give steps or epochs)"
    )
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    compression: CompressionSpec = Field(default_factory=CompressionSpec)
    stragglers: Stragglers | None = Field(None, description="gradient code and injected stragglers")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resume_from: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="start from another run's checkpoint: a coordinator job id (job-<12 hex>; the only "
        "form a coordinator accepts) or a checkpoint path, a run folder or one of its checkpoint_* "
        "folders (the only form gradwire train accepts)",
    )

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        if not _DNS_LABEL.fullmatch(name):  # match's $ would let a trailing newline through
            raise ValueError(
                f"{name!r} is not a DNS label: use 1-63 lowercase letters, digits and '-', "
                "starting and ending with a letter or digit"
            )
        return name

    @field_validator("resume_from")
    @classmethod
    def _resume_from(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value != value.strip() or any(not c.isprintable() for c in value):
            raise ValueError("a job id or path without surrounding spaces or control characters")
        if value.startswith("job-") and "/" not in value and not JOB_ID.match(value):
            message = f"{value!r} is not a job id (job- and 12 hex digits); write ./{value} for a path"
            raise ValueError(message)
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> JobSpec:
        found: Found = []
        if (self.steps is None) == (self.epochs is None):
            got = "both" if self.steps is not None else "neither"
            found.append(((), f"give exactly one of steps or epochs (got {got})"))
        warmup = self.optimizer.warmup_steps
        if self.steps is not None and warmup >= self.steps:
            message = f"warmup_steps={warmup} leaves no training after warm-up (steps={self.steps})"
            found.append((("optimizer", "warmup_steps"), message))
        if self.stragglers is not None:
            found += _straggler_problems(self.stragglers, self.workers.count, self.compression.name)
        if self.optimizer.name == "onebit_adam":
            found += self._onebit_adam_problems()
        written = self.compression.params().get("optimizer")
        if self.compression.name == "auto" and written is not None and written != self.optimizer.name:
            message = f"auto is told {written!r} but the job's optimizer.name is {self.optimizer.name!r}"
            found.append((("compression", "optimizer"), message))
        _raise("JobSpec", found)
        return self

    def _onebit_adam_problems(self) -> Found:
        """onebit_adam compresses Adam's steps itself, in its own DDP hook."""
        found: Found = []
        if self.compression.name != "none":
            message = (
                f"onebit_adam compresses its own steps (optimizer.compressor, sign by default) in its own "
                f"DDP hook, so the gradients cannot also go through {self.compression.name!r}; use "
                "compression: {name: none}"
            )
            found.append((("compression", "name"), message))
        if self.stragglers is not None and self.stragglers.code != "none":
            message = (
                f"gradient code {self.stragglers.code!r} decodes gradients outside DDP, where onebit_adam's "
                "hook cannot compress them; onebit_adam runs without a code (code 'none')"
            )
            found.append((("stragglers", "code"), message))
        freeze = self.optimizer.freeze_step
        if self.steps is not None and freeze is not None and freeze >= self.steps:
            message = (
                f"freeze_step={freeze} leaves no compressed step (steps={self.steps}); "
                "need freeze_step < steps"
            )
            found.append((("optimizer", "freeze_step"), message))
        return found

    def resume_job(self) -> str | None:
        """``resume_from`` when it names a coordinator job, else ``None``."""
        return self.resume_from if self.resume_from and JOB_ID.match(self.resume_from) else None

    def resume_path(self) -> str | None:
        """``resume_from`` when it is a checkpoint path (or URI), else ``None``."""
        return self.resume_from if self.resume_from and not self.resume_job() else None

    def confined(self, policy: JobPolicy | None) -> JobSpec:
        """This spec as ``policy`` places it (``checkpoint.storage`` under its checkpoint root,
        absolute), or :class:`PolicyError` naming each field the policy refuses
        (:mod:`gradwire.policy`). ``None`` (no policy) returns the spec unchanged."""
        if policy is None:
            return self
        found = policy.violations(self)
        if found:
            raise PolicyError(found)
        storage = policy.storage(self)
        if storage == self.checkpoint.storage:
            return self
        return self.model_copy(update={"checkpoint": self.checkpoint.model_copy(update={"storage": storage})})

    def run_compression(self) -> CompressionSpec:
        """The compression section the workers run: as written, except that ``auto`` is told the job's
        optimizer (under Adam it leaves out the candidates that cost Adam accuracy)."""
        if self.compression.name != "auto" or "optimizer" in self.compression.params():
            return self.compression
        return CompressionSpec(name="auto", **self.compression.params(), optimizer=self.optimizer.name)

    def compressor_config(self) -> CompressorConfig:
        """The compression section as the compressor's validated config model (:meth:`run_compression`)."""
        return self.run_compression().config()

    def injection(self) -> UniformInjection | BernoulliInjection | BurstyInjection | None:
        """The injected straggler model, with a bursty model's B, W, lam taken from an SGC where omitted."""
        st = self.stragglers
        inject = st.inject if st is not None else None
        if isinstance(inject, BurstyInjection) and isinstance(st, SequentialCodeSpec):
            defaults = {"B": st.B, "W": st.W, "lam": st.lam}
            return inject.model_copy(update={k: v for k, v in defaults.items() if getattr(inject, k) is None})
        return inject

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> JobSpec:
        """Validate a parsed document; raises :class:`SpecError`."""
        if not isinstance(data, Mapping):
            raise SpecError([Problem("", f"a job spec must be a mapping, got {type(data).__name__}")])
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise _spec_error(err) from err

    @classmethod
    def from_yaml(cls, source: str | Path) -> JobSpec:
        """From YAML text, or from a file (a ``Path``, or a one-line string naming a .yaml/.yml file)."""
        text = read_source(source, (".yaml", ".yml"))
        try:
            data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
        except yaml.YAMLError as err:
            raise SpecError([Problem("", f"not valid YAML: {err}")]) from err
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, source: str | Path) -> JobSpec:
        """From JSON text, or from a file (a ``Path``, or a one-line string naming a .json file)."""
        text = read_source(source, (".json",))
        try:
            data = json.loads(text, object_pairs_hook=unique_json_object)
        except ValueError as err:
            raise SpecError([Problem("", f"not valid JSON: {err}")]) from err
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        """From a .yaml, .yml or .json file, chosen by suffix."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            return cls.from_yaml(path)
        if suffix == ".json":
            return cls.from_json(path)
        raise SpecError([Problem("", f"{path}: unknown spec format {suffix!r}; use .yaml, .yml or .json")])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_overrides(self, overrides: Iterable[str]) -> JobSpec:
        """A new spec with dotted ``key=value`` overrides applied, values parsed as YAML.

        ``workers.count=4``, ``compression.rank=8``, ``model.params.hidden=128``,
        ``stragglers=null``. Setting ``steps`` clears ``epochs`` and vice versa. The result is
        validated again; problems caused by an override say which one.
        """
        data = self.model_dump(mode="python", exclude_unset=True)
        applied: list[tuple[str, str]] = []
        for text in overrides:
            key = apply_override(data, text)
            applied.append((key, text))
        try:
            return type(self).model_validate(data)
        except ValidationError as err:
            problems = [blame(p, applied) for p in _spec_error(err).problems]
            raise SpecError(problems, err) from err


def _spec_error(err: ValidationError) -> SpecError:
    """A JobSpec validation error as a SpecError (paths walk through JobSpec's sections; the
    compression section's fields are the compressor's, listed by `gradwire compressors`)."""
    return SpecError.from_validation_error(err, JobSpec, (CompressionSpec,))


def _straggler_problems(st: RepetitionCodeSpec | SequentialCodeSpec, n: int, compressor: str) -> Found:
    """Checks of the stragglers section that need workers.count or the compressor."""
    found: Found = []
    if isinstance(st, RepetitionCodeSpec) and st.code != "none":
        if st.s >= n:  # compressors/coding/gradient_code.py: check_code_params
            message = (
                f"s={st.s} stragglers out of workers.count={n} leave nobody to decode from; "
                "need s < workers.count"
            )
            found.append((("stragglers", "s"), message))
        elif st.code == "fractional" and n % (st.s + 1):  # coding/constructions.py: fractional_repetition
            message = (
                f"fractional repetition needs s + 1 to divide workers.count; got s={st.s}, "
                f"workers.count={n}; code 'cyclic' works for any s < workers.count"
            )
            found.append((("stragglers", "s"), message))
    if isinstance(st, SequentialCodeSpec):
        if st.lam > n:  # compressors/coding/sgc.py: check_sgc_params
            message = f"lam={st.lam} distinct stragglers per window exceeds workers.count={n}"
            found.append((("stragglers", "lam"), message))
        elif st.code == "sr-sgc" and st.s() >= n:  # coding/selective_repeat.py: needs an (n, s) code
            message = (
                f"sr-sgc with B={st.B}, W={st.W}, lam={st.lam} needs an (n, s) code with s={st.s()}, "
                f"which requires s < workers.count={n}; use more workers"
            )
            found.append((("stragglers", "lam"), message))
    if st.code != "none" and compressor not in CODING_COMPRESSORS:
        message = (
            f"gradient code {st.code!r} needs a linear compressor ({', '.join(CODING_COMPRESSORS)}), "
            f"but compression.name is {compressor!r}"
        )
        found.append((("stragglers", "code"), message))
    if isinstance(st.inject, BurstyInjection) and isinstance(st, RepetitionCodeSpec):
        for key in ("B", "W", "lam"):
            if getattr(st.inject, key) is None:
                message = (
                    f"bursty injection needs {key} unless the code is sr-sgc or m-sgc (then it is theirs)"
                )
                found.append((("stragglers", "inject", key), message))
    return found


# --- errors -----------------------------------------------------------------------------------


class PolicyError(SpecError):
    """A valid spec that asks for what the policy does not allow; ``kind`` is the first
    violation's (``limit-exceeded``, ``import-path-refused`` or ``path-refused``)."""

    def __init__(self, violations: list[PolicyViolation]):
        self.violations = violations
        self.kind = violations[0].kind
        super().__init__([Problem(v.path, v.message) for v in violations])
