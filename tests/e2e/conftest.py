"""One loopback Ray (2 CPUs) for every end-to-end test of the session."""

from __future__ import annotations

import importlib.util

import pytest

CLUSTER_CPUS = 2


@pytest.fixture(scope="session")
def local_ray():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("needs the 'ray' extra")
    # ray is imported only by gradwire.worker.launch, after it set the loopback environment
    from gradwire.worker.launch import start_local_ray

    start_local_ray(num_cpus=CLUSTER_CPUS)
    yield
    import ray

    ray.shutdown()
