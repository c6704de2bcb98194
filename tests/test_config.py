"""Node configuration: defaults, then AQUILA_* environment, then flags; validated once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from aquila.node.config import ENV_NAMES, MIB, NodeConfig, is_loopback, load_config


def test_defaults() -> None:
    c = load_config({}, environ={})
    assert c == NodeConfig()
    assert c.host == "127.0.0.1"
    assert c.port == 8470
    assert c.data_dir == Path("data")
    assert c.seeds == ()
    assert c.node_id is None and c.api_key is None and c.cluster_secret is None
    assert c.advertise is None
    assert c.fsync is True
    assert c.max_body_bytes == 64 * MIB
    assert c.addr == "127.0.0.1:8470"


def test_defaults_ignore_the_process_environment_when_given_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AQUILA_PORT", "9999")
    assert load_config({}, environ={}).port == 8470
    assert load_config({}).port == 9999  # environ=None reads os.environ


def test_every_field_has_an_env_name() -> None:
    names = {f.name for f in dataclasses.fields(NodeConfig)}
    assert set(ENV_NAMES) == names
    assert ENV_NAMES["data_dir"] == "AQUILA_DATA"
    assert ENV_NAMES["port"] == "AQUILA_PORT"
    assert ENV_NAMES["api_key"] == "AQUILA_API_KEY"
    assert all(v.startswith("AQUILA_") for v in ENV_NAMES.values())


def test_environment() -> None:
    env = {
        "AQUILA_HOST": "0.0.0.0",
        "AQUILA_PORT": "9000",
        "AQUILA_DATA": "/var/lib/aquila",
        "AQUILA_SEEDS": "a:1,b:2",
        "AQUILA_NODE_ID": "n1",
        "AQUILA_ADVERTISE": "node1:9000",
        "AQUILA_API_KEY": "key",
        "AQUILA_CLUSTER_SECRET": "secret",
        "AQUILA_FSYNC": "false",
        "AQUILA_MAX_BODY_BYTES": "2048",
        "AQUILA_TRAIN_MIN": "100",
        "AQUILA_RETRAIN_GROWTH": "2.5",
        "AQUILA_SEARCH_THREADS": "3",
        "AQUILA_LOG_LEVEL": "DEBUG",
        "UNRELATED": "x",
    }
    c = load_config({}, environ=env)
    assert c.host == "0.0.0.0"
    assert c.port == 9000
    assert c.data_dir == Path("/var/lib/aquila")
    assert c.seeds == ("a:1", "b:2")
    assert c.node_id == "n1"
    assert c.advertise == "node1:9000"
    assert c.addr == "node1:9000"
    assert c.api_key == "key" and c.cluster_secret == "secret"
    assert c.fsync is False
    assert c.max_body_bytes == 2048
    assert c.train_min == 100
    assert c.retrain_growth == 2.5
    assert c.search_threads == 3
    assert c.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("raw", "want"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("off", False)],
)
def test_boolean_environment(raw: str, want: bool) -> None:
    assert load_config({}, environ={"AQUILA_FSYNC": raw}).fsync is want


def test_empty_optional_env_is_unset() -> None:
    c = load_config({}, environ={"AQUILA_API_KEY": "", "AQUILA_NODE_ID": ""})
    assert c.api_key is None and c.node_id is None


def test_flags_override_environment() -> None:
    env = {"AQUILA_PORT": "9000", "AQUILA_HOST": "0.0.0.0", "AQUILA_API_KEY": "env-key"}
    flags: dict[str, Any] = {"port": 9100, "api_key": "flag-key", "host": None, "seeds": None}
    c = load_config(flags, environ=env)
    assert c.port == 9100
    assert c.api_key == "flag-key"
    assert c.host == "0.0.0.0"  # a flag not given (None) leaves the environment's value
    assert c.seeds == ()


def test_flags_as_strings_are_converted() -> None:
    c = load_config({"port": "9200", "data_dir": "/tmp/x", "seeds": "h:1"}, environ={})
    assert c.port == 9200 and c.data_dir == Path("/tmp/x") and c.seeds == ("h:1",)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("", ()),
        ("a:1", ("a:1",)),
        ("a:1,b:2", ("a:1", "b:2")),
        (" a:1 , b:2 ,", ("a:1", "b:2")),
        ("10.0.0.1:8470,[::1]:8470", ("10.0.0.1:8470", "[::1]:8470")),
    ],
)
def test_seeds_parsing(raw: str, want: tuple[str, ...]) -> None:
    assert load_config({}, environ={"AQUILA_SEEDS": raw}).seeds == want
    assert load_config({"seeds": raw}, environ={}).seeds == want


def test_seeds_as_a_list_flag() -> None:
    assert load_config({"seeds": ["a:1", "b:2"]}, environ={}).seeds == ("a:1", "b:2")


@pytest.mark.parametrize("seeds", ["nohost", "a:", ":1", "a:b", "a:0", "a:65536", "a:1,b"])
def test_bad_seeds(seeds: str) -> None:
    with pytest.raises(ValueError):
        load_config({"seeds": seeds}, environ={})
    with pytest.raises(ValueError, match="AQUILA_SEEDS|host:port"):
        load_config({}, environ={"AQUILA_SEEDS": seeds})


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        load_config({"port": port}, environ={})
    with pytest.raises(ValueError, match="port"):
        load_config({}, environ={"AQUILA_PORT": str(port)})


@pytest.mark.parametrize("raw", ["abc", "", "80.5", "8470x"])
def test_non_numeric_port_env_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="AQUILA_PORT"):
        load_config({}, environ={"AQUILA_PORT": raw})


def test_port_bounds_accepted() -> None:
    assert load_config({"port": 1}, environ={}).port == 1
    assert load_config({"port": 65535}, environ={}).port == 65535


@pytest.mark.parametrize(
    "env",
    [
        {"AQUILA_FSYNC": "maybe"},
        {"AQUILA_MAX_BODY_BYTES": "100"},
        {"AQUILA_TRAIN_MIN": "0"},
        {"AQUILA_RETRAIN_GROWTH": "1"},
        {"AQUILA_ADVERTISE": "no-port"},
        {"AQUILA_SNAPSHOT_INTERVAL_S": "soon"},
    ],
)
def test_bad_values(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        load_config({}, environ=env)


def test_config_is_frozen() -> None:
    c = load_config({}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]


# -- development and production mode ---------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("127.255.0.9", True), ("::1", True),
     ("[::1]", True), ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False),
     ("::", False), ("", False), ("10.0.0.5", False), ("128.0.0.1", False),
     ("aquila1", False), ("localhost.example.com", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "aquila1"])
def test_production_mode_needs_a_secret(host: str) -> None:
    with pytest.raises(ValueError, match="refusing to listen .* without a cluster secret") as info:
        load_config({"host": host}, environ={})
    assert "\n" not in str(info.value)
    # A secret, or an API key (which then serves as the secret), or --insecure lets it start.
    assert load_config({"host": host, "cluster_secret": "s"}, environ={}).peer_secret == "s"
    assert load_config({"host": host}, environ={"AQUILA_API_KEY": "k"}).peer_secret == "k"
    c = load_config({"host": host}, environ={"AQUILA_INSECURE": "true"})
    assert c.insecure and c.open_on_network and c.peer_secret is None
    # A read key is handed to clients: it never serves as the cluster secret.
    with pytest.raises(ValueError, match="without a cluster secret"):
        load_config({"host": host, "read_key": "r"}, environ={})


@pytest.mark.parametrize("other", ["api_key", "cluster_secret"])
def test_a_read_key_equal_to_a_writing_credential_is_refused(other: str) -> None:
    with pytest.raises(ValueError, match=f"read_key must differ from {other}"):
        load_config({"read_key": "same", other: "same"}, environ={})
    with pytest.raises(ValueError, match=f"read_key must differ from {other}"):
        load_config({}, environ={"AQUILA_READ_KEY": "same", f"AQUILA_{other.upper()}": "same"})
    c = load_config({"read_key": "r", other: "w"}, environ={})
    assert c.read_key == "r"


def test_development_mode_runs_open_on_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.7", "::1", "localhost"):
        c = load_config({"host": host}, environ={})
        assert c.peer_secret is None and not c.open_on_network and not c.insecure
