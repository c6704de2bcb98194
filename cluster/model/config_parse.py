"""Parsing of addresses given by users (seeds, --node) and by peers (member addresses).

An address is `host:port` and nothing else: the node connects to what it names (a join pushes
its state there), so a scheme, path, query, fragment, user info or whitespace is refused
rather than handed to an HTTP client that would make a request to anywhere of it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from aquila.cluster.model.bounds import MAX_SEEDS
from aquila.cluster.model.errors import BadRequest

# RFC 1123 host names (labels of letters, digits and inner hyphens), plus underscores, which
# container runtimes allow in service names.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")
_ZONE = re.compile(r"[A-Za-z0-9_.@-]{1,15}")


def _host(host: str) -> str:
    """The host part, or ValueError: a host name, an IPv4 address or a bracketed IPv6 one."""
    if host.startswith("[") and host.endswith("]"):
        ip = ipaddress.ip_address(host[1:-1])  # ValueError when not an address
        if ip.version != 6:
            raise ValueError("only IPv6 addresses are bracketed")
        # `ipaddress` takes any zone after '%' (CR, LF, spaces): the address becomes a Host
        # header (peers/lean.py), so only what an interface name may be.
        if ip.scope_id is not None and not _ZONE.fullmatch(ip.scope_id):
            raise ValueError("not an interface name after '%'")
        return host[1:-1]
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError("not a host name or address")
    return host


def parse_hostport(value: Any) -> tuple[str, int]:
    """(host, port) of `host:port`; IPv6 hosts come bracketed (`[::1]:8470`) and are
    returned without the brackets."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    host, sep, port = value.rpartition(":")
    try:
        if not sep or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise ValueError("bad port")
        return _host(host), int(port)
    except ValueError:
        raise ValueError(
            f"expected host:port (a host name or IP address and a port 1..65535), got {value!r}"
        ) from None


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_seeds(raw: Any) -> list[str]:
    if isinstance(raw, str):
        raw = [s.strip() for s in raw.split(",") if s.strip()]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
        raise BadRequest("'seeds' must be a non-empty list of host:port")
    if len(raw) > MAX_SEEDS:
        raise BadRequest(f"at most {MAX_SEEDS} seeds, got {len(raw)}")
    out = []
    for s in raw:
        try:
            h, p = parse_hostport(s)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        out.append(format_hostport(h, p))
    return out
