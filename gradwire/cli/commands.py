"""The `gradwire` typer app: `compressors`, `train` and `--version`; `serve`, `submit` and `jobs`
come from :mod:`gradwire.cli.service`, `plan` from :mod:`gradwire.cli.plan`."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gradwire import __version__
from gradwire.cli.console import TelemetryProgress, summary
from gradwire.cli.db import register as register_db_commands
from gradwire.cli.extras import command_needs
from gradwire.cli.plan import register as register_plan_command
from gradwire.cli.service import register as register_service_commands

app = typer.Typer(help="gradwire: data-parallel training on slow networks.", no_args_is_help=True)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"gradwire {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", is_eager=True, callback=_show_version, help="print the version and exit"
        ),
    ] = False,
) -> None:
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
        about = " ".join(schema.get("description", "").split())  # the docstring's lines, joined
        table = Table(title=f"{cname} — {about}", title_justify="left")
        for column in ("parameter", "default", "meaning"):
            table.add_column(column)
        for field, spec in schema["properties"].items():
            table.add_row(field, json.dumps(spec.get("default")), spec.get("description", ""))
        Console().print(table)


@app.command()
def train(
    spec_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="SPEC", help="job spec (.yaml, .yml or .json); or give --spec-env", show_default=False
        ),
    ] = None,
    spec_env: Annotated[
        str | None,
        typer.Option(
            "--spec-env",
            metavar="VAR",
            help="read the spec (JSON) from environment variable VAR instead of a file: how the "
            "coordinator's Ray jobs get theirs, with the job",
        ),
    ] = None,
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
    telemetry: Annotated[
        str | None,
        typer.Option(
            "--telemetry",
            envvar="GRADWIRE_TELEMETRY_ADDRESS",
            help="coordinator's gRPC address for step reports (default: JSONL files in the run folder)",
        ),
    ] = None,
    job_id: Annotated[
        str | None,
        typer.Option(
            "--job-id",
            help="id in step reports and name of the run, i.e. its checkpoint folder under "
            "checkpoint.storage (default: the spec's name); the coordinator passes its job id",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue the run already in <checkpoint.storage>/<run name>, even if its spec "
            "differs (without it, an existing run is refused)",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
) -> None:
    """Train a job spec on Ray and print a summary."""
    from gradwire.spec import JobSpec, SpecError

    if (spec_path is None) == (spec_env is None):
        typer.echo("give one spec: a file (SPEC) or --spec-env VAR", err=True)
        raise typer.Exit(2)
    if workers is not None:
        overrides = [*(overrides or []), f"workers.count={workers}"]
    source = str(spec_path) if spec_path is not None else f"${spec_env}"
    try:
        if spec_env is not None:
            text = os.environ.get(spec_env)
            if not text:
                typer.echo(f"{source}: the environment variable {spec_env} is not set", err=True)
                raise typer.Exit(2)
            loaded = JobSpec.from_json(text)  # JSON text (never a file name: it ends with "}")
        else:
            loaded = JobSpec.from_file(spec_path)
        spec = loaded.with_overrides(overrides or [])
    except (SpecError, OSError) as err:
        typer.echo(f"{source}: {err}", err=True)
        raise typer.Exit(2) from None

    with command_needs("gradwire train", "train"):
        from gradwire.worker.launch import NotEnoughResourcesError, run_dir, run_job  # imports torch and ray
    from gradwire.worker.runs import RunConflict

    console = Console()
    follow = TelemetryProgress(run_dir(spec, job_id) / "telemetry-rank0.jsonl", spec.steps, console)
    try:
        with follow if progress and not telemetry else nullcontext():
            metrics = run_job(spec, address=address, job_id=job_id, telemetry=telemetry, resume=resume)
    except (NotEnoughResourcesError, SpecError, RunConflict) as err:
        typer.echo(f"{source}: {err}", err=True)
        raise typer.Exit(2) from None
    if metrics.get("changed"):
        typer.echo(f"{spec.name}: resumed with a changed spec: {'; '.join(metrics['changed'])}", err=True)
    console.print(summary(spec.name, metrics))
    if metrics.get("compressor_choices"):  # compression: auto — (step, choice, why) of each choice
        chosen = "; ".join(f"step {s}: {choice} ({why})" for s, choice, why in metrics["compressor_choices"])
        console.print(f"compression auto chose: {chosen}")
    if metrics.get("stopped"):
        typer.echo(f"{spec.name}: stopped: {metrics['stopped']}", err=True)
        raise typer.Exit(1)


register_service_commands(app)
register_plan_command(app)
register_db_commands(app)
