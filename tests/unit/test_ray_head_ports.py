"""The embedded Ray head is started again on new ports when one chosen for it was taken before it
bound it (the race of choosing a free port), and only then.

* ``lost_a_port_race`` says yes only for a head that exited with a failed bind while some port was
  chosen here; not for a timeout, another exit, or ports that were all asked for.
* ``start`` retries such a loss with the same ports asked for (the chosen ones chosen afresh), gives
  up after ``HEAD_START_TRIES``, and raises any other failure at once.
"""

from __future__ import annotations

import pytest

from gradwire.server.ray_cluster import HEAD_START_TRIES, RayCluster, RayUnavailable, lost_a_port_race

RACE = (
    "the embedded Ray head exited with code 1 before it was ready (...); its log ends:\n"
    "RuntimeError: Failed to bind to address 127.0.0.1:45601"
)
CHOSEN = {"gcs_port": None, "dashboard_port": 8265, "agent_port": None, "client_port": None}


def test_a_lost_port_race_is_told_from_other_failures() -> None:
    assert lost_a_port_race(CHOSEN, RACE)
    in_use = RACE.replace("Failed to bind to", "OSError: [Errno 98] Address already in use")
    assert lost_a_port_race(CHOSEN, in_use)
    assert not lost_a_port_race(dict.fromkeys(CHOSEN, 7000), RACE)  # every port asked for: not our race
    assert not lost_a_port_race(CHOSEN, "the embedded Ray head was not ready within 90 s: Failed to bind")
    assert not lost_a_port_race(CHOSEN, "the embedded Ray head exited with code 1 before it was ready: OOM")


def _cluster_failing(monkeypatch: pytest.MonkeyPatch, errors: list[str]) -> tuple[RayCluster, list[dict]]:
    cluster = RayCluster(dashboard_port=8265)
    calls: list[dict] = []

    def launch(asked: dict) -> None:
        calls.append(dict(asked))
        if len(calls) <= len(errors):
            raise RayUnavailable(errors[len(calls) - 1])

    monkeypatch.setattr(cluster, "_launch_head", launch)
    return cluster, calls


def test_a_lost_race_is_started_again_on_the_ports_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, calls = _cluster_failing(monkeypatch, [RACE])
    assert cluster.start() is cluster
    assert calls == [CHOSEN, CHOSEN]


def test_it_gives_up_after_the_last_try(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, calls = _cluster_failing(monkeypatch, [RACE] * HEAD_START_TRIES)
    with pytest.raises(RayUnavailable, match="Failed to bind"):
        cluster.start()
    assert len(calls) == HEAD_START_TRIES


def test_another_failure_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, calls = _cluster_failing(monkeypatch, ["the embedded Ray head exited with code 1: OOM"])
    with pytest.raises(RayUnavailable, match="OOM"):
        cluster.start()
    assert len(calls) == 1
