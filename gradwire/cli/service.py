"""`gradwire serve`, `gradwire submit` and `gradwire jobs`: the coordinator and its command-line client.

The client commands read the server from ``--server`` or ``GRADWIRE_SERVER`` (default
http://127.0.0.1:8000) and the bearer token from ``--token`` or ``GRADWIRE_TOKEN``. ``--json``
(``submit``, ``jobs list``, ``jobs show``) prints the coordinator's JSON and nothing else on
stdout, for scripts. ``serve`` needs the ``server`` extra; the client commands need ``httpx``
from the ``cli`` extra.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gradwire.cli.console import summary
from gradwire.cli.extras import command_needs

jobs_app = typer.Typer(
    help="List, show, cancel and read the logs of the coordinator's jobs.", no_args_is_help=True
)

Server = Annotated[str, typer.Option("--server", envvar="GRADWIRE_SERVER", help="coordinator URL")]
Token = Annotated[
    str | None, typer.Option("--token", envvar="GRADWIRE_TOKEN", help="bearer token", show_default=False)
]
DEFAULT_SERVER = "http://127.0.0.1:8000"


def _remote(command: str) -> ModuleType:
    """:mod:`gradwire.cli.remote` (it needs httpx), or the missing-extra message and exit 1."""
    with command_needs(f"gradwire {command}", "cli", ("httpx",)):
        from gradwire.cli import remote
    return remote


def _print_json(document: Any) -> None:
    typer.echo(json.dumps(document, indent=2))


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
    with command_needs("gradwire serve", "server"):
        import uvicorn

        from gradwire.server.app import create_app
        from gradwire.server.instance_lock import AlreadyRunning
        from gradwire.server.ray_cluster import RayUnavailable
        from gradwire.server.service import Coordinator
        from gradwire.server.settings import Settings

    given = {"host": host, "port": port, "grpc_port": grpc_port, "database_url": database_url}
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise _fail(err, 2) from None
    Path(".gradwire").mkdir(exist_ok=True)
    console = Console(stderr=True)
    coordinator = Coordinator.from_settings(settings, num_cpus=num_cpus)
    try:  # a second coordinator in this folder, or a Ray head that cannot start: say so, exit 1
        coordinator.start()
    except (AlreadyRunning, RayUnavailable) as err:
        raise _fail(Exception(f"gradwire serve: {err}")) from None
    with coordinator:
        app = create_app(
            settings, store=coordinator.store, metrics=coordinator.metrics, control=coordinator.control
        )
        scheme = "https" if settings.tls_cert else "http"
        console.print(
            f"gradwire coordinator: REST {scheme}://{settings.host}:{settings.port}  "
            f"telemetry {coordinator.telemetry_address}  Ray {coordinator.cluster.dashboard_url}"
        )
        server = uvicorn.Server(rest_server_config(app, settings))
        # returns on Ctrl-C / SIGTERM (uvicorn then re-raises Ctrl-C); the with-block stops the rest
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    console.print("gradwire coordinator stopped")


def rest_server_config(app: Any, settings: Any) -> Any:
    """uvicorn's config for the REST API: the settings' address, and HTTPS only when
    ``GRADWIRE_TLS_CERT`` / ``GRADWIRE_TLS_KEY`` are set."""
    import uvicorn

    tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key} if settings.tls_cert else {}
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", **tls)


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
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print the job as JSON (with --wait: only the finished job)"),
    ] = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
) -> None:
    """Submit a job spec to the coordinator (and with --wait, follow it to the end)."""
    from gradwire.spec import JobSpec, SpecError

    remote = _remote("submit")
    if workers is not None:
        overrides = [*(overrides or []), f"workers.count={workers}"]
    try:
        spec = JobSpec.from_file(spec_path).with_overrides(overrides or [])
    except (SpecError, OSError) as err:
        raise _fail(Exception(f"{spec_path}: {err}"), 2) from None
    with remote.CoordinatorClient(server, token) as client:
        try:
            job = client.submit(
                spec.model_dump(mode="json"), priority=priority, idempotency_key=idempotency_key
            )
            if wait:
                if as_json:
                    job = client.wait(job["id"], poll_s=1.0)
                else:
                    typer.echo(f"{job['id']} {job['state']}")
                    job = follow(client, job["id"])
        except remote.ApiError as err:
            raise _fail(err, 2 if 400 <= err.status < 500 else 1) from None
    if as_json:
        _print_json(job)
    elif not wait:
        typer.echo(f"{job['id']} {job['state']}")
    if wait and job["state"] != "SUCCEEDED":
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


AsJson = Annotated[bool, typer.Option("--json", help="print the coordinator's JSON")]


@jobs_app.command("list")
def jobs_list(
    state: Annotated[list[str] | None, typer.Option("--state", help="filter by state; repeatable")] = None,
    name: Annotated[str | None, typer.Option(help="filter by job name")] = None,
    as_json: AsJson = False,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
) -> None:
    """List jobs in submission order."""
    remote = _remote("jobs list")
    try:
        with remote.CoordinatorClient(server, token) as client:
            jobs = client.list(state=[s.upper() for s in state or []], name=name)
    except remote.ApiError as err:
        raise _fail(err) from None
    if as_json:
        _print_json(jobs)
        return
    table = Table("id", "name", "state", "priority", "created", "reason", title=f"{len(jobs)} job(s)")
    for job in jobs:
        table.add_row(
            job["id"], job["name"], job["state"], str(job["priority"]), job["created_at"], job["reason"]
        )
    Console().print(table)


#: the fields `jobs show` prints above the spec, with their labels
_SHOWN = (
    ("id", "id"), ("name", "name"), ("state", "state"), ("reason", "reason"), ("priority", "priority"),
    ("created", "created_at"), ("started", "started_at"), ("finished", "finished_at"),
    ("restarts", "restarts"), ("ray job", "ray_job_id"),
)  # fmt: skip


@jobs_app.command("show")
def jobs_show(
    job_id: str, as_json: AsJson = False, server: Server = DEFAULT_SERVER, token: Token = None
) -> None:
    """Show one job: where it is, why, and its spec (YAML); --json for the whole resource."""
    remote = _remote("jobs show")
    try:
        with remote.CoordinatorClient(server, token) as client:
            job = client.get(job_id)
    except remote.ApiError as err:
        raise _fail(err) from None
    if as_json:
        _print_json(job)
        return
    import yaml

    width = max(len(label) for label, _ in _SHOWN)
    for label, key in _SHOWN:
        value = job.get(key)
        typer.echo(f"{label:<{width}}  {'-' if value is None else value}")
    spec = yaml.safe_dump(job.get("spec") or {}, sort_keys=False).rstrip("\n")
    typer.echo("spec:\n" + "\n".join(f"  {line}" for line in spec.splitlines()))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, server: Server = DEFAULT_SERVER, token: Token = None) -> None:
    """Cancel a job (queued jobs at once; running ones are stopped on Ray)."""
    remote = _remote("jobs cancel")
    try:
        with remote.CoordinatorClient(server, token) as client:
            job = client.cancel(job_id)
    except remote.ApiError as err:
        raise _fail(err) from None
    typer.echo(f"{job['id']} {job['state']}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow_logs: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new lines until the job ends")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.05, help="seconds between polls with --follow")] = 1.0,
    server: Server = DEFAULT_SERVER,
    token: Token = None,
) -> None:
    """Print a job's driver logs (with --follow, as they grow, until the job ends)."""
    remote = _remote("jobs logs")
    try:
        with remote.CoordinatorClient(server, token) as client:
            if not follow_logs:
                sys.stdout.write(client.logs(job_id))
                return
            with contextlib.suppress(KeyboardInterrupt):
                follow_log(client, job_id, interval)
    except remote.ApiError as err:
        raise _fail(err) from None


def follow_log(client: Any, job_id: str, interval: float = 1.0) -> None:
    """Print what a job's log gains, poll by poll, until the job is finished and its log read to
    the end. A job that has no log yet (queued, starting) is waited for."""
    from gradwire.cli.remote import TERMINAL, ApiError

    printed = ""
    while True:
        job = client.get(job_id)  # the state first: a log read after it is complete when terminal
        try:
            text = client.logs(job_id)
        except ApiError as err:
            if err.status != 404 or not str(err.problem.get("type", "")).endswith(":no-logs"):
                raise
            text = ""
        if text.startswith(printed):
            sys.stdout.write(text[len(printed) :])
        else:  # Ray's log was cut or replaced: print it again from its start
            sys.stdout.write(text)
        sys.stdout.flush()
        printed = text
        if job["state"] in TERMINAL:
            return
        time.sleep(interval)


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(submit)
    app.add_typer(jobs_app, name="jobs")
