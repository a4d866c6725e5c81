"""`serve --web-config-file`: the exporter-toolkit web configuration (TLS, client
certificates, basic auth), validated at start-up, and scraped by a real Prometheus."""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from conduit_otel_cache.cli import main
from conduit_otel_cache.config import ConfigError, Settings
from conduit_otel_cache.embedded import free_port
from conduit_otel_cache.serve.service import ExporterService
from conduit_otel_cache.serve.webconfig import BasicAuth, WebConfig, load_web_config
from tests.conftest import MakeStats
from tests.serve_process import ServeProcess
from tests.test_prometheus_tools import query, tool, wait_for

PASSWORD = "s3cret-scrape"
#: a fixed salt: the hash names a test case, which every pytest-xdist worker must collect alike
HASH = bcrypt.hashpw(PASSWORD.encode(), b"$2b$04$" + b"conduitotelcachetestsu").decode()
HTPASSWD_HASH = "$2y$" + HASH[4:]  # htpasswd -B writes $2y$, as the Go exporters' docs show


def write(directory: Path, text: str) -> str:
    path = directory / "web.yml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("tls_server_config: [\n", "web_config_file: "),  # not YAML
        ("- a list\n", "web_config_file: must be a mapping"),
        ("tls_server_confg: {}\n", "unknown or unsupported key(s): tls_server_confg"),
        ("tls_server_config: {key_file: server.key}\n", "tls_server_config.cert_file: required"),
        ("tls_server_config: {cert_file: nope.crt, key_file: server.key}\n",
         "tls_server_config.cert_file: no such file"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, cipher_suites: [x]}\n",
         "unknown or unsupported key(s): cipher_suites"),
        ("tls_server_config: {cert_file: server.crt, key_file: ca.key}\n",
         "tls_server_config.cert_file: cannot load the certificate and key: the private key "
         "does not belong to the certificate"),
        ("tls_server_config: {cert_file: server.key, key_file: server.key}\n",
         "server.key' holds no PEM certificate"),
        ("tls_server_config: {cert_file: server.crt, key_file: ca.crt}\n",
         "ca.crt' holds no PEM private key"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, "
         "client_auth_type: Always}\n", "tls_server_config.client_auth_type: must be one of"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, "
         "client_auth_type: RequireAnyClientCert}\n", "RequireAnyClientCert asks for"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, "
         "client_ca_file: ca.crt}\n", "tls_server_config.client_ca_file: must be given with"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, "
         "client_auth_type: RequireAndVerifyClientCert}\n", "client_ca_file: must be given"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, min_version: TLS9}\n",
         "tls_server_config.min_version: must be one of"),
        ("tls_server_config: {cert_file: server.crt, key_file: server.key, min_version: TLS13, "
         "max_version: TLS12}\n", "tls_server_config.max_version: lower than min_version"),
        ("basic_auth_users: [alice]\n", "basic_auth_users: must be a mapping"),
        ("basic_auth_users: {alice: not-a-hash-but-secret}\n",
         "basic_auth_users.alice: not a valid bcrypt hash"),
        ("basic_auth_users: {'a:b': '" + HASH + "'}\n", "without ':'"),
    ],
)  # fmt: skip
def test_invalid_web_config_names_the_setting(
    certs: Path, text: str, setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(certs, text)
    with pytest.raises(ConfigError) as err:
        load_web_config(path)
    assert setting in str(err.value)
    assert "not-a-hash-but-secret" not in str(err.value)  # a hash is never echoed
    # serve refuses to start with the same message, exit code 64 (a configuration error)
    assert main(["serve", "--redis-url", "redis://127.0.0.1:1/0", "--web-config-file", path]) == 64
    assert setting in capsys.readouterr().err


def test_missing_file_and_combination_with_certfile(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="web_config_file: cannot read"):
        load_web_config(str(certs / "absent.yml"))
    path = write(certs, "basic_auth_users: {alice: '" + HASH + "'}\n")
    argv = ["serve", "--redis-url", "redis://127.0.0.1:1/0", "--web-config-file", path,
            "--certfile", str(certs / "server.crt")]  # fmt: skip
    assert main(argv) == 64
    assert "not both" in capsys.readouterr().err
    assert load_web_config(write(certs, "")).ssl_context is None  # empty file: plain HTTP


def basic(user: str, password: str | bytes) -> str:
    raw = password if isinstance(password, bytes) else password.encode()
    return "Basic " + base64.b64encode(user.encode() + b":" + raw).decode()


def test_basic_auth_answers_401_without_detail_and_caches_successes(redis_url: str) -> None:
    web = load_web_config_text(f"basic_auth_users: {{prometheus: '{HTPASSWD_HASH}'}}\n")
    service = ExporterService(Settings.load(redis_url=redis_url), port=0, web_config=web).start()
    base = f"http://127.0.0.1:{service.port}"

    def call(path: str, authorization: str | None, method: str = "GET") -> tuple[int, bytes, Any]:
        request = urllib.request.Request(base + path, method=method)
        if authorization is not None:
            request.add_header("Authorization", authorization)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers

    try:
        for authorization in (None, basic("prometheus", "wrong"), basic("nobody", PASSWORD),
                              basic("prometheus", PASSWORD + "x"), "Basic !!!not-base64",
                              "Bearer " + PASSWORD, basic("prometheus", b"x" * 100),
                              basic("prometheus", b"\xff\xfe"), "Basic " + base64.b64encode(
                                  PASSWORD.encode()).decode()):  # fmt: skip
            status, body, headers = call("/metrics", authorization)
            assert (status, body) == (401, b"Unauthorized\n"), authorization
            assert headers["WWW-Authenticate"] == "Basic"
        assert call("/-/healthy", None)[0] == 401  # every route, the probes included
        assert call("/metrics", None, "HEAD")[:2] == (401, b"")
        auth = service.server.wsgi.app
        assert isinstance(auth, BasicAuth) and not auth._verified  # failures are not cached
        status, body, _ = call("/metrics", basic("prometheus", PASSWORD))
        assert status == 200 and b"conduit_cache_redis_up" in body
        assert len(auth._verified) == 1  # the success is remembered: bcrypt runs once
        assert call("/-/healthy", basic("prometheus", PASSWORD))[:2] == (200, b"Healthy\n")
        assert len(auth._verified) == 1
    finally:
        service.stop()


def load_web_config_text(text: str) -> WebConfig:
    with tempfile.TemporaryDirectory() as d:
        return load_web_config(write(Path(d), text))


def test_client_certificates_are_required_when_configured(certs: Path, redis_url: str) -> None:
    path = write(certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                        "  client_auth_type: RequireAndVerifyClientCert\n"
                        "  client_ca_file: ca.crt\n")  # fmt: skip
    with ServeProcess(redis_url, "--web-config-file", path, scheme="https") as serve:
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        with pytest.raises(OSError):  # no client certificate: the handshake fails
            serve.get("/-/healthy", context=context)
        context.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        assert serve.get("/-/healthy", context=context)[:2] == (200, b"Healthy\n")
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(f"http://127.0.0.1:{serve.port}/-/healthy", timeout=5).read()
        assert "Traceback" not in serve.log()


@pytest.fixture
def tls_serve(certs: Path, redis_url: str, make_stats: MakeStats) -> Iterator[ServeProcess]:
    stats = make_stats("api-1")
    for _ in range(3):
        stats.record_hit("Sessions", 0.001)
    assert stats.flush()
    path = write(certs, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                        "  client_auth_type: RequireAndVerifyClientCert\n"
                        "  client_ca_file: ca.crt\n"
                        f"basic_auth_users:\n  prometheus: '{HTPASSWD_HASH}'\n")  # fmt: skip
    with ServeProcess(redis_url, "--web-config-file", path, scheme="https") as serve:
        yield serve


def test_real_prometheus_scrapes_over_tls_with_basic_auth(
    certs: Path, tls_serve: ServeProcess, tmp_path: Path
) -> None:
    tls = {"ca_file": str(certs / "ca.crt"), "cert_file": str(certs / "client.crt"),
           "key_file": str(certs / "client.key")}  # fmt: skip
    jobs = []
    for job, password in (("good", PASSWORD), ("wrong", "not-the-password")):
        jobs.append({"job_name": job, "scheme": "https", "tls_config": tls,
                     "basic_auth": {"username": "prometheus", "password": password},
                     "static_configs": [{"targets": [f"127.0.0.1:{tls_serve.port}"]}]})  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for("Prometheus /-/ready", ready, timeout=30)
        wait_for("good target up", lambda: query(base, 'up{job="good"} == 1'), timeout=40)
        hits = wait_for("hits scraped",
                        lambda: query(base, 'conduit_cache_hits_total{job="good"}'))  # fmt: skip
        assert float(hits[0]["value"][1]) == 3
        wait_for("wrong target down", lambda: query(base, 'up{job="wrong"} == 0'), timeout=20)
        with urllib.request.urlopen(base + "/api/v1/targets", timeout=10) as resp:
            targets = json.loads(resp.read())["data"]["activeTargets"]
        errors = {t["labels"]["job"]: t["lastError"] for t in targets}
        assert errors["good"] == ""
        assert "401" in errors["wrong"], errors
        assert not query(base, 'conduit_cache_hits_total{job="wrong"}')
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert "Traceback" not in tls_serve.log()
    assert PASSWORD not in tls_serve.log() and HASH[7:] not in tls_serve.log()


def test_the_documented_web_config_loads(certs: Path, tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "serve.md").read_text()
    example = docs.split("```yaml\n", 1)[1].split("```", 1)[0]
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(certs / name, tmp_path / name)
    web = load_web_config(write(tmp_path, example))
    assert web.ssl_context is not None and web.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert bcrypt.checkpw(b"example-password", web.users["prometheus"])


def test_a_flood_of_wrong_passwords_leaves_a_known_scraper_fast(redis_url: str) -> None:
    costly = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()  # ~0.2-0.5 s a check
    web = load_web_config_text(f"basic_auth_users: {{prometheus: '{costly}'}}\n")
    service = ExporterService(Settings.load(redis_url=redis_url), port=0, web_config=web).start()
    url = f"http://127.0.0.1:{service.port}/-/healthy"

    def status(password: str) -> tuple[int, float]:
        authorization = {"Authorization": basic("prometheus", password)}
        request = urllib.request.Request(url, headers=authorization)
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                code = resp.status
        except urllib.error.HTTPError as err:
            code = err.code
        return code, time.perf_counter() - start

    try:
        assert status(PASSWORD)[0] == 200  # checked once, then remembered
        with ThreadPoolExecutor(24) as pool:
            flood = [pool.submit(status, f"wrong-{n}") for n in range(24)]
            known = [status(PASSWORD) for _ in range(5)]
            codes = [f.result()[0] for f in flood]
    finally:
        service.stop()
    assert all(code == 200 and seconds < 1.0 for code, seconds in known), known
    assert set(codes) <= {401, 503} and 503 in codes, codes  # at most BCRYPT_SLOTS checks at once
