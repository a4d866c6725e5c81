"""A real TCP proxy on loopback between a client and a server (here: a `serve` replica and
Redis), which a test can cut (every connection closed, new ones closed at once) and restore,
or slow down (each chunk forwarded after a delay), or make it trickle replies (a byte at a
time: each within the client's socket timeout, the whole reply in minutes), or make it lose
replies (requests reach the server, which applies them; its replies are dropped)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from typing import Any


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; :meth:`cut`, :meth:`restore`,
    :attr:`delay` (seconds before each chunk is forwarded), :attr:`trickle` (while above 0,
    what the server sends is forwarded one byte every ``trickle`` seconds: a client whose
    socket timeout is longer waits for the reply without ever timing out),
    :attr:`drop_replies` (while true, what the server sends is dropped: a client times out
    on a request the server applied)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self.trickle = 0.0
        self.drop_replies = False
        self.refused = 0  # connections closed at once while cut
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True, name="tcp-proxy")
        self._thread.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def url(self, db: int = 0) -> str:
        """A Redis URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        """Close every forwarded connection; from now on close new ones at once."""
        self._cut.set()
        self._close_all()

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                self.refused += 1
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _trickle(self, client: socket.socket, data: bytes) -> bytes:
        """Send ``data`` to ``client`` a byte at a time while trickling; what is left."""
        while data and self.trickle and not self._stop.is_set():
            time.sleep(self.trickle)
            client.sendall(data[:1])
            data = data[1:]
        return data

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream and self.drop_replies:
                        continue
                    if self.delay:
                        time.sleep(self.delay)
                    if sock is upstream and self.trickle:
                        data = self._trickle(client, data)
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # closed by cut()
            return
        finally:
            for sock in peers:
                with self._lock:
                    self._conns.discard(sock)
                sock.close()
