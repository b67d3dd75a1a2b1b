"""The coordinator's handle on Ray: join a cluster by address, or run an embedded loopback head.

    cluster = RayCluster(num_cpus=2).start()        # embedded head on 127.0.0.1, with the dashboard
    cluster.resources()   # {"total": {"CPU": 2.0, ...}, "available": {...}}
    cluster.jobs_client().submit_job(entrypoint="...")
    cluster.shutdown()

Embedded mode (no address) starts Ray inside this process with ``ray.init``, bound to 127.0.0.1
only, *with* the dashboard: the Jobs API (``JobSubmissionClient``) is served by the dashboard,
so the coordinator cannot launch jobs without it. The dashboard listens on 127.0.0.1 too, on a
free port. The binding recipe is :mod:`gradwire.ray_env`'s: its environment must be in
``os.environ`` before ``ray`` is first imported, which :meth:`RayCluster.start` sees to (this
module imports ``ray`` only inside methods). An embedded head shares the coordinator's fate: it
stops when the coordinator process ends, and the jobs running on it end with it.

With an address (``host:port`` of the GCS, ``auto``, or ``ray://``), the coordinator joins that
cluster as a driver, and finds the Jobs API at the cluster's dashboard (or at
``dashboard_address`` when given, e.g. ``http://head:8265``).

One Ray per process. When Ray is already initialised in this process (a test session's shared
Ray, say), :meth:`RayCluster.start` uses it as it is, provided it has a dashboard, and
:meth:`RayCluster.shutdown` then leaves it running: only a Ray this object started is shut down.

The coordinator never imports torch, Ray Train or ``gradwire.worker``: only ray core and
``ray.job_submission``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gradwire.ray_env import LOOPBACK, apply_local_ray_env, local_ray_env, ray_temp_dir

log = logging.getLogger(__name__)

__all__ = ["RayCluster", "RayUnavailable", "free_port", "is_not_found"]

#: seconds to wait for the dashboard's Jobs API after Ray started
DASHBOARD_WAIT_S = 60.0
#: the same for a Ray that was already running in this process (its dashboard is up, or absent)
REUSED_DASHBOARD_WAIT_S = 5.0
#: seconds one HTTP call to the Jobs API may take
REQUEST_TIMEOUT_S = 30.0

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


def _http(address: str) -> str:
    return address if "://" in address else f"http://{address}"


def _job_client_class():
    from ray.job_submission import JobSubmissionClient

    class TimedJobSubmissionClient(JobSubmissionClient):
        """A JobSubmissionClient whose HTTP calls give up after ``request_timeout_s`` (Ray's own
        calls have no timeout, so a wedged dashboard would stall the scheduler forever)."""

        request_timeout_s: float = REQUEST_TIMEOUT_S

        def _do_request(self, method, endpoint, **kwargs):  # Ray's private hook, same signature
            kwargs.setdefault("timeout", self.request_timeout_s)
            return super()._do_request(method, endpoint, **kwargs)

    return TimedJobSubmissionClient


class RayCluster:
    """Ray as the coordinator uses it: resources, the Jobs API, and a clean shutdown.

    ``address``: a cluster to join (``None``: start an embedded head on 127.0.0.1, or use the Ray
    already initialised in this process). ``num_cpus`` / ``num_gpus``: what an embedded head
    offers (default: what the machine has). ``dashboard_port``: for the embedded head (default: a
    free port). ``temp_dir``: Ray's session folder for the embedded head (default:
    :func:`gradwire.ray_env.ray_temp_dir`). ``dashboard_address``: where the Jobs API is, when it
    cannot be found from Ray itself.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        dashboard_port: int | None = None,
        temp_dir: str | Path | None = None,
        dashboard_address: str | None = None,
        dashboard_wait_s: float = DASHBOARD_WAIT_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.address = address or None
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.dashboard_port = dashboard_port
        self.temp_dir = None if temp_dir is None else str(temp_dir)
        self.dashboard_wait_s = float(dashboard_wait_s)
        self.request_timeout_s = float(request_timeout_s)
        self._dashboard_url: str | None = _http(dashboard_address) if dashboard_address else None
        self._gcs_address: str | None = None
        self._owns_ray = False
        self._started = False
        self._client = None
        self._client_lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    @property
    def embedded(self) -> bool:
        """True when no address was given: Ray runs on this machine, on loopback only."""
        return self.address is None

    @property
    def started(self) -> bool:
        return self._started

    @property
    def owns_ray(self) -> bool:
        """Whether :meth:`shutdown` will shut Ray down (it started it)."""
        return self._owns_ray

    def start(self) -> RayCluster:
        """Connect to Ray or start the embedded head, and wait for the Jobs API. Returns ``self``."""
        if self._started:
            return self
        if self.embedded:
            apply_local_ray_env()
        elif "ray" not in sys.modules:
            # joining a cluster: only the harmless settings; never force the loopback node address
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        reused = ray.is_initialized()
        if reused:
            log.info("using the Ray already initialised in this process")
            self._owns_ray = False
        elif self.embedded:
            self._init_embedded(ray)
            self._owns_ray = True
        else:
            log.info("joining the Ray cluster at %s", self.address)
            try:
                ray.init(address=self.address, log_to_driver=False)
            except Exception as err:
                raise RayUnavailable(f"cannot join the Ray cluster at {self.address}: {err}") from err
            self._owns_ray = True  # our driver connection; shutting it down leaves the cluster up
        try:
            self._gcs_address = ray.get_runtime_context().gcs_address
            if self._dashboard_url is None:
                url = _dashboard_url_of_this_ray()
                if not url:
                    raise RayUnavailable(
                        "the Ray in this process names no dashboard, so it has no Jobs API; start it "
                        "with include_dashboard=True (RayCluster does), or give dashboard_address"
                    )
                self._dashboard_url = _http(url)
            if reused:  # a Ray started without the dashboard still names an address for it
                hint = "; was the Ray already running in this process started with include_dashboard=False?"
                self._wait_for_jobs_api(min(self.dashboard_wait_s, REUSED_DASHBOARD_WAIT_S), hint)
            else:
                self._wait_for_jobs_api(self.dashboard_wait_s)
        except BaseException:
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False
            raise
        self._started = True
        log.info("Ray ready: GCS %s, Jobs API %s", self._gcs_address, self._dashboard_url)
        return self

    def _init_embedded(self, ray: Any) -> None:
        _loopback_even_if_imported_early()
        temp_dir = self.temp_dir or ray_temp_dir()
        Path(temp_dir).mkdir(parents=True, exist_ok=True)
        port = self.dashboard_port or free_port()
        started = time.monotonic()
        try:
            context = ray.init(
                address="local",  # a new head even when RAY_ADDRESS is set
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                include_dashboard=True,
                dashboard_host=LOOPBACK,
                dashboard_port=port,
                _node_ip_address=LOOPBACK,
                _temp_dir=temp_dir,
                log_to_driver=False,
            )
        except Exception as err:
            raise RayUnavailable(f"cannot start an embedded Ray head: {err}") from err
        gcs_host = str(ray.get_runtime_context().gcs_address).rsplit(":", 1)[0]
        if gcs_host != LOOPBACK:
            ray.shutdown()
            raise RayUnavailable(
                f"the embedded Ray head came up on {gcs_host}, not {LOOPBACK}; it was shut down. Put "
                "gradwire.ray_env.local_ray_env() in the environment before ray is first imported"
            )
        self._dashboard_url = _http(context.dashboard_url or f"{LOOPBACK}:{port}")
        log.info("embedded Ray head started in %.1f s (temp dir %s)", time.monotonic() - started, temp_dir)

    def _wait_for_jobs_api(self, wait_s: float, hint: str = "") -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._client = self._new_client()
                return
            except Exception as err:  # the dashboard's HTTP server starts after ray.init returns
                if time.monotonic() > deadline:
                    raise RayUnavailable(
                        f"the Ray Jobs API at {self._dashboard_url} did not answer within {wait_s:g} s "
                        f"({err}){hint}"
                    ) from err
                time.sleep(0.5)

    def _new_client(self):
        cls = _job_client_class()
        # JobSubmissionClient prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument;
        # the URL is given explicitly, so drop them for the constructor's look-up only
        saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
        try:
            client = cls(address=self._dashboard_url)
        finally:
            os.environ.update(saved)
        client.request_timeout_s = self.request_timeout_s
        return client

    def shutdown(self) -> None:
        """Shut Ray down if this object started it (an embedded head, or its driver connection to a
        joined cluster); a Ray found already initialised in the process is left alone."""
        self._client = None
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        self._started = False

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- what the coordinator asks

    @property
    def dashboard_url(self) -> str:
        """``http://host:port`` of the dashboard that serves the Jobs API (once started)."""
        self._require_started()
        assert self._dashboard_url is not None
        return self._dashboard_url

    @property
    def gcs_address(self) -> str | None:
        """The cluster's GCS address (``host:port``), what ``RAY_ADDRESS`` would hold."""
        return self._gcs_address

    def resources(self, *, timeout_s: float | None = None) -> dict[str, dict[str, float]]:
        """``{"total": {...}, "available": {...}}``: Ray's resources (CPU, GPU, memory, ...) summed
        over the cluster's live nodes; per-node marker resources (``node:...``) are left out.

        With ``timeout_s``, gives up after that long (a Ray whose head died can block the call
        for a long time). Raises :class:`RayUnavailable`.
        """
        self._require_started()
        if timeout_s is not None:
            return _with_timeout(self.resources, timeout_s, "reading the Ray cluster's resources")
        import ray

        try:
            total = ray.cluster_resources()
            available = ray.available_resources()
        except Exception as err:
            raise RayUnavailable(f"cannot read the Ray cluster's resources: {err}") from err
        return {"total": _plain(total), "available": _plain(available)}

    def jobs_client(self):
        """The ``ray.job_submission.JobSubmissionClient`` for this cluster's Jobs API (one, reused;
        its calls are thread-safe and time out after ``request_timeout_s``)."""
        self._require_started()
        with self._client_lock:
            if self._client is None:
                try:
                    self._client = self._new_client()
                except Exception as err:
                    raise RayUnavailable(
                        f"the Ray Jobs API at {self._dashboard_url} is unreachable: {err}"
                    ) from err
            return self._client

    def job_env(self) -> dict[str, str]:
        """Environment variables every job driver should get: the loopback recipe for an embedded
        head (a joined multi-node cluster must not get it: it pins node addresses to 127.0.0.1)."""
        return dict(local_ray_env()) if self.embedded else {}

    def _require_started(self) -> None:
        if not self._started:
            raise RayUnavailable("the Ray cluster is not started (call RayCluster.start())")


def _loopback_even_if_imported_early() -> None:
    """Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` into a module constant when it is first
    imported; if that import came before :func:`apply_local_ray_env`, the constant still says
    "cluster" and the head would pick the machine's external address. Ray consults the constant
    at call time, so setting it now is enough (the processes Ray spawns read the environment)."""
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without this private module: the address check after init decides
        return
    if os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR) == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def _plain(resources: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(resources.items()) if not k.startswith("node:")}


def _dashboard_url_of_this_ray() -> str | None:
    """The dashboard address of the Ray this process is connected to, if it runs one."""
    import ray

    try:
        from ray._private.worker import get_dashboard_url  # not public; stable since Ray 1.x

        url = get_dashboard_url()
    except Exception:
        url = None
    if url:
        return str(url)
    try:  # ask the GCS: the dashboard registers its address in the internal KV store
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(
            ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
        )
    except Exception:
        raw = None
    del ray
    return raw.decode() if raw else None


def _with_timeout(fn: Callable[[], _T], timeout_s: float, what: str) -> _T:
    """``fn()`` on a helper thread, abandoned (RayUnavailable) if it takes longer than ``timeout_s``."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    thread = threading.Thread(target=call, name="gradwire-ray-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RayUnavailable(f"{what}: Ray did not answer within {timeout_s:g} s")
    if "error" in box:
        err = box["error"]
        if isinstance(err, RayUnavailable):
            raise err
        raise RayUnavailable(f"{what}: {err}") from err
    return box["value"]
