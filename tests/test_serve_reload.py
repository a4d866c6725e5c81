"""The web configuration of a running `serve` changes without a restart.

A scraper keeps scraping over mutual TLS with basic auth while the certificate is rotated
(files replaced, as cert-manager and Kubernetes do; then with ``SIGHUP``), the password
changes, and a broken file is written: no scrape fails, each new handshake gets the new
certificate, the process is the same. Also: warnings for key and configuration files that
other users may read, probes left open, TLS 1.0 and 1.1 refused.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest

from conduit_otel_cache.config import ConfigError
from conduit_otel_cache.serve.service import WEB_CONFIG_CHECK_INTERVAL
from conduit_otel_cache.serve.webconfig import load_web_config
from tests.conftest import MakeStats, wait_for
from tests.serve_process import ServeProcess


def make_server_cert(certs: Path, directory: Path, name: str) -> None:
    """``<name>.crt`` and ``<name>.key`` in ``directory``, signed by the test CA."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={name}")  # fmt: skip
    run("x509", "-req", "-in", f"{name}.csr", "-CA", str(certs / "ca.crt"), "-CAkey",
        str(certs / "ca.key"), "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
        "-extfile", str(certs / "server.ext"))  # fmt: skip
    os.chmod(directory / f"{name}.key", 0o600)


def install(directory: Path, name: str) -> None:
    """Make ``<name>`` the served certificate: new files renamed over the old ones."""
    for suffix in ("crt", "key"):
        shutil.copy(directory / f"{name}.{suffix}", directory / f"next.{suffix}")
        os.replace(directory / f"next.{suffix}", directory / f"server.{suffix}")


def write_config(directory: Path, password: str, *, tls: bool = True) -> None:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    text = f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    if tls:
        text = ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
                + text)  # fmt: skip
    path = directory / "web.yml"
    path.with_suffix(".new").write_text(text)
    os.chmod(path.with_suffix(".new"), 0o600)
    os.replace(path.with_suffix(".new"), path)


class Scraper:
    """Scrapes ``/metrics`` every 0.1 s in a thread: each scrape's status and the common
    name of the certificate it was served with."""

    def __init__(self, port: int, certs: Path) -> None:
        self.port = port
        self.password = "first-password"
        self.results: list[tuple[int | str, str]] = []
        self.context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        self.context.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def scrape(self) -> tuple[int | str, str]:
        auth = base64.b64encode(f"prometheus:{self.password}".encode()).decode()
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}/metrics",
                                         headers={"Authorization": f"Basic {auth}"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.context) as reply:
                sock = reply.fp.raw._sock  # the TLS socket the reply came over
                name = dict(x[0] for x in sock.getpeercert()["subject"])["commonName"]
                return reply.status, name
        except urllib.error.HTTPError as err:
            return err.code, ""
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}", ""

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.results.append(self.scrape())

    def served_by(self, name: str, since: int) -> bool:
        return any(cn == name for _, cn in self.results[since:])

    def stop(self) -> list[tuple[int | str, str]]:
        self._stop.set()
        self._thread.join(10)
        return self.results


@pytest.fixture
def rotating(certs: Path, tmp_path: Path) -> Iterator[Path]:
    """A directory with the CA, certificates ``server-a`` to ``server-c`` and ``server-a``
    installed as ``server.crt``/``server.key``, and a web.yml using them."""
    shutil.copy(certs / "ca.crt", tmp_path / "ca.crt")
    for name in ("server-a", "server-b", "server-c"):
        make_server_cert(certs, tmp_path, name)
    install(tmp_path, "server-a")
    write_config(tmp_path, "first-password")
    yield tmp_path


def test_certificate_rotated_under_a_running_scraper(
    certs: Path, rotating: Path, redis_url: str, make_stats: MakeStats
) -> None:
    stats = make_stats("api-1")
    stats.record_hit("Sessions", 0.001)
    assert stats.flush()
    config = str(rotating / "web.yml")
    with ServeProcess(redis_url, "--web-config-file", config, scheme="https") as serve:
        pid = serve.proc.pid
        scraper = Scraper(serve.port, certs)
        try:
            wait_for(lambda: scraper.served_by("server-a", 0), what="served by server-a")
            # files replaced: the next handshakes get the new certificate, no signal needed
            since, start = len(scraper.results), time.monotonic()
            install(rotating, "server-b")
            wait_for(lambda: scraper.served_by("server-b", since), timeout=15, what="server-b")
            on_change = time.monotonic() - start
            # SIGHUP: at once
            since, start = len(scraper.results), time.monotonic()
            install(rotating, "server-c")
            serve.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: scraper.served_by("server-c", since), timeout=15, what="server-c")
            on_sighup = time.monotonic() - start
            # a new password: the old one gets 401 from the reload on, the new one 200
            write_config(rotating, "second-password")
            serve.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: scraper.results[-1][0] == 401, timeout=15, what="old password 401")
            scraper.password = "second-password"
            since = len(scraper.results)
            wait_for(lambda: len(scraper.results) > since + 5, what="scrapes with the new one")
            # a broken file, then one that would turn TLS off: kept as it runs, logged
            (rotating / "web.yml").write_text("tls_server_config: [\n")
            serve.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "not reloaded, the running configuration is kept" in serve.log())
            write_config(rotating, "second-password", tls=False)
            serve.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "change only with a restart" in serve.log())
            since = len(scraper.results)
            wait_for(lambda: len(scraper.results) > since + 5, what="scrapes after")
        finally:
            results = scraper.stop()
        assert serve.proc.pid == pid and serve.proc.poll() is None
        log = serve.log()
    failed = [r for r in results if r[0] not in (200, 401)]
    unauthorized = [i for i, r in enumerate(results) if r[0] == 401]
    print(f"\n{len(results)} scrapes; new certificate served {on_change:.1f} s after the "
          f"files changed (checked every {WEB_CONFIG_CHECK_INTERVAL:g} s), {on_sighup:.2f} s "
          f"after SIGHUP; {len(unauthorized)} with the old password after the change")  # fmt: skip
    assert not failed, failed
    assert all(status == 200 for status, _ in results[unauthorized[-1] + 1 :])
    assert on_change < WEB_CONFIG_CHECK_INTERVAL + 3 and on_sighup < 2.0
    assert "Traceback" not in log and "first-password" not in log


def test_permissive_key_and_config_files_are_warned_about(
    certs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(certs / name, tmp_path / name)
    config = tmp_path / "web.yml"
    config.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    cases = [(0o600, 0o600, set()), (0o640, 0o640, set()), (0o644, 0o600, {"server.key"}),
             (0o600, 0o666, {"web.yml"}), (0o660, 0o604, {"server.key", "web.yml"})]  # fmt: skip
    for key_mode, config_mode, warned in cases:
        os.chmod(tmp_path / "server.key", key_mode)
        os.chmod(config, config_mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            load_web_config(str(config))
        lines = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
        found = {name for name in ("server.key", "web.yml") for line in lines
                 if f"{name} may be read" in line}  # fmt: skip
        assert found == warned, (oct(key_mode), oct(config_mode), lines)


def test_probes_can_be_left_open_while_the_rest_asks_for_credentials(
    tmp_path: Path, redis_url: str
) -> None:
    write_config(tmp_path, "probe-password", tls=False)
    config = str(tmp_path / "web.yml")
    with ServeProcess(redis_url, "--web-config-file", config, "--probes-without-auth") as serve:
        wait_for(lambda: serve.get("/-/ready")[0] == 200, what="ready")
        assert serve.get("/-/healthy")[:2] == (200, b"Healthy\n")
        assert serve.get("/-/healthy/")[0] == 200
        for path in ("/metrics", "/health", "/", "//-/healthy", "/-/healthy/../../metrics",
                     "/api/cache/stats/distributed", "/-/healthyx"):  # fmt: skip
            assert serve.get(path)[0] == 401, path
    with ServeProcess(redis_url, "--web-config-file", config) as serve:  # the default
        assert serve.get("/-/healthy")[0] == 401


def test_probes_without_auth_needs_basic_auth(capsys: pytest.CaptureFixture[str]) -> None:
    from conduit_otel_cache.cli import main

    assert main(["serve", "--redis-url", "redis://127.0.0.1:1/0", "--probes-without-auth"]) == 64
    assert "probes_without_auth: needs basic_auth_users" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["TLS10", "TLS11"])
def test_tls_10_and_11_are_refused(certs: Path, tmp_path: Path, version: str) -> None:
    config = tmp_path / "web.yml"
    tls = f"cert_file: {certs / 'server.crt'}, key_file: {certs / 'server.key'}"
    config.write_text(f"tls_server_config: {{{tls}, min_version: {version}}}\n")
    with pytest.raises(ConfigError, match=f"min_version: {version} is not supported"):
        load_web_config(str(config))
