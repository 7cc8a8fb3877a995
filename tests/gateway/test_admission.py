"""Admission by share (openrl/gateway/admission.py, docs/limits.md): a key that holds far more
of what is in flight than another active key waits at the gateway before its request is read.

The rule on `Admission` itself (a settable clock), then through a gateway replica on the
session stack's bus with the real `sql` rewarder: a key with slow score requests in flight
waits while a lighter key is active, and the lighter key never does.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from stack_helpers import BASE_MODEL

from openrl.gateway.admission import REFUSALS_BURST, REFUSALS_PER_S, STALE_S, SWEEP_MAX, Admission, AdmissionConfig
from openrl.gateway.http import Backlogged

pytestmark = pytest.mark.timeout(300)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def admission(clock: Clock, **kw) -> Admission:
    return Admission(AdmissionConfig(**{"per_key": 2, "capacity": 0, "slack": 2.0, "half_life_s": 5.0, **kw}), clock=clock)


async def send(adm: Admission, owner: str, kind: str, rid: str) -> None:
    """One request admitted and accepted: in flight until `finished(rid)`."""
    async with adm.admit(owner, kind) as slot:
        slot.track(rid)


async def test_a_key_far_above_an_active_lighter_key_waits_and_others_do_not():
    clock = Clock()
    adm = admission(clock)
    for i in range(4):
        await send(adm, "heavy", "sample", f"h{i}")
    clock.t += 10  # heavy has held 4 in flight for 10 s
    assert not adm.must_wait("sample", "heavy")  # alone: nothing is held back that nobody else wants
    await send(adm, "light", "sample", "l0")
    assert adm.must_wait("sample", "heavy")
    assert not adm.must_wait("sample", "light")  # the lighter key never waits
    assert not adm.must_wait("score", "heavy")  # pools are apart unless shared
    adm.finished("l0")
    assert adm.must_wait("sample", "heavy")  # light finished a moment ago: it is between requests
    clock.t += 1.5
    assert not adm.must_wait("sample", "heavy")  # light has gone quiet


async def test_keys_using_about_as_much_never_wait_for_each_other():
    clock = Clock()
    adm = admission(clock)
    for owner in ("a", "b"):
        for i in range(3):
            await send(adm, owner, "train", f"{owner}{i}")
    clock.t += 30
    assert adm.occupancy("train", "a") == pytest.approx(adm.occupancy("train", "b"))
    assert not adm.must_wait("train", "a") and not adm.must_wait("train", "b")


async def test_a_key_always_has_its_first_per_key_requests_at_once():
    clock = Clock()
    adm = admission(clock, per_key=3)
    await send(adm, "light", "score", "l0")
    clock.t += 0.5
    for i in range(3):
        assert not adm.must_wait("score", "heavy")
        await send(adm, "heavy", "score", f"h{i}")
    clock.t += 5
    assert adm.must_wait("score", "heavy")
    adm.finished("h0")  # back under per_key
    assert not adm.must_wait("score", "heavy")


async def test_a_key_keeps_its_even_share_of_the_capacity_among_the_active_keys():
    clock = Clock()
    adm = admission(clock, capacity=12)
    for i in range(5):
        await send(adm, "heavy", "sample", f"h{i}")
    await send(adm, "light", "sample", "l0")
    clock.t += 5
    assert not adm.must_wait("sample", "heavy")  # 5 < 12 / 2 keys active
    await send(adm, "heavy", "sample", "h5")
    assert adm.must_wait("sample", "heavy")  # 6: its share
    await send(adm, "third", "sample", "t0")
    adm.finished("h5")
    adm.finished("h4")
    assert adm.must_wait("sample", "heavy")  # 4 = 12 / 3 keys active
    adm.finished("h3")
    assert not adm.must_wait("sample", "heavy")


async def test_shared_pool_counts_every_kind_together():
    clock = Clock()
    adm = admission(clock, shared=True)
    for i in range(4):
        adm.count("heavy", "train", f"t{i}")  # training is counted, never held
    clock.t += 10
    await send(adm, "light", "sample", "l0")
    assert adm.must_wait("all", "heavy")
    assert adm.pool("score") == adm.pool("sample") == "all"


async def test_a_key_in_flight_but_stale_is_not_active():
    clock = Clock()
    adm = admission(clock)
    await send(adm, "stuck", "train", "s0")  # e.g. waiting for a seq_id its client never sends
    for i in range(4):
        await send(adm, "heavy", "train", f"h{i}")
    clock.t += 10
    assert adm.must_wait("train", "heavy")
    clock.t += STALE_S
    assert not adm.must_wait("train", "heavy")


async def test_a_waiting_request_goes_in_when_the_lighter_key_goes_quiet():
    clock = Clock()
    adm = admission(clock)
    for i in range(4):
        await send(adm, "heavy", "sample", f"h{i}")
    clock.t += 10
    await send(adm, "light", "sample", "l0")
    waiting = asyncio.create_task(send(adm, "heavy", "sample", "h4"))
    await asyncio.sleep(0.2)
    assert not waiting.done() and adm.held == 1
    adm.finished("l0")
    clock.t += 2  # light quiet
    await asyncio.wait_for(waiting, 1)
    assert adm.in_flight("sample", "heavy") == 5


async def test_the_longest_hold_is_bounded_and_the_waiting_count_too():
    clock = Clock()
    adm = admission(clock, max_hold_s=0.3, max_waiting=2)
    for i in range(4):
        await send(adm, "heavy", "sample", f"h{i}")
    clock.t += 10
    await send(adm, "light", "sample", "l0")
    started = time.monotonic()
    waiting = [asyncio.create_task(send(adm, "heavy", "sample", f"w{i}")) for i in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(Backlogged, match="2 requests waiting"):
        await send(adm, "heavy", "sample", "w2")  # a 429: nothing was admitted for it
    await asyncio.gather(*waiting)  # after max_hold_s they go in
    assert 0.25 < time.monotonic() - started < 2
    assert adm.in_flight("sample", "heavy") == 6


async def test_a_refused_request_leaves_and_a_lost_notice_is_swept():
    clock = Clock()
    adm = admission(clock)
    with pytest.raises(ValueError):
        async with adm.admit("k", "score"):
            raise ValueError("refused before accept")  # never tracked: leaves at once
    assert adm.in_flight("score", "k") == 0
    await send(adm, "k", "score", "r0")
    await send(adm, "k", "score", "r1")
    clock.t += 40

    async def pending(rid: str) -> bool:
        return rid == "r1"

    assert await adm.sweep(pending) == 1  # r0's done notice was lost: its future says so
    assert adm.in_flight("score", "k") == 1
    adm.finished("r1")
    adm.finished("r1")  # a second notice changes nothing
    assert adm.in_flight("score", "k") == 0


async def test_a_sweep_reads_back_at_most_sweep_max_futures_oldest_first():
    clock = Clock()
    adm = admission(clock)
    for i in range(SWEEP_MAX + 44):
        adm.count("k", "train", f"r{i:04d}")
        clock.t += 0.01
    clock.t += 40
    read: list[str] = []

    async def pending(rid: str) -> bool:
        read.append(rid)
        return False

    assert await adm.sweep(pending) == SWEEP_MAX
    assert read == [f"r{i:04d}" for i in range(SWEEP_MAX)]
    assert await adm.sweep(pending) == 44 and adm.in_flight("train", "k") == 0


async def test_off_when_per_key_is_zero():
    clock = Clock()
    adm = admission(clock, per_key=0)
    for i in range(8):
        await send(adm, "heavy", "sample", f"h{i}")
    clock.t += 10
    await send(adm, "light", "sample", "l0")
    assert not adm.must_wait("sample", "heavy")


async def test_a_key_answered_many_429s_cools_down_while_another_key_is_active():
    clock = Clock()
    adm = admission(clock)
    for _ in range(int(REFUSALS_BURST) + 4):
        adm.refused("noisy")
    assert adm.refusals("noisy") == pytest.approx(REFUSALS_BURST + 4)
    started = time.monotonic()
    await adm.cool("noisy")  # nobody else is active: no wait
    assert time.monotonic() - started < 0.1 and adm.cooled == 0
    await send(adm, "other", "sample", "o0")
    started = time.monotonic()
    await adm.cool("noisy")
    assert time.monotonic() - started == pytest.approx(4 / REFUSALS_PER_S, abs=0.2)
    await adm.cool("other")  # the other key has no refusals
    assert adm.cooled == 1
    clock.t += 1.0  # the bucket drains: 4 below where it was, at the burst
    assert adm.refusals("noisy") == pytest.approx(REFUSALS_BURST)
    await adm.cool("noisy")
    assert adm.cooled == 1


# -- through a gateway replica, with the real sql rewarder


SLOW = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"


def slow_items(seconds: float) -> dict:
    ref = {"schema": "CREATE TABLE t (a INTEGER);", "gold": "SELECT 1", "timeout_s": seconds}
    return {"reward_name": "sql", "items": [{"completion": SLOW, "reference": ref}]}


QUICK = {"reward_name": "exact_match", "items": [{"completion": "a", "reference": "a"}]}


def test_a_heavy_key_waits_at_the_gateway_while_a_lighter_key_is_active(stack, admission_gateway):
    heavy, light = (httpx.Client(base_url=f"{admission_gateway}/api/v1", headers={"X-API-Key": stack.new_key(n)}, timeout=60)
                    for n in ("heavy", "light"))  # fmt: skip
    for _ in range(2):  # heavy's first per_key requests go at once: 4 s each on the sql workers
        r = heavy.post("/score", json=slow_items(4))
        assert r.status_code == 200, r.text
    time.sleep(1.0)
    r = light.post("/score", json=slow_items(6))  # light is active now, holding less
    assert r.status_code == 200, r.text

    def timed(client: httpx.Client) -> float:
        started = time.monotonic()
        r = client.post("/score", json=QUICK)
        assert r.status_code == 200, r.text
        return time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(timed, heavy)
        time.sleep(0.3)
        light_s = timed(light)  # sent while heavy's waits: goes at once
        held_s = held.result()
    # heavy's quick request waited for its own slow ones to finish (about 3 s after it was
    # sent); with admission off it is answered as fast as light's.
    assert held_s > 1.5, (held_s, light_s)
    assert light_s < 1.0, (held_s, light_s)


def test_a_key_that_ignores_429s_cools_down_before_its_bodies_are_read(stack, admission_gateway):
    """A key sending far-ahead optim_steps (each a 429 that records nothing) as fast as it can,
    while another key is active: after the burst its requests wait before they are read; the
    other key's never do."""
    noisy = httpx.Client(base_url=f"{admission_gateway}/api/v1", headers={"X-API-Key": stack.new_key("noisy")}, timeout=60)
    other = httpx.Client(base_url=f"{admission_gateway}/api/v1", headers={"X-API-Key": stack.new_key("calm")}, timeout=60)
    sid = noisy.post("/create_session", json={}).json()["session_id"]
    created = noisy.post("/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": BASE_MODEL, "lora_config": {"rank": 1}})
    assert created.status_code == 200, created.text
    model_id = created.json()["model_id"]
    r = other.post("/score", json=slow_items(8))  # the other key is active for the whole test
    assert r.status_code == 200, r.text
    far = {"model_id": model_id, "seq_id": 10**6, "adam_params": {"learning_rate": 1e-4}}
    took = []
    for _ in range(int(REFUSALS_BURST) + 6):
        started = time.monotonic()
        r = noisy.post("/optim_step", json=far)
        took.append(time.monotonic() - started)
        assert r.status_code == 429 and "too far ahead" in r.text, r.text
    assert max(took[: int(REFUSALS_BURST) - 1]) < 0.2, took  # the burst goes at once
    assert sum(took[int(REFUSALS_BURST) + 1 :]) > 4 * 0.5 / REFUSALS_PER_S, took  # then about 1 / REFUSALS_PER_S each
    started = time.monotonic()
    assert other.post("/score", json=QUICK).status_code == 200
    assert time.monotonic() - started < 0.5
