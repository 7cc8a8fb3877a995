"""The bus against a real nats-server: topology, dedup, and the single ack policy."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import pytest

from openrl.bus import messages as m
from openrl.bus import subjects
from openrl.bus.errors import InvalidRequest


def test_messages_round_trip_and_pack_arrays():
    import numpy as np

    tokens = np.arange(5, dtype=np.int32)
    fb = m.ForwardBackward(
        request_id="r", model_id="s:train:0", seq_id=3, loss_fn="cross_entropy", loss_fn_config={"beta": 0.1, "mode": "x"},
        data=[m.Datum(tokens=tokens.tobytes(), loss_fn_inputs={"weights": m.Tensor(dtype="float32", data=b"\0" * 20, shape=[5])})],
    )
    raw = m.encode(fb)
    back = m.decode(raw, m.TrainRequest)
    assert back == fb
    assert np.frombuffer(back.data[0].tokens, dtype=np.int32).tolist() == [0, 1, 2, 3, 4]
    assert b"pickle" not in raw and isinstance(raw, bytes)
    # the union is tagged: an OptimStep never decodes as a ForwardBackward
    assert type(m.decode(m.encode(m.OptimStep(request_id="r", model_id="x", seq_id=1)), m.TrainRequest)) is m.OptimStep
    with pytest.raises(msgspec.ValidationError):
        m.decode(m.encode(m.CreateModel(request_id="r", model_id="x", base_model="b")), m.TrainRequest)


def test_subject_tokens_are_safe_and_distinct():
    a, b = subjects.token("Qwen/Qwen3-0.6B"), subjects.token("Qwen/Qwen3-0_6B")
    assert a != b
    for t in (a, b, subjects.token("s-1:train:0"), subjects.token("a.b*c>d e")):
        assert not any(c in t for c in ". *>")
    assert subjects.token("s-1:train:0") == "s-1:train:0"  # readable when already safe
    assert subjects.kv_key("s-1:train:0") != subjects.kv_key("s-1_train_0")


async def test_ensure_is_idempotent(bus):
    await bus.ensure()
    await bus.ensure()
    info = await bus.js.stream_info(subjects.TRAIN_STREAM)
    assert info.config.duplicate_window == bus.cfg.duplicate_window_s


async def test_publish_with_same_msg_id_is_stored_once(bus):
    model = f"s-{uuid.uuid4().hex[:8]}:train:0"
    subj = subjects.train("dedup-base", model)
    msg = m.OptimStep(request_id="r1", model_id=model, seq_id=1)
    for _ in range(3):
        await bus.publish(subj, msg, msg_id=f"{model}-1")
    info = await bus.js.stream_info(subjects.TRAIN_STREAM, subjects_filter=subj)
    assert info.state.subjects == {subj: 1}


async def test_kv_create_only_once(bus):
    key = f"k-{uuid.uuid4().hex}"
    assert await bus.kv_create(bus.models, key, m.LoraSpec(rank=4))
    assert not await bus.kv_create(bus.models, key, m.LoraSpec(rank=8))
    assert (await bus.kv_get(bus.models, key, m.LoraSpec)).rank == 4
    assert await bus.kv_get(bus.models, "absent-" + key, m.LoraSpec) is None


async def test_ack_policy_ack_term_and_redeliver(bus):
    """ok → ack (once); undecodable / InvalidRequest → term (never again);
    any other exception → nak, redelivered until it succeeds."""
    base = f"ack-{uuid.uuid4().hex[:8]}"
    subj = subjects.train(base, "m")
    calls: dict[int, int] = {}
    stop = asyncio.Event()

    async def handle(msg: m.OptimStep) -> None:
        calls[msg.seq_id] = calls.get(msg.seq_id, 0) + 1
        if msg.seq_id == 2:
            raise InvalidRequest("bad")
        if msg.seq_id == 3 and calls[3] < 3:
            raise RuntimeError("transient")
        if calls.get(1) and calls.get(3, 0) >= 3:
            stop.set()

    await bus.js.publish(subj, b"\xff not msgpack")
    for seq in (1, 2, 3):
        await bus.publish(subj, m.OptimStep(request_id=f"r{seq}", model_id="m", seq_id=seq), msg_id=f"{base}-{seq}")
    task = asyncio.create_task(
        bus.consume(stream=subjects.TRAIN_STREAM, durable=f"t-{base}", filter_subject=subjects.train_all(base),
                    type_=m.TrainRequest, handle=handle, stop=stop, ack_wait_s=5)
    )
    await asyncio.wait_for(stop.wait(), 30)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert calls == {1: 1, 2: 1, 3: 3}
    info = await bus.js.consumer_info(subjects.TRAIN_STREAM, f"t-{base}")
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def test_close_without_a_server_stops_the_client_and_raises_nothing(tmp_path):
    """The server gone (and a write buffered for it): Bus.close closes the client at once, so it
    stops reconnecting, instead of raising ConnectionResetError or leaving it running."""
    from openrl.bus.client import Bus, BusConfig
    from openrl.bus.server import NatsServer

    server = NatsServer(tmp_path / "nats").start()  # open (no credentials): this test's alone
    b = await Bus.connect(BusConfig(url=server.url))
    server.kill()
    for _ in range(100):
        if not b.nc.is_connected:
            break
        await asyncio.sleep(0.05)
    assert not b.nc.is_connected
    await b.nc.publish(f"{subjects.PREFIX}.done.buffered", b"x")  # held for a reconnect that never comes
    started = time.monotonic()
    await b.close(timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert b.nc.is_closed
    server.stop()


async def test_close_is_bounded_when_a_subscription_cannot_drain(nats_server):
    """A subscription whose handler never returns would hold nats-py's drain for its own 30 s:
    Bus.close drains for at most its timeout, then closes (a process's shutdown stays bounded)."""
    from openrl.bus.client import Bus
    from stack_helpers import bus_config

    b = await Bus.connect(bus_config(nats_server.url))
    stuck = asyncio.Event()

    async def never_returns(msg) -> None:
        stuck.set()
        await asyncio.Event().wait()

    subject = f"{subjects.PREFIX}.done.close-test-{uuid.uuid4().hex[:8]}"
    await b.nc.subscribe(subject, cb=never_returns)
    for _ in range(3):
        await b.nc.publish(subject, b"x")
    await b.nc.flush()
    await asyncio.wait_for(stuck.wait(), 10)
    started = time.monotonic()
    await b.close(timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert b.nc.is_closed


async def test_kv_keys_sees_every_key_while_keys_are_rewritten(bus):
    """Heartbeats rewrite keys while `kv_keys` scans: each scan lists every live key once, not
    the deleted one, and leaves no consumer behind (a scan's ephemeral consumer is deleted)."""
    tag = uuid.uuid4().hex[:8]
    kv = bus.workers
    still = [f"kvscan-{tag}-still-{i}" for i in range(300)]
    beating = [f"kvscan-{tag}-beat-{i}" for i in range(4)]
    for k in still + beating + [f"kvscan-{tag}-gone"]:
        await kv.put(k, b"x")
    await kv.delete(f"kvscan-{tag}-gone")
    stream = f"KV_{kv._name}"
    consumers_before = (await bus.js.stream_info(stream)).state.consumer_count
    stop = asyncio.Event()

    async def beat(key: str) -> int:
        n = 0
        while not stop.is_set():
            await kv.put(key, str(n).encode())
            n += 1
            await asyncio.sleep(0.002)
        return n

    beaters = [asyncio.ensure_future(beat(k)) for k in beating]
    scans, misses = 0, []
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            keys = await bus.kv_keys(kv)
            scans += 1
            mine = [k for k in keys if k.startswith(f"kvscan-{tag}-")]
            if sorted(mine) != sorted(still + beating):
                misses.append(sorted(set(still + beating) ^ set(mine)))
    finally:
        stop.set()
        beats = await asyncio.gather(*beaters)
    assert min(beats) > 100 and scans > 50, (beats, scans)  # the keys really moved during the scans
    assert not misses, f"{len(misses)} of {scans} scans were wrong: {misses[:3]}"
    assert (await bus.js.stream_info(stream)).state.consumer_count <= consumers_before
    for k in still + beating:
        await kv.delete(k)


async def test_kv_keys_of_a_bucket_emptied_by_a_purge_is_quick(tmp_path):
    """A bucket whose messages are all gone (a purge, or every entry past its TTL) still has its
    last sequence number: listing it answers [] at once, without waiting for that message."""
    from openrl.bus.client import Bus, BusConfig
    from openrl.bus.server import NatsServer

    with NatsServer(tmp_path / "nats") as server:  # open (no credentials): this test's alone
        b = await Bus.connect(BusConfig(url=server.url))
        try:
            for i in range(3):
                await b.workers.put(f"w{i}", b"x")
            assert sorted(await b.kv_keys(b.workers)) == ["w0", "w1", "w2"]
            await b.js.purge_stream(f"KV_{b.workers._name}")
            started = time.monotonic()
            assert await b.kv_keys(b.workers) == []
            assert time.monotonic() - started < 0.5
        finally:
            await b.close()


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice():
    """`openrl up` and the tests start listeners on these: a port from the ephemeral range could
    be taken by an outgoing connection before the child binds it (a child that then failed to
    start with "address already in use")."""
    from openrl.bus.server import _ephemeral_range, free_port

    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if low > 20001:
        assert all(p < low for p in ports), [p for p in ports if p >= low]
