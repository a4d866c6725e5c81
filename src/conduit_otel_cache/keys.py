"""The Redis key schema: the only module that knows key names, for both topologies.

Keys (``conduit:`` is ``key_prefix``)::

    conduit:cache:instances                    zset  instance id -> last heartbeat (Redis TIME)
    conduit:cache:regions                      set   every region reported
    conduit:cache:stats:<instance>:<region>    hash  the instance's cumulative statistics
    conduit:cache:stats:aggregated:<region>    hash  the cluster totals, kept at flush time
    conduit:cache:stats:aggregated:<region>:writes  hash  the writes the totals hold: instance
                                                     id -> token:write number, their epoch
    conduit:cache:stats:aggregated:<region>:continuity  hash  what Redis data losses took from
                                                     the totals, carried over by every serve
                                                     replica: the epoch it is for, counters
    conduit:cache:instance:<instance>          hash  incarnation token, owner, live flag, last flush
    conduit:cache:instance:<instance>:regions  set   regions the instance reported
    conduit:cache:flush_errors                 hash  error kind -> failed flushes of every
                                                     instance (carried by its next write)
    conduit:cache:counts:<region>              hash  live instance id -> '<hit_count> <miss_count>'
                                                     (drift, per-instance hit ratios)
    conduit:cache:stats:<instance>:<region>:response_times  list  the last raw response times
    conduit:cache:layouts                      zset  a Redis Cluster's layouts written (below)
                                                     -> when last recorded

On a Redis Cluster every script must stay in one hash slot, so the keys carry hash tags:
the instance-level keys share ``{global}`` and a region's keys share ``{<region>}``::

    conduit:cache:{global}:instances                 conduit:cache:{<region>}:stats:<instance>
    conduit:cache:{global}:regions                   conduit:cache:{<region>}:aggregated
                                                     conduit:cache:{<region>}:aggregated:writes
                                                     conduit:cache:{<region>}:aggregated:continuity
    conduit:cache:{global}:instance:<instance>       conduit:cache:{<region>}:counts
    conduit:cache:{global}:instance:<instance>:regions
    conduit:cache:{global}:flush_errors

With ``redis_cluster_shards`` S (a layout for large fleets), a Redis Cluster holds S shards
instead: every key of an instance, and the partial totals of every region it writes to, live
under its shard's hash tag, named as on a standalone Redis (:mod:`.shards`)::

    conduit:cache:{s<k>.<n>}:instances    conduit:cache:{s<k>.<n>}:stats:aggregated:<region>   ...

Every key a script writes is named here and passed to it in ``KEYS``, so that a Redis Cluster
routes the call by all of them (a slot in migration answers ASK or TRYAGAIN). Only
``lua/members.lua`` derives keys (instance meta keys from :meth:`KeySchema.meta` of an empty
id), which it only reads: ``lua/stray.lua`` removes what it found, with the keys declared.
"""

from __future__ import annotations


class KeySchema:
    """Key names under ``key_prefix``; hash-tagged on a Redis Cluster (the instance-level
    keys share ``{global}``, a region's keys ``{<region>}``; names cannot contain braces), so
    that every script call stays in one hash slot; or every key under one ``shard`` tag.
    The layout is chosen once, here: the methods below only fill it in."""

    def __init__(
        self, key_prefix: str = "conduit:", *, redis_cluster: bool = False, shard: str = ""
    ) -> None:
        #: the layouts written on a Redis Cluster (``redis_cluster_shards``: 0 by region,
        #: else S) -> when last recorded: readers read every one in use (:mod:`.shards`)
        self.layouts = key_prefix + "cache:layouts"
        self.prefix = prefix = key_prefix + "cache:" + (f"{{{shard}}}:" if shard else "")
        if redis_cluster and not shard:  # a region's keys share {<region>}, the others {global}
            self._global = prefix + "{global}:"
            self._stats = "{{{region}}}:stats:{instance}"
            self._aggregate = "{{{region}}}:aggregated"
            self._counts = "{{{region}}}:counts"
        else:
            self._global = prefix
            self._stats = "stats:{instance}:{region}"
            self._aggregate = "stats:aggregated:{region}"
            self._counts = "counts:{region}"

    @property
    def instances(self) -> str:
        """The heartbeat sorted set."""
        return self._global + "instances"

    @property
    def regions(self) -> str:
        """The set of all regions."""
        return self._global + "regions"

    @property
    def flush_errors(self) -> str:
        """Failed flushes of every instance by error kind, carried by its next write."""
        return self._global + "flush_errors"

    def stats(self, instance_id: str, region: str) -> str:
        """One instance's statistics of one region."""
        return self.prefix + self._stats.format(instance=instance_id, region=region)

    def aggregate(self, region: str) -> str:
        """The cluster totals of one region."""
        return self.prefix + self._aggregate.format(region=region)

    def writes(self, region: str) -> str:
        """The writes one region's totals hold (instance id -> ``token:write number``, and
        their epoch), in the totals' hash slot."""
        return self.aggregate(region) + ":writes"

    def continuity(self, region: str) -> str:
        """What Redis data losses took from one region's totals, carried over by every
        reader (continuity.py), in the totals' hash slot."""
        return self.aggregate(region) + ":continuity"

    def meta(self, instance_id: str) -> str:
        """One instance's incarnation token, owner and live flag."""
        return f"{self._global}instance:{instance_id}"

    def instance_regions(self, instance_id: str) -> str:
        """The regions one instance reported."""
        return f"{self._global}instance:{instance_id}:regions"

    def counts(self, region: str) -> str:
        """Live instances' hit and miss counts in one region (``<hits> <misses>`` per
        instance id), written by every flush that changes them: drift and per-instance
        hit ratios, one read per region."""
        return self.prefix + self._counts.format(region=region)

    def samples(self, instance_id: str, region: str) -> str:
        """The last raw response times of one instance in one region (a list)."""
        return self.stats(instance_id, region) + ":response_times"
