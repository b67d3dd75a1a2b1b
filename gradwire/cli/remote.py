"""A small client of the coordinator's REST API (``/v1``), used by `gradwire submit` and `gradwire jobs`.

    client = CoordinatorClient("http://127.0.0.1:8000", token=os.environ.get("GRADWIRE_TOKEN"))
    job = client.submit(spec.model_dump(mode="json"))
    job = client.wait(job["id"])                       # until SUCCEEDED, FAILED or CANCELLED

Errors come back as RFC 9457 problem documents; :class:`ApiError` carries the status, the
title and detail, and each field error, so the command line can print what the server said.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
DEFAULT_SERVER = "http://127.0.0.1:8000"


class ApiError(RuntimeError):
    """A non-2xx answer from the coordinator."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status, self.problem = status, problem
        lines = [f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".rstrip(": ")]
        lines += [f"  {e.get('field', '')}: {e.get('message', '')}" for e in problem.get("errors") or []]
        super().__init__("\n".join(lines))


class CoordinatorClient:
    def __init__(self, server: str = DEFAULT_SERVER, token: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            problem = {"title": "coordinator unreachable", "detail": f"{self.http.base_url}: {err}"}
            raise ApiError(0, problem) from err
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            raise ApiError(response.status_code, problem)
        return response

    # --- jobs ---------------------------------------------------------------------------------
    def submit(
        self, spec: dict[str, Any], *, priority: int = 0, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        params = {"priority": priority} if priority else {}
        return self._call("POST", "/v1/jobs", json=spec, headers=headers, params=params).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def list(self, *, state: list[str] | None = None, name: str | None = None, limit: int = 50) -> list[dict]:
        """Every job matching the filters (all pages)."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if name:
            params["name"] = name
        items: list[dict] = []
        while True:
            page = self._call("GET", "/v1/jobs", params=params).json()
            items += page["items"]
            if not page.get("next_cursor"):
                return items
            params["after"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}:cancel").json()

    def logs(self, job_id: str) -> str:
        return self._call("GET", f"/v1/jobs/{job_id}/logs").text

    def metrics(self, job_id: str, *, max_points: int | None = None) -> dict[str, Any]:
        params = {"max_points": max_points} if max_points else {}
        return self._call("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is terminal; ``on_poll(job)`` after each poll."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_poll is not None:
                on_poll(job)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:g} s")
            time.sleep(poll_s)
