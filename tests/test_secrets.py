"""The Redis password never leaves the process, whatever the URL's form and the output.

A property test: random passwords from the whole printable range, placed in every form of
Redis URL (userinfo percent-encoded or not, query parameters naming a secret, Sentinel and
Redis Cluster node lists, strings that are not URLs), through every output: the masked URL,
``ConfigError`` (of ``Settings.load`` and ``setup()``), ``repr(settings)``, the CLI's error
lines, the log, the landing page, ``/health`` and the API of a real exporter, and (fewer
examples, one process each) the start-up line, log, pages and exit error of a real ``serve``
process. A real ``redis-server`` knows the password as an ACL user's, so the well-formed URLs
do log in (and the others fail: the failed-connection log is an output too).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conduit_otel_cache import cli, setup
from conduit_otel_cache.config import ConfigError, Settings, redact_url
from conduit_otel_cache.embedded import RedisServer, free_port
from conduit_otel_cache.serve.service import ExporterService

USER = "app"
#: Every printable character (letters, marks, digits, punctuation, symbols, the space).
PRINTABLE = st.characters(codec="utf-8", categories=("L", "M", "N", "P", "S")) | st.just(" ")
#: Reserved characters that break a URL when a password holding them is not encoded.
RESERVED = "/?#@:%&=+ "


@st.composite
def passwords(draw: st.DrawFn) -> str:
    """Printable characters, every other one from a random hex fingerprint: any piece of 8
    characters of the password in an output is a leak, never a word the output has anyway
    (hypothesis also draws strings from the source code)."""
    chars = draw(st.text(PRINTABLE, min_size=6, max_size=20))
    if draw(st.booleans()):  # at least one reserved character
        at = draw(st.integers(0, len(chars)))
        chars = chars[:at] + draw(st.sampled_from(RESERVED)) + chars[at:]
    return "".join(a + b for a, b in zip(draw(st.uuids()).hex, chars, strict=False))


def url_forms(password: str, port: int) -> dict[str, str]:
    """The password in every form of Redis URL, for a Redis at ``port``."""
    q = quote(password, safe="")
    node = f"127.0.0.1:{port}"
    other = f"127.0.0.1:{free_port()}"
    others = f"db=0&username={USER}&password={q}&socket_timeout=2"  # the user: a real log-in
    return {
        "userinfo": f"redis://{USER}:{q}@{node}/0",
        "userinfo, no user": f"redis://:{q}@{node}/0",
        "userinfo, TLS": f"rediss://{USER}:{q}@{node}/0",
        "password parameter": f"redis://{node}/0?username={USER}&password={q}",
        "password parameter among others": f"redis://{node}/0?{others}",
        "unix socket": f"unix://{USER}:{q}@/nonexistent/redis.sock?db=0",
        "unix socket, password parameter": f"unix:///nonexistent/redis.sock?password={q}",
        "sentinel": f"redis+sentinel://{USER}:{q}@{node},{other}/svc/0",
        "sentinel, sentinel_auth": f"redis+sentinel://{USER}:{q}@{node}/svc?sentinel_auth=true",
        "cluster": f"redis+cluster://{USER}:{q}@{node},{other}",
        # pasted as is, unencoded
        "userinfo, raw": f"redis://{USER}:{password}@{node}/0",
        "userinfo, no user, raw": f"redis://:{password}@{node}/0",
        "password parameter, raw": f"redis://{node}/0?password={password}",
        "password parameter among others, raw": f"redis://{node}/0?password={password}&db=0",
        "sentinel, raw": f"redis+sentinel://:{password}@{node},{other}/svc",
        "cluster, raw": f"redis+cluster://:{password}@{node},{other}",
        "password as user name": f"redis://{q}@{node}/0",
        # other parameters naming a secret
        "token parameter": f"redis://{node}/0?auth_token={q}",
        "secret parameter": f"redis://{node}/0?db=0&Client_Secret={password}",
        "encoded parameter name": f"redis://{node}/0?pass%77ord={q}",
        # not URLs
        "no scheme": f"{USER}:{password}@{node}",
        "one slash": f"redis:/{USER}:{password}@{node}/0",
        "the password alone": password,
    }


def shown_forms(secret: str) -> set[str]:
    """How ``secret`` would look in an output: as is, percent-encoded, escaped for HTML,
    JSON and ``repr``."""
    return {secret, quote(secret, safe=""), quote_plus(secret), html.escape(secret),
            json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
            repr(secret)[1:-1]}  # fmt: skip


def leaks(secret: str, text: str) -> list[str]:
    """The forms of ``secret``, and the pieces of 8 characters of them (a password cut at a
    reserved character), that appear in ``text``."""
    return [form[i : i + 8] for form in shown_forms(secret) for i in range(len(form) - 7)
            if form[i : i + 8] in text]  # fmt: skip


def assert_secret(secret: str, outputs: dict[str, str]) -> None:
    for where, text in outputs.items():
        assert not leaks(secret, text), (where, leaks(secret, text), text[:2000])


#: Short timeouts: a TLS handshake with a plain Redis waits for them.
TIMEOUTS = {"connect_timeout": "0.3", "socket_timeout": "0.3", "connect_retries": "0"}


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[RedisServer]:
    """A redis-server of this module's own; each example gives the ACL user its password.
    The CLI commands run here get short timeouts."""
    with RedisServer() as server, pytest.MonkeyPatch.context() as patch:
        for name, value in TIMEOUTS.items():
            patch.setenv(f"CONDUIT_CACHE_STATS_{name.upper()}", value)
        yield server


def set_password(server: RedisServer, password: str) -> None:
    with redis.Redis(port=server.port) as client:
        client.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{password}", "~*",
                               "+@all")  # fmt: skip


@contextlib.contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """Every log record of every logger, formatted with its traceback."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())
    except urllib.error.HTTPError as err:
        return str(err.read().decode())


def run_cli(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return f"exit {code}\n{out.getvalue()}{err.getvalue()}"


def outputs_in_process(url: str) -> dict[str, str]:
    """Everything this process shows of ``url``: masked, errors, CLI, exporter pages, log."""
    outputs = {"redact_url": redact_url(url)}
    with captured_log() as log:
        try:
            settings_ = Settings.load({}, redis_url=url, aggregation_cache_ttl=0, **TIMEOUTS)
        except ConfigError as exc:
            settings_ = None
            outputs["ConfigError"] = str(exc)
            with pytest.raises(ConfigError) as refused:  # the library's set-up refuses it too
                setup(redis_url=url, set_global=False, flush_interval=None)
            outputs["setup() ConfigError"] = str(refused.value)
        else:
            outputs["repr"] = repr(settings_) + settings_.safe_redis_url
        for command in ("stats", "health", "cleanup"):
            outputs[f"cli {command}"] = run_cli(command, "--redis-url", url)
        if settings_ is not None:
            try:
                service = ExporterService(settings_, port=0).start()
            except Exception as exc:  # e.g. a Redis Cluster URL for a Redis that is not one
                outputs["ExporterService"] = f"{type(exc).__name__}: {exc}"
            else:
                try:
                    base = f"http://127.0.0.1:{service.port}"
                    for path in ("/", "/health", "/-/ready", "/api/cache/stats/distributed"):
                        outputs[path] = get(base + path)
                finally:
                    service.stop()
    outputs["log"] = log.getvalue()
    return outputs


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=passwords())
def test_no_output_shows_the_password(locked_redis: RedisServer, password: str) -> None:
    set_password(locked_redis, password)
    for form, url in url_forms(password, locked_redis.port).items():
        outputs = outputs_in_process(url)
        assert_secret(password, {f"{form}: {k}": v for k, v in outputs.items()})


def test_well_formed_urls_log_in_and_pasted_ones_are_refused(locked_redis: RedisServer) -> None:
    """The forms above really carry the password: the encoded ones log in, a raw password
    with reserved characters is refused with the hint, masked."""
    password = "Wr/ong+S3cret=#?@ x%60"  # %60: decoded once, not twice (redis-py 6.0)
    set_password(locked_redis, password)
    forms = url_forms(password, locked_redis.port)
    for form in ("userinfo", "password parameter", "password parameter among others"):
        text = run_cli("stats", "--redis-url", forms[form], "--json")
        assert text.startswith("exit 0"), (form, text)
    for form in ("userinfo, no user, raw", "password parameter, raw", "sentinel, raw"):
        with pytest.raises(ConfigError, match="percent-encode the password") as err:
            Settings.load({}, redis_url=forms[form])
        assert not leaks(password, str(err.value))
    with pytest.raises(ConfigError, match="not a URL"):
        Settings.load({}, redis_url=password)


def test_masked_forms() -> None:
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:Wr/ong+S3=@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("redis://h:1/0?db=1&password=x&y=2") == "redis://h:1/0?db=1&password=***"
    assert redact_url("redis://S3cret@h/0") == "redis://***@h/0"
    assert redact_url("redis+cluster://u:p@h1:1,h2:2") == "redis+cluster://u:***@h1:1,h2:2"
    assert redact_url("redis://h:1/0?client_name=x") == "redis://h:1/0?client_name=x"
    assert redact_url("S3cret") == "***"


SERVE_FORMS = ("userinfo", "password parameter", "sentinel", "cluster", "token parameter",
               "userinfo, no user, raw", "password parameter among others, raw",
               "the password alone")  # fmt: skip


@pytest.mark.parametrize("form", SERVE_FORMS)
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(password=passwords())
def test_serve_process_never_shows_the_password(
    locked_redis: RedisServer, form: str, password: str
) -> None:
    """A real ``serve`` (debug log on): its start-up line, log, pages, or its exit error."""
    set_password(locked_redis, password)
    url = url_forms(password, locked_redis.port)[form]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conduit_otel_cache.cli", "-v", "serve", "--port", str(port),
         "--redis-url", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    outputs = {"start-up line": proc.stdout.readline()}
    try:
        if outputs["start-up line"].startswith("serving "):
            base = f"http://127.0.0.1:{port}"
            for path in ("/", "/health", "/-/ready", "/metrics"):
                outputs[path] = get(base + path)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    outputs["stdout"], outputs["stderr"] = out, err
    served = outputs["start-up line"].startswith("serving ")
    assert served or "\nerror: " in "\n" + err.splitlines()[-1] + "\n", outputs  # or refused
    if form in ("userinfo", "password parameter"):  # these log in: the pages show the data
        assert served and '"RedisConnected": true' in outputs["/health"], outputs
    assert_secret(password, outputs)
