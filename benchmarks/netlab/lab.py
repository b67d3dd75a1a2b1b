"""``Lab``: ranks in network namespaces behind links of a given rate, removed again on every exit path.

Topologies (docs/netlab.md):

* ``switch``: a namespace ``...-sw`` holds a Linux bridge; rank i has its own namespace ``...-r{i}`` with
  one veth whose peer is a port of the bridge. Both directions are shaped: the rank-side veth's egress
  (the rank's upload) and the bridge port's egress (the rank's download), so every rank has its own
  full-duplex link of the rate, as hosts on a switch do.
* ``shared``: one namespace ``...-shared`` whose ``lo`` is shaped; every rank runs in it on 127.0.0.1,
  so every byte between any two ranks crosses that one link (a congested uplink).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

from benchmarks.netlab import netns
from benchmarks.netlab.netns import NS_PREFIX, NetlabError
from benchmarks.netlab.shaping import QDISCS, Shape, parse_rate

TOPOLOGIES = ("switch", "shared")
MAX_WORKERS = 1000
SUBNET = "10.211"  # switch topology: 10.211.0.0/16, rank i at the (i+1)-th host address
_STDERR_TAIL = 2000
_FREE_PORT = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"


class Lab:
    """``with Lab(workers=4, rate="100mbit", topology="switch") as lab: lab.run_ranks([...])``."""

    def __init__(
        self,
        workers: int,
        rate: str | int | None = None,
        topology: str = "switch",
        *,
        qdisc: str = "tbf",
        prefix: str = NS_PREFIX,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers={workers!r}: need an integer from 1 to {MAX_WORKERS}")
        if topology not in TOPOLOGIES:
            raise ValueError(f"topology={topology!r}: must be one of {', '.join(TOPOLOGIES)}")
        if qdisc not in QDISCS:
            raise ValueError(f"qdisc={qdisc!r}: must be one of {', '.join(QDISCS)}")
        if not prefix or not all(c.isalnum() or c in "-_" for c in prefix):
            raise ValueError(f"prefix={prefix!r}: use letters, digits, '-' or '_'")
        self.workers = workers
        self.rate_bits = parse_rate(rate)
        self.topology = topology
        self.shape = None if self.rate_bits is None else Shape.for_rate(self.rate_bits, qdisc)
        self.prefix = prefix
        self.lab_id = secrets.token_hex(3)
        base = f"{prefix}{self.lab_id}-{os.getpid()}"
        short = f"nl{self.lab_id}"  # interface names: at most 15 characters
        if topology == "switch":
            self.switch_ns: str | None = f"{base}-sw"
            self.bridge = f"{short}br"
            self._namespaces = [f"{base}-r{i}" for i in range(workers)]
            self._interfaces = [f"{short}r{i}" for i in range(workers)]
            self._ports = [f"{short}p{i}" for i in range(workers)]
            self.addresses = [f"{SUBNET}.{(i + 1) // 256}.{(i + 1) % 256}" for i in range(workers)]
        else:
            self.switch_ns = None
            self.bridge = None
            self._namespaces = [f"{base}-shared"] * workers
            self._interfaces = ["lo"] * workers
            self._ports = []
            self.addresses = ["127.0.0.1"] * workers
        self.master_addr = self.addresses[0]
        self._created: list[str] = []  # namespaces, in creation order
        self._shaped: list[tuple[str, str]] = []  # (namespace, device) carrying a root qdisc
        self._links: list[tuple[str, str]] = []  # (namespace, device) veth/bridge created
        self._children: list[subprocess.Popen] = []
        self._saved_handlers: dict[int, object] = {}
        self._state = "new"  # new -> open -> closing -> closed

    # ------------------------------------------------------------------ queries
    def namespaces(self) -> list[str]:
        """Every namespace this lab creates (switch namespace first)."""
        names = [self.switch_ns] if self.switch_ns else []
        return names + sorted(set(self._namespaces), key=self._namespaces.index)

    def namespace(self, rank: int) -> str:
        return self._namespaces[self._rank(rank)]

    def interface(self, rank: int) -> str:
        return self._interfaces[self._rank(rank)]

    def command(self, rank: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``rank``'s namespace (``ip netns exec NS argv...``)."""
        argv = list(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"argv={argv!r}: need a non-empty list of strings")
        return [netns.tool("ip"), "netns", "exec", self.namespace(rank), *argv]

    def describe(self) -> str:
        link = self.shape.describe() if self.shape else "unshaped"
        return f"lab {self.lab_id}: {self.workers} ranks, {self.topology} topology, {link}"

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.workers:
            raise ValueError(f"rank={rank!r}: this lab has ranks 0..{self.workers - 1}")
        return rank

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_errors=exc_type is None)

    def open(self) -> Lab:
        if self._state != "new":
            raise NetlabError(f"lab {self.lab_id} was already opened (a Lab is used once)")
        netns.require_root()
        netns.tool("tc")
        self._install_handlers()
        self._state = "open"
        try:
            if self.topology == "switch":
                self._build_switch()
            else:
                self._build_shared()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def _ip(self, ns: str, *args: str) -> None:
        netns.run([netns.tool("ip"), "-n", ns, *args])

    def _add_ns(self, ns: str) -> None:
        netns.add_namespace(ns)
        self._created.append(ns)
        self._ip(ns, "link", "set", "lo", "up")

    def _no_ipv6(self, ns: str) -> None:
        # no IPv6 on the lab's links: no router solicitations on the shaped links, and gloo cannot pick
        # a link-local address for GLOO_SOCKET_IFNAME
        netns.run([netns.tool("ip"), "netns", "exec", ns, "sysctl", "-q", "-w",
                   "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=False)

    def _shape(self, ns: str, dev: str) -> None:
        if self.shape is None:
            return
        self._shaped.append((ns, dev))
        for args in self.shape.tc_commands(dev):
            netns.run([netns.tool("tc"), "-n", ns, *args])

    def _build_switch(self) -> None:
        sw = self.switch_ns
        assert sw is not None and self.bridge is not None
        self._add_ns(sw)
        self._no_ipv6(sw)
        self._ip(sw, "link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._links.append((sw, self.bridge))
        self._ip(sw, "link", "set", self.bridge, "up")
        for rank in range(self.workers):
            ns, dev, port = self._namespaces[rank], self._interfaces[rank], self._ports[rank]
            self._add_ns(ns)
            self._no_ipv6(ns)
            # created inside the switch namespace, the rank end moved straight into the rank's namespace:
            # the pair never appears in the machine's own namespace
            self._ip(sw, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns)
            self._links.append((sw, port))
            self._ip(sw, "link", "set", port, "master", self.bridge)
            self._ip(sw, "link", "set", port, "up")
            self._ip(ns, "addr", "add", f"{self.addresses[rank]}/16", "dev", dev)
            self._ip(ns, "link", "set", dev, "up")
            self._shape(ns, dev)  # the rank's upload
            self._shape(sw, port)  # the rank's download
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for rank in range(self.workers):
            ns, dev = self._namespaces[rank], self._interfaces[rank]
            while True:
                out = netns.run([netns.tool("ip"), "-n", ns, "-o", "link", "show", dev]).stdout
                if "LOWER_UP" in out:
                    break
                if time.monotonic() > deadline:
                    raise NetlabError(f"{dev} in {ns} did not come up within {timeout}s: {out.strip()}")
                time.sleep(0.02)

    def _build_shared(self) -> None:
        ns = self._namespaces[0]
        self._add_ns(ns)
        self._shape(ns, "lo")

    def close(self, raise_errors: bool = True) -> None:
        """Kill the lab's processes and remove its qdiscs, links and namespaces; idempotent. If something
        survives, raises NetlabError (``raise_errors``) or says so on stderr."""
        if self._state in ("new", "closed", "closing"):
            self._state = "closed" if self._state == "new" else self._state
            return
        self._state = "closing"  # signals arriving now are noted, not raised: cleanup must finish
        problems: list[str] = []
        try:
            self._kill_children()
            # every name this lab may have created, also one whose `ip netns add` was interrupted just
            # after it succeeded (the names carry this lab's random id and pid: nobody else's)
            existing = set(netns.list_namespaces())
            untracked = [n for n in self.namespaces() if n in existing and n not in self._created]
            created = self._created + untracked
            for ns in reversed(created):
                survivors = netns.empty_namespace(ns)
                if survivors:
                    problems.append(f"processes {survivors} in {ns} survived SIGKILL")
            for ns, dev in reversed(self._shaped):
                netns.run([netns.tool("tc"), "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
            for ns, dev in reversed(self._links):
                netns.run([netns.tool("ip"), "-n", ns, "link", "del", dev], check=False)
            for ns in reversed(created):
                netns.delete_namespace(ns)
            left = set(created) & set(netns.list_namespaces())
            if left:
                problems.append(f"namespaces still present: {', '.join(sorted(left))}")
        finally:
            self._state = "closed"
            self._restore_handlers()
        if problems:
            msg = f"netlab {self.lab_id}: cleanup incomplete ({'; '.join(problems)}); " \
                  f"try `python -m benchmarks.netlab --cleanup --force`"
            if raise_errors:
                raise NetlabError(msg)
            print(msg, file=sys.stderr)

    def _kill_children(self) -> None:
        for proc in self._children:
            if proc.poll() is None:
                _kill_group(proc)
        self._children = [p for p in self._children if p.poll() is None]

    # ------------------------------------------------------------------ signals
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the with-block still cleans up
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._state != "open":
            return  # during cleanup: finish it; the exception already on its way ends the program
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _restore_handlers(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._saved_handlers = {}

    # ------------------------------------------------------------------ running things
    def _require_open(self) -> None:
        if self._state != "open":
            raise NetlabError(f"lab {self.lab_id} is not open (use it inside `with Lab(...) as lab:`)")

    def popen(self, rank: int, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
              inherit_env: bool = True, **kw) -> subprocess.Popen:
        """Start ``argv`` in ``rank``'s namespace. ``env`` is added to (not a replacement for) this
        process's environment; with ``inherit_env=False`` it is the whole environment. The child gets
        its own session (so it and its children can be killed as a group); the lab kills it, and
        anything else left in its namespaces, when it closes."""
        self._require_open()
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update(env or {})
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(rank, argv), env=full_env, **kw)
        self._children.append(proc)
        return proc

    def free_port(self, rank: int = 0) -> int:
        """A TCP port that is free in ``rank``'s namespace right now."""
        self._require_open()
        out = netns.run(self.command(rank, [sys.executable, "-c", _FREE_PORT])).stdout
        return int(out.strip())

    def rank_env(self, rank: int, port: int) -> dict[str, str]:
        return {
            "RANK": str(rank), "WORLD_SIZE": str(self.workers), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": self.interface(rank),
        }

    def run_ranks(self, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 600,
                  capture: bool = True) -> list[subprocess.CompletedProcess]:
        """Run ``argv`` once per rank, each in its namespace, with RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT (free in rank 0's namespace) and GLOO_SOCKET_IFNAME set (``env`` on
        top). Waits for all. If a rank exits non-zero, or ``timeout`` seconds pass, the others are
        killed and NetlabError says which rank, its exit code and its stderr's tail. With ``capture``
        stdout/stderr are returned (text); without, they go to this process's stdout/stderr."""
        self._require_open()
        if not timeout or timeout <= 0:
            raise ValueError(f"timeout={timeout!r}: must be a positive number of seconds")
        port = self.free_port(0)
        with tempfile.TemporaryDirectory(prefix="netlab-") as tmp:
            outs, errs, procs = [], [], []
            try:
                for rank in range(self.workers):
                    out = open(os.path.join(tmp, f"{rank}.out"), "w+") if capture else None  # noqa: SIM115
                    err = open(os.path.join(tmp, f"{rank}.err"), "w+") if capture else None  # noqa: SIM115
                    outs.append(out)
                    errs.append(err)
                    env_r = {**self.rank_env(rank, port), **(env or {})}
                    procs.append(self.popen(rank, argv, env=env_r, stdout=out, stderr=err))
                failure = _wait_all(procs, timeout)
            finally:
                for proc in procs:
                    if proc.poll() is None:
                        _kill_group(proc)
                codes = [p.returncode for p in procs]
                texts = [(_read(o), _read(e)) for o, e in zip(outs, errs)]
                for fh in outs + errs:
                    if fh is not None:
                        fh.close()
        if failure is not None:
            rank, reason = failure
            tail = texts[rank][1][-_STDERR_TAIL:] if rank is not None else ""
            detail = f"\nrank {rank} stderr (tail):\n{tail}" if tail else ""
            raise NetlabError(
                f"{reason}; exit codes by rank: {codes}{detail}",
                rank=rank, returncode=codes[rank] if rank is not None else None, stderr_tail=tail,
                returncodes=codes,
            )
        return [
            subprocess.CompletedProcess(self.command(r, argv), codes[r], texts[r][0], texts[r][1])
            for r in range(self.workers)
        ]

    def __repr__(self) -> str:
        return f"Lab({self.describe()}, {self._state})"


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> tuple[int | None, str] | None:
    """Poll until every process ended (None) or one failed / time ran out: (failing rank, reason)."""
    deadline = time.monotonic() + timeout
    while True:
        running = False
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code is None:
                running = True
            elif code != 0:
                return rank, f"rank {rank} exited with code {code}"
        if not running:
            return None
        if time.monotonic() > deadline:
            late = [r for r, p in enumerate(procs) if p.poll() is None]
            return None, f"ranks {late} still running after {timeout}s (timeout); killed them"
        time.sleep(0.02)


def _kill_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM to the child's process group (its session), SIGKILL after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(5)


def _read(fh) -> str | None:
    if fh is None:
        return None
    fh.flush()
    fh.seek(0)
    return fh.read()

