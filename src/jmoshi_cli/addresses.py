"""Where a server listens, and how people reach it: the one place that knows the address rules.

- loopback (127.0.0.0/8, ::1, "localhost"): this machine only;
- wildcard ("0.0.0.0", "::", ""): every interface, reached through the machine's LAN addresses;
- anything else: that one address.

Standard library only: the server children import it too.
"""

from __future__ import annotations

import ipaddress
import socket

WILDCARDS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("localhost",)


def is_wildcard(host: str) -> bool:
    return host in WILDCARDS


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host part of a URL that reaches a server listening on `host` from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def lan_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces other than loopback (no packets sent)."""
    import fcntl
    import struct

    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            found.append(address)
    return found


def reachable_hosts(host: str) -> list[str]:
    """The addresses other machines use to reach a server listening on `host` (none for loopback)."""
    if is_loopback(host):
        return []
    return lan_addresses() if is_wildcard(host) else [host]


def certificate_names(host: str) -> set[str]:
    """The names a self-signed certificate for a server on `host` must carry."""
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    if is_wildcard(host):
        names.update(lan_addresses())
    else:
        names.add(host)
    return names
