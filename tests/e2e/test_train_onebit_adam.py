"""End to end: `gradwire train` of a job whose optimizer is onebit_adam, on a real (loopback) Ray with Ray
Train's TorchTrainer: it learns, the summary's bytes are the optimizer's (plain gradients for the
warm-up steps, about 32x fewer after), and each rank's checkpoint holds its own optimizer state."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from gradwire.cli import app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the 'ray' extra"),
]

STEPS, FREEZE = 40, 4
SPEC = {
    "name": "digits-onebit-adam",
    "model": {"name": "mlp", "params": {"hidden": [64]}},
    "data": {"dataset": "digits", "batch_size": 32},
    "optimizer": {"name": "onebit_adam", "lr": 0.01, "freeze_step": FREEZE},
    "steps": STEPS,
    "workers": {"count": 2, "cpus_per_worker": 0.5},
    "compression": {"name": "none"},
}


def _value(output: str, label: str) -> str:
    match = re.search(rf"{re.escape(label)}\s*│\s*(\S+)", output)
    assert match, f"no {label!r} row in the summary:\n{output}"
    return match.group(1)


def test_train_a_onebit_adam_spec_under_ray_train(local_ray, tmp_path: Path):
    path = tmp_path / "digits-onebit-adam.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(
        app, ["train", str(path), "--set", f"checkpoint.storage={tmp_path}"], env={"COLUMNS": "240"}
    )
    assert result.exit_code == 0, result.output
    assert int(_value(result.output, "steps")) == STEPS
    accuracy = float(_value(result.output, "test accuracy"))
    assert accuracy > 0.5, f"accuracy {accuracy} is near chance (0.1)"

    sent = int(_value(result.output, "bytes sent (rank 0)").replace(",", ""))
    plain = int(_value(result.output, "bytes uncompressed").replace(",", ""))
    per_step = plain // STEPS  # what a plain all-reduce sends each step
    # the warm-up steps send every gradient; the rest one bit per element (+ a scale per tensor and the
    # one schedule check at the freeze): far below a plain all-reduce's bytes
    assert FREEZE * per_step < sent < FREEZE * per_step + (STEPS - FREEZE) * per_step / 20, (sent, plain)

    (run,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name == SPEC["name"]]
    newest = max(p for p in run.glob("checkpoint_*") if p.is_dir())
    shared = torch.load(newest / "optimizer.pt", weights_only=False)
    assert shared["optimizer"] is None and shared["optimizer_ranks"] == 2
    for rank in (0, 1):
        own = torch.load(newest / f"rank{rank}.pt", weights_only=False)
        assert (
            own["optimizer"]["onebit"]["rank"] == rank and own["optimizer"]["onebit"]["steps_taken"] == STEPS
        )
