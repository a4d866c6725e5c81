"""Options: keywords, CONDUIT_CACHE_STATS_* variables, validation naming the option."""

from __future__ import annotations

import pytest

from conduit_otel_cache import ConfigError, Settings, setup
from conduit_otel_cache.identity import default_instance_id


def test_environment_variables_are_read() -> None:
    env = {"CONDUIT_CACHE_STATS_REDIS_URL": "redis://h:1/2",
           "CONDUIT_CACHE_STATS_FLUSH_INTERVAL": "2.5",
           "CONDUIT_CACHE_STATS_MAX_REGIONS": "7",
           "CONDUIT_CACHE_STATS_SET_GLOBAL": "false",
           "CONDUIT_CACHE_STATS_RESPONSE_TIME_BUCKETS": "0.1,1,10",
           "INSTANCE_ID": "pod-7"}  # fmt: skip
    s = Settings.load(env)
    assert (s.redis_url, s.flush_interval, s.max_regions, s.set_global) == (
        "redis://h:1/2", 2.5, 7, False)  # fmt: skip
    assert s.response_time_buckets == (0.1, 1.0, 10.0)
    assert s.instance_id == "pod-7"
    assert Settings.load(env, flush_interval=None).flush_interval is None
    assert Settings.load(env, max_regions=3).max_regions == 3  # keyword wins


def test_instance_id_fallbacks() -> None:
    pid = __import__("os").getpid()
    # every worker process of a pod is its own instance: the pod name plus the pid
    assert default_instance_id({"HOSTNAME": "web-5d8f"}) == f"web-5d8f-{pid}"
    assert default_instance_id({"INSTANCE_ID": "a", "HOSTNAME": "b"}) == "a"
    generated = default_instance_id({})
    assert generated.endswith(f"-{pid}") and len(generated) > len(f"-{pid}")


@pytest.mark.parametrize(
    ("options", "env", "named"),
    [
        ({"flush_interval": -1}, {}, "flush_interval"),
        ({"instance_timeout": 5, "flush_interval": 10}, {}, "instance_timeout"),
        ({"redis_url": "http://x"}, {}, "redis_url"),
        ({"redis_url": "redis://h:99999999"}, {}, "redis_url"),
        ({"instance_id": "a:b"}, {}, "instance_id"),
        ({"instance_id": "aggregated"}, {}, "instance_id"),
        ({"instance_id": "x" * 10_000}, {}, "instance_id"),
        ({"max_regions": 0}, {}, "max_regions"),
        ({"key_prefix": "bad prefix"}, {}, "key_prefix"),
        ({"response_time_buckets": (1.0, 0.5)}, {}, "response_time_buckets"),
        ({}, {"CONDUIT_CACHE_STATS_FLUSH_INTERVAL": "soon"}, "CONDUIT_CACHE_STATS_FLUSH_INTERVAL"),
        ({}, {"CONDUIT_CACHE_STATS_SET_GLOBAL": "maybe"}, "CONDUIT_CACHE_STATS_SET_GLOBAL"),
        ({"no_such_option": 1}, {}, "no_such_option"),
    ],
)
def test_invalid_values_fail_naming_the_option(options: dict, env: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.load(env, **options)


def test_setup_fails_at_start_with_the_option_named() -> None:
    with pytest.raises(ConfigError, match="flush_interval"):
        setup(flush_interval=0, set_global=False)


def test_password_never_in_repr_or_errors() -> None:
    s = Settings.load({}, redis_url="redis://user:s3cret-pw@localhost:6379/1")
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in s.safe_redis_url
    with pytest.raises(ConfigError) as err:
        Settings.load({}, redis_url="http://user:s3cret-pw@localhost:6379/1")
    assert "s3cret-pw" not in str(err.value)


def test_default_region_and_aggregation_cache_options(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="default_region"):
        Settings.load({}, default_region="no spaces")
    stats = setup(redis_url=redis_url, instance_id="a", set_global=False, flush_interval=None,
                  default_region="Embeddings", aggregation_cache_ttl=60,
                  enable_aggregation_cache=False)  # fmt: skip
    stats.record_hit(None)
    stats.flush()
    assert stats.local_statistics("Embeddings").hit_count == 1
    before = stats.aggregator.aggregations
    for _ in range(3):
        stats.cluster_statistics("Embeddings")
    assert stats.aggregator.aggregations == before + 3  # no cache: every read aggregates
    stats.shutdown()
    cached = setup(redis_url=redis_url, instance_id="b", set_global=False, flush_interval=None,
                   aggregation_cache_ttl=60)  # fmt: skip
    for _ in range(3):
        cached.cluster_statistics("Embeddings")
    assert cached.aggregator.aggregations == 1
    cached.shutdown()


@pytest.mark.parametrize(("options", "env"), [
    ({"cluster": True}, {}),
    ({}, {"CONDUIT_CACHE_STATS_CLUSTER": "true"}),  # would otherwise be ignored silently
])  # fmt: skip
def test_a_renamed_option_fails_naming_its_new_name(options: dict, env: dict) -> None:
    with pytest.raises(ConfigError, match=r"cluster .*renamed to redis_cluster .*REDIS_CLUSTER"):
        Settings.load(env, redis_url="redis://h:1", **options)


def test_a_mistyped_variable_or_keyword_is_refused_naming_the_closest_option() -> None:
    """A typo in a variable is not ignored in silence (nor in a keyword)."""
    with pytest.raises(ConfigError) as env_error:
        Settings.load(environ={"CONDUIT_CACHE_STATS_FLUSH_INTERVALL": "5"})
    assert str(env_error.value) == (
        "unknown variable(s): CONDUIT_CACHE_STATS_FLUSH_INTERVALL "
        "(did you mean CONDUIT_CACHE_STATS_FLUSH_INTERVAL?)"
    )
    with pytest.raises(ConfigError, match=r"flush_intervall \(did you mean flush_interval\?\)"):
        Settings.load(environ={}, flush_intervall=5)


@pytest.mark.parametrize("value", ["150", "-1", "100.5"])
def test_max_drift_percent_is_percentage_points(value: str) -> None:
    """Drift is the distance between two hit ratios in percent: more than 100 never fires."""
    with pytest.raises(ConfigError, match="max_drift_percent: must be 0 to 100"):
        Settings.load(environ={"CONDUIT_CACHE_STATS_MAX_DRIFT_PERCENT": value})


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/notadb", "rediss://h/1x"])
def test_a_database_that_is_not_a_number_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="redis_url: the path is the database number"):
        Settings.load(environ={}, redis_url=url)
    assert Settings.load(environ={}, redis_url="redis://127.0.0.1:6379/2").redis_url
