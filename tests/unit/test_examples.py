"""The example specs: each one loads, and together they cover every compressor, every feedback
rule Top-k accepts and every gradient code, and examples/README.md lists them all.

The coverage targets are read from the registry and the spec models, so registering a new
compressor, feedback rule or code makes these tests fail until an example shows it.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from gradwire.compressors import config_schemas, parse_config
from gradwire.spec import JobSpec, RepetitionCodeSpec, SequentialCodeSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPEC_FILES = sorted((EXAMPLES / "specs").glob("*.yaml"))


def _load_all() -> dict[str, JobSpec]:
    return {path.name: JobSpec.from_file(path) for path in SPEC_FILES}


def _topk_feedback_rules() -> set[str]:
    """Feedback rules the topk config accepts, found by trying every value its schema offers."""
    offered = config_schemas()["topk"]["properties"]["feedback"]["enum"]
    accepted = set()
    for rule in offered:
        try:
            parse_config("topk", {"feedback": rule})
        except ValidationError:
            continue
        accepted.add(rule)
    return accepted - {"none"}  # 'none' is the absence of a rule, not a rule to demonstrate


def _gradient_codes() -> set[str]:
    """Every code the stragglers section can name, except 'none' (no code)."""
    codes: set[str] = set()
    for model in (RepetitionCodeSpec, SequentialCodeSpec):
        codes.update(typing.get_args(model.model_fields["code"].annotation))
    return codes - {"none"}


def test_there_are_examples() -> None:
    assert len(SPEC_FILES) >= 4, f"no example specs found under {EXAMPLES / 'specs'}"


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_example_loads_and_is_laptop_sized(path: Path) -> None:
    spec = JobSpec.from_file(path)
    assert path.stem == spec.name, "an example's file name is its job name"
    assert path.read_text().startswith("#"), "an example opens with a comment saying what it shows"
    assert spec.steps is None or spec.steps <= 400


def test_every_registered_compressor_has_an_example() -> None:
    used = {spec.compression.name for spec in _load_all().values()}
    missing = set(config_schemas()) - used
    assert not missing, f"no example uses compressor(s) {sorted(missing)}"


def test_the_topk_rules_found_are_the_expected_ones() -> None:
    # guards the helper: if it found nothing, the coverage test below would pass vacuously
    assert {"ef", "ef21", "ef21-sgdm", "econtrol"} <= _topk_feedback_rules()


def test_every_topk_feedback_rule_has_an_example() -> None:
    used = {
        spec.compressor_config().feedback for spec in _load_all().values() if spec.compression.name == "topk"
    }
    missing = _topk_feedback_rules() - used
    assert not missing, f"no topk example uses feedback rule(s) {sorted(missing)}"


def test_heterogeneous_data_in_the_estimate_feedback_examples() -> None:
    for name, spec in _load_all().items():
        if spec.compressor_config().feedback in ("ef21", "ef21-sgdm", "econtrol"):
            assert spec.data.partition.kind == "dirichlet", f"{name}: show EF21/EControl on non-iid data"


def test_every_gradient_code_has_an_example() -> None:
    assert {"fractional", "cyclic", "sr-sgc", "m-sgc"} <= _gradient_codes()
    used = {spec.stragglers.code for spec in _load_all().values() if spec.stragglers is not None}
    missing = _gradient_codes() - used
    assert not missing, f"no example uses gradient code(s) {sorted(missing)}"


def test_readme_lists_every_spec() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    linked = set(re.findall(r"\]\(specs/([\w.-]+\.yaml)\)", readme))
    missing = {path.name for path in SPEC_FILES} - linked
    assert not missing, f"examples/README.md does not link {sorted(missing)}"
    stale = linked - {path.name for path in SPEC_FILES}
    assert not stale, f"examples/README.md links missing file(s) {sorted(stale)}"
