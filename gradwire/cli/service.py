"""`gradwire serve`, `gradwire submit` and `gradwire jobs`: the coordinator and its command-line client.

The client commands read the server from ``--server`` or ``GRADWIRE_SERVER`` (default
http://127.0.0.1:8000) and the bearer token from ``--token`` or ``GRADWIRE_TOKEN``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gradwire.cli.console import summary

jobs_app = typer.Typer(
    help="List, show, cancel and read the logs of the coordinator's jobs.", no_args_is_help=True
)

Server = Annotated[str, typer.Option("--server", envvar="GRADWIRE_SERVER", help="coordinator URL")]
Token = Annotated[
    str | None, typer.Option("--token", envvar="GRADWIRE_TOKEN", help="bearer token", show_default=False)
]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _client(server: str, token: str | None):
    from gradwire.cli.remote import CoordinatorClient

    return CoordinatorClient(server, token)


def _fail(err: Exception, code: int = 1) -> typer.Exit:
    typer.echo(str(err), err=True)
    return typer.Exit(code)


def serve(
    host: Annotated[
        str | None, typer.Option(help="REST bind address (GRADWIRE_HOST; default 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="REST port (GRADWIRE_PORT; default 8000)")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="telemetry gRPC port (GRADWIRE_GRPC_PORT)")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (GRADWIRE_DATABASE_URL)")] = None,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs of the embedded Ray head")] = None,
) -> None:
    """Run the coordinator: REST API, gRPC telemetry sink, scheduler and (without RAY_ADDRESS) a
    local Ray head, all on 127.0.0.1 with a SQLite file under .gradwire/. Ctrl-C stops them."""
    import uvicorn

    from gradwire.server.app import create_app
    from gradwire.server.service import Coordinator
    from gradwire.server.settings import Settings

    given = {"host": host, "port": port, "grpc_port": grpc_port, "database_url": database_url}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise _fail(err, 2) from None
    Path(".gradwire").mkdir(exist_ok=True)
    console = Console(stderr=True)
    with Coordinator.from_settings(settings, num_cpus=num_cpus) as coordinator:
        app = create_app(
            settings, store=coordinator.store, metrics=coordinator.metrics, control=coordinator.control
        )
        console.print(
            f"gradwire coordinator: REST http://{settings.host}:{settings.port}  "
            f"telemetry {coordinator.telemetry_address}  Ray {coordinator.cluster.dashboard_url}"
        )
        server = uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
        )
        # returns on Ctrl-C / SIGTERM (uvicorn then re-raises Ctrl-C); the with-block stops the rest
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    console.print("gradwire coordinator stopped")


def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="job spec (.yaml, .yml or .json)")],
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="same as --set workers.count=N")
    ] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="override a field: key=value")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="follow the job to its end and print a summary")
    ] = False,
    priority: Annotated[int, typer.Option(help="higher runs first; FIFO within a priority")] = 0,
    idempotency_key: Annotated[
        str | None, typer.Option(help="resubmitting with the same key is a no-op")
    ] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
) -> None:
    """Submit a job spec to the coordinator (and with --wait, follow it to the end)."""
    from gradwire.cli.remote import ApiError
    from gradwire.spec import JobSpec, SpecError

    if workers is not None:
        overrides = [*(overrides or []), f"workers.count={workers}"]
    try:
        spec = JobSpec.from_file(spec_path).with_overrides(overrides or [])
    except (SpecError, OSError) as err:
        raise _fail(Exception(f"{spec_path}: {err}"), 2) from None
    with _client(server, token) as client:
        try:
            job = client.submit(
                spec.model_dump(mode="json"), priority=priority, idempotency_key=idempotency_key
            )
            typer.echo(f"{job['id']} {job['state']}")
            if not wait:
                return
            job = follow(client, job["id"])
        except ApiError as err:
            raise _fail(err, 2 if 400 <= err.status < 500 else 1) from None
    if job["state"] != "SUCCEEDED":
        raise _fail(Exception(f"{job['id']} {job['state']}: {job.get('reason', '')}"), 1)


def follow(client: Any, job_id: str) -> dict[str, Any]:
    """Poll the job, print each state change, and end with the savings table of its last report."""
    console = Console()
    seen = {"state": None}

    def show(job: dict[str, Any]) -> None:
        if job["state"] != seen["state"]:
            seen["state"] = job["state"]
            console.print(f"{job['id']} {job['state']}  {job.get('reason', '')}")

    job = client.wait(job_id, poll_s=1.0, on_poll=show)
    points = client.metrics(job_id).get("points") or []
    if points:
        last = points[-1]
        metrics = {
            "step": last.get("step", 0),
            "loss": last.get("loss") or float("nan"),
            "accuracy": next(
                (p["accuracy"] for p in reversed(points) if p.get("accuracy") is not None), float("nan")
            ),
            "bytes_sent": last.get("bytes_sent", 0),
            "bytes_uncompressed": last.get("bytes_uncompressed", 0),
            "compute_seconds": sum(p.get("compute_s") or 0.0 for p in points),
            "compress_seconds": sum(p.get("compress_s") or 0.0 for p in points),
            "communicate_seconds": sum(p.get("communicate_s") or 0.0 for p in points),
            "wait_seconds": sum(p.get("wait_s") or 0.0 for p in points),
            "stragglers": sum(p.get("stragglers") or 0 for p in points),
        }
        console.print(summary(job["name"], metrics))
    return job


@jobs_app.command("list")
def jobs_list(
    state: Annotated[list[str] | None, typer.Option("--state", help="filter by state; repeatable")] = None,
    name: Annotated[str | None, typer.Option(help="filter by job name")] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
) -> None:
    """List jobs in submission order."""
    from gradwire.cli.remote import ApiError

    try:
        with _client(server, token) as client:
            jobs = client.list(state=[s.upper() for s in state or []], name=name)
    except ApiError as err:
        raise _fail(err) from None
    table = Table("id", "name", "state", "priority", "created", "reason", title=f"{len(jobs)} job(s)")
    for job in jobs:
        table.add_row(
            job["id"], job["name"], job["state"], str(job["priority"]), job["created_at"], job["reason"]
        )
    Console().print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, server: Server = DEFAULT_SERVER, token: Token = None) -> None:
    """Show one job as JSON."""
    import json

    from gradwire.cli.remote import ApiError

    try:
        with _client(server, token) as client:
            typer.echo(json.dumps(client.get(job_id), indent=2))
    except ApiError as err:
        raise _fail(err) from None


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, server: Server = DEFAULT_SERVER, token: Token = None) -> None:
    """Cancel a job (queued jobs at once; running ones are stopped on Ray)."""
    from gradwire.cli.remote import ApiError

    try:
        with _client(server, token) as client:
            job = client.cancel(job_id)
    except ApiError as err:
        raise _fail(err) from None
    typer.echo(f"{job['id']} {job['state']}")


@jobs_app.command("logs")
def jobs_logs(job_id: str, server: Server = DEFAULT_SERVER, token: Token = None) -> None:
    """Print a job's driver logs."""
    from gradwire.cli.remote import ApiError

    try:
        with _client(server, token) as client:
            sys.stdout.write(client.logs(job_id))
    except ApiError as err:
        raise _fail(err) from None


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(submit)
    app.add_typer(jobs_app, name="jobs")
