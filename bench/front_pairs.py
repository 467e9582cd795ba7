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
import time

from jmoshi_cli.selftest import free_port
from jmoshi_cli.serving import haproxy

import _common  # noqa: F401 - puts tests/ on the path, where the backends live
from upgrades import Holder, pair_at_once


def measure(threads: int | None, pairs: int, backends: list[haproxy.Backend]) -> int:
    port = free_port()
    front = haproxy.Front("127.0.0.1", port, backends, queue_timeout_s=60)
    if threads is not None:
        config = front.folder / "haproxy.cfg"
        config.write_text(config.read_text().replace("    nbthread 1\n", f"    nbthread {threads}\n"))
    front.start()
    together = 0
    try:
        for _ in range(pairs):
            together += pair_at_once(port, timeout=5) != ("r0", "r1")
            while (front.load() or haproxy.Load(1, 0, ())).active:
                time.sleep(0.02)
    finally:
        front.stop()
    return together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    holders = [Holder("r0"), Holder("r1")]
    backends = [haproxy.Backend(h.name, "127.0.0.1", h.port) for h in holders]
    cores = os.cpu_count() or 1
    version = ".".join(map(str, haproxy.find().version))
    print(f"{args.pairs} pairs of conversations opened together, two free replicas of maxconn 1, HAProxy {version}, "
          f"{cores} cores (an idle machine: the race needs two HAProxy threads running at once)")
    for label, threads in (("jmoshi (nbthread 1)", None), (f"one thread per core ({cores})", cores)):
        together = measure(threads, args.pairs, backends)
        print(f"{label:<28} both on one replica: {together}/{args.pairs} ({100 * together / args.pairs:.1f} %)")


if __name__ == "__main__":
    main()
