"""Rewarder processes (`openrl rewarder`) against a real nats-server: failures per item,
competing consumers, kill -9, SIGTERM, heartbeats, process names."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time

import pytest

from openrl.bus import subjects
from openrl.bus.messages import Future, ScoreRequest

from rewarder_helpers import HERE, item, result, rewarders, submit, unique, wait_heartbeat, workers  # noqa: F401 - fixtures
from stack_helpers import alive

pytestmark = pytest.mark.timeout(300)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


async def _wait_gone(pids, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        await asyncio.sleep(0.1)


async def test_each_failure_is_an_error_for_its_item_and_the_worker_keeps_serving(bus, rewarders):
    name = unique("chaos")
    proc = rewarders("chaos_rewards:chaos", name, "--concurrency", "2", "--timeout-s", "1.5", "--memory-mb", "256")
    await wait_heartbeat(bus, proc)
    # One request per failure, each followed by a healthy one, all in flight at once.
    failing = {"raise:a": "exception", "sleep:60": "timeout", "exit": "crashed", "kill": "crashed", "oom:2048": "memory"}
    rids = {}
    for completion in failing:
        rids[completion] = await submit(bus, name, [item(completion)])
        rids[f"after {completion}"] = await submit(bus, name, [item("ok:1")])
    for completion, kind in failing.items():
        score = (await result(bus, rids[completion]))["scores"][0]
        assert score["reward"] is None and score["error_kind"] == kind, score
        assert (await result(bus, rids[f"after {completion}"]))["scores"][0]["reward"] == 1.0
    # A request mixing good and failing items: every item keeps its place.
    mixed = await submit(bus, name, [item("ok:5"), item("kill"), item("raise:b"), item("ok:6")])
    scores = (await result(bus, mixed))["scores"]
    assert [s["reward"] for s in scores] == [5.0, None, None, 6.0]
    assert [s["error_kind"] for s in scores] == [None, "crashed", "exception", None]
    assert "boom b" in scores[2]["error"]
    # Still the same process, still serving, with a full pool.
    later = [await submit(bus, name, [item(f"ok:{i}")]) for i in range(10)]
    assert [(await result(bus, rid))["scores"][0]["reward"] for rid in later] == [float(i) for i in range(10)]
    assert proc.proc.poll() is None
    assert len(_children(proc.pid)) == 2


async def test_heartbeat_has_the_reward_name_and_a_busy_fraction_and_children_show_in_ps(bus, rewarders):
    name = unique("busy")
    proc = rewarders("chaos_rewards:chaos", name, "--concurrency", "2")
    info = await wait_heartbeat(bus, proc)
    assert (info.kind, info.reward_name, info.concurrency, info.pid) == ("rewarder", name, 2, proc.pid)
    assert info.busy_fraction < 0.2
    rids = [await submit(bus, name, [item("sleep:4"), item("sleep:4")])]
    await asyncio.sleep(3.5)
    busy = next(w for w in await workers(bus) if w.pid == proc.pid)
    assert busy.busy_fraction > 0.4, busy
    await result(bus, rids[0])
    # ps: the rewarder and each worker process say what they are.
    assert open(f"/proc/{proc.pid}/comm").read().strip() == "openrl-rewarder"
    assert "openrl rewarder --fn chaos_rewards:chaos --name " + name in open(f"/proc/{proc.pid}/cmdline").read().replace("\0", " ")
    kids = _children(proc.pid)
    assert len(kids) == 2
    for pid in kids:
        assert f"-m openrl.rewarder {name} worker chaos_rewards:chaos" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
        assert open(f"/proc/{pid}/comm").read().strip() == "openrl-rewardfn"


async def test_kill_9_of_one_of_two_rewarders_during_100_requests_scores_each_once(bus, rewarders, tmp_path):
    name = unique("counted")
    log = tmp_path / "calls.log"
    a = rewarders("chaos_rewards:counted", name, "--concurrency", "2")
    b = rewarders("chaos_rewards:counted", name, "--concurrency", "2")
    await wait_heartbeat(bus, a)
    await wait_heartbeat(bus, b)
    a_workers = _children(a.pid)
    rids = {}
    # Each done notice carries the stored future: a request recorded twice would be announced
    # with two different futures; one announced again (the dead rewarder may have stored it
    # and died before announcing) repeats the same bytes.
    done_pings: collections.defaultdict[str, set[bytes]] = collections.defaultdict(set)

    async def on_done(msg):
        done_pings[msg.subject.removeprefix(f"{subjects.PREFIX}.done.")].add(msg.data)

    sub = await bus.nc.subscribe(f"{subjects.PREFIX}.done.>", cb=on_done)
    for i in range(100):
        rids[i] = await submit(bus, name, [item("", reference={"i": i, "sleep": 0.1, "log": str(log)})])
    # Let both work for a while, then kill -9 one of them mid-request.
    deadline = time.monotonic() + 30
    while not log.exists() or len(log.read_text().split()) < 20:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    os.kill(a.pid, signal.SIGKILL)
    a.proc.wait()
    await _wait_gone(a_workers)  # its workers die with it (PDEATHSIG)
    results = {i: await result(bus, rid, timeout_s=120) for i, rid in rids.items()}
    await asyncio.sleep(0.5)  # any late second recording would have pinged by now
    await sub.unsubscribe()
    assert {i: r["scores"][0]["reward"] for i, r in results.items()} == {i: float(i) for i in range(100)}
    # Each request was recorded exactly once ...
    assert {subjects.token(rid) for rid in rids.values()} == set(done_pings), "a request was never announced"
    assert {len(v) for v in done_pings.values()} == {1}, {k: v for k, v in done_pings.items() if len(v) != 1}
    assert all(data for v in done_pings.values() for data in v), "a score's done notice carries its future"
    # ... both rewarders scored, and the survivor took over what the dead one held.
    by_worker = collections.Counter(r["worker_id"] for r in results.values())
    assert len(by_worker) == 2, by_worker
    # The reward function ran once per item, except for the few the dead rewarder was
    # holding when it died (at most 2 x its concurrency in flight): those ran again.
    calls = collections.Counter(int(x) for x in log.read_text().split())
    assert set(calls) == set(range(100))
    assert sum(n - 1 for n in calls.values()) <= 4, calls


async def test_a_finished_request_is_never_scored_again(bus, rewarders, tmp_path):
    name = unique("once")
    log = tmp_path / "calls.log"
    proc = rewarders("chaos_rewards:counted", name, "--concurrency", "1")
    await wait_heartbeat(bus, proc)
    ref = {"i": 7, "log": str(log)}
    rid = await submit(bus, name, [item("", reference=ref)])
    assert (await result(bus, rid))["scores"][0]["reward"] == 7.0
    # The same request again, past JetStream's duplicate window (another msg id): a redelivery.
    # It is announced again with the stored future (the rewarder that stored it may have died
    # before announcing it, and a waiter would hear nothing until its next re-read).
    notices: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_notice(msg):
        notices.put_nowait(msg.data)

    sub = await bus.nc.subscribe(subjects.done(rid), cb=on_notice)
    await bus.publish(subjects.reward(name), ScoreRequest(request_id=rid, reward_name=name, items=[item("", reference=ref)]), msg_id=rid + "-again")
    again = await asyncio.wait_for(notices.get(), 15)
    await sub.unsubscribe()
    assert again == (await bus.futures.get(subjects.kv_key(rid))).value
    # A request published straight to the bus (a recipe, a replayed recording: no future was
    # accepted for it) is scored all the same, its result created; a later copy is not rescored.
    direct = unique("direct")
    copy = ScoreRequest(request_id=direct, reward_name=name, items=[item("", reference={"i": 9, "log": str(log)})])
    await bus.publish(subjects.reward(name), copy, msg_id=unique("copy"))
    assert (await result(bus, direct))["scores"][0]["reward"] == 9.0
    await bus.publish(subjects.reward(name), copy, msg_id=unique("copy"))
    # Garbage on the queue is dropped (terminated) and the worker keeps going.
    await bus.js.publish(subjects.reward(name), b"\xc1 not msgpack")
    after = await submit(bus, name, [item("", reference={"i": 8, "log": str(log)})])
    assert (await result(bus, after))["scores"][0]["reward"] == 8.0
    await asyncio.sleep(0.5)
    assert log.read_text().split() == ["7", "9", "8"]
    info = await bus.js.consumer_info(subjects.REWARD_STREAM, subjects.rewarder_consumer(name))
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_the_workers_are_shared_fairly_between_the_requests_owners(bus, rewarders, tmp_path):
    """The rewarder hands its workers out by the owner of each request's future: key a's three
    60-item requests and key b's one of 20 are all held at once (2 workers: 4 in flight), and
    from b's first call to its last a's calls are about as many as b's, not three times as many."""
    name = unique("fair")
    log = tmp_path / "calls.log"
    proc = rewarders("chaos_rewards:counted", name, "--concurrency", "2")
    await wait_heartbeat(bus, proc)

    def items(first: int, n: int) -> list:
        return [item("", reference={"i": first + i, "sleep": 0.01, "log": str(log)}) for i in range(n)]

    a = [await submit(bus, name, items(100 * r, 60), owner="key-a") for r in range(3)]
    while not log.exists() or len(log.read_text().split()) < 10:
        await asyncio.sleep(0.01)
    b = await submit(bus, name, items(1000, 20), owner="key-b")
    assert [s["reward"] for s in (await result(bus, b))["scores"]] == [1000.0 + i for i in range(20)]
    for rid in a:
        await result(bus, rid)
    calls = [int(x) for x in log.read_text().split()]
    positions = [i for i, c in enumerate(calls) if c >= 1000]
    a_between = sum(1 for c in calls[positions[0] : positions[-1]] if c < 1000)
    assert a_between <= 32, (a_between, calls)  # 19-20; with the owners not passed, 54


async def test_sigterm_hands_in_flight_requests_back_at_once(bus, rewarders):
    name = unique("term")
    first = rewarders("chaos_rewards:chaos", name, "--concurrency", "2")
    await wait_heartbeat(bus, first)
    kids = _children(first.pid)
    rids = [await submit(bus, name, [item("sleep:3")]) for _ in range(2)]
    await asyncio.sleep(1.0)  # taken by `first`, half-way through
    started = time.monotonic()
    assert first.stop(timeout_s=15) == 0
    assert time.monotonic() - started < 5
    await _wait_gone(kids)
    assert not [w for w in await workers(bus) if w.pid == first.pid], "heartbeat left behind"
    assert [(await bus.kv_get(bus.futures, rid, Future)).state for rid in rids] == ["pending", "pending"]
    # Handed back with a nak, not left to ack_wait (10 s): a new rewarder gets them straight away.
    second = rewarders("chaos_rewards:chaos", name, "--concurrency", "2")
    started = time.monotonic()
    results = [await result(bus, rid, timeout_s=30) for rid in rids]
    assert time.monotonic() - started < 8.5
    assert [r["scores"][0]["reward"] for r in results] == [1.0, 1.0]
    assert {r["worker_id"] for r in results} == {(await wait_heartbeat(bus, second)).worker_id}


def test_a_reward_function_that_cannot_load_stops_the_rewarder_with_a_clear_error(nats_server):
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    for fn, message in [("broken_rewards:fn", "this reward module is broken on purpose"), ("nonsense", "module:function")]:
        out = subprocess.run([sys.executable, "-m", "openrl", "rewarder", "--fn", fn, "--nats-url", nats_server.url],
                             capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        assert out.returncode != 0
        assert message in out.stderr, out.stderr[-3000:]
