"""compression: auto on real shaped links (netlab, 2 gloo ranks): the choice follows the link.

Needs root and network namespaces (CI runs as root); skipped with the reason elsewhere."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.netlab import Lab, support_problem

PROBLEM = support_problem()
needs_netns = pytest.mark.skipif(PROBLEM is not None, reason=f"netlab cannot run here: {PROBLEM}")
pytestmark = [pytest.mark.multiprocess, needs_netns]

# an MLP of hidden width sys.argv[1] with DDP and make_hook("auto"); prints auto's choice and the
# decision's inputs.
# Random labels give gradients of flat spectrum, which the quality guard would rule PowerSGD out for
# (tests/unit/test_auto.py tests the guard): min_energy=0 here, so only the link decides.
RANK = """
import datetime, json, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from gradwire.compressors import current_choice, make_hook
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=120))
torch.manual_seed(0)
w = int(sys.argv[1])
layers = [torch.nn.Linear(64, w), torch.nn.ReLU(), torch.nn.Linear(w, w), torch.nn.ReLU()]
model = torch.nn.Sequential(*layers, torch.nn.Linear(w, 10))
ddp = DistributedDataParallel(model)
state, hook = make_hook(
    "auto", probe_after=2, min_energy=0.0, candidates=["none", "powersgd-r2"], optimizer="sgd"
)
ddp.register_comm_hook(state, hook)
gen = torch.Generator().manual_seed(dist.get_rank())
for step in range(4):
    x, y = torch.randn(32, 64, generator=gen), torch.randint(10, (32,), generator=gen)
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
d = state.reducer.last_decision
print(json.dumps({"choice": current_choice(state), "bandwidth": d["bandwidth"], "alpha": d["alpha_s"],
                  "predicted": d["predicted_s"], "probe_bytes": state.stats()["probe_bytes"],
                  "link_from": d["link_from"]}), flush=True)
dist.destroy_process_group()
os._exit(0)  # gloo may abort in the interpreter's teardown (torch 2.13; benchmarks/linkrun.py, exit_now)
"""


def choices_on(rate: str | None, width: int) -> list[dict]:
    with Lab(workers=2, rate=rate, topology="switch") as lab:
        argv = [sys.executable, "-c", RANK, str(width)]
        done = lab.run_ranks(argv, env={"OMP_NUM_THREADS": "1"}, timeout=180)
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in done]


def test_a_slow_link_picks_powersgd_and_a_fast_one_plain_all_reduce():
    # What decides is bytes against α and compression time, so the margins are set by the model's size:
    # 300 k parameters on 100 Mbit/s (96 ms of plain all-reduce against a few α and ms of PowerSGD,
    # whatever α the machine's load makes), 3.4 k on the unshaped link (14 kB: two α of PowerSGD's
    # second round and its fixed cost outweigh what it saves).
    slow, fast = choices_on("100mbit", 512), choices_on(None, 32)
    for found in (slow, fast):
        assert found[0] == found[1]  # every rank: the same choice from the same agreed numbers
    assert slow[0]["choice"].startswith("auto:powersgd"), slow[0]
    # the fit saw a link of about 100 Mbit/s (burst included) in the step before the choice: its plain
    # all-reduce of 1.2 MB took about 0.1 s there, so the sizing and large probes did not run (only 4
    # all-reduces of 4 KiB did)
    assert 0.6 * 12.5e6 < slow[0]["bandwidth"] < 1.6 * 12.5e6, slow[0]
    assert slow[0]["link_from"] == "exchanges" and slow[0]["probe_bytes"] == 4 * 4096, slow[0]
    assert fast[0]["choice"] == "auto:none", fast[0]
    assert fast[0]["bandwidth"] > 10 * slow[0]["bandwidth"]


def test_the_fitted_bandwidth_is_the_link_s_and_a_slow_link_is_probed_briefly():
    # The large probe is sized to take about 25 ms: long enough at 1 Gbit/s that α's jitter does not
    # inflate the fitted bandwidth (a fixed 1 MiB probe fitted 2 Gbit/s there under load), short at
    # 100 Mbit/s (a fixed 2 MiB one moved 8 MiB, 0.7 s, before the first choice).
    for rate, bytes_per_s in (("1gbit", 125e6), ("100mbit", 12.5e6)):
        found = choices_on(rate, 32)
        assert found[0]["bandwidth"] == found[1]["bandwidth"]
        assert 0.6 * bytes_per_s < found[0]["bandwidth"] < 1.6 * bytes_per_s, (rate, found[0])
        assert found[0]["link_from"] == "probes"  # 3.4 k parameters a step resolve no bandwidth
        if rate == "100mbit":
            assert found[0]["probe_bytes"] < 3 << 20, found[0]
