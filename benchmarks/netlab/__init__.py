"""netlab: run a job's ranks (or a whole local Ray cluster) in network namespaces behind links of a given
rate, shaped with tbf/htb, and remove everything again on every exit path. See docs/netlab.md.

    from benchmarks.netlab import Lab, NetlabError, parse_rate
    with Lab(workers=4, rate="100mbit", topology="switch") as lab:
        results = lab.run_ranks([sys.executable, "train_rank.py"])
"""

from benchmarks.netlab.lab import TOPOLOGIES, Lab
from benchmarks.netlab.netns import NS_PREFIX, NetlabError, cleanup_leftovers, support_problem
from benchmarks.netlab.shaping import Shape, format_rate, parse_rate
from benchmarks.netlab.throughput import measure_concurrent, measure_tcp

__all__ = [
    "NS_PREFIX",
    "TOPOLOGIES",
    "Lab",
    "NetlabError",
    "Shape",
    "cleanup_leftovers",
    "format_rate",
    "measure_concurrent",
    "measure_tcp",
    "parse_rate",
    "support_problem",
]
