"""Parsing of addresses given by users (seeds, --node)."""

from __future__ import annotations

from typing import Any

from aquila.cluster.model.errors import BadRequest


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]"), int(port)


def parse_seeds(raw: Any) -> list[str]:
    if isinstance(raw, str):
        raw = [s for s in raw.split(",") if s.strip()]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
        raise BadRequest("'seeds' must be a non-empty list of host:port")
    out = []
    for s in raw:
        try:
            h, p = parse_hostport(s)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        out.append(f"{h}:{p}")
    return out
