"""Whether the queue has room for one more job (``POST /v1/jobs``).

Two caps, both settings: ``max_queued_jobs`` (QUEUED jobs on this coordinator, whoever submitted
them) and ``max_queued_jobs_per_token`` (QUEUED jobs submitted by one principal, that is with one
bearer token). A submission beyond either is a 429 problem with
``Retry-After: queue_full_retry_after_s``; a repeated ``Idempotency-Key`` that names a job the
same principal already stored is answered as before, full or not.

The submitter is recorded in the job's ``owner`` column as its principal's name
(server/principals.py), never the token itself. With authentication off there is one anonymous
submitter and only the total cap applies. The check and the insert run under one lock, so
concurrent submissions cannot overshoot a cap together.
"""

from __future__ import annotations

import threading

from gradwire.server.problems import ProblemError
from gradwire.server.settings import Settings
from gradwire.server.states import JobState
from gradwire.server.store import JobStore

__all__ = ["QueueGate"]


class QueueGate:
    """Holds submissions to the queue caps; :meth:`lock` is held from the check to the insert."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def check(self, store: JobStore, settings: Settings, owner: str, key: str | None) -> None:
        """Raise a 429 problem when one more queued job by ``owner`` would exceed a cap (call under
        ``lock``)."""
        if key is not None and store.find_by_key(key, owner=owner) is not None:
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
        if not settings.auth_enabled:
            return  # one anonymous submitter: the total cap is its cap
        mine = store.list(state=[JobState.QUEUED], owner=owner, limit=1).total
        if mine >= settings.max_queued_jobs_per_token:
            raise ProblemError(
                429,
                f"this token already has {mine} queued jobs, its limit "
                f"(GRADWIRE_MAX_QUEUED_JOBS_PER_TOKEN={settings.max_queued_jobs_per_token}); retry later",
                kind="queue-full", title="Queue full", headers=retry,
            )  # fmt: skip
