"""The built wheel, installed as a user installs it: one fresh virtual environment per extra.

pyproject.toml promises that each extra installs and runs on its own:

* core (``pip install gradwire``): the compressor library, with torch, numpy and pydantic only;
* ``cli``: the ``gradwire`` command and the REST client;
* ``train``: the Ray Train runtime, on the protobuf and grpcio floors the generated stubs check;
* ``server``: the coordinator;
* and the exact set deploy/Dockerfile installs (``docker-compose exec coordinator gradwire submit``).

The slow tests build the wheel once per session from a copy of what the package build reads,
create a venv per extra with real pip (from the running environment's pip, ``pip --python``) and
run that extra's smoke in it: the compressors reduce on one gloo process with no Ray, FastAPI,
SQLAlchemy, grpc, typer, rich, PyYAML or httpx importable; the command line answers
``--version``, ``compressors`` and ``jobs list`` against a real coordinator; ``gradwire train``
runs a tiny job on a local Ray; ``gradwire serve`` becomes ready; the Docker set serves and runs a
submitted job to the end.

torch is shared, not installed per venv: its files and those of its own dependencies (nothing
else) are hard-linked once into a session folder from the running environment, and each venv gets
a ``.pth`` line pointing there, so pip finds ``torch==<this version>`` already installed. The
running environment's site-packages itself is never put on a venv's path (that would leak ray,
fastapi and the rest into the core check).

The fast tests at the top check the pyproject against what it must agree with: the stubs' version
checks, the extras' references, the command line's list of what each extra brings.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.waiting import free_port, wait_for

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

#: what the compressor library must neither import nor find in a core install (the issue's list,
#: and the rest of the coordinator's stack)
NOT_IN_CORE = (
    "ray", "fastapi", "sqlalchemy", "grpc", "typer", "rich", "yaml", "httpx",
    "uvicorn", "starlette", "pydantic_settings", "prometheus_client", "google.protobuf",
)  # fmt: skip
CORE = {"torch", "numpy", "pydantic"}


# --- pyproject, checked without installing anything -----------------------------------------------


def _requirements(extra: str) -> list[Requirement]:
    return [Requirement(text) for text in EXTRAS[extra]]


def _floor(requirement: Requirement) -> str:
    (floor,) = [s.version for s in requirement.specifier if s.operator == ">="]
    return floor


def _closure(extras: set[str]) -> set[str]:
    """Every extra named, following ``gradwire[...]`` self-references."""
    seen: set[str] = set()
    pending = list(extras)
    while pending:
        extra = pending.pop()
        if extra not in seen:
            seen.add(extra)
            pending += [e for r in _requirements(extra) if r.name == PROJECT["name"] for e in r.extras]
    return seen


def _distributions(extras: set[str]) -> dict[str, Requirement]:
    """Third-party requirements of ``extras`` (self-references followed) by canonical name."""
    found: dict[str, Requirement] = {}
    for extra in sorted(_closure(extras)):
        for requirement in _requirements(extra):
            if requirement.name != PROJECT["name"]:
                found.setdefault(canonicalize_name(requirement.name), requirement)
    return found


def test_the_core_is_the_compressor_library() -> None:
    assert {canonicalize_name(Requirement(t).name) for t in PROJECT["dependencies"]} == CORE


def test_self_references_name_extras_that_exist() -> None:
    for extra in EXTRAS:
        for requirement in _requirements(extra):
            if requirement.name == PROJECT["name"]:
                assert requirement.extras <= set(EXTRAS), f"{extra}: {requirement}"
                assert extra not in requirement.extras, f"{extra} names itself"


def test_all_and_dev_cover_every_runtime_extra() -> None:
    runtime = {"cli", "train", "server", "postgres"}
    assert runtime <= _closure({"all"})
    assert runtime | {"all", "examples", "mnist1d", "bench"} <= _closure({"dev"})
    dev = {canonicalize_name(r.name): str(r.specifier) for r in _requirements("dev")}
    assert dev.get("lightning") == "==2.6.6" and dev.get("accelerate") == "==1.16.0", dev


def _stub_versions() -> tuple[str, str]:
    """(protobuf, grpcio) versions the committed stubs refuse to run below."""
    protos = ROOT / "protos"
    pb2 = [p for p in protos.glob("*_pb2.py")]
    grpc = [p for p in protos.glob("*_pb2_grpc.py")]
    assert pb2 and grpc, "no generated stubs in protos/"
    protobuf = set()
    for path in pb2:
        found = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
            path.read_text(),
        )
        assert found, f"{path.name}: no ValidateProtobufRuntimeVersion line"
        protobuf.add(".".join(found.groups()))
    grpcio = {re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", p.read_text()).group(1) for p in grpc}  # type: ignore[union-attr]
    assert len(protobuf) == 1 and len(grpcio) == 1, (protobuf, grpcio)
    return protobuf.pop(), grpcio.pop()


@pytest.mark.parametrize("extra", ["train", "server"])
def test_protobuf_and_grpcio_floors_are_the_stubs_own(extra: str) -> None:
    """The floor is what the stubs check at import, not higher (users are not forced onto a newer
    protobuf than the stubs need) and not lower (an install on the floor would fail to import)."""
    protobuf, grpcio = _stub_versions()
    requirements = _distributions({extra})
    assert _floor(requirements["protobuf"]) == protobuf, requirements["protobuf"]
    assert _floor(requirements["grpcio"]) == grpcio, requirements["grpcio"]


def test_each_command_extra_brings_the_modules_the_command_line_checks_for() -> None:
    """gradwire.cli.extras names, per extra, the modules whose absence it reports as "needs
    `pip install 'gradwire[EXTRA]'`": each must come from that extra (or the core)."""
    extras_module = pytest.importorskip("gradwire.cli.extras")
    provided_by = importlib.metadata.packages_distributions()
    for extra, modules in extras_module.EXTRA_MODULES.items():
        brought = set(_distributions({extra})) | CORE
        for module in modules:
            dists = {canonicalize_name(d) for d in provided_by.get(module.split(".")[0], [])}
            if module.startswith("google."):
                dists = {canonicalize_name(d) for d in provided_by.get("google", [])} & {"protobuf"}
            assert dists, f"{module}: not installed here, cannot tell which distribution brings it"
            assert dists & brought, f"gradwire[{extra}] brings none of {sorted(dists)} (module {module})"


def dockerfile_extras() -> str:
    found = re.findall(r"^ARG GRADWIRE_EXTRAS=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert len(found) == 1, found
    return found[0]


def dockerfile_ray_version() -> str:
    (version,) = re.findall(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    return version


# --- the session's wheel, shared torch and venvs ----------------------------------------------------


def _run(argv: list[str | Path], timeout: float, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kwargs)
    return done


def _ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, (
        f"{' '.join(done.args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


class Timings:
    """Seconds each setup step took, printed at the end of the session (pytest -s, or -rA)."""

    steps: ClassVar[dict[str, float]] = {}

    @classmethod
    @contextmanager
    def step(cls, name: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        cls.steps[name] = time.monotonic() - start


@pytest.fixture(scope="session")
def install_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("install")
    yield root
    if Timings.steps:
        print("\ninstall test setup times: " + ", ".join(f"{k} {v:.0f} s" for k, v in Timings.steps.items()))


@pytest.fixture(scope="session")
def wheel(install_root: Path) -> Path:
    """The wheel, built once from a copy of exactly what the package build reads (the shared
    working tree gets no build/ or egg-info from this)."""
    probe = _run([sys.executable, "-c", "import setuptools, wheel"], 60)
    if probe.returncode != 0:
        pytest.skip("setuptools and wheel are not installed here (the build runs without isolation)")
    source = install_root / "src"
    tool = PYPROJECT["tool"]["setuptools"]
    paths = [
        "pyproject.toml",
        PROJECT["readme"],
        *PROJECT.get("license-files", []),
        *tool["package-dir"].values(),
    ]
    for rel in paths:
        origin, target = ROOT / rel, source / rel
        if origin.is_dir():
            shutil.copytree(
                origin, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]")
            )
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target)
    dist = install_root / "dist"
    with Timings.step("wheel"):
        _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", dist, source], 300))  # fmt: skip
    (built,) = dist.glob("gradwire-*.whl")
    return built


def _dependency_closure(name: str) -> list[importlib.metadata.Distribution]:
    """``name``'s installed distribution and those of its own requirements (markers evaluated, no
    extras), transitively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [name]
    while pending:
        key = canonicalize_name(pending.pop())
        if key in found:
            continue
        found[key] = importlib.metadata.distribution(key)
        for text in found[key].requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return list(found.values())


@pytest.fixture(scope="session")
def shared_torch(install_root: Path) -> tuple[Path, str]:
    """A folder holding this environment's torch and its dependencies only (hard links, or copies
    across file systems), and the torch version: every venv's torch."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torch is not installed in the running environment")
    folder = install_root / "shared-torch"
    with Timings.step("shared torch"):
        for dist in _dependency_closure("torch"):
            base = Path(str(dist.locate_file("")))
            for file in dist.files or []:
                if file.parts and file.parts[0] == "..":
                    continue  # console scripts in bin/: not needed
                origin, target = base / file, folder / file
                if not origin.is_file():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(origin, target)
                except OSError:
                    shutil.copy2(origin, target)
    for module in NOT_IN_CORE:
        assert not (folder / module.split(".")[0]).exists(), f"{module} in the shared torch folder"
    return folder, version


class Venv:
    """A fresh virtual environment (no pip of its own: the running pip installs into it)."""

    def __init__(self, path: Path, shared_torch: tuple[Path, str]) -> None:
        self.path = path
        _ok(_run([sys.executable, "-m", "venv", "--without-pip", path], 120))
        self.python = path / "bin" / "python"
        purelib = _ok(
            _run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60)
        )
        folder, self.torch_version = shared_torch
        (Path(purelib.stdout.strip()) / "_gradwire_test_shared_torch.pth").write_text(f"{folder}\n")

    def pip(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _ok(_run([sys.executable, "-m", "pip", "--python", self.python, *args], timeout))

    def install(self, wheel: Path, extras: str, *pins: str) -> None:
        target = f"{wheel}[{extras}]" if extras else str(wheel)
        # --no-compile: no .pyc for the thousands of files of Ray and friends (less than half the
        # time; Python compiles what the smoke imports anyway)
        self.pip("install", "-q", "--no-compile", target, f"torch=={self.torch_version}", *pins)
        self.pip("check")

    def env(self, **extra: str) -> dict[str, str]:
        """A user's shell with this venv activated: nothing of the running environment's."""
        ours = os.path.realpath(sys.prefix)
        path = [
            p
            for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not os.path.realpath(p).startswith(ours)
        ]
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("GRADWIRE_", "PYTHON", "VIRTUAL_ENV", "RAY_", "PYTEST_"))
        }  # fmt: skip
        env.update(
            PATH=os.pathsep.join([str(self.path / "bin"), *path]),
            VIRTUAL_ENV=str(self.path),
            RAY_USAGE_STATS_ENABLED="0",
            COLUMNS="200",
            NO_COLOR="1",
            **extra,
        )
        return env

    def run(
        self, *argv: str | Path, cwd: Path, timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return _run([*argv], timeout, cwd=cwd, env=self.env(**env))

    def gradwire(
        self, *args: str | Path, cwd: Path, timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return self.run(self.path / "bin" / "gradwire", *args, cwd=cwd, timeout=timeout, **env)


@pytest.fixture(scope="session")
def make_venv(install_root: Path, wheel: Path, shared_torch: tuple[Path, str]):
    made: dict[str, Venv] = {}

    def make(name: str, extras: str, *pins: str) -> Venv:
        if name not in made:
            with Timings.step(f"venv {name}"):
                venv = Venv(install_root / f"venv-{name}", shared_torch)
                venv.install(wheel, extras, *pins)
            made[name] = venv
        return made[name]

    return make


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


#: what `gradwire serve` says when Ray's own start-up gives up (its raylet and GCS waits are fixed
#: at 30 s inside Ray, which a loaded 2-core machine can exceed): worth one more try
RAY_START_FAILED = "cannot start an embedded Ray head"


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)  # what Ctrl-C does: scheduler, Ray, sink and store stop
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


@contextmanager
def coordinator(venv: Venv, workdir: Path) -> Iterator[str]:
    """`gradwire serve` from ``venv`` on 127.0.0.1 (free ports, an embedded Ray, SQLite in
    ``workdir``) until ready; its URL. Stopped with SIGINT, as Ctrl-C stops it. Started a second
    time only when the first start ended in Ray's own start-up timeout."""
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = workdir / f"serve-{attempt}.log"
        env = venv.env(
            GRADWIRE_PORT=str(port),
            GRADWIRE_GRPC_PORT=str(free_port()),
            GRADWIRE_DATABASE_URL=f"sqlite:///{workdir / 'coordinator.db'}",
        )
        with open(log_path, "w") as log:
            server = subprocess.Popen(
                [str(venv.path / "bin" / "gradwire"), "serve", "--num-cpus", "2"],
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def ready(server: subprocess.Popen = server, url: str = url) -> str | None:
            if server.poll() is not None:
                return "exited"
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                    return "ready" if answer.status == 200 else None
            except (urllib.error.URLError, OSError):
                return None

        try:
            state = wait_for(ready, 240, f"gradwire serve at {url}/readyz")
        except BaseException:
            _stop(server)
            raise
        if state == "ready":
            break
        output = _tail(log_path)
        if attempt == 2 or RAY_START_FAILED not in output:
            raise AssertionError(f"gradwire serve exited {server.returncode}:\n{output}")
        print(f"\ngradwire serve: {RAY_START_FAILED} (Ray's start-up timeout), starting it once more")
    try:
        yield url
    finally:
        _stop(server)


def _tiny_spec(folder: Path) -> Path:
    """A job that needs no extra data package: 2 workers, 20 steps, PowerSGD, on synthetic blobs."""
    spec = folder / "tiny.yaml"
    spec.write_text(
        textwrap.dedent(f"""\
            name: install-smoke
            seed: 0
            model: {{name: mlp, params: {{hidden: [16]}}}}
            data: {{dataset: synthetic, params: {{samples: 512, features: 8, classes: 2}}, batch_size: 32}}
            optimizer: {{name: sgd, lr: 0.1}}
            steps: 20
            workers: {{count: 2, cpus_per_worker: 0.5}}
            compression: {{name: powersgd, rank: 1}}
            checkpoint: {{storage: {folder / "checkpoints"}}}
        """)
    )
    return spec


# --- the smoke of each extra ------------------------------------------------------------------------

CORE_SMOKE = """
import importlib.util, sys

NOT_IN_CORE = __NOT_IN_CORE__

import torch
import torch.distributed as dist
from gradwire.compressors import make_hook, make_reducer

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
try:
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for name, params in (("none", {}), ("powersgd", {"rank": 1})):
        model = torch.nn.Linear(8, 4)
        plain = torch.nn.Linear(8, 4)
        plain.load_state_dict(model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(*make_hook(name, **params))
        for _ in range(3):
            ddp.zero_grad()
            ddp(x).square().sum().backward()
        plain(x).square().sum().backward()
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.isfinite(p.grad).all(), name
            if name == "none":  # one rank: the mean is the rank's own gradient
                torch.testing.assert_close(p.grad, q.grad)
    grads = [torch.randn(32, 16), torch.randn(7)]
    means = make_reducer("topk", ratio=0.25, feedback="ef").reduce([g.clone() for g in grads])
    assert [m.shape for m in means] == [g.shape for g in grads]
    print("reduced")
finally:
    dist.destroy_process_group()

def imported(m):
    return m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)

loaded = sorted(m for m in NOT_IN_CORE if imported(m))
assert not loaded, f"imported: {loaded}"

def findable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package (google) is missing
        return False

installed = sorted(m for m in NOT_IN_CORE if findable(m))
assert not installed, f"installed: {installed}"
print("core ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_core_install_reduces_without_the_service_stack(make_venv, tmp_path: Path) -> None:
    venv = make_venv("core", "")
    done = _ok(
        venv.run(venv.python, "-c", CORE_SMOKE.replace("__NOT_IN_CORE__", repr(NOT_IN_CORE)), cwd=tmp_path)
    )
    assert "reduced" in done.stdout and "core ok" in done.stdout
    version = _ok(venv.gradwire("--version", cwd=tmp_path))
    assert version.stdout.strip() == f"gradwire {PROJECT['version']}"
    missing = venv.gradwire("compressors", cwd=tmp_path)
    assert missing.returncode == 1
    assert "pip install 'gradwire[cli]'" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr, missing.stderr


@pytest.fixture(scope="class")
def server_coordinator(make_venv, install_root: Path) -> Iterator[str]:
    """A coordinator from a venv with only the server extra, for the class that uses it."""
    venv = make_venv("server", "server")
    with coordinator(venv, install_root / "run-server") as url:
        yield url


@pytest.mark.slow
@pytest.mark.timeout(900)
class TestServerAndCli:
    """The server venv's coordinator, and a venv with only the cli extra talking to it (the
    coordinator stops after this class, before the Ray runs below)."""

    def test_server_install_serves(self, server_coordinator: str) -> None:
        for route in ("/healthz", "/readyz"):
            with urllib.request.urlopen(server_coordinator + route, timeout=10) as answer:
                assert answer.status == 200, route

    def test_cli_install_talks_to_a_coordinator(
        self, make_venv, server_coordinator: str, tmp_path: Path
    ) -> None:
        venv = make_venv("cli", "cli")
        version = _ok(venv.gradwire("--version", cwd=tmp_path))
        assert version.stdout.strip() == f"gradwire {PROJECT['version']}"
        listed = _ok(venv.gradwire("compressors", cwd=tmp_path))
        for name in ("powersgd", "topk", "none"):
            assert name in listed.stdout
        jobs = _ok(venv.gradwire("jobs", "list", "--server", server_coordinator, cwd=tmp_path))
        assert "Traceback" not in jobs.stderr
        serve = venv.gradwire("serve", cwd=tmp_path)  # the server extra is not installed here
        assert serve.returncode == 1
        assert "pip install 'gradwire[server]'" in serve.stderr, serve.stderr
        assert "Traceback" not in serve.stderr, serve.stderr
        for module in ("ray", "fastapi", "sqlalchemy", "grpc"):
            probe = venv.run(venv.python, "-c", f"import {module}", cwd=tmp_path)
            assert probe.returncode != 0, f"{module} is installed by the cli extra"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_install_runs_a_job_on_the_stubs_floors(make_venv, tmp_path: Path) -> None:
    """On exactly the protobuf and grpcio releases pyproject names as floors: the stubs import
    without a warning, and `gradwire train` runs a tiny job on a local Ray to the end."""
    requirements = _distributions({"train"})
    protobuf, grpcio = _floor(requirements["protobuf"]), _floor(requirements["grpcio"])
    venv = make_venv("train", "train", f"protobuf=={protobuf}", f"grpcio=={grpcio}")
    stubs = _ok(venv.run(
        venv.python, "-W", "error", "-c",
        "import google.protobuf, grpc; print(google.protobuf.__version__, grpc.__version__);"
        "from gradwire.protos import telemetry_pb2 as pb, telemetry_pb2_grpc;"
        "batch = pb.ReportBatch(); assert pb.ReportBatch.FromString(batch.SerializeToString()) == batch",
        cwd=tmp_path,
    ))  # fmt: skip
    assert stubs.stdout.split() == [protobuf, grpcio]
    spec = _tiny_spec(tmp_path)
    done = venv.gradwire("train", spec, "--no-progress", cwd=tmp_path, timeout=420)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "install-smoke" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_docker_image_set_serves_and_runs_a_submitted_job(
    make_venv, install_root: Path, tmp_path: Path
) -> None:
    """deploy/Dockerfile's GRADWIRE_EXTRAS and Ray pin, in one venv: `gradwire serve` and, as
    `docker-compose exec coordinator gradwire submit ...` does, a submitted example job followed to
    its end (checkpoints go to the coordinator's own folder, the only place it lets a job write)."""
    extras = dockerfile_extras()
    venv = make_venv("docker", extras, f"ray[default,train]=={dockerfile_ray_version()}")
    with coordinator(venv, install_root / "run-docker") as url:
        done = venv.gradwire(
            "submit", ROOT / "examples" / "specs" / "digits-powersgd.yaml",
            "--set", "steps=20", "--set", "optimizer.warmup_steps=5", "--set", "workers.count=2",
            "--set", "workers.cpus_per_worker=0.5",
            "--set", "evaluation.every_steps=10", "--set", "checkpoint.every_steps=10",
            "--wait", "--server", url, cwd=tmp_path, timeout=420,
        )  # fmt: skip
        serve_log = "\n".join(_tail(log) for log in sorted((install_root / "run-docker").glob("serve-*.log")))
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{serve_log}"
        jobs = _ok(venv.gradwire("jobs", "list", "--server", url, cwd=tmp_path))
        assert "SUCCEEDED" in jobs.stdout, jobs.stdout
