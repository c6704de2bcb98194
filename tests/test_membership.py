"""The pure member table: memberlist precedence rules, refutation, left semantics."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aquila.cluster.membership.messages import Alive, Dead, MemberRow, Suspect
from aquila.cluster.membership.table import MemberTable, State, TableParams

PARAMS = TableParams(
    suspicion_mult=4, suspicion_max_timeout_mult=6, probe_interval=1.0, dead_node_reclaim_time=0.0
)


def table_with(state: State = State.ALIVE, inc: int = 5, others: int = 0) -> MemberTable:
    """Local node `me` plus member `x` (at x:1) in `state` at incarnation `inc`."""
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    t.apply_alive(Alive(inc, "x", "x:1"), 0.0)
    for i in range(others):
        t.apply_alive(Alive(1, f"o{i}", f"o{i}:1"), 0.0)
    if state == State.SUSPECT:
        t.apply_suspect(Suspect(inc, "x", "o"), 0.0)
    elif state == State.DEAD:
        t.apply_dead(Dead(inc, "x", "o"), 0.0)
    elif state == State.LEFT:
        t.apply_dead(Dead(inc, "x", "x"), 0.0)
    m = t.get("x")
    assert m is not None and m.state == state and m.incarnation == inc
    return t


A, S, D, L = State.ALIVE, State.SUSPECT, State.DEAD, State.LEFT

CASES = [
    # (state before, message about x, state after, incarnation after, gossiped?)
    (A, Alive(4, "x", "x:1"), A, 5, False),  # older alive: ignored
    (A, Alive(5, "x", "x:1"), A, 5, False),  # same alive: ignored
    (A, Alive(6, "x", "x:1"), A, 6, True),
    (A, Suspect(4, "x", "o"), A, 5, False),  # stale accusation
    (A, Suspect(5, "x", "o"), S, 5, True),
    (A, Suspect(7, "x", "o"), S, 7, True),
    (A, Dead(4, "x", "o"), A, 5, False),
    (A, Dead(5, "x", "o"), D, 5, True),
    (A, Dead(5, "x", "x"), L, 5, True),  # dead from itself = graceful leave
    (S, Alive(5, "x", "x:1"), S, 5, False),  # a refutation must carry a higher incarnation
    (S, Alive(6, "x", "x:1"), A, 6, True),
    (S, Dead(5, "x", "o"), D, 5, True),
    (S, Suspect(5, "o2", "o"), S, 5, False),  # unknown node: ignored
    (D, Alive(5, "x", "x:1"), D, 5, False),
    (D, Alive(6, "x", "x:1"), A, 6, True),  # a dead node rejoins with a higher incarnation
    (D, Suspect(9, "x", "o"), D, 5, False),  # only alive nodes become suspect
    (D, Dead(9, "x", "o"), D, 5, False),  # already dead
    (L, Alive(5, "x", "x:1"), L, 5, False),  # left is final...
    (L, Suspect(9, "x", "o"), L, 5, False),
    (L, Dead(9, "x", "o"), L, 5, False),  # ...and is never turned into dead
    (L, Alive(6, "x", "x:1"), A, 6, True),  # ...unless it rejoins with a higher incarnation
    (L, Alive(6, "x", "x:2"), A, 6, True),  # a left node may come back at a new address
    (D, Alive(6, "x", "x:2"), D, 5, False),  # a dead one may not (reclaim time 0 = never)
    (A, Alive(9, "x", "x:2"), A, 5, False),  # address conflict with a live node
]


@pytest.mark.parametrize(("before", "msg", "after", "inc", "gossiped"), CASES)
def test_precedence(
    before: State, msg: Alive | Suspect | Dead, after: State, inc: int, gossiped: bool
) -> None:
    t = table_with(before)
    effects = t.apply(msg, 1.0)
    m = t.get("x")
    assert m is not None
    assert (m.state, m.incarnation) == (after, inc)
    assert bool(effects.broadcasts) == gossiped
    assert bool(effects.changed) == gossiped


def test_dead_node_reclaim_after_configured_time() -> None:
    t = MemberTable("me", "me:1", {}, 0.0, TableParams(4, 6, 1.0, dead_node_reclaim_time=10.0))
    t.apply_alive(Alive(1, "x", "x:1"), 0.0)
    t.apply_dead(Dead(1, "x", "o"), 0.0)
    t.apply_alive(Alive(2, "x", "x:2"), 5.0)
    assert t.get("x").state == State.DEAD  # type: ignore[union-attr]
    t.apply_alive(Alive(1, "x", "x:2"), 11.0)  # a restarted node: any incarnation will do
    m = t.get("x")
    assert m is not None and (m.state, m.addr) == (State.ALIVE, "x:2")


@pytest.mark.parametrize("kind", ["suspect", "dead"])
@pytest.mark.parametrize("claim", [1, 2, 7])
def test_refutation_beats_the_claim(kind: str, claim: int) -> None:
    t = MemberTable("me", "me:1", {"zone": "a"}, 0.0, PARAMS)
    before = t.local.incarnation
    msg = Suspect(claim, "me", "o") if kind == "suspect" else Dead(claim, "me", "o")
    effects = t.apply(msg, 1.0)
    assert effects.refuted
    assert t.local.state == State.ALIVE
    assert t.local.incarnation == max(before + 1, claim + 1)
    assert effects.broadcasts == [Alive(t.local.incarnation, "me", "me:1", {"zone": "a"})]


def test_stale_accusation_about_us_is_ignored() -> None:
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    t.update_meta({"v": 1})
    t.update_meta({"v": 2})  # incarnation 3 now
    effects = t.apply(Suspect(2, "me", "o"), 1.0)
    assert not effects.refuted and t.local.incarnation == 3


@pytest.mark.parametrize("kind", ["suspect", "dead"])
def test_stale_accusation_about_us_is_answered_with_our_alive(kind: str) -> None:
    # Its sender missed our refutation: announce again, same incarnation, so it hears us
    # before its own timer declares us dead. About another member, nothing happens.
    t = MemberTable("me", "me:1", {"z": 1}, 0.0, PARAMS)
    t.update_meta({"z": 2})  # incarnation 2
    msg = Suspect(1, "me", "o") if kind == "suspect" else Dead(1, "me", "o")
    effects = t.apply(msg, 1.0)
    assert effects.broadcasts == [Alive(2, "me", "me:1", {"z": 2})]
    assert not effects.refuted and not effects.changed and t.local.incarnation == 2
    other = table_with(State.ALIVE, inc=5)
    stale = Suspect(4, "x", "o") if kind == "suspect" else Dead(4, "x", "o")
    assert other.apply(stale, 1.0).broadcasts == []
    t.leave(2.0)
    assert t.apply(msg, 3.0).broadcasts == []  # leaving: we do not come back


def test_alive_about_us_with_other_meta_is_refuted() -> None:
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    assert not t.apply(Alive(1, "me", "me:1", {}), 1.0).refuted  # our own echo
    effects = t.apply(Alive(1, "me", "me:1", {"x": 1}), 1.0)
    assert effects.refuted and t.local.incarnation == 2


def test_leave_marks_us_left_and_is_not_refuted() -> None:
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    effects = t.leave(1.0)
    assert t.local.state == State.LEFT
    assert effects.broadcasts == [Dead(1, "me", "me")]
    assert not t.apply(Suspect(5, "me", "o"), 2.0).refuted


def test_suspicion_gets_k_and_timeouts_from_cluster_size() -> None:
    t = table_with(State.ALIVE, others=48)  # 50 live including us
    t.apply_suspect(Suspect(5, "x", "o0"), 100.0)
    s = t.suspicion("x")
    assert s is not None
    assert s.k == 2  # suspicion_mult - 2
    assert s.lo == pytest.approx(4 * 1.69897, abs=1e-3)
    assert s.hi == pytest.approx(6 * s.lo)
    assert s.deadline() == pytest.approx(100.0 + s.hi, abs=1e-3)  # ms-truncated
    # Independent confirmations shorten the timeout and are re-gossiped once each.
    assert t.apply_suspect(Suspect(5, "x", "o1"), 101.0).broadcasts
    assert not t.apply_suspect(Suspect(5, "x", "o1"), 101.0).broadcasts
    assert t.apply_suspect(Suspect(5, "x", "o2"), 101.0).broadcasts
    assert t.next_deadline() == pytest.approx(100.0 + s.lo, abs=1e-3)
    assert not t.expire(100.0 + s.lo - 0.01).changed
    effects = t.expire(100.0 + s.lo)
    assert [m.state for m in effects.changed] == [State.DEAD]
    assert effects.broadcasts == [Dead(5, "x", "me")]
    assert t.next_deadline() is None


def test_small_cluster_expects_no_confirmations() -> None:
    t = table_with(State.ALIVE)  # 2 live nodes: nobody else can confirm
    t.apply_suspect(Suspect(5, "x", "me"), 0.0)
    s = t.suspicion("x")
    assert s is not None and s.k == 0 and s.deadline() == pytest.approx(4.0)


def test_refutation_clears_suspicion() -> None:
    t = table_with(State.SUSPECT)
    t.apply_alive(Alive(6, "x", "x:1"), 1.0)
    assert t.suspicion("x") is None and t.next_deadline() is None


def test_merge_rows_treats_remote_dead_as_suspect() -> None:
    t = table_with(State.ALIVE)
    t.merge_rows(
        [
            MemberRow("x", "x:1", "dead", 5, {}),
            MemberRow("y", "y:1", "alive", 3, {"a": 1}),
            MemberRow("me", "me:1", "left", 4, {}),  # a past life of ours: refute it
        ],
        1.0,
    )
    assert t.get("x").state == State.SUSPECT  # type: ignore[union-attr]
    y = t.get("y")
    assert y is not None and y.state == State.ALIVE and y.meta == {"a": 1}
    assert t.local.state == State.ALIVE and t.local.incarnation == 5


# --- properties ---------------------------------------------------------------------------

updates = st.lists(
    st.tuples(st.sampled_from(["alive", "suspect", "dead", "leave"]), st.integers(1, 8)),
    max_size=20,
)


def make(kind: str, inc: int) -> Alive | Suspect | Dead:
    if kind == "alive":
        return Alive(inc, "x", "x:1")
    if kind == "suspect":
        return Suspect(inc, "x", "o")
    return Dead(inc, "x", "x" if kind == "leave" else "o")


@given(updates)
def test_incarnation_never_decreases(seq: list[tuple[str, int]]) -> None:
    t = table_with(State.ALIVE, inc=1)
    last = 1
    for i, (kind, inc) in enumerate(seq):
        t.apply(make(kind, inc), float(i))
        m = t.get("x")
        assert m is not None and m.incarnation >= last
        last = m.incarnation


@given(updates)
def test_left_is_final_without_higher_alive(seq: list[tuple[str, int]]) -> None:
    t = table_with(State.LEFT, inc=4)
    for i, (kind, inc) in enumerate(seq):
        t.apply(make(kind, inc), float(i))
    m = t.get("x")
    assert m is not None
    if not any(k == "alive" and inc > 4 for k, inc in seq):
        assert (m.state, m.incarnation) == (State.LEFT, 4)


@given(st.lists(st.integers(1, 6), max_size=5), st.integers(1, 6))
def test_gossip_order_does_not_change_the_outcome(alives: list[int], dead: int) -> None:
    # One death among any alives: the verdict does not depend on arrival order. (With two
    # deaths it can: a dead node keeps its first death's incarnation, as in memberlist.)
    seq = [("alive", i) for i in alives] + [("dead", dead)]
    outcomes = set()
    for perm in itertools.islice(itertools.permutations(seq), 120):
        t = table_with(State.ALIVE, inc=1)
        for i, (kind, inc) in enumerate(perm):
            t.apply(make(kind, inc), float(i))
        outcomes.add(t.get("x").state)  # type: ignore[union-attr]
    assert len(outcomes) <= 1
    top_alive = max([inc for k, inc in seq if k == "alive"], default=1)
    expect_dead = any(k == "dead" and inc >= top_alive for k, inc in seq)
    if outcomes:
        assert outcomes == {State.DEAD if expect_dead else State.ALIVE}


@given(st.sampled_from(["suspect", "dead"]), st.integers(0, 1000), st.integers(0, 5))
def test_local_node_always_refutes(kind: str, claim: int, bumps: int) -> None:
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    for i in range(bumps):
        t.update_meta({"i": i})
    before = t.local.incarnation
    msg = Suspect(claim, "me", "o") if kind == "suspect" else Dead(claim, "me", "o")
    effects = t.apply(msg, 1.0)
    assert t.local.state == State.ALIVE
    if claim >= before:
        assert effects.refuted and t.local.incarnation > claim
    else:
        assert not effects.refuted and t.local.incarnation == before


many_updates = st.lists(
    st.tuples(
        st.sampled_from(["alive", "suspect", "dead", "leave", "expire"]),
        st.integers(0, 5),
        st.integers(1, 4),
    ),
    max_size=40,
)


@given(many_updates, st.integers(0, 2**32 - 1))
def test_live_count_and_sampling_match_a_scan(
    seq: list[tuple[str, int, int]], seed: int
) -> None:
    # num_live is kept as a counter and sample() picks by rejection from an id list: both
    # must agree with a scan of the members after any sequence of updates.
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    for i, (kind, who, inc) in enumerate(seq):
        node = f"n{who}" if who else "me"
        if kind == "alive":
            t.apply(Alive(inc, node, f"{node}:1"), float(i))
        elif kind == "suspect":
            t.apply(Suspect(inc, node, "o"), float(i))
        elif kind in ("dead", "leave"):
            t.apply(Dead(inc, node, node if kind == "leave" else "o"), float(i))
        else:
            t.expire(float(i) + 100.0)
        members = t.members()
        assert t.num_live() == sum(1 for m in members if not m.dead_or_left)
        assert t.ids() == [m.id for m in members]
    rng = random.Random(seed)
    alive = {m.id for m in t.members() if m.state == State.ALIVE and m.id != "me"}
    for k in range(4):
        got = [m.id for m in t.sample(rng, k, lambda m: m.state == State.ALIVE)]
        assert len(got) == len(set(got)) == min(k, len(alive)) and set(got) <= alive


def test_sampling_is_uniform() -> None:
    t = MemberTable("me", "me:1", {}, 0.0, PARAMS)
    for i in range(20):
        t.apply(Alive(1, f"n{i}", f"n{i}:1"), 0.0)
    t.apply(Dead(1, "n0", "o"), 0.0)
    rng = random.Random(1)
    seen = {f"n{i}": 0 for i in range(1, 20)}
    for _ in range(6_000):
        for m in t.sample(rng, 3, lambda m: m.state == State.ALIVE):
            seen[m.id] += 1
    # 18,000 picks over 19 members: 947 each expected; a biased pick would be far off.
    assert all(800 < c < 1_100 for c in seen.values()), seen
