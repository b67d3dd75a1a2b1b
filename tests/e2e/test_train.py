"""End to end: `gradwire train` on a real (loopback, 2-CPU) Ray with Ray Train's TorchTrainer.

One Ray instance serves the session (conftest.py); the training test is a single ~40 s fit. The byte ledger is
checked against PowerSGD's analytic payload (docs/algorithms.md §1.1): per step, each compressed
matrix a × b sends 4·min(r, a, b)·(a + b) bytes and every other tensor 4·numel; warm-up steps
(``start_iter``) send everything plain.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradwire.cli import app
from gradwire.spec import JobSpec

# ray is imported only by gradwire.worker.launch, after it set the loopback environment
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'ray' extra"),
]

SPEC = Path(__file__).parents[2] / "examples" / "specs" / "digits-powersgd.yaml"
STEPS = 60  # enough for > 0.9 test accuracy on digits with 2 workers


def invoke(*args: str):
    return CliRunner().invoke(app, ["train", str(SPEC), *args], env={"COLUMNS": "240"})


def table_value(output: str, label: str) -> str:
    match = re.search(rf"{re.escape(label)}\s*│\s*(\S+)", output)
    assert match, f"no {label!r} row in the summary:\n{output}"
    return match.group(1)


def powersgd_bytes_per_step(spec: JobSpec) -> tuple[int, int]:
    """(compressed step, plain step) payload bytes for the spec's model, from its shapes."""
    from gradwire.worker.datasets import get_dataset
    from gradwire.worker.models import build_model

    data = get_dataset(spec.data.dataset, **spec.data.params)
    model = build_model(spec.model.name, data.num_features, data.num_classes, **spec.model.params)
    r = spec.compressor_config().rank
    compressed = plain = 0
    for p in model.parameters():
        plain += 4 * p.numel()
        if p.dim() >= 2:
            a, b = p.shape[0], p.numel() // p.shape[0]
            if a * b >= 2 * r * (a + b):  # min_compression_rate 2: compressed only if it halves the bytes
                compressed += 4 * min(r, a, b) * (a + b)
                continue
        compressed += 4 * p.numel()
    return compressed, plain


def test_train_digits_powersgd_two_workers(local_ray, tmp_path):
    result = invoke(
        "--workers", "2",
        "--set", f"steps={STEPS}",
        "--set", "workers.cpus_per_worker=0.5",
        "--set", f"checkpoint.storage={tmp_path}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    output = result.output
    assert "digits-powersgd — done" in output

    assert int(table_value(output, "steps")) == STEPS
    accuracy = float(table_value(output, "test accuracy"))
    assert accuracy > 0.5, f"accuracy {accuracy} is near chance (0.1)"

    spec = JobSpec.from_file(SPEC)
    warm = spec.compressor_config().start_iter
    compressed, plain = powersgd_bytes_per_step(spec)
    expected_sent = warm * plain + (STEPS - warm) * compressed
    assert int(table_value(output, "bytes sent (rank 0)").replace(",", "")) == expected_sent
    assert int(table_value(output, "bytes uncompressed").replace(",", "")) == STEPS * plain

    checkpoints = [p for p in (tmp_path / spec.name).glob("checkpoint_*") if p.is_dir()]
    assert checkpoints, "no checkpoint was written"
    saved = {p.name for p in max(checkpoints).iterdir()}
    assert {"model.pt", "optimizer.pt", "rank0.pt", "rank1.pt", "progress.json"} <= saved

    # the same folder with another spec (a larger budget) is refused before Ray trains: Ray Train
    # would continue the run it finds there, so the error names the fields and the ways out
    record = json.loads((tmp_path / spec.name / "gradwire-run.json").read_text())
    assert record["fingerprint"].startswith("sha256:") and record["training"]["steps"] == STEPS
    more = STEPS + 20
    again = ["--workers", "2", "--set", f"steps={more}", "--set", "workers.cpus_per_worker=0.5",
             "--set", f"checkpoint.storage={tmp_path}"]  # fmt: skip
    refused = invoke(*again)
    assert refused.exit_code == 2, refused.output
    assert f"steps: {STEPS} → {more}" in refused.output, refused.output
    assert "--resume" in refused.output and "another name" in refused.output
    after = [p for p in (tmp_path / spec.name).glob("checkpoint_*") if p.is_dir()]
    assert sorted(after) == sorted(checkpoints), "the refused run trained"

    # --resume continues that run from its last checkpoint; the restored ledger keeps counting
    result = invoke(*again, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resumed with a changed spec: steps: {STEPS} → {more}" in result.output
    assert int(table_value(result.output, "resumed from step")) == STEPS
    assert int(table_value(result.output, "steps")) == more
    sent = int(table_value(result.output, "bytes sent (rank 0)").replace(",", ""))
    assert sent == expected_sent + (more - STEPS) * compressed


def test_too_many_workers_fails_before_starting(local_ray, tmp_path):
    result = invoke("--workers", "8", "--set", f"checkpoint.storage={tmp_path}")  # 8 × 0.5 CPU > 2
    assert result.exit_code == 2, result.output
    assert "workers.count=8" in result.output
    assert not any(tmp_path.iterdir()), "a run was started"


def test_auto_reports_its_choices_in_the_summary(local_ray, tmp_path):
    """compression: auto under Ray Train: its first choice (after ``probe_after`` plain steps) and the
    re-measure 100 steps later are listed by ``gradwire train``'s summary, each a candidate of its
    config."""
    spec_path = SPEC.with_name("digits-auto.yaml")
    result = CliRunner().invoke(
        app,
        ["train", str(spec_path), "--set", "steps=110", "--set", f"checkpoint.storage={tmp_path}"],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 0, result.output
    line = next((ln for ln in result.output.splitlines() if ln.startswith("compression auto chose:")), None)
    assert line, result.output
    choices = re.findall(r"step (\d+): (\S+) \(", line)
    config = JobSpec.from_file(spec_path).compressor_config()
    assert choices and choices[0][0] == str(config.probe_after), line
    candidates = set(config.candidates)
    assert {choice for _, choice in choices} <= candidates, (line, candidates)
