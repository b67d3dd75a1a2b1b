"""One loopback Ray (2 CPUs, dashboard on 127.0.0.1 for the Jobs API) for every end-to-end test."""

from __future__ import annotations

import importlib.util

import pytest

CLUSTER_CPUS = 2


@pytest.fixture(scope="session")
def local_ray():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs the 'ray' extra")
    # RayCluster sets the loopback environment before it imports ray and starts the dashboard
    # (the Jobs API the coordinator's scheduler needs); run_job() reuses this Ray as it is
    from gradwire.server.ray_cluster import RayCluster

    cluster = RayCluster(num_cpus=CLUSTER_CPUS).start()
    yield cluster
    cluster.shutdown()
