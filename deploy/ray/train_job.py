"""Entry script for `ray submit`: train one gradwire job spec on the Ray cluster it runs in.

    ray submit deploy/ray/cluster.yaml deploy/ray/train_job.py -- \\
        examples/specs/digits-powersgd.yaml [--workers N] [--set key=value]... [--check]

`ray submit` copies this file to the head node's home directory and runs it there with the
head's `python`, so it imports nothing from the repository by path: gradwire is the package
that cluster.yaml's setup_commands installed. The spec path is used as given if it exists,
else relative to the repository copy that cluster.yaml mounts (GRADWIRE_REPO, default
~/gradwire). The job then runs through `gradwire train SPEC --address auto`, which joins the
Ray instance running on this node instead of starting one.

`--check` only validates the spec and the overrides and prints a one-line summary; it never
imports Ray, so it also works on a laptop. A bad spec exits with status 2 and names each
offending field, as `gradwire train` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: where cluster.yaml's file_mounts put the repository (keep the two in step)
DEFAULT_REPO = "~/gradwire"
REPO_ENV = "GRADWIRE_REPO"


def repo_root() -> Path:
    """The repository copy on this node: $GRADWIRE_REPO, else ~/gradwire."""
    return Path(os.environ.get(REPO_ENV) or DEFAULT_REPO).expanduser()


def resolve_spec(given: str, repo: Path) -> Path:
    """``given`` if it names a file, else the same relative path inside ``repo``.

    Raises FileNotFoundError naming every place that was tried.
    """
    path = Path(given).expanduser()
    tried = [path]
    if path.is_file():
        return path
    if not path.is_absolute():
        in_repo = repo / path
        tried.append(in_repo)
        if in_repo.is_file():
            return in_repo
    raise FileNotFoundError(
        f"spec {given!r} not found; tried {', '.join(str(p) for p in tried)} "
        f"(set {REPO_ENV} to where the repository is mounted)"
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train_job.py",
        description="Run a gradwire job spec on the Ray cluster this node belongs to.",
    )
    parser.add_argument("spec", help="job spec (.yaml, .yml or .json), as given or relative to the repo")
    parser.add_argument("--workers", type=int, metavar="N", help="same as --set workers.count=N")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field (dotted key, YAML value); repeatable",
    )
    parser.add_argument(
        "--address", default="auto", help="Ray cluster to join (default: auto, the one on this node)"
    )
    parser.add_argument("--check", action="store_true", help="validate the spec and exit; no Ray")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    return args


def overrides_of(args: argparse.Namespace) -> list[str]:
    """--set values, then --workers as workers.count (the order `gradwire train` applies)."""
    extra = [f"workers.count={args.workers}"] if args.workers is not None else []
    return [*args.overrides, *extra]


def check(spec_path: Path, overrides: list[str]) -> int:
    """Validate without Ray; print a summary line (exit 0) or the field-named problems (exit 2)."""
    from gradwire.spec import JobSpec, SpecError  # torch- and Ray-free

    try:
        spec = JobSpec.from_file(spec_path).with_overrides(overrides)
    except (SpecError, OSError) as err:
        print(f"{spec_path}: {err}", file=sys.stderr)
        return 2
    length = f"{spec.steps} steps" if spec.steps is not None else f"{spec.epochs} epochs"
    coding = f", stragglers {spec.stragglers.code}" if spec.stragglers is not None else ""
    print(
        f"{spec.name}: ok ({spec_path}): {spec.model.name} on {spec.data.dataset}, "
        f"{spec.workers.count} workers, compression {spec.compression.name}{coding}, {length}"
    )
    return 0


def train(spec_path: Path, overrides: list[str], address: str) -> int:
    """Hand over to the gradwire CLI's train command (validation, resource check, summary)."""
    from gradwire.cli import app

    argv = ["train", str(spec_path), "--address", address]
    for override in overrides:
        argv += ["--set", override]
    try:
        app(args=argv, prog_name="gradwire")
    except SystemExit as done:  # Typer ends with SystemExit, 0 on success
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import gradwire  # noqa: F401
    except ImportError:
        print(
            f"gradwire is not installed for {sys.executable}; run `ray up deploy/ray/cluster.yaml` "
            "(its setup_commands install it) or `pip install -e '.[train,examples]'`",
            file=sys.stderr,
        )
        return 2
    try:
        spec_path = resolve_spec(args.spec, repo_root())
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    if args.check:
        return check(spec_path, overrides_of(args))
    return train(spec_path, overrides_of(args), args.address)


if __name__ == "__main__":
    sys.exit(main())
