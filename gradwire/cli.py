"""The `gradwire` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

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


@app.command()
def train(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="job spec (.yaml, .yml or .json)")],
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="same as --set workers.count=N")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a field: key=value (dotted keys, YAML values); repeatable"),
    ] = None,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    ] = None,
) -> None:
    """Train a job spec on Ray and print a summary."""
    from gradwire.spec import JobSpec, SpecError

    if workers is not None:
        overrides = [*(overrides or []), f"workers.count={workers}"]
    try:
        spec = JobSpec.from_file(spec_path).with_overrides(overrides or [])
    except (SpecError, OSError) as err:
        typer.echo(f"{spec_path}: {err}", err=True)
        raise typer.Exit(2) from None

    from gradwire.worker.launch import NotEnoughResourcesError, run_job  # imports torch and ray

    try:
        metrics = run_job(spec, address=address)
    except NotEnoughResourcesError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from None
    Console().print(_summary(spec.name, metrics))


def _summary(name: str, metrics: dict) -> Table:
    sent, plain = metrics.get("bytes_sent", 0), metrics.get("bytes_uncompressed", 0)
    rows = [
        ("steps", f"{metrics.get('step', 0)}"),
        ("resumed from step", f"{metrics.get('start_step', 0)}"),
        ("final loss", f"{metrics.get('loss', float('nan')):.4f}"),
        ("test accuracy", f"{metrics.get('accuracy', float('nan')):.4f}"),
        ("wall time (train loop)", f"{metrics.get('wall_seconds', 0.0):.2f} s"),
        ("bytes sent (rank 0)", f"{sent:,}"),
        ("bytes uncompressed", f"{plain:,}"),
        ("compression ratio", f"{plain / sent:.2f}x" if sent else "n/a"),
        ("compress time", f"{metrics.get('compress_seconds', 0.0):.3f} s"),
        ("communicate time", f"{metrics.get('communicate_seconds', 0.0):.3f} s"),
        ("checkpoint", str(metrics.get("checkpoint", "-"))),
    ]
    table = Table(title=f"{name} — done", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def main() -> None:
    app()


if __name__ == "__main__":
    main()
