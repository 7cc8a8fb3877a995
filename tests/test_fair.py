"""openrl/fair.py: start-time fair queuing between keys, by the cost each key has run."""

from __future__ import annotations

from openrl.fair import FairShare


def run_all(share: FairShare, ready: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Everything in `ready` ((key, cost), arrival order), in the order it would run."""
    ready, ran = list(ready), []
    while ready:
        key, cost = ready.pop(share.pick(ready, key=lambda r: r[0]))
        share.charge(key, cost)
        ran.append((key, cost))
    return ran


def test_a_key_that_ran_a_big_request_waits_until_the_others_have_run_as_much():
    share = FairShare()
    ready = [("hostile", 8192)] * 3 + [(f"c{i}", 16) for i in range(4)] * 2
    ran = run_all(share, ready)
    assert ran[0] == ("hostile", 8192)  # first come, nothing owed yet
    assert [k for k, _ in ran[1:9]] == ["c0", "c1", "c2", "c3"] * 2  # everyone else before its second
    assert [k for k, _ in ran[9:]] == ["hostile", "hostile"]  # work-conserving: nobody else waits


def test_equal_keys_alternate_and_keep_their_own_order():
    share = FairShare()
    ready = [("a", 10, 1), ("a", 10, 2), ("a", 10, 3), ("b", 10, 1), ("b", 10, 2)]
    ran = []
    while ready:
        item = ready.pop(share.pick(ready, key=lambda r: r[0]))
        share.charge(item[0], item[1])
        ran.append((item[0], item[2]))
    assert ran == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]


def test_an_idle_key_rejoins_at_the_current_virtual_time_with_no_credit():
    share = FairShare()
    for _ in range(100):  # "busy" runs alone for a long time
        share.charge("busy", 100)
    assert share.vtime("idle") == share.now == 9900  # the start of busy's last request
    # The idle key is not owed 100 requests' worth: it and busy now alternate.
    ran = run_all(share, [("busy", 100)] * 3 + [("idle", 100)] * 3)
    assert [k for k, _ in ran] == ["idle", "busy", "idle", "busy", "idle", "busy"]


def test_a_weight_divides_the_cost():
    share = FairShare(weights={"gold": 2.0})
    ran = run_all(share, [("gold", 100)] * 4 + [("plain", 100)] * 2)
    assert [k for k, _ in ran] == ["gold", "plain", "gold", "gold", "plain", "gold"]


def test_keys_behind_the_virtual_time_are_forgotten_past_the_bound():
    share = FairShare(remember=8)
    for i in range(100):  # a hundred keys run once each, then one of them again
        share.charge(f"k{i}", 1)
    share.charge("k0", 1)  # starts at 1: every other key is behind the virtual time now
    share.charge("k1", 1)
    assert set(share._vt) == {"k0", "k1"}  # only keys ahead of the virtual time are kept
    assert share.vtime("k5") == share.now  # forgotten: rejoins at the current time, as it would anyway
