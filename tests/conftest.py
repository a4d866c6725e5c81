"""Fixtures: real redis-server processes on free loopback ports.

``redis_server`` (and ``redis_url``, ``r``, ``make_stats``, ``cluster_reader`` on it) is one
server for the whole session, reset before every test (tests/servers.py: no keys, scripts,
ACL users or clients of earlier tests, the start-up CONFIG). A test that stops, kills, restarts or
reconfigures Redis beyond that asks for ``private_redis``: a server of its own, which then
backs ``redis_server`` and every fixture on it for that test."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from conduit_otel_cache import CacheStatistics, setup
from conduit_otel_cache.embedded import RedisServer

from .servers import RedisClusterServers, ServerBaseline


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[tuple[RedisServer, ServerBaseline]]:
    """The session's redis-server and the state it started in."""
    with RedisServer() as server:
        yield server, ServerBaseline(server.port)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own (it may stop, kill or reconfigure it)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """The test's ``private_redis`` if it asks for one, else the shared server, reset."""
    if "private_redis" in request.fixturenames:
        yield request.getfixturevalue("private_redis")
        return
    server, baseline = request.getfixturevalue("shared_redis")
    baseline.reset()
    yield server
    if server.process is None or server.process.poll() is not None:
        server.start()  # for the next tests; this one is at fault
        pytest.fail("this test stopped the shared redis-server: give it private_redis")


@pytest.fixture(scope="session")
def shared_redis_cluster() -> Iterator[tuple[RedisClusterServers, dict[int, ServerBaseline]]]:
    """The session's Redis Cluster (3 primaries, 3 replicas) and the state its nodes started in."""
    with RedisClusterServers(masters=3, replicas=1) as servers:
        yield servers, {server.port: ServerBaseline(server.port) for server in servers.servers}


@pytest.fixture
def private_redis_cluster() -> Iterator[RedisClusterServers]:
    """A Redis Cluster of this test's own (it may fail over or move slots)."""
    with RedisClusterServers(masters=3, replicas=1) as servers:
        yield servers


@pytest.fixture
def redis_cluster(request: pytest.FixtureRequest) -> RedisClusterServers:
    """The test's ``private_redis_cluster`` if it asks for one, else the shared one, reset."""
    if "private_redis_cluster" in request.fixturenames:
        private: RedisClusterServers = request.getfixturevalue("private_redis_cluster")
        return private
    servers, baselines = request.getfixturevalue("shared_redis_cluster")
    servers.reset(baselines)
    return servers


@pytest.fixture
def rc(redis_cluster: RedisClusterServers) -> Iterator[RedisCluster]:
    """A client of the test's Redis Cluster, emptied first."""
    client = RedisCluster(
        host="127.0.0.1", port=redis_cluster.servers[0].port, decode_responses=True
    )
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


MakeStats = Callable[..., CacheStatistics]


@pytest.fixture
def cluster_reader(redis_url: str) -> Iterator[Any]:
    """A reader of the cluster's totals and live instances (the pre-fork server tests)."""
    from .prefork_support import ClusterReader

    reader = ClusterReader(redis_url)
    yield reader
    reader.close()


CERTIFICATES_DOC = Path(__file__).resolve().parent.parent / "docs" / "serve.md"


def certificate_recipe() -> str:
    """The shell block of docs/serve.md's "Certificates" section."""
    section = CERTIFICATES_DOC.read_text().split("\n### Certificates\n", 1)[1]
    found = re.search(r"^```bash\n(.*?)^```", section.split("\n## ", 1)[0], re.M | re.S)
    assert found, "docs/serve.md: no bash block in Certificates"
    return found.group(1)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server and a client certificate it signed (for 127.0.0.1 and localhost),
    made by the recipe users are given (docs/serve.md, "Certificates")."""
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make test certificates (apt-get install openssl)")
    d = tmp_path_factory.mktemp("certs")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", certificate_recipe()], cwd=d,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return d


def scrape_once(**options: Any) -> str:
    """The /metrics text of a fresh exporter for ``options`` (its per-instance pass run)."""
    from prometheus_client import generate_latest

    from conduit_otel_cache.config import Settings
    from conduit_otel_cache.serve.service import ExporterService

    service = ExporterService(Settings.load(aggregation_cache_ttl=0, **options), port=0)
    try:
        service.aggregator.refresh_instances()
        return generate_latest(service.exposition.registry).decode()
    finally:
        service.stop()


def wait_for(
    condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout``
    (saying ``what`` was awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        time.sleep(interval)


@pytest.fixture
def make_stats(redis_url: str) -> Iterator[MakeStats]:
    """Independent handles (no global provider, no background flush, no read cache)."""
    handles: list[CacheStatistics] = []

    def make(instance_id: str, **options: Any) -> CacheStatistics:
        options = {
            "redis_url": redis_url,
            "set_global": False,
            "flush_interval": None,
            "aggregation_cache_ttl": 0,
            **options,
        }
        handle = setup(instance_id=instance_id, **options)
        handles.append(handle)
        return handle

    yield make
    for handle in handles:
        handle.shutdown()
