"""HAProxy's own output is read for as long as it runs (a pipe nobody reads fills, and HAProxy blocks)."""

from __future__ import annotations

import time

from jmoshi_cli.selftest import free_port
from jmoshi_cli.serving import haproxy


def test_haproxy_alerts_reach_the_relay_while_it_runs(haproxy_binary):
    lines: list[str] = []
    down = haproxy.Backend("b0", "127.0.0.1", free_port())  # nothing listens there: its check fails
    front = haproxy.Front("127.0.0.1", free_port(), [down], 5.0)
    front.start(relay=lines.append)
    try:
        deadline = time.monotonic() + 60
        while not any("b0 is DOWN" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("b0 is DOWN" in line for line in lines), lines
        assert front.alive()
    finally:
        front.stop()
    assert not front.alive() and not front.folder.exists()
