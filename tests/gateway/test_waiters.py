"""Long-poll waiters: a finished future is answered promptly even when its core-NATS `done`
notification never reaches the gateway.

Both tests make the periodic KV re-read (`recheck_s`) longer than the poll, so only the
mechanism under test can get the finished future out well before the poll's deadline
(where `wait` reads KV one last time).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from openrl.bus.client import Bus, BusConfig
from openrl.bus.messages import Future
from openrl.bus.server import NatsServer
from openrl.gateway.futures import Waiters

pytestmark = pytest.mark.timeout(120)

POLL_S = 20.0


def _pending() -> Future:
    return Future(request_id=f"req-{uuid.uuid4().hex}", owner="o", request_type="Sample", created_at=time.time())


def _done(fut: Future) -> Future:
    return Future(request_id=fut.request_id, owner=fut.owner, request_type=fut.request_type, state="done",
                  payload=b"{}", finished_at=time.time())  # fmt: skip


async def test_missed_notification_is_recovered_on_reconnect(tmp_path):
    """The future finishes with no notification (as if sent while the gateway was away); the
    gateway's next reconnect makes every waiter re-read KV."""
    server = NatsServer(tmp_path / "nats").start()
    bus = other = None
    try:
        bus = await Bus.connect(BusConfig(url=server.url))
        other = await Bus.connect(BusConfig(url=server.url))
        waiters = Waiters(bus, recheck_s=60)
        await waiters.start()
        fut = _pending()
        await bus.kv_put(bus.futures, fut.request_id, fut)
        poll = asyncio.create_task(waiters.wait(fut.request_id, POLL_S))
        await asyncio.sleep(0.5)
        await other.kv_put(other.futures, fut.request_id, _done(fut))  # stored, never announced
        await asyncio.sleep(0.5)
        assert not poll.done(), "nothing announced the result: the poll must still be waiting"

        server.stop()
        server.start()  # same port and store: both clients reconnect
        started = time.monotonic()
        got = await asyncio.wait_for(poll, POLL_S + 10)
        assert got is not None and got.state == "done", "the reconnect did not wake the waiter"
        assert time.monotonic() - started < POLL_S / 2
        assert waiters.pending == 0
        await waiters.stop()
        assert waiters.wake_all not in bus.on_messages_lost
    finally:
        for b in (bus, other):
            if b is not None:
                await b.close()
        server.stop()


async def test_notification_during_the_kv_read_is_not_lost(nats_server):
    """The future finishes, and its notification arrives, while the waiter's read (which saw
    it pending) is still in flight: the waiter must look again rather than sleep."""
    from stack_helpers import bus_config

    bus = await Bus.connect(bus_config(nats_server.url))
    try:
        waiters = Waiters(bus, recheck_s=60)
        await waiters.start()
        fut = _pending()
        await bus.kv_put(bus.futures, fut.request_id, fut)
        real_get, reads = bus.kv_get, []

        async def racing_get(kv, key, type_):
            value = await real_get(kv, key, type_)
            reads.append(value.state)
            if len(reads) == 1:  # the first read saw "pending"; the worker finishes right now
                await bus.finish_future(_done(fut))
                await asyncio.sleep(0.3)  # the notification is delivered before the read returns
            return value

        bus.kv_get = racing_get
        started = time.monotonic()
        got = await asyncio.wait_for(waiters.wait(fut.request_id, POLL_S), POLL_S + 10)
        assert reads[0] == "pending"
        assert got.state == "done"
        assert time.monotonic() - started < POLL_S / 2, "the notification was lost: the waiter slept to its deadline"
        await waiters.stop()
    finally:
        await bus.close()


async def test_the_notification_carries_a_small_future(nats_server):
    """A small finished future rides in its done notification: the waiter answers from it
    with one KV read (the one that saw it pending), and a large one is read back from KV. A
    notification whose future names another request wakes the waiter but is not its answer."""
    from stack_helpers import bus_config

    from openrl.bus.client import DONE_INLINE_MAX
    from openrl.bus import subjects
    from openrl.bus.messages import encode

    bus = await Bus.connect(bus_config(nats_server.url))
    try:
        waiters = Waiters(bus, recheck_s=60)
        await waiters.start()
        for size, reads in ((2, 1), (DONE_INLINE_MAX + 1, 2)):
            fut = _pending()
            await bus.kv_put(bus.futures, fut.request_id, fut)
            waiters.reads = 0
            poll = asyncio.create_task(waiters.wait(fut.request_id, POLL_S))
            await asyncio.sleep(0.3)
            assert waiters.reads == 1 and not poll.done()
            done = Future(request_id=fut.request_id, owner="o", request_type="Sample", state="done", payload=b"x" * size, finished_at=time.time())
            await bus.finish_future(done)
            got = await asyncio.wait_for(poll, POLL_S / 2)
            assert got == done
            assert waiters.reads == reads, f"a {size}-byte future took {waiters.reads} KV reads"

        # Another request's future on this one's subject (as a confused worker might send):
        # the waiter reads KV, where this request is still pending, and waits on.
        fut, other = _pending(), _pending()
        await bus.kv_put(bus.futures, fut.request_id, fut)
        waiters.reads = 0
        poll = asyncio.create_task(waiters.wait(fut.request_id, POLL_S))
        await asyncio.sleep(0.3)
        await bus.nc.publish(subjects.done(fut.request_id), encode(_done(other)))
        await asyncio.sleep(0.3)
        assert waiters.reads == 2 and not poll.done(), "a future of another request answered this one"
        await bus.finish_future(_done(fut))
        got = await asyncio.wait_for(poll, POLL_S / 2)
        assert got.request_id == fut.request_id and got.state == "done"
        await waiters.stop()
    finally:
        await bus.close()


async def test_another_owners_future_is_answered_at_once(nats_server):
    """With `owner`, a pending future of another owner comes back at once (the gateway
    answers it as unknown), not after the poll's wait."""
    from stack_helpers import bus_config

    bus = await Bus.connect(bus_config(nats_server.url))
    try:
        waiters = Waiters(bus, recheck_s=60)
        await waiters.start()
        fut = _pending()
        await bus.kv_put(bus.futures, fut.request_id, fut)
        started = time.monotonic()
        got = await asyncio.wait_for(waiters.wait(fut.request_id, POLL_S, owner="someone-else"), POLL_S + 10)
        assert got.owner == "o" and got.state == "pending"
        assert time.monotonic() - started < 2.0
        assert waiters.pending == 0
        await waiters.stop()
    finally:
        await bus.close()
