"""The ``gradwire`` command line: the top floor of the package.

It is the only package that may import the worker runtime (``gradwire.worker``), the coordinator
(``gradwire.server``) and the compressors together; nothing else imports it.

* :mod:`~gradwire.cli.commands` — the typer app: ``compressors``, ``train``, ``--version``;
* :mod:`~gradwire.cli.service` — ``serve``, ``submit`` and ``jobs``;
* :mod:`~gradwire.cli.remote` — the client of the coordinator's REST API;
* :mod:`~gradwire.cli.db` — ``db upgrade`` and ``db current`` (the job store's migrations);
* :mod:`~gradwire.cli.plan` — ``plan``, with :mod:`~gradwire.cli.costmodel` and ``calibration.json``;
* :mod:`~gradwire.cli.console` — the progress bar and the run summary;
* :mod:`~gradwire.cli.extras` — which extra a command needs.

This module imports only the standard library and the contract, so that ``gradwire --version``
works and a missing ``cli`` extra is named even when typer itself is not installed.
"""

from __future__ import annotations

import sys
from typing import Any

from gradwire import __version__
from gradwire.cli.extras import MissingExtra, needs

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """The ``gradwire`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["--version"], ["-V"]):
        print(f"gradwire {__version__}")
        return
    try:
        with needs("gradwire", "cli"):
            from gradwire.cli import app  # the typer app (through __getattr__ unless replaced)
    except MissingExtra as err:
        print(f"gradwire: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    app(args=args, prog_name="gradwire")


def __getattr__(name: str) -> Any:
    # `from gradwire.cli import app` without importing typer when this package is imported
    if name == "app":
        from gradwire.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
