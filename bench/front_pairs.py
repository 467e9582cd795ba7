"""Two conversations that arrive together, on two free replicas of one conversation each: how often do both
land on one replica (the second then waits behind the first)? jmoshi's generated HAProxy configuration
(`nbthread 1`) against the same configuration with one HAProxy thread per core, in one run.

The replicas are two socket servers that accept a websocket upgrade, answer with their name and hold it until
the client closes: HAProxy's choice alone is measured, with no model.

    .venv/bin/python bench/front_pairs.py [--pairs 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from jmoshi_cli.selftest import free_port
from jmoshi_cli.serving import haproxy

KEY, ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example pair


def holder(name: str) -> int:
    listener = socket.create_server(("127.0.0.1", 0))

    def hold(conn) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                piece = conn.recv(4096)
                if not piece:
                    return
                request += piece
            conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n{name}".encode())
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass  # the client reset it: it hung up all the same

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=hold, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def upgrade(port: int) -> tuple[str | None, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
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
        pass  # queued behind the other one
    return answer.rpartition(b"\r\n\r\n")[2].decode() or None, sock


def measure(threads: int | None, pairs: int, backends: list[haproxy.Backend]) -> int:
    port = free_port()
    front = haproxy.Front("127.0.0.1", port, backends, queue_timeout_s=60)
    if threads is not None:
        config = front.folder / "haproxy.cfg"
        config.write_text(config.read_text().replace("    nbthread 1\n", f"    nbthread {threads}\n"))
    front.start()
    together = 0
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(pairs):
                opened = list(pool.map(lambda _: upgrade(port), range(2)))
                names = {name for name, _ in opened}
                together += names != {"r0", "r1"}
                for _, sock in opened:
                    sock.close()
                while (front.load() or haproxy.Load(1, 0, ())).active:
                    time.sleep(0.02)
    finally:
        front.stop()
    return together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    backends = [haproxy.Backend(name, "127.0.0.1", holder(name)) for name in ("r0", "r1")]
    cores = os.cpu_count() or 1
    version = ".".join(map(str, haproxy.find().version))
    print(f"{args.pairs} pairs of conversations opened together, two free replicas of maxconn 1, HAProxy {version}, "
          f"{cores} cores (an idle machine: the race needs two HAProxy threads running at once)")
    for label, threads in (("jmoshi (nbthread 1)", None), (f"one thread per core ({cores})", cores)):
        together = measure(threads, args.pairs, backends)
        print(f"{label:<28} both on one replica: {together}/{args.pairs} ({100 * together / args.pairs:.1f} %)")


if __name__ == "__main__":
    main()
