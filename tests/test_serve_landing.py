"""The landing page of `serve` in a real headless Chromium: it renders (a non-blank
screenshot) and every link on it resolves."""

from __future__ import annotations

import shutil
import struct
import subprocess
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import pytest

from conduit_otel_cache import __version__
from conduit_otel_cache.config import Settings
from conduit_otel_cache.serve.service import ExporterService
from tests.conftest import MakeStats

WIDTH, HEIGHT = 900, 500


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium not found on PATH: apt-get install chromium")
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the raw (filtered) scanlines of a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return size[0], size[1], zlib.decompress(idat)


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs += [v for k, v in attrs if tag == "a" and k == "href" and v]


def test_landing_page_renders_in_chromium_and_its_links_resolve(
    make_stats: MakeStats, redis_url: str, tmp_path: Path
) -> None:
    stats = make_stats("api-1")
    stats.record_hit("Sessions", 0.001)
    assert stats.flush()
    service = ExporterService(Settings.load(redis_url=redis_url), port=0).start()
    try:
        service.health()  # forces the first read of Redis instead of waiting for it
        assert service.ready()
        base = f"http://127.0.0.1:{service.port}/"
        shot = tmp_path / "landing.png"
        chromium(tmp_path / "profile", f"--window-size={WIDTH},{HEIGHT}",
                 f"--screenshot={shot}", base)  # fmt: skip
        dom = chromium(tmp_path / "profile", "--dump-dom", base).stdout
        print(f"\nscreenshot: {shot}")
        width, height, pixels = png_pixels(shot)
        assert (width, height) == (WIDTH, HEIGHT)
        assert len(set(pixels)) > 16  # text rendered: many shades, not a blank page
        assert "conduit-otel-cache exporter" in dom and __version__ in dom
        parser = Links()
        parser.feed(dom)
        assert len(parser.hrefs) == 5
        for href in parser.hrefs:
            with urllib.request.urlopen(urljoin(base, href), timeout=10) as response:
                assert response.status == 200, href
    finally:
        service.stop()
