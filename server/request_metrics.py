"""ASGI middleware counting every REST request in ``gradwire_http_requests_total`` and timing it in
``gradwire_http_request_duration_seconds``.

It sits outermost in the app, so a request refused by an inner middleware (413 for a body over the
limit) and one that fails with an unhandled error (500) are counted like any other. The ``route``
label is the matched route's path template (``/v1/jobs/{job_id}``), which the router leaves in the
ASGI scope; requests that match no route, and those refused before routing (413), are labelled
``unmatched``, so a scan of random paths cannot grow the number of series. The ``method`` label
is one of :data:`METHODS` or ``other``: HTTP lets a client invent methods (``FOO /``), and each
would otherwise become a new series, without a token.
"""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gradwire.server.metrics import CoordinatorMetrics

__all__ = ["METHODS", "OTHER_METHOD", "UNMATCHED", "RequestMetrics", "method_label"]

UNMATCHED = "unmatched"
#: the methods counted under their own name (RFC 9110 and PATCH); any other is OTHER_METHOD
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
OTHER_METHOD = "other"


def method_label(method: str) -> str:
    """``method`` when it is a known HTTP method, else ``other``."""
    return method if method in METHODS else OTHER_METHOD


def route_template(scope: Scope) -> str:
    """The full path template of the route that answered, e.g. ``/v1/jobs/{job_id}``.

    The router leaves the matched route in the scope, but a route of an included router knows only
    its own part of the path (``/jobs/{job_id}`` under the ``/v1`` prefix). The prefix is what comes
    before the part the route's pattern matches at the end of the request path; prefixes are the
    routers' own constants, so no part of a raw path can reach the label.
    """
    route = scope.get("route")
    regex, template = getattr(route, "path_regex", None), getattr(route, "path_format", None)
    if regex is None or not isinstance(template, str):
        return UNMATCHED
    path = scope.get("root_path", "") + scope["path"]
    found = re.search(regex.pattern.removeprefix("^"), path)
    return (path[: found.start()] + template) if found else template


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: CoordinatorMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client sees if the app raises before answering

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            self.metrics.observe_request(
                route_template(scope), method_label(scope["method"]), status, time.perf_counter() - started
            )
