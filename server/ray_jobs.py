"""A gradwire job as a Ray job: the submission id it runs under, and why Ray says it failed.

* :func:`submission_id` — the Ray submission id of a job (``gradwire-<job id>``);
* :func:`failure_reason` — why a Ray job failed, from its status and the tail of its log.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SUBMISSION_PREFIX", "failure_reason", "submission_id"]

SUBMISSION_PREFIX = "gradwire-"


def submission_id(job_id: str) -> str:
    """The Ray Jobs submission id of a gradwire job: derived from its id, so it is known (and
    stored) before the job is submitted, and a restarted coordinator can ask Ray about it."""
    return SUBMISSION_PREFIX + job_id


# --- Ray's answers ----------------------------------------------------------------------------


def _tail(text: str | None, lines: int = 20, chars: int = 3000) -> str:
    if not text:
        return ""
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:]


def failure_reason(info: Any, logs: str | None) -> str:
    """Why a Ray job failed, for the job's stored reason: exit code, meaning, and the log's tail.

    ``gradwire train`` exits 1 when the job stopped on non-finite values (and says so in its
    last log line), 2 on bad input; an uncaught exception also exits 1, hence the log check.
    """
    code = getattr(info, "driver_exit_code", None)
    tail = _tail(logs)
    stopped = [line for line in (logs or "").splitlines()[-500:] if ": stopped: " in line]
    if code == 1 and stopped:
        head = f"stopped on non-finite values (gradwire train exited with 1): {stopped[-1].strip()}"
    elif code == 2:
        head = "gradwire train refused its input (exit code 2)"
    elif code is not None:
        head = f"the Ray job failed: its driver exited with code {code}"
    else:
        detail = getattr(info, "message", None) or getattr(info, "error_type", None) or "no detail"
        head = f"the Ray job failed: {detail}"
    return f"{head}\n--- last lines of the job's log ---\n{tail}" if tail else head
