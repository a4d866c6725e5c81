"""Redis connections: URLs, TLS, timeouts, retries, the Redis Cluster client."""

from __future__ import annotations

import inspect
from typing import Any, TypeAlias

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from .config import Settings, cluster_address

#: A standalone client or a Redis Cluster client.
Client: TypeAlias = redis.Redis | RedisCluster


def _cluster_options() -> dict[str, Any]:
    """Options of :class:`RedisCluster` that this redis-py version needs.

    redis-py 7+ resolves a command's routing policy before pipelining it and, for a command
    without one, asks the server (``COMMAND GETKEYS``, one round trip per queued command)
    whether it has keys; ``EVALSHA`` has none listed, so give it the keyed policy: it is
    routed by its keys like any keyed command and a pipeline stays one round trip per node.
    (``RedisCluster.pipeline()`` does not hand the resolver on: see ``Store._pipeline``.)
    """
    if "policy_resolver" not in inspect.signature(RedisCluster.__init__).parameters:
        return {}
    from redis._parsers.commands import CommandPolicies, RequestPolicy, ResponsePolicy
    from redis.commands.policies import StaticPolicyResolver

    keyed = CommandPolicies(
        request_policy=RequestPolicy.DEFAULT_KEYED, response_policy=ResponsePolicy.DEFAULT_KEYED
    )

    class ScriptsAreKeyed(StaticPolicyResolver):
        def resolve(self, command_name: str) -> CommandPolicies | None:
            if command_name.lower() in ("eval", "evalsha"):
                return keyed
            return super().resolve(command_name)

    return {"policy_resolver": ScriptsAreKeyed()}


def connect(settings: Settings) -> Client:
    """A Redis client for ``settings.redis_url`` with the configured timeouts: a
    :class:`redis.cluster.RedisCluster` when the URL names a Redis Cluster."""
    assert settings.redis_url is not None
    tls: dict[str, Any] = {}
    if settings.redis_url.startswith("rediss"):
        tls = {"ssl_ca_certs": settings.ssl_ca_certs, "ssl_certfile": settings.ssl_certfile,
               "ssl_keyfile": settings.ssl_keyfile}  # fmt: skip
    if settings.is_cluster:
        address = cluster_address(settings.redis_url)
        return RedisCluster(
            startup_nodes=[
                ClusterNode(host, port)  # type: ignore[no-untyped-call]
                for host, port in address.nodes
            ],
            username=address.username,
            password=address.password,
            decode_responses=True,
            encoding_errors="replace",
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            socket_keepalive=settings.socket_keepalive,
            # the cluster client's own retry follows MOVED/ASK and failovers
            health_check_interval=30,
            **({"ssl": True, **tls} if address.tls else {}),
            **_cluster_options(),
        )
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        encoding_errors="replace",  # foreign bytes become invalid names, reported, not raised
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        socket_keepalive=settings.socket_keepalive,
        # a dropped connection is re-established connect_retries times at once; a timeout
        # is not retried, so a hung Redis costs one socket_timeout, not several
        retry=Retry(
            ExponentialBackoff(cap=0.5, base=0.05),
            retries=settings.connect_retries,
            supported_errors=(redis.ConnectionError,),
        ),
        retry_on_timeout=False,
        health_check_interval=30,
        **tls,
    )
