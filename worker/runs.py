"""Which Ray Train run a job trains in, whose checkpoints it may continue, and from where.

Torch- and ray-free.

Ray Train continues a run it finds under ``<checkpoint.storage>/<run name>`` (its
``checkpoint_manager_snapshot.json``): ``ray.train.get_checkpoint()`` hands the newest checkpoint to
the train loop. So the run name decides whose checkpoints a job continues:

* a coordinator job's run is named by its job id (:func:`run_name`), so no other job, whatever it
  is called, can land in its folder;
* ``gradwire train`` names the run by the spec's name and writes :data:`RUN_RECORD` beside the
  checkpoints: the spec and its :func:`fingerprint`. :func:`check_run` refuses a folder that
  already holds a run unless the caller asks to resume it (``--resume``); the refusal names the
  fields in which the two specs differ;
* continuing another run is explicit: a spec's ``resume_from`` (a job id the coordinator turns into
  that job's run folder, or a path) is resolved by :func:`resolve_checkpoint` to one checkpoint
  folder, which the train loop loads when its own run has none yet.

Local paths use the file system directly; URIs (``s3://``, ``gs://``, ...) go through pyarrow's
file systems, as Ray Train's storage does.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradwire.spec import JobSpec, Problem, SpecError

__all__ = [
    "NOT_TRAINING",
    "RUN_RECORD",
    "RunConflict",
    "check_run",
    "differences",
    "fingerprint",
    "resolve_checkpoint",
    "run_name",
    "training_view",
    "write_record",
]

#: the file beside Ray Train's checkpoints that says which spec the run trains
RUN_RECORD = "gradwire-run.json"
#: Ray Train's record of a run's checkpoints; with it, Ray Train continues the run
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"
PROGRESS = "progress.json"  # in every gradwire checkpoint (worker/runtime.py: report)

#: Spec fields left out of the fingerprint: they change neither the trajectory nor the result.
#: ``name`` finds the run; ``resume_from`` is only where a run starts, its own checkpoints take over;
#: ``checkpoint`` is when and where state is saved (resume is exact); ``evaluation`` runs on the test
#: split without gradients, and every step sets train mode again. Everything else counts, including
#: ``workers`` (CPU threads and devices change floating-point results) and ``steps`` (a schedule's
#: length changes its learning rates).
NOT_TRAINING = ("name", "resume_from", "checkpoint", "evaluation")


class RunConflict(RuntimeError):
    """The run folder already holds a run (or holds none to resume); the message says what to do."""


def run_name(spec: JobSpec, job_id: str | None = None) -> str:
    """The Ray Train run (folder under ``checkpoint.storage``): the job id if given, else the spec's name."""
    return job_id or spec.name


def training_view(spec: JobSpec) -> dict[str, Any]:
    """The spec as it bears on training: JSON, defaults filled in (the compressor's too), without
    :data:`NOT_TRAINING`."""
    data = spec.model_dump(mode="json")
    for field in NOT_TRAINING:
        data.pop(field, None)
    data["compression"] = {"name": spec.compression.name, **spec.compressor_config().model_dump(mode="json")}
    return data


def fingerprint(spec: JobSpec) -> str:
    """``sha256:`` of :func:`training_view` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(training_view(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``field: old → new`` for every dotted field that differs between two training views."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    missing = object()
    out = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        if a != b:
            shown = ["(unset)" if v is missing else json.dumps(v) for v in (a, b)]
            out.append(f"{key}: {shown[0]} → {shown[1]}")
    return out


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


# --- the run folder -----------------------------------------------------------------------------


def check_run(folder: str, spec: JobSpec, *, resume: bool) -> list[str]:
    """Refuse to train ``spec`` in ``folder`` unless that is what the caller asked for.

    Without ``resume``, a folder that holds a run (Ray Train's snapshot or a checkpoint) raises
    :class:`RunConflict`, naming the fields in which the recorded spec differs from ``spec``; with
    ``resume``, a folder without a run raises. Returns the differences (empty when the specs
    agree or the run recorded none) when resuming.
    """
    store = _Storage(folder)
    steps = [s for s, _ in store.checkpoints()]
    exists = bool(steps) or store.exists(RAY_SNAPSHOT)
    reached = f"checkpoints up to step {max(steps)}" if steps else "no complete checkpoint"
    record = store.read_json(RUN_RECORD)
    changed = differences(record["training"], training_view(spec)) if record else []
    fresh = (
        "to start fresh, give the run another name (--set name=...) or another "
        "checkpoint.storage, or delete the folder"
    )
    if not exists:
        if resume:
            raise RunConflict(
                f"--resume: there is no run to resume in {folder} (no checkpoint); "
                "leave out --resume to start it, or set resume_from to start from another run's checkpoint"
            )
        return []
    if resume:
        return changed
    if record is None:
        what = f"checkpoints of a run whose spec was not recorded ({reached})"
    elif changed:
        what = f"run {record.get('run', '?')!r} ({reached}) of a different spec:\n  " + "\n  ".join(changed)
    else:
        what = f"run {record.get('run', '?')!r} of this same spec ({reached})"
    raise RunConflict(
        f"{folder} already holds {what}\nRay Train would continue that run instead of starting this one. "
        f"Pass --resume to continue it{' with this spec' if changed else ''}; {fresh}."
    )


def write_record(folder: str, spec: JobSpec, name: str) -> None:
    """Write :data:`RUN_RECORD` (the run's name, fingerprint, training view and whole spec)."""
    record = {
        "run": name,
        "fingerprint": fingerprint(spec),
        "training": training_view(spec),
        "spec": spec.model_dump(mode="json"),
    }
    _Storage(folder).write_text(RUN_RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n")


def resolve_checkpoint(path: str) -> str:
    """The checkpoint folder ``resume_from`` stands for: ``path`` itself if it is one (it holds
    ``progress.json``), else the furthest checkpoint (highest step, then newest name) of the run
    folder ``path``. Raises :class:`SpecError` at ``resume_from``."""
    store = _Storage(path)
    if store.exists(PROGRESS):
        return store.root
    found = store.checkpoints()
    if not found:
        why = "does not exist" if not store.exists("") else "holds no gradwire checkpoint (progress.json)"
        message = f"{path} {why}; give a run folder with checkpoint_* folders, or one of them"
        raise SpecError([Problem("resume_from", message)])
    _, best = max(found)
    return store.join(best)


class _Storage:
    """The few file operations needed on a local folder or a pyarrow URI."""

    def __init__(self, root: str) -> None:
        self.uri = "://" in root
        if self.uri:
            import pyarrow.fs

            self.fs, self.path = pyarrow.fs.FileSystem.from_uri(root)
            self.root = root.rstrip("/")
        else:
            self.root = str(Path(root).resolve())

    def join(self, name: str) -> str:
        return f"{self.root}/{name}" if self.uri else str(Path(self.root) / name)

    def _fs_path(self, name: str) -> str:
        return posixpath.join(self.path, name) if name else self.path

    def exists(self, name: str) -> bool:
        if not self.uri:
            return Path(self.root, name).exists()
        import pyarrow.fs

        return self.fs.get_file_info(self._fs_path(name)).type != pyarrow.fs.FileType.NotFound

    def read_json(self, name: str) -> dict[str, Any] | None:
        if not self.exists(name):
            return None
        if self.uri:
            with self.fs.open_input_stream(self._fs_path(name)) as f:
                text = f.read().decode()
        else:
            text = Path(self.root, name).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_text(self, name: str, text: str) -> None:
        if self.uri:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(self._fs_path(name)) as f:
                f.write(text.encode())
            return
        target = Path(self.root, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)

    def _subfolders(self) -> list[str]:
        if not self.uri:
            root = Path(self.root)
            return [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        import pyarrow.fs

        if not self.exists(""):
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        return [posixpath.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.Directory]

    def checkpoints(self) -> list[tuple[int, str]]:
        """(step, folder name) of every complete gradwire checkpoint in this run folder."""
        found = []
        for name in self._subfolders():
            if not name.startswith(CHECKPOINT_PREFIX):
                continue
            progress = self.read_json(f"{name}/{PROGRESS}")
            if progress is not None and isinstance(progress.get("step"), int):
                found.append((progress["step"], name))
        return found
