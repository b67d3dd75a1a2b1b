"""`make demo`'s script as a new user runs it: `gradwire serve` with its embedded Ray, one digits job
submitted over REST under the coordinator's default policy, followed to SUCCEEDED."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_service_demo_runs_a_job_to_success() -> None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        pytest.skip("needs the 'server' and 'train' extras")
    done = subprocess.run(
        [sys.executable, "examples/service_demo.py", "--steps", "40"],
        cwd=ROOT, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "SUCCEEDED" in output, output[-4000:]
    assert "compression ratio" in output, output[-4000:]
