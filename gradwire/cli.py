"""The `gradwire` command line."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="gradwire: data-parallel training on slow networks.", no_args_is_help=True)


@app.callback()
def _root() -> None:
    """gradwire: data-parallel training on slow networks."""


@app.command()
def compressors(
    name: str = typer.Argument(None, help="show this compressor's parameters"),
    as_json: bool = typer.Option(False, "--json", help="print JSON schemas"),
) -> None:
    """List the registered compressors, or one compressor's parameters."""
    from gradwire.compressors import UnknownCompressorError, config_schemas

    schemas = config_schemas()
    if name is not None and name not in schemas:
        typer.echo(str(UnknownCompressorError(name, sorted(schemas))), err=True)
        raise typer.Exit(2)
    chosen = {name: schemas[name]} if name else schemas
    if as_json:
        typer.echo(json.dumps(chosen, indent=2))
        return
    for cname, schema in chosen.items():
        table = Table(title=f"{cname} — {schema.get('description', '').strip()}", title_justify="left")
        for column in ("parameter", "default", "meaning"):
            table.add_column(column)
        for field, spec in schema["properties"].items():
            table.add_row(field, json.dumps(spec.get("default")), spec.get("description", ""))
        Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
