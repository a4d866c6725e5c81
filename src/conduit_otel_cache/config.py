"""Settings: every option, its ``CONDUIT_CACHE_STATS_*`` variable, validation, instance id."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qs, parse_qsl, unquote, unquote_plus, urlsplit

from .identity import default_instance_id

ENV_PREFIX = "CONDUIT_CACHE_STATS_"

#: Region names and instance ids: safe inside a Redis key and a Prometheus label.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
#: Instance ids that would collide with the key schema.
RESERVED_INSTANCE_IDS = frozenset({"aggregated"})

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS) names a Redis
#: Cluster by one or more of its nodes; so does any ``redis://``/``rediss://`` URL with
#: ``redis_cluster=True``.
REDIS_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: options of earlier releases under their new names: the old name is refused, naming the new
RENAMED = {"cluster": "redis_cluster"}
#: most shards of ``redis_cluster_shards`` (each reader reads every shard)
MAX_SHARDS = 256
#: ``redis+sentinel://[user:password@]host:port[,host:port...]/<service>[/<db>]``
#: (``rediss+sentinel://`` with TLS) names the primary that Redis Sentinels monitor as
#: ``<service>``; ``?sentinel_auth=true`` sends the credentials to the sentinels too.
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Durations that may be None (no background flush / a heartbeat with every flush).
OPTIONAL_SECONDS = ("flush_interval", "heartbeat_interval")
#: options whose value is a URL that may hold a password (masked wherever shown)
URL_OPTIONS = ("redis_url", "otlp_endpoint")
REDIS_SCHEMES = ("redis", "rediss", "unix", *REDIS_CLUSTER_SCHEMES, *SENTINEL_SCHEMES)

#: ``local``: this process only; ``distributed``: write through to Redis, read the cluster;
#: ``hybrid``: the same as ``distributed`` (both views are always available), named for the
#: migration phase in which local and cluster numbers are compared.
MODES = ("local", "distributed", "hybrid")


class ConfigError(ValueError):
    """An option has an invalid value; the message names the option."""


#: Query parameters whose value is masked: any name with one of these in it.
SECRET_PARAMETER = re.compile(r"pass|pwd|secret|token|auth|key|cred", re.IGNORECASE)
MASK = "***"
#: What a URL needs where a password may have broken it (in an error's hint).
ENCODE_HINT = (
    "percent-encode the password's reserved characters (/ ? # @ : % & = + and space), "
    "e.g. with urllib.parse.quote(password, safe='')"
)


def redact_url(url: str | None) -> str:
    """``url`` fit to print, whatever its form: what may hold a password becomes ``***``.

    Masked: the userinfo but its user name (everything before the *last* ``@``, so that a
    password with unencoded ``/ ? # @`` is masked too; all of it when it has no ``:``), the
    value of the first query parameter whose name names a secret (``password``, ``token``,
    ``auth``...) and everything after it, and any fragment. A string without ``://`` is not
    a URL and is masked whole. Parsing never fails: nothing is assumed about where the
    password ends, every place it may reach is masked.
    """
    if not url:
        return ""
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]{0,30}", scheme):
        return MASK
    masked = [False] * len(rest)

    def mask(start: int, end: int) -> None:
        masked[start:end] = [True] * (end - start)

    at = rest.rfind("@")
    if at >= 0:
        colon = rest.find(":", 0, at)
        named = colon >= 0 and not any(c in rest[:colon] for c in "/?#")
        mask(colon + 1 if named else 0, at)
    for found in re.finditer(r"[?&]([^&=#]*)=", rest):
        if SECRET_PARAMETER.search(unquote_plus(found.group(1))):
            mask(found.end(), len(rest))
            break
    fragment = rest.find("#")
    if fragment >= 0:
        mask(fragment + 1, len(rest))
    runs = itertools.groupby(zip(masked, rest, strict=True), key=lambda pair: pair[0])
    shown = [MASK if hidden else "".join(char for _, char in run) for hidden, run in runs]
    return f"{scheme}://{''.join(shown)}"


def _with_closest(
    names: list[str], options: Mapping[str, object], shown: Callable[[str], str] = str
) -> str:
    """``name (did you mean closest?)`` for each of ``names``."""
    out = []
    for name in names:
        close = difflib.get_close_matches(name, list(options), n=1)
        out.append(f"{shown(name)} (did you mean {shown(close[0])}?)" if close else shown(name))
    return ", ".join(out)


def valid_name(name: object) -> bool:
    """True when ``name`` may be used as a region name or instance id."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


_Part = TypeVar("_Part")


@dataclasses.dataclass(frozen=True)
class ConnectionSettings:
    """Where Redis is and how to reach it (:mod:`.connection`), and where in it the
    statistics live (:class:`~conduit_otel_cache.store.Store`)."""

    redis_url: str = dataclasses.field(repr=False)
    redis_cluster: bool
    socket_timeout: float
    connect_timeout: float
    connect_retries: int
    socket_keepalive: bool
    ssl_ca_certs: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    key_prefix: str
    #: scripts per round trip (1 without ``enable_batching``)
    batch_size: int
    #: a Redis Cluster's statistics in this many shards by instance (0: by region)
    redis_cluster_shards: int = 0
    #: how long a layout written stays read (:mod:`.shards`)
    statistics_ttl: float = 86_400.0

    @property
    def safe_redis_url(self) -> str:
        """The Redis URL with its password masked, for logs and output."""
        return redact_url(self.redis_url)


@dataclasses.dataclass(frozen=True)
class WriteThroughSettings:
    """What the write-through (:mod:`.writethrough`) and the recovery of dead spools
    (:mod:`.recovery`) use."""

    connection: ConnectionSettings
    instance_id: str
    statistics_ttl: float
    instance_timeout: float
    max_response_time_samples: int
    response_time_sample_ttl: float
    response_time_buckets: tuple[float, ...]
    spool_dir: str | None


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """What the pipeline (:mod:`.pipeline`) uses: its provider, flushes, heartbeat,
    spool and shutdown; ``write_through`` is None when nothing is written to Redis."""

    write_through: WriteThroughSettings | None
    instance_id: str
    service_name: str
    set_global: bool
    flush_interval: float | None
    heartbeat_interval: float | None
    #: how long one flush's write may take (twice ``socket_timeout``)
    flush_timeout: float
    #: how long a flush waits to share one in progress (``batch_timeout``; 0 without
    #: ``enable_batching``)
    batch_wait: float
    #: with twice ``flush_timeout``, how long a flush keeps its caller at most
    batch_timeout: float
    shutdown_timeout: float
    instance_timeout: float
    handle_signals: bool


@dataclasses.dataclass(frozen=True)
class AggregationSettings:
    """What the cluster reader (:class:`~conduit_otel_cache.aggregate.Aggregator`) uses."""

    safe_redis_url: str
    instance_timeout: float
    enable_aggregation_cache: bool
    aggregation_cache_ttl: float
    aggregation_interval: float
    max_instance_series: int
    response_time_buckets: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class HealthSettings:
    """The thresholds of the health rules (:mod:`.health`)."""

    min_active_instances: int
    instance_timeout: float
    missing_instance_grace: float
    max_aggregation_latency: float
    drift_min_requests: int
    max_drift_percent: float
    max_memory_bytes: int
    data_loss_period: float


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What ``serve`` itself uses beside the store, the aggregator and the health rules:
    its identity, the series it publishes, cleanup and the OTLP push."""

    instance_id: str
    safe_redis_url: str
    #: how long a rendering is served (0: every scrape reads again)
    cache_ttl: float
    instance_timeout: float
    max_instance_series: int
    cleanup_interval: float
    retention_period: float
    spool_dir: str | None
    otlp_endpoint: str | None = dataclasses.field(repr=False)
    otlp_interval: float
    health: HealthSettings
    #: a view whose refresh has not ended for this long is stale: the cluster's series are
    #: no longer published from it (at least 30 s, and two refreshes of
    #: ``aggregation_cache_ttl`` that each waited ``socket_timeout``)
    stale_after: float


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every option of the library; build with :meth:`Settings.load`."""

    redis_url: str | None = None
    instance_id: str = ""
    flush_interval: float | None = 10.0
    heartbeat_interval: float | None = None
    instance_timeout: float = 60.0
    statistics_ttl: float = 86_400.0
    retention_period: float = 3_600.0
    cleanup_interval: float = 3_600.0
    key_prefix: str = "conduit:"
    aggregation_cache_ttl: float = 5.0
    aggregation_interval: float = 60.0
    aggregation_strategy: str = "sum"
    enable_aggregation_cache: bool = True
    default_region: str = "default"
    max_regions: int = 100
    enable_response_time_tracking: bool = True
    max_response_time_samples: int = 1000
    response_time_sample_ttl: float = 3_600.0
    max_instance_series: int = 1000
    response_time_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    socket_timeout: float = 5.0
    #: the whole shutdown (final flush, deregistration) takes at most this long
    shutdown_timeout: float = 5.0
    connect_timeout: float = 5.0
    enable_batching: bool = True
    batch_size: int = 100
    batch_timeout: float = 0.01
    connect_retries: int = 1
    socket_keepalive: bool = True
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    #: a directory on local disk (an ``emptyDir``) where each incarnation spools its
    #: tallies so that a killed process loses nothing (:mod:`.spool`); None: no spool
    spool_dir: str | None = None
    min_active_instances: int = 1
    missing_instance_grace: float = 60.0
    max_aggregation_latency: float = 0.5
    max_drift_percent: float = 5.0
    drift_min_requests: int = 100
    max_memory_bytes: int = 1 << 30
    #: how long health stays Degraded after Redis lost statistics that could not be
    #: rebuilt (unless an operator acknowledges the loss: ``cleanup --acknowledge-losses``)
    data_loss_period: float = 3600.0
    set_global: bool = True
    #: stand in for SIGTERM's default disposition with a final flush (:mod:`.lifecycle`)
    handle_signals: bool = True
    service_name: str = "conduit"
    enabled: bool = True
    #: ``redis_url`` names a Redis Cluster (implied by ``redis+cluster://``/``rediss+cluster://``)
    redis_cluster: bool = False
    #: the statistics on a Redis Cluster in this many shards by instance, each flush one
    #: script call (:mod:`.shards`); 0: a region's keys in the slot ``{<region>}``
    redis_cluster_shards: int = 0
    mode: str = ""  # "": "distributed" when redis_url is given, else "local"
    #: ``serve`` pushes the cluster view over OTLP/HTTP to this URL (:mod:`.serve.otlp`)
    otlp_endpoint: str | None = None
    otlp_interval: float = 15.0

    def __post_init__(self) -> None:
        mode = self.mode.strip().lower() if isinstance(self.mode, str) else self.mode
        if mode == "":
            mode = "local" if self.redis_url is None else "distributed"
        object.__setattr__(self, "mode", mode)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={redact_url(getattr(self, f.name))!r}"
            if f.name in URL_OPTIONS and getattr(self, f.name) is not None
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"Settings({fields})"

    @property
    def safe_redis_url(self) -> str:
        """The Redis URL with its password masked, for logs and output."""
        return redact_url(self.redis_url)

    @property
    def is_redis_cluster(self) -> bool:
        """True when ``redis_url`` names a Redis Cluster."""
        return self.redis_url is not None and (
            self.redis_cluster or urlsplit(self.redis_url).scheme in REDIS_CLUSTER_SCHEMES
        )

    @property
    def writes_through(self) -> bool:
        """True when this process writes its statistics through to Redis (a ``redis_url``,
        a mode other than ``local``, and ``enabled``)."""
        return self.redis_url is not None and self.mode != "local" and self.enabled

    def _part(self, cls: type[_Part], **computed: Any) -> _Part:
        """The ``cls`` options of a component: its fields of the same names as options,
        and ``computed``."""
        names = {f.name for f in dataclasses.fields(cls)} - set(computed)  # type: ignore[arg-type]
        return cls(**{name: getattr(self, name) for name in names}, **computed)

    @property
    def connection(self) -> ConnectionSettings:
        """The options of the Redis connection (needs a ``redis_url``)."""
        if self.redis_url is None:
            raise ConfigError("redis_url: needed to connect to Redis")
        return self._part(
            ConnectionSettings,
            redis_cluster=self.is_redis_cluster,
            batch_size=self.batch_size if self.enable_batching else 1,
        )

    @property
    def write_through(self) -> WriteThroughSettings:
        """The options of the write-through (needs a ``redis_url``)."""
        return self._part(WriteThroughSettings, connection=self.connection)

    @property
    def pipeline(self) -> PipelineSettings:
        """The options of the pipeline; it writes through when :attr:`writes_through`."""
        return self._part(
            PipelineSettings,
            write_through=self.write_through if self.writes_through else None,
            flush_timeout=self.socket_timeout * 2,
            batch_wait=self.batch_timeout if self.enable_batching else 0.0,
        )

    @property
    def aggregation(self) -> AggregationSettings:
        """The options of the cluster reader."""
        return self._part(AggregationSettings)

    @property
    def health(self) -> HealthSettings:
        """The thresholds of the health rules."""
        return self._part(HealthSettings)

    @property
    def serve(self) -> ServeSettings:
        """The options of ``serve`` itself."""
        ttl = self.aggregation_cache_ttl if self.enable_aggregation_cache else 0.0
        stale_after = max(30.0, 2 * (self.aggregation_cache_ttl + self.socket_timeout))
        return self._part(ServeSettings, cache_ttl=ttl, health=self.health, stale_after=stale_after)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Settings:
        """Settings from keywords, then ``CONDUIT_CACHE_STATS_<NAME>`` variables, then defaults.

        Raises :class:`ConfigError` naming the option for any invalid value.
        """
        env = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for old, new in RENAMED.items():
            if old in options or ENV_PREFIX + old.upper() in env:
                raise ConfigError(
                    f"{old} ({ENV_PREFIX}{old.upper()}): renamed to {new} "
                    f"({ENV_PREFIX}{new.upper()})"
                )
        unknown = set(options) - set(fields)
        if unknown:
            raise ConfigError(f"unknown option(s): {_with_closest(sorted(unknown), fields)}")
        mistyped = sorted(
            var[len(ENV_PREFIX) :].lower()
            for var in env
            if var.startswith(ENV_PREFIX) and var[len(ENV_PREFIX) :].lower() not in fields
        )
        if mistyped:  # a typo in a variable would otherwise be ignored in silence
            names = _with_closest(mistyped, fields, lambda n: ENV_PREFIX + n.upper())
            raise ConfigError(f"unknown variable(s): {names}")
        values: dict[str, Any] = {}
        for name, field in fields.items():
            var = ENV_PREFIX + name.upper()
            if name in options and options[name] is not None:
                values[name] = _coerce(name, field.default, options[name], source=name)
            elif name in OPTIONAL_SECONDS and name in options:
                values[name] = None  # explicit None: no background flush
            elif var in env:
                values[name] = _coerce(name, field.default, env[var], source=var)
        if not values.get("instance_id"):
            values["instance_id"] = default_instance_id(env)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise :class:`ConfigError` when options are invalid or contradict each other."""
        if self.redis_url is not None:
            _check_url(self.redis_url)
            if self.is_redis_cluster:
                redis_cluster_address(self.redis_url)
        if self.otlp_endpoint is not None:
            _check_otlp_endpoint(self.otlp_endpoint)
        if self.mode not in MODES:
            raise ConfigError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r:.60}")
        if self.mode != "local" and self.redis_url is None:
            raise ConfigError(
                f"mode: {self.mode!r} needs redis_url (CONDUIT_CACHE_STATS_REDIS_URL); "
                "use mode='local' for one process only"
            )
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file: {path!r}")
        if self.spool_dir is not None and not (
            os.path.isdir(self.spool_dir) and os.access(self.spool_dir, os.W_OK | os.X_OK)
        ):
            raise ConfigError(f"spool_dir: not a writable directory: {self.spool_dir!r:.200}")
        if not valid_name(self.instance_id) or self.instance_id in RESERVED_INSTANCE_IDS:
            raise ConfigError(
                "instance_id: must be 1-128 characters of letters, digits, '.', '_' or '-' "
                f"and not {sorted(RESERVED_INSTANCE_IDS)}, got {self.instance_id[:40]!r}"
            )
        positive = (
            "instance_timeout",
            "statistics_ttl",
            "retention_period",
            "cleanup_interval",
            "socket_timeout",
            "connect_timeout",
            "missing_instance_grace",
            "max_aggregation_latency",
            "aggregation_interval",
            "response_time_sample_ttl",
            "batch_timeout",
            "shutdown_timeout",
            "otlp_interval",
            "data_loss_period",
        )
        for name in positive:
            _check_positive(name, getattr(self, name))
        for name in OPTIONAL_SECONDS:
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        # the heartbeat comes with every flush, or every heartbeat_interval when set
        beat, beat_name = self.flush_interval, "flush_interval"
        if self.heartbeat_interval is not None:
            beat, beat_name = self.heartbeat_interval, "heartbeat_interval"
        if beat is not None and self.instance_timeout < beat:
            raise ConfigError(
                f"instance_timeout: {self.instance_timeout:g}s is shorter than "
                f"{beat_name} {beat:g}s; live instances would look dead"
            )
        # an instance's keys must outlive the longest gap between its writes, and a reader
        # must take a silent instance out of the live gauges before its keys expire
        for limit, limit_name in (
            (self.flush_interval, "flush_interval"),
            (self.instance_timeout, "instance_timeout"),
        ):
            if limit is not None and self.statistics_ttl <= limit:
                raise ConfigError(
                    f"statistics_ttl: {self.statistics_ttl:g}s is not longer than "
                    f"{limit_name} {limit:g}s; an instance's statistics would expire between "
                    "its writes and be counted again"
                )
        if self.retention_period <= self.instance_timeout:
            raise ConfigError(
                f"retention_period: {self.retention_period:g}s is not longer than "
                f"instance_timeout {self.instance_timeout:g}s; cleanup would remove live instances"
            )
        if not valid_name(self.default_region):
            raise ConfigError(
                "default_region: must be 1-128 characters of letters, digits, '.', '_' or '-', "
                f"got {self.default_region[:40]!r}"
            )
        if self.aggregation_strategy not in ("sum", "lazy"):
            raise ConfigError(
                "aggregation_strategy: must be 'sum' or 'lazy' (or pass a strategy object to "
                f"setup()), got {self.aggregation_strategy[:40]!r}"
            )
        if self.aggregation_cache_ttl < 0 or not math.isfinite(self.aggregation_cache_ttl):
            raise ConfigError("aggregation_cache_ttl: must be a finite number >= 0")
        if not 0 <= self.max_drift_percent <= 100:  # points between hit ratios in percent
            raise ConfigError(
                f"max_drift_percent: must be 0 to 100 (percentage points), got "
                f"{self.max_drift_percent:g}"
            )
        for name in (
            "max_regions",
            "max_instance_series",
            "min_active_instances",
            "max_response_time_samples",
            "batch_size",
            "max_memory_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.redis_cluster_shards <= MAX_SHARDS:
            raise ConfigError(
                f"redis_cluster_shards: must be 0-{MAX_SHARDS}, got {self.redis_cluster_shards}"
            )
        if self.redis_cluster_shards and not self.is_redis_cluster:
            raise ConfigError(
                "redis_cluster_shards: needs a Redis Cluster (a redis+cluster:// URL or "
                "redis_cluster=true)"
            )
        if self.connect_retries < 0 or self.connect_retries > 10:
            raise ConfigError(f"connect_retries: must be 0-10, got {self.connect_retries}")
        if self.drift_min_requests < 0:
            raise ConfigError("drift_min_requests: must be >= 0")
        if not self.key_prefix or not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", self.key_prefix):
            raise ConfigError(
                f"key_prefix: must be 1-64 characters of letters, digits, '.', '_', '-', ':', "
                f"got {self.key_prefix[:40]!r}"
            )
        buckets = self.response_time_buckets
        if (
            not buckets
            or any(not math.isfinite(b) or b <= 0 for b in buckets)
            or any(a >= b for a, b in itertools.pairwise(buckets))
        ):
            raise ConfigError(
                "response_time_buckets: must be strictly increasing positive finite seconds"
            )


def _check_otlp_endpoint(url: str) -> None:
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"otlp_endpoint: not a valid URL: {shown!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"otlp_endpoint: an http:// or https:// URL with a host, such as "
            f"http://otel-collector:4318, got {shown!r}"
        )


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: must be a positive number of seconds, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RedisClusterAddress:
    """Where a Redis Cluster is: its startup nodes, credentials and whether TLS is used."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool


def redis_cluster_address(url: str) -> RedisClusterAddress:
    """Parse ``redis[s]+cluster://[user:password@]host[:port][,host[:port]...][/0]`` (or a
    ``redis[s]://`` URL used with ``redis_cluster=True``); raises :class:`ConfigError`."""
    shown = redact_url(url)
    parts, nodes = _split_nodes(url, 6379, "Redis Cluster")
    if parts.scheme not in ("redis", "rediss", *REDIS_CLUSTER_SCHEMES):
        raise ConfigError(
            f"redis_url: a Redis Cluster needs a redis:// or rediss:// URL: {shown!r}"
        )
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigError(f"redis_url: a Redis Cluster has database 0 only: {shown!r}")
    return RedisClusterAddress(nodes, *_credentials(parts), parts.scheme.startswith("rediss"))


def _split_nodes(
    url: str, default_port: int, kind: str
) -> tuple[SplitResult, tuple[tuple[str, int], ...]]:
    """``url`` split, and the ``(host, port)`` of each node of its
    ``[user:password@]host[:port][,host[:port]...]`` part; raises :class:`ConfigError`
    ("not a valid <kind> URL") for an empty host or a bad port."""
    try:
        parts = urlsplit(url)
        nodes = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            node = urlsplit("//" + item.strip())
            if not node.hostname:
                raise ValueError
            nodes.append((node.hostname, node.port or default_port))
    except ValueError:
        raise ConfigError(f"redis_url: not a valid {kind} URL: {redact_url(url)!r}") from None
    return parts, tuple(nodes)


def _credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    """The URL's user name and password, percent-decoded (None when absent)."""
    username, password = parts.username, parts.password
    return (
        unquote(username) if username else None,
        unquote(password) if password is not None else None,
    )


@dataclasses.dataclass(frozen=True)
class SentinelAddress:
    """Where Redis Sentinel finds the primary: the sentinels, the monitored service name,
    the database, the credentials and whether TLS is used (to sentinels and data nodes)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    #: also authenticate to the sentinels (``?sentinel_auth=true``)
    sentinel_auth: bool


def sentinel_address(url: str) -> SentinelAddress:
    """Parse ``redis[s]+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]``
    (port 26379 by default); raises :class:`ConfigError`."""
    shown = redact_url(url)
    parts, sentinels = _split_nodes(url, 26379, "sentinel")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(f"redis_url: not a valid sentinel URL: {shown!r}") from None
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ConfigError(f"redis_url: not a redis+sentinel:// URL: {shown!r}")
    path = parts.path.strip("/").split("/")
    if not path[0] or len(path) > 2 or not valid_name(unquote(path[0])):
        raise ConfigError(
            "redis_url: a sentinel URL names the monitored service, "
            f"redis+sentinel://host:26379/<service>[/<db>]: {shown!r}"
        )
    if len(path) == 2 and not (path[1].isdigit() and len(path[1]) <= 5):
        raise ConfigError(f"redis_url: the database must be a number: {shown!r}")
    if set(query) - {"sentinel_auth"}:  # names not shown: perhaps pieces of a password
        raise ConfigError(
            f"redis_url: a sentinel URL takes one query parameter, sentinel_auth "
            f"({ENCODE_HINT}): {shown!r}"
        )
    auth = query.get("sentinel_auth", ["false"])[-1].strip().lower()
    if auth not in _TRUE | _FALSE:
        raise ConfigError(f"redis_url: sentinel_auth must be true or false: {shown!r}")
    return SentinelAddress(
        sentinels,
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        *_credentials(parts),
        parts.scheme.startswith("rediss"),
        auth in _TRUE,
    )


def _check_url(url: str) -> None:
    shown = redact_url(url)
    if "://" not in url:
        raise ConfigError(
            "redis_url: not a URL, such as redis://[[user]:password@]host[:port]"
            "[/db] (the value is not shown)"
        )
    rest = url.partition("://")[2]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "#" in url or "@" in rest[len(authority) :]:
        # urlsplit would end the userinfo at the first / ? or #: a password with those
        # characters unencoded would be cut, and the rest taken for the host or path
        raise ConfigError(f"redis_url: not a valid URL: {shown!r} ({ENCODE_HINT})")
    if url.partition(":")[0] in SENTINEL_SCHEMES:
        sentinel_address(url)  # its own messages
        return
    try:
        parts = urlsplit(url)
        if parts.scheme in REDIS_CLUSTER_SCHEMES:
            redis_cluster_address(url)
        else:
            parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"redis_url: not a valid URL: {shown!r} ({ENCODE_HINT})") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(
            f"redis_url: scheme must be one of {', '.join(REDIS_SCHEMES)}, got {shown!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"redis_url: no host in {shown!r}")
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise ConfigError(f"redis_url: the path is the database number (/0, /1...), got {shown!r}")
    if parts.query:
        _check_query(parts, shown)


def _check_query(parts: SplitResult, shown: str) -> None:
    """Query parameters of a ``redis://``, ``rediss://`` or ``unix://`` URL: each must be an
    option of redis-py's connections (redis-py hands any other to the connection, whose
    error would name it: perhaps a piece of a password split at an unencoded ``&``)."""
    if parts.scheme in REDIS_CLUSTER_SCHEMES:
        raise ConfigError(f"redis_url: a Redis Cluster URL takes no query parameters: {shown!r}")
    try:
        names = [
            name for name, _ in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        ]
    except ValueError:
        raise ConfigError(
            f"redis_url: not a valid query string: {shown!r} ({ENCODE_HINT})"
        ) from None
    unknown = [i for i, name in enumerate(names, 1) if name not in _redis_url_options()]
    if unknown:
        raise ConfigError(
            f"redis_url: query parameter(s) number {', '.join(map(str, unknown))} are not "
            f"redis-py connection options (names not shown: they may be part of a password; "
            f"{ENCODE_HINT}): {shown!r}"
        )


@functools.cache
def _redis_url_options() -> frozenset[str]:
    """The query parameters redis-py's ``from_url`` takes: its parsed ones and the options
    of its connection classes."""
    import redis.connection as connection

    names = set(connection.URL_QUERY_ARGUMENT_PARSERS)
    for cls in (
        connection.Connection,
        connection.SSLConnection,
        connection.UnixDomainSocketConnection,
    ):
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is not None:
                names |= set(inspect.signature(init).parameters) - {"self", "args", "kwargs"}
    return frozenset(names)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(name: str, default: Any, value: Any, *, source: str) -> Any:
    """Turn ``value`` (a keyword or an environment string) into the type of ``default``."""
    text = value.strip() if isinstance(value, str) else None
    try:
        if name in OPTIONAL_SECONDS and text is not None and text.lower() in ("", "none", "off"):
            return None
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(text if text is not None else value)
        if isinstance(default, float) or name in OPTIONAL_SECONDS:
            if isinstance(value, bool):
                raise ValueError
            number = float(text if text is not None else value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if isinstance(default, tuple):
            items = text.split(",") if text is not None else list(value)
            return tuple(float(item) for item in items)
        if text is None:
            raise ValueError
        return text
    except (TypeError, ValueError):
        shown = redact_url(str(value)) if name in URL_OPTIONS else repr(value)[:60]
        kind = type(default).__name__ if default is not None else "str"
        raise ConfigError(f"{source}: expected {kind}, got {shown}") from None
