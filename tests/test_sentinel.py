"""Redis Sentinel: ``redis+sentinel://`` URLs, proven on real processes: a primary, a replica
and three sentinels (``redis-server --sentinel``) on free loopback ports. Instances record
while ``SENTINEL FAILOVER`` moves the primary; the totals stay exact and ``serve`` follows."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conduit_otel_cache import CacheStatistics, Settings, setup
from conduit_otel_cache.config import ConfigError, redact_url, sentinel_address
from conduit_otel_cache.embedded import RedisServer, free_port, redis_server_binary
from conduit_otel_cache.serve.service import ExporterService

from .conftest import wait_for
from .servers import chosen_server, has_tls, running_server

SERVICE = "conduit-primary"
REGIONS = ("ProviderResponses", "Sessions")
PASSWORD = "s3cr3t-sentinel-pw"


def tls_config(tls_dir: Path | None) -> list[str]:
    """Server-side TLS directives (also used for replication and the sentinels' links)."""
    if tls_dir is None:
        return []
    return [f"tls-cert-file {tls_dir / 'server.crt'}", f"tls-key-file {tls_dir / 'server.key'}",
            f"tls-ca-cert-file {tls_dir / 'ca.crt'}", "tls-replication yes"]  # fmt: skip


def client_tls(tls_dir: Path | None) -> dict[str, Any]:
    """redis-py options of a TLS client with a client certificate (or none)."""
    if tls_dir is None:
        return {}
    return {"ssl": True, "ssl_ca_certs": str(tls_dir / "ca.crt"),
            "ssl_certfile": str(tls_dir / "client.crt"),
            "ssl_keyfile": str(tls_dir / "client.key")}  # fmt: skip


class Sentinel:
    """One ``redis-server --sentinel`` process monitoring ``SERVICE`` on 127.0.0.1 (TLS only
    when ``tls_dir`` is given)."""

    def __init__(self, primary_port: int, password: str | None, tls_dir: Path | None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="conduit-sentinel-"))
        auth = [f"sentinel auth-pass {SERVICE} {password}", f"requirepass {password}"]
        listen = ["port 0", f"tls-port {self.port}"] if tls_dir else [f"port {self.port}"]
        (self.dir / "sentinel.conf").write_text(
            "\n".join([
                *listen, *tls_config(tls_dir), "bind 127.0.0.1", f"dir {self.dir}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
                f"sentinel down-after-milliseconds {SERVICE} 2000",
                f"sentinel failover-timeout {SERVICE} 10000",
                *(auth if password else []),
            ]) + "\n"
        )  # fmt: skip
        self.process = subprocess.Popen(
            [redis_server_binary(), str(self.dir / "sentinel.conf"), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        self.client = redis.Redis(
            port=self.port, password=password, decode_responses=True, **client_tls(tls_dir)
        )
        wait_for(self._answers, timeout=10)

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def primary_port(self) -> int:
        _host, port = self.client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup:
    """A primary, its replica and three sentinels; ``url`` names the service. With ``tls_dir``
    the servers also listen with TLS, replicate over it, and the sentinels speak TLS only."""

    def __init__(self, password: str | None = None, tls_dir: Path | None = None) -> None:
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        self.password = password
        self.tls_dir = tls_dir
        #: the port the sentinels name each server by (its TLS port with tls_dir)
        self.announced: dict[int, RedisServer] = {}
        self.sentinels: list[Sentinel] = []
        primary_port = self._start(auth)
        self.primary = self.announced[primary_port]
        try:
            self.replica = self.announced[
                self._start([*auth, "--replicaof", "127.0.0.1", str(primary_port)])
            ]
            wait_for(lambda: self.info(self.replica).get("master_link_status") == "up")
            self.sentinels = [Sentinel(primary_port, password, tls_dir) for _ in range(3)]
            wait_for(self.settled, timeout=30)
        except BaseException:
            self.close()
            raise

    def _start(self, args: list[str]) -> int:
        tls: list[str] = []
        if self.tls_dir is not None:
            tls = ["--tls-port", str(free_port())]
            for line in tls_config(self.tls_dir):
                tls += ["--" + line.split()[0], line.split()[1]]
        server = RedisServer(None, *args, *tls).start()
        port = int(tls[1]) if tls else server.port
        self.announced[port] = server
        return port

    def port_of(self, server: RedisServer) -> int:
        return next(port for port, s in self.announced.items() if s is server)

    def url(self, *, query: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        user = f":{self.password}@" if self.password else ""
        scheme = "rediss+sentinel" if self.tls_dir else "redis+sentinel"
        return f"{scheme}://{user}{hosts}/{SERVICE}/0" + (f"?{query}" if query else "")

    def info(self, server: RedisServer) -> dict[str, str]:
        """INFO replication of ``server`` (over its plain port)."""
        with redis.Redis(port=server.port, password=self.password, decode_responses=True) as c:
            info: dict[str, str] = {k: str(v) for k, v in c.info("replication").items()}
            return info

    def settled(self) -> bool:
        """Every sentinel names the same primary, sees its replica up and the other two
        sentinels, and that primary has its replica linked."""
        primary = {s.primary_port() for s in self.sentinels}
        if len(primary) != 1:
            return False
        port = primary.pop()
        for sentinel in self.sentinels:
            replicas = sentinel.client.sentinel_slaves(SERVICE)
            peers = sentinel.client.sentinel_sentinels(SERVICE)
            if [r["flags"] for r in replicas] != ["slave"] or len(peers) != 2:
                return False
        other = next(s for p, s in self.announced.items() if p != port)
        return (
            self.info(other).get("master_link_status") == "up"
            and self.info(self.announced[port]).get("role") == "master"
        )

    def current_primary(self) -> RedisServer:
        ports = {s.primary_port() for s in self.sentinels}
        assert len(ports) == 1, ports
        return self.announced[ports.pop()]

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in self.announced.values():
            server.close()


@pytest.fixture
def sentinels() -> Iterator[SentinelSetup]:
    setup_ = SentinelSetup()
    yield setup_
    setup_.close()


def instance(url: str, instance_id: str, **options: object) -> CacheStatistics:
    """A handle that flushes only when told to and reads Redis on every cluster read."""
    return setup(redis_url=url, instance_id=instance_id, set_global=False, flush_interval=None,
                 aggregation_cache_ttl=0, **options)  # fmt: skip


def record(handle: CacheStatistics, n: int) -> None:
    for region in REGIONS:
        for i in range(n):
            handle.record_hit(region, 0.001 * (1 + i % 3))
        handle.record_miss(region, 0.02)
        handle.record_set(region)


# --- URL parsing and validation ------------------------------------------------------------


def test_sentinel_url_forms() -> None:
    address = sentinel_address("redis+sentinel://h1:26380,h2/svc/3")
    assert address.sentinels == (("h1", 26380), ("h2", 26379))
    assert (address.service, address.db, address.tls, address.sentinel_auth) == (
        "svc", 3, False, False
    )  # fmt: skip
    assert (address.username, address.password) == (None, None)
    address = sentinel_address("rediss+sentinel://app:p%40ss@h1:1/svc?sentinel_auth=true")
    assert (address.username, address.password, address.tls, address.sentinel_auth) == (
        "app", "p@ss", True, True
    )  # fmt: skip
    assert address.db == 0
    assert Settings.load(redis_url="redis+sentinel://h1:1/svc/0").is_redis_cluster is False


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h1:1", "names the monitored service"),
        ("redis+sentinel://h1:1/svc/0/extra", "names the monitored service"),
        ("redis+sentinel://h1:1/bad name/0", "names the monitored service"),
        ("redis+sentinel://h1:1/svc/x", "database must be a number"),
        ("redis+sentinel://h1:notaport/svc", "not a valid sentinel URL"),
        ("redis+sentinel://h1:1,/svc", "not a valid sentinel URL"),
        ("redis+sentinel://h1:1/svc?sentinel_auth=maybe", "sentinel_auth must be true or false"),
        ("redis+sentinel://h1:1/svc?password=x", "takes one query parameter, sentinel_auth"),
    ],
)
def test_bad_sentinel_urls_name_the_setting(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="redis_url") as err:
        Settings.load(redis_url=url)
    assert message in str(err.value)


def test_sentinel_password_never_shown() -> None:
    url = f"redis+sentinel://app:{PASSWORD}@h1:1,h2:2/svc/0"
    assert PASSWORD not in redact_url(url)
    assert redact_url(url) == "redis+sentinel://app:***@h1:1,h2:2/svc/0"
    with pytest.raises(ConfigError) as err:
        Settings.load(redis_url=f"redis+sentinel://app:{PASSWORD}@h1:1/svc/x")
    assert PASSWORD not in str(err.value)
    assert PASSWORD not in repr(Settings.load(redis_url=url))
    with pytest.raises(ConfigError, match="Redis Cluster needs a redis://"):
        Settings.load(redis_url=url, redis_cluster=True)


# --- real sentinels ------------------------------------------------------------------------


def test_records_through_the_primary_the_sentinels_name(sentinels: SentinelSetup) -> None:
    handles = [instance(sentinels.url(), f"api-{n}") for n in (1, 2)]
    try:
        for n, handle in enumerate(handles, 1):
            record(handle, 10 * n)
            assert handle.flush()
        assert handles[0].cluster_statistics(REGIONS[0]).hit_count == 30
        # the data is on the primary and replicated, not on a second standalone server
        with redis.Redis(port=sentinels.primary.port, decode_responses=True) as primary:
            assert primary.exists("conduit:cache:instances") == 1
        ports = [s.port for s in (sentinels.primary, sentinels.replica, *sentinels.sentinels)]
        assert {running_server(port) for port in ports} == {chosen_server()}
    finally:
        for handle in handles:
            handle.shutdown()


def test_password_protected_sentinels_and_servers() -> None:
    protected = SentinelSetup(password=PASSWORD)
    try:
        handle = instance(protected.url(query="sentinel_auth=true"), "api-1")
        try:
            record(handle, 4)
            assert handle.flush()
            assert handle.cluster_statistics(REGIONS[1]).hit_count == 4
            assert PASSWORD not in handle.settings.safe_redis_url
        finally:
            handle.shutdown()
        # without sentinel_auth the sentinels refuse the client: flush fails, no crash
        refused = instance(protected.url(), "api-2", connect_retries=0)
        try:
            record(refused, 1)
            assert not refused.flush()
        finally:
            refused.shutdown()
    finally:
        protected.close()


@pytest.mark.slow
def test_failover_keeps_totals_exact_and_serve_follows(sentinels: SentinelSetup) -> None:
    url = sentinels.url()
    handles = [instance(url, f"api-{n}") for n in (1, 2, 3)]
    service = ExporterService(Settings.load(redis_url=url, aggregation_cache_ttl=0), port=0)
    recorded = 0  # hits per region
    failed = rounds = 0

    def round_() -> None:
        nonlocal recorded, failed, rounds
        for n, handle in enumerate(handles, 1):
            record(handle, n)
            recorded += n
            failed += not handle.flush()
        rounds += 1

    try:
        for _ in range(3):
            round_()
        assert service.aggregator.view().regions[REGIONS[0]].hit_count == recorded
        old = sentinels.current_primary()
        assert old is sentinels.primary
        assert sentinels.sentinels[0].client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        deadline = time.monotonic() + 30
        while not (sentinels.settled() and sentinels.current_primary() is not old):
            round_()  # keeps recording and flushing while the primary moves
            assert time.monotonic() < deadline, "the failover did not complete"
            time.sleep(0.05)
        new = sentinels.current_primary()
        assert new is sentinels.replica
        for _ in range(3):
            round_()
        for handle in handles:  # one more flush each; a flush that failed is resent
            assert wait_for(handle.flush, timeout=10)
        # the old primary is gone: serve and the instances read the new one
        sentinels.primary.kill()
        for region in REGIONS:
            view = service.aggregator.view()
            assert view.redis_up, view.redis_error
            totals = view.regions[region]
            assert totals.hit_count == recorded  # nothing lost, nothing doubled
            assert (totals.miss_count, totals.set_count) == (3 * rounds, 3 * rounds)
            assert totals.instance_count == 3
            assert handles[1].cluster_statistics(region).hit_count == recorded
        assert service.aggregator.view().active_count == 3
        with redis.Redis(port=new.port, decode_responses=True) as primary:
            assert primary.info("replication")["role"] == "master"
            assert primary.exists("conduit:cache:instances") == 1
        assert failed < 3 * rounds
    finally:
        service.stop()
        for handle in handles:
            handle.shutdown()


@pytest.mark.slow
def test_tls_sentinels_and_servers_with_client_certificates(certs: Path) -> None:
    """``rediss+sentinel://``: TLS (with client certificates) to the sentinels and to the
    primary they name; the servers replicate over TLS too."""
    if not has_tls(redis_server_binary()):
        pytest.fail(f"{redis_server_binary()} has no TLS: apt-get install redis-server")
    secure = SentinelSetup(tls_dir=certs)
    try:
        url = secure.url()
        assert url.startswith("rediss+sentinel://")
        tls = {"ssl_ca_certs": str(certs / "ca.crt"), "ssl_certfile": str(certs / "client.crt"),
               "ssl_keyfile": str(certs / "client.key")}  # fmt: skip
        handle = instance(url, "tls-1", **tls)
        try:
            record(handle, 6)
            assert handle.flush()
            assert handle.cluster_statistics(REGIONS[0]).hit_count == 6
        finally:
            handle.shutdown()
        # the data went to the primary (read over its plain port) and on to the replica
        with redis.Redis(port=secure.primary.port, decode_responses=True) as primary:
            key = f"conduit:cache:stats:aggregated:{REGIONS[0]}"
            assert primary.hget(key, "hit_count") == "6"
        with redis.Redis(port=secure.replica.port, decode_responses=True) as replica:
            wait_for(lambda: replica.hget(key, "hit_count") == "6")
        # without a client certificate the TLS sentinels refuse: the flush fails, no crash
        refused = instance(url, "tls-2", ssl_ca_certs=str(certs / "ca.crt"), connect_retries=0)
        try:
            record(refused, 1)
            assert not refused.flush()
        finally:
            refused.shutdown()
    finally:
        secure.close()
