"""The spool: one incarnation's tallies in a file that outlives the process.

With ``spool_dir`` set, every tally of the recorder (one per thread and region) is a
record of 8-byte floats in a memory-mapped file, ``<spool_dir>/<token>.spool``; the hot
path adds to it as it adds to a list, without a lock, and a SIGKILL loses nothing: the
kernel's page cache holds every increment. Layout (native byte order):

- a 4096-byte header: magic, record width, number of records, state (live or
  recovered), and the incarnation (instance id, token, owner, histogram bounds, whether
  Redis acknowledged it, pid, process start time, boot id) as JSON in one of two areas,
  switched by one aligned 8-byte store so that a kill never leaves it half written;
- records from offset 4096 in chunks of ``CHUNK`` bytes (each its own mapping,
  allocated on disk with ``posix_fallocate`` so a full disk is an error, not a SIGBUS):
  a region name (8-byte length, 128 bytes) and ``width`` floats. Counts are exact up to
  2**53 per record.

Liveness is the owner's exclusive ``flock`` on the file, which the kernel releases
however the process ends (SIGKILL, OOM kill, a restarted container, a reboot): a spool
whose lock can be taken belongs to a dead incarnation, whatever became of its pid. A file
is created under a temporary name, locked, then renamed, so a spool is never seen
unlocked while its owner lives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MAGIC = b"CCSPOOL1"
HEADER = 4096
CHUNK = 16384
NAME = 128
SUFFIX = ".spool"
#: header words: magic, width, records, state, identity area
_WIDTH, _RECORDS, _STATE, _AREA = 8, 16, 24, 32
_AREAS = (1024, 2560)
_AREA_SIZE = 1536
#: states: the owner's, a recovery under way (Redis may know it now), recovered
LIVE, RECOVERING, RECOVERED = 0, 2, 1
#: a temporary file this old was left by a creator that died before renaming it
ABANDONED = 60.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


class Spool:
    """The spool file of this incarnation; :meth:`record` hands out zeroed records."""

    def __init__(self, directory: str, width: int, identity: dict[str, Any]) -> None:
        self.directory = directory
        self.width = width
        self.record_size = NAME + 8 + 8 * width
        self.per_chunk = CHUNK // self.record_size
        self._lock = threading.Lock()
        self._chunks: list[tuple[mmap.mmap, memoryview[Any]]] = []
        self._views: list[memoryview[Any]] = []
        self.records = 0
        token = identity["token"]
        temporary = os.path.join(directory, f".{token}.tmp")
        self.path = os.path.join(directory, token + SUFFIX)
        self._fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.posix_fallocate(self._fd, 0, HEADER)
            self._header = mmap.mmap(self._fd, HEADER)
            self._header[:8] = MAGIC
            struct.pack_into("=QQQQ", self._header, _WIDTH, width, 0, LIVE, 0)
            self.set_identity(identity)
            os.rename(temporary, self.path)
        except BaseException:
            os.close(self._fd)
            os.unlink(temporary)
            raise

    def set_identity(self, identity: dict[str, Any]) -> None:
        """Write the incarnation's identity (into the area not in use, then switch)."""
        pid = os.getpid()
        data = json.dumps(
            {**identity, "pid": pid, "start_time": _start_time(pid), "boot_id": _boot_id()}
        ).encode()
        if len(data) > _AREA_SIZE - 8:
            raise ValueError("spool identity too long")
        with self._lock:
            area = 1 - struct.unpack_from("=Q", self._header, _AREA)[0]
            start = _AREAS[area]
            struct.pack_into("=Q", self._header, start, len(data))
            self._header[start + 8 : start + 8 + len(data)] = data
            struct.pack_into("=Q", self._header, _AREA, area)
        self.identity = identity

    def record(self, region: str) -> memoryview[Any]:
        """A new zeroed record of ``region``: ``width`` floats (raises OSError when the
        disk is full)."""
        with self._lock:
            index = self.records
            chunk, slot = divmod(index, self.per_chunk)
            if chunk == len(self._chunks):
                offset = HEADER + chunk * CHUNK
                os.posix_fallocate(self._fd, offset, CHUNK)
                mapped = mmap.mmap(self._fd, CHUNK, offset=offset)
                self._chunks.append((mapped, memoryview(mapped)))
            view = self._chunks[chunk][1]
            start = slot * self.record_size
            name = region.encode()[:NAME]
            struct.pack_into("=Q", view, start, len(name))
            view[start + 8 : start + 8 + len(name)] = name
            record = view[start + 8 + NAME : start + self.record_size].cast("d")
            self._views.append(record)
            self.records = index + 1
            struct.pack_into("=Q", self._header, _RECORDS, self.records)
            return record

    def size(self) -> int:
        """Bytes the file takes on disk."""
        return HEADER + len(self._chunks) * CHUNK

    def finish(self) -> None:
        """The final flush wrote everything: a recovering process only removes the file."""
        struct.pack_into("=Q", self._header, _STATE, RECOVERED)

    def remove(self) -> None:
        """A clean end: the file goes (its mappings stay valid until the process ends, so a
        ``record_*`` after shutdown never fails)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def abandon(self) -> None:
        """In a forked child: let go of the parent's spool (its mappings and the lock, so
        the parent's death is seen) without touching the file."""
        # a view still exported (not expected: only the forking thread survives a fork)
        # keeps its mapping, and with it the lock, but never fails the fork
        with contextlib.suppress(BufferError, ValueError):
            for view in self._views:
                view.release()
            for mapped, view in self._chunks:
                view.release()
                mapped.close()
            self._header.close()
        os.close(self._fd)
        self._views, self._chunks = [], []


@dataclasses.dataclass
class DeadSpool:
    """What a dead incarnation's spool holds: its identity and its totals per region."""

    path: str
    identity: dict[str, Any]
    state: int
    totals: dict[str, list[float]]
    size: int


def _read(path: str, data: bytes) -> DeadSpool:
    if data[:8] != MAGIC or len(data) < HEADER:
        raise ValueError("not a spool file")
    width, records, state, area = struct.unpack_from("=QQQQ", data, _WIDTH)
    start = _AREAS[area]
    (length,) = struct.unpack_from("=Q", data, start)
    identity = json.loads(data[start + 8 : start + 8 + length])
    size = NAME + 8 + 8 * width
    per_chunk = CHUNK // size
    totals: dict[str, list[float]] = {}
    for index in range(records):
        chunk, slot = divmod(index, per_chunk)
        at = HEADER + chunk * CHUNK + slot * size
        (n,) = struct.unpack_from("=Q", data, at)
        region = data[at + 8 : at + 8 + n].decode()
        values = struct.unpack_from(f"={width}d", data, at + 8 + NAME)
        acc = totals.setdefault(region, [0.0] * width)
        for i, v in enumerate(values):
            acc[i] += v
    return DeadSpool(path, identity, state, totals, len(data))


#: the descriptors of this process's claims: a child forked meanwhile closes its copies
#: (a lock it inherited would keep the spool from everyone else while it lives)
_claimed: set[int] = set()


def _close_claims_after_fork() -> None:
    for fd in list(_claimed):
        with contextlib.suppress(OSError):
            os.close(fd)
    _claimed.clear()


os.register_at_fork(after_in_child=_close_claims_after_fork)


def _close(fd: int) -> None:
    _claimed.discard(fd)
    os.close(fd)


class Claim:
    """A dead incarnation's spool, locked by this process until :meth:`release`."""

    def __init__(self, fd: int, spool: DeadSpool) -> None:
        self.fd = fd
        self.spool = spool
        _claimed.add(fd)

    def begin(self) -> None:
        """A recovery starts: from now Redis may know the incarnation, whatever the spool
        says (a recovery cut short is finished only where Redis still knows it)."""
        os.pwrite(self.fd, struct.pack("=Q", RECOVERING), _STATE)

    def done(self) -> None:
        """Its values are written: mark it recovered, remove it, release it."""
        os.pwrite(self.fd, struct.pack("=Q", RECOVERED), _STATE)
        self.discard()

    def discard(self) -> None:
        """Remove it without writing (unreadable, or already recovered)."""
        with contextlib.suppress(OSError):
            os.unlink(self.spool.path)
        self.release()

    def release(self) -> None:
        """Leave it for a later attempt."""
        _close(self.fd)


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime > seconds
    except OSError:
        return False


def claim_dead(directory: str, skip: Sequence[str] = ()) -> Iterator[tuple[Claim, str]]:
    """Lock and read the spools in ``directory`` whose owner is dead, each with ``""``, or
    with why it cannot be read (still locked: the caller removes it); a half-created one
    (its creator died before it was renamed, ``ABANDONED`` s ago) is removed. ``skip``:
    paths of this process's own spools."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if path in skip or not (name.endswith(SUFFIX) or name.endswith(".tmp")):
            continue
        if name.endswith(".tmp") and not _older_than(path, ABANDONED):
            continue  # being created: locked only after it is opened
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone meanwhile: another process recovered it
        _claimed.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:  # recovered and removed since it was listed
                _close(fd)
                continue
        except OSError:
            _close(fd)  # its owner (or another recovering process) holds it
            continue
        if name.endswith(".tmp"):
            Claim(fd, DeadSpool(path, {}, LIVE, {}, 0)).discard()
            continue
        try:
            spool = _read(path, os.pread(fd, os.fstat(fd).st_size, 0))
        except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as exc:
            yield Claim(fd, DeadSpool(path, {}, LIVE, {}, 0)), f"{type(exc).__name__}: {exc}"
            continue
        except OSError:
            _close(fd)
            continue
        yield Claim(fd, spool), ""
