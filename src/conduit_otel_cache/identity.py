"""Who this process is: its instance id, incarnation token and owner, and what a fork does.

The default instance id is ``<pod or host name>-<pid>`` (``HOSTNAME``, else the host name):
every worker process of a pod or host is its own instance, and a container restarted in
place, whose processes usually get the same pids again, takes over its earlier ids. An
explicit ``instance_id`` (keyword, ``CONDUIT_CACHE_STATS_INSTANCE_ID`` or ``INSTANCE_ID``)
is used as given by the process that called ``setup()``.

An *incarnation* is one process's life under one id, named by a random token. A process
forked after ``setup()`` (gunicorn ``--preload``, uWSGI without ``lazy-apps``, Celery
prefork, ``multiprocessing`` with fork) becomes a new incarnation under
``<base>-<its pid>``, where ``<base>`` is the id without the parent's pid suffix. A process
that finds its id written by another live process (another owner, a fresh heartbeat)
moves to ``<base>-<pid>`` the same way, before it has written anything.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping

MAX_ID = 128


def host_name(environ: Mapping[str, str] | None = None) -> str:
    """``HOSTNAME`` (the Kubernetes pod name), else the host name, safe for a key."""
    env = os.environ if environ is None else environ
    name = env.get("HOSTNAME", "").strip() or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name)[:100] or "host"


def default_instance_id(environ: Mapping[str, str] | None = None) -> str:
    """``INSTANCE_ID`` if set, else ``<host_name()>-<pid>``."""
    env = os.environ if environ is None else environ
    explicit = env.get("INSTANCE_ID", "").strip()
    return explicit or f"{host_name(env)}-{os.getpid()}"


class Identity:
    """The instance id and incarnation of this process (changes at a fork)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._new_incarnation()

    def _new_incarnation(self) -> None:
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()}:{self.pid}"

    @property
    def base(self) -> str:
        """The id without this process's pid suffix."""
        suffix = f"-{self.pid}"
        if self.instance_id.endswith(suffix) and len(self.instance_id) > len(suffix):
            return self.instance_id[: -len(suffix)]
        return self.instance_id

    def after_fork(self) -> None:
        """In a forked child: a new incarnation under ``<base>-<pid>``."""
        base = self.base
        self._new_incarnation()
        self.instance_id = _with_suffix(base, f"-{self.pid}")

    def move_aside(self) -> str:
        """Another live process writes as this id: take ``<base>-<pid>`` (or a token
        suffix when that is the id already). Returns the new id."""
        candidate = _with_suffix(self.base, f"-{self.pid}")
        if candidate == self.instance_id:
            candidate = _with_suffix(self.base, f"-{self.pid}-{self.token[:8]}")
        self.instance_id = candidate
        self.token = uuid.uuid4().hex
        return candidate


def _with_suffix(base: str, suffix: str) -> str:
    return base[: MAX_ID - len(suffix)] + suffix
