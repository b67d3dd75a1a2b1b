"""Who submitted a job, and whether the queue has room for one more (``POST /v1/jobs``).

Two caps, both settings: ``max_queued_jobs`` (QUEUED jobs on this coordinator, whoever submitted
them) and ``max_queued_jobs_per_token`` (QUEUED jobs submitted with one bearer token). A
submission beyond either is a 429 problem with ``Retry-After: queue_full_retry_after_s``; a
repeated ``Idempotency-Key`` that names a job already stored is answered as before, full or not.

The submitter is recorded in the job's ``owner`` column as ``token:<first 16 hex digits of the
token's SHA-256>``, never the token itself. With authentication off there is one anonymous
submitter (owner ``None``) and only the total cap applies. The check and the insert run under one
lock, so concurrent submissions cannot overshoot a cap together.
"""

from __future__ import annotations

import hashlib
import threading

from gradwire.server.problems import ProblemError
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore

__all__ = ["QueueGate", "submitter"]


def submitter(authorization: str | None, settings: Settings) -> str | None:
    """The owner to record for a request's ``Authorization`` header (already checked by auth)."""
    if not settings.auth_enabled or not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).hexdigest()
    return f"token:{digest[:16]}"


class QueueGate:
    """Holds submissions to the queue caps; :meth:`lock` is held from the check to the insert."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def check(self, store: JobStore, settings: Settings, owner: str | None, key: str | None) -> None:
        """Raise a 429 problem when one more queued job would exceed a cap (call under ``lock``)."""
        if key is not None and store.find_by_key(key) is not None:
            return  # the idempotent replay of a job already stored queues nothing
        retry = {"Retry-After": str(settings.queue_full_retry_after_s)}
        total = store.counts_by_state()[JobState.QUEUED]
        if total >= settings.max_queued_jobs:
            raise ProblemError(
                429,
                f"this coordinator already holds {total} queued jobs, its limit "
                f"(GRADWIRE_MAX_QUEUED_JOBS={settings.max_queued_jobs}); retry later",
                kind="queue-full", title="Queue full", headers=retry,
            )  # fmt: skip
        if owner is None:
            return
        mine = store.list(state=[JobState.QUEUED], owner=owner, limit=1).total
        if mine >= settings.max_queued_jobs_per_token:
            raise ProblemError(
                429,
                f"this token already has {mine} queued jobs, its limit "
                f"(GRADWIRE_MAX_QUEUED_JOBS_PER_TOKEN={settings.max_queued_jobs_per_token}); retry later",
                kind="queue-full", title="Queue full", headers=retry,
            )  # fmt: skip
