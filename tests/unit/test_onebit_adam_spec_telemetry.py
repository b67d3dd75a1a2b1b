"""The coordinator labels a onebit_adam job's step reports with what its workers run,
``onebit_adam:<compressor>`` (its compression section says none: the optimizer compresses its own
steps), and still lets no report invent another label."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.store import JobStore
from gradwire.server.telemetry_gate import TelemetryBounds, TelemetryGate
from gradwire.spec import JobSpec, onebit_adam_label

SPEC = {
    "name": "onebit",
    "model": {"name": "mlp"},
    "data": {"dataset": "digits", "batch_size": 32},
    "steps": 100,
    "workers": {"count": 2},
    "optimizer": {"name": "onebit_adam", "lr": 0.003},
}


@pytest.mark.parametrize(
    ("optimizer", "label"),
    [
        ({}, "onebit_adam:sign"),
        ({"compressor": "powersgd", "compressor_params": {"rank": 2}}, "onebit_adam:powersgd"),
        ({"name": "adam"}, "none"),
    ],
)
def test_reports_of_a_onebit_adam_job_carry_its_label(tmp_path: Path, optimizer: dict, label: str):
    spec = JobSpec.from_dict({**SPEC, "optimizer": {**SPEC["optimizer"], **optimizer}})
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db")
    try:
        job, _ = store.create(spec.model_dump(mode="json"))
        gate = TelemetryGate(TelemetryBounds())
        gate.open(job, "00" * 32)
        honest = pb.StepReport(job_id=job.id, rank=0, step=1, bytes_sent=1_000, bytes_uncompressed=32_000,
                               compressor=label)  # fmt: skip
        invented = pb.StepReport(job_id=job.id, rank=1, step=1, bytes_sent=1_000, bytes_uncompressed=32_000,
                                 compressor="onebit_adam:evil")  # fmt: skip
        kept, why = gate.screen([honest, invented])
        assert not why and [r.compressor for r in kept] == [label, label]
    finally:
        store.close()


def test_the_label_matches_what_the_workers_report():
    """DdpStep reports ``onebit_adam:<the momentum reducer's name>``; the gate's label is the same."""
    import torch

    from gradwire.worker.runtime import make_optimizer
    from gradwire.worker.steps import OptimizerHook

    for compressor in ("sign", "topk", "qsgd"):
        spec = JobSpec.from_dict({**SPEC, "optimizer": {**SPEC["optimizer"], "compressor": compressor}})
        opt = make_optimizer(spec.optimizer, torch.nn.Linear(4, 2).parameters(), total_steps=100)
        reported = OptimizerHook(opt, spec.optimizer.name).compressor()
        assert (
            reported
            == onebit_adam_label(spec.model_dump(mode="json")["optimizer"])
            == f"onebit_adam:{compressor}"
        )
