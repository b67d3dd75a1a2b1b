"""Which optional extra a command needs, and the message that says so when it is missing.

``pip install gradwire`` installs only the compressor library; each part of the command line
needs an extra (pyproject.toml's ``[project.optional-dependencies]``). A command checks for its
extra before it starts and, when a package is missing, says which extra brings it instead of
ending in a traceback::

    `gradwire serve` needs `pip install 'gradwire[server]'` (module 'uvicorn' is not installed)

This module uses only the standard library: it must work when even typer is missing.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["EXTRA_MODULES", "MissingExtra", "command_needs", "needs", "require"]

#: the top-level modules each extra brings that gradwire imports (the distributions' import names)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "cli": ("typer", "rich", "yaml", "httpx"),
    "train": ("torch", "numpy", "yaml", "ray", "grpc", "google.protobuf"),
    "server": (
        "fastapi",
        "uvicorn",
        "pydantic_settings",
        "sqlalchemy",
        "alembic",
        "prometheus_client",
        "yaml",
        "ray",
        "grpc",
        "google.protobuf",
    ),
}


class MissingExtra(RuntimeError):
    """A command cannot run because a package of its extra is not installed."""

    def __init__(self, command: str, extra: str, module: str) -> None:
        self.command, self.extra, self.module = command, extra, module
        super().__init__(
            f"`{command}` needs `pip install 'gradwire[{extra}]'` (module {module!r} is not installed)"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a half-imported module
        return False


def require(command: str, extra: str, modules: Iterable[str] | None = None) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` (or just ``modules``) can be
    found; nothing is imported but the parents of dotted names."""
    for module in EXTRA_MODULES[extra] if modules is None else modules:
        if not _installed(module):
            raise MissingExtra(command, extra, module)


@contextmanager
def needs(command: str, extra: str) -> Iterator[None]:
    """Turn a third-party module missing during the block's imports into :class:`MissingExtra`
    (a gradwire module that is missing is a broken install: that error passes unchanged)."""
    try:
        yield
    except ModuleNotFoundError as err:
        name = err.name or ""
        if not name or name.split(".")[0] == "gradwire":
            raise
        raise MissingExtra(command, extra, name) from err


@contextmanager
def command_needs(command: str, extra: str, modules: Iterable[str] | None = None) -> Iterator[None]:
    """For a command's imports: :func:`require` the extra, run the block under :func:`needs`, and
    end the command with the message on stderr and exit code 1 when something is missing."""
    try:
        require(command, extra, modules)
        with needs(command, extra):
            yield
    except MissingExtra as err:
        print(f"gradwire: {err}", file=sys.stderr)
        raise SystemExit(1) from None
