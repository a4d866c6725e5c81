"""A Redis Cluster's statistics in S shards by instance (``redis_cluster_shards``): a layout
for fleets that outgrow one primary.

In the default layout of a Redis Cluster a region's keys share the slot ``{<region>}`` and
an instance's the slot ``{global}``, so a flush is one script call per changed region and
one for the heartbeat. With S shards, each instance belongs to one shard (by a hash of its
id), and every key of the instance, with the partial totals of every region it writes to,
lives under its shard's hash tag, named as on a standalone Redis. A flush is then one
``lua/flush.lua`` call, as on a standalone Redis, and the shards' tags are chosen so that
their slots spread evenly over the slot range (on Redis Cluster's even split, over the
primaries). Readers read every shard and add them up: the totals of a region are the sum
of its S partial totals, each kept monotonic across a data loss on its own
(continuity.py), and the live instances are the union of the S heartbeat sets.

Each shard is a :class:`~conduit_otel_cache.store.Store` on one key schema; :class:`Shards`
routes an instance's operations to its shard and runs a reader's on each shard.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .config import ConnectionSettings
from .connection import Client, connect
from .protocol import FlushResult, Writer
from .store import Counts, Heartbeats, Store, Topology

__all__ = ["Shards", "open_store", "shard_tags"]


def open_store(settings: ConnectionSettings) -> Store | Shards:
    """The store of ``settings``, on a new client: :class:`Shards` with
    ``redis_cluster_shards``, else one :class:`~conduit_otel_cache.store.Store`."""
    if settings.redis_cluster_shards:
        return Shards(
            connect(settings), settings.key_prefix, settings.batch_size,
            settings.redis_cluster_shards,
        )  # fmt: skip
    return Store.from_settings(settings)


def shard_tags(count: int) -> list[str]:
    """The hash tags of ``count`` shards: shard k's is the first ``s<k>.<n>`` whose slot lies
    in the middle half of the k-th of ``count`` equal parts of the slot range (so that a
    split of the slots that differs by a few from equal parts still puts it in the k-th)."""
    tags = []
    for k in range(count):
        width = REDIS_CLUSTER_HASH_SLOTS / count
        low, high = (k + 0.25) * width, (k + 0.75) * width
        n = 0
        while not low <= key_slot(f"s{k}.{n}".encode()) < high:
            n += 1
        tags.append(f"s{k}.{n}")
    return tags


class Shards:
    """The statistics of one ``key_prefix`` in ``count`` shards of a Redis Cluster: the
    instance operations of :class:`~conduit_otel_cache.store.Store` go to the instance's
    shard, the readers' run on every shard and add up."""

    def __init__(
        self, client: Client, key_prefix: str = "conduit:", batch_size: int = 100, count: int = 2
    ) -> None:
        self.client = client
        self.parts = [Store(client, key_prefix, batch_size, shard=t) for t in shard_tags(count)]
        self.topology: Topology = self.parts[0].topology

    def check_layout(self, ttl: float) -> None:
        """:meth:`Store.check_layout` of this many shards."""
        self.parts[0].check_layout(ttl, str(len(self.parts)))

    def of(self, instance_id: str) -> Store:
        """The shard that holds ``instance_id``'s keys."""
        return self.parts[zlib.crc32(instance_id.encode()) % len(self.parts)]

    # -- an instance's operations: in its shard ------------------------------------------

    def flush(self, writer: Writer, entries: Any, **options: Any) -> FlushResult:
        """:meth:`Store.flush` in the writer's shard."""
        return self.of(writer.instance_id).flush(writer, entries, **options)

    def heartbeat(self, writer: Writer) -> FlushResult:
        """:meth:`Store.heartbeat` in the writer's shard."""
        return self.of(writer.instance_id).heartbeat(writer)

    def leave_stale(self, writer: Writer, regions: Sequence[str], *, live: str = "0") -> None:
        """:meth:`Store.leave_stale` in the writer's shard."""
        self.of(writer.instance_id).leave_stale(writer, regions, live=live)

    def depart(self, instance_id: str, **options: Any) -> bool:
        """:meth:`Store.depart` in the instance's shard."""
        return self.of(instance_id).depart(instance_id, **options)

    def read_instances(
        self, instance_ids: Sequence[str], regions: Sequence[str]
    ) -> dict[tuple[str, str], dict[str, str] | Exception]:
        """:meth:`Store.read_instances`, each instance in its shard."""
        result: dict[tuple[str, str], dict[str, str] | Exception] = {}
        for part, ids in self._by_shard(instance_ids):
            result.update(part.read_instances(ids, regions))
        return result

    def read_samples(
        self, instance_ids: Sequence[str], region: str, count: int
    ) -> dict[str, list[float]]:
        """:meth:`Store.read_samples`, each instance in its shard."""
        result: dict[str, list[float]] = {}
        for part, ids in self._by_shard(instance_ids):
            result.update(part.read_samples(ids, region, count))
        return result

    def _by_shard(self, instance_ids: Sequence[str]) -> list[tuple[Store, list[str]]]:
        groups: dict[int, list[str]] = {}
        for instance_id in instance_ids:
            groups.setdefault(id(self.of(instance_id)), []).append(instance_id)
        return [(p, groups[id(p)]) for p in self.parts if id(p) in groups]

    # -- readers: every shard ---------------------------------------------------------

    def reap(self, instance_timeout: float) -> list[str]:
        """:meth:`Store.reap` in every shard."""
        return [i for part in self.parts for i in part.reap(instance_timeout)]

    def cleanup(self, retention_period: float) -> list[str]:
        """:meth:`Store.cleanup` in every shard."""
        return [i for part in self.parts for i in part.cleanup(retention_period)]

    def acknowledge_losses(self) -> list[str]:
        """:meth:`Store.acknowledge_losses` in every shard; the regions that had any."""
        return sorted({r for part in self.parts for r in part.acknowledge_losses()})

    def remove_strays(self, instance_timeout: float) -> list[str]:
        """:meth:`Store.remove_strays` in every shard."""
        return [e for part in self.parts for e in part.remove_strays(instance_timeout)]

    def heartbeats(self) -> Heartbeats:
        """Every shard's heartbeats, at the first shard's server time."""
        reads = [part.heartbeats() for part in self.parts]
        beats = {i: beat for read in reads for i, beat in read.beats.items()}
        errors = tuple(e for read in reads for e in read.errors)
        return Heartbeats(reads[0].server_time, beats, errors)

    def read_request_counts(self, regions: Sequence[str]) -> tuple[Counts, list[str]]:
        """:meth:`Store.read_request_counts` of every shard, by region (instance ids do not
        recur across shards)."""
        result: Counts = {}
        errors: list[str] = []
        for part in self.parts:
            counts, bad = part.read_request_counts(regions)
            errors += bad
            for region, by_instance in counts.items():
                result.setdefault(region, {}).update(by_instance)
        return result, errors

    def server_time(self) -> float:
        """Redis server time in seconds."""
        return self.parts[0].server_time()

    def ping(self) -> float:
        """Round-trip time of a PING in seconds."""
        return self.parts[0].ping()

    def used_memory(self) -> int:
        """``used_memory`` summed over the primaries."""
        return self.parts[0].used_memory()

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()
