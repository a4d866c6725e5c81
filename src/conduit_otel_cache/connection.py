"""Redis connections: URLs, TLS, timeouts, retries, the Redis Cluster and Sentinel clients."""

from __future__ import annotations

import inspect
from typing import Any, TypeAlias
from urllib.parse import parse_qsl

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from .config import (
    SENTINEL_SCHEMES,
    ConnectionSettings,
    redis_cluster_address,
    sentinel_address,
)

#: A standalone client or a Redis Cluster client.
Client: TypeAlias = redis.Redis | RedisCluster


def _redis_cluster_options() -> dict[str, Any]:
    """Options of :class:`RedisCluster` that this redis-py version needs.

    redis-py 7+ resolves a command's routing policy before pipelining it and, for a command
    without one, asks the server (``COMMAND GETKEYS``, one round trip per queued command)
    whether it has keys; ``EVALSHA`` has none listed, so give it the keyed policy: it is
    routed by its keys like any keyed command and a pipeline stays one round trip per node.
    (``RedisCluster.pipeline()`` does not hand the resolver on: see :func:`pipeline`.)
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


def pipeline(client: Client) -> Any:
    """A non-transactional pipeline of ``client`` that routes ``EVALSHA`` by its keys:
    ``RedisCluster.pipeline()`` does not hand on the client's policy resolver (see
    :func:`_redis_cluster_options`; a private attribute, checked before it is set)."""
    pipe = client.pipeline(transaction=False)
    resolver = getattr(client, "_policy_resolver", None)
    if resolver is not None and hasattr(pipe, "_policy_resolver"):
        pipe._policy_resolver = resolver
    return pipe


def _no_client_setinfo() -> dict[str, Any]:
    """Options that keep redis-py 7.2+ from sending ``CLIENT SETINFO`` when it connects:
    the least-privilege ACL (operations.md) does not allow it, so Valkey and Redis 7.2+
    refuse it, an entry in the ACL log on every connection. Older redis-py still sends it:
    there a connection that drops at once is seen inside the connect, which retries it
    ``connect_retries`` times (without it, redis-py 6.0 made 1 to 16 connections, varying,
    where ``connect_retries=3`` makes 4)."""
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters:
        return {"driver_info": None}
    return {}


def _retry(settings: ConnectionSettings) -> Retry:
    """A dropped connection is re-established ``connect_retries`` times at once; a timeout is
    not retried, so a hung Redis costs one ``socket_timeout``, not several."""
    return Retry(
        ExponentialBackoff(cap=0.5, base=0.05),
        retries=settings.connect_retries,
        supported_errors=(redis.ConnectionError,),
    )


def _sentinel_client(settings: ConnectionSettings, tls: dict[str, Any]) -> redis.Redis:
    """The primary that the sentinels of ``settings.redis_url`` name, rediscovered from them
    whenever a connection drops or the server it reaches was demoted to a replica."""
    address = sentinel_address(settings.redis_url)
    sockets: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_keepalive": settings.socket_keepalive,
        **_no_client_setinfo(),
        **({"ssl": True, **tls} if address.tls else {}),
    }
    credentials = {"username": address.username, "password": address.password}
    # redis-py < 8.2 leaves Sentinel untyped; 8.2 types it: the ignores hold for both
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(address.sentinels),
        sentinel_kwargs={
            **sockets,
            "retry": _retry(settings),  # not redis-py's default: seconds of backoff per sentinel
            **(credentials if address.sentinel_auth else {}),
        },
        **sockets,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        address.service,
        db=address.db,
        username=address.username,
        password=address.password,
        decode_responses=True,
        encoding_errors="replace",
        # a failover surfaces as ConnectionError (dropped, or "now a replica"): the retry
        # asks the sentinels for the new primary and sends the command there
        retry=_retry(settings),
        retry_on_timeout=False,
        health_check_interval=30,
    )
    return client


def _query_credentials(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its ``username`` and ``password`` query parameters, and those decoded
    once: redis-py 6.0 decodes query parameters twice (a password holding ``%60`` would log
    in as one holding a backquote), and its ``from_url`` lets the URL's win over keywords."""
    base, _, rest = url.partition("?")
    query, hash_mark, fragment = rest.partition("#")
    kept, credentials = [], {}
    for piece in query.split("&") if query else []:
        pairs = parse_qsl(piece, keep_blank_values=True)
        if pairs and pairs[0][0] in ("username", "password"):
            credentials[pairs[0][0]] = pairs[0][1]
        else:
            kept.append(piece)
    if not credentials:
        return url, {}
    return base + ("?" if kept else "") + "&".join(kept) + hash_mark + fragment, credentials


def connect(settings: ConnectionSettings) -> Client:
    """A Redis client for ``settings.redis_url`` with the configured timeouts: a
    :class:`redis.cluster.RedisCluster` when the URL names a Redis Cluster, the current
    primary of a Redis Sentinel service for ``redis+sentinel://``."""
    tls: dict[str, Any] = {}
    if settings.redis_url.startswith("rediss"):
        tls = {
            "ssl_ca_certs": settings.ssl_ca_certs,
            "ssl_certfile": settings.ssl_certfile,
            "ssl_keyfile": settings.ssl_keyfile,
        }
    if settings.redis_url.partition(":")[0] in SENTINEL_SCHEMES:
        return _sentinel_client(settings, tls)
    if settings.redis_cluster:
        address = redis_cluster_address(settings.redis_url)
        return RedisCluster(
            startup_nodes=[
                ClusterNode(host, port)  # type: ignore[no-untyped-call, unused-ignore]
                for host, port in address.nodes
            ],
            username=address.username,
            password=address.password,
            decode_responses=True,
            encoding_errors="replace",
            socket_timeout=settings.socket_timeout,
            socket_connect_timeout=settings.connect_timeout,
            socket_keepalive=settings.socket_keepalive,
            # the Redis Cluster client's own retry follows MOVED/ASK and failovers
            health_check_interval=30,
            **({"ssl": True, **tls} if address.tls else {}),
            **_redis_cluster_options(),
            **_no_client_setinfo(),
        )
    url, credentials = _query_credentials(settings.redis_url)
    return redis.Redis.from_url(
        url,
        **credentials,
        decode_responses=True,
        encoding_errors="replace",  # foreign bytes become invalid names, reported, not raised
        socket_timeout=settings.socket_timeout,
        socket_connect_timeout=settings.connect_timeout,
        socket_keepalive=settings.socket_keepalive,
        retry=_retry(settings),
        retry_on_timeout=False,
        health_check_interval=30,
        **tls,
        **_no_client_setinfo(),
    )
