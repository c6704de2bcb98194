"""The bounds and parsers at the trust boundary, as tables and properties: checked numbers,
strings and lists, nesting depth, collection names and the paths built from them, host:port,
cluster-state entries, and the clock's refusal of implausible versions."""

from __future__ import annotations

import json
import os
import re
import string
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aquila.cluster.model.bounds import (
    MAX_EPOCH,
    MAX_OBSERVED_VERSION,
    BoundsError,
    checked_int,
    checked_list,
    checked_str,
    depth_exceeds,
)
from aquila.cluster.model.config_parse import format_hostport, parse_hostport, parse_seeds
from aquila.cluster.model.errors import BadRequest
from aquila.cluster.model.hlc import HybridClock
from aquila.cluster.model.spec import CollectionSpec, check_name
from aquila.cluster.state.entries import ClusterState, CollectionEntry, Moving
from aquila.node.storage.paths import collection_dir, inside

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None)


# --- checked values -----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "ok"), [
    (0, True), (10, True), (5, True), (-1, False), (11, False), (True, False), (False, False),
    (1.0, False), (1e300, False), ("1", False), (None, False), ([1], False), (2**64, False),
])
def test_checked_int_table(value: Any, ok: bool) -> None:
    if ok:
        assert checked_int(value, 0, 10, "x") == value
    else:
        with pytest.raises(BoundsError):
            checked_int(value, 0, 10, "x")


@PROPERTY
@given(st.integers(), st.integers(-(2**70), 2**70), st.integers(0, 2**70))
def test_checked_int_accepts_exactly_the_range(v: int, lo: int, width: int) -> None:
    hi = lo + width
    if lo <= v <= hi:
        assert checked_int(v, lo, hi, "x") == v
    else:
        with pytest.raises(BoundsError):
            checked_int(v, lo, hi, "x")


@PROPERTY
@given(st.floats(allow_nan=True) | st.booleans() | st.text() | st.none())
def test_checked_int_refuses_every_non_integer(v: Any) -> None:
    with pytest.raises(BoundsError):
        checked_int(v, -(2**80), 2**80, "x")


def test_checked_str_and_list() -> None:
    assert checked_str("ab", 2, "s") == "ab"
    for bad in ("abc", 1, None, b"ab"):
        with pytest.raises(BoundsError):
            checked_str(bad, 2, "s")
    with pytest.raises(BoundsError):
        checked_str("", 2, "s", min_chars=1)
    assert checked_list([1, 2], 2, "l") == [1, 2]
    for bad_list in ([1, 2, 3], (1,), "ab", None, {"a": 1}):
        with pytest.raises(BoundsError):
            checked_list(bad_list, 2, "l")


def reference_depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((reference_depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((reference_depth(x) for x in v), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=30,
)


@PROPERTY
@given(json_values, st.integers(0, 12))
def test_depth_exceeds_agrees_with_the_recursive_definition(v: Any, limit: int) -> None:
    assert depth_exceeds(v, limit) == (reference_depth(v) > limit)


def test_depth_of_very_deep_values_without_recursion() -> None:
    v: Any = 1
    for _ in range(100_000):
        v = [v]
    assert depth_exceeds(v, 32)
    assert not depth_exceeds(v, 100_000)
    assert not depth_exceeds({"a": {"b": [1, 2]}}, 3) and depth_exceeds({"a": {"b": [1]}}, 2)


# --- names and paths ------------------------------------------------------------------------

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


@pytest.mark.parametrize("name", ["a\n", "a\r\n", "\na", "..", ".", "/etc", "a/b", "a\\b", "",
                                  "x" * 65, "a b", "é", "a\x00", "%2e", 7, None])
def test_bad_names(name: Any) -> None:
    with pytest.raises(BadRequest):
        check_name(name)


@PROPERTY
@given(st.text(max_size=70) | st.from_regex(NAME_RE, fullmatch=True)
       | st.from_regex(NAME_RE, fullmatch=True).map(lambda s: s + "\n"))
def test_a_name_is_accepted_exactly_when_it_fully_matches(name: str) -> None:
    if NAME_RE.fullmatch(name):
        assert check_name(name) == name
    else:
        with pytest.raises(BadRequest):
            check_name(name)


@PROPERTY
@given(st.text(alphabet=string.printable + "é/.", max_size=20))
def test_collection_dirs_never_leave_the_root(tmp_path_factory: Any, name: str) -> None:
    root = tmp_path_factory.getbasetemp() / "root" / "collections"
    try:
        path = collection_dir(root, name)
    except BadRequest:
        return
    assert path.parent == root.resolve() and path.name == name


def test_inside_refuses_a_planted_symlink(tmp_path: Path) -> None:
    root = tmp_path / "collections"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "evil")
    with pytest.raises(BadRequest):
        inside(root, "evil")
    assert inside(root, "good") == root.resolve() / "good"
    for name in ("..", ".", "/tmp", "a/../..", ""):
        with pytest.raises(BadRequest):
            inside(root, name)


# --- host:port ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "want"), [
    ("a:1", ("a", 1)), ("127.0.0.1:8470", ("127.0.0.1", 8470)), ("[::1]:8470", ("::1", 8470)),
    ("aquila_1.example.com:65535", ("aquila_1.example.com", 65535)), ("h-1:80", ("h-1", 80)),
    ("[fe80::1%eth0.100]:80", ("fe80::1%eth0.100", 80)),
])
def test_good_host_ports(value: str, want: tuple[str, int]) -> None:
    assert parse_hostport(value) == want
    assert format_hostport(*want) == value


@pytest.mark.parametrize("value", [
    "a:1/p", "a:1#f", "a:1?q", "http://a:1", "u@a:1", " a:1", "a:1 ", "a :1", "a\t:1", "a:1\n",
    "a:0", "a:65536", "a:+1", "a:-1", "a:１", "a:", ":1", "a", "[::1:1", "::1:1", "[1.2.3.4]:1",
    "-a:1", "a-:1", "a..b:1", ".a:1", "a.:1", "x" * 64 + ":1", "a%2f:1", "[::1]:1/x", 5, None,
    "[fe80::1%\r\nX-Evil: 1]:8470", "[fe80::1%a b]:1", "[fe80::1%]:1",
])
def test_bad_host_ports(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_hostport(value)


hosts = st.one_of(
    st.from_regex(re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,10}[a-z0-9])?(?:\.[a-z0-9]{1,5}){0,3}"),
                  fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)


@PROPERTY
@given(hosts, st.integers(1, 65535))
def test_host_port_round_trip(host: str, port: int) -> None:
    assert parse_hostport(format_hostport(host, port)) == (host, port)


@PROPERTY
@given(hosts, st.integers(1, 65535), st.sampled_from(list(" \t\n/?#@") + ["%20", "://"]),
       st.booleans())
def test_host_port_with_anything_else_is_refused(host: str, port: int, junk: str,
                                                 before: bool) -> None:
    value = format_hostport(host, port)
    value = junk + value if before else value + junk
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_seeds() -> None:
    assert parse_seeds("a:1, b:2") == ["a:1", "b:2"]
    assert parse_seeds(["[::1]:1"]) == ["[::1]:1"]
    assert len(parse_seeds([f"h{i}:1" for i in range(32)])) == 32
    for bad in ([f"h{i}:1" for i in range(33)], [], "", ["a:1/x"], [1], None):
        with pytest.raises(BadRequest):
            parse_seeds(bad)


# --- cluster-state entries ------------------------------------------------------------------


def entry_json(**changes: Any) -> dict[str, Any]:
    spec = CollectionSpec.from_json({"name": "c", "dim": 4, "metric": "l2", "shards": 2,
                                     "replication": 1,
                                     "index": {"type": "flat", "nlist": None, "nprobe": 8}})
    e = CollectionEntry(spec, (("n1",), ("n2",)), 3, "n1", False,
                        (Moving("n1", "n2", 0.5, "n1"), None), "u1")
    return {**e.to_json(), **changes}


def test_a_valid_entry_decodes() -> None:
    e = CollectionEntry.from_json(entry_json())
    assert CollectionEntry.from_json(orjson.loads(orjson.dumps(e.to_json()))) == e


@pytest.mark.parametrize("changes", [
    {"epoch": MAX_EPOCH + 1}, {"epoch": -1}, {"epoch": 1e300}, {"epoch": "1"}, {"epoch": True},
    {"origin": ""}, {"origin": "x" * 129}, {"origin": 5}, {"deleted": 1}, {"uid": "u" * 65},
    {"uid": 3}, {"replicas": [["n1"], ["n2"], ["n3"]]}, {"replicas": [[""]]},
    {"replicas": [["n"] * 65]}, {"replicas": "n1"}, {"moving": [{"from": "n1"}]},
    {"moving": [{"from": "n1", "to": "n2", "progress": 2}]},
    {"moving": [{"from": "n1", "to": "n2", "progress": "x"}]}, {"moving": [None, None, None]},
    {"spec": {"name": "..", "dim": 4}}, {"spec": {"name": "c\n", "dim": 4}},
    {"spec": {"name": "c", "dim": 0}}, {"spec": {"name": "c", "dim": 4, "shards": 2**70}},
    {"spec": {"name": "c", "dim": 4, "evil": 1}}, {"spec": None},
])
def test_entries_out_of_bounds_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        CollectionEntry.from_json(entry_json(**changes))
    with pytest.raises(ValueError):
        ClusterState.decode_entries(json.dumps([entry_json(**changes)]).encode())


def test_the_epoch_cannot_pass_its_maximum() -> None:
    state = ClusterState()
    top = CollectionEntry.from_json(entry_json(epoch=MAX_EPOCH))
    state.merge([top])
    state.encode()  # still persists
    with pytest.raises(BoundsError):
        state.next_entry(top, "n1", deleted=True)


# --- the clock ------------------------------------------------------------------------------


def test_the_clock_does_not_adopt_implausible_versions() -> None:
    hlc = HybridClock(lambda: 1_000)
    hlc.observe(2**63 - 1)
    v = hlc.next()
    assert v == 1_000 << 16
    hlc.observe(MAX_OBSERVED_VERSION)
    assert hlc.next() == MAX_OBSERVED_VERSION + 1
    for _ in range(1000):
        assert hlc.next() < 2**63
