"""Forged telemetry over real gRPC moves nothing; the job's own workers keep reporting (issue 17).

The coordinator's telemetry wiring without Ray: a SQLite job store, the Prometheus metrics, the
scheduler's ``on_reports`` (store points, feed metrics, spot restarts), a :class:`TelemetryGate`
attached to the store, and a :class:`TelemetrySink` on 127.0.0.1. Jobs are moved through their
states in the store as the scheduler would, each with its own telemetry secret.

Every forgery is followed by a genuine report, which must be stored and counted.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import time
import tracemalloc
from pathlib import Path

import grpc
import psutil
import pytest

from gradwire.protos import TELEMETRY_CA_ENV, TELEMETRY_TOKEN_ENV, TELEMETRY_TOKEN_METADATA
from gradwire.protos import telemetry_pb2 as pb
from gradwire.protos import telemetry_pb2_grpc as pb_grpc
from gradwire.server.metrics import CoordinatorMetrics
from gradwire.server.ray_cluster import RayCluster
from gradwire.server.ray_jobs import submission_id
from gradwire.server.scheduler import Scheduler
from gradwire.server.states import JobState
from gradwire.server.store import JobStore
from gradwire.server.telemetry_gate import TelemetryBounds, TelemetryGate, new_secret, secret_digest
from gradwire.server.telemetry_sink import TelemetrySink
from gradwire.worker.telemetry import TelemetryClient, to_proto
from tests.tls import self_signed

FAST = {"flush_s": 0.02, "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "connect_timeout_s": 2.0}
STEPS = 1000
WORKERS = 2
BYTES_PER_STEP = 4_000  # what a genuine rank adds to bytes_sent per step
CAP = 1 << 20  # the test's bytes-per-step ceiling


def spec(name: str) -> dict:
    return {
        "name": name, "model": {"name": "mlp"}, "data": {"dataset": "digits", "batch_size": 8},
        "optimizer": {"name": "sgd", "lr": 0.1}, "steps": STEPS, "epochs": None,
        "workers": {"count": WORKERS, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0},
        "compression": {"name": "powersgd", "rank": 2},
    }  # fmt: skip


class Telemetry:
    """The coordinator's telemetry path, started on 127.0.0.1, plus helpers to drive jobs."""

    def __init__(self, tmp: Path, **sink_args) -> None:
        self.store = JobStore(f"sqlite:///{tmp}/jobs.db")
        self.metrics = CoordinatorMetrics()
        self.scheduler = Scheduler(self.store, RayCluster(), self.metrics, telemetry_address=None)
        self.gate = TelemetryGate(TelemetryBounds(max_bytes_per_step=CAP, max_clock_skew_s=60.0))
        self.gate.attach(self.store)
        self.sink = TelemetrySink(
            self.scheduler.on_reports, on_counts=self._count, gate=self.gate, **sink_args
        )
        self.sink.start()
        self.secrets: dict[str, str] = {}
        self.steps: dict[tuple[str, int], int] = {}

    def _count(self, what: str, n: int) -> None:  # as Coordinator._count_reports
        if what == "received":
            self.metrics.reports_received(n)
        else:
            self.metrics.reports_dropped(what, n)

    def close(self) -> None:
        self.sink.stop(grace=0)
        self.gate.detach()
        self.store.close()

    def launch(self, name: str) -> str:
        """A job taken to RUNNING as the scheduler would: digest stored, then STARTING."""
        job, _ = self.store.create(spec(name))
        secret = new_secret()
        self.store.set_telemetry_digest(job.id, secret_digest(secret))
        self.store.transition(job.id, JobState.STARTING, "test", ray_job_id=submission_id(job.id))
        self.store.transition(job.id, JobState.RUNNING, "test")
        self.secrets[job.id] = secret
        return job.id

    def report(self, job: str, rank: int, step: int, **extra) -> pb.StepReport:
        fields = {
            "job_id": job, "rank": rank, "step": step, "loss": 1.0 / (step + 1), "compute_s": 0.01,
            "compress_s": 0.001, "communicate_s": 0.002, "bytes_sent": BYTES_PER_STEP * step,
            "bytes_uncompressed": 10 * BYTES_PER_STEP * step, "compressor": "powersgd",
            "wall_time": time.time(),
        }  # fmt: skip
        fields.update(extra)
        return to_proto(fields)

    def genuine(self, job: str, rank: int = 0, **extra) -> pb.StepReport:
        """The next step of ``job``'s rank, sent with the job's secret: must be stored and counted."""
        step = self.steps.get((job, rank), 0) + 1
        self.steps[(job, rank)] = step
        before = self.state(job)
        summary = send(self.sink.address, [self.report(job, rank, step, **extra)], token=self.secrets[job])
        assert summary == 1, "a genuine report was not accepted"
        after = self.state(job)
        assert after["points"] == before["points"] + 1
        assert after["received"] == before["received"] + 1
        if rank == 0:
            assert after["steps_total"] == before["steps_total"] + 1
        assert max(p.step for p in self.store.points(job, rank=rank)) == step
        return self.report(job, rank, step, **extra)

    def state(self, job: str) -> dict:
        """Everything a forgery must not move for ``job``."""
        record = self.store.get(job)
        get = self.metrics.registry.get_sample_value
        return {
            "state": record.state, "restarts": record.restarts, "events": len(self.store.events(job)),
            "points": len(self.store.points(job)),
            "point_values": [p.model_dump() for p in self.store.points(job)],
            "received": get("gradwire_telemetry_reports_received_total") or 0,
            "steps_total": get("gradwire_train_steps_total", {"job_id": job}) or 0,
            "loss": get("gradwire_train_loss", {"job_id": job}),
            "sent": get("gradwire_grad_bytes_sent_total", {"job_id": job, "compressor": "powersgd"}) or 0,
            "restart_metric": get("gradwire_worker_restarts_total", {"job_id": job}) or 0,
            "series": self.series(),
        }  # fmt: skip

    def series(self) -> list[tuple[str, tuple]]:
        """Every per-job sample name and labels (values left out), and the telemetry counters'."""
        out = []
        for family in self.metrics.registry.collect():
            for s in family.samples:
                if "job_id" in s.labels or s.name.startswith("gradwire_telemetry_reports_received"):
                    out.append((s.name, tuple(sorted(s.labels.items()))))
        return sorted(out)

    def dropped(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "gradwire_telemetry_reports_dropped_total", {"reason": reason}
        )
        return value or 0.0


def send(
    address: str, reports: list[pb.StepReport], *, token: str | None = None, batch: int = 0
) -> int | grpc.StatusCode:
    """One StreamReports call; the number accepted, or the status code it failed with."""
    batch = batch or len(reports) or 1
    batches = [pb.ReportBatch(reports=reports[i : i + batch]) for i in range(0, len(reports), batch)]
    metadata = ((TELEMETRY_TOKEN_METADATA, token),) if token is not None else ()
    with grpc.insecure_channel(address) as channel:
        try:
            return (
                pb_grpc.TelemetryStub(channel)
                .StreamReports(iter(batches), metadata=metadata, timeout=30)
                .received
            )
        except grpc.RpcError as err:
            return err.code()


@pytest.fixture
def tel(tmp_path: Path):
    t = Telemetry(tmp_path)
    yield t
    t.close()


def assert_unmoved(tel: Telemetry, before: dict[str, dict]) -> None:
    for job, state in before.items():
        assert tel.state(job) == state, job


# --- forgeries -----------------------------------------------------------------------------------


def test_reports_without_the_secret_move_nothing(tel: Telemetry) -> None:
    a = tel.launch("a")
    tel.genuine(a)
    before = {a: tel.state(a)}
    forged = [tel.report(a, 0, 2, bytes_sent=10**18, loss=123.0), tel.report(a, 1, 5)]
    assert send(tel.sink.address, forged) == grpc.StatusCode.UNAUTHENTICATED
    assert send(tel.sink.address, forged, token="") == grpc.StatusCode.UNAUTHENTICATED
    assert send(tel.sink.address, forged, token="guess-" + "x" * 40) == grpc.StatusCode.UNAUTHENTICATED
    assert_unmoved(tel, before)
    assert tel.dropped("unauthenticated") == 6
    tel.genuine(a)


def test_another_jobs_secret_does_not_open_a_job(tel: Telemetry) -> None:
    a, b = tel.launch("a"), tel.launch("b")
    tel.genuine(a)
    tel.genuine(b)
    before = {a: tel.state(a), b: tel.state(b)}
    assert send(tel.sink.address, [tel.report(a, 0, 9, loss=-1.0)], token=tel.secrets[b]) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    # a batch that starts with b's genuine report and then forges a's: b's is kept, a's refused
    mixed = [tel.report(b, 1, 1), tel.report(a, 0, 9)]
    assert send(tel.sink.address, mixed, token=tel.secrets[b]) == grpc.StatusCode.UNAUTHENTICATED
    assert tel.state(a) == {**before[a], "received": before[a]["received"] + 1}  # b's report
    assert tel.state(b)["points"] == before[b]["points"] + 1
    tel.steps[(b, 1)] = 1
    tel.genuine(a)
    tel.genuine(b)


def test_a_finished_job_takes_no_reports_even_with_its_secret(tel: Telemetry) -> None:
    a, done = tel.launch("a"), tel.launch("done")
    tel.genuine(done)
    tel.store.transition(done, JobState.SUCCEEDED, "test")
    tel.metrics.forget_job(done)  # its retention ran out: its series are gone
    before = {done: tel.state(done)}
    assert done not in tel.gate.open_jobs
    late = [tel.report(done, 0, 2, bytes_sent=10**19 - 1), tel.report(done, 0, 3)]
    assert send(tel.sink.address, late, token=tel.secrets[done]) == grpc.StatusCode.UNAUTHENTICATED
    assert_unmoved(tel, before)
    assert not [s for s in tel.series() if ("job_id", done) in s[1]]  # no series made again
    assert tel.dropped("unknown_job") == 2
    tel.genuine(a)


def test_absurd_values_from_the_jobs_own_secret_are_refused(tel: Telemetry) -> None:
    """A buggy or compromised worker of the job: every field is bounded."""
    a = tel.launch("a")
    tel.genuine(a)
    tel.genuine(a)  # step 2, bytes_sent 8000
    before = {a: tel.state(a)}
    absurd = [
        tel.report(a, 0, 3, bytes_sent=2**64 - 1),  # the 1.8e19 of the issue
        tel.report(a, 0, 3, bytes_uncompressed=5 * CAP),  # more than the ceiling in one step
        tel.report(a, 0, 3, bytes_sent=10),  # bytes went down while the step went up
        tel.report(a, 0, 1, bytes_sent=10**6),  # bytes went up while the step went back
        tel.report(a, 0, STEPS + 1),  # beyond the spec's steps
        tel.report(a, WORKERS, 1),  # a rank the job does not have
        tel.report(a, 0, 3, wall_time=time.time() - 86_400),  # before the job was submitted
    ]
    for report in absurd:
        assert send(tel.sink.address, [report], token=tel.secrets[a]) == 0, report
        assert_unmoved(tel, before)
    assert tel.dropped("invalid") == len(absurd)
    tel.genuine(a)


def test_a_far_future_wall_time_is_refused_and_later_reports_still_count(tel: Telemetry) -> None:
    a = tel.launch("a")
    tel.genuine(a)
    before = {a: tel.state(a)}
    year_9000 = dt.datetime(9000, 1, 1, tzinfo=dt.timezone.utc).timestamp()
    assert send(tel.sink.address, [tel.report(a, 0, 2, wall_time=year_9000)], token=tel.secrets[a]) == 0
    assert (
        send(tel.sink.address, [tel.report(a, 0, 2, wall_time=time.time() + 3600)], token=tel.secrets[a]) == 0
    )
    assert_unmoved(tel, before)
    for _ in range(20):  # the rank's later genuine reports are not taken for duplicates
        tel.genuine(a)
    assert tel.dropped("duplicate") == 0


def test_invented_labels_never_become_series(tel: Telemetry) -> None:
    a = tel.launch("a")
    tel.genuine(a)
    before = {a: tel.state(a)}
    invented = [tel.report(a, 0, 2 + i, compressor=f"evil-{i}") for i in range(300)]
    assert send(tel.sink.address, invented, batch=50) == grpc.StatusCode.UNAUTHENTICATED  # no secret
    assert_unmoved(tel, before)
    # the job's own worker naming another compressor: stored, but under the spec's label
    series = tel.series()
    assert send(tel.sink.address, invented, token=tel.secrets[a], batch=50) == 300
    labels = {dict(s[1]).get("compressor") for s in tel.series()} - {None}
    assert labels == {"powersgd"}
    assert len(tel.series()) == len(series)
    tel.steps[(a, 0)] = 301
    tel.genuine(a)


def test_an_auto_jobs_choices_are_labels_within_bounds(tel: Telemetry) -> None:
    """A job whose spec says ``auto`` reports its choice as ``auto:<choice>``: kept as the label
    when it is a short token, and only the first few distinct ones per job."""
    a = tel.launch("a")
    tel.gate.close(a)  # reopen it as an auto job (the spec's compression.name)
    record = tel.store.get(a)
    auto = record.model_copy(update={"spec": {**record.spec, "compression": {"name": "auto"}}})
    tel.gate.open(auto, tel.store.telemetry_digest(a) or "")
    cap = tel.gate.bounds.max_compressor_labels
    wall = time.time()
    names = ["auto:powersgd-r4", "auto:EVIL", "auto:" + "x" * 80, "auto:a b", "fp16", "auto:topk-1%"]
    names += [f"auto:c{i}" for i in range(2 * cap)]
    reports = [
        tel.report(a, 0, i + 1, compressor=name, wall_time=wall, bytes_sent=BYTES_PER_STEP * (i + 1))
        for i, name in enumerate(names)
    ]
    assert send(tel.sink.address, reports, token=tel.secrets[a], batch=4) == len(reports)
    labels = {dict(s[1])["compressor"] for s in tel.series() if "compressor" in dict(s[1])}
    assert "auto:powersgd-r4" in labels and "auto:topk-1%" in labels and "auto" in labels
    assert not {"auto:EVIL", "auto:a b", "fp16"} & labels and not any(len(x) > 60 for x in labels)
    assert len(labels - {"auto"}) == cap
    events = [e.reason for e in tel.store.events(a) if e.from_state == e.to_state]
    assert events[0] == "compressor: auto:powersgd-r4 → auto at step 2", events


def test_forged_attempts_and_step_regressions_do_not_restart_a_job(tel: Telemetry) -> None:
    a, b = tel.launch("a"), tel.launch("b")
    for _ in range(5):
        tel.genuine(a)
    before = {a: tel.state(a)}
    later = time.time() + 30
    for token in (None, tel.secrets[b]):  # three restarts were forged this way in the issue
        for step in (1, 2, 3):
            forged = [tel.report(a, 0, step, wall_time=later, bytes_sent=0, attempt=step)]
            assert send(tel.sink.address, forged, token=token) == grpc.StatusCode.UNAUTHENTICATED
    assert_unmoved(tel, before)
    assert tel.store.get(a).state is JobState.RUNNING and tel.store.get(a).restarts == 0
    # a step run again without a new attempt (a re-run after a hiccup) is no restart
    again = tel.report(a, 0, 4, wall_time=time.time() + 1, bytes_sent=BYTES_PER_STEP * 4)
    assert send(tel.sink.address, [again], token=tel.secrets[a]) == 1
    assert tel.store.get(a).restarts == 0
    # an absurd attempt from the job's own secret is refused
    absurd = tel.report(a, 0, 5, wall_time=time.time() + 2, bytes_sent=BYTES_PER_STEP * 5, attempt=2**31)
    assert send(tel.sink.address, [absurd], token=tel.secrets[a]) == 0
    assert tel.store.get(a).restarts == 0
    # the job's own workers, restored by Ray Train from a checkpoint at step 3: one restart, once
    for rank in (0, 1):
        rerun = tel.report(a, rank, 4, wall_time=time.time() + 3, bytes_sent=BYTES_PER_STEP * 4, attempt=1)
        assert send(tel.sink.address, [rerun], token=tel.secrets[a]) == 1
    assert tel.store.get(a).restarts == 1 and tel.store.get(a).state is JobState.RUNNING
    assert tel.store.get(a).attempt == 1
    tel.steps[(a, 0)] = 5  # steps 1-5 are stored; attempt 1 goes on with step 6
    tel.genuine(a, attempt=1)


def test_100k_reports_for_unknown_ids_keep_memory_flat(tel: Telemetry) -> None:
    a = tel.launch("a")
    tel.genuine(a)

    def flood(prefix: str, n: int, per_call: int) -> None:
        for start in range(0, n, per_call):
            reports = [tel.report(f"{prefix}-{i:06d}", 0, 1) for i in range(start, min(n, start + per_call))]
            assert send(tel.sink.address, reports, token=tel.secrets[a]) == grpc.StatusCode.UNAUTHENTICATED

    flood("warm", 2_000, 100)  # gRPC's own pools and caches
    before = {a: tel.state(a)}
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    dropped0 = tel.dropped("unknown_job")

    flood("ghost", 98_000, 1_000)  # many ids per call: the call ends at the first one
    flood("lone", 2_000, 1)  # one id per call: each one is looked up
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    tracemalloc.stop()
    rss1 = psutil.Process().memory_info().rss
    mib = 2**20
    print(f"100k unknown ids: RSS {rss0 / mib:.1f} -> {rss1 / mib:.1f} MiB, heap {grown / 1024:+.1f} KiB")

    assert tel.dropped("unknown_job") - dropped0 == 100_000
    assert_unmoved(tel, before)
    assert tel.gate.open_jobs == {a}
    assert len(tel.sink._last) == 1 and tel.metrics.known_jobs == {a}
    assert grown < 128 * 1024, f"the Python heap grew by {grown} bytes"
    assert rss1 - rss0 < 32 * 2**20, f"RSS grew by {(rss1 - rss0) / 2**20:.1f} MiB"
    tel.genuine(a)


# --- the job's own workers ---------------------------------------------------------------------


def test_the_worker_client_sends_the_secret_from_its_environment(tel: Telemetry, monkeypatch) -> None:
    a = tel.launch("a")
    monkeypatch.setenv(TELEMETRY_TOKEN_ENV, tel.secrets[a])
    clients = [TelemetryClient(tel.sink.address, a, rank, batch_size=8, **FAST) for rank in range(WORKERS)]
    for step in range(1, 31):
        for c in clients:
            c.report(tel.report(a, c.rank, step))
    for c in clients:
        assert c.close(timeout=10), c.stats()
        assert c.sent == 30
    assert len(tel.store.points(a)) == 60
    # the same client without the secret: nothing accepted
    monkeypatch.delenv(TELEMETRY_TOKEN_ENV)
    before = tel.state(a)
    stranger = TelemetryClient(tel.sink.address, a, 0, **FAST)
    stranger.report(tel.report(a, 0, 31))
    assert not stranger.close(timeout=1.5)
    assert tel.state(a) == before


def test_a_restarted_coordinator_accepts_running_jobs_by_their_stored_digest(tmp_path: Path) -> None:
    first = Telemetry(tmp_path)
    a = first.launch("a")
    for _ in range(3):
        first.genuine(a)
    secret = first.secrets[a]
    first.close()

    again = Telemetry(tmp_path)  # a new process would read the same database
    try:
        assert again.gate.open_jobs == {a}
        again.secrets[a] = secret
        again.steps[(a, 0)] = 3
        # bytes bounds resume from the stored points: a jump from step 3's bytes is refused
        assert send(again.sink.address, [again.report(a, 0, 4, bytes_sent=1)], token=secret) == 0
        assert (
            send(again.sink.address, [again.report(a, 0, 4)], token="wrong")
            == grpc.StatusCode.UNAUTHENTICATED
        )
        again.genuine(a)
    finally:
        again.close()


def test_the_secret_is_never_in_the_job_record_or_its_events(tel: Telemetry) -> None:
    a = tel.launch("a")
    secret = tel.secrets[a]
    stored = tel.store.telemetry_digest(a)
    assert stored == secret_digest(secret) and secret not in stored
    record = tel.store.get(a).model_dump_json()
    events = "".join(e.model_dump_json() for e in tel.store.events(a))
    for text in (record, events):
        assert secret not in text and stored not in text
    tel.store.transition(a, JobState.CANCELLED, "test")
    tel.store.delete(a)
    assert tel.store.telemetry_digest(a) is None


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_sink_with_a_self_signed_certificate(tmp_path: Path, monkeypatch) -> None:
    cert, key = self_signed(tmp_path)
    tel = Telemetry(tmp_path, tls_cert=cert, tls_key=key)
    try:
        a = tel.launch("a")
        # the worker as a launched job runs it: secret and CA from the environment
        monkeypatch.setenv(TELEMETRY_TOKEN_ENV, tel.secrets[a])
        monkeypatch.setenv(TELEMETRY_CA_ENV, str(cert))
        client = TelemetryClient(tel.sink.address, a, 0, **FAST)
        for step in range(1, 11):
            client.report(tel.report(a, 0, step))
        assert client.close(timeout=10), client.stats()
        assert [p.step for p in tel.store.points(a)] == list(range(1, 11))
        # a plaintext caller gets nowhere, even with the secret
        before = tel.state(a)
        with grpc.insecure_channel(tel.sink.address) as channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.TelemetryStub(channel).StreamReports(
                iter([pb.ReportBatch(reports=[tel.report(a, 0, 11)])]),
                metadata=((TELEMETRY_TOKEN_METADATA, tel.secrets[a]),), timeout=5,
            )  # fmt: skip
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client that trusts another CA refuses the sink's certificate
        (tmp_path / "other").mkdir()
        other, _ = self_signed(tmp_path / "other")
        stranger = TelemetryClient(tel.sink.address, a, 0, ca_file=other, **FAST)
        stranger.report(tel.report(a, 0, 11))
        assert not stranger.close(timeout=1.5)
        assert tel.state(a) == before
    finally:
        tel.close()


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    with pytest.raises(ValueError, match="both"):
        TelemetrySink(lambda reports: None, tls_cert=cert)
    with pytest.raises(FileNotFoundError):
        TelemetrySink(lambda reports: None, tls_cert=cert, tls_key=tmp_path / "missing.key")


def test_settings_take_tls_paths_in_pairs() -> None:
    from gradwire.server.settings import Settings

    with pytest.raises(ValueError, match="GRADWIRE_GRPC_TLS_KEY"):
        Settings(grpc_tls_cert="/x.crt")
    settings = Settings(grpc_tls_cert="/x.crt", grpc_tls_key="/x.key")
    assert settings.telemetry_tls_ca is None and settings.telemetry_max_bytes_per_step == 64 << 30
    assert os.fspath(settings.grpc_tls_cert) == "/x.crt"
