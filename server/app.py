"""The coordinator's FastAPI application: :func:`create_app` wires settings, store, metrics and control.

``create_app(settings)`` alone makes a self-contained app: a job store on
``settings.database_url`` (closed when the app shuts down), its own Prometheus registry, and a
:class:`~gradwire.server.control.NullControl` (no scheduler). ``gradwire serve`` passes the store,
metrics and Ray scheduler it shares with the gRPC sink; tests pass their own.

Besides the routers, the app has:

- problem+json for every error (:mod:`gradwire.server.problems`);
- a request-body limit (``settings.max_body_bytes``), checked on ``Content-Length`` and on the
  bytes actually received, answered 413;
- OpenAPI at ``/openapi.json`` with Swagger UI at ``/docs`` and ReDoc at ``/redoc``, their
  scripts and styles served from the ``fastapi-offline`` package, so the pages work without
  internet access;
- request metrics (:mod:`gradwire.server.request_metrics`): every answer counted by route
  template, method and status, and timed;
- when the app makes its own metrics, a job-store listener counting each state change in
  ``gradwire_job_transitions_total``; ``gradwire_jobs`` is recounted at each scrape of ``/metrics``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import gradwire
from gradwire.compressors.registry import config_schemas
from gradwire.server.api import open_router, v1_router
from gradwire.server.control import JobControl, NullControl, Services
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.problems import FieldError, Problem, install_problem_handlers, problem_response
from gradwire.server.records import JobRecord
from gradwire.server.request_metrics import RequestMetrics
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore, Listener
from gradwire.spec import JobSpec

__all__ = ["BodySizeLimit", "create_app"]

DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
DESCRIPTION = (
    "Submit data-parallel training jobs with gradient compression, follow them, and read what "
    "compression saved. Errors are RFC 9457 problem details (application/problem+json)."
)


class BodyTooLarge(Exception):
    """Raised while reading a body that grew past the limit; answered 413."""


class BodySizeLimit:
    """ASGI middleware refusing request bodies over ``max_bytes`` with a 413 problem."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                response = problem_response(Request(scope), 400, "Content-Length is not a number")
                await response(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await _too_large(Request(scope), self.max_bytes)(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a chunked body that grew past the limit
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


def _too_large(request: Request, limit: int) -> JSONResponse:
    detail = f"the request body exceeds this coordinator's limit of {limit} bytes"
    return problem_response(request, 413, detail, kind="body-too-large", title="Body too large")


def _add_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc from local files only."""
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # the default would call an online validator
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API reference",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus what the routes reference by hand: JobSpec (the body) and Problem."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (JobSpec, Problem, FieldError):
            found = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in found.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components[model.__name__] = found
        app.openapi_schema = schema
    return app.openapi_schema


def _count_transitions(metrics: CoordinatorMetrics) -> Listener:
    def listener(job: JobRecord, from_state: JobState | None, to_state: JobState, reason: str) -> None:
        metrics.observe_transition(from_state, to_state)
        if to_state.terminal:
            metrics.job_ended(job.id)  # its series go after the retention period

    return listener


def create_app(
    settings: Settings,
    *,
    store: JobStore | None = None,
    metrics: CoordinatorMetrics | None = None,
    control: JobControl | None = None,
) -> FastAPI:
    """The coordinator's REST app for ``settings``; see the module docstring for the defaults.

    Metrics passed in are fed by their owner (``Coordinator`` has its own store listener); metrics
    the app creates are fed by a listener the app adds, so a transition is never counted twice.
    """
    owns_store, owns_metrics = store is None, metrics is None
    store = store if store is not None else JobStore(settings.database_url)
    metrics = metrics if metrics is not None else CoordinatorMetrics(retention_s=settings.metrics_retention_s)
    control = control if control is not None else NullControl(store)
    listener = _count_transitions(metrics) if owns_metrics else None
    if listener is not None:
        store.add_listener(listener)
    metrics.set_job_counts(store.counts_by_state())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # an app may be started again after a shutdown: its listener comes back with it
        if listener is not None:
            store.add_listener(listener)
        try:
            yield
        finally:
            if listener is not None:
                store.remove_listener(listener)
            if owns_store:
                store.close()

    app = FastAPI(
        title="gradwire coordinator",
        version=gradwire.__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = Services(
        settings=settings, store=store, metrics=metrics, control=control,
        compressor_schemas=dict(config_schemas()),
    )  # fmt: skip
    install_problem_handlers(app)

    async def body_too_large(request: Request, exc: Exception) -> JSONResponse:
        return _too_large(request, settings.max_body_bytes)

    app.add_exception_handler(BodyTooLarge, body_too_large)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees every answer
    app.include_router(v1_router())
    app.include_router(open_router())
    _add_docs(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
