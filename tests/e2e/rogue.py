"""A rogue cluster member, run as its own process by tests/e2e/test_attack_auth.py:
`python -m tests.e2e.rogue --target HOST:PORT --bind HOST --victim ID [--secret S]`.

It holds no (or a wrong) cluster secret and tries what a real member could do: join through
push-pull with a real `Gossip`, gossip a forged cluster state that deletes the victim's
collections and a `Dead` about the victim, send the same as bare and wrongly sealed
datagrams, and call the peer routes directly. It prints one JSON line of what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
from typing import Any

import orjson

from aquila.cluster.clock import SystemClock
from aquila.cluster.membership.gossip import Gossip, GossipConfig, JoinError
from aquila.cluster.membership.messages import (
    Alive,
    Compound,
    Dead,
    PushPull,
    Suspect,
    User,
    encode,
)
from aquila.cluster.membership.packet_auth import PacketAuth
from aquila.cluster.membership.table import Member
from aquila.cluster.membership.udp import UdpTransport, split_addr
from aquila.cluster.model.spec import CollectionSpec
from aquila.cluster.peers.http import Peers
from aquila.cluster.state.entries import CollectionEntry
from aquila.node.cluster_node import HttpPushPull

ROGUE = "rogue"


def tombstones(names: list[str]) -> bytes:
    """Cluster-state entries deleting `names`, newer than anything the victim holds."""
    return orjson.dumps([
        CollectionEntry(CollectionSpec(name, 4), ((ROGUE,),), 10**9, ROGUE, deleted=True,
                        uid="rogue-uid").to_json()
        for name in names
    ])


class RogueDelegate:
    """Offers the forged state in every push-pull and on every gossip packet."""

    def __init__(self, state: bytes) -> None:
        self._state = state

    def local_state(self) -> bytes:
        return self._state

    def merge_remote_state(self, data: bytes) -> None:
        pass

    def get_broadcasts(self, limit_bytes: int) -> list[bytes]:
        return [self._state] if len(self._state) <= limit_bytes else []

    def notify_msg(self, data: bytes) -> None:
        pass

    def notify_change(self, member: Member) -> None:
        pass


async def attack(args: argparse.Namespace) -> dict[str, Any]:
    names = args.collections.split(",")
    state = tombstones(names)
    addr = f"{args.bind}:{args.port}"
    peers = Peers(args.secret, 3.0, sender=ROGUE)
    await peers.start()
    clock = SystemClock()
    fast = GossipConfig(probe_interval=0.1, probe_timeout=0.05, gossip_interval=0.05,
                        push_pull_interval=0.5, push_pull_timeout=3.0)
    g = Gossip(ROGUE, addr, UdpTransport(args.bind, args.port), HttpPushPull(peers), clock,
               random.Random(0), fast, RogueDelegate(state), args.secret)
    out: dict[str, Any] = {}
    await g.start()
    try:
        try:
            await g.join([args.target])
            out["join"] = "joined"
        except JoinError as exc:
            out["join"] = f"refused: {exc}"
        # Behave as if it had joined: probe the victim, gossip its death and our state.
        g.inject(Alive(1, args.victim, args.target))
        g.inject(Dead(1, args.victim, ROGUE))
        # The same as raw datagrams: bare, and sealed with our (wrong or no) secret.
        forged = encode(Compound((
            Alive(1, ROGUE, addr), Suspect(1, args.victim, ROGUE), Dead(1, args.victim, ROGUE),
            User(state),
        )))
        sealed = PacketAuth(args.secret or "guess", ROGUE, clock).seal(forged)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(20):
                s.sendto(forged, split_addr(args.target))
                s.sendto(sealed, split_addr(args.target))
        # The peer routes, called directly (signed with our secret, if any).
        pp = PushPull(True, (), state)
        calls: list[tuple[str, str, str, Any, bytes | None]] = [
            ("pushpull", "POST", "/internal/v1/pushpull", None,
             PacketAuth(args.secret, ROGUE, clock).seal(encode(pp))),
            ("state", "POST", "/internal/v1/state", orjson.loads(state), None),
            ("drop_shard", "POST", f"/internal/v1/collections/{names[0]}/drop_shard",
             {"shard": 0}, None),
        ]
        statuses: dict[str, Any] = {}
        for label, method, path, body, raw in calls:
            try:
                await peers.request(args.target, method, path, body, raw=raw,
                                    to=None if label == "pushpull" else args.victim)
                statuses[label] = 200
            except Exception as exc:  # the typed error carries the refusal
                statuses[label] = getattr(exc, "status", repr(exc))
        out["http"] = statuses
        await asyncio.sleep(args.linger)  # let the loops throw their packets at the victim
        out["packets_sent"] = g.stats.packets_sent
    finally:
        await g.stop()
        await peers.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--victim", required=True)
    p.add_argument("--collections", default="c")
    p.add_argument("--secret", default=None)
    p.add_argument("--linger", type=float, default=2.0)
    args = p.parse_args()
    sys.stdout.write(orjson.dumps(asyncio.run(attack(args))).decode() + "\n")


if __name__ == "__main__":
    main()
