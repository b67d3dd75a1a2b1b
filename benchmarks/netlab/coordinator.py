"""``LabCoordinator``: ``gradwire serve`` in a lab namespace, driving a :class:`LabRayCluster` by its Jobs
API address only, with a data folder no Ray node can see.

    with LabCoordinator(ray, storage="/tmp/x/storage") as coord:
        job = coord.rest("POST", "/v1/jobs", spec_dict)       # over REST, from the coordinator's host
        coord.wait(job["id"])                                  # SUCCEEDED / FAILED / CANCELLED record

The coordinator runs in the cluster's client rank as ``python -m gradwire.cli serve`` with
``RAY_ADDRESS=http://HEAD:8265``. Its working folder (SQLite store, ``.gradwire/``) is a private
``tmpfs`` mounted in a mount namespace of its own (``unshare --mount``): no other process, the Ray
nodes included, can see a file in it, so a job that needed one would fail. The only folder the nodes
and the coordinator share is ``storage`` (``GRADWIRE_CHECKPOINT_ROOT``: checkpoints, as a cluster's NFS
or object store). The REST API listens on 127.0.0.1 of the client namespace; the telemetry sink on the
client's lab address, which the job's workers dial (``GRADWIRE_TELEMETRY_PUBLIC_ADDRESS``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.netlab.netns import NetlabError
from benchmarks.netlab.raycluster import LabRayCluster

__all__ = ["REST_PORT", "TELEMETRY_PORT", "LabCoordinator"]

REST_PORT = 8000
TELEMETRY_PORT = 50051
READY_WAIT_S = 180.0
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
# mounts a private tmpfs on $0 (the coordinator's folder), enters it and runs the coordinator ("$@")
_PRIVATE_FOLDER = 'mount -t tmpfs -o size=512m,mode=0700 gw-coordinator "$0" && cd "$0" && exec "$@"'


class LabCoordinator:
    """``gradwire serve`` in ``ray``'s client namespace; see the module docstring. ``storage``: the
    checkpoint root every node sees; ``env``: more ``GRADWIRE_*`` settings."""

    def __init__(
        self,
        ray: LabRayCluster,
        storage: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        ready_wait_s: float = READY_WAIT_S,
    ) -> None:
        self.ray = ray
        self.storage = Path(storage).resolve()
        self.token = secrets.token_hex(16)
        self.address = ray.node_address(ray.client)
        self.telemetry_address = f"{self.address}:{TELEMETRY_PORT}"
        self.url = f"http://127.0.0.1:{REST_PORT}"
        self.extra_env = dict(env or {})
        self.ready_wait_s = float(ready_wait_s)
        self.folder: Path | None = None
        self.log: Path | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LabCoordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LabCoordinator:
        if self._proc is not None:
            raise NetlabError("this LabCoordinator is already running")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="gw-coordinator-"))
        self.log = Path(tempfile.mkstemp(prefix="gw-coordinator-", suffix=".log")[1])
        env = self.environment()
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _PRIVATE_FOLDER,
                   str(self.folder), sys.executable, "-m", "gradwire.cli", "serve"]  # fmt: skip
        with open(self.log, "wb") as out:
            # only the settings given here: none of this process's GRADWIRE_* variables
            self._proc = self.ray.popen(command, env=env, drop=("GRADWIRE_",), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def environment(self) -> dict[str, str]:
        """The settings ``gradwire serve`` gets (docs/deploy-ray.md shows the same for a real cluster)."""
        return {
            "RAY_ADDRESS": self.ray.jobs_address,
            "GRADWIRE_HOST": "127.0.0.1",
            "GRADWIRE_PORT": str(REST_PORT),
            "GRADWIRE_GRPC_HOST": self.address,
            "GRADWIRE_GRPC_PORT": str(TELEMETRY_PORT),
            "GRADWIRE_TELEMETRY_PUBLIC_ADDRESS": self.telemetry_address,
            "GRADWIRE_TOKENS": f"lab:{self.token}",  # the telemetry sink listens beyond loopback
            "GRADWIRE_CHECKPOINT_ROOT": str(self.storage),
            **self.extra_env,
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_wait_s
        problem = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise NetlabError(
                    f"gradwire serve exited with code {self._proc.returncode}; its log ends:\n"
                    f"{self.log_tail()}"
                )
            with contextlib.suppress(NetlabError):
                status, text = self.ray.http("GET", f"{self.url}/readyz", timeout=10)
                if status == 200:
                    return
                problem = f"/readyz {status}: {text[:300]}"
            time.sleep(1.0)
        raise NetlabError(
            f"gradwire serve not ready within {self.ready_wait_s:g} s ({problem}); log:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Ctrl-C to the coordinator (it stops its sink and scheduler; the cluster is not its own, so
        Ray keeps running), SIGKILL to its process group if it does not end; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # the SIGINT goes to the whole session: ip netns exec, unshare, sh and python
            with contextlib.suppress(ProcessLookupError):
                _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(10)
        if self.folder is not None:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # the tmpfs went with the coordinator's mount namespace
            self.folder = None
        if self.log is not None:
            self.log.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace") if self.log else ""
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"

    # ------------------------------------------------------------------ REST, from the client namespace
    def rest(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        expect: int | tuple[int, ...] = (200, 201, 202),
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> Any:
        """``method path`` on the coordinator's REST API with its bearer token; the JSON answer. Any
        status outside ``expect`` raises NetlabError with the answer."""
        status, text = self.ray.http(method, f"{self.url}{path}", body,
                                     headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
                                     timeout=timeout)  # fmt: skip
        wanted = (expect,) if isinstance(expect, int) else expect
        if status not in wanted:
            raise NetlabError(f"{method} {path}: HTTP {status}: {text[:1000]}")
        return json.loads(text) if text else None

    def metrics_text(self) -> str:
        """The Prometheus page ``/metrics`` (text)."""
        status, text = self.ray.http("GET", f"{self.url}/metrics")
        if status != 200:
            raise NetlabError(f"GET /metrics: HTTP {status}: {text[:300]}")
        return text

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.rest("POST", "/v1/jobs", dict(spec))

    def job(self, job_id: str) -> dict[str, Any]:
        return self.rest("GET", f"/v1/jobs/{job_id}")

    def points(self, job_id: str) -> list[dict[str, Any]]:
        """The job's stored time series (rank 0's points, one per step)."""
        return self.rest("GET", f"/v1/jobs/{job_id}/metrics?max_points=100000")["points"]

    def wait(self, job_id: str, timeout: float = 600, poll_s: float = 2.0) -> dict[str, Any]:
        """Poll the job until it is SUCCEEDED, FAILED or CANCELLED; its record. NetlabError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["state"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise NetlabError(f"job {job_id} still {job['state']} after {timeout:g} s")
            time.sleep(poll_s)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    import os

    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
