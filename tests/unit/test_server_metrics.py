"""CoordinatorMetrics: exact values read back from the Prometheus text exposition (no network)."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from gradwire.protos import telemetry_pb2 as pb
from gradwire.server.metrics import JOB_LABEL, PHASES, CoordinatorMetrics
from gradwire.server.states import JobState

CONTRACT = {
    "gradwire_grad_bytes_uncompressed": ("counter", {"job_id", "compressor"}),
    "gradwire_grad_bytes_sent": ("counter", {"job_id", "compressor"}),
    "gradwire_step_seconds": ("histogram", {"job_id", "phase"}),
    "gradwire_train_steps": ("counter", {"job_id"}),
    "gradwire_train_loss": ("gauge", {"job_id"}),
    "gradwire_eval_accuracy": ("gauge", {"job_id"}),
    "gradwire_stragglers": ("counter", {"job_id"}),
    "gradwire_straggler_wait_seconds": ("counter", {"job_id"}),
    "gradwire_jobs": ("gauge", {"state"}),
    "gradwire_job_transitions": ("counter", {"from", "to"}),
    "gradwire_worker_restarts": ("counter", {"job_id"}),
    "gradwire_compressor_active": ("gauge", {"job_id", "compressor"}),
    "gradwire_http_requests": ("counter", {"route", "method", "status"}),
    "gradwire_http_request_duration_seconds": ("histogram", {"route", "method"}),
    "gradwire_telemetry_reports_received": ("counter", set()),
    "gradwire_telemetry_reports_dropped": ("counter", {"reason"}),
}


def scrape(m: CoordinatorMetrics) -> dict[tuple[str, frozenset], float]:
    """Every sample of a render(), keyed by (sample name, frozenset of label pairs)."""
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def report(job: str, rank: int, step: int, sent: int, unc: int, **extra) -> pb.StepReport:
    out = {
        "job_id": job, "rank": rank, "step": step, "bytes_sent": sent, "bytes_uncompressed": unc,
        "compressor": "topk", "loss": 1.0 / (step + 1), "compute_s": 0.02, "compress_s": 0.003,
        "communicate_s": 0.004, "wait_s": 0.001,
    }  # fmt: skip
    out.update(extra)
    return pb.StepReport(**out)


def test_exactly_the_contract_families() -> None:
    m = CoordinatorMetrics()
    m.observe_report(report("a", 0, 0, 10, 40, accuracy=0.5, stragglers=[1]))
    m.observe_transition("QUEUED", "STARTING")
    m.worker_restarted("a")
    m.compressor_active("a", "topk")
    m.observe_request("/v1/jobs", "GET", 200, 0.01)
    body, _ = m.render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(families) == set(CONTRACT)
    for name, (kind, labels) in CONTRACT.items():
        assert families[name].type == kind, name
        for s in families[name].samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    assert not any(s.name.endswith("_created") for f in families.values() for s in f.samples)


def test_no_family_has_a_job_label() -> None:
    """``job`` is Prometheus's scrape-job label: a gradwire family using it would be renamed to
    ``exported_job`` (or overwritten by a ServiceMonitor) and every per-job panel would go empty."""
    assert JOB_LABEL == "job_id"
    per_job = {name for name, (_, labels) in CONTRACT.items() if JOB_LABEL in labels}
    assert len(per_job) == 10, per_job
    assert not any("job" in labels for _, labels in CONTRACT.values())


def test_bytes_are_the_sum_of_per_rank_increases() -> None:
    m = CoordinatorMetrics()
    rank0 = [(100, 400), (250, 800), (400, 1200)]
    rank1 = [(120, 400), (240, 800), (360, 1200)]
    for step, ((s0, u0), (s1, u1)) in enumerate(zip(rank0, rank1)):
        m.observe_report(report("a", 0, step, s0, u0))
        m.observe_report(report("a", 1, step, s1, u1))
    got = scrape(m)
    assert value(got, "gradwire_grad_bytes_sent_total", job_id="a", compressor="topk") == 400 + 360
    assert value(got, "gradwire_grad_bytes_uncompressed_total", job_id="a", compressor="topk") == 2400


def test_counters_going_backwards_never_make_bytes_negative() -> None:
    m = CoordinatorMetrics()
    for step, sent in enumerate([100, 200, 300]):
        m.observe_report(report("a", 0, step, sent, sent * 4))
    # the worker group restarts from a checkpoint taken at 150 bytes: that report counts nothing
    m.observe_report(report("a", 0, 1, 150, 600))
    got = scrape(m)
    assert value(got, "gradwire_grad_bytes_sent_total", job_id="a", compressor="topk") == 300
    # ... and becomes the baseline: the next step adds 180 - 150
    m.observe_report(report("a", 0, 2, 180, 720))
    got = scrape(m)
    assert value(got, "gradwire_grad_bytes_sent_total", job_id="a", compressor="topk") == 330
    assert value(got, "gradwire_grad_bytes_uncompressed_total", job_id="a", compressor="topk") == 1320


def test_steps_once_per_step_and_histogram_per_rank() -> None:
    m = CoordinatorMetrics()
    for step in range(5):
        for rank in range(3):
            m.observe_report(report("a", rank, step, step * 10, step * 40, wait_s=0.5 if rank == 0 else 9.0))
    got = scrape(m)
    assert value(got, "gradwire_train_steps_total", job_id="a") == 5
    for phase in PHASES:
        assert value(got, "gradwire_step_seconds_count", job_id="a", phase=phase) == 15
    assert value(got, "gradwire_step_seconds_sum", job_id="a", phase="compute") == pytest.approx(15 * 0.02)
    # the 20 ms compute samples are all at or below the 25 ms bucket and above 10 ms
    assert value(got, "gradwire_step_seconds_bucket", job_id="a", phase="compute", le="0.01") == 0
    assert value(got, "gradwire_step_seconds_bucket", job_id="a", phase="compute", le="0.025") == 15
    assert value(got, "gradwire_step_seconds_bucket", job_id="a", phase="compute", le="+Inf") == 15
    # straggler wait adds rank 0's wait once per step
    assert value(got, "gradwire_straggler_wait_seconds_total", job_id="a") == pytest.approx(2.5)


def test_loss_accuracy_and_stragglers_come_from_rank_0() -> None:
    m = CoordinatorMetrics()
    m.observe_report(report("a", 0, 0, 1, 1, loss=2.0, accuracy=0.25, stragglers=[1, 2]))
    m.observe_report(report("a", 1, 0, 1, 1, loss=9.0, accuracy=0.99, stragglers=[1, 2]))
    m.observe_report(report("a", 0, 1, 2, 2, loss=1.5, stragglers=[]))
    m.observe_report(report("a", 0, 2, 3, 3, loss=1.25, accuracy=0.75, stragglers=[3]))
    m.observe_report(report("a", 1, 2, 3, 3, loss=8.0, stragglers=[3]))
    got = scrape(m)
    assert value(got, "gradwire_train_loss", job_id="a") == 1.25
    assert value(got, "gradwire_eval_accuracy", job_id="a") == 0.75
    assert value(got, "gradwire_stragglers_total", job_id="a") == 3


def test_proto_reports_and_unset_accuracy() -> None:
    m = CoordinatorMetrics()
    msg = pb.StepReport(
        job_id="p", rank=0, step=0, loss=0.5, compute_s=0.1, bytes_sent=64, bytes_uncompressed=256,
        stragglers=[2], compressor="powersgd",
    )  # fmt: skip
    m.observe_report(msg)
    got = scrape(m)
    assert value(got, "gradwire_grad_bytes_sent_total", job_id="p", compressor="powersgd") == 64
    assert value(got, "gradwire_train_loss", job_id="p") == 0.5
    assert value(got, "gradwire_eval_accuracy", job_id="p") is None  # accuracy unset in the proto
    assert value(got, "gradwire_stragglers_total", job_id="p") == 1
    assert value(got, "gradwire_step_seconds_count", job_id="p", phase="wait") == 1
    with pytest.raises(ValueError, match="job_id"):
        m.observe_report(pb.StepReport(rank=0))
    with pytest.raises(TypeError, match="StepReport"):
        m.observe_reports([{"job_id": "p", "rank": 0}])  # one shape only


def test_transitions_job_counts_and_restarts() -> None:
    m = CoordinatorMetrics()
    m.observe_transition(None, JobState.QUEUED, job="a")  # a submission is not a transition
    m.observe_transition(JobState.QUEUED, JobState.STARTING)
    m.observe_transition("STARTING", "RUNNING")
    m.observe_transition("RUNNING", "RESTARTING", job="a")
    m.observe_transition("RESTARTING", "RUNNING", job="a")
    m.worker_restarted("a")
    m.set_job_counts({JobState.RUNNING: 2, "QUEUED": 3})
    got = scrape(m)
    assert value(got, "gradwire_job_transitions_total", **{"from": "QUEUED", "to": "STARTING"}) == 1
    assert value(got, "gradwire_job_transitions_total", **{"from": "RUNNING", "to": "RESTARTING"}) == 1
    assert value(got, "gradwire_worker_restarts_total", job_id="a") == 2
    moves = {labels for name, labels in got if name == "gradwire_job_transitions_total"}
    assert len(moves) == 4  # QUEUED→STARTING, STARTING→RUNNING, RUNNING⇄RESTARTING; no "None"→QUEUED
    assert value(got, "gradwire_jobs", state="RUNNING") == 2
    assert value(got, "gradwire_jobs", state="QUEUED") == 3
    assert value(got, "gradwire_jobs", state="FAILED") == 0
    m.set_job_counts({"RUNNING": 1})  # states left out of a full count drop to zero
    got = scrape(m)
    assert value(got, "gradwire_jobs", state="QUEUED") == 0
    assert value(got, "gradwire_jobs", state="RUNNING") == 1


def _feed(m: CoordinatorMetrics, job: str) -> None:
    m.observe_report(report(job, 0, 0, 10, 40, accuracy=0.5, stragglers=[1]))
    m.observe_report(report(job, 1, 0, 10, 40, compressor="qsgd"))
    m.worker_restarted(job)


def _jobs_in(samples: dict) -> set[str]:
    return {v for (_, labels) in samples for k, v in labels if k == "job_id"}


def test_forget_job_removes_every_series_of_that_job_only() -> None:
    m = CoordinatorMetrics()
    _feed(m, "a")
    _feed(m, "b")
    assert _jobs_in(scrape(m)) == {"a", "b"}
    m.forget_job("a")
    got = scrape(m)
    assert _jobs_in(got) == {"b"}
    assert value(got, "gradwire_grad_bytes_sent_total", job_id="b", compressor="qsgd") == 10
    assert m.known_jobs == {"b"}
    # a job seen again after being forgotten starts from a fresh byte baseline
    m.observe_report(report("a", 0, 5, 70, 280))
    assert value(scrape(m), "gradwire_grad_bytes_sent_total", job_id="a", compressor="topk") == 70
    m.forget_job("never-seen")  # harmless


def test_sweep_forgets_jobs_after_retention() -> None:
    now = [1000.0]
    m = CoordinatorMetrics(retention_s=60, clock=lambda: now[0])
    _feed(m, "done")
    _feed(m, "running")
    m.observe_transition("RUNNING", "SUCCEEDED", job="done")
    now[0] += 60
    assert m.sweep() == []
    assert _jobs_in(scrape(m)) == {"done", "running"}
    now[0] += 1  # render() sweeps before each scrape
    assert _jobs_in(scrape(m)) == {"running"}
    assert m.sweep(now=now[0] + 10_000) == []  # a running job is never swept
    m.job_ended("running", at=0.0)
    assert m.sweep() == ["running"]
    assert _jobs_in(scrape(m)) == set()
    with pytest.raises(ValueError):
        CoordinatorMetrics(retention_s=-1)


def test_registries_are_independent() -> None:
    a, b = CoordinatorMetrics(), CoordinatorMetrics()
    a.observe_report(report("x", 0, 0, 5, 20))
    assert value(scrape(a), "gradwire_train_steps_total", job_id="x") == 1
    assert value(scrape(b), "gradwire_train_steps_total", job_id="x") is None


def test_a_batch_of_reports_gives_the_same_series_as_one_report_at_a_time():
    """observe_reports folds StepReports per job before touching the series: same result."""
    batch = []
    for step in range(1, 13):
        for rank in range(3):
            sent = 0 if (step == 7 and rank == 1) else 1_000 * step  # rank 1 restored at step 7
            r = pb.StepReport(
                job_id=f"job-{step % 2}", rank=rank, step=step,
                loss=float("nan") if step == 5 else 1.0 / step,
                compute_s=0.003 * step, compress_s=float("inf") if step == 3 else 0.0005, communicate_s=0.02,
                wait_s=-0.1 if step == 4 else 0.2 * rank, bytes_sent=sent, bytes_uncompressed=10 * sent,
                compressor="powersgd" if step < 9 else "", stragglers=[2] * (step % 3),
            )  # fmt: skip
            if step % 4 == 0:
                r.accuracy = 0.5 + step / 100
            batch.append(r)
    one, many = CoordinatorMetrics(), CoordinatorMetrics()
    for r in batch:
        one.observe_report(r)
    many.observe_reports(batch[:10])
    many.observe_reports(batch[10:])
    a, b = scrape(one), scrape(many)
    assert a.keys() == b.keys()
    for key in a:
        if a[key] != a[key]:  # NaN loss
            assert b[key] != b[key], key
        else:
            assert b[key] == pytest.approx(a[key], rel=1e-12), key
    assert value(b, "gradwire_train_steps_total", job_id="job-0") == 6
    assert value(b, "gradwire_step_seconds_count", job_id="job-1", phase="compress") == 15  # inf left out


def test_compressor_active_is_one_for_the_current_choice_and_zero_for_earlier_ones() -> None:
    m = CoordinatorMetrics()
    m.compressor_active("a", "auto:powersgd-r4")
    m.compressor_active("a", "auto:topk-1%")
    m.compressor_active("b", "none")
    samples = scrape(m)
    assert value(samples, "gradwire_compressor_active", job_id="a", compressor="auto:powersgd-r4") == 0
    assert value(samples, "gradwire_compressor_active", job_id="a", compressor="auto:topk-1%") == 1
    assert value(samples, "gradwire_compressor_active", job_id="b", compressor="none") == 1
    m.compressor_active("a", "auto:powersgd-r4")  # back to the first choice
    samples = scrape(m)
    assert value(samples, "gradwire_compressor_active", job_id="a", compressor="auto:powersgd-r4") == 1
    assert value(samples, "gradwire_compressor_active", job_id="a", compressor="auto:topk-1%") == 0
    m.forget_job("a")
    assert not [k for k in scrape(m) if k[0] == "gradwire_compressor_active" and ("job_id", "a") in k[1]]
    with pytest.raises(ValueError, match="empty"):
        m.compressor_active("b", "")
