"""``python -m benchmarks.netlab``: run a command once per rank inside a lab, measure a lab's link, or
remove what killed labs left behind.

    python -m benchmarks.netlab --workers 4 --rate 100mbit --topology switch -- python rank.py ARGS
    python -m benchmarks.netlab --measure --rate 100mbit [--topology shared] [--seconds 2]
    python -m benchmarks.netlab --cleanup [--force]

Exit status: 0 when every rank exited 0; 1 when a rank failed, timed out or the lab could not be built;
130 on Ctrl-C and 143 on SIGTERM (after cleanup); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.netlab import (  # noqa: E402
    NS_PREFIX,
    TOPOLOGIES,
    Lab,
    NetlabError,
    cleanup_leftovers,
    format_rate,
    measure_tcp,
    parse_rate,
)
from benchmarks.netlab.shaping import QDISCS  # noqa: E402


def _say(msg: str) -> None:
    print(f"netlab: {msg}", file=sys.stderr, flush=True)


def _rate(text: str) -> str:
    try:
        parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.netlab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--rate", type=_rate, default="none",
                   help="link rate, e.g. 100mbit, 1gbit; 'none' = unshaped (default)")
    p.add_argument("--topology", choices=TOPOLOGIES, default="switch")
    p.add_argument("--qdisc", choices=QDISCS, default="tbf")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks are killed")
    p.add_argument("--measure", action="store_true", help="time a TCP transfer rank 0 -> rank 1 instead")
    p.add_argument("--seconds", type=float, default=2.0, help="--measure: how long to send")
    p.add_argument("--cleanup", action="store_true",
                   help=f"remove namespaces named {NS_PREFIX}* left by labs whose process is gone")
    p.add_argument("--force", action="store_true", help="--cleanup: also labs whose process still runs")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... run once per rank")
    return p


def main(args: list[str] | None = None) -> int:
    parser = _parser()
    opts = parser.parse_args(args)
    argv = opts.argv[1:] if opts.argv[:1] == ["--"] else opts.argv
    modes = sum([opts.cleanup, opts.measure, bool(argv)])
    if modes != 1:
        parser.error("give exactly one of: -- COMMAND..., --measure, --cleanup")
    if opts.workers < 1:
        parser.error(f"--workers {opts.workers}: need at least 1")
    try:
        if opts.cleanup:
            removed, kept = cleanup_leftovers(force=opts.force)
            _say(f"removed {len(removed)} namespaces" + "".join(f"\n  {n}" for n in removed))
            if kept:
                _say(f"kept {len(kept)} of labs still running (--force removes them too)"
                     + "".join(f"\n  {n}" for n in kept))
            return 0
        if opts.measure and opts.workers < 2:
            parser.error("--measure needs --workers 2 or more")
        with Lab(opts.workers, opts.rate, opts.topology, qdisc=opts.qdisc) as lab:
            _say(f"lab {lab.lab_id} up: {lab.describe()}")
            if opts.measure:
                bits = measure_tcp(lab, 0, 1, seconds=opts.seconds)
                print(f"rank 0 -> rank 1 ({opts.topology}, {format_rate(lab.rate_bits)}): "
                      f"{bits / 1e6:.1f} Mbit/s", flush=True)
                return 0
            try:
                results = lab.run_ranks(argv, timeout=opts.timeout, capture=False)
            except NetlabError as exc:
                for rank, code in enumerate(exc.returncodes or []):
                    _say(f"rank {rank}: " + ("killed (still running)" if code is None else f"exit {code}"))
                raise
            for rank, res in enumerate(results):
                _say(f"rank {rank}: exit {res.returncode}")
            return 0
    except NetlabError as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted; lab removed")
        return 130
    except SystemExit as exc:
        if isinstance(exc.code, int) and exc.code > 128:
            _say(f"terminated by signal {exc.code - 128}; lab removed")
        raise


if __name__ == "__main__":
    sys.exit(main())
