"""docs/deploy-ray.md's multi-node commands are those the lab of tests/e2e/test_multinode.py runs.

The section "Point a coordinator at an existing multi-node cluster" shows `ray start` for the head and
for a worker node, the coordinator's settings, and `ray job submit`. Here the head's and the worker's
options are compared with ``LabRayCluster.node_command`` (HEAD and NODE put in for the lab's
addresses; the lab adds only a temp dir and a small object store), and the coordinator's variables with
``LabCoordinator.environment()``. Building the objects needs neither root nor a running Ray.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from benchmarks.netlab import Lab
from benchmarks.netlab.coordinator import LabCoordinator
from benchmarks.netlab.raycluster import LabRayCluster

ROOT = Path(__file__).parents[2]
DOC = ROOT / "docs" / "deploy-ray.md"
SECTION = "## Point a coordinator at an existing multi-node cluster"
LAB_ONLY = {"--temp-dir", "--object-store-memory"}  # what the lab adds for one shared machine

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'ray' extra")


def section() -> str:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC.name} lost its section {SECTION!r}"
    rest = text.split(SECTION, 1)[1]
    return rest.split("\n## ", 1)[0]


def shell_commands(text: str) -> list[list[str]]:
    """Every command line of the section's bash blocks (continuations joined), as words."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def options(words: list[str]) -> dict[str, str]:
    """``--name=value`` and ``--name value`` options up to a lone ``--`` (a bare flag maps to "")."""
    found = {}
    for i, word in enumerate(words):
        if word == "--":
            break
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            following = words[i + 1] if i + 1 < len(words) else "-"
            found[name] = value if eq or following.startswith("-") else following
    return found


def ray_start(commands: list[list[str]], head: bool) -> dict[str, str]:
    starts = [c for c in commands if c[:2] == ["ray", "start"] and ("--head" in c) == head]
    assert len(starts) == 1, f"expected one `ray start` {'--head' if head else 'worker'} command: {starts}"
    return options(starts[0])


@pytest.fixture
def cluster() -> LabRayCluster:
    return LabRayCluster(Lab(5), client=0, head=1, nodes=[2, 3, 4])


def lab_options(cluster: LabRayCluster, rank: int, head: str, node: str | None = None) -> dict[str, str]:
    found = options(cluster.node_command(rank, "/tmp/t"))
    assert set(found) >= LAB_ONLY, found
    for name in LAB_ONLY:
        del found[name]
    swapped = {}
    for name, value in found.items():
        value = value.replace(cluster.head_address, head)
        swapped[name] = value.replace(node, "NODE") if node else value
    return swapped


def test_head_and_worker_commands_match_the_lab(cluster: LabRayCluster) -> None:
    commands = shell_commands(section())
    assert ray_start(commands, head=True) == lab_options(cluster, cluster.head, "HEAD")
    worker = lab_options(cluster, 2, "HEAD", node=cluster.node_address(2))
    assert ray_start(commands, head=False) == worker


def test_the_environment_the_docs_export_is_the_labs(cluster: LabRayCluster) -> None:
    text = section()
    exported = set(re.findall(r"\b((?:RAY|GRADWIRE|GLOO)_[A-Z_]+)=", text))
    coordinator = LabCoordinator(cluster, storage="/tmp/shared")
    given = set(coordinator.environment())
    # REST bind address and port: the lab's are gradwire's defaults, so the docs leave them out
    assert given - exported == {"GRADWIRE_HOST", "GRADWIRE_PORT"}, given - exported
    lab_node_env = {"RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "GLOO_SOCKET_IFNAME"}
    assert lab_node_env <= exported, lab_node_env - exported
    assert exported - given - lab_node_env <= {"GRADWIRE_TOKEN"}, exported - given - lab_node_env


def test_the_ray_job_submit_command_runs_train_job(cluster: LabRayCluster) -> None:
    commands = shell_commands(section())
    (submit,) = [c for c in commands if c[:3] == ["ray", "job", "submit"]]
    assert options(submit)["--address"] == "http://HEAD:8265"
    entry = submit[submit.index("--") + 1 :]
    assert entry[:3] == ["python", "train_job.py", "digits-powersgd.yaml"], entry
    assert cluster.jobs_address.replace(cluster.head_address, "HEAD") == "http://HEAD:8265"
