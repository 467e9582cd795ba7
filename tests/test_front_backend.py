"""`jmoshi front --backend HOST:PORT[/N]`: only an IP address or a host name reaches haproxy.cfg."""

from __future__ import annotations

import pytest

from conftest import run_cli
from jmoshi_cli.errors import UsageError
from jmoshi_cli.serving.front import parse_backend


@pytest.mark.parametrize(("text", "host", "port", "slots"), [
    ("10.0.0.5:8998", "10.0.0.5", 8998, 1),
    ("10.0.0.5:8998/4", "10.0.0.5", 8998, 4),
    ("[::1]:8998", "::1", 8998, 1),
    ("[2001:db8::5]:9000/2", "2001:db8::5", 9000, 2),
    ("gpu-1:8998", "gpu-1", 8998, 1),
    ("gpu-1.lab.example.org:8998", "gpu-1.lab.example.org", 8998, 1),
    ("1st-box.lab:8998", "1st-box.lab", 8998, 1),
    (" 10.0.0.5:8998 ", "10.0.0.5", 8998, 1),
])
def test_an_ip_address_or_host_name_is_a_backend(text, host, port, slots):
    backend = parse_backend(text, 3)
    assert (backend.name, backend.host, backend.port, backend.slots) == ("b3", host, port, slots)


@pytest.mark.parametrize("text", [
    "10.0.0.5:8998\n    server evil 6.6.6.6:80",  # a line added to haproxy.cfg
    "evil\nbackend x:8998",
    "host name:8998",
    "host#comment:8998",
    "10.0.0.5 #:8998",
    "[::1\n]:8998",
    "[fe80::1%eth0]:8998",  # a zone id is free text
    "[10.0.0.5]:8998",  # brackets are for IPv6 only
    "[gpu-1]:8998",
    "::1:8998",  # IPv6 needs brackets
    "10.0.0.256:8998",  # not an IPv4 address, and an all-digit name is none either
    "-gpu:8998",
    "gpu-:8998",
    "gpu..lab:8998",
    "gpu_1:8998",
    "a" * 64 + ":8998",
    "localhost",
    "localhost:0",
    "localhost:65536",
    "localhost:8998/0",
    "localhost:8998/x",
    "",
])
def test_anything_else_is_a_usage_error(text):
    with pytest.raises(UsageError) as caught:
        parse_backend(text, 0)
    assert "HOST:PORT" in caught.value.message and "IP address" in caught.value.hint


def test_a_long_valid_name_passes_and_one_past_253_characters_does_not():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    assert parse_backend(f"{name}:1", 0).host == name
    with pytest.raises(UsageError):
        parse_backend(f"{name}c:1", 0)


def test_front_with_a_newline_in_a_backend_exits_2_with_one_error_line(tmp_path):
    env = {"JMOSHI_HOME": str(tmp_path / "home"), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    result = run_cli("front", "--backend", "10.0.0.5:8998\n    server evil 6.6.6.6:80", env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--backend" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
