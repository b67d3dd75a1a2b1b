"""``LabRayCluster``: a real multi-node Ray cluster inside a switch-topology :class:`Lab`.

One namespace is the head (``ray start --head --block``, 0 CPUs: it runs job drivers and Ray's own
services), others are worker nodes (``ray start --address=HEAD:GCS --num-cpus=1 --block``). Each node
binds its own namespace address (``--node-ip-address``), has its own temp dir (as separate machines
have), and reaches the others only through the lab's shaped links. The Jobs API (the dashboard) listens
on the head's lab address; a client reaches it from another lab namespace (``client`` rank), e.g. a
coordinator started there with :meth:`LabRayCluster.popen`.

    with Lab(workers=5, rate="1gbit") as lab, LabRayCluster(lab, client=0, head=1, nodes=[2, 3, 4]) as ray:
        ray.jobs_address          # http://10.211.0.2:8265
        ray.get_json("/api/v0/nodes")                   # Ray's state API, asked from the client rank
        ray.kill_node(2)          # SIGKILL every process of node rank 2 (a machine that died)

It starts every Ray process itself and stops them by PID on every exit path: SIGTERM to each
``ray start --block`` (Ray drains and stops that node), then SIGKILL to whatever is still running in
the node's namespace (all of it started by this object: the namespaces are the lab's own). The lab's
own cleanup would do the same; this object does not rely on it.

Authentication is off (``RAY_AUTH_MODE=disabled``): nothing outside the lab's namespaces can reach
these addresses. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` is set explicitly, since a loopback-only
recipe (``=0``) in the caller's environment would make every node report 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.netlab import netns
from benchmarks.netlab.lab import Lab
from benchmarks.netlab.netns import NetlabError

__all__ = ["GCS_PORT", "JOBS_PORT", "LabRayCluster", "ray_node_env"]

GCS_PORT = 6379
JOBS_PORT = 8265
#: Ray's smallest object store is 75 MiB; the lab's jobs move little through it
OBJECT_STORE_BYTES = 80 * (1 << 20)
START_WAIT_S = 180.0
STOP_WAIT_S = 10.0
#: environment variables of the caller that must not reach the nodes (they point at another Ray)
_DROPPED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_NODE_IP_ADDRESS")
#: GCS notices a dead node after period × threshold (Ray's defaults: 3 s × 5 after a 10 s timeout)
_HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "2000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "4",
}


def ray_node_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment every lab Ray process (and a job's driver) gets: ``base`` (default this
    process's environment) without Ray addresses, cluster mode on, authentication and usage
    reporting off, this Python's ``bin`` first on PATH (so a job's ``python`` is this one)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _DROPPED}
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
    })  # fmt: skip
    return env


class LabRayCluster:
    """A Ray head and worker nodes in a switch :class:`Lab`'s rank namespaces; see the module docstring.

    ``client``: the rank whose namespace asks the Jobs API (HTTP helpers) and may run a coordinator;
    ``head``: the head's rank; ``nodes``: worker nodes' ranks, ``node_cpus`` CPUs each. ``temp_root``:
    where each node's Ray temp dir goes (default a fresh folder under /tmp, removed on stop)."""

    def __init__(
        self,
        lab: Lab,
        *,
        client: int = 0,
        head: int = 1,
        nodes: Sequence[int] = (2, 3, 4),
        node_cpus: int = 1,
        object_store_bytes: int = OBJECT_STORE_BYTES,
        temp_root: str | Path | None = None,
        start_wait_s: float = START_WAIT_S,
    ) -> None:
        if lab.topology != "switch":
            raise ValueError(f"LabRayCluster needs a switch-topology lab (got {lab.topology!r})")
        ranks = [client, head, *nodes]
        for rank in ranks:
            lab.namespace(rank)  # ValueError naming the rank when the lab has no such rank
        if len(set(ranks)) != len(ranks):
            raise ValueError(
                f"client={client}, head={head}, nodes={list(nodes)}: each rank may hold one role"
            )
        if not nodes:
            raise ValueError("nodes: give at least one worker node rank")
        if isinstance(node_cpus, bool) or not isinstance(node_cpus, int) or node_cpus < 1:
            raise ValueError(f"node_cpus={node_cpus!r}: need a whole number of CPUs >= 1")
        if object_store_bytes < 75 * (1 << 20):
            raise ValueError(f"object_store_bytes={object_store_bytes}: Ray needs at least 75 MiB")
        self.lab = lab
        self.client, self.head, self.nodes = client, head, list(nodes)
        self.node_cpus = node_cpus
        self.object_store_bytes = int(object_store_bytes)
        self.start_wait_s = float(start_wait_s)
        self._own_temp = temp_root is None
        self.temp_root = Path(temp_root) if temp_root else None
        self._procs: dict[int, subprocess.Popen] = {}  # rank -> its `ray start --block`
        self._logs: dict[int, Path] = {}
        self._killed: set[int] = set()
        self._started = False

    # ------------------------------------------------------------------ addresses
    @property
    def head_address(self) -> str:
        return self.lab.addresses[self.head]

    @property
    def gcs_address(self) -> str:
        """What ``ray start --address`` joins: ``HEAD:6379``."""
        return f"{self.head_address}:{GCS_PORT}"

    @property
    def jobs_address(self) -> str:
        """The Jobs API (dashboard): ``http://HEAD:8265``, what ``RAY_ADDRESS`` of a coordinator is."""
        return f"http://{self.head_address}:{JOBS_PORT}"

    def node_address(self, rank: int) -> str:
        return self.lab.addresses[rank]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LabRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LabRayCluster:
        if self._started:
            raise NetlabError("this LabRayCluster was already started (use it once)")
        self._started = True
        if self.temp_root is None:
            self.temp_root = Path(tempfile.mkdtemp(prefix="gwrc-", dir="/tmp"))  # short: Unix sockets
        try:
            self._start_node(self.head)
            self._wait(lambda: self._jobs_api_problem(), "the head's Jobs API")
            for rank in self.nodes:
                self._start_node(rank)
            want = {self.node_address(r) for r in [self.head, *self.nodes]}
            self._wait(lambda: self._nodes_problem(want), f"all {len(want)} nodes alive")
        except BaseException:
            self.stop()
            raise
        return self

    def node_command(self, rank: int, temp_dir: str | Path) -> list[str]:
        """The ``ray start --block ...`` command of the head or of worker node ``rank`` (the commands
        docs/deploy-ray.md shows, plus a temp dir and a small object store)."""
        if rank == self.head:
            role = [
                "--head", f"--port={GCS_PORT}", "--num-cpus=0", f"--node-ip-address={self.head_address}",
                f"--dashboard-host={self.head_address}", f"--dashboard-port={JOBS_PORT}",
                "--include-dashboard=true",
            ]  # fmt: skip
        elif rank in self.nodes:
            role = [
                f"--address={self.gcs_address}", f"--num-cpus={self.node_cpus}",
                f"--node-ip-address={self.node_address(rank)}",
            ]  # fmt: skip
        else:
            raise ValueError(
                f"rank {rank} runs no Ray node of this cluster (head {self.head}, nodes {self.nodes})"
            )
        return [_ray_cli(), "start", "--block", *role, "--disable-usage-stats", f"--temp-dir={temp_dir}",
                f"--object-store-memory={self.object_store_bytes}"]  # fmt: skip

    def _start_node(self, rank: int) -> None:
        assert self.temp_root is not None
        temp = self.temp_root / f"n{rank}"
        temp.mkdir(parents=True, exist_ok=True)
        env = ray_node_env()
        # gloo (torch.distributed on CPU) takes its address from the host name, which on one machine
        # resolves to loopback: name the node's lab interface, as a host with several NICs would
        env["GLOO_SOCKET_IFNAME"] = self.lab.interface(rank)
        if rank == self.head:
            env.update(_HEALTH_CHECK)
        log = self.temp_root / f"ray-start-r{rank}.log"
        self._logs[rank] = log
        with open(log, "wb") as out:
            # only this environment: none of this process's Ray addresses or loopback-only settings
            self._procs[rank] = self.lab.popen(
                rank, self.node_command(rank, temp), env=env, inherit_env=False,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _wait(self, problem, what: str) -> None:
        deadline = time.monotonic() + self.start_wait_s
        while True:
            error = problem()
            if error is None:
                return
            for rank, proc in self._procs.items():
                if rank not in self._killed and proc.poll() is not None:
                    raise NetlabError(
                        f"Ray on rank {rank} ({self.node_address(rank)}) exited with code {proc.returncode} "
                        f"while waiting for {what}; its log ends:\n{self.log_tail(rank)}"
                    )
            if time.monotonic() > deadline:
                raise NetlabError(f"{what}: not ready within {self.start_wait_s:g} s ({error})")
            time.sleep(1.0)

    def _jobs_api_problem(self) -> str | None:
        try:
            version = self.get_json("/api/version", timeout=5)
        except NetlabError as err:
            return str(err)
        return None if isinstance(version, dict) and "ray_version" in version else f"not Ray: {version!r}"

    def _nodes_problem(self, want: set[str]) -> str | None:
        try:
            alive = set(self.alive_nodes())
        except NetlabError as err:
            return str(err)
        missing = want - alive
        if missing:
            return f"nodes not alive yet: {sorted(missing)}"
        # the coordinator reads the cluster's CPUs from the autoscaler's report, which lags the nodes
        cpus = self.reported_cpus()
        want_cpus = self.node_cpus * len([r for r in self.nodes if r not in self._killed])
        return None if cpus == want_cpus else f"/api/cluster_status reports {cpus:g} CPUs, not {want_cpus}"

    def reported_cpus(self) -> float:
        """The cluster's CPUs as ``/api/cluster_status`` (what a coordinator admits jobs by) says now."""
        status = self.get_json("/api/cluster_status")
        usage = ((status.get("data") or {}).get("clusterStatus") or {}).get("loadMetricsReport") or {}
        return float((usage.get("usage") or {}).get("CPU", [0.0, 0.0])[1])

    def stop(self) -> None:
        """Stop every node this object started (worker nodes first), by PID; idempotent."""
        order = [r for r in [*self.nodes, self.head] if r in self._procs]
        for rank in order:
            proc = self._procs[rank]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
        deadline = time.monotonic() + STOP_WAIT_S
        for rank in order:
            proc = self._procs[rank]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        for rank in order:
            self.kill_node(rank, _stopping=True)  # whatever is left in the node's namespace
        self._procs.clear()
        if self._own_temp and self.temp_root is not None:
            shutil.rmtree(self.temp_root, ignore_errors=True)

    def kill_node(self, rank: int, *, _stopping: bool = False) -> list[int]:
        """SIGKILL every process in node ``rank``'s namespace (all started by this object: a machine
        that died). Returns the PIDs killed."""
        if rank not in self._procs:
            raise ValueError(f"rank {rank} runs no Ray node of this cluster")
        if not _stopping:
            self._killed.add(rank)
        pids = netns.namespace_pids(self.lab.namespace(rank))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = self._procs[rank]
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        return pids

    def log_tail(self, rank: int, lines: int = 20) -> str:
        try:
            text = self._logs[rank].read_text(errors="replace")
        except (KeyError, OSError):
            return "(no log)"
        return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"

    # ------------------------------------------------------------------ asking Ray (from the client rank)
    def popen(
        self, argv: Sequence[str], env: Mapping[str, str] | None = None, *, drop: Sequence[str] = (), **kw
    ) -> subprocess.Popen:
        """Start ``argv`` in the client rank's namespace (a coordinator, ``ray job submit``...) with
        :func:`ray_node_env` less the variables whose names start with a prefix in ``drop``, then
        ``env``; the lab stops it when it closes."""
        base = {k: v for k, v in ray_node_env().items() if not k.startswith(tuple(drop))}
        return self.lab.popen(self.client, argv, env={**base, **(env or {})}, inherit_env=False, **kw)

    def http(
        self,
        method: str,
        url: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, str]:
        """One HTTP request sent from the client rank's namespace (a short Python with urllib, so that
        no HTTP tool is needed): ``(status, body text)``. A path (``/api/...``) goes to the Jobs API."""
        if url.startswith("/"):
            url = self.jobs_address + url
        request = {"method": method, "url": url, "headers": dict(headers or {}), "timeout": timeout,
                   "body": None if body is None else json.dumps(body)}  # fmt: skip
        try:
            done = subprocess.run(
                self.lab.command(self.client, [sys.executable, "-c", _HTTP_CLIENT]),
                input=json.dumps(request), capture_output=True, text=True, timeout=timeout + 20,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise NetlabError(f"{method} {url}: no answer within {timeout} s") from err
        if done.returncode != 0:
            raise NetlabError(f"{method} {url}: {done.stderr.strip()[-500:]}")
        status, _, text = done.stdout.partition("\n")
        return int(status), text

    def get_json(self, url: str, headers: Mapping[str, str] | None = None, timeout: float = 30) -> Any:
        status, text = self.http("GET", url, headers=headers, timeout=timeout)
        if status != 200:
            raise NetlabError(f"GET {url}: HTTP {status}: {text[:300]}")
        return json.loads(text)

    def nodes_state(self) -> list[dict[str, Any]]:
        """Ray's state API (``/api/v0/nodes``): every node with ``node_id``, ``node_ip``, ``state``."""
        answer = self.get_json("/api/v0/nodes?limit=1000&detail=true")
        return list(answer["data"]["result"]["result"])

    def alive_nodes(self) -> dict[str, str]:
        """``{node address: node id}`` of the nodes Ray holds ALIVE."""
        return {n["node_ip"]: n["node_id"] for n in self.nodes_state() if n["state"] == "ALIVE"}

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Ray's state API: every actor of ``class_name`` (alive or dead) with its ``node_id``, ``pid``,
        ``job_id`` and ``state``."""
        query = (
            f"limit=10000&detail=true&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
        )
        answer = self.get_json(f"/api/v0/actors?{query}")
        return list(answer["data"]["result"]["result"])


# reads {"method", "url", "headers", "body", "timeout"} on stdin; prints the status, a newline, the body
_HTTP_CLIENT = """
import json, sys, urllib.error, urllib.request
r = json.load(sys.stdin)
data = None if r["body"] is None else r["body"].encode()
headers = dict(r["headers"], **({"Content-Type": "application/json"} if data is not None else {}))
req = urllib.request.Request(r["url"], data=data, headers=headers, method=r["method"])
try:
    with urllib.request.urlopen(req, timeout=r["timeout"]) as answer:
        status, text = answer.status, answer.read().decode("utf-8", "replace")
except urllib.error.HTTPError as err:
    status, text = err.code, err.read().decode("utf-8", "replace")
except (urllib.error.URLError, OSError) as err:
    sys.exit(f"no answer: {err}")
sys.stdout.write(f"{status}\\n{text}")
"""


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if not found:
        raise NetlabError("no `ray` command next to this Python or on PATH (install the 'ray' extra)")
    return found
