"""Who is calling: the principals named in ``GRADWIRE_TOKENS``, their roles, and what each may see.

Every bearer token belongs to one principal. ``GRADWIRE_TOKENS`` is a comma-separated list (or a
JSON array) of entries, each either

* ``name:TOKEN``: the principal ``name`` (letters, digits, ``_ . -``; 64 at most; not
  ``anonymous``), or
* ``TOKEN`` alone (the form from before principals): a principal whose name is derived from the
  token, ``token:`` and the first 16 hex digits of the token's SHA-256, so the name never
  reveals the token. A bare token that itself contains ``:`` must be given a name.

A principal is a ``user`` unless ``GRADWIRE_ADMINS`` (comma-separated principal names, derived
names included) lists it; an ``admin`` sees and acts on every job. A user sees and acts on the
jobs it submitted (a job's ``owner`` is its submitter's name) and no others: another principal's
job is answered 404, as a job that does not exist is, so job ids do not leak. Jobs stored before
owners were recorded (``owner`` NULL) are seen by admins only.

With no tokens configured (loopback-only development) every request is the one principal
:data:`ANONYMOUS`, an admin, so everything behaves as before principals existed.

Error messages about this configuration name entries by position and principals by name, never a
token.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import SecretStr

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_NAME",
    "Principal",
    "PrincipalToken",
    "derived_name",
    "parse_principals",
]

ANONYMOUS_NAME = "anonymous"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Principal:
    """A caller: its name (recorded as a job's ``owner``) and whether it is an admin."""

    name: str
    admin: bool = False

    @property
    def role(self) -> str:
        return "admin" if self.admin else "user"

    def can_see(self, owner: str | None) -> bool:
        """Whether this principal may see (and act on) a job owned by ``owner``."""
        return self.admin or owner == self.name

    @property
    def owner_filter(self) -> str | None:
        """The owner to filter listings by: ``None`` (every job) for an admin."""
        return None if self.admin else self.name


#: The caller when no tokens are configured (loopback-only development): sees everything.
ANONYMOUS = Principal(ANONYMOUS_NAME, admin=True)


@dataclass(frozen=True)
class PrincipalToken:
    """One configured token and the principal it authenticates (the token is never in a repr)."""

    principal: Principal
    token: SecretStr = field(repr=False)


def derived_name(token: str) -> str:
    """The name of a bare token's principal: a fingerprint that does not reveal the token."""
    return "token:" + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def parse_principals(entries: Iterable[str], admins: Iterable[str] = ()) -> tuple[PrincipalToken, ...]:
    """The principals of ``GRADWIRE_TOKENS`` entries, admins marked; ``ValueError`` naming the
    entry by position (never quoting it) when one is malformed, a name repeats, a token is given
    to two principals, or an admin names no configured principal."""
    parsed: list[tuple[str, str]] = []
    for number, entry in enumerate(entries, start=1):
        name, colon, token = entry.partition(":")
        if not colon:
            name, token = derived_name(entry), entry
        elif not NAME.fullmatch(name):
            raise ValueError(
                f"GRADWIRE_TOKENS entry {number}: the part before ':' is not a principal name (letters, "
                "digits, '_', '.', '-'; at most 64); write entries as name:TOKEN"
            )
        elif name == ANONYMOUS_NAME:
            raise ValueError(
                f"GRADWIRE_TOKENS entry {number}: '{ANONYMOUS_NAME}' is reserved; pick another name"
            )
        if not token:
            raise ValueError(f"GRADWIRE_TOKENS entry {number}: principal {name!r} has an empty token")
        parsed.append((name, token))
    names = [name for name, _ in parsed]
    for name in dict.fromkeys(n for n in names if names.count(n) > 1):
        raise ValueError(f"GRADWIRE_TOKENS: principal {name!r} is named more than once; give it one token")
    tokens = [token for _, token in parsed]
    if len(set(tokens)) != len(tokens):
        raise ValueError("GRADWIRE_TOKENS: two entries share one token; each principal needs its own")
    admin_names = {a.strip() for a in admins if a.strip()}
    unknown = sorted(admin_names - set(names))
    if unknown:
        raise ValueError(f"GRADWIRE_ADMINS names {unknown}, which GRADWIRE_TOKENS does not define")
    return tuple(
        PrincipalToken(Principal(name, admin=name in admin_names), SecretStr(token)) for name, token in parsed
    )
