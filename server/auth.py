"""Request dependencies: the bearer-token check on ``/v1`` routes and the app's services.

``Authorization: Bearer <token>`` is compared with every configured token in constant time
(:func:`hmac.compare_digest`), so response timing does not reveal how much of a guess was right.
A missing or wrong token is answered 401 with ``WWW-Authenticate: Bearer`` (RFC 6750), as
problem+json. With no tokens configured, auth is off; :class:`~gradwire.server.settings.Settings`
allows that only on loopback. Tokens are never logged or echoed.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gradwire.server.control import Services
from gradwire.server.problems import ProblemError

__all__ = ["bearer_scheme", "get_services", "require_token"]

REALM = "gradwire"

#: Declares the scheme in OpenAPI (the docs page's Authorize button); the check is ours.
bearer_scheme = HTTPBearer(auto_error=False, description="a token from GRADWIRE_TOKENS")


async def get_services(request: Request) -> Services:
    """The services of the app serving this request (async: no I/O, so no thread-pool hop)."""
    services: Services = request.app.state.services
    return services


def _token_matches(given: str, services: Services) -> bool:
    given_bytes = given.encode("utf-8", "surrogateescape")
    matched = False
    for token in services.settings.tokens:  # no early exit: every token is compared
        matched |= hmac.compare_digest(given_bytes, token.get_secret_value().encode())
    return matched


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Let the request through only with a configured bearer token (when any are configured).

    ``async`` although it does no I/O: FastAPI runs sync dependencies in a thread pool, and this
    one runs on every /v1 request."""
    services: Services = request.app.state.services
    if not services.settings.auth_enabled:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(
            401,
            "this endpoint needs an 'Authorization: Bearer <token>' header",
            kind="unauthenticated",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    if not _token_matches(credentials.credentials, services):
        raise ProblemError(
            401,
            "the bearer token is not valid for this coordinator",
            kind="unauthenticated",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
        )
