"""The coordinator drives a real multi-node Ray cluster by its Jobs API address alone (issue 16).

One lab serves the module (``benchmarks.netlab``): five network namespaces on a switch with 1 Gbit/s
links. Rank 0 is the coordinator's host (``gradwire serve`` with ``RAY_ADDRESS=http://HEAD:8265``;
its working folder a private tmpfs no Ray node can see), rank 1 the Ray head (0 CPUs: drivers and
Ray's services), ranks 2-4 worker nodes with 1 CPU each, so a 2-worker job × 1 CPU must span two
nodes and one node is spare. The only folder the nodes and the coordinator share is the checkpoint
storage (a tmp folder here; NFS or an object store on a real cluster).

* A digits PowerSGD job submitted over REST runs its two ranks on two different nodes (the job's
  placement as the coordinator learnt it from the ranks' step reports, checked against Ray's state
  API), SUCCEEDS, and ``/metrics`` counts ranks × the ledger's bytes.
* The same job again, and one of its worker nodes is killed (every process in that namespace,
  SIGKILL) after a checkpoint: Ray Train restores the group on the spare node from that checkpoint
  (the coordinator shows RESTARTING, attempt 1 and the new placement), and the final model,
  optimizer and compressor states equal the uninterrupted run's bit for bit.
* ``ray job submit`` of ``deploy/ray/train_job.py`` (working dir uploaded with the spec) to the
  same head runs across two nodes and succeeds.

Needs root and iproute2 (CI has both); skipped with the reason elsewhere. 4.5 min on the 2 shared cores
at a 1-minute load of ~10, 6.5-8 min at 15-35 (three Ray Train fits and a restore).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.netlab import Lab, support_problem
from benchmarks.netlab.coordinator import LabCoordinator
from benchmarks.netlab.raycluster import LabRayCluster
from gradwire.spec import JobSpec
from tests.e2e.test_train import powersgd_bytes_per_step

PROBLEM = support_problem() or (None if shutil.which("unshare") else "no `unshare` (util-linux)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROBLEM is not None, reason=f"multi-node lab cannot run here: {PROBLEM}"),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'ray' extra"),
]

ROOT = Path(__file__).parents[2]
SPEC = ROOT / "examples" / "specs" / "digits-powersgd.yaml"
CLIENT, HEAD, NODES = 0, 1, (2, 3, 4)
STEPS = 600  # long enough that the node is killed mid-job however fast the steps run
EVERY = 20  # checkpoint interval
# a node is killed once a rank reported this step and Ray Train has registered a checkpoint of the run
# (its checkpoint_manager_snapshot.json in the run folder lists one): a group lost before that
# restarts from step 0 as attempt 0, which is no restore (a file on disk is not enough: 20 steps take
# 0.2 s here, less than Ray Train takes to register the checkpoint)
KILL_AT = EVERY + 5
JOB_S = 420.0


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    storage = tmp_path_factory.mktemp("multinode-storage")  # every node sees it, as NFS
    with (
        Lab(workers=1 + 1 + len(NODES), rate="1gbit") as lab,
        LabRayCluster(lab, client=CLIENT, head=HEAD, nodes=NODES) as ray,
        LabCoordinator(ray, storage) as coordinator,
    ):
        yield ray, coordinator, storage


def job_body(name: str, storage: Path) -> dict[str, Any]:
    spec = JobSpec.from_file(SPEC).with_overrides([
        f"name={name}", f"steps={STEPS}", "workers.count=2", "workers.cpus_per_worker=1",
        f"checkpoint.every_steps={EVERY}", "evaluation.every_steps=100", f"checkpoint.storage={storage}",
    ])  # fmt: skip
    return spec.model_dump(mode="json")


def placement(ray: LabRayCluster, submission_id: str) -> list[tuple[str, str]]:
    """(actor state, node address) of every Ray Train worker of a Ray job, from Ray's state API."""
    driver_job = ray.get_json(f"/api/jobs/{submission_id}")["job_id"]
    addresses = {n["node_id"]: n["node_ip"] for n in ray.nodes_state()}
    workers = [a for a in ray.actors("RayTrainWorker") if a.get("job_id") == driver_job]
    return sorted((a["state"], addresses[a["node_id"]]) for a in workers)


def final_checkpoint(storage: Path) -> Path:
    found = sorted(p for p in storage.glob("*/checkpoint_*") if p.is_dir())
    assert found, f"no checkpoint under {storage}"
    return found[-1]


def prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture(scope="module")
def reference(site):
    """The uninterrupted job: submitted over REST, run to the end."""
    ray, coordinator, storage = site
    job = coordinator.submit(job_body("multinode-reference", storage / "reference"))
    final = coordinator.wait(job["id"], timeout=JOB_S)
    return {
        "final": final,
        "storage": storage / "reference",
        "placement": placement(ray, final["ray_job_id"]),
    }


def test_rest_job_spans_two_nodes_and_counts_bytes(site, reference):
    ray, coordinator, _ = site
    final = reference["final"]
    assert final["state"] == "SUCCEEDED", final
    job_id = final["id"]

    # its two ranks ran on two different worker nodes (1 CPU each), none on the head or the client:
    # the coordinator knows where from the ranks' step reports, and Ray's state API agrees
    where = {p["rank"]: p["node_address"] for p in final["placement"]}
    assert sorted(where) == [0, 1] and len(set(where.values())) == 2, final["placement"]
    assert set(where.values()) <= {ray.node_address(r) for r in NODES}, final["placement"]
    assert {p["attempt"] for p in final["placement"]} == {0} and final["attempt"] == 0, final
    assert sorted(address for _, address in reference["placement"]) == sorted(where.values())

    # the coordinator reached Ray by the Jobs API only: the job carries its spec in its environment,
    # no working dir or modules from the coordinator's machine, whose folder no node can even see
    ray_job = ray.get_json(f"/api/jobs/{final['ray_job_id']}")
    runtime_env = ray_job.get("runtime_env") or {}
    assert "GRADWIRE_JOB_SPEC" in runtime_env.get("env_vars", {}), sorted(runtime_env)
    assert not runtime_env.get("working_dir") and not runtime_env.get("py_modules"), runtime_env
    assert coordinator.folder is not None and not any(coordinator.folder.iterdir()), (
        "the coordinator's private folder is visible outside its mount namespace"
    )

    # every step of both ranks was stored; Prometheus counts both ranks' ledger bytes
    points = coordinator.rest("GET", f"/v1/jobs/{job_id}/metrics?all_ranks=true&max_points=100000")["points"]
    for rank in (0, 1):
        assert [p["step"] for p in points if p["rank"] == rank] == list(range(1, STEPS + 1)), rank
    spec = JobSpec.from_dict(final["spec"])
    warm = spec.compressor_config().start_iter
    compressed, plain = powersgd_bytes_per_step(spec)
    per_rank = warm * plain + (STEPS - warm) * compressed
    assert [p["bytes_sent"] for p in points if p["step"] == STEPS] == [per_rank, per_rank]
    samples = prometheus(coordinator.metrics_text())
    labels = frozenset({"job_id": job_id, "compressor": "powersgd"}.items())
    assert samples[("gradwire_grad_bytes_sent_total", labels)] == 2 * per_rank
    assert samples[("gradwire_grad_bytes_uncompressed_total", labels)] == 2 * STEPS * plain


def test_killed_node_restores_on_spare_node_bit_exact(site, reference):
    import torch

    from tests.state_compare import bitwise_equal

    ray, coordinator, storage = site
    assert reference["final"]["state"] == "SUCCEEDED", reference["final"]
    job = coordinator.submit(job_body("multinode-killed", storage / "killed"))
    job_id = job["id"]
    url = f"/v1/jobs/{job_id}/metrics?all_ranks=true&max_points=100000"
    deadline = time.monotonic() + JOB_S

    def saved() -> bool:
        for snapshot in (storage / "killed").glob("*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snapshot.read_text()).get("checkpoint_results"):
                    return True
            except ValueError:  # being written
                pass
        return False

    def reached() -> int:
        return max((p["step"] for p in coordinator.rest("GET", url)["points"]), default=0)

    while reached() < KILL_AT or not saved():
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {KILL_AT} with a checkpoint"
        time.sleep(0.2)
    running = coordinator.job(job_id)
    before = [address for state, address in placement(ray, running["ray_job_id"]) if state == "ALIVE"]
    assert len(set(before)) == 2, before
    by_address = {ray.node_address(r): r for r in NODES}
    victim = by_address[before[0]]
    (spare,) = set(by_address) - set(before)
    killed = ray.kill_node(victim)
    assert killed, f"no process ran in node {victim}'s namespace"
    at_kill = reached()
    assert at_kill < STEPS, f"the job ended (step {at_kill}) before its node was killed: raise STEPS"

    final = coordinator.wait(job_id, timeout=JOB_S)
    assert final["state"] == "SUCCEEDED", final
    # the coordinator saw Ray Train's restore (attempt 1) and where the ranks went: the node that
    # survived and the spare one; Ray's state API shows a Train worker on the spare node too
    events = [e["to_state"] for e in coordinator.rest("GET", f"/v1/jobs/{job_id}/events")["events"]]
    assert events == ["QUEUED", "STARTING", "RUNNING", "RESTARTING", "RUNNING", "SUCCEEDED"], (events, final)
    assert final["attempt"] == 1 and {p["attempt"] for p in final["placement"]} == {1}, final
    survivor = next(address for address in before if address != ray.node_address(victim))
    assert sorted(p["node_address"] for p in final["placement"]) == sorted([survivor, spare]), final
    after = placement(ray, final["ray_job_id"])
    assert ("ALIVE", spare) in after or ("DEAD", spare) in after, f"nothing ran on the spare node: {after}"
    assert ray.node_address(victim) not in ray.alive_nodes()

    ref_dir, got_dir = final_checkpoint(reference["storage"]), final_checkpoint(storage / "killed")
    names = sorted(p.name for p in ref_dir.glob("*.pt"))
    assert {"model.pt", "optimizer.pt", "rank0.pt", "rank1.pt"} <= set(names), names
    assert names == sorted(p.name for p in got_dir.glob("*.pt"))
    for name in names:
        a, b = torch.load(ref_dir / name, weights_only=False), torch.load(got_dir / name, weights_only=False)
        assert bitwise_equal(a, b), f"{name} differs from the uninterrupted run's"


def test_ray_job_submit_runs_train_job_across_nodes(site, tmp_path):
    ray, _, storage = site
    work = tmp_path / "job"  # what `--working-dir` uploads: the entry script and the spec
    work.mkdir()
    shutil.copy(ROOT / "deploy" / "ray" / "train_job.py", work)
    shutil.copy(SPEC, work)
    sid = f"train-job-{time.time_ns()}"
    command = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        "--address", ray.jobs_address, "--working-dir", str(work), "--submission-id", sid, "--",
        "python", "train_job.py", SPEC.name, "--workers", "2", "--set", "workers.cpus_per_worker=1",
        "--set", "steps=30", "--set", f"checkpoint.storage={storage / 'submitted'}",
    ]  # fmt: skip
    proc = ray.popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=JOB_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"ray job submit did not finish within {JOB_S:g} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    assert f"Job '{sid}' succeeded" in out, out[-3000:]
    assert "digits-powersgd — done" in out, out[-3000:]
    nodes = {address for _, address in placement(ray, sid)}
    assert len(nodes) == 2 and nodes <= {ray.node_address(r) for r in NODES}, nodes
