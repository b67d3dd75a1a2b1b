"""A name → factory registry shared by the model and dataset registries.

Built-ins are given as callables or lazy ``"module:attr"`` paths; installed packages add
factories through an entry-point group (loaded once, on first use). A name of the form
``module:function`` is an import-path plugin: it is imported only when the caller passes
``allow_import_paths=True`` (the operator's switch; off by default, because importing a path
named in a job spec runs arbitrary code).

A factory's keyword parameters are validated against its signature with pydantic before it
is called, so a misspelt or ill-typed parameter is reported by name instead of surfacing as
a ``TypeError`` from deep inside the factory.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

Factory = Callable[..., Any]
Lazy = Factory | str | EntryPoint  # a callable, a "module:attr" path, or an installed entry point


class UnknownNameError(KeyError):
    """A name that is neither built in, registered, nor installed through an entry point."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind = kind
        self.name = name
        self.available = available
        super().__init__(f"unknown {kind} {name!r}; available: {', '.join(available)}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class ImportPathRefusedError(PermissionError):
    """A ``module:function`` name given while import-path plugins are not allowed."""


class InvalidParamsError(ValueError):
    """Parameters a factory does not accept; ``problems`` maps each parameter to its message."""

    def __init__(self, kind: str, name: str, problems: dict[str, str]):
        self.kind = kind
        self.name = name
        self.problems = problems
        lines = "; ".join(f"{param}: {message}" for param, message in problems.items())
        super().__init__(f"{kind} {name!r}: invalid params: {lines}")


def _import_attr(path: str) -> Factory:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"import path {path!r} must look like 'package.module:function'")
    target: Any = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"import path {path!r} names a {type(target).__name__}, not a callable")
    return target


@dataclass
class Registry:
    """Factories of one kind (``"model"``, ``"dataset"``) by name."""

    kind: str
    group: str
    builtins: Mapping[str, Lazy]
    _factories: dict[str, Lazy] | None = field(default=None, init=False, repr=False)

    def _load(self) -> dict[str, Lazy]:
        if self._factories is None:
            found: dict[str, Lazy] = dict(self.builtins)
            for ep in entry_points(group=self.group):
                if ep.name in found:
                    raise ValueError(
                        f"entry point {ep.value!r} registers {self.kind} {ep.name!r}, which is already taken"
                    )
                found[ep.name] = ep  # imported on first use
            self._factories = found
        return self._factories

    def register(self, name: str, factory: Factory | str) -> None:
        """Add a factory in this process (entry points do it for installed packages)."""
        if ":" in name:
            raise ValueError(f"{self.kind} names cannot contain ':' (reserved for import paths): {name!r}")
        factories = self._load()
        if name in factories:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        factories[name] = factory

    def available(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._load())

    def resolve(self, name: str, *, allow_import_paths: bool = False) -> Factory:
        """The factory called ``name``, importing it if it is lazy or an allowed import path."""
        if ":" in name:
            if not allow_import_paths:
                raise ImportPathRefusedError(
                    f"{self.kind} {name!r} is an import path (module:function); import-path plugins are "
                    f"disabled here. Use a registered {self.kind} ({', '.join(self.available())}), install "
                    f"one through the entry-point group {self.group!r}, or ask the operator to allow "
                    "import paths"
                )
            return _import_attr(name)
        factories = self._load()
        if name not in factories:
            raise UnknownNameError(self.kind, name, sorted(factories))
        factory = factories[name]
        if isinstance(factory, str):
            factory = factories[name] = _import_attr(factory)
        elif isinstance(factory, EntryPoint):
            factory = factories[name] = factory.load()
        return factory

    def build(self, name: str, *fixed_args: Any, allow_import_paths: bool = False, **params: Any) -> Any:
        """Resolve ``name``, validate ``params`` against its signature, and call it."""
        factory = self.resolve(name, allow_import_paths=allow_import_paths)
        checked = validate_params(factory, params, skip=len(fixed_args), kind=self.kind, name=name)
        return factory(*fixed_args, **checked)


def validate_params(
    factory: Factory, params: Mapping[str, Any], *, skip: int, kind: str, name: str
) -> dict[str, Any]:
    """``params`` checked and coerced by the annotations of ``factory``'s keyword parameters.

    The first ``skip`` parameters are the caller's positional arguments and are not validated
    here. A factory with ``**kwargs`` accepts unknown names unchecked.
    """
    signature = inspect.signature(factory)  # of __init__ without self, for a class
    try:
        annotated = factory.__init__ if isinstance(factory, type) else factory
        hints = typing.get_type_hints(annotated, include_extras=True)
    except (NameError, TypeError):  # unresolvable annotations: validate names only
        hints = {}
    fields: dict[str, Any] = {}
    open_ended = False
    for position, param in enumerate(signature.parameters.values()):
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
            continue
        positional = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY)
        if position < skip or param.kind in positional:
            continue
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    model = create_model(
        f"{name}_params",
        __config__=ConfigDict(extra="allow" if open_ended else "forbid", arbitrary_types_allowed=True),
        **fields,
    )
    try:
        checked = model.model_validate(dict(params))
    except ValidationError as err:
        problems: dict[str, str] = {}
        for e in err.errors():
            param = str(e["loc"][0]) if e["loc"] else "(params)"
            items = "".join(f"[{part}]" for part in e["loc"][1:] if isinstance(part, int))
            if e["type"] == "extra_forbidden":
                message = "unknown parameter" + _accepted(fields)
            else:
                message = f"{items} {e['msg']}".strip()
            problems[param] = f"{problems[param]}, or {message}" if param in problems else message
        raise InvalidParamsError(kind, name, problems) from err
    values = {key: getattr(checked, key) for key in fields if key in checked.model_fields_set}
    values.update(checked.model_extra or {})
    return values


def _accepted(fields: Mapping[str, Any]) -> str:
    return f" (accepted: {', '.join(fields)})" if fields else " (this one takes no parameters)"
