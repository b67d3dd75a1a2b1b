"""One coordinator per data folder: ``<data_dir>/coordinator.lock``, held while it runs.

Two coordinators in one folder would share the SQLite store, the embedded Ray head's temp dir
and their jobs' checkpoints: the second one's Ray head collides with the first's ("timed out
waiting for file ...gcs_server_port") or, worse, starts and its jobs lose their metrics. So the
coordinator takes an exclusive ``flock`` on the lock file first and writes its PID into it; a
second one is refused at once, naming the PID and the folder. The lock goes with the process
(the kernel drops it when the file is closed, a crash included), so a stale file never blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["AlreadyRunning", "InstanceLock"]


class AlreadyRunning(RuntimeError):
    """Another coordinator holds the data folder's lock."""


class InstanceLock:
    """The exclusive lock of one data folder (``acquire`` / ``release``, or a ``with`` block)."""

    NAME = "coordinator.lock"

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir).resolve() / self.NAME
        self._file = None

    def acquire(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open while the coordinator runs)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise AlreadyRunning(
                f"another gradwire coordinator (PID {holder}) is already running in {self.path.parent} "
                f"(it holds {self.path}); stop it, or run this one in another folder or with "
                "another data folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is None:
            return
        with contextlib.suppress(OSError):
            handle.seek(0)
            handle.truncate()
        handle.close()  # closing drops the flock

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
