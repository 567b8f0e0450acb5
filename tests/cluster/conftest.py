"""Fixtures of the network-namespace Slurm cluster (tests/cluster/netcluster.py).

`cluster2` / `cluster3`: N nodes (amoe-n0..), slurmctld on amoe-n0, a slurmd per node, built
before the module's tests and removed after them (and before: whatever a crashed run left, by
the project's own prefixes only). The two are never up at the same time (same names): a module
uses one of them.
"""

from __future__ import annotations

import pytest

from tests.cluster.netcluster import NetCluster, available


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: builds a Slurm cluster of network-namespace nodes (root)")


_why_not = available()


def _cluster(tmp_path_factory, n: int):
    if _why_not:
        pytest.skip(f"no namespace cluster here: {_why_not}")
    c = NetCluster(tmp_path_factory.mktemp(f"cluster{n}"), n)
    c.start()
    try:
        yield c
    finally:
        try:
            c.scancel_all()
        finally:
            c.stop()


@pytest.fixture(scope="module")
def cluster2(tmp_path_factory):
    yield from _cluster(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    yield from _cluster(tmp_path_factory, 3)
