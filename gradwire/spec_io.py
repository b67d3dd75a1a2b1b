"""Reading job specs: the error type, YAML/JSON text and ``key=value`` overrides (torch-free)."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ValidationError


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: the dotted field path ('' for the whole spec) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """An invalid job spec. ``problems`` lists each one; ``validation_error`` is pydantic's original."""

    def __init__(self, problems: list[Problem], validation_error: ValidationError | None = None):
        self.problems = problems
        self.validation_error = validation_error
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid job spec ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")

    def errors(self) -> list[dict[str, Any]]:
        """Pydantic's error dicts (empty for YAML/JSON syntax errors)."""
        return self.validation_error.errors() if self.validation_error is not None else []

    @classmethod
    def from_validation_error(
        cls, err: ValidationError, root: type[BaseModel], free_form: tuple[type, ...] = ()
    ) -> SpecError:
        """Pydantic's errors of validating ``root`` as problems with the paths users type;
        ``free_form``: sections whose fields a registry checks (see :func:`describe`)."""
        return cls([describe(e, root, free_form) for e in err.errors()], err)


def read_source(source: str | Path, suffixes: tuple[str, ...]) -> str:
    """The text of a spec: ``source`` itself, or the file it names (a ``Path``, or a one-line
    string ending in one of ``suffixes``)."""
    if isinstance(source, Path):
        return source.read_text(encoding="utf-8")
    if "\n" not in source and source.strip().lower().endswith(suffixes):
        return Path(source.strip()).read_text(encoding="utf-8")  # FileNotFoundError if missing
    return source


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping
)
# YAML 1.1 (PyYAML) reads 1e-3 as a string; YAML 1.2 and every user read it as a number
UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` object hook that refuses duplicate keys (the REST API uses it too)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def apply_override(data: dict[str, Any], text: str) -> str:
    """Set one dotted ``key=value`` in ``data``; returns the key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise SpecError([Problem("", f"override {text!r} is not of the form dotted.key=value")])
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise SpecError([Problem(key, f"value of override {text!r} is not valid YAML: {err}")]) from err
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SpecError(
                [Problem(key, f"cannot set {key!r}: {where} is a value ({child!r}), not a section")]
            )
        node = child
    node[parts[-1]] = value
    if key in ("steps", "epochs") and value is not None:
        data.pop("epochs" if key == "steps" else "steps", None)
    return key


#: discriminated unions put the tag value in an error's location; paths users type do not have it
_UNION_TAGS = {
    "partition": {"iid", "dirichlet"},
    "stragglers": {"none", "fractional", "cyclic", "sr-sgc", "m-sgc"},
    "inject": {"none", "bernoulli", "bursty"},
}


def describe(error: Mapping[str, Any], root: type[BaseModel], free_form: tuple[type, ...] = ()) -> Problem:
    """One pydantic error as a Problem whose path is what a user types (no union tags)."""
    loc: list[str | int] = []
    for part in error["loc"]:
        if loc and isinstance(loc[-1], str) and part in _UNION_TAGS.get(loc[-1], ()):
            continue
        loc.append(part)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field" + _suggest(tuple(loc), root, free_form)
    return Problem(".".join(str(p) for p in loc), message)


def _suggest(loc: tuple[str | int, ...], root: type[BaseModel], free_form: tuple[type, ...]) -> str:
    """Where to look for the right name of an unknown field."""
    models: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        models = [
            m
            for model in models
            if part in model.model_fields
            for m in _section_types(model.model_fields[part].annotation)
        ]
    if any(m in free_form for m in models):
        return "; `gradwire compressors NAME` lists a compressor's parameters"
    fields = sorted({f for model in models for f in model.model_fields})
    if not fields:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; expected one of: {', '.join(fields)}"


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        args = args[:1]
    elif not isinstance(annotation, types.UnionType) and typing.get_origin(annotation) is not typing.Union:
        return []
    return [m for arg in args for m in _section_types(arg)]


def blame(problem: Problem, applied: list[tuple[str, str]]) -> Problem:
    """Name the override behind a problem, if one set that field or a field inside it."""
    for key, text in reversed(applied):
        if problem.path == key or problem.path.startswith(key + ".") or key.startswith(problem.path + "."):
            return Problem(problem.path, f"{problem.message} (from override {text!r})")
    return problem
