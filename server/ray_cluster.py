"""The coordinator's handle on Ray: the Jobs API over HTTP, and the embedded single-machine head.

    cluster = RayCluster(num_cpus=2).start()        # embedded head on 127.0.0.1 (a `ray start` subprocess)
    cluster.resources()   # {"total": {"CPU": 2.0, ...}, "available": {...}}
    cluster.jobs_client().submit_job(entrypoint="...")
    cluster.shutdown()    # stops the head this object started, and nothing else

The coordinator never joins a cluster as a Ray node: it talks to Ray **only over HTTP**, through
the dashboard's public endpoints, so it drives any Ray it can reach by address (a head behind a
firewall, KubeRay, a managed Ray) whatever Ray version the coordinator has installed:

* jobs: ``ray.job_submission.JobSubmissionClient`` (public, used as it is; every call runs on a
  helper thread and is abandoned after ``request_timeout_s``, since Ray's own HTTP calls have no
  timeout);
* resources: ``GET /api/cluster_status`` (the autoscaler's load report: ``usage`` =
  ``{resource: [used, total]}`` over the live nodes; Ray's monitor refreshes it every few seconds);
* readiness: ``GET /api/version`` on the dashboard and, for the embedded head, ``GET /api/healthz``
  on its dashboard agent (the process that actually starts job drivers: without it every
  submission fails "No available agent").

``address``: the Jobs API of a running cluster, ``http://head:8265`` (``host:port`` means
``http://host:port``). Without one, :meth:`RayCluster.start` runs an **embedded head** on this
machine: ``ray start --head --block`` as a child process (its own session), bound to 127.0.0.1
with :mod:`gradwire.ray_env`'s recipe, with its GCS, dashboard, dashboard-agent and Ray-client
ports either given or chosen free (never Ray's fixed defaults 6379/8265/52365/10001, which any
other Ray on the machine may hold), and its own temp dir. A port given that is already taken is
refused before anything starts, with a message naming the port and its setting; a head that does
not come up (its process exits, or its agent never answers) is stopped and reported with the tail
of its log. :meth:`RayCluster.shutdown` stops it by its PID (SIGTERM: Ray drains and stops its
processes; SIGKILL to its process group if it does not end in time); no other Ray is touched.

Of the whole coordinator only this module imports ``ray``, and only ``ray.job_submission``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gradwire.ray_env import LOOPBACK, local_ray_env, ray_temp_dir

log = logging.getLogger(__name__)

__all__ = ["HEAD_PORTS", "RayCluster", "RayUnavailable", "free_port", "is_not_found"]

#: seconds to wait for an embedded head (its dashboard and agent) or a cluster's Jobs API
START_WAIT_S = 90.0
#: starts of the embedded head when one exits because a port chosen here was taken before it bound it
HEAD_START_TRIES = 3
#: seconds one HTTP call to the Jobs API may take
REQUEST_TIMEOUT_S = 30.0
#: seconds a stopping embedded head may drain before its process group is killed
STOP_WAIT_S = 45.0
#: the embedded head's ports: RayCluster argument -> (what it is, `ray start` option, gradwire setting)
HEAD_PORTS: dict[str, tuple[str, str, str]] = {
    "gcs_port": ("Ray GCS", "--port", "GRADWIRE_RAY_GCS_PORT"),
    "dashboard_port": ("Ray dashboard (Jobs API)", "--dashboard-port", "GRADWIRE_RAY_DASHBOARD_PORT"),
    "agent_port": ("Ray dashboard agent", "--dashboard-agent-listen-port", "GRADWIRE_RAY_AGENT_PORT"),
    "client_port": ("Ray client server", "--ray-client-server-port", "GRADWIRE_RAY_CLIENT_PORT"),
}

_T = TypeVar("_T")


class RayUnavailable(RuntimeError):
    """Ray (or its Jobs API) cannot be reached or started."""


def is_not_found(err: BaseException) -> bool:
    """Whether a Jobs API call failed because Ray does not know the submission id
    (``JobSubmissionClient`` raises ``RuntimeError("Request failed with status code 404: ...")``)."""
    return isinstance(err, RuntimeError) and "status code 404" in str(err)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def lost_a_port_race(asked: dict[str, int | None], error: str) -> bool:
    """Whether a head start failed because a port chosen for it (not one asked for) was taken first:
    the head exited before it was ready and its log says a bind failed."""
    chosen_here = any(port is None for port in asked.values())
    failed_bind = any(sign in error.lower() for sign in ("failed to bind", "address already in use"))
    return chosen_here and "exited with code" in error and failed_bind


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether ``host:port`` can be bound now (a listener on 0.0.0.0 or on ``host`` holds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http(address: str) -> str:
    address = address.rstrip("/")
    if address.startswith(("http://", "https://")):
        return address
    if "://" in address or address == "auto":
        raise RayUnavailable(
            f"Ray address {address!r}: the coordinator reaches Ray by its Jobs API only; give the "
            "head's dashboard address, e.g. http://head:8265 (RAY_ADDRESS / GRADWIRE_RAY_ADDRESS)"
        )
    return f"http://{address}"


class RayCluster:
    """Ray as the coordinator uses it: resources, the Jobs API, and a clean shutdown.

    ``address``: the Jobs API of a cluster (``None``: start an embedded head; see the module
    docstring). ``dashboard_address``: the same, under its older name (wins over ``address``).
    For the embedded head: ``num_cpus`` / ``num_gpus`` (default: what the machine has),
    ``gcs_port``, ``dashboard_port``, ``agent_port``, ``client_port`` (default: free ports) and
    ``temp_dir`` (default :func:`gradwire.ray_env.ray_temp_dir`).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        gcs_port: int | None = None,
        dashboard_port: int | None = None,
        agent_port: int | None = None,
        client_port: int | None = None,
        temp_dir: str | Path | None = None,
        dashboard_address: str | None = None,
        start_wait_s: float = START_WAIT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        given = dashboard_address or address or None
        self._dashboard_url: str | None = _http(given) if given else None
        self.address = self._dashboard_url
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.ports: dict[str, int | None] = {
            "gcs_port": gcs_port, "dashboard_port": dashboard_port,
            "agent_port": agent_port, "client_port": client_port,
        }  # fmt: skip
        self.temp_dir = None if temp_dir is None else str(temp_dir)
        self.start_wait_s = float(start_wait_s)
        self.request_timeout_s = float(request_timeout_s)
        self._head: subprocess.Popen | None = None
        self._head_log: Path | None = None
        self._agent_url: str | None = None
        self._gcs_address: str | None = None
        self._started = False
        self._client = None
        self._client_lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    @property
    def embedded(self) -> bool:
        """True when no address was given: the coordinator runs its own head on 127.0.0.1."""
        return self.address is None

    @property
    def started(self) -> bool:
        return self._started

    @property
    def owns_ray(self) -> bool:
        """Whether :meth:`shutdown` stops a Ray head (the embedded one this object started)."""
        return self._head is not None

    @property
    def head_pid(self) -> int | None:
        """PID of the embedded head's ``ray start --block`` process (``None`` without one)."""
        return None if self._head is None else self._head.pid

    def start(self) -> RayCluster:
        """Start the embedded head, or wait for the cluster's Jobs API. Returns ``self``; raises
        :class:`RayUnavailable` with what to change when it cannot."""
        if self._started:
            return self
        if self.embedded:
            self._start_head()
        else:
            deadline = time.monotonic() + self.start_wait_s
            what = (
                f"the Ray Jobs API at {self._dashboard_url} (RAY_ADDRESS / GRADWIRE_RAY_ADDRESS must "
                "be the head's dashboard address, e.g. http://head:8265, not its GCS port)"
            )
            self._wait(deadline, self._jobs_api_error, what)
        self._started = True
        log.info("Ray ready: Jobs API %s", self._dashboard_url)
        return self

    def _start_head(self) -> None:
        """Start the embedded head on the ports asked for, choosing the others here. A port chosen here
        can be taken between :func:`free_port` and the head binding it (Ray's own processes take
        ephemeral ports as they start); a head that exits for that is started again on new ports."""
        asked = dict(self.ports)
        for attempt in range(1, HEAD_START_TRIES + 1):
            try:
                self._launch_head(asked)
                return
            except RayUnavailable as err:
                if attempt == HEAD_START_TRIES or not lost_a_port_race(asked, str(err)):
                    raise
                log.warning("the embedded Ray head lost a port chosen for it; starting it on new ports")

    def _launch_head(self, asked: dict[str, int | None]) -> None:
        ray = _ray_cli()
        ports = dict(asked)
        for name, port in ports.items():
            if port is not None and not port_is_free(port):
                what, option, setting = HEAD_PORTS[name]
                raise RayUnavailable(
                    f"cannot start the embedded Ray head: port {port} (the {what} port, {option}) is "
                    f"already in use on {LOOPBACK}, probably by another Ray; set {setting} to a free "
                    "port, or leave it unset to have one chosen"
                )
        taken: set[int] = {p for p in ports.values() if p is not None}
        for name, port in ports.items():
            while port is None or (port in taken and asked[name] is None):
                port = free_port()
            taken.add(port)
            ports[name] = port
        temp_dir = Path(self.temp_dir or ray_temp_dir()).resolve()
        temp_dir.mkdir(parents=True, exist_ok=True)
        command = [ray, "start", "--head", "--block", "--node-ip-address", LOOPBACK]
        command += ["--dashboard-host", LOOPBACK, "--include-dashboard", "true"]
        for name, port in ports.items():
            command += [HEAD_PORTS[name][1], str(port)]
        command += ["--temp-dir", str(temp_dir), "--disable-usage-stats"]
        if self.num_cpus is not None:
            command += ["--num-cpus", str(_whole(self.num_cpus, "num_cpus"))]
        if self.num_gpus is not None:
            command += ["--num-gpus", str(_whole(self.num_gpus, "num_gpus"))]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(local_ray_env())
        self._head_log = temp_dir / f"gradwire-head-{os.getpid()}-{ports['dashboard_port']}.log"
        started = time.monotonic()
        with open(self._head_log, "wb") as out:
            self._head = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: stopped as one, never with others
            )  # fmt: skip
        self._dashboard_url = f"http://{LOOPBACK}:{ports['dashboard_port']}"
        self._agent_url = f"http://{LOOPBACK}:{ports['agent_port']}"
        self._gcs_address = f"{LOOPBACK}:{ports['gcs_port']}"
        self.ports = dict(ports)
        log.info("starting an embedded Ray head: %s", " ".join(command))
        try:
            deadline = time.monotonic() + self.start_wait_s
            self._wait(deadline, self._head_error, "the embedded Ray head")
        except BaseException:
            self._stop_head()
            raise
        log.info(
            "embedded Ray head up in %.1f s: PID %d, Jobs API %s, agent %s, temp dir %s",
            time.monotonic() - started, self._head.pid, self._dashboard_url, self._agent_url, temp_dir,
        )  # fmt: skip

    def _wait(self, deadline: float, problem: Callable[[], str | None], what: str) -> None:
        """Poll ``problem()`` until it says nothing is wrong (``None``) or the deadline passes."""
        while True:
            error = problem()
            if error is None:
                return
            if self._head is not None and self._head.poll() is not None:
                raise RayUnavailable(
                    f"{what} exited with code {self._head.returncode} before it was ready "
                    f"({error}); its log ({self._head_log}) ends:\n{self._head_log_tail()}"
                )
            if time.monotonic() > deadline:
                tail = f"; its log ({self._head_log}) ends:\n{self._head_log_tail()}" if self._head else ""
                raise RayUnavailable(f"{what} was not ready within {self.start_wait_s:g} s: {error}{tail}")
            time.sleep(0.5)

    def _head_error(self) -> str | None:
        """What keeps the embedded head from taking jobs (``None``: nothing)."""
        return self._jobs_api_error() or self._agent_error() or self._resources_error()

    def _jobs_api_error(self) -> str | None:
        try:
            version = _get_json(f"{self._dashboard_url}/api/version", min(5.0, self.request_timeout_s))
        except Exception as err:
            return f"the Jobs API at {self._dashboard_url} does not answer ({err})"
        if not isinstance(version, dict) or "ray_version" not in version:
            return f"{self._dashboard_url} is not a Ray dashboard (GET /api/version: {version!r})"
        return None

    def _agent_error(self) -> str | None:
        if self._agent_url is None:
            return None
        try:
            with urllib.request.urlopen(f"{self._agent_url}/api/healthz", timeout=5.0) as answer:
                answer.read()
        except Exception as err:
            return (
                f"the Ray dashboard agent at {self._agent_url}, which starts job drivers, does not "
                f"answer ({err})"
            )
        return None

    def _resources_error(self) -> str | None:
        try:
            self._read_resources()
        except RayUnavailable as err:
            return str(err)
        return None

    def _head_log_tail(self, lines: int = 15) -> str:
        try:
            text = self._head_log.read_text(errors="replace") if self._head_log else ""
        except OSError:
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"

    def shutdown(self) -> None:
        """Stop the embedded head if this object started it (a cluster given by address is left
        alone)."""
        self._client = None
        self._stop_head()
        self._started = False

    def _stop_head(self) -> None:
        head, self._head = self._head, None
        if head is None:
            return
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its processes
            try:
                head.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("the embedded Ray head (PID %d) did not stop; killing it", head.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(head.pid, signal.SIGKILL)  # leftovers of its own session only
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(10)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- what the coordinator asks

    @property
    def dashboard_url(self) -> str:
        """``http://host:port`` of the dashboard that serves the Jobs API."""
        if self._dashboard_url is None:
            raise RayUnavailable("the embedded Ray head is not started (call RayCluster.start())")
        return self._dashboard_url

    @property
    def gcs_address(self) -> str | None:
        """The embedded head's GCS address (``host:port``: what a Ray driver or a worker
        node's ``ray start --address`` joins); ``None`` for a cluster given by address."""
        return self._gcs_address

    def ready(self) -> str | None:
        """``None`` when the Jobs API would take a job now; else what is wrong (for ``/readyz``)."""
        if self.embedded and self._head is not None and self._head.poll() is not None:
            return f"the embedded Ray head (PID {self._head.pid}) exited with code {self._head.returncode}"
        return self._jobs_api_error() or self._agent_error()

    def resources(self, *, timeout_s: float | None = None) -> dict[str, dict[str, float]]:
        """``{"total": {...}, "available": {...}}``: Ray's resources (CPU, GPU, memory, ...) summed
        over the cluster's live nodes, from the dashboard's ``/api/cluster_status``; per-node
        marker resources (``node:...``) are left out. Raises :class:`RayUnavailable`."""
        self._require_address()
        return self._read_resources(timeout_s)

    def _read_resources(self, timeout_s: float | None = None) -> dict[str, dict[str, float]]:
        url = f"{self._dashboard_url}/api/cluster_status"
        try:
            document = _get_json(url, timeout_s or self.request_timeout_s)
        except Exception as err:
            raise RayUnavailable(f"cannot read the Ray cluster's resources from {url}: {err}") from err
        status = ((document or {}).get("data") or {}).get("clusterStatus") or {}
        usage = (status.get("loadMetricsReport") or {}).get("usage")
        if not usage:
            raise RayUnavailable(f"Ray has not published its cluster status yet ({url})")
        total, available = {}, {}
        for name, pair in usage.items():
            if name.startswith("node:"):
                continue
            used, whole = float(pair[0]), float(pair[1])
            key = _snake(name)
            total[key], available[key] = whole, max(0.0, whole - used)
        return {"total": dict(sorted(total.items())), "available": dict(sorted(available.items()))}

    def jobs_client(self) -> _TimedJobs:
        """The public ``ray.job_submission.JobSubmissionClient`` for this cluster's Jobs API (one,
        reused), each call given ``request_timeout_s`` to answer (:class:`RayUnavailable` after)."""
        self._require_address()
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = _call(self._new_client, self.request_timeout_s, "connecting to")
                except RayUnavailable:
                    raise
                except Exception as err:
                    raise RayUnavailable(
                        f"the Ray Jobs API at {self._dashboard_url} is unreachable: {err}"
                    ) from err
            return _TimedJobs(self._client, self.request_timeout_s)

    def _new_client(self):
        from ray.job_submission import JobSubmissionClient

        # the URL is given explicitly; RAY_ADDRESS (often a GCS address) must not be consulted
        saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:
            return JobSubmissionClient(address=self._dashboard_url)
        finally:
            os.environ.update(saved)

    def job_env(self) -> dict[str, str]:
        """Environment variables every job driver should get: the loopback recipe for the embedded
        head (a multi-node cluster must not get it: it pins node addresses to 127.0.0.1)."""
        return dict(local_ray_env()) if self.embedded else {}

    def _require_address(self) -> None:
        if self._dashboard_url is None:
            raise RayUnavailable("the embedded Ray head is not started (call RayCluster.start())")


class _TimedJobs:
    """A ``JobSubmissionClient``'s methods, each abandoned after ``timeout_s`` (Ray's own HTTP
    calls have none, so a wedged dashboard would stall the scheduler forever). Ray's errors pass
    through unchanged (``is_not_found`` still reads them); a timeout raises :class:`RayUnavailable`."""

    def __init__(self, client: Any, timeout_s: float) -> None:
        self._client, self._timeout_s = client, timeout_s

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)
        if not callable(method) or name.startswith("_"):
            raise AttributeError(name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            return _call(lambda: method(*args, **kwargs), self._timeout_s, name)

        return timed


def _call(fn: Callable[[], _T], timeout_s: float, what: str) -> _T:
    """``fn()`` on a helper thread: its result or its own exception, or :class:`RayUnavailable`
    (the thread abandoned) when it takes longer than ``timeout_s``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=run, name=f"gradwire-ray-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RayUnavailable(f"Ray Jobs API ({what}): no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return json.loads(answer.read().decode())


def _snake(name: str) -> str:
    """The dashboard camel-cases its JSON keys (``objectStoreMemory``); Ray's own names are
    ``object_store_memory``. Names that start upper-case (``CPU``, ``GPU``) are left as they are."""
    if not name[:1].islower():
        return name
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _whole(value: float, what: str) -> int:
    if float(value) != int(value):
        raise RayUnavailable(f"{what}={value}: `ray start` takes whole numbers for the embedded head")
    return int(value)


def _ray_cli() -> str:
    """The ``ray`` command of the Ray installed with this Python."""
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found:
        return found
    raise RayUnavailable(
        "cannot start the embedded Ray head: no `ray` command next to this Python or on PATH "
        "(install the 'ray' extra), or give the address of a running Ray's Jobs API"
    )
