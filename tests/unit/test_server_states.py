"""The job state machine: the table itself, and every pair of states tried on a real SQLite store."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from gradwire.server.states import (
    INITIAL_STATE,
    TERMINAL_STATES,
    TRANSITIONS,
    IllegalTransition,
    JobState,
    can_transition,
    check_transition,
)
from gradwire.server.store import JobStore

LEGAL = {
    (JobState.QUEUED, JobState.STARTING),
    (JobState.QUEUED, JobState.FAILED),
    (JobState.QUEUED, JobState.CANCELLED),
    (JobState.STARTING, JobState.RUNNING),
    (JobState.STARTING, JobState.FAILED),
    (JobState.STARTING, JobState.CANCELLED),
    (JobState.RUNNING, JobState.SUCCEEDED),
    (JobState.RUNNING, JobState.FAILED),
    (JobState.RUNNING, JobState.CANCELLED),
    (JobState.RUNNING, JobState.RESTARTING),
    (JobState.RESTARTING, JobState.RUNNING),
    (JobState.RESTARTING, JobState.FAILED),
    (JobState.RESTARTING, JobState.CANCELLED),
}
ALL_PAIRS = list(itertools.product(JobState, JobState))


def path_to(state: JobState) -> list[JobState]:
    """The shortest run of moves from the initial state to ``state`` (breadth-first)."""
    paths = {INITIAL_STATE: []}
    queue = deque([INITIAL_STATE])
    while queue:
        current = queue.popleft()
        for nxt in sorted(TRANSITIONS[current]):
            if nxt not in paths:
                paths[nxt] = [*paths[current], nxt]
                queue.append(nxt)
    return paths[state]


# --- the table ---------------------------------------------------------------------------------


def test_table_is_exactly_the_documented_moves():
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=lambda s: s.value)
def test_check_transition_for_every_pair(src: JobState, dst: JobState):
    assert can_transition(src, dst) == ((src, dst) in LEGAL)
    if (src, dst) in LEGAL:
        check_transition("job-x", src, dst)
        return
    with pytest.raises(IllegalTransition) as info:
        check_transition("job-x", src, dst)
    assert (info.value.job_id, info.value.from_state, info.value.to_state) == ("job-x", src, dst)
    assert "job-x" in str(info.value) and src.value in str(info.value) and dst.value in str(info.value)


def test_terminal_states_are_final_and_reachable():
    assert {s for s in JobState if s.terminal} == TERMINAL_STATES
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == TERMINAL_STATES
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset()
    for state in JobState:  # nothing is unreachable, and nothing is a dead end short of the end
        assert state == INITIAL_STATE or path_to(state)
        assert state.terminal or TRANSITIONS[state] & TERMINAL_STATES


def test_states_are_their_names():
    for state in JobState:
        assert state.value == state.name == str(state)
        assert JobState(state.value) is state


# --- every pair through the store --------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStore]:
    path: Path = tmp_path_factory.mktemp("states") / "jobs.db"
    with JobStore(f"sqlite:///{path}") as store:
        yield store


def job_in(store: JobStore, state: JobState) -> str:
    job, _ = store.create({"name": "pairs"})
    for step in path_to(state):
        store.transition(job.id, step, f"to {step.value}")
    assert store.get(job.id).state is state
    return job.id


@pytest.mark.parametrize(("src", "dst"), ALL_PAIRS, ids=lambda s: s.value)
def test_store_applies_legal_moves_and_refuses_the_rest(store: JobStore, src: JobState, dst: JobState):
    job_id = job_in(store, src)
    before = store.get(job_id)
    history = store.events(job_id)
    if (src, dst) in LEGAL:
        after = store.transition(job_id, dst, "pair test")
        assert after.state is dst and after.reason == "pair test"
        assert store.get(job_id) == after
        last = store.events(job_id)[-1]
        assert (last.from_state, last.to_state, last.reason) == (src, dst, "pair test")
        return
    with pytest.raises(IllegalTransition):
        store.transition(job_id, dst, "must not happen")
    assert store.get(job_id) == before  # nothing written
    assert store.events(job_id) == history
