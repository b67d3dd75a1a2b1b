"""What `gradwire train` shows on the console: a progress bar while the job runs, a summary after.

The progress bar follows rank 0's telemetry file (``telemetry-rank0.jsonl`` in the run folder,
written by the workers' :class:`~gradwire.worker.telemetry.JsonlSink`), so it needs no channel
of its own to the workers; when the folder is not on this machine (a remote cluster with remote
storage) the bar simply stays empty. Nothing here imports torch or ray.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class TelemetryProgress:
    """A rich progress bar of steps and loss, fed by tailing a JSONL telemetry file."""

    def __init__(self, path: Path, total: int | None, console: Console, poll_s: float = 0.5) -> None:
        self.path, self.poll_s = path, poll_s
        self._offset = path.stat().st_size if path.exists() else 0  # only this run's lines
        self._stop = threading.Event()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task("training", total=total, loss="-")
        self._thread = threading.Thread(target=self._follow, name="gradwire-progress", daemon=True)

    def __enter__(self) -> TelemetryProgress:
        self._progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()
        self._progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read()

    def _read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        last = None
        for line in complete.splitlines():
            try:
                last = json.loads(line)
            except ValueError:
                continue
        if last is not None:
            loss = last.get("loss")
            shown = f"{loss:.4f}" if isinstance(loss, float) else "-"
            self._progress.update(self._task, completed=int(last.get("step", 0)), loss=shown)


def summary(name: str, metrics: dict[str, Any]) -> Table:
    """The end-of-job table: steps, loss and accuracy, time per phase, bytes and their ratio.

    Rows whose metric is absent (a coordinator's time series has no checkpoint path, say) are left out.
    """
    sent, plain = metrics.get("bytes_sent", 0), metrics.get("bytes_uncompressed", 0)
    rows: list[tuple[str, str, Any]] = [
        ("steps", "step", "{}"),
        ("resumed from step", "start_step", "{}"),
        ("final loss", "loss", "{:.4f}"),
        ("test loss", "eval_loss", "{:.4f}"),
        ("test accuracy", "accuracy", "{:.4f}"),
        ("wall time (train loop)", "wall_seconds", "{:.2f} s"),
        ("compute time", "compute_seconds", "{:.3f} s"),
        ("compress time", "compress_seconds", "{:.3f} s"),
        ("communicate time", "communicate_seconds", "{:.3f} s"),
        ("straggler wait time", "wait_seconds", "{:.3f} s"),
        ("stragglers left out", "stragglers", "{}"),
        ("bytes sent (rank 0)", "bytes_sent", "{:,}"),
        ("bytes uncompressed", "bytes_uncompressed", "{:,}"),
    ]
    stopped = metrics.get("stopped")
    table = Table(title=f"{name} — {'STOPPED' if stopped else 'done'}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for label, key, form in rows:
        if key in metrics:
            table.add_row(label, form.format(metrics[key]))
    if "bytes_sent" in metrics:
        table.add_row("compression ratio", f"{plain / sent:.2f}x" if sent else "n/a")
    if "telemetry_sent" in metrics:
        table.add_row(
            "telemetry sent / dropped", f"{metrics['telemetry_sent']} / {metrics.get('telemetry_dropped', 0)}"
        )
    if "checkpoint" in metrics:
        table.add_row("checkpoint", str(metrics["checkpoint"]))
    if stopped:
        table.add_row("stopped because", str(stopped))
    return table
