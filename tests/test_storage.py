"""Storage that stays bounded (docs/storage.md): objects read and copied in chunks, stream
limits, the train log purged below each model's newest snapshot, unnamed sampler weights
collected by the retention policy, and a long RL loop whose store stays under a stated bound."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import tracemalloc
import uuid

import pytest

from openrl.bus import objects
from sdk_helpers import assert_logprobs_equal, logprobs, sdk_steps, training_client

MiB = 1024 * 1024


def _name(what: str) -> str:
    return f"test-storage/{what}-{uuid.uuid4().hex[:8]}"


# -- objects in chunks (the bus fixture's real nats-server)


async def test_an_object_much_larger_than_a_chunk_streams_back_byte_for_byte(bus):
    blob = os.urandom(5 * MiB + 12345)  # 40 chunks and a partial one
    name = _name("big")
    await bus.objects.put(name, blob)
    size, source = await objects.open_object(bus.js, bus.objects, name)
    parts = [c async for c in source]
    assert size == len(blob)
    assert len(parts) > 40 and max(map(len, parts)) <= 128 * 1024
    assert b"".join(parts) == blob
    await objects.delete(bus.objects, name)


async def test_reading_and_copying_hold_one_chunk_not_the_object(bus):
    """tracemalloc peak while streaming / copying a 24 MiB object stays a small fraction of it
    (nats-py's own get() holds the whole object, which this would catch)."""
    blob = os.urandom(24 * MiB)
    src, dst = _name("src"), _name("dst")
    await bus.objects.put(src, blob)
    del blob
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        n = 0
        async for chunk in objects.chunks(bus.js, bus.objects, src):
            n += len(chunk)
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        copied = await objects.copy(bus.js, bus.objects, src, dst)
        copy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        whole = len((await bus.objects.get(src)).data)  # the library's way, for contrast
        get_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == copied == whole == 24 * MiB
    assert read_peak < 4 * MiB and copy_peak < 4 * MiB, (read_peak, copy_peak)
    assert get_peak > 24 * MiB  # the measurement can see a whole object when one is held
    assert (await bus.objects.get(dst)).data == (await bus.objects.get(src)).data
    for name in (src, dst):
        await objects.delete(bus.objects, name)


async def test_a_missing_object_is_gone_before_anything_is_read_and_copied(bus):
    with pytest.raises(objects.GONE):
        await objects.open_object(bus.js, bus.objects, _name("absent"))
    with pytest.raises(objects.GONE):
        await objects.copy(bus.js, bus.objects, _name("absent"), _name("never"))


async def test_an_object_replaced_while_read_ends_truncated(bus):
    name = _name("replaced")
    await bus.objects.put(name, os.urandom(2 * MiB))
    _, source = await objects.open_object(bus.js, bus.objects, name)
    await anext(source)
    await bus.objects.put(name, b"new")  # purges the old chunks
    with pytest.raises(objects.Truncated):
        async for _ in source:
            pass
    await objects.delete(bus.objects, name)


async def test_delete_leaves_no_tombstone(bus):
    name = _name("tomb")
    await bus.objects.put(name, b"x" * 1000)
    before = (await bus.js.stream_info(objects._stream(bus.objects))).state.messages
    assert await objects.delete(bus.objects, name)
    after = (await bus.js.stream_info(objects._stream(bus.objects))).state.messages
    assert after == before - 2  # its one chunk and its meta message
    assert not await objects.delete(bus.objects, name)
    with pytest.raises(objects.GONE):
        await bus.objects.get_info(name, show_deleted=True)


# -- stream limits


async def test_streams_whose_old_entries_are_safe_to_lose_have_limits_and_the_others_none(bus):
    from openrl.bus import subjects
    from nats.js import api

    from openrl.bus.client import DLQ_MAX_BYTES, WORK_MAX_AGE_S

    cfg = {s: (await bus.js.stream_info(s)).config for s in (subjects.TRAIN_STREAM, subjects.SAMPLE_STREAM, subjects.REWARD_STREAM,
                                                                subjects.CREATE_STREAM, subjects.DLQ_STREAM)}  # fmt: skip
    for work in (subjects.SAMPLE_STREAM, subjects.REWARD_STREAM, subjects.CREATE_STREAM):
        assert cfg[work].max_age == WORK_MAX_AGE_S
        assert WORK_MAX_AGE_S <= bus.cfg.futures_ttl_s  # never dropped while its future is readable
    assert cfg[subjects.DLQ_STREAM].max_bytes == DLQ_MAX_BYTES
    assert cfg[subjects.DLQ_STREAM].discard in ("old", api.DiscardPolicy.OLD)
    # The train log is recovery's input: no limit may drop an entry a snapshot does not cover.
    train = cfg[subjects.TRAIN_STREAM]
    assert (train.max_age or 0) == 0 and train.max_bytes in (None, -1) and train.max_msgs in (None, -1)
    assert train.max_msgs_per_subject in (None, -1)


# -- against a stack (`openrl up` with --snapshot-every 4)


async def _with_bus(stack, fn):
    from openrl.bus.client import Bus
    from stack_helpers import bus_config

    bus = await Bus.connect(bus_config(stack.nats_url, name="test-storage"))
    try:
        return await fn(bus)
    finally:
        await bus.close()


def _log_seq_ids(stack, model_id: str) -> list[int]:
    """The seq_ids still on the model's training log, in stream order."""
    from openrl.bus.messages import ModelRecord
    from openrl.trainer import recovery

    async def read(bus):
        rec = await bus.kv_get(bus.models, model_id, ModelRecord)
        entries, _ = await recovery.read_log(bus, rec)
        return sorted(entries)

    return asyncio.run(_with_bus(stack, read))


def _object_exists(stack, name: str) -> bool:
    async def exists(bus):
        try:
            await bus.objects.get_info(name)
        except objects.GONE:
            return False
        return True

    return asyncio.run(_with_bus(stack, exists))


def _wait(cond, timeout_s: float, what: str, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (last := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)
    return last


def test_the_train_log_is_purged_below_the_newest_snapshot_and_recovery_stays_exact(stack, data):
    """Snapshots every 4 requests: the log keeps only what follows the newest one. A trainer
    killed after a purge rebuilds the model from that snapshot and the rest of the log, and the
    run ends with the weights of a run that was never interrupted."""
    _, tc = training_client(stack, seed=171)
    _, clean = training_client(stack, seed=171)
    batches = [data[(2 * i) % 8 : (2 * i) % 8 + 2] for i in range(8)]
    sdk_steps(clean, batches)
    sdk_steps(tc, batches[:6])  # 12 requests: snapshots after seq 4, 8 and 12
    # The snapshot is stored (then the log purged) just after the optim_step's result.
    seq_ids = _wait(lambda: (ids := _log_seq_ids(stack, tc.model_id)) and ids[0] > 8 and ids, 30, "the log purged below seq 8")
    assert seq_ids[-1] == 12 and len(seq_ids) <= 4, seq_ids
    victim = stack.pid("trainer")
    os.kill(victim, signal.SIGKILL)
    sdk_steps(tc, batches[6:])
    assert stack.wait_restarted("trainer", victim) != victim
    assert_logprobs_equal(
        logprobs(tc.forward(data, loss_fn="cross_entropy").result()),
        logprobs(clean.forward(data, loss_fn="cross_entropy").result()),
        rtol=0,
        atol=0,
    )
    lines = [json.loads(x) for x in (stack.data_dir / "logs" / "trainer.log").read_text().splitlines() if x.startswith("{")]
    loads = [x for x in lines if x.get("event") == "model_loaded" and x.get("model_id") == tc.model_id]
    assert loads and loads[-1]["snapshot"] >= 8, loads  # rebuilt from a snapshot, not from a purged log
    assert _log_seq_ids(stack, clean.model_id)[0] > 8  # the clean run's log was purged too
