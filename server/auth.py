"""Request dependencies: the bearer-token check on ``/v1`` routes and the app's services.

``Authorization: Bearer <token>`` is compared with every configured token in constant time
(:func:`hmac.compare_digest`), so response timing does not reveal how much of a guess was right.
A missing or wrong token is answered 401 with ``WWW-Authenticate: Bearer`` (RFC 6750), as
problem+json. The token names the caller, a :class:`~gradwire.server.principals.Principal`
(``GRADWIRE_TOKENS`` entries ``name:TOKEN``), which routes receive through :data:`PrincipalDep`.
With no tokens configured, auth is off and every caller is the anonymous admin;
:class:`~gradwire.server.settings.Settings` allows that only on loopback.

``/metrics`` is open unless ``GRADWIRE_METRICS_TOKEN`` is set; then :func:`require_metrics_token`
asks for that token as a bearer token (Prometheus' ``authorization`` in a scrape config). Tokens
are never logged or echoed.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gradwire.server.control import Services
from gradwire.server.principals import ANONYMOUS, Principal
from gradwire.server.problems import ProblemError

__all__ = ["PrincipalDep", "bearer_scheme", "get_services", "require_metrics_token", "require_token"]

REALM = "gradwire"

#: Declares the scheme in OpenAPI (the docs page's Authorize button); the check is ours.
bearer_scheme = HTTPBearer(auto_error=False, description="a token from GRADWIRE_TOKENS")


async def get_services(request: Request) -> Services:
    """The services of the app serving this request (async: no I/O, so no thread-pool hop)."""
    services: Services = request.app.state.services
    return services


def _matching_principal(given: str, services: Services) -> Principal | None:
    given_bytes = given.encode("utf-8", "surrogateescape")
    found = None
    for entry in services.settings.principals:  # no early exit: every token is compared
        if hmac.compare_digest(given_bytes, entry.token.get_secret_value().encode()):
            found = entry.principal
    return found


def _checked_bearer(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(
            401,
            "this endpoint needs an 'Authorization: Bearer <token>' header",
            kind="unauthenticated",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    return credentials.credentials


def _invalid_token() -> ProblemError:
    return ProblemError(
        401,
        "the bearer token is not valid for this coordinator",
        kind="unauthenticated",
        headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
    )


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The principal whose configured bearer token the request carries (the anonymous admin when
    no tokens are configured); 401 otherwise.

    ``async`` although it does no I/O: FastAPI runs sync dependencies in a thread pool, and this
    one runs on every /v1 request (once: FastAPI caches it for the route's own ``PrincipalDep``)."""
    services: Services = request.app.state.services
    if not services.settings.auth_enabled:
        return ANONYMOUS
    principal = _matching_principal(_checked_bearer(credentials), services)
    if principal is None:
        raise _invalid_token()
    return principal


#: The calling principal, for route parameters.
PrincipalDep = Annotated[Principal, Depends(require_token)]


async def require_metrics_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """With ``GRADWIRE_METRICS_TOKEN`` set, let ``/metrics`` answer only requests bearing it."""
    services: Services = request.app.state.services
    expected = services.settings.metrics_token
    if expected is None:
        return
    given = _checked_bearer(credentials).encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise _invalid_token()
