"""JobStore on a real SQLite file and a real PostgreSQL server (``store_url``, tests/conftest.py):
persistence across restarts, idempotency, ordering, paging, points, concurrency."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from gradwire.server.models_db import POINT_FIELDS, SCHEMA_VERSION, SchemaMismatch
from gradwire.server.records import IdempotencyConflict, JobNotFound, JobNotTerminal, JobPoint, StateConflict
from gradwire.server.schema import head_revision
from gradwire.server.states import IllegalTransition, JobState
from gradwire.server.store import JobStore, evenly_spaced
from gradwire.spec import JobSpec

Q, S, R, RS = JobState.QUEUED, JobState.STARTING, JobState.RUNNING, JobState.RESTARTING
OK, FAIL, CANCEL = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED


def spec(name: str = "test-job", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "model": {"name": "mlp"},
        "data": {"dataset": "digits", "batch_size": 16},
        "optimizer": {"lr": 0.1},
        "steps": 50,
        "workers": {"count": 2},
    }
    body.update(changes)
    return body


def point(step: int, rank: int = 0, **changes: Any) -> dict[str, Any]:
    values = {"rank": rank, "step": step, "wall_time": 1_700_000_000.0 + step, "loss": 1.0 / (step + 1)}
    values.update(changes)
    return values


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    with JobStore(store_url) as store:
        yield store


def run_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` on ``count`` threads that start together; returns results (or exceptions)."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def body(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except Exception as error:
            results[i] = error

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


# --- jobs and their history --------------------------------------------------------------------


def test_create_stores_a_queued_job_with_its_spec(store: JobStore):
    body = JobSpec.from_dict(spec("digits")).model_dump(mode="json")
    job, created = store.create(body, priority=3, owner="alice")
    assert created and job.id.startswith("job-") and len(job.id) == 16
    assert (job.name, job.state, job.priority, job.owner) == ("digits", Q, 3, "alice")
    assert job.reason == "submitted" and job.restarts == 0 and job.ray_job_id is None
    assert job.spec == body and JobSpec.from_dict(job.spec) == JobSpec.from_dict(body)
    assert job.created_at.tzinfo is not None and job.started_at is None and job.finished_at is None
    assert store.get(job.id) == job
    [event] = store.events(job.id)
    assert (event.seq, event.from_state, event.to_state, event.reason) == (1, None, Q, "submitted")
    assert store.create(JobSpec.from_dict(spec("from-model")))[0].spec["name"] == "from-model"


def test_unknown_jobs_and_bad_input_are_refused(store: JobStore):
    for call in (store.get, store.events, store.delete, store.points):
        with pytest.raises(JobNotFound):
            call("job-000000000000")
    with pytest.raises(JobNotFound):
        store.transition("job-000000000000", S, "x")
    with pytest.raises(JobNotFound):
        store.add_points("job-000000000000", [point(0)])
    with pytest.raises(ValueError, match="name"):
        store.create({"model": {}})
    job, _ = store.create(spec())
    with pytest.raises(TypeError, match="state"):
        store.transition(job.id, S, "x", state="RUNNING")


def test_transitions_keep_timestamps_restarts_and_events(store_url: str):
    times = iter(datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc) for s in range(60))
    store = JobStore(store_url, clock=lambda: next(times))
    job, _ = store.create(spec())
    moves = [
        (S, "admitted"),
        (R, "workers up"),
        (RS, "rank 1 died"),
        (R, "restored step 40"),
        (RS, "rank 0 died"),
        (R, "restored step 80"),
        (OK, "finished"),
    ]
    store.transition(job.id, S, "admitted", ray_job_id="raysubmit_abc")
    for to, reason in moves[1:]:
        job = store.transition(job.id, to, reason)
    assert (job.state, job.reason, job.restarts, job.ray_job_id) == (OK, "finished", 2, "raysubmit_abc")
    assert job.started_at == datetime(2026, 1, 1, 0, 0, 2, tzinfo=timezone.utc)  # the first RUNNING only
    assert job.finished_at == job.updated_at == datetime(2026, 1, 1, 0, 0, 7, tzinfo=timezone.utc)
    events = store.events(job.id)
    assert [(e.to_state, e.reason) for e in events] == [(Q, "submitted"), *moves]
    assert [e.from_state for e in events] == [None, Q, S, R, RS, R, RS, R]
    assert [e.seq for e in events] == list(range(1, 9))
    assert [e.at.second for e in events] == list(range(8))


def test_expect_guards_the_current_state(store: JobStore):
    job, _ = store.create(spec())
    with pytest.raises(StateConflict) as info:
        store.transition(job.id, CANCEL, "user", expect={S, R})
    assert info.value.current is Q and store.get(job.id).state is Q
    assert store.transition(job.id, CANCEL, "user", expect=Q).state is CANCEL
    with pytest.raises(IllegalTransition):  # legal-move check still applies when expect matches
        store.transition(job.id, R, "late", expect=CANCEL)


def test_everything_survives_reopening_the_file(store_url: str):
    first = JobStore(store_url)
    done, _ = first.create(spec("done"), idempotency_key="key-1", owner="alice")
    for to in (S, R, OK):
        first.transition(done.id, to, f"-> {to}")
    waiting, _ = first.create(spec("waiting"), priority=5)
    first.add_points(done.id, [point(s) for s in range(4)])
    first.close()

    again = JobStore(store_url)  # a coordinator restart
    assert again.get(done.id).state is OK and again.get(waiting.id).state is Q
    assert [e.to_state for e in again.events(done.id)] == [Q, S, R, OK]
    assert [p.step for p in again.points(done.id)] == [0, 1, 2, 3]
    assert again.non_terminal() == [again.get(waiting.id)]
    assert again.next_queued() == again.get(waiting.id)
    assert again.create(spec("done"), idempotency_key="key-1", owner="alice") == (again.get(done.id), False)
    later, _ = again.create(spec("later"))
    assert later.seq > waiting.seq > done.seq
    with again.engine.connect() as connection:
        assert connection.execute(text("SELECT version FROM gradwire_schema")).scalar() == SCHEMA_VERSION
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
        if again.engine.dialect.name == "sqlite":
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    again.close()


def test_a_database_from_a_newer_gradwire_is_refused(store_url: str):
    JobStore(store_url).close()
    with JobStore(store_url).engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaMismatch, match="9999"):
        JobStore(store_url)


def test_records_are_frozen(store: JobStore):
    job, _ = store.create(spec())
    with pytest.raises(ValidationError):
        job.state = R  # type: ignore[misc]


# --- idempotency -------------------------------------------------------------------------------


def test_idempotency_key_returns_the_first_job(store: JobStore):
    first, created = store.create(spec(), idempotency_key="abc", owner="alice")
    again, created_again = store.create(spec(), idempotency_key="abc", owner="alice")
    assert created and not created_again and again == first
    with pytest.raises(IdempotencyConflict, match="abc"):
        store.create(spec(steps=99), idempotency_key="abc", owner="alice")
    assert store.create(spec())[1] and store.create(spec())[1]  # no key: always a new job
    assert store.list().total == 3


def test_idempotency_keys_are_per_owner(store: JobStore):
    alice, _ = store.create(spec(), idempotency_key="abc", owner="alice")
    bob, created = store.create(spec(steps=99), idempotency_key="abc", owner="bob")  # no conflict
    assert created and bob.id != alice.id and (alice.owner, bob.owner) == ("alice", "bob")
    assert store.create(spec(steps=99), idempotency_key="abc", owner="bob") == (bob, False)
    assert store.find_by_key("abc", owner="alice") == alice
    assert store.find_by_key("abc", owner="carol") is None
    with pytest.raises(ValueError, match="owner"):  # a key without an owner would be unique nowhere
        store.create(spec(), idempotency_key="abc")
    assert store.list(owner="bob").total == 1 and store.list().total == 2


def test_many_threads_submit_each_job_once_in_order(store: JobStore):
    threads, per_thread = 50, 20

    def submit(t: int) -> list[tuple[str, int]]:
        made = []
        for i in range(per_thread):
            job, created = store.create(spec(f"t{t}"), idempotency_key=f"t{t}-{i}", owner="alice")
            assert created
            made.append((job.id, job.seq))
        return made

    results = run_threads(threads, submit)
    assert not [r for r in results if isinstance(r, Exception)]
    assert store.list().total == threads * per_thread
    everything = [job for page in _pages(store) for job in page]
    assert len({j.id for j in everything}) == threads * per_thread
    for t, made in enumerate(results):
        assert [seq for _, seq in made] == sorted(seq for _, seq in made)  # each thread's order kept
        assert store.list(name=f"t{t}", limit=100).total == per_thread


def test_racing_submissions_with_one_key_make_one_job(store: JobStore):
    results = run_threads(16, lambda _: store.create(spec(), idempotency_key="same", owner="alice"))
    assert not [r for r in results if isinstance(r, Exception)]
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.list().total == 1 and len(store.events(results[0][0].id)) == 1


# --- scheduling order, listing, counts ---------------------------------------------------------


def test_next_queued_is_fifo_within_priority(store: JobStore):
    low1 = store.create(spec("low1"))[0]
    high1 = store.create(spec("high1"), priority=10)[0]
    low2 = store.create(spec("low2"))[0]
    high2 = store.create(spec("high2"), priority=10)[0]
    order = []
    while (job := store.next_queued()) is not None:
        order.append(job.id)
        store.transition(job.id, S, "admitted")
    assert order == [high1.id, high2.id, low1.id, low2.id]


def _pages(store: JobStore, **filters: Any) -> list[list[Any]]:
    pages, after = [], None
    while True:
        page = store.list(limit=7, after=after, **filters)
        pages.append(list(page.items))
        if page.next_after is None:
            return pages
        after = page.next_after


def test_list_pages_filters_and_totals(store: JobStore):
    jobs = [store.create(spec("even" if i % 2 == 0 else "odd"))[0] for i in range(20)]
    for job in jobs[:5]:
        store.transition(job.id, CANCEL, "user")
    pages = _pages(store)
    assert [len(p) for p in pages] == [7, 7, 6]
    assert [j.id for p in pages for j in p] == [j.id for j in jobs]

    evens = store.list(name="even", limit=3)
    assert evens.total == 10 and [j.name for j in evens.items] == ["even"] * 3
    assert [j.seq for j in evens.items] == sorted(j.seq for j in evens.items)

    queued = [j for p in _pages(store, state=Q) for j in p]
    assert [j.id for j in queued] == [j.id for j in jobs[5:]]
    mixed = store.list(state={Q, CANCEL}, name="odd", limit=100)
    assert mixed.total == 10 and mixed.next_after is None
    assert store.list(state=CANCEL).total == 5 and store.list(state=[OK, FAIL]).total == 0

    by_offset = store.list(limit=5, offset=15)
    assert [j.id for j in by_offset.items] == [j.id for j in jobs[15:]] and by_offset.total == 20
    newest = store.list(limit=3, newest_first=True)
    assert [j.id for j in newest.items] == [j.id for j in jobs[:-4:-1]]
    assert [j.id for j in store.list(limit=3, newest_first=True, after=newest.next_after).items] == [
        j.id for j in jobs[-4:-7:-1]
    ]
    with pytest.raises(ValueError):
        store.list(limit=0)
    with pytest.raises(ValueError):
        store.list(after=3, offset=2)


def test_counts_and_non_terminal(store: JobStore):
    a, b, c = (store.create(spec())[0] for _ in range(3))
    store.transition(a.id, S, "x")
    store.transition(b.id, FAIL, "too big for the cluster")
    counts = store.counts_by_state()
    assert set(counts) == set(JobState)
    assert (counts[Q], counts[S], counts[FAIL], counts[R]) == (1, 1, 1, 0)
    assert [j.id for j in store.non_terminal()] == [a.id, c.id]


def test_delete_only_finished_jobs(store: JobStore):
    job, _ = store.create(spec())
    store.transition(job.id, S, "x")
    store.add_points(job.id, [point(0)])
    with pytest.raises(JobNotTerminal):
        store.delete(job.id)
    assert store.get(job.id).state is S
    store.transition(job.id, CANCEL, "user")
    store.delete(job.id)
    with pytest.raises(JobNotFound):
        store.get(job.id)
    with pytest.raises(JobNotFound):
        store.add_points(job.id, [point(1)])
    with store.engine.connect() as connection:
        for table in ("job_events", "job_points"):
            assert connection.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0


# --- telemetry points --------------------------------------------------------------------------


def test_points_are_stored_once_per_rank_and_step(store: JobStore):
    job, _ = store.create(spec())
    assert set(JobPoint.model_fields) == set(POINT_FIELDS)
    assert store.add_points(job.id, [point(s, r) for s in range(5) for r in range(2)]) == 10
    assert store.add_points(job.id, [point(s, r) for s in range(5) for r in range(2)]) == 0  # re-sent
    assert store.add_points(job.id, [point(4), point(5), point(5), point(6)]) == 2
    assert store.add_points(job.id, []) == 0
    stored = store.points(job.id)
    expected = [(s, r) for s in range(5) for r in range(2)] + [(5, 0), (6, 0)]
    assert [(p.step, p.rank) for p in stored] == expected
    assert [p.step for p in store.points(job.id, rank=1)] == list(range(5))


def test_point_fields_round_trip(store: JobStore):
    job, _ = store.create(spec())
    wall = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    store.add_points(
        job.id,
        [
            {
                "rank": 1,
                "step": 7,
                "wall_time": wall,
                "loss": 0.25,
                "accuracy": 0.9,
                "compute_s": 0.1,
                "compress_s": 0.02,
                "communicate_s": 0.3,
                "wait_s": 0.04,
                "bytes_sent": 5 * 2**40,
                "bytes_uncompressed": 2**45,
                "stragglers": [2, 3],
                "compressor": "topk",
                "samples": 32,
            }
        ],
    )
    [got] = store.points(job.id)
    assert got == JobPoint(
        rank=1,
        step=7,
        wall_time=wall.timestamp(),
        loss=0.25,
        accuracy=0.9,
        compute_s=0.1,
        compress_s=0.02,
        communicate_s=0.3,
        wait_s=0.04,
        bytes_sent=5 * 2**40,
        bytes_uncompressed=2**45,
        stragglers=2,
    )


def test_downsampling_keeps_first_last_and_the_requested_count(store: JobStore):
    job, _ = store.create(spec())
    store.add_points(job.id, [point(s) for s in range(1000)])
    for wanted in (2, 3, 10, 333, 999):
        picked = [p.step for p in store.points(job.id, max_points=wanted)]
        assert len(picked) == wanted and picked[0] == 0 and picked[-1] == 999
        assert picked == sorted(set(picked))
        gaps = {b - a for a, b in itertools.pairwise(picked)}
        assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert len(store.points(job.id, max_points=1000)) == 1000
    assert len(store.points(job.id, max_points=5000)) == 1000
    with pytest.raises(ValueError):
        store.points(job.id, max_points=1)


@pytest.mark.parametrize(("n", "m"), [(2, 2), (5, 3), (10, 9), (101, 10), (7, 7)])
def test_evenly_spaced(n: int, m: int):
    picked = evenly_spaced(n, m)
    assert len(picked) == m and picked[0] == 0 and picked[-1] == n - 1
    assert picked == sorted(set(picked))


# --- listeners and concurrent transitions ------------------------------------------------------


def test_listeners_hear_each_change_once_after_commit(store: JobStore):
    heard: list[tuple[str, JobState | None, JobState, str, JobState]] = []

    def listener(job: Any, src: JobState | None, dst: JobState, reason: str) -> None:
        heard.append((job.id, src, dst, reason, store.get(job.id).state))  # already committed

    def broken(*_: Any) -> None:
        raise RuntimeError("a listener bug must not undo the transition")

    store.add_listener(broken)
    store.add_listener(listener)
    job, _ = store.create(spec())
    store.transition(job.id, S, "a")
    with pytest.raises(IllegalTransition):
        store.transition(job.id, OK, "b")
    store.transition(job.id, R, "c")
    store.create(spec(), idempotency_key="k", owner="alice")
    store.create(spec(), idempotency_key="k", owner="alice")  # a replay is not a change
    assert heard[:3] == [(job.id, None, Q, "submitted", Q), (job.id, Q, S, "a", S), (job.id, S, R, "c", R)]
    assert len(heard) == 4
    store.remove_listener(listener)
    store.transition(job.id, OK, "d")
    assert len(heard) == 4


def test_two_threads_racing_one_move_exactly_one_wins(store: JobStore):
    for _ in range(5):
        job, _ = store.create(spec())

        def move(i: int, job_id: str = job.id) -> Any:
            return store.transition(job_id, S, f"thread {i}", expect=Q)

        results = run_threads(2, move)
        winners = [r for r in results if not isinstance(r, Exception)]
        assert len(winners) == 1 and [type(r) for r in results if r not in winners] == [StateConflict]
        assert [e.to_state for e in store.events(job.id)] == [Q, S]
        assert store.get(job.id).reason == winners[0].reason


def test_the_store_imports_no_torch_or_ray():
    code = (
        "import sys, gradwire.server.store, gradwire.server.states; "
        "bad = [m for m in ('torch', 'ray', 'gradwire.worker') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_add_reports_stores_many_jobs_in_one_call_like_add_points(store: JobStore):
    from gradwire.protos import telemetry_pb2 as pb

    a, _ = store.create(spec("a"))
    b, _ = store.create(spec("b"))
    store.add_points(a.id, [point(0)])

    def report(job_id: str, step: int, rank: int = 0, **fields: Any) -> pb.StepReport:
        fields.setdefault("loss", 1.0 / (step + 1))
        r = pb.StepReport(job_id=job_id, rank=rank, step=step, bytes_sent=7, **fields)
        r.wall_time.FromNanoseconds(1_700_000_000_000_000_000 + step)
        return r

    reports = [
        report(a.id, 0),  # already stored
        report(a.id, 1, accuracy=float("nan")),
        report(b.id, 1, rank=1, stragglers=[0, 2]),
        report("job-unknown", 1),
        report(a.id, 1, loss=5.0),  # same (rank, step) again in the batch: the first one is kept
        report(b.id, 2, loss=float("inf")),
    ]
    assert store.add_reports(reports) == {a.id: 1, b.id: 2}
    assert [(p.step, p.loss, p.accuracy) for p in store.points(a.id)] == [(0, 1.0, None), (1, 0.5, None)]
    stored_b = store.points(b.id)
    assert [(p.rank, p.step, p.stragglers, p.bytes_sent) for p in stored_b] == [(1, 1, 2, 7), (0, 2, 0, 7)]
    assert stored_b[1].loss is None  # non-finite, as JobPoint stores it
    assert stored_b[0].wall_time == pytest.approx(1_700_000_000.0)
    assert store.add_reports(reports) == {a.id: 0, b.id: 0}
    assert store.add_reports([report("job-unknown", 3)]) == {}
    with pytest.raises(ValueError):
        store.add_reports([report(a.id, 9, rank=-1)])
