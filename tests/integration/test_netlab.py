"""benchmarks/netlab: real namespaces, veth, bridges and tbf, real gloo ranks.

The lab tests need root and permission to create network namespaces (CI runs as root); elsewhere they
are skipped with the reason. Every lab test checks afterwards that nothing the lab made is left: no
namespace or interface carrying its id, no surviving rank process, and the machine's own qdiscs exactly
as before.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.netlab import (
    Lab,
    NetlabError,
    cleanup_leftovers,
    measure_concurrent,
    measure_tcp,
    parse_rate,
    support_problem,
)

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = support_problem()
needs_netns = pytest.mark.skipif(PROBLEM is not None, reason=f"netlab cannot run here: {PROBLEM}")
pytestmark = pytest.mark.multiprocess

# one gloo all-reduce per rank; prints the sum, the rank's network namespace and its gloo interface
ALLREDUCE = """
import datetime, os
import torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=60))
t = torch.full((4096,), float(dist.get_rank() + 1))
dist.all_reduce(t)
print("sum", t.sum().item() / t.numel(), os.readlink("/proc/self/ns/net"), os.environ["GLOO_SOCKET_IFNAME"],
      flush=True)
dist.destroy_process_group()
os._exit(0)  # gloo may abort in the interpreter's teardown (torch 2.13; benchmarks/linkrun.py, exit_now)
"""
RANK_ENV = {"OMP_NUM_THREADS": "1"}


def host_qdiscs() -> str:
    return subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_nothing_left(lab_id: str, qdiscs_before: str, pids: list[int] = ()) -> None:
    namespaces = netns_list()
    assert lab_id not in namespaces, namespaces
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert f"nl{lab_id}" not in links, links
    assert host_qdiscs() == qdiscs_before
    assert [p for p in pids if pid_alive(p)] == []


# ---------------------------------------------------------------------------- no root needed
@pytest.mark.parametrize(
    ("text", "bits"),
    [("100mbit", 100_000_000), ("100Mbit", 100_000_000), ("1Gbit", 10**9), ("10gbit", 10**10),
     ("1.5gbit", 1_500_000_000), ("64kbit", 64_000), ("none", None), (None, None), (2_000_000, 2_000_000)],
)
def test_parse_rate(text, bits):
    assert parse_rate(text) == bits


@pytest.mark.parametrize("bad", ["fast", "100mbps", "100", "0mbit", "-5mbit", "mbit", "1e9bit", 0, -3, True])
def test_bad_rate_names_the_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_rate(bad)


def test_bad_lab_arguments_name_the_value():
    with pytest.raises(ValueError, match="workers=0"):
        Lab(workers=0)
    with pytest.raises(ValueError, match="workers='2'"):
        Lab(workers="2")
    with pytest.raises(ValueError, match="topology='ring'"):
        Lab(2, topology="ring")
    with pytest.raises(ValueError, match="'10 mbps'"):
        Lab(2, rate="10 mbps")
    with pytest.raises(ValueError, match="rank=2"):
        Lab(2).command(2, ["true"])


def test_non_root_is_refused_with_a_clear_message():
    # imports as root, then drops to nobody: the check itself runs unprivileged
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks.netlab import Lab, NetlabError\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    Lab(2, '100mbit').open()\n"
        "except NetlabError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    if os.geteuid() != 0:
        code = code.replace("os.setgid(65534); os.setuid(65534)\n", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "REFUSED netlab needs root" in out.stdout


@needs_netns
def test_namespaces_not_permitted_is_refused_with_a_clear_message():
    # root without CAP_SYS_ADMIN (as in an unprivileged container): `ip netns add` is refused
    before = host_qdiscs()
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks.netlab import Lab, NetlabError\n"
        "try:\n"
        "    Lab(2, '100mbit').open()\n"
        "except NetlabError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    out = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "REFUSED cannot create network namespaces here" in out.stdout
    assert "CAP_SYS_ADMIN" in out.stdout
    assert host_qdiscs() == before


# ---------------------------------------------------------------------------- labs
@needs_netns
@pytest.mark.parametrize("topology", ["switch", "shared"])
def test_gloo_allreduce_in_each_topology_then_nothing_left(topology):
    before = host_qdiscs()
    own_ns = os.readlink("/proc/self/ns/net")
    with Lab(workers=2, rate="100mbit", topology=topology) as lab:
        results = lab.run_ranks([sys.executable, "-c", ALLREDUCE], env=RANK_ENV, timeout=120)
        lab_id = lab.lab_id
        names = lab.namespaces()
        listed = netns_list()
        assert all(name in listed for name in names)
    outputs = [r.stdout.split() for r in results]
    assert [o[:2] for o in outputs] == [["sum", "3.0"], ["sum", "3.0"]]  # (1 + 2) in every element
    rank_ns = [o[2] for o in outputs]
    assert own_ns not in rank_ns  # the ranks really ran in the lab's namespaces
    if topology == "switch":
        assert len(names) == 3 and rank_ns[0] != rank_ns[1]
        assert [o[3] for o in outputs] == [f"nl{lab_id}r0", f"nl{lab_id}r1"]
    else:
        assert len(names) == 1 and rank_ns[0] == rank_ns[1]
        assert [o[3] for o in outputs] == ["lo", "lo"]
    assert_nothing_left(lab_id, before)


@needs_netns
def test_failing_rank_raises_kills_the_others_and_leaves_nothing():
    before = host_qdiscs()
    script = (
        "import os, sys, time\n"
        "print(os.getpid(), flush=True)\n"
        "if os.environ['RANK'] == '1':\n"
        "    print('rank one gives up', file=sys.stderr); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    with pytest.raises(NetlabError) as info, Lab(workers=2, rate="40mbit", topology="switch") as lab:
        lab_id = lab.lab_id
        lab.run_ranks([sys.executable, "-c", script], timeout=30)
    err = info.value
    assert err.rank == 1 and err.returncode == 3
    assert "rank one gives up" in err.stderr_tail and "rank 1 exited with code 3" in str(err)
    assert err.returncodes[0] is not None and err.returncodes[0] < 0  # rank 0 was killed, not left running
    assert_nothing_left(lab_id, before)


@needs_netns
def test_timeout_and_orphaned_daemons_are_killed_and_two_labs_coexist():
    before = host_qdiscs()
    with Lab(workers=2, topology="switch") as outer:
        with Lab(workers=2, rate="100mbit", topology="shared") as inner:
            assert set(inner.namespaces()).isdisjoint(outer.namespaces())
            # a daemon that outlives its parent (as `ray start` leaves its processes behind)
            daemonize = "sleep 300 >/dev/null 2>&1 & echo $!"
            proc = inner.popen(0, ["sh", "-c", daemonize], stdout=subprocess.PIPE, text=True)
            daemon = int(proc.communicate(timeout=10)[0])
            assert pid_alive(daemon)
            with pytest.raises(NetlabError, match=re.escape("still running after 0.5s")):
                inner.run_ranks(["sleep", "30"], timeout=0.5)
        assert not pid_alive(daemon)
        assert inner.lab_id not in netns_list()
        assert outer.run_ranks(["true"], timeout=30)[1].returncode == 0  # the other lab is untouched
    assert_nothing_left(outer.lab_id, before)
    assert_nothing_left(inner.lab_id, before)


def _start_cli(*args: str) -> tuple[subprocess.Popen, str, list[int]]:
    """Start the CLI with 2 sleeping ranks; returns it, its lab id and the ranks' pids once both run."""
    # one write(2) per line: the two ranks share the CLI's stdout pipe, and print() may split a line
    rank = "import os, time; os.write(1, f'ready {os.getpid()}\\n'.encode()); time.sleep(60)"
    cli = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.netlab", "--workers", "2", *args, "--", sys.executable, "-c",
         rank],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lab_id, pids, seen = None, [], []
    while len(pids) < 2:
        line = cli.stdout.readline()
        seen.append(line)
        assert line, f"CLI ended early (exit {cli.poll()}): {''.join(seen)}"
        if m := re.search(r"lab ([0-9a-f]{6}) up", line):
            lab_id = m.group(1)
        if line.startswith("ready"):
            pids.append(int(line.split()[1]))
    assert lab_id, seen
    return cli, lab_id, pids


@needs_netns
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_interrupted_while_ranks_run_cleans_up(sig, code):
    before = host_qdiscs()
    cli, lab_id, pids = _start_cli("--rate", "100mbit", "--topology", "switch")
    os.killpg(cli.pid, sig)  # to its whole process group, as a Ctrl-C at a terminal is
    rest, _ = cli.communicate(timeout=30)
    assert cli.returncode == code, rest
    assert "lab removed" in rest
    assert_nothing_left(lab_id, before, pids)


@needs_netns
def test_cli_cleanup_removes_what_a_killed_run_left_and_keeps_live_labs():
    before = host_qdiscs()
    cli, lab_id, pids = _start_cli("--rate", "40mbit", "--topology", "shared")
    cli.kill()  # SIGKILL: no chance to clean up
    cli.wait(10)
    assert lab_id in netns_list() and all(pid_alive(p) for p in pids)
    with Lab(workers=1) as live:
        out = subprocess.run([sys.executable, "-m", "benchmarks.netlab", "--cleanup"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert lab_id in out.stderr
        assert live.namespaces()[0] in netns_list()
        assert live.lab_id not in " ".join(cleanup_leftovers()[0])  # our own live lab: kept
    assert_nothing_left(lab_id, before, pids)
    assert_nothing_left(live.lab_id, before)


@needs_netns
def test_shaping_reaches_the_rate_and_each_switch_port_is_full_duplex():
    before = host_qdiscs()
    rate = 40e6
    with Lab(workers=3, rate="40mbit", topology="switch") as lab:
        one_way = measure_tcp(lab, 0, 1, seconds=1.5)
        both_ways = measure_concurrent(lab, [(0, 1), (1, 0)], seconds=1.5)
        into_one = measure_concurrent(lab, [(0, 2), (1, 2)], seconds=1.5)
        switch_id = lab.lab_id
    assert 0.75 * rate <= one_way <= 1.25 * rate, one_way
    assert all(0.75 * rate <= r <= 1.25 * rate for r in both_ways), both_ways  # own link each way
    assert 0.75 * rate <= sum(into_one) <= 1.25 * rate, into_one  # two senders share rank 2's download
    with Lab(workers=2, rate="40mbit", topology="shared") as lab:
        shared = measure_concurrent(lab, [(0, 1), (1, 0)], seconds=1.5)
        shared_id = lab.lab_id
    assert 0.75 * rate <= sum(shared) <= 1.25 * rate, shared  # one link for all traffic
    with Lab(workers=2, rate=None, topology="switch") as lab:
        unshaped = measure_tcp(lab, 0, 1, seconds=0.5)
        unshaped_id = lab.lab_id
    assert unshaped > 10 * rate, unshaped
    for lab_id in (switch_id, shared_id, unshaped_id):
        assert_nothing_left(lab_id, before)


def test_lab_ray_cluster_refuses_bad_roles_naming_them():
    from benchmarks.netlab.raycluster import LabRayCluster

    with pytest.raises(ValueError, match="switch-topology"):
        LabRayCluster(Lab(4, topology="shared"))
    with pytest.raises(ValueError, match="rank=4"):
        LabRayCluster(Lab(4), nodes=[2, 3, 4])  # the lab has ranks 0..3
    with pytest.raises(ValueError, match="each rank may hold one role"):
        LabRayCluster(Lab(4), client=1, head=1, nodes=[2, 3])
    with pytest.raises(ValueError, match="node_cpus=0"):
        LabRayCluster(Lab(4), nodes=[2, 3], node_cpus=0)
    with pytest.raises(ValueError, match="75 MiB"):
        LabRayCluster(Lab(4), nodes=[2, 3], object_store_bytes=1 << 20)
    cluster = LabRayCluster(Lab(4), nodes=[2, 3])
    assert cluster.jobs_address == "http://10.211.0.2:8265" and cluster.gcs_address == "10.211.0.2:6379"
    with pytest.raises(ValueError, match="rank 0 runs no Ray node"):
        cluster.kill_node(0)


@needs_netns
def test_popen_without_inheriting_gets_only_the_given_environment(monkeypatch):
    monkeypatch.setenv("GW_NETLAB_LEAK", "from-the-caller")
    with Lab(workers=1) as lab:
        given = {"PATH": os.environ["PATH"], "ONLY": "this"}
        alone = lab.popen(0, ["env"], env=given, inherit_env=False, stdout=subprocess.PIPE, text=True)
        inherited = lab.popen(0, ["env"], env={"ONLY": "this"}, stdout=subprocess.PIPE, text=True)
        alone_out, inherited_out = alone.communicate(timeout=30)[0], inherited.communicate(timeout=30)[0]
    assert "ONLY=this" in alone_out and "GW_NETLAB_LEAK" not in alone_out, alone_out
    assert "ONLY=this" in inherited_out and "GW_NETLAB_LEAK=from-the-caller" in inherited_out
