"""Low-level steps on network namespaces: run ``ip``/``tc``, list, empty and delete namespaces.

Every command that changes something names a namespace (``ip -n NS ...``, ``tc -n NS ...``); the only
commands that act in the machine's own namespace are ``ip netns add/del`` of the lab's own names, so
the machine's interfaces and qdiscs are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

NS_PREFIX = "gwnl-"
_NS_NAME_RE = re.compile(r"^(?P<lab>[0-9a-f]{6})-(?P<pid>[0-9]+)-(?P<role>sw|shared|r[0-9]+)$")


class NetlabError(RuntimeError):
    """A lab could not be built, a rank failed or timed out, or cleanup left something behind.

    ``rank``, ``returncode`` and ``stderr_tail`` are set when a rank failed; ``returncodes`` holds every
    rank's exit code (None: it was still running and got killed) when ranks were running."""

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        returncode: int | None = None,
        stderr_tail: str = "",
        returncodes: list[int | None] | None = None,
    ) -> None:
        super().__init__(message)
        self.rank = rank
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.returncodes = returncodes


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise NetlabError(f"`{name}` not found: netlab needs iproute2 (`apt-get install iproute2`)")
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        raise NetlabError(
            f"netlab needs root to create network namespaces and shape links (effective uid is "
            f"{os.geteuid()}); run it as root, e.g. `sudo .venv/bin/python -m benchmarks.netlab ...`"
        )


def run(args: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run one ``ip``/``tc``/... command; with ``check`` a failure raises NetlabError with its stderr."""
    try:
        # own session: a Ctrl-C at the terminal reaches this process (which cleans up), not the `ip`
        # commands that the cleanup itself runs
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"`{' '.join(args)}` did not finish within {timeout}s") from exc
    if check and proc.returncode != 0:
        said = proc.stderr.strip() or proc.stdout.strip()
        raise NetlabError(f"`{' '.join(args)}` failed (exit {proc.returncode}): {said}")
    return proc


def add_namespace(name: str) -> None:
    proc = run([tool("ip"), "netns", "add", name], check=False)
    if proc.returncode == 0:
        return
    err = proc.stderr.strip()
    if "permitted" in err.lower() or "permission" in err.lower():
        raise NetlabError(
            f"cannot create network namespaces here: `ip netns add {name}` said {err!r}. netlab needs "
            "root with CAP_SYS_ADMIN and CAP_NET_ADMIN (a container may need --privileged or "
            "--cap-add SYS_ADMIN --cap-add NET_ADMIN)"
        )
    raise NetlabError(f"`ip netns add {name}` failed (exit {proc.returncode}): {err}")


def list_namespaces() -> list[str]:
    """Names from ``ip netns list`` (each line is ``NAME`` or ``NAME (id: N)``)."""
    out = run([tool("ip"), "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    proc = run([tool("ip"), "netns", "pids", name], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); it holds no namespace any more
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pids(pids: Sequence[int], grace: float = 2.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the pids still alive at the end."""
    own = os.getpid()
    pids = [p for p in pids if p != own]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if not pids:
                return []
            time.sleep(0.02)
    return [p for p in pids if _alive(p)]


def empty_namespace(name: str, grace: float = 2.0) -> list[int]:
    """Kill every process whose network namespace is ``name``; returns any that survived."""
    return kill_pids(namespace_pids(name), grace)


def delete_namespace(name: str) -> None:
    run([tool("ip"), "netns", "del", name], check=False)


def parse_name(name: str, prefix: str = NS_PREFIX) -> dict[str, str] | None:
    """``gwnl-1a2b3c-4242-r0`` -> {'lab': '1a2b3c', 'pid': '4242', 'role': 'r0'}; None if not a lab name."""
    if not name.startswith(prefix):
        return None
    match = _NS_NAME_RE.match(name[len(prefix):])
    return match.groupdict() if match else None


def cleanup_leftovers(prefix: str = NS_PREFIX, force: bool = False) -> tuple[list[str], list[str]]:
    """Remove namespaces that labs left behind (e.g. after SIGKILL): only names of the form
    ``{prefix}LABID-PID-ROLE``; a lab whose owning process (PID) is still running is kept unless
    ``force``. Processes inside a removed namespace are killed first. Returns (removed, kept)."""
    require_root()
    removed: list[str] = []
    kept: list[str] = []
    for name in list_namespaces():
        parts = parse_name(name, prefix)
        if parts is None:
            continue
        owner = int(parts["pid"])
        if not force and _alive(owner):
            kept.append(name)
            continue
        empty_namespace(name)
        delete_namespace(name)
        removed.append(name)
    left = set(list_namespaces()) & set(removed)
    if left:
        raise NetlabError(f"could not remove namespaces: {', '.join(sorted(left))}")
    return removed, kept


def support_problem() -> str | None:
    """Why labs cannot run here (not root, no iproute2, namespaces not permitted), or None if they can.
    Probes by creating and deleting one namespace of the lab's own form."""
    try:
        require_root()
        tool("tc")
        name = f"{NS_PREFIX}{os.getpid() % 0xFFFFFF:06x}-{os.getpid()}-r0"
        add_namespace(name)
        delete_namespace(name)
    except NetlabError as exc:
        return str(exc)
    return None
