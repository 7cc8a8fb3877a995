"""Dead letters, against a real nats-server: a message that keeps failing (or whose workers
keep dying) is moved to OPENRL_DLQ with the reason and its future fails instead of hanging;
`openrl dlq list` shows it and `openrl dlq retry` runs it again."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest

from openrl.bus import dlq, subjects
from openrl.bus.client import DEAD_LETTERED, Bus
from openrl.bus.messages import Future, SampleRequest

pytestmark = pytest.mark.timeout(120)


def request(base: str) -> SampleRequest:
    return SampleRequest(request_id=f"dlq-{uuid.uuid4().hex[:8]}", sampler_id="s", base_model=base, prompt=b"\x01\x00\x00\x00", num_samples=1)


async def accept(bus: Bus, rid: str) -> None:
    await bus.kv_put(bus.futures, rid, Future(request_id=rid, owner="key-1", request_type="Sample", created_at=time.time()))


async def wait_future(bus: Bus, rid: str, state: str, timeout_s: float = 60) -> Future:
    deadline = time.monotonic() + timeout_s
    while True:
        fut = await bus.kv_get(bus.futures, rid, Future)
        if fut is not None and fut.state == state:
            return fut
        assert time.monotonic() < deadline, fut
        await asyncio.sleep(0.2)


async def run_consumer(bus: Bus, base: str, handle, **kw) -> tuple[asyncio.Task, asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(
        bus.consume(
            stream=subjects.SAMPLE_STREAM,
            durable=subjects.sampler_consumer(base),
            filter_subject=subjects.sample(base),
            type_=SampleRequest,
            handle=handle,
            on_dead=lambda msg, reason: bus.fail_dead(msg.request_id, "Sample", reason),
            stop=stop,
            **kw,
        )
    )
    return task, stop


def letters_for(letters, rid: str):
    return [x for x in letters if x.request_id == rid]


async def test_a_message_whose_handler_keeps_failing_is_dead_lettered_and_its_future_fails(bus):
    base = f"m-{uuid.uuid4().hex[:6]}"
    calls = []

    async def boom(msg):
        calls.append(msg.request_id)
        raise RuntimeError("the GPU caught fire")

    msg = request(base)
    await accept(bus, msg.request_id)
    task, stop = await run_consumer(bus, base, boom, max_deliver=2, ack_wait_s=5)
    await bus.publish(subjects.sample(base), msg, msg_id=msg.request_id)
    fut = await wait_future(bus, msg.request_id, "failed")
    stop.set()
    await task
    assert len(calls) == 2  # handled max_deliver times, never again
    assert fut.category == "server" and fut.error.startswith(DEAD_LETTERED) and "RuntimeError: the GPU caught fire" in fut.error
    assert fut.owner == "key-1"
    [letter] = letters_for(await dlq.list_dead(bus), msg.request_id)
    assert letter.stream == subjects.SAMPLE_STREAM and letter.subject == subjects.sample(base) and letter.delivered == 3
    assert "the GPU caught fire" in letter.reason
    info = await bus.js.consumer_info(subjects.SAMPLE_STREAM, subjects.sampler_consumer(base))
    assert info.num_pending == 0 and info.num_ack_pending == 0  # gone from the work queue


async def test_a_message_whose_workers_keep_dying_is_dead_lettered(bus):
    """Workers that take the message and die (never ack): after max_deliver deliveries the next
    worker dead-letters it instead of dying too."""
    base = f"m-{uuid.uuid4().hex[:6]}"
    msg = request(base)
    await accept(bus, msg.request_id)
    await bus.publish(subjects.sample(base), msg, msg_id=msg.request_id)
    from nats.js import api

    durable = subjects.sampler_consumer(base)
    await bus.js.add_consumer(
        subjects.SAMPLE_STREAM,
        api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=1.0, filter_subject=subjects.sample(base)),
    )
    sub = await bus.js.pull_subscribe(subjects.sample(base), durable=durable, stream=subjects.SAMPLE_STREAM)
    for _ in range(2):  # two workers take it and die
        [raw] = await sub.fetch(1, timeout=5)
        assert raw.metadata.num_delivered == _ + 1
    await sub.unsubscribe()
    await asyncio.sleep(1.2)  # the second one's ack wait runs out

    handled = []

    async def fine(m):
        handled.append(m)

    task, stop = await run_consumer(bus, base, fine, max_deliver=2, ack_wait_s=1.0)
    fut = await wait_future(bus, msg.request_id, "failed")
    stop.set()
    await task
    assert not handled
    assert "died or stalled" in fut.error


async def test_dlq_list_and_retry_from_the_command_line(bus, nats_server):
    base = f"m-{uuid.uuid4().hex[:6]}"
    broken = True
    done = []

    async def flaky(m):
        if broken:
            raise ValueError("reward service down")
        done.append(m.request_id)
        await bus.finish_future(Future(request_id=m.request_id, owner="key-1", request_type="Sample", state="done", payload=b"{}"))

    msg = request(base)
    await accept(bus, msg.request_id)
    task, stop = await run_consumer(bus, base, flaky, max_deliver=1, ack_wait_s=5)
    await bus.publish(subjects.sample(base), msg, msg_id=msg.request_id)
    await wait_future(bus, msg.request_id, "failed")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "openrl", "dlq", *args, "--nats-url", nats_server.url], capture_output=True, text=True, timeout=60)

    listed = cli("list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = [x for x in json.loads(listed.stdout) if x["request_id"] == msg.request_id]
    assert "reward service down" in letter["reason"]
    human = cli("list")
    assert msg.request_id in human.stdout and "reward service down" in human.stdout

    broken = False  # the operator fixed the cause
    retried = cli("retry", str(letter["id"]))
    assert retried.returncode == 0, retried.stderr
    fut = await wait_future(bus, msg.request_id, "done")
    assert fut.error == "" and done == [msg.request_id]
    assert not letters_for(await dlq.list_dead(bus), msg.request_id)  # removed from the DLQ
    stop.set()
    await task

    missing = cli("retry", "999999")
    assert missing.returncode != 0 and "no dead letter 999999" in missing.stderr and "Traceback" not in missing.stderr
