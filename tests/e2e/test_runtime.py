"""End to end on a real loopback Ray: a killed worker, gradient coding, telemetry, a diverging job.

Each ``run_job`` is one Ray Train fit (~20 s here), so the claims share fits:

* a reference run streams telemetry to a recording gRPC sink;
* the same job with rank 1 SIGKILLed at step 30 (checkpoints every 20 steps) restarts from step
  20 and must end bit for bit where the reference ended, model and every rank's compressor state
  (PowerSGD with error feedback: residuals and warm-start Q); its telemetry address has no sink,
  so it also shows that training runs on and counts what it could not send; the restored group
  is attempt 1 (its checkpoints say so), the reference's reports attempt 0 from Ray's node IP;
* a cyclic-repetition coded run with injected stragglers and the uncoded run of the same data
  (which waits for the same injected stragglers) reach the same loss;
* a learning rate of 10⁶ makes the gradients NaN within a few steps: the job stops with a reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradwire.cli import app
from gradwire.spec import JobSpec
from tests.grpc_sink import free_port, start_sink

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parents[2] / "examples" / "specs"
STEPS = 60
KILL_STEP = 30


def digits_spec(storage: Path) -> JobSpec:
    return JobSpec.from_file(EXAMPLES / "digits-powersgd.yaml").with_overrides(
        [
            f"steps={STEPS}",
            "workers.count=2",
            "workers.cpus_per_worker=0.5",
            "checkpoint.every_steps=20",
            f"checkpoint.storage={storage}",
        ]
    )


def final_checkpoint(metrics: dict) -> Path:
    return Path(metrics["checkpoint"])


def assert_same_state(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are identical (bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: differs (max |Δ| {float((a.double() - b.double()).abs().max())})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_killed_worker_resumes_bit_exact_and_telemetry(local_ray, tmp_path):
    from gradwire.worker.launch import run_job

    server, sink, port = start_sink()
    try:
        reference = run_job(digits_spec(tmp_path / "ref"), job_id="ref", telemetry=f"127.0.0.1:{port}")
    finally:
        server.stop(grace=None)

    marker = tmp_path / "killed.marker"
    nobody = f"127.0.0.1:{free_port()}"  # no sink listens here
    # wait_s: Ray Train takes in reported checkpoints at its next worker poll (every 2 s)
    fault = {"rank": 1, "step": KILL_STEP, "marker": str(marker), "wait_s": 5.0}
    killed = run_job(digits_spec(tmp_path / "killed"), telemetry=nobody, loop_config={"fault": fault})

    # the kill happened, and Ray Train restarted the group from the checkpoint before it
    assert marker.exists(), "the fault was never injected"
    assert killed["start_step"] == 20 and killed["step"] == STEPS
    assert reference["start_step"] == 0 and reference["step"] == STEPS

    # bit-exact: model, optimizer and each rank's compressor state (error feedback, warm start)
    ref_dir, killed_dir = final_checkpoint(reference), final_checkpoint(killed)
    for name in ("model.pt", "optimizer.pt", "rank0.pt", "rank1.pt"):
        assert_same_state(torch.load(ref_dir / name), torch.load(killed_dir / name), name)
    residual = torch.load(ref_dir / "rank1.pt")["step"]["compressor"]
    assert residual, "rank 1 saved no compressor state"
    assert reference["bytes_sent"] == killed["bytes_sent"]
    # the attempt count travels with the checkpoints: Ray Train's restore made attempt 1
    assert json.loads((ref_dir / "progress.json").read_text()) == {"step": STEPS, "attempt": 0}
    assert json.loads((killed_dir / "progress.json").read_text()) == {"step": STEPS, "attempt": 1}

    # telemetry: every rank's reports arrived, in order, with the fields filled
    for rank in (0, 1):
        reports = sink.by_rank(rank)
        assert [r.step for r in reports] == list(range(1, STEPS + 1)), f"rank {rank}"
        assert all(r.job_id == "ref" and r.compressor == "powersgd" for r in reports)
        assert all(r.loss > 0 and r.compute_s > 0 and r.learning_rate > 0 for r in reports)
        assert all(r.samples == 32 for r in reports)
        sent = [r.bytes_sent for r in reports]
        assert sent == sorted(sent) and sent[-1] == reference["bytes_sent"]
        assert reports[-1].bytes_uncompressed == reference["bytes_uncompressed"]
        assert reports[-1].HasField("accuracy") and not reports[0].HasField("accuracy")
        assert all(r.HasField("wall_time") for r in reports)
        # placement and attempt from the worker itself: Ray's node IP (the loopback head), first run
        assert {(r.attempt, r.node_address) for r in reports} == {(0, "127.0.0.1")}, f"rank {rank}"
    assert reference["telemetry_sent"] == STEPS and reference["telemetry_dropped"] == 0

    # no sink: the run finished, every report of its last attempt was counted as dropped, and
    # steps ran at the pace of the reference (loose bound: the machine is shared)
    assert killed["telemetry_sent"] == 0 and killed["telemetry_dropped"] == STEPS - 20
    ref_rate = STEPS / reference["wall_seconds"]
    killed_rate = (STEPS - 20) / killed["wall_seconds"]
    message = f"{killed_rate:.1f} steps/s without a sink vs {ref_rate:.1f} with one"
    assert killed_rate > 0.4 * ref_rate, message


def test_cyclic_code_with_stragglers_matches_uncoded(local_ray, tmp_path):
    from gradwire.worker.launch import run_job

    common = [
        "steps=60",
        "compression.name=none",
        "workers.count=4",
        "workers.cpus_per_worker=0.5",
        "checkpoint.every_steps=null",
        "stragglers.inject.slowdown=20",
    ]
    base = JobSpec.from_file(EXAMPLES / "breast-cancer-coded.yaml")
    coded_spec = base.with_overrides([*common, f"checkpoint.storage={tmp_path / 'coded'}"])
    assert coded_spec.stragglers.code == "cyclic" and coded_spec.stragglers.s == 1
    # the uncoded baseline keeps the injected stragglers and waits for them (code 'none')
    plain_spec = base.with_overrides(
        [*common, f"checkpoint.storage={tmp_path / 'plain'}", "stragglers.code=none", "stragglers.s=0"]
    )
    assert plain_spec.injection() == coded_spec.injection()

    coded = run_job(coded_spec)
    plain = run_job(plain_spec)

    assert coded["step"] == plain["step"] == 60
    assert coded["stragglers"] > 0, "no straggler was left out: the injection did not bite"
    assert plain["stragglers"] == 0
    # the decoded gradient is the full gradient: same trajectory up to float rounding
    assert abs(coded["eval_loss"] - plain["eval_loss"]) < 1e-4, (coded["eval_loss"], plain["eval_loss"])
    coded_model = torch.load(final_checkpoint(coded) / "model.pt")
    plain_model = torch.load(final_checkpoint(plain) / "model.pt")
    for name, tensor in plain_model.items():
        assert torch.allclose(coded_model[name], tensor, atol=1e-5, rtol=1e-4), name
    # each coded worker computes (s + 1)/n = 2/4 of the data: twice the load, same bytes per step
    assert coded["bytes_uncompressed"] == plain["bytes_uncompressed"]


def test_diverging_job_stops_with_a_reason(local_ray, tmp_path):
    args = ["train", str(EXAMPLES / "digits-powersgd.yaml"), "--workers", "2", "--no-progress"]
    for override in ("optimizer.lr=1e6", "workers.cpus_per_worker=0.5", f"checkpoint.storage={tmp_path}"):
        args += ["--set", override]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "240"})
    assert result.exit_code == 1, result.output
    assert "STOPPED" in result.output and "non-finite gradients" in result.output
    steps = int(re.search(r"steps\s*│\s*(\d+)", result.output).group(1))
    assert steps < 10, f"trained {steps} steps on garbage"


def test_sequential_code_is_refused_before_any_worker_starts(tmp_path):
    result = CliRunner().invoke(
        app, ["train", str(EXAMPLES / "synthetic-msgc.yaml"), "--set", f"checkpoint.storage={tmp_path}"]
    )
    assert result.exit_code == 2, result.output
    assert "stragglers.code" in result.output and "m-sgc" in result.output
    assert not any(tmp_path.iterdir())
