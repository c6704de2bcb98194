"""Admin commands: status, join, rebalance, leave — thin, over HTTP to a node."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_admin_parsers(sub: Any) -> None:
    p = sub.add_parser("status", help="members, their state, shards per node, collections")
    p.add_argument("--node", default="127.0.0.1:8470")
    p = sub.add_parser("join", help="join a node to a cluster")
    p.add_argument("--node", default="127.0.0.1:8470")
    p.add_argument("--seeds", required=True, help="host:port[,host:port...]")
    p = sub.add_parser("rebalance", help="move replicas to balance the cluster")
    p.add_argument("--node", default="127.0.0.1:8470")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wait", action="store_true", help="show progress until done")
    p = sub.add_parser("leave", help="hand a node's shards to others, then leave")
    p.add_argument("--node", default="127.0.0.1:8470")
    for name in ("status", "join", "rebalance", "leave"):
        sub.choices[name].add_argument("--api-key", default=None, help="API key (AQUILA_API_KEY)")


def run_admin(args: argparse.Namespace) -> int:
    print(f"aquila {args.command}: not available yet", file=sys.stderr)
    return 1
