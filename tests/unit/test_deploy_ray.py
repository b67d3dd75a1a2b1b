"""deploy/ray: the cluster-launcher config and the `ray submit` entry script.

The script runs in a subprocess, as `ray submit` runs it on the head node; none of these tests
starts Ray (--check never imports it, and the one run without --check fails validation first).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "ray" / "cluster.yaml"
SCRIPT = ROOT / "deploy" / "ray" / "train_job.py"
EXAMPLE = "examples/specs/digits-powersgd.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    config = yaml.safe_load(CLUSTER.read_text())
    assert isinstance(config, dict)
    return config


def _script_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_job", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, cwd: Path = ROOT, repo: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRADWIRE_REPO", "RAY_ADDRESS")}
    if repo is not None:
        env["GRADWIRE_REPO"] = str(repo)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- cluster.yaml -----------------------------------------------------------------------------


def test_cluster_is_a_local_provider_config(cluster: dict) -> None:
    assert cluster["cluster_name"]
    provider = cluster["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert isinstance(provider["worker_ips"], list)
    assert all(isinstance(ip, str) and ip for ip in provider["worker_ips"])
    assert cluster["auth"]["ssh_user"]
    assert cluster["auth"]["ssh_private_key"]


def test_cluster_mounts_the_repository_where_the_script_looks(cluster: dict) -> None:
    mounts = cluster["file_mounts"]
    repo_mounts = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert repo_mounts, f"no file_mounts entry copies the repository ('.'): {mounts}"
    assert _script_module().DEFAULT_REPO in repo_mounts


def test_setup_installs_pinned_torch_before_gradwire(cluster: dict) -> None:
    commands = cluster["setup_commands"]
    torch_at = [i for i, c in enumerate(commands) if re.search(r"pip install\b.*\btorch==\d+\.\d+\.\d+", c)]
    gradwire_at = [i for i, c in enumerate(commands) if re.search(r"pip install\b.*gradwire\[[^\]]*train", c)]
    assert torch_at, f"no pinned torch install in setup_commands: {commands}"
    assert gradwire_at, f"no install of gradwire with the train extra in setup_commands: {commands}"
    assert torch_at[0] < gradwire_at[0], "torch must be pinned before gradwire pulls in an unpinned one"
    for i in gradwire_at:  # the project's own install must not bring an unpinned torch along
        assert not re.search(r"\btorch\b(?!==)", commands[i]), commands[i]


def test_setup_pins_the_torch_the_makefile_pins(cluster: dict) -> None:
    makefile = (ROOT / "Makefile").read_text() if (ROOT / "Makefile").exists() else ""
    pinned_here = set(re.findall(r"torch==([\w.+]+)", " ".join(cluster["setup_commands"])))
    pinned_there = set(re.findall(r"torch==([\w.+]+)", makefile))
    if not pinned_there:
        pytest.skip("the Makefile pins no torch")
    assert pinned_here == pinned_there


def test_start_commands(cluster: dict) -> None:
    head = " ; ".join(cluster["head_start_ray_commands"])
    worker = " ; ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head
    # without it the head's autoscaler never starts the nodes in worker_ips
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    port = re.search(r"--port[= ](\d+)", head)
    assert port, "the head start command sets no --port"
    assert f"ray start --address=$RAY_HEAD_IP:{port.group(1)}" in worker
    assert cluster["head_start_ray_commands"][0] == "ray stop"
    assert cluster["worker_start_ray_commands"][0] == "ray stop"


def test_cluster_passes_rays_own_validation(cluster: dict) -> None:
    # In a subprocess, and not even importorskip: importing ray here would fix its network
    # settings for the whole test session before the end-to-end tests set theirs (see
    # worker/launch.py's docstring).
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    probe = (
        "import sys, yaml\n"
        "from ray.autoscaler._private.util import prepare_config, validate_config\n"
        "config = prepare_config(yaml.safe_load(open(sys.argv[1])))  # what `ray up` does first\n"
        "validate_config(config)  # Ray's JSON schema for cluster configs\n"
        "print(config['max_workers'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(CLUSTER)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(len(cluster["provider"]["worker_ips"]))


# --- train_job.py -----------------------------------------------------------------------------


def test_check_accepts_an_example_and_names_it() -> None:
    done = _run("--check", EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert "digits-powersgd" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1


def test_check_applies_workers_and_overrides() -> None:
    done = _run("--check", EXAMPLE, "--workers", "2", "--set", "steps=50")
    assert done.returncode == 0, done.stderr
    assert "2 workers" in done.stdout and "50 steps" in done.stdout


def test_check_names_an_unknown_key(tmp_path: Path) -> None:
    text = (ROOT / EXAMPLE).read_text() + "learning_rate_typo: 0.1\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    done = _run("--check", str(bad))
    assert done.returncode == 2
    assert "learning_rate_typo" in done.stderr


def test_check_names_a_bad_override() -> None:
    done = _run("--check", EXAMPLE, "--set", "compression.rank=0")
    assert done.returncode == 2
    assert "compression.rank" in done.stderr


def test_spec_is_resolved_relative_to_the_mounted_repo(tmp_path: Path) -> None:
    repo = tmp_path / "mounted"
    (repo / "examples" / "specs").mkdir(parents=True)
    text = (ROOT / EXAMPLE).read_text().replace("name: digits-powersgd", "name: only-in-the-mount")
    (repo / "examples" / "specs" / "mine.yaml").write_text(text)
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    done = _run("--check", "examples/specs/mine.yaml", cwd=elsewhere, repo=repo)
    assert done.returncode == 0, done.stderr
    assert "only-in-the-mount" in done.stdout


def test_spec_as_given_wins_over_the_mount(tmp_path: Path) -> None:
    # an existing path is used as is, whatever the mount holds
    done = _run("--check", EXAMPLE, repo=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "digits-powersgd" in done.stdout


def test_missing_spec_says_where_it_looked(tmp_path: Path) -> None:
    done = _run("--check", "examples/specs/absent.yaml", cwd=tmp_path, repo=tmp_path / "mounted")
    assert done.returncode == 2
    assert "absent.yaml" in done.stderr and str(tmp_path / "mounted") in done.stderr


def test_check_does_not_import_ray() -> None:
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--check', {EXAMPLE!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print('ray imported' if 'ray' in sys.modules else 'ray not imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ray not imported")


def test_without_check_the_gradwire_cli_runs_and_refuses_a_bad_spec_before_ray() -> None:
    # the train path hands over to `gradwire train`, which validates before it imports Ray
    done = _run(EXAMPLE, "--set", "compression.rank=0")
    assert done.returncode == 2
    assert "compression.rank" in done.stderr


def test_train_passes_address_auto_and_overrides_to_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradwire.cli

    seen: list[list[str]] = []

    def fake_app(*, args: list[str], prog_name: str) -> None:
        seen.append(args)
        raise SystemExit(0)

    monkeypatch.setattr(gradwire.cli, "app", fake_app)
    monkeypatch.chdir(ROOT)
    code = _script_module().main([EXAMPLE, "--workers", "3", "--set", "steps=10"])
    assert code == 0
    assert seen == [["train", EXAMPLE, "--address", "auto", "--set", "steps=10", "--set", "workers.count=3"]]
