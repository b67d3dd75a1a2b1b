"""One loopback Ray (2 CPUs, dashboard on 127.0.0.1 for the Jobs API) for every end-to-end test.

It is the coordinator's embedded head (``RayCluster``: a ``ray start --head`` subprocess on free
ports); coordinators under test reach it by its Jobs API address, and this process joins it as a
driver (``ray.init``) so that ``run_job()`` in the tests reuses it."""

from __future__ import annotations

import importlib.util

import pytest

CLUSTER_CPUS = 2


@pytest.fixture(scope="session")
def local_ray():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs the 'ray' extra")
    from gradwire.ray_env import apply_local_ray_env
    from gradwire.server.ray_cluster import RayCluster

    cluster = RayCluster(num_cpus=CLUSTER_CPUS).start()
    try:
        apply_local_ray_env()  # before this process first imports ray
        import ray

        ray.init(address=cluster.gcs_address, log_to_driver=False)  # run_job() reuses it as it is
        yield cluster
        ray.shutdown()
    finally:
        cluster.shutdown()
