"""benchmarks/linkrun.py on two real gloo ranks: methods taking turns in one process give each method
its own timed steps, bytes and hook clocks; bad method lists are refused before any rank connects."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import linkrun
from tests.waiting import free_port

ROOT = Path(__file__).resolve().parents[2]


def _two_ranks(args: list[str], out: Path) -> dict:
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "GLOO_SOCKET_IFNAME": "lo"}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "benchmarks" / "linkrun.py"), *args, "--out", str(out)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]  # fmt: skip
    for p in procs:
        output, _ = p.communicate(timeout=240)
        assert p.returncode == 0, output.decode()[-3000:]
    return json.loads(out.read_text())


def test_methods_taking_turns_each_get_their_own_steps_bytes_and_clocks(tmp_path):
    methods = ["compute-only", "powersgd:2", "topk:ef", "powersgd:2+overlap"]
    got = _two_ranks(["--model", "digits_cnn", "--methods", ",".join(methods), "--steps", "3",
                      "--warmup", "2", "--turn", "2"], tmp_path / "turns.json")  # fmt: skip
    runs = got["runs"]
    assert [r["method"] for r in runs] == methods
    assert all(len(r["step_seconds"]) == 3 and r["steps"] == 3 and r["workers"] == 2 for r in runs)
    assert all(t > 0 for r in runs for t in r["step_seconds"])
    floor, psgd, topk, overlapped = runs
    # on several buckets with the hook's thread: the same bytes as on one bucket
    assert overlapped["bytes_per_step"] == psgd["bytes_per_step"]
    # the ledgers count the timed steps only (the warm-up steps' bytes, PowerSGD's plain ones, are left out)
    assert floor["bytes_per_step"] == 0
    assert psgd["bytes_per_step"] == 41536 and topk["bytes_per_step"] == 87048
    assert floor["compress_seconds_per_step"] == 0
    assert psgd["compress_seconds_per_step"] > 0 and topk["communicate_seconds_per_step"] > 0


def test_a_single_method_run_records_the_same_bytes_after_powersgds_plain_start(tmp_path):
    # gradwire's PowerSGD starts with the plain steps torch's hook needs: the same algorithm for both
    start = linkrun.TORCH_START_ITER
    defaults = linkrun.parse_args(["--method", "powersgd:2", "--out", str(tmp_path / "x.json")])
    assert defaults.psgd_start == start
    got = _two_ranks(["--model", "digits_cnn", "--method", "powersgd:2", "--steps", "2", "--warmup", "2"],
                     tmp_path / "one.json")
    assert got["method"] == "powersgd:2" and got["bytes_per_step"] == 41536 and len(got["step_seconds"]) == 2
    argv = ["--model", "digits_cnn", "--method", "powersgd:2", "--steps", str(start), "--warmup", "0"]
    plain_start = _two_ranks(argv, tmp_path / "start.json")
    assert plain_start["bytes_per_step"] == 4 * plain_start["params"]  # every timed step all-reduced plain
    compressed_start = _two_ranks([*argv, "--psgd-start", "0"], tmp_path / "no-start.json")
    assert compressed_start["bytes_per_step"] == 41536


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--methods", "powersgd:2,bogus"], "unknown method 'bogus'"),
        (["--methods", "fp16,qsgd", "--eval-every", "5"], "--eval-every needs a single --method"),
        (["--methods", "fp16", "--turn", "0"], "--turn"),
        (["--method", "powersgd:2", "--psgd-start", "-1"], "--psgd-start must be >= 0"),
        (["--methods", "torch-powersgd:2+overlap"], "'+overlap' is for gradwire methods"),
        (["--method", "allreduce+overlap"], "'+overlap' is for gradwire methods"),
    ],
)
def test_bad_method_lists_are_refused_by_name(argv, why, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        linkrun.parse_args([*argv, "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and why in capsys.readouterr().err
