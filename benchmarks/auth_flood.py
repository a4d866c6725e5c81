"""A known scraper's latency during a flood of wrong passwords on `serve` with basic auth.

``python benchmarks/auth_flood.py [--cpus 0] [--tls]``: `serve` (pinned with ``taskset -c``
to ``--cpus`` when given; with ``--tls``, mutual TLS too) gets 24 clients sending wrong
passwords as fast as it answers them, while a scraper whose password was checked once asks
for ``/metrics`` every 0.25 s, 24 times: on a new connection each time (a full TLS handshake
with ``--tls``), and on one kept-alive connection as Prometheus does. Prints the scraper's
median and slowest latency. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt

from conduit_otel_cache.embedded import RedisServer, free_port

FLOODERS = 24
SCRAPES = 24


def make_certs(directory: Path) -> None:
    """A CA, and a server and a client certificate it signed, by openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=bench-ca")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
            "-extfile", "san.cnf")  # fmt: skip
        os.chmod(directory / f"{name}.key", 0o600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpus", help="taskset -c list for serve (default: every CPU)")
    parser.add_argument("--tls", action="store_true", help="mutual TLS as well")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="auth-flood-"))
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(10)).decode()
    text = f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    if args.tls:
        make_certs(work)
        text = ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
                + text)  # fmt: skip
    (work / "web.yml").write_text(text)
    os.chmod(work / "web.yml", 0o600)
    scheme = "https" if args.tls else "http"

    def context() -> ssl.SSLContext | None:
        if not args.tls:
            return None
        made = ssl.create_default_context(cafile=str(work / "ca.crt"))
        made.load_cert_chain(str(work / "client.crt"), str(work / "client.key"))
        return made

    with RedisServer() as redis:
        port = free_port()
        pin = ["taskset", "-c", args.cpus] if args.cpus else []
        serve = subprocess.Popen(
            [*pin, sys.executable, "-m", "conduit_otel_cache.cli", "serve", "--redis-url",
             redis.url, "--port", str(port), "--web-config-file", str(work / "web.yml")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert serve.stdout is not None and serve.stdout.readline().startswith("serving ")

        def get(password: str) -> tuple[int, float]:
            token = base64.b64encode(f"prometheus:{password}".encode()).decode()
            url = f"{scheme}://127.0.0.1:{port}/metrics"
            request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=30, context=context()) as reply:
                    reply.read()
                    code = reply.status
            except urllib.error.HTTPError as err:
                code = err.code
            return code, time.perf_counter() - start

        token = base64.b64encode(b"prometheus:right").decode()
        kept: http.client.HTTPConnection = (
            http.client.HTTPSConnection("127.0.0.1", port, context=context(), timeout=30)
            if args.tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        )

        def get_kept_alive() -> tuple[int, float]:
            start = time.perf_counter()
            kept.request("GET", "/metrics", headers={"Authorization": f"Basic {token}"})
            reply = kept.getresponse()
            reply.read()
            return reply.status, time.perf_counter() - start

        try:
            assert get("right")[0] == 200  # checked once, then remembered
            get_kept_alive()
            stop = threading.Event()

            def flood() -> None:
                n = 0
                while not stop.is_set():
                    get(f"wrong-{n}")
                    n += 1

            flooders = [threading.Thread(target=flood, daemon=True) for _ in range(FLOODERS)]
            for thread in flooders:
                thread.start()
            time.sleep(1.0)
            known: dict[str, list[tuple[int, float]]] = {"new connections": [], "kept alive": []}
            for _ in range(SCRAPES):
                known["new connections"].append(get("right"))
                known["kept alive"].append(get_kept_alive())
                time.sleep(0.25)
            stop.set()
            for thread in flooders:
                thread.join(30)
        finally:
            serve.terminate()
            serve.wait(15)
            shutil.rmtree(work, ignore_errors=True)
    cpus = args.cpus or f"all {os.cpu_count()}"
    print(f"serve on CPUs {cpus}, {'mutual TLS + ' if args.tls else ''}basic auth, "
          f"{FLOODERS} clients sending wrong passwords; known scraper:")  # fmt: skip
    for how, results in known.items():
        seconds = sorted(s for _, s in results)
        print(f"  {how}: statuses {sorted({c for c, _ in results})}, median "
              f"{statistics.median(seconds) * 1000:.0f} ms, slowest {seconds[-1] * 1000:.0f} ms, "
              f"{sum(s > 1 for s in seconds)} of {len(seconds)} over 1 s")  # fmt: skip


if __name__ == "__main__":
    main()
