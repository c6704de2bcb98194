"""Node configuration: documented defaults, overridden by `AQUILA_*` environment variables,
overridden by command-line flags. Validated once at start and passed down; no other module
reads the environment."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aquila.cluster.model.bounds import MAX_SEEDS
from aquila.cluster.model.config_parse import format_hostport, parse_hostport

MIB = 1024 * 1024


@dataclass(frozen=True)
class NodeConfig:
    # Address HTTP (TCP) and gossip (UDP) bind to; both use the same port number.
    host: str = "127.0.0.1"
    port: int = 8470
    # Where collections (RocksDB + FAISS snapshots) and the node's identity live.
    data_dir: Path = Path("data")
    # host:port of nodes of an existing cluster to join at start; empty = a new one-node cluster.
    seeds: tuple[str, ...] = ()
    # Stable node identity. None: generated once and kept in data_dir/node_id, so a restarted
    # node is the same member with the same shards.
    node_id: str | None = None
    # host:port peers and clients use to reach this node (containers bind 0.0.0.0 but are
    # reached by service name). None: host:port.
    advertise: str | None = None
    # When set, every public request but GET /healthz and GET /readyz (probes) and the
    # dashboard's (GET /, /ui: node/http/access.py) needs `Authorization: Bearer <key>`.
    api_key: str | None = None
    # When set, `Authorization: Bearer <read key>` gives the read routes only (node/http/access.py);
    # anything else with it is 403. Without an api_key it makes the node keyed all the same.
    read_key: str | None = None
    # When set, gossip packets and peer requests are authenticated with it (HMAC-SHA256); a
    # node without it cannot join. Without it the api_key serves (see peer_secret).
    cluster_secret: str | None = None
    # Production mode (any bind address but loopback) refuses to start without a cluster
    # secret; this lets it run unauthenticated anyway, with a warning at every start.
    insecure: bool = False
    # fsync the RocksDB write-ahead log before acknowledging a write. Off trades the last
    # moments of acknowledged writes on power loss (not on process crash) for speed.
    fsync: bool = True
    # Largest accepted request body (413 beyond), measured with its vectors written at float32 precision
    # (the shortest text of each float32): the contract promises that a batch of 10,000
    # documents of dim 384 fits in the default, yet Python's json writes such a batch of
    # float32 data with float64 digits, in about 76 MiB. A body beyond twice this is refused
    # before it is read.
    max_body_bytes: int = 64 * MIB
    # A collection's index on a node (one over all its local shards) searches exactly (flat)
    # until it holds this many vectors, then trains IVF.
    train_min: int = 4096
    # Retrain a trained index once it has grown this many times since its last training: at
    # 2, nlist (about 4·√n) grows by √2 a step, so lists are at most twice their trained
    # length (training streams from the store, so retraining often costs CPU, not memory).
    retrain_growth: float = 2.0
    # Snapshot a collection's index this often (seconds) when it has changed since the last one.
    snapshot_interval_s: float = 30.0
    # RocksDB's memory on this node, every collection's block cache and memtables in one
    # budget (MiB; memtables at most an eighth of it). Bounded: 32 MiB to 1 TiB.
    rocksdb_memory_mib: int = 64
    # Most query rows grouped into one FAISS call by the dynamic batcher.
    search_batch_rows: int = 512
    # Threads that run FAISS searches; None = one per core (at least 2).
    search_threads: int | None = None
    # Gossip (SWIM) timing; memberlist's LAN defaults.
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    gossip_interval_s: float = 0.2
    push_pull_interval_s: float = 30.0
    suspicion_mult: int = 4
    # Default timeout of a fan-out search when the request names none.
    search_timeout_ms: int = 10_000
    # Time a peer request may take before it is treated as failed (writes, gets).
    peer_timeout_s: float = 10.0
    # A node dead this long has its shards re-replicated elsewhere; <= 0 turns it off.
    dead_grace_s: float = 60.0
    # Seconds between anti-entropy passes (replicas compare digests, exchange differences).
    anti_entropy_interval_s: float = 30.0
    # Deletes are kept as tombstones this long (and until every replica has them), so that a
    # replica that missed the delete learns of it instead of resurrecting the document.
    tombstone_grace_s: float = 86400.0
    # Shard moves running at once on any one node during a rebalance (copy throttle).
    moves_per_node: int = 2
    # Documents per second one shard move copies at most (0: unthrottled), so that searches
    # and writes keep their share of the machine during a rebalance.
    transfer_docs_per_s: float = 10_000.0
    # Python logging level name.
    log_level: str = "INFO"
    # One line per event: "json" (for log shippers and jq) or "text" (for a terminal).
    log_format: str = "text"

    @property
    def peer_secret(self) -> str | None:
        """What authenticates peer requests: the cluster secret, or else the API key, so that
        a node with an API key never serves its internal routes to anyone without it. A node
        keyed by a read key alone has no credential a peer could hold (the read key is
        handed to clients, it never serves): its peer traffic is keyed by a secret made at
        start that nobody knows, so it serves alone rather than open to anyone."""
        return self.cluster_secret or self.api_key or (
            self._unshared_secret if self.read_key else None)

    @functools.cached_property
    def _unshared_secret(self) -> str:
        return secrets.token_hex(32)

    @property
    def open_on_network(self) -> bool:
        """Peer traffic unauthenticated on an address others can reach (only with insecure)."""
        return not (self.cluster_secret or self.api_key) and not is_loopback(self.host)

    @property
    def max_wire_bytes(self) -> int:
        """Hard cap on the bytes of a body as sent (see max_body_bytes)."""
        return 2 * self.max_body_bytes

    @property
    def addr(self) -> str:
        return self.advertise or format_hostport(self.host, self.port)

    def validate(self) -> NodeConfig:
        # float() reads "nan" and "inf", which every bound below lets through (NaN compares
        # false) and which break what sleeps on them or rounds them.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, not {value}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, not {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be at least 1024")
        if self.train_min < 1:
            raise ValueError("train_min must be positive")
        if not 32 <= self.rocksdb_memory_mib <= 1 << 20:
            raise ValueError("rocksdb_memory_mib must be 32 (MiB) to 1048576 (1 TiB), "
                             f"not {self.rocksdb_memory_mib}")
        if self.snapshot_interval_s <= 0:
            raise ValueError("snapshot_interval_s must be positive")
        if self.search_threads is not None and self.search_threads < 1:
            raise ValueError("search_threads must be at least 1")
        if self.retrain_growth <= 1:
            raise ValueError("retrain_growth must be above 1")
        if len(self.seeds) > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds, got {len(self.seeds)}")
        for s in self.seeds:
            parse_hostport(s)
        if self.advertise:
            parse_hostport(self.advertise)
        if self.log_format not in ("json", "text"):
            raise ValueError(f"log_format must be json or text, not {self.log_format!r}")
        # The read key is handed to clients that may only read: equal to the API key it would
        # write, equal to the cluster secret it would act as a peer (peer writes, moves).
        if self.read_key and self.read_key == self.api_key:
            raise ValueError("read_key must differ from api_key (a read key that is also the "
                             "API key grants writes)")
        if self.read_key and self.read_key == self.cluster_secret:
            raise ValueError("read_key must differ from cluster_secret (a read key that is "
                             "also the cluster secret lets its holder act as a peer)")
        if self.open_on_network and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.host or 'all addresses'} without a cluster "
                "secret (not a loopback address, so production mode): set --cluster-secret "
                "(AQUILA_CLUSTER_SECRET), or --insecure (AQUILA_INSECURE=true) to run open"
            )
        return self


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: development mode (Elasticsearch decides the same way).
    Other names count as reachable from elsewhere, whatever they resolve to today."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False




def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {v!r}")


def _convert(name: str, raw: Any) -> Any:
    """Turn a string (environment) or flag value into the field's type."""
    if raw is None:
        return None
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    typ = str(fields[name].type)
    if not isinstance(raw, str):
        return tuple(raw) if name == "seeds" else raw
    if name == "seeds":
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if name == "data_dir":
        return Path(raw)
    if typ.startswith("bool"):
        return _parse_bool(raw)
    if typ.startswith("int"):
        return int(raw)
    if typ.startswith("float"):
        return float(raw)
    return raw or None if "None" in typ else raw


ENV_NAMES = {f.name: "AQUILA_" + f.name.upper() for f in dataclasses.fields(NodeConfig)}
ENV_NAMES["data_dir"] = "AQUILA_DATA"


def load_config(
    flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> NodeConfig:
    """Defaults, then `AQUILA_*` environment, then flags that were given (not None)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, env in ENV_NAMES.items():
        if env in environ:
            try:
                values[name] = _convert(name, environ[env])
            except ValueError as exc:
                raise ValueError(f"{env}: {exc}") from None
    for name, raw in (flags or {}).items():
        if raw is not None:
            values[name] = _convert(name, raw)
    config = NodeConfig(**values).validate()
    if config.advertise is None and config.host in ("0.0.0.0", "::", ""):
        # Peers cannot reach a wildcard address: advertise this host's own name's address.
        config = dataclasses.replace(config, advertise=f"{_own_address()}:{config.port}")
    return config


def _own_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
