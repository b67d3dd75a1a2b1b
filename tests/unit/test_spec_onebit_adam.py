"""``optimizer: {name: onebit_adam}`` in a job spec: its fields, their defaults and bounds, the cross-checks
with the rest of the spec (each problem named at its field), and what the runtime builds from it."""

from __future__ import annotations

from typing import Any

import pytest

from gradwire import spec as spec_module
from gradwire.spec import JobSpec, SpecError

BASE: dict[str, Any] = {
    "name": "onebit",
    "model": {"name": "mlp"},
    "data": {"dataset": "digits", "batch_size": 32},
    "steps": 400,
    "optimizer": {"name": "onebit_adam", "lr": 0.003},
}


def _spec(optimizer: dict[str, Any] | None = None, **top: Any) -> JobSpec:
    return JobSpec.from_dict({**BASE, "optimizer": {**BASE["optimizer"], **(optimizer or {})}, **top})


def test_a_minimal_onebit_adam_spec_gets_the_benchmarked_defaults():
    opt = _spec().optimizer
    assert (opt.onebit_variance(), opt.onebit_space(), opt.onebit_compressor()) == ("local", "update", "sign")
    assert (opt.onebit_compressor_params(), opt.onebit_warmup_dtype()) == ({"bits": 2}, "bfloat16")
    # parameters as written replace the default; another compressor has none by default
    assert _spec({"compressor_params": {"block": 64}}).optimizer.onebit_compressor_params() == {"block": 64}
    assert _spec({"compressor": "powersgd"}).optimizer.onebit_compressor_params() == {}
    assert _spec({"warmup_dtype": "float32"}).optimizer.onebit_warmup_dtype() == "float32"
    assert opt.onebit_freeze_step(400) == 20  # 5 % of the steps
    assert opt.onebit_freeze_step(10) == 1  # at least one full-precision step
    assert _spec({"freeze_step": 7}).optimizer.onebit_freeze_step(400) == 7


def test_every_option_is_accepted_where_onebit_adam_takes_it():
    opt = _spec(
        {
            "freeze_step": 50,
            "variance": "periodic",
            "refresh_every": 25,
            "space": "momentum",
            "compressor": "powersgd",
            "compressor_params": {"rank": 2},
            "weight_decay": 0.01,
        }
    ).optimizer
    assert (opt.variance, opt.refresh_every, opt.space, opt.compressor) == (
        "periodic",
        25,
        "momentum",
        "powersgd",
    )


@pytest.mark.parametrize(
    ("changes", "top", "path", "words"),
    [
        ({"freeze_step": 0}, {}, "optimizer.freeze_step", "greater than or equal to 1"),
        ({"freeze_step": 400}, {}, "optimizer.freeze_step", "freeze_step < steps"),
        ({"freeze_step": True}, {}, "optimizer.freeze_step", "integer"),
        ({"variance": "sometimes"}, {}, "optimizer.variance", "frozen"),
        ({"space": "momentum"}, {}, "optimizer.space", "needs space 'update'"),
        ({"variance": "periodic"}, {}, "optimizer.refresh_every", "needs refresh_every"),
        ({"refresh_every": 5}, {}, "optimizer.refresh_every", "unused by variance 'local'"),
        (
            {"variance": "periodic", "refresh_every": 1},
            {},
            "optimizer.refresh_every",
            "greater than or equal to 2",
        ),
        ({"compressor": "rle"}, {}, "optimizer.compressor", "sign"),
        ({"warmup_dtype": "float16"}, {}, "optimizer.warmup_dtype", "bfloat16"),
        ({"compressor_params": {"bits": 3}}, {}, "optimizer.compressor_params.bits", "less than or equal"),
        ({"compressor_params": {"bogus": 1}}, {}, "optimizer.compressor_params.bogus", "Extra inputs"),
        (
            {"compressor": "powersgd", "compressor_params": {"rank": 0}},
            {},
            "optimizer.compressor_params.rank",
            "greater than or equal to 1",
        ),
        (
            {"compressor_params": {"start_iter": 3}},
            {},
            "optimizer.compressor_params.start_iter",
            "set by onebit_adam",
        ),
        (
            {"compressor_params": {"feedback": "ef21"}},
            {},
            "optimizer.compressor_params.feedback",
            "set by onebit",
        ),
        (
            {"compressor_params": {"nonfinite": "skip"}},
            {},
            "optimizer.compressor_params.nonfinite",
            "set by onebit",
        ),
        ({"momentum": 0.9}, {}, "optimizer.momentum", "sgd parameter"),
        (
            {},
            {"compression": {"name": "topk", "ratio": 0.01}},
            "compression.name",
            "compression: {name: none}",
        ),
        ({}, {"compression": {"name": "auto"}}, "compression.name", "its own DDP hook"),
        (
            {},
            {"stragglers": {"code": "cyclic", "s": 1}, "workers": {"count": 2}},
            "stragglers.code",
            "onebit_adam runs without a code",
        ),
    ],
)
def test_bad_onebit_adam_fields_are_named(changes: dict, top: dict, path: str, words: str):
    with pytest.raises(SpecError) as err:
        _spec(changes, **top)
    text = str(err.value)
    assert f"{path}:" in text and words in text, text


def test_injected_stragglers_without_a_code_are_fine():
    spec = _spec(
        stragglers={"code": "none", "inject": {"model": "bernoulli", "p": 0.1}}, workers={"count": 2}
    )
    assert spec.optimizer.name == "onebit_adam"


def test_an_epoch_budget_leaves_freeze_step_to_the_runtime():
    spec = JobSpec.from_dict({**{k: v for k, v in BASE.items() if k != "steps"}, "epochs": 1,
                              "optimizer": {**BASE["optimizer"], "freeze_step": 100_000}})  # fmt: skip
    import torch

    from gradwire.worker.runtime import make_optimizer

    with pytest.raises(ValueError, match=r"optimizer\.freeze_step=100000 leaves no compressed step"):
        make_optimizer(spec.optimizer, torch.nn.Linear(2, 2).parameters(), total_steps=50)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize(
    "field",
    [
        ("freeze_step", 5),
        ("variance", "local"),
        ("space", "update"),
        ("compressor", "sign"),
        ("refresh_every", 3),
        ("compressor_params", {}),
        ("warmup_dtype", "bfloat16"),
    ],
)
def test_onebit_adam_fields_are_refused_for_other_optimizers(name: str, field: tuple[str, Any]):
    key, value = field
    with pytest.raises(
        SpecError, match=rf"optimizer\.{key}: {key} is a onebit_adam parameter; {name} has none"
    ):
        _spec({"name": name, key: value})


def test_switching_the_optimizer_by_override_names_what_no_longer_applies():
    spec = _spec({"freeze_step": 10})
    with pytest.raises(SpecError, match=r"optimizer\.freeze_step"):
        spec.with_overrides(["optimizer.name=adam"])
    assert spec.with_overrides(["optimizer.freeze_step=20"]).optimizer.freeze_step == 20


def test_the_spec_literals_are_onebit_adams_own():
    """spec.py may not import torch, so it repeats OneBitAdam's choices; they must agree."""
    from gradwire.compressors import onebit_adam

    assert spec_module.ONEBIT_MOMENTUM_COMPRESSORS == onebit_adam.MOMENTUM_COMPRESSORS
    assert spec_module.ONEBIT_VARIANCE_POLICIES == onebit_adam.VARIANCE_POLICIES
    assert spec_module.ONEBIT_SPACES == onebit_adam.SPACES
    assert tuple(onebit_adam.WARMUP_DTYPES) == spec_module.ONEBIT_WARMUP_DTYPES
    fields = spec_module.OptimizerSpec.model_fields
    assert fields["compressor"].annotation.__args__[0].__args__ == onebit_adam.MOMENTUM_COMPRESSORS
    assert fields["variance"].annotation.__args__[0].__args__ == onebit_adam.VARIANCE_POLICIES
    assert fields["space"].annotation.__args__[0].__args__ == onebit_adam.SPACES
    assert fields["warmup_dtype"].annotation.__args__[0].__args__ == spec_module.ONEBIT_WARMUP_DTYPES


def test_make_optimizer_builds_the_specs_onebit_adam():
    import torch

    from gradwire.compressors.onebit_adam import OneBitAdam
    from gradwire.worker.runtime import make_optimizer, per_rank_optimizer

    spec = _spec({"weight_decay": 0.01, "compressor": "topk", "compressor_params": {"ratio": 0.1}})
    opt = make_optimizer(spec.optimizer, torch.nn.Linear(4, 2).parameters(), total_steps=400)
    assert isinstance(opt, OneBitAdam) and per_rank_optimizer(opt)
    assert (opt.freeze_step, opt.variance, opt.space, opt.warmup_dtype) == (20, "local", "update", "bfloat16")
    assert opt.reducer.name == "topk" and opt.reducer.config.ratio == 0.1
    default = make_optimizer(_spec().optimizer, torch.nn.Linear(4, 2).parameters(), total_steps=400)
    assert default.reducer.name == "sign" and default.reducer.config.bits == 2
    assert opt.param_groups[0]["lr"] == 0.003 and opt.param_groups[0]["weight_decay"] == 0.01
    assert not per_rank_optimizer(
        make_optimizer(_spec({"name": "adam"}).optimizer, opt.param_groups[0]["params"])
    )
    with pytest.raises(ValueError, match=r"optimizer\.freeze_step: onebit_adam's default is 5 %"):
        make_optimizer(spec.optimizer, torch.nn.Linear(4, 2).parameters())
