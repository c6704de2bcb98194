"""The real gossip transport: one asyncio UDP socket bound to (host, port)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from aquila.cluster.membership.transport import Receiver
from aquila.cluster.model.config_parse import format_hostport

log = logging.getLogger(__name__)

# How long a resolved host name is trusted.
_NAME_TTL_S = 30.0


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: Receiver) -> None:
        self._receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            self._receiver(data, format_hostport(str(addr[0]), int(addr[1])))
        except Exception:  # a bad packet must never kill the socket
            log.exception("gossip receiver failed")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: expected when a peer is down; SWIM copes.
        log.debug("udp error: %s", exc)


class UdpTransport:
    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._transport: asyncio.DatagramTransport | None = None
        self._resolved: dict[str, tuple[tuple[str, int], float]] = {}

    async def start(self, receiver: Receiver) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(receiver), local_addr=(self._host, self._port)
        )
        self._transport = transport

    async def _resolve(self, addr: str) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        hit = self._resolved.get(addr)
        if hit is not None and hit[1] > loop.time():
            return hit[0]
        host, port = split_addr(addr)
        try:
            ipaddress.ip_address(host)
            target, ttl = (host, port), float("inf")
        except ValueError:
            # Resolve names off the loop; sendto with a name would block in getaddrinfo. Names
            # are looked up again after a while: a restarted container may get a new address.
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            target, ttl = (str(infos[0][4][0]), port), _NAME_TTL_S
        self._resolved[addr] = (target, loop.time() + ttl)
        return target

    async def send(self, addr: str, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            target = await self._resolve(addr)
            self._transport.sendto(data, target)
        except (OSError, ValueError) as exc:
            log.debug("udp send to %s failed: %s", addr, exc)

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
