"""deploy/ray/cluster-aws.yaml (the cloud example) and Ray's JSON schema for both cluster files.

The schema is the file Ray ships (ray/autoscaler/ray-schema.json), found without importing ray:
importing it in the test process would fix its network settings for the whole session before
the end-to-end tests set theirs. Ray's own preparation of the config (what `ray up` does before
it contacts AWS) runs in a subprocess; neither needs AWS credentials or the network.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY_DIR = ROOT / "deploy" / "ray"
AWS = RAY_DIR / "cluster-aws.yaml"
CLUSTER_FILES = ("cluster.yaml", "cluster-aws.yaml")


def _ray_schema() -> dict:
    spec = importlib.util.find_spec("ray")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ray is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    assert path.is_file(), f"Ray no longer ships {path}"
    return json.loads(path.read_text())


def _errors(config: dict) -> list[str]:
    from jsonschema import Draft7Validator  # the schema says draft-07

    validator = Draft7Validator(_ray_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]


@pytest.fixture(scope="module")
def aws() -> dict:
    config = yaml.safe_load(AWS.read_text())
    assert isinstance(config, dict)
    return config


def _load(name: str) -> dict:
    return yaml.safe_load((RAY_DIR / name).read_text())


# --- Ray's schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_matches_rays_schema(name: str) -> None:
    assert _errors(_load(name)) == []


def test_the_schema_check_catches_a_misspelt_key() -> None:
    config = _load("cluster-aws.yaml")
    config["setup_comands"] = config.pop("setup_commands")
    assert any("setup_comands" in e for e in _errors(config))


def test_ray_prepares_and_validates_the_aws_config_as_written(aws: dict) -> None:
    # prepare_config merges in Ray's AWS defaults: nothing of theirs may replace or extend ours
    # (their defaults install a nightly Ray wheel and look for a conda env of the DLAMI).
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    probe = (
        "import json, sys, yaml\n"
        "from ray.autoscaler._private.util import prepare_config, validate_config\n"
        "config = prepare_config(yaml.safe_load(open(sys.argv[1])))\n"
        "validate_config(config)\n"
        "print(json.dumps(config))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(AWS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    prepared = json.loads(done.stdout.strip().splitlines()[-1])
    assert prepared["head_setup_commands"] == aws["setup_commands"] + aws["head_setup_commands"]
    assert prepared["worker_setup_commands"] == aws["setup_commands"] + aws["worker_setup_commands"]
    for key in (
        "initialization_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "file_mounts",
    ):
        assert prepared[key] == aws[key], key
    assert prepared["max_workers"] == aws["max_workers"]
    assert prepared["available_node_types"][aws["head_node_type"]]["max_workers"] == 0


# --- the AWS example itself -----------------------------------------------------------------------


def test_node_types_fit_the_cluster_limit(aws: dict) -> None:
    assert aws["provider"]["type"] == "aws"
    region = aws["provider"]["region"]
    for zone in aws["provider"]["availability_zone"].split(","):
        assert zone.startswith(region), f"{zone} is not in {region}"
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    assert workers
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= aws["max_workers"]
    for name, node_type in workers.items():
        assert node_type.get("min_workers", 0) <= node_type["max_workers"] <= aws["max_workers"], name
        assert node_type["node_config"]["InstanceType"], name


def test_only_the_amis_are_left_to_fill_in(aws: dict) -> None:
    placeholders = re.findall(r"^\s*([\w-]+):.*REPLACE-ME", AWS.read_text(), re.M)
    assert placeholders and set(placeholders) == {"ImageId"}, placeholders
    for node_type in aws["available_node_types"].values():
        assert "REPLACE-ME" in node_type["node_config"]["ImageId"]


def test_setup_installs_pinned_torch_then_gradwire_from_the_mounted_repository(aws: dict) -> None:
    spec = importlib.util.spec_from_file_location("train_job", RAY_DIR / "train_job.py")
    assert spec is not None and spec.loader is not None
    train_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_job)

    mounted = [remote for remote, local in aws["file_mounts"].items() if local in (".", "./")]
    assert mounted == [train_job.DEFAULT_REPO], "the repository must be where train_job.py looks"
    repo = re.escape(mounted[0].replace("~", "$HOME"))
    commands = aws["setup_commands"]
    torch_at = [i for i, c in enumerate(commands) if re.search(r"pip install\b.*\btorch==\d", c)]
    gradwire_at = [
        i for i, c in enumerate(commands) if re.search(rf'pip install\b.*"?{repo}\[[^\]]*\btrain\b', c)
    ]
    assert torch_at and gradwire_at, commands
    assert torch_at[0] < gradwire_at[0], "torch must be pinned before gradwire pulls in an unpinned one"
    for i in gradwire_at:
        assert not re.search(r"\btorch\b(?!==)", commands[i]), commands[i]
    pinned = set(re.findall(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()))
    assert set(re.findall(r"torch==([\w.+]+)", " ".join(commands))) == pinned


def test_same_python_environment_and_ray_as_the_on_premise_file(aws: dict) -> None:
    local = _load("cluster.yaml")
    assert aws["setup_commands"] == local["setup_commands"], "keep the two installs identical"
    assert aws["rsync_filter"] == local["rsync_filter"] and aws["rsync_exclude"] == local["rsync_exclude"]


def test_head_can_drive_the_autoscaler(aws: dict) -> None:
    assert any(re.search(r"pip install\b.*\bboto3\b", c) for c in aws["head_setup_commands"])
    head = " ; ".join(aws["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head


def test_start_commands_share_port_and_token_authentication(aws: dict) -> None:
    head = " ; ".join(aws["head_start_ray_commands"])
    worker = " ; ".join(aws["worker_start_ray_commands"])
    assert (
        aws["head_start_ray_commands"][0] == "ray stop" and aws["worker_start_ray_commands"][0] == "ray stop"
    )
    port = re.search(r"ray start --head --port=(\d+)", head)
    assert port, head
    assert f"ray start --address=$RAY_HEAD_IP:{port.group(1)}" in worker
    for command in (head, worker):
        assert "RAY_AUTH_MODE=token ray start" in command
    assert aws["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "every node needs the token"
    assert "--dashboard-host=127.0.0.1" in head, "the cloud head keeps its dashboard off the internet"
