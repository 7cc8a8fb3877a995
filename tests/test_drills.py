"""Hung-worker drills: SIGSTOP a sampler or a rewarder while it holds requests.

A stopped process sends no in-progress acks, so after the consumer's ack_wait (10 s) its
requests are redelivered to the other process of its kind. Each drill checks that every
request completes while the victim is still stopped, that each future is finished exactly
once (the futures the `openrl.done.<id>` pings carry, including after the victim wakes up
and finishes the work it was doing when it stopped), and that after SIGCONT the victim
serves new work in the same process.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from stack_helpers import API_KEY, BASE_MODEL
from openrl.bus import subjects
from test_shutdown import Proc, _result, _score, drill_rewarders, wait_for  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(300)

ACK_WAIT_S = 10  # the samplers' and rewarders' consumers


class DonePings:
    """The `openrl.done.<id>` pings on the bus, from a subscriber in its own thread. A ping
    carries the stored future (these are small), so `of` counts the distinct futures announced:
    a request finished twice is announced with two; one announced again (a worker that finds it
    finished elsewhere repeats the notice, in case the one that finished it died before
    announcing) repeats the same bytes."""

    def __init__(self, nats_url: str):
        self.counts: collections.defaultdict[str, set[bytes]] = collections.defaultdict(set)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(nats_url),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "could not subscribe to openrl.done.>"

    async def _run(self, nats_url: str) -> None:
        import nats

        from stack_helpers import nats_options

        nc = await nats.connect(nats_url, **nats_options())
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        async def on_done(msg):
            self.counts[msg.subject].add(msg.data)

        await nc.subscribe(subjects.DONE_ALL, cb=on_done)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def of(self, request_id: str) -> int:
        announced = self.counts[subjects.done(request_id)]
        assert b"" not in announced, f"{request_id}: a done notice without its future"
        return len(announced)

    def settled(self, request_ids: list[str], timeout_s: float = 10.0) -> dict[str, int]:
        """The count of each request once every one has been announced at least once. A result
        is readable from the store a moment before its ping arrives (the future is stored, then
        announced), so a count read right after the result can still be 0."""
        try:
            wait_for(lambda: all(self.of(rid) for rid in request_ids), timeout_s)
        except TimeoutError:
            pass  # the counts say which were never announced
        return {rid: self.of(rid) for rid in request_ids}

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def _metric(url: str, name: str, **labels) -> float:
    from test_observability import parse, total

    with urllib.request.urlopen(url, timeout=5) as r:
        return total(parse(r.read().decode()), name, **labels)


def _metrics_url(stack, role: str) -> str:
    return json.loads((stack.data_dir / "run" / "stack.json").read_text())["metrics"][role]


def _asample(url: str, session_id: str, seq_id: int, max_tokens: int) -> str:
    payload = {
        "sampling_session_id": session_id, "seq_id": seq_id, "num_samples": 1, "type": "sample",
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3, 4, 5, 6]}]},
        "sampling_params": {"max_tokens": max_tokens, "temperature": 1.0, "seed": seq_id, "stop": []},
    }  # fmt: skip
    r = httpx.post(f"{url}/api/v1/asample", json=payload, headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _sample_result(url: str, rid: str, timeout_s: float) -> bytes:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.post(f"{url}/api/v1/retrieve_future", headers={"X-API-Key": API_KEY}, json={"request_id": rid}, timeout=60)
        if r.status_code == 200:
            assert r.headers["content-type"].startswith("application/x-protobuf"), r.text  # a sample, not an error
            return r.content
        assert r.status_code == 408, r.text
    raise TimeoutError(rid)


def test_sigstop_sampler_its_requests_move_on_and_finish_once(stack):
    victim_role, victim = "sampler-0", stack.pid("sampler-0")
    victim_metrics = _metrics_url(stack, victim_role)
    other_metrics = _metrics_url(stack, "sampler-1")
    session = stack.service_client().create_sampling_client(base_model=BASE_MODEL).result()._sampling_session_id
    pings = DonePings(stack.nats_url)
    try:
        with ThreadPoolExecutor(8) as pool:
            held = pool.submit(wait_for, lambda: _metric(victim_metrics, "openrl_messages_in_flight", stream="OPENRL_SAMPLE") > 0, 60, 0.01)
            rids = list(pool.map(lambda seq: _asample(stack.url, session, seq, max_tokens=64), range(1, 33)))
            held.result()
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            results = {rid: _sample_result(stack.url, rid, 120) for rid in rids}
            all_done_s = time.monotonic() - stopped
            # Everything finished while the victim was stopped: the other sampler did its part.
            assert stack.pid(victim_role) == victim
            assert pings.settled(rids) == {rid: 1 for rid in rids}
        finally:
            os.kill(victim, signal.SIGCONT)
        # Awake, the victim finishes what it was decoding when it stopped; that must not
        # finish those futures a second time. Then it serves new work, in the same process.
        acked = _metric(victim_metrics, "openrl_messages_total", stream="OPENRL_SAMPLE", outcome="ack")
        other_acked = _metric(other_metrics, "openrl_messages_total", stream="OPENRL_SAMPLE", outcome="ack")
        seq = 100
        deadline = time.monotonic() + 60
        while _metric(victim_metrics, "openrl_messages_total", stream="OPENRL_SAMPLE", outcome="ack") <= acked:
            assert time.monotonic() < deadline, "the woken sampler served nothing new"
            more = [_asample(stack.url, session, seq + i, max_tokens=4) for i in range(6)]
            seq += 6
            for rid in more:
                _sample_result(stack.url, rid, 60)
        # It did finish some of them again, found them recorded, and recorded nothing.
        wait_for(lambda: "sample_already_recorded" in (stack.data_dir / "logs" / f"{victim_role}.log").read_text(), 30, 0.2)
        time.sleep(1.0)  # the pings of anything the victim was still finishing
        assert stack.pid(victim_role) == victim
        assert {rid: pings.of(rid) for rid in rids} == {rid: 1 for rid in rids}
        # And the stored results did not change under the clients' feet.
        assert {rid: _sample_result(stack.url, rid, 10) for rid in rids} == results
    finally:
        pings.close()
    assert other_acked >= 1
    print(f"sampler SIGSTOP: {len(rids)} requests done {all_done_s:.1f} s after the stop (ack_wait {ACK_WAIT_S} s)")


def test_sigstop_rewarder_its_requests_move_on_and_finish_once(stack, drill_rewarders):
    victim, other = drill_rewarders
    pings = DonePings(stack.nats_url)
    try:
        rids = [_score(stack.url, [{"completion": "sleep:3"}, {"completion": "ok:0.5"}]) for _ in range(6)]
        wait_for(lambda: victim.metric("openrl_messages_in_flight", stream="OPENRL_REWARD") > 0, 30)
        os.kill(victim.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            results = [_result(stack.url, rid) for rid in rids]
            all_done_s = time.monotonic() - stopped
            assert pings.settled(rids) == {rid: 1 for rid in rids}
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        assert all([s["reward"] for s in r["scores"]] == [1.0, 0.5] for r in results), results
        # The stopped victim recorded nothing: every result is the other rewarder's.
        assert all(r["worker_id"].endswith(f"-{other.proc.pid}") for r in results), results
        # Awake, it finishes the calls it was making, finds them recorded (compare-and-set)
        # and records nothing; then, with the other rewarder gone, it scores new work itself.
        wait_for(lambda: victim.events("score_already_recorded"), 30, every_s=0.2)
        code, _ = other.sigterm()
        assert code == 0
        later = [_score(stack.url, [{"completion": "ok:0.25"}]) for _ in range(3)]
        for rid in later:
            r = _result(stack.url, rid, 60)
            assert r["worker_id"].endswith(f"-{victim.proc.pid}") and r["scores"][0]["reward"] == 0.25, r
        time.sleep(1.0)
        assert {rid: pings.of(rid) for rid in rids + later} == {rid: 1 for rid in rids + later}
        assert [_result(stack.url, rid) for rid in rids] == results
    finally:
        pings.close()
    assert victim.proc.poll() is None
    print(f"rewarder SIGSTOP: 6 requests done {all_done_s:.1f} s after the stop (ack_wait {ACK_WAIT_S} s)")

