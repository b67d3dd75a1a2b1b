"""How gradwire runs a single-machine Ray that listens on loopback only (torch-free).

Facts measured on Ray 2.60 (see docs/runtime.md, "Ray on one machine"):

* Ray binds the machine's external address and ``0.0.0.0`` unless the environment holds
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` *and* ``ray.init`` gets ``_node_ip_address="127.0.0.1"``;
  either one alone is not enough.
* Ray 2.60 turns token authentication on by default; ``RAY_AUTH_MODE=disabled`` turns it off for a
  cluster that nobody else can reach.
* ``RAY_USAGE_STATS_ENABLED=0`` stops usage reporting (there is no internet here anyway).
* Ray reads some of these when ``ray`` is first imported, so they must be in ``os.environ`` before
  that import: call :func:`apply_local_ray_env` first.
* Unix socket paths are limited to about 107 bytes and Ray nests session folders in its temp dir,
  so :func:`ray_temp_dir` uses the project folder only when its path is short.

Only for a Ray that stays on this machine: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes every Ray
process report 127.0.0.1 as its node address, which is wrong on a multi-node cluster.

Both the worker runtime (``gradwire.worker.launch``) and the coordinator
(``gradwire.server.ray_cluster``) use this module; it imports neither torch nor ray.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["LOOPBACK", "apply_local_ray_env", "local_ray_env", "ray_temp_dir"]

LOOPBACK = "127.0.0.1"

_MAX_TEMP_DIR_CHARS = 48


def local_ray_env() -> dict[str, str]:
    """Environment for a loopback-only Ray without authentication or usage reporting."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def apply_local_ray_env(*, override: bool = False) -> dict[str, str]:
    """Put :func:`local_ray_env` into ``os.environ`` (keeping values already set unless
    ``override``); returns what the environment now holds for those keys."""
    for key, value in local_ray_env().items():
        if override:
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in local_ray_env()}


def ray_temp_dir(base: str | Path = ".gradwire/ray") -> str:
    """A temp dir for Ray's session folders: ``base`` (resolved) when its path is short enough for
    Ray's Unix sockets, else a per-user folder under the system temp dir."""
    inside = Path(base).resolve()
    if len(str(inside)) <= _MAX_TEMP_DIR_CHARS:
        return str(inside)
    return str(Path(tempfile.gettempdir()) / f"gw-ray-{os.getuid()}")
