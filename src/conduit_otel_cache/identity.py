"""Who this process is: its instance id, incarnation token and owner, and what a fork does.

The default instance id is ``<pod or host name>-<pid>`` (``HOSTNAME``, else the host name)
in the host's PID namespace, and ``<pod or host name>-ns<inode>-<pid>`` in another one (a
container), where ``<inode>`` names the PID namespace: two containers with the same host
name (host networking) whose applications run as PID 1 get distinct ids. Every worker
process of a pod or host is its own instance. An explicit ``instance_id`` (keyword,
``CONDUIT_CACHE_STATS_INSTANCE_ID`` or ``INSTANCE_ID``) is used as given by the process
that called ``setup()``.

An *incarnation* is one process's life under one id, named by a random token. A process
forked after ``setup()`` (gunicorn ``--preload``, uWSGI without ``lazy-apps``, Celery
prefork, ``multiprocessing`` with fork) becomes a new incarnation under
``<base>-<its pid>``, where ``<base>`` is the id without the parent's pid suffix. A process
that finds its id written by another live process (another owner, a fresh heartbeat)
moves to ``<base>-<pid>`` the same way, before it has written anything; one that finds
another incarnation writing under the id it had written (two processes given one id) does
the same, carrying on from what it had written. Duplicates are told apart by token; the
owner (``host:pid:namespace``) only decides who yields first.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping

MAX_ID = 128


def host_name(environ: Mapping[str, str] | None = None) -> str:
    """``HOSTNAME`` (the Kubernetes pod name), else the host name, safe for a key."""
    env = os.environ if environ is None else environ
    name = env.get("HOSTNAME", "").strip() or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", name)[:100] or "host"


#: the inode of the initial PID namespace (``PROC_PID_INIT_INO`` of Linux)
_INIT_PID_NAMESPACE = 0xEFFFFFFC


def pid_namespace() -> int | None:
    """The inode of this process's PID namespace; None in the host's (or not on Linux)."""
    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return None if inode == _INIT_PID_NAMESPACE else inode


def default_instance_id(environ: Mapping[str, str] | None = None) -> str:
    """``INSTANCE_ID`` if set, else ``<host_name()>-<pid>``, with ``-ns<inode>`` before the
    pid in a PID namespace other than the host's."""
    env = os.environ if environ is None else environ
    explicit = env.get("INSTANCE_ID", "").strip()
    if explicit:
        return explicit
    namespace = pid_namespace()
    middle = "" if namespace is None else f"-ns{namespace}"
    return f"{host_name(env)[: MAX_ID - 32]}{middle}-{os.getpid()}"


class Identity:
    """The instance id and incarnation of this process (changes at a fork)."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._new_incarnation()

    def _new_incarnation(self) -> None:
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        namespace = pid_namespace()
        self.owner = f"{socket.gethostname()}:{self.pid}" + (f":{namespace}" if namespace else "")

    @classmethod
    def of(cls, instance_id: str, token: str, owner: str) -> Identity:
        """The identity of another (dead) incarnation, to write for it."""
        identity = cls(instance_id)
        identity.token, identity.owner = token, owner
        return identity

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

    def move_aside(
        self, *, displaced: bool = False, home: Callable[[str], object] | None = None
    ) -> str:
        """Another live process writes as this id: take ``<base>-<pid>`` (or a token
        suffix when that is the id already, or when ``displaced``: another incarnation,
        maybe in this very process, took over the id this one wrote), one that ``home``
        puts where the old id is (a shard of :mod:`.shards`: the totals that hold what it
        wrote). Returns the new id."""
        old = self.instance_id
        candidate = _with_suffix(self.base, f"-{self.pid}")
        if candidate == old or displaced:
            candidate = _with_suffix(self.base, f"-{self.pid}-{self.token[:8]}")
        n = 0
        while home is not None and home(candidate) is not home(old):
            n += 1
            candidate = _with_suffix(self.base, f"-{self.pid}-{self.token[:8]}-{n}")
        self.instance_id = candidate
        self.token = uuid.uuid4().hex
        return candidate


def _with_suffix(base: str, suffix: str) -> str:
    return base[: MAX_ID - len(suffix)] + suffix
