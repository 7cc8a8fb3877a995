"""The sampler service over a real NATS, with the transformers engine behind the async protocol
(hf_engine.HfEngine): requests in, futures out; what a request may cost checked before anything is
allocated for it; one request's failure is its own, and a server's failure is not the user's.

Uses the tiny models, adapters and references of test_backend.py.
"""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from openrl.bus import subjects
from openrl.bus.messages import (
    MAX_TENSOR_COLUMNS,
    Future,
    SampleRequest,
    SampleResult as BusSampleResult,
    SamplingParams,
    Tensor,
    decode,
)
from openrl.sampler.hf_engine import HfEngine
from openrl.sampler.hf_model import TransformersSampler
from openrl.sampler.service import Sampler, SamplerConfig, to_bus
from factories import sample_spec
from test_backend import (  # noqa: F401  (fixtures)
    CONTEXT,
    TOL,
    engine,
    one,
    one_thread,
    prompts,
    sampler,
    tiny_path,
)
from test_continuous import assert_same

pytestmark = pytest.mark.timeout(300)


def packed(ids) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


def int64(values) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


async def pending(bus, name: str) -> str:
    rid = f"svc-{name}-{os.getpid()}-{id(bus)}"
    await bus.kv_put(bus.futures, rid, Future(request_id=rid, owner="k", request_type="Sample"))
    return rid


async def settled(bus, rids: list[str], timeout: float = 60) -> dict[str, Future]:
    """The futures of `rids` once none is pending."""
    async def wait() -> dict[str, Future]:
        while True:
            futures = {rid: await bus.kv_get(bus.futures, rid, Future) for rid in rids}
            if all(f.state != "pending" for f in futures.values()):
                return futures
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(wait(), timeout)


def sequences_equal(got: BusSampleResult, expected: BusSampleResult) -> None:
    assert len(got.sequences) == len(expected.sequences)
    for a, b in zip(got.sequences, expected.sequences, strict=True):
        assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
        np.testing.assert_allclose(np.frombuffer(a.logprobs, "<f4"), np.frombuffer(b.logprobs, "<f4"), **TOL)


async def test_the_service_samples_through_the_engine(bus, tiny_path, engine, sampler):
    """Requests go from their handlers straight to the engine: results and user errors land on the
    futures; an older gateway's message (flat sampling fields, no `sampling`) samples the same;
    max_tokens None is the sampler's default; a dead engine ends `serve`."""
    from openrl.trainer.weights import adapter_bytes

    weights = f"adapters/svc-m1-{os.getpid()}/seq-1"
    await bus.objects.put(weights, adapter_bytes(engine, "m1"))
    hf = HfEngine(TransformersSampler(tiny_path, device="cpu"), idle_wait_s=0.05)
    service = Sampler(SamplerConfig(base_model="tiny", model_path=tiny_path, idle_wait_s=0.05, default_max_tokens=7), bus, hf)
    p = prompts(33, (6,))[0]
    params = SamplingParams(max_tokens=5, seed=3, stop_at_eos=False)
    flat = dict(max_tokens=5, seed=3, stop_at_eos=False)  # an older gateway's fields
    requests = {
        "base": dict(sampling=params),
        "adapter": dict(weights=weights, sampling=params),
        "legacy": dict(weights=weights, **flat),
        "default": dict(sampling=SamplingParams(seed=3, stop_at_eos=False)),
        "bad": dict(sampling=SamplingParams(max_tokens=5, top_p=0.0)),
        "missing": dict(weights="adapters/svc-none/seq-1", sampling=params),
        "too_long": dict(sampling=SamplingParams(seed=3), prompt=packed([1] * (CONTEXT - 3))),  # + the default 7 > 64
    }
    msgs = {}
    try:
        for name, kw in requests.items():
            kw = {"prompt": packed(p), **kw}
            msgs[name] = SampleRequest(request_id=await pending(bus, name), sampler_id="s", base_model="tiny", num_samples=2,
                                       topk_sample_logprobs=2, **kw)  # fmt: skip
        await asyncio.gather(*(service.on_sample(m) for m in msgs.values()))
        futures = {name: await bus.kv_get(bus.futures, m.request_id, Future) for name, m in msgs.items()}
        for name, adapter, max_tokens in (("base", None, 5), ("adapter", "m1", 5), ("legacy", "m1", 5), ("default", None, 7)):
            assert futures[name].state == "done", futures[name]
            spec = sample_spec(prompt=p, num_samples=2, max_tokens=max_tokens, seed=3, stop_at_eos=False, topk_sample_logprobs=2, adapter=adapter)
            got, expected = decode(futures[name].payload, BusSampleResult), to_bus(one(sampler, spec))
            sequences_equal(got, expected)
            assert all(a.topk.tokens == b.topk.tokens for a, b in zip(got.sequences, expected.sequences, strict=True))
        assert futures["bad"].state == "failed" and futures["bad"].category == "user" and "top_p" in futures["bad"].error
        assert futures["missing"].state == "failed" and futures["missing"].category == "user"
        too_long = futures["too_long"]
        assert too_long.state == "failed" and too_long.category == "user" and "default max_tokens (7)" in too_long.error
        assert service.served == 4 and service._busy_s > 0 and service._inflight == 0

        stop = asyncio.Event()
        watching = asyncio.create_task(service.serve(stop))
        await asyncio.sleep(0.1)
        assert not watching.done()
        hf._jobs.put(None)  # not a job: the compute loop fails on it, as on a bug of its own
        with pytest.raises(RuntimeError, match="died"):
            await asyncio.wait_for(watching, 5)
        assert hf.dead
    finally:
        hf.close()


# ---------------------------------------------------------------------- sizes, checked before anything is allocated

ROWS = 5  # a prompt of 6 tokens has 5 target rows
HOSTILE = {
    # 4e9 columns, one listed value: a dense copy would be 160 GB.
    "csr_4e9_columns": Tensor(dtype="int64", data=int64([1]), shape=[ROWS, 4_000_000_000], crow=int64([0, 1, 1, 1, 1, 1]), col=int64([0])),
    "csr_too_many_columns": Tensor(dtype="int64", data=int64([1]), shape=[ROWS, MAX_TENSOR_COLUMNS + 1], crow=int64([0, 1, 1, 1, 1, 1]), col=int64([0])),
    # 4 x 2^62 elements: a product that overflows int64 to the number of values sent (0).
    "dense_overflowing_shape": Tensor(dtype="int64", data=b"", shape=[4, 2**62]),
    "dense_huge_columns": Tensor(dtype="int64", data=b"", shape=[ROWS, 2**62]),
    "three_dimensions": Tensor(dtype="int64", data=b"", shape=[ROWS, 2, 0]),
    "dense_wrong_rows": Tensor(dtype="int64", data=int64(np.zeros((ROWS + 1, 2))), shape=[ROWS + 1, 2]),
    "dense_short_data": Tensor(dtype="int64", data=int64([1, 2, 3]), shape=[ROWS, 2]),
    "csr_short_crow": Tensor(dtype="int64", data=int64([1]), shape=[ROWS, 2], crow=int64([0, 1]), col=int64([0])),
    "csr_column_out_of_range": Tensor(dtype="int64", data=int64([1]), shape=[ROWS, 2], crow=int64([0, 1, 1, 1, 1, 1]), col=int64([7])),
    "not_int64": Tensor(dtype="float32", data=np.zeros(ROWS * 2, "<f4").tobytes(), shape=[ROWS, 2]),
}


async def test_hostile_requests_are_user_errors_and_acked(bus, tiny_path):
    """Messages that did not come through a gateway, past every bound: each fails its own future as
    a user error naming the field, the message is acked once (no redelivery, no dead letter), no
    dense copy is made, and the sampler goes on serving."""
    base = f"svc-hostile-{os.getpid()}"
    hf = HfEngine(TransformersSampler(tiny_path, device="cpu"), idle_wait_s=0.05)
    service = Sampler(SamplerConfig(base_model=base, model_path=tiny_path, idle_wait_s=0.05, ack_wait_s=5.0), bus, hf)
    p = packed(prompts(5, (ROWS + 1,))[0])
    params = SamplingParams(max_tokens=3, seed=1)
    msgs = {name: SampleRequest(request_id=await pending(bus, name), sampler_id="s", base_model=base, prompt=p, sampling=params,
                                target_prompt_logprobs=t) for name, t in HOSTILE.items()}  # fmt: skip
    msgs["odd_prompt_bytes"] = SampleRequest(request_id=await pending(bus, "odd"), sampler_id="s", base_model=base, prompt=p + b"\x01", sampling=params)
    msgs["prompt_past_context"] = SampleRequest(request_id=await pending(bus, "long"), sampler_id="s", base_model=base,
                                                prompt=packed([1] * (100 * CONTEXT)), sampling=params)  # fmt: skip
    good = SampleRequest(request_id=await pending(bus, "good"), sampler_id="s", base_model=base, prompt=p, sampling=params,
                         target_prompt_logprobs=Tensor(dtype="int64", data=int64([4, 9]), shape=[ROWS, 3], crow=int64([0, 1, 1, 2, 2, 2]), col=int64([2, 0])))  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        for msg in [*msgs.values(), good]:
            await bus.publish(subjects.sample(base), msg, msg_id=msg.request_id)
        futures = await settled(bus, [m.request_id for m in [*msgs.values(), good]])
        for name, msg in msgs.items():
            fut = futures[msg.request_id]
            assert fut.state == "failed" and fut.category == "user", (name, fut)
            assert ("target_prompt_logprobs" if name in HOSTILE else "prompt") in fut.error, (name, fut.error)
        for name in ("csr_4e9_columns", "csr_too_many_columns", "dense_huge_columns"):
            assert f"at most {MAX_TENSOR_COLUMNS} columns" in futures[msgs[name].request_id].error
        done = futures[good.request_id]
        assert done.state == "done", done
        target = decode(done.payload, BusSampleResult).target_prompt_logprobs
        assert target.crow == good.target_prompt_logprobs.crow and len(np.frombuffer(target.data, "<f4")) == 2
        info = await bus.js.consumer_info(subjects.SAMPLE_STREAM, subjects.sampler_consumer(base))
        assert info.num_ack_pending == 0 and info.num_redelivered == 0, info
        assert not running.done() and not hf.dead
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        hf.close()


# ---------------------------------------------------------------------- failure isolation


async def test_a_failing_request_fails_alone_as_a_server_error(bus, tiny_path, engine):
    """A step that raises for one request of a batch: that request alone fails, with category
    "server"; the others in the batch (and the one already running) complete with exactly what
    they get alone; every message is acked once."""
    from openrl.sampler.hf_model import TransformersSampler as TS

    base = f"svc-isolation-{os.getpid()}"
    poisoned = 77  # a request whose prompt starts with this token makes the engine raise, as a bug would
    model = TS(tiny_path, device="cpu")
    hold = threading.Event()  # the first prefill waits here until every other request is queued
    groups: list[int] = []
    prefill = model._prefill

    def faulty_prefill(specs, names, seeds):
        groups.append(len(specs))
        if len(groups) == 1:
            assert hold.wait(30)
        if any(s.prompt[0] == poisoned for s in specs):
            raise RuntimeError("boom: an engine bug")
        return prefill(specs, names, seeds)

    model._prefill = faulty_prefill
    hf = HfEngine(model, idle_wait_s=0.05)
    service = Sampler(SamplerConfig(base_model=base, model_path=tiny_path, idle_wait_s=0.05), bus, hf)
    ps = prompts(21, (4, 6, 3, 5, 7))
    ps[4][0] = poisoned
    specs = [sample_spec(prompt=ps[0], num_samples=2, max_tokens=30, seed=1, stop_at_eos=False)]  # running first
    specs += [sample_spec(prompt=q, num_samples=2, max_tokens=6, seed=10 + i, stop_at_eos=False) for i, q in enumerate(ps[1:])]
    msgs = [SampleRequest(request_id=await pending(bus, f"iso{i}"), sampler_id="s", base_model=base, prompt=packed(s.prompt),
                          num_samples=2, sampling=s.params) for i, s in enumerate(specs)]  # fmt: skip
    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        await bus.publish(subjects.sample(base), msgs[0], msg_id=msgs[0].request_id)
        while not groups:  # the first request is being prefilled (and held)
            await asyncio.sleep(0.01)
        for msg in msgs[1:]:
            await bus.publish(subjects.sample(base), msg, msg_id=msg.request_id)
        while hf._jobs.qsize() < len(msgs) - 1:  # all four queued behind it: they are admitted together
            await asyncio.sleep(0.01)
        hold.set()
        futures = await settled(bus, [m.request_id for m in msgs])
        info = await bus.js.consumer_info(subjects.SAMPLE_STREAM, subjects.sampler_consumer(base))
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        hf.close()
    assert groups[1] == len(msgs) - 1  # the failing step held four requests, with the first one running
    bad = futures[msgs[-1].request_id]
    assert bad.state == "failed" and bad.category == "server" and "boom" in bad.error, bad
    model._prefill = prefill
    for spec, msg in zip(specs[:-1], msgs[:-1], strict=True):
        fut = futures[msg.request_id]
        assert fut.state == "done", fut
        sequences_equal(decode(fut.payload, BusSampleResult), to_bus(one(model, spec)))
    assert info.num_ack_pending == 0 and info.num_redelivered == 0, info
    assert not model._pins


async def test_the_engine_isolates_without_the_bus(sampler):
    """The same at the engine's own interface: a request whose step raises gets SampleFailed (not
    an InvalidRequest); one already running with it completes; the engine goes on."""
    from openrl.bus.errors import InvalidRequest
    from openrl.sampler.hf_engine import SampleFailed

    hf = HfEngine(sampler, idle_wait_s=0.05)
    forward = sampler._forward
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # a decode step of the two requests together
            raise RuntimeError("out of memory (injected)")
        return forward(*args, **kwargs)

    p, q = prompts(3, (5, 4))
    long = sample_spec(prompt=p, num_samples=2, max_tokens=20, seed=1, stop_at_eos=False)
    short = sample_spec(prompt=q, num_samples=1, max_tokens=12, seed=2, stop_at_eos=False)
    sampler._forward = failing_once
    try:
        results = await asyncio.wait_for(asyncio.gather(hf.sample(long), hf.sample(short), return_exceptions=True), 60)
    finally:
        sampler._forward = forward
        hf.close()
    assert calls["n"] > 8
    # Run again alone, each completes: a failure no request caused fails none of them.
    for spec, result in zip((long, short), results, strict=True):
        assert not isinstance(result, (InvalidRequest, SampleFailed)), result
        assert_same(one(sampler, spec), result, spec)
    assert not sampler._pins and not hf.dead


# ---------------------------------------------------------------------- cancellation


async def test_a_cancelled_request_stops_and_is_acked_with_nothing_recorded(bus, tiny_path, engine):
    """What the gateway does when an OpenAI client leaves (fail the future, then a core-NATS cancel
    notice), for a request the engine is generating: its rows leave the decode at the next step,
    the message is acked, nothing is stored over the cancelled future and no usage is recorded.
    A notice that comes while the weights are fetched: the request never reaches the engine. A
    notice missed (the sampler reconnecting): the request runs to the end and the compare-and-set
    stores nothing over the cancelled future."""
    import time

    import structlog
    from nats.js.errors import NotFoundError

    from openrl.trainer.weights import adapter_bytes

    base, owner = f"svc-cancel-{os.getpid()}", f"owner-cancel-{os.getpid()}"
    weights = f"adapters/svc-cancel-m1-{os.getpid()}/seq-1"
    await bus.objects.put(weights, adapter_bytes(engine, "m1"))
    model = TransformersSampler(tiny_path, device="cpu")
    decode_rows: list[int] = []
    forward = model._forward

    def slow_forward(tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            decode_rows.append(tokens.shape[0])
            time.sleep(0.02)  # 56 steps take over a second, whatever the machine
        return forward(tokens, *args, **kwargs)

    model._forward = slow_forward
    hf = HfEngine(model, idle_wait_s=0.05)
    service = Sampler(SamplerConfig(base_model=base, model_path=tiny_path, idle_wait_s=0.05, ack_wait_s=5.0), bus, hf)
    fetching, fetched = asyncio.Event(), asyncio.Event()
    blob = service._blob

    async def held_blob(name: str) -> bytes:
        fetching.set()
        await fetched.wait()
        return await blob(name)

    service._blob = held_blob
    p = packed(prompts(44, (6,))[0])
    params = SamplingParams(max_tokens=56, seed=1, stop_at_eos=False)

    async def request(name: str, **kw) -> SampleRequest:
        rid = f"svc-{name}-{os.getpid()}"
        await bus.kv_put(bus.futures, rid, Future(request_id=rid, owner=owner, request_type="Sample"))
        msg = SampleRequest(request_id=rid, sampler_id="s", base_model=base, prompt=p, num_samples=2, sampling=params, **kw)
        await bus.publish(subjects.sample(base), msg, msg_id=rid)
        return msg

    async def cancel(rid: str, notice: bool = True) -> Future:
        """Openai_api.Run.cancel's steps."""
        stored, revision = await bus.pending_future(rid)
        fut = Future(request_id=rid, owner=owner, request_type="Sample", state="failed", error="cancelled: gone", category="user")
        assert await bus.finish_pending(fut, revision)
        if notice:
            await bus.nc.publish(subjects.cancel(base, rid), b"")
        return await bus.kv_get(bus.futures, rid, Future)

    async def until(what, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while not await what():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def acked() -> bool:
        info = await bus.js.consumer_info(subjects.SAMPLE_STREAM, subjects.sampler_consumer(base))
        return info.num_pending == 0 and info.num_ack_pending == 0

    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        with structlog.testing.capture_logs() as logs:
            # Running: dropped at the next step.
            first = await request("running")
            await until(lambda: asyncio.sleep(0, len(decode_rows) >= 3), 30)
            cancelled = await cancel(first.request_id)
            await until(acked, 5)
            steps = len(decode_rows)
            assert steps < 55 and not service._generating
            await asyncio.sleep(0.3)
            assert len(decode_rows) == steps  # nothing left in the decode
            assert await bus.kv_get(bus.futures, first.request_id, Future) == cancelled
            # Cancelled while its weights were fetched: it never reaches the engine.
            early = await request("early", weights=weights)
            await asyncio.wait_for(fetching.wait(), 30)
            cancelled_early = await cancel(early.request_id)
            await asyncio.sleep(0.2)  # the notice arrives
            fetched.set()
            await until(acked, 5)
            assert len(decode_rows) == steps and await bus.kv_get(bus.futures, early.request_id, Future) == cancelled_early
            # The notice missed: computed to the end, the cancelled future kept.
            missed = await request("missed")
            await until(lambda: asyncio.sleep(0, len(decode_rows) >= steps + 3), 30)
            cancelled_missed = await cancel(missed.request_id, notice=False)
            await until(acked, 30)
            assert len(decode_rows) == steps + 55  # a forward for every token but the last
            assert await bus.kv_get(bus.futures, missed.request_id, Future) == cancelled_missed
        aborted = {e["request_id"]: e["generating_s"] for e in logs if e["event"] == "sample_aborted"}
        assert set(aborted) == {first.request_id, early.request_id} and aborted[early.request_id] is None, aborted
        assert [e["request_id"] for e in logs if e["event"] == "sample_already_recorded"] == [missed.request_id]
        with pytest.raises(NotFoundError):  # billed for nothing
            await bus.js.get_last_msg(subjects.USAGE_STREAM, subjects.usage(owner))
        info = await bus.js.consumer_info(subjects.SAMPLE_STREAM, subjects.sampler_consumer(base))
        assert info.num_redelivered == 0 and not running.done() and not hf.dead and not model._pins
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)
        hf.close()


async def test_a_sampler_prefetches_the_next_version_of_a_model_it_served_on_the_trainers_notice(bus, tiny_path, engine):
    """The trainer's AdapterStored notice: a sampler that sampled version 1 of a model fetches
    version 2 at once, so the request naming version 2 finds it cached (one fetch in all); a
    model it never served, a notice whose object is not the model's, and bytes that are not a
    notice are left alone."""
    from openrl.bus import paths
    from openrl.bus.messages import AdapterStored, encode
    from openrl.trainer.weights import adapter_bytes

    base, model, other = f"svc-pre-{os.getpid()}", f"svc-pre-m-{os.getpid()}", f"svc-pre-o-{os.getpid()}"
    blob = adapter_bytes(engine, "m1")
    v1, v2, o2 = paths.adapter_object(model, 1), paths.adapter_object(model, 2), paths.adapter_object(other, 2)
    for name in (v1, v2, o2):
        await bus.objects.put(name, blob)
    service = Sampler(SamplerConfig(base_model=base, model_path=tiny_path, idle_wait_s=0.05), bus, HfEngine(TransformersSampler(tiny_path, device="cpu")))
    fetched: list[str] = []
    fetch = service._fetch

    async def counted(name: str) -> bytes:
        fetched.append(name)
        return await fetch(name)

    service._fetch = counted

    async def sample(weights: str) -> Future:
        rid = await pending(bus, f"pre-{weights.rsplit('/', 1)[-1]}")
        msg = SampleRequest(request_id=rid, sampler_id="s", base_model=base, prompt=packed([5, 6, 7]), num_samples=1,
                            sampling=SamplingParams(max_tokens=2, seed=1), weights=weights)  # fmt: skip
        await bus.publish(subjects.sample(base), msg, msg_id=rid)
        return (await settled(bus, [rid]))[rid]

    async def notice(model_id: str, name: str) -> None:
        await bus.nc.publish(subjects.adapter_stored(base), encode(AdapterStored(model_id=model_id, object=name, size_bytes=len(blob))))

    stop = asyncio.Event()
    running = asyncio.create_task(service.run(stop))
    try:
        await asyncio.sleep(0.3)  # subscribed
        await notice(model, v1)  # nothing of the model served yet: not fetched
        assert (await sample(v1)).state == "done" and fetched == [v1]
        await bus.nc.publish(subjects.adapter_stored(base), b"not a notice")
        await notice(other, o2)  # never served here
        await notice(model, o2)  # not the model's object
        await notice(model, v2)
        for _ in range(200):
            if v2 in service._blobs:
                break
            await asyncio.sleep(0.02)
        assert v2 in service._blobs  # before any request names it
        assert (await sample(v2)).state == "done"
        assert fetched == [v1, v2] and o2 not in service._blobs
    finally:
        stop.set()
        await running
        service.backend.close()
