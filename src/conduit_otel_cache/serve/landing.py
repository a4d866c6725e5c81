"""The landing page of ``serve`` (``GET /``): what this exporter is and where its routes are."""

from __future__ import annotations

import html

LANDING_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("X-Content-Type-Options", "nosniff"),
]


def landing_page(version: str, redis_url: str) -> str:
    """The HTML of ``GET /``: the exporter, its version, the (password-masked) Redis URL
    it reads and links to every route (relative, so that a path prefix keeps working)."""
    links = [
        ("metrics", "Metrics"),
        ("health", "Health (cluster report)"),
        ("-/healthy", "Liveness probe"),
        ("-/ready", "Readiness probe"),
        ("api/cache/stats/distributed", "Cluster statistics (JSON)"),
    ]
    items = "\n".join(
        f'      <li><a href="{href}">{html.escape(text)}</a></li>' for href, text in links
    )
    return f"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <title>conduit-otel-cache exporter</title>
    <style>body {{ font-family: sans-serif; margin: 2em; max-width: 48em; }}</style>
  </head>
  <body>
    <h1>conduit-otel-cache exporter</h1>
    <p>Version {html.escape(version)}, cluster cache statistics from
      <code>{html.escape(redis_url)}</code>.</p>
    <ul>
{items}
    </ul>
  </body>
</html>
"""
