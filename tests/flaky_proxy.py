"""A loopback TCP proxy in front of the test S3 server that drops a share of the traffic.

Every chunk a client sends is, with probability `drop`, answered by closing both sides of the
connection instead of forwarding it: the request in flight (a GET, a PUT half sent, a listing)
is lost the way a reset connection loses it, and the client must retry. `gone()` stops it for
good: new connections are refused, open ones cut. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import random
import socket
import threading

from tests.s3server import free_port


class FlakyProxy:
    """`127.0.0.1:port` forwarding to `127.0.0.1:target_port`, dropping `drop` of the chunks."""

    def __init__(self, target_port: int, *, drop: float, seed: int = 0) -> None:
        self.target_port, self.drop = target_port, drop
        self.port = free_port()
        self.dropped = self.forwarded = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="flaky proxy").start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gone(self) -> None:
        """The store disappears for good: refuse new connections, cut the open ones."""
        self._stopped.set()
        self._listener.close()
        with self._lock:
            for sock in list(self._sockets):
                _close(sock)
            self._sockets.clear()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(*pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(*reversed(pair), False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_client:
                    with self._lock:
                        lose = self._random.random() < self.drop
                        self.dropped += lose
                        self.forwarded += not lose
                    if lose:
                        break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
                with self._lock:
                    self._sockets.discard(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
