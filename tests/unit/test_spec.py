"""JobSpec: loading, every kind of error named by its field path, overrides, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gradwire.compressors.config import PowerSGDConfig
from gradwire.spec import CODING_COMPRESSORS, JobSpec, SpecError

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "specs").glob("*.yaml"))


def minimal(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "test-job",
        "model": {"name": "mlp"},
        "data": {"dataset": "digits", "batch_size": 16},
        "optimizer": {"lr": 0.1},
        "steps": 50,
        "workers": {"count": 4},
    }
    spec.update(changes)
    return {k: v for k, v in spec.items() if v is not None}  # None drops a key


def problems(data: dict[str, Any]) -> dict[str, str]:
    """path -> message of every problem in ``data``; fails if it is valid."""
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(data)
    return {p.path: p.message for p in info.value.problems}


# --- loading ----------------------------------------------------------------------------------


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"digits-powersgd.yaml", "digits-topk-ef21.yaml", "breast-cancer-coded.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_round_trip(path: Path, tmp_path: Path):
    spec = JobSpec.from_file(path)
    assert JobSpec.from_yaml(spec.to_yaml()) == spec
    assert JobSpec.from_json(spec.model_dump_json()) == spec
    as_json = tmp_path / "spec.json"
    as_json.write_text(json.dumps(spec.model_dump(mode="json")))
    assert JobSpec.from_file(as_json) == spec
    assert JobSpec.from_yaml(str(path)) == spec  # a one-line string naming a file is a path


def test_breast_cancer_example_is_cyclic_on_four_workers():
    spec = JobSpec.from_file(next(p for p in EXAMPLES if p.name == "breast-cancer-coded.yaml"))
    assert (spec.stragglers.code, spec.stragglers.s, spec.workers.count) == ("cyclic", 1, 4)


def test_defaults_of_a_minimal_spec():
    spec = JobSpec.from_dict(minimal())
    assert spec.seed == 0
    assert spec.compression.name == "none" and spec.compressor_config().registry_name() == "none"
    assert spec.data.partition.kind == "iid"
    assert spec.optimizer.name == "sgd" and spec.optimizer.schedule == "constant"
    assert spec.workers.cpus_per_worker == 1.0 and spec.workers.gpus_per_worker == 0.0
    assert spec.checkpoint.storage == ".gradwire/checkpoints" and spec.checkpoint.every_steps is None
    assert spec.stragglers is None and spec.injection() is None


def test_compressor_config_is_the_parsed_model_with_defaults():
    spec = JobSpec.from_dict(minimal(compression={"name": "powersgd", "rank": 8}))
    config = spec.compressor_config()
    assert isinstance(config, PowerSGDConfig)
    assert (config.rank, config.feedback, config.warm_start) == (8, "ef", True)
    assert spec.model_dump()["compression"] == {"name": "powersgd", "rank": 8}  # as written


def test_fractional_cpus_and_gpus():
    spec = JobSpec.from_dict(minimal(workers={"count": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 0.25}))
    assert spec.workers.cpus_per_worker == 0.5


def test_syntax_errors_and_non_mappings_are_spec_errors(tmp_path: Path):
    with pytest.raises(SpecError, match="not valid YAML"):
        JobSpec.from_yaml("name: [unclosed\n")
    with pytest.raises(SpecError, match="duplicate key 'steps'"):
        JobSpec.from_yaml("name: a\nsteps: 1\nsteps: 2\n")
    with pytest.raises(SpecError, match="not valid JSON"):
        JobSpec.from_json('{"name": ')
    with pytest.raises(SpecError, match="must be a mapping"):
        JobSpec.from_yaml("- a\n- b\n")
    with pytest.raises(SpecError, match="unknown spec format"):
        JobSpec.from_file(tmp_path / "spec.toml")
    with pytest.raises(FileNotFoundError):
        JobSpec.from_yaml(str(tmp_path / "missing.yaml"))


def test_yaml_exponent_floats_are_numbers():
    text = "name: a\nmodel: {name: m, params: {eps: 1e-6}}\ndata: {dataset: d, batch_size: 8}\n"
    spec = JobSpec.from_yaml(text + "optimizer: {lr: 3e-4}\nsteps: 10\n")
    assert spec.optimizer.lr == 3e-4 and spec.model.params == {"eps": 1e-6}
    assert JobSpec.from_dict(minimal()).with_overrides(["model.params.eps=1e-8"]).model.params["eps"] == 1e-8


def test_numbers_are_not_coerced_from_booleans_or_strings():
    found = problems(minimal(data={"dataset": "d", "batch_size": True}, optimizer={"lr": "fast"}))
    assert set(found) == {"data.batch_size", "optimizer.lr"}


# --- errors name the field path ---------------------------------------------------------------


def test_error_message_lists_one_problem_per_line():
    bad = minimal(name="Not_A_Label", seed=-1, data={"dataset": "digits", "batch_size": 0})
    with pytest.raises(SpecError) as info:
        JobSpec.from_dict(bad)
    lines = str(info.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["name", "seed", "data.batch_size"]
    assert len(info.value.errors()) == 3
    assert info.value.validation_error is not None
    assert isinstance(info.value, ValueError)


def test_unknown_top_level_key_is_named_with_a_suggestion():
    found = problems(minimal(wokers={"count": 2}))
    assert "did you mean 'workers'" in found["wokers"]


@pytest.mark.parametrize(
    "changes, path",
    [
        ({"workers": {"count": 2, "cpu": 1}}, "workers.cpu"),
        (
            {
                "data": {
                    "dataset": "d",
                    "batch_size": 1,
                    "partition": {"kind": "dirichlet", "alpha": 1, "x": 1},
                }
            },
            "data.partition.x",
        ),
        (
            {"stragglers": {"code": "cyclic", "s": 1, "inject": {"model": "bernoulli", "p": 0.1, "q": 1}}},
            "stragglers.inject.q",
        ),
        ({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}}, "optimizer.betas"),
    ],
)
def test_unknown_nested_keys_are_named(changes: dict[str, Any], path: str):
    assert problems(minimal(**changes))[path].startswith("unknown field")


def test_unknown_compressor_lists_the_available_ones():
    found = problems(minimal(compression={"name": "zip"}))
    assert "unknown compressor 'zip'" in found["compression.name"]
    assert "powersgd" in found["compression.name"] and "topk" in found["compression.name"]


def test_bad_compressor_params_are_named():
    found = problems(minimal(compression={"name": "powersgd", "rank": 0, "rnk": 2}))
    assert set(found) == {"compression.rank", "compression.rnk"}
    found = problems(minimal(compression={"name": "powersgd", "feedback": "ef21"}))
    assert "cannot be combined" in found["compression"]


@pytest.mark.parametrize("steps, epochs, got", [(10, 2, "both"), (None, None, "neither")])
def test_exactly_one_of_steps_or_epochs(steps: int | None, epochs: int | None, got: str):
    found = problems(minimal(steps=steps, epochs=epochs))
    assert found[""] == f"give exactly one of steps or epochs (got {got})"


def test_epochs_alone_is_fine():
    assert JobSpec.from_dict(minimal(steps=None, epochs=3)).epochs == 3


@pytest.mark.parametrize(
    "optimizer, path",
    [
        ({"lr": 0}, "optimizer.lr"),
        ({"lr": 0.1, "momentum": 1.0}, "optimizer.momentum"),
        ({"name": "adam", "lr": 0.1, "momentum": 0.9}, "optimizer.momentum"),
        ({"lr": 0.1, "schedule": "step"}, "optimizer.step_size"),
        ({"lr": 0.1, "warmup_steps": 50}, "optimizer.warmup_steps"),
        ({"name": "rmsprop", "lr": 0.1}, "optimizer.name"),
    ],
)
def test_optimizer_problems(optimizer: dict[str, Any], path: str):
    assert path in problems(minimal(optimizer=optimizer))


def test_partition_problems_drop_the_union_tag_from_the_path():
    data = minimal(data={"dataset": "d", "batch_size": 1, "partition": {"kind": "dirichlet", "alpha": 0}})
    assert set(problems(data)) == {"data.partition.alpha"}


# --- gradient codes ---------------------------------------------------------------------------


def coded(stragglers: dict[str, Any], count: int = 4, compressor: str = "none") -> dict[str, Any]:
    return minimal(workers={"count": count}, compression={"name": compressor}, stragglers=stragglers)


@pytest.mark.parametrize(
    "stragglers, count",
    [
        ({"code": "cyclic", "s": 1}, 4),
        ({"code": "cyclic", "s": 2}, 4),
        ({"code": "fractional", "s": 1}, 4),
        ({"code": "fractional", "s": 2}, 6),
        ({"code": "none", "inject": {"model": "bernoulli", "p": 0.1}}, 3),
        ({"code": "sr-sgc", "B": 1, "W": 3, "lam": 2}, 4),
        ({"code": "m-sgc", "B": 2, "W": 3, "lam": 4}, 4),
    ],
)
def test_possible_codes_are_accepted(stragglers: dict[str, Any], count: int):
    JobSpec.from_dict(coded(stragglers, count))


@pytest.mark.parametrize(
    "stragglers, count, path, words",
    [
        ({"code": "cyclic", "s": 4}, 4, "stragglers.s", "need s < workers.count"),
        ({"code": "fractional", "s": 4}, 4, "stragglers.s", "need s < workers.count"),
        ({"code": "fractional", "s": 2}, 4, "stragglers.s", "s + 1 to divide workers.count"),
        ({"code": "none", "s": 1}, 4, "stragglers.s", "s must be 0"),
        ({"code": "cyclic", "s": -1}, 4, "stragglers.s", "greater than or equal to 0"),
        ({"code": "m-sgc", "B": 3, "W": 3, "lam": 1}, 4, "stragglers.B", "smaller than the window"),
        ({"code": "m-sgc", "B": 1, "W": 1, "lam": 1}, 4, "stragglers.W", "greater than or equal to 2"),
        ({"code": "m-sgc", "B": 1, "W": 3, "lam": 5}, 4, "stragglers.lam", "exceeds workers.count=4"),
        ({"code": "sr-sgc", "B": 2, "W": 4, "lam": 2}, 4, "stragglers.B", "divide W - 1"),
        ({"code": "sr-sgc", "B": 1, "W": 2, "lam": 1}, 1, "stragglers.lam", "s=1, which requires s < work"),
        ({"code": "reed-solomon", "s": 1}, 4, "stragglers", "does not match any of the expected tags"),
    ],
)
def test_impossible_codes_are_named(stragglers: dict[str, Any], count: int, path: str, words: str):
    assert words in problems(coded(stragglers, count))[path]


@pytest.mark.parametrize("compressor", ["topk", "qsgd", "sign"])
def test_coding_refuses_non_linear_compressors(compressor: str):
    message = problems(coded({"code": "cyclic", "s": 1}, compressor=compressor))["stragglers.code"]
    assert f"compression.name is {compressor!r}" in message and "'cyclic'" in message


@pytest.mark.parametrize("compressor", CODING_COMPRESSORS)
def test_coding_accepts_linear_compressors(compressor: str):
    JobSpec.from_dict(coded({"code": "cyclic", "s": 1}, compressor=compressor))


def test_uncoded_stragglers_work_with_any_compressor():
    JobSpec.from_dict(coded({"code": "none", "inject": {"model": "bernoulli", "p": 0.2}}, compressor="topk"))


def test_bursty_injection_takes_missing_parameters_from_the_code():
    sgc = {"code": "m-sgc", "B": 1, "W": 3, "lam": 2, "inject": {"model": "bursty"}}
    spec = JobSpec.from_dict(coded(sgc))
    injected = spec.injection()
    assert (injected.B, injected.W, injected.lam) == (1, 3, 2)
    found = problems(coded({"code": "cyclic", "s": 1, "inject": {"model": "bursty", "B": 1}}))
    assert set(found) == {"stragglers.inject.W", "stragglers.inject.lam"}


def test_injection_parameters_are_checked():
    inject = {"model": "bernoulli", "p": 1.5, "slowdown": 0.5}
    found = problems(coded({"code": "cyclic", "s": 1, "inject": inject}))
    assert set(found) == {"stragglers.inject.p", "stragglers.inject.slowdown"}


# --- overrides --------------------------------------------------------------------------------


def test_overrides_apply_and_revalidate():
    spec = JobSpec.from_dict(minimal(compression={"name": "powersgd", "rank": 2}))
    new = spec.with_overrides(
        ["workers.count=8", "compression.rank=8", "model.params.hidden=128", "optimizer.lr=3e-3", "seed=7"]
    )
    assert (new.workers.count, new.compressor_config().rank, new.model.params) == (8, 8, {"hidden": 128})
    assert new.optimizer.lr == 0.003 and new.seed == 7
    assert spec.workers.count == 4  # the original is untouched


def test_overrides_create_sections_and_switch_steps_to_epochs():
    spec = JobSpec.from_dict(minimal())
    new = spec.with_overrides(["stragglers.code=cyclic", "stragglers.s=1", "epochs=2"])
    assert new.stragglers.s == 1 and (new.steps, new.epochs) == (None, 2)
    assert new.with_overrides(["stragglers=null"]).stragglers is None


def test_overrides_can_switch_compressor():
    spec = JobSpec.from_dict(minimal(compression={"name": "topk", "ratio": 0.1}))
    assert spec.with_overrides(["compression.ratio=0.5"]).compressor_config().ratio == 0.5
    with pytest.raises(SpecError, match=r"compression\.ratio"):
        spec.with_overrides(["compression.name=powersgd"])  # ratio is not a PowerSGD parameter


@pytest.mark.parametrize(
    "override, path, words",
    [
        ("workers.cont=4", "workers.cont", "did you mean 'count'"),
        ("wrkers.count=4", "wrkers", "did you mean 'workers'"),
        ("compression.rnk=8", "compression.rnk", "unknown field"),
        ("workers.count=0", "workers.count", "greater than or equal to 1"),
        ("workers.count=many", "workers.count", "valid integer"),
        ("stragglers.code=cyclic", "stragglers.code", "compression.name is 'topk'"),
        ("workers.count.max=4", "workers.count.max", "workers.count is a value"),
    ],
)
def test_bad_overrides_are_named(override: str, path: str, words: str):
    spec = JobSpec.from_dict(minimal(compression={"name": "topk"}))
    with pytest.raises(SpecError) as info:
        spec.with_overrides([override])
    found = {p.path: p.message for p in info.value.problems}
    assert words in found[path]
    if "is a value" not in words:
        assert f"(from override {override!r})" in found[path]


@pytest.mark.parametrize("override", ["workers.count", "=4", "workers..count=4"])
def test_malformed_overrides(override: str):
    with pytest.raises(SpecError, match=r"dotted\.key=value"):
        JobSpec.from_dict(minimal()).with_overrides([override])


# --- schema and import hygiene ----------------------------------------------------------------


def test_json_schema_is_documented():
    schema = JobSpec.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"name", "model", "data", "optimizer"}
    defs = schema["$defs"]
    assert defs["CompressionSpec"]["additionalProperties"] is True
    assert defs["WorkersSpec"]["additionalProperties"] is False
    for name, model in defs.items():
        for field, prop in model.get("properties", {}).items():
            if field not in ("kind", "model", "code") or name in ("RepetitionCodeSpec", "SequentialCodeSpec"):
                assert prop.get("description"), f"{name}.{field} has no description"
    json.dumps(schema)


def test_import_and_validation_do_not_import_torch():
    code = textwrap.dedent(
        """
        import sys
        from gradwire.spec import JobSpec
        spec = JobSpec.from_dict({
            "name": "x", "model": {"name": "mlp"}, "data": {"dataset": "digits", "batch_size": 8},
            "optimizer": {"lr": 0.1}, "steps": 5, "workers": {"count": 4},
            "compression": {"name": "powersgd", "rank": 4},
            "stragglers": {"code": "cyclic", "s": 1, "inject": {"model": "bursty", "B": 1, "W": 2, "lam": 1}},
        })
        spec.compressor_config()
        spec.with_overrides(["workers.count=6"])
        JobSpec.model_json_schema()
        assert "torch" not in sys.modules, "torch was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
