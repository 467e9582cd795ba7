"""Websocket upgrades through a front, answered by plain sockets: which backend HAProxy chose, with no model.

Used by tests/test_replicas.py and bench/front_pairs.py."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

KEY, ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example pair


class Holder:
    """A backend that takes websocket upgrades, says its name, and holds each until the client closes."""

    def __init__(self, name: str):
        self.name = name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                piece = conn.recv(4096)
                if not piece:
                    return  # a health check: connect and close
                request += piece
            conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n{self.name}".encode())
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass  # the client reset it: it hung up all the same


def upgrade_to(port: int, timeout: float) -> tuple[str | None, socket.socket]:
    """One conversation through the front: the name of the backend that answered (None if none did in
    time), and the open socket that holds it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"GET /api/chat HTTP/1.1\r\nHost: front\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or answer.endswith(b"\r\n\r\n"):
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
    except OSError:
        pass  # still queued when the time ran out
    return answer.rpartition(b"\r\n\r\n")[2].decode() or None, sock


def pair_at_once(port: int, timeout: float) -> tuple:
    """Two conversations opened together and held until both have their answer: who answered each, sorted."""
    with ThreadPoolExecutor(2) as pool:
        opened = list(pool.map(lambda _: upgrade_to(port, timeout), range(2)))
    for _, sock in opened:
        sock.close()
    return tuple(sorted((name for name, _ in opened), key=str))
