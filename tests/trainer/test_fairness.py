"""The trainer's compute thread is shared fairly between keys (trainer/compute.py, openrl/fair.py).

A real Trainer on the session's nats-server and a tiny engine: a hostile key's long requests (one
per model, four models) are ready first, a small key's short one just after. The small one runs
second, not after the hostile queue is drained (in arrival order it ran last), alone and in shared
passes; each model's requests still apply in seq_id order, exactly once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np
import pytest

from openrl.bus.messages import ForwardBackward, Future, LoraSpec, ModelRecord
from openrl.trainer.compute import FairCompute
from openrl.trainer.service import Held
from factories import datum
from test_trainer_bounds import BASE, _future, _trainer

pytestmark = pytest.mark.timeout(300)


def long_fb(model_id: str, seq_id: int, rows: int, length: int) -> ForwardBackward:
    rng = np.random.default_rng(seq_id + 7 * rows)
    data = [datum(rng.integers(0, 96, length), rng.integers(0, 96, length), np.ones(length)) for _ in range(rows)]
    return ForwardBackward(request_id=f"{model_id}-{seq_id}", model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy", data=data)


async def model_of(bus, trainer, owner: str) -> str:
    """A model of `owner`, built and held (its consumer is not under test)."""
    model_id = f"s-{uuid.uuid4().hex[:8]}:train:0"
    rec = ModelRecord(model_id=model_id, session_id=model_id.split(":")[0], owner=owner, base_model=BASE, lora=LoraSpec(rank=4, seed=1),
                      created_at=time.time(), create_request_id=f"create-{model_id}")  # fmt: skip
    await bus.kv_put(bus.models, model_id, rec)
    trainer.held[model_id] = Held(stop=asyncio.Event(), task=None)
    await trainer.tenant(model_id)  # hydrated now: on_train reaches the compute queue without waiting on the bus
    return model_id


async def pending(bus, msg, owner: str) -> None:
    fut = Future(request_id=msg.request_id, owner=owner, request_type=type(msg).__name__, created_at=time.time())
    await bus.kv_create(bus.futures, msg.request_id, fut)


async def run_hostile_then_small(bus, path, max_shared: int) -> list[list[str]]:
    """The engine calls, as lists of the models in each, for: four hostile models' 4 x 60-token
    steps arriving first, then a small model's 6-token step; then the hostile models' second steps."""
    await bus.ensure()
    trainer = await _trainer(bus, path, max_shared_requests=max_shared)
    calls: list[list[str]] = []
    one, many = trainer.engine.forward_backward, trainer.engine.forward_backward_many
    trainer.engine.forward_backward = lambda req: calls.append([req.model_id]) or one(req)
    trainer.engine.forward_backward_many = lambda reqs: calls.append([r.model_id for r in reqs]) or many(reqs)
    hostile = [await model_of(bus, trainer, "hostile") for _ in range(4)]
    small = await model_of(bus, trainer, "small")
    msgs = [long_fb(m, s, 4, 60) for s in (1, 2) for m in hostile]
    tiny = long_fb(small, 1, 1, 6)
    for msg in msgs:
        await pending(bus, msg, "hostile")
    await pending(bus, tiny, "small")
    # All handed over in one go, in arrival order (the hostile ones first; each hostile model's
    # seq 2 waits for its seq 1): the compute queue sees them in that order.
    await asyncio.wait_for(asyncio.gather(*(trainer.on_train(m) for m in [*msgs, tiny])), 120)
    for msg in [*msgs, tiny]:
        fut = await _future(bus, msg.request_id)
        assert fut.state == "done", fut.error
    # Each model's requests ran in seq_id order, exactly once.
    assert sorted(m for c in calls for m in c) == sorted([*hostile * 2, small])
    for m in hostile:
        assert trainer.tenants[m].next_seq == 3
    return [[("small" if m == small else f"h{hostile.index(m)}") for m in c] for c in calls]


async def test_a_small_key_runs_before_a_hostile_keys_queue_is_drained(bus, qwen3_path):
    calls = await run_hostile_then_small(bus, qwen3_path, max_shared=1)
    # In arrival order the small step ran fifth, after all four hostile steps of 240 tokens.
    assert calls[:2] == [["h0"], ["small"]], calls


async def test_in_shared_passes_the_small_key_rides_with_the_first(bus, qwen3_path):
    calls = await run_hostile_then_small(bus, qwen3_path, max_shared=2)
    # In arrival order: [h0, h1], [h2, h3], [small], ...
    assert calls[0] == ["h0", "small"], calls
    assert all(len(set(c)) == len(c) for c in calls)  # never two requests of one model in a call


async def test_fair_compute_shares_calls_only_with_keys_not_in_debt():
    """FairCompute alone (no engine): a key in debt does not ride along in another key's call, and a
    call's exception goes to its own callers only."""
    from concurrent.futures import ThreadPoolExecutor

    compute = FairCompute(ThreadPoolExecutor(max_workers=1), max_shared=8)
    calls: list[list[str]] = []

    def run(items):
        calls.append(list(items))
        return [f"done {i}" for i in items]

    def boom():
        raise ValueError("its own")

    first = asyncio.ensure_future(compute.submit("h", 1000, run, "h-big", kind="fb"))
    await asyncio.sleep(0.05)  # running: h is now 1000 tokens ahead
    rest = [compute.submit("h", 1000, run, "h-next", kind="fb"), compute.submit("a", 10, run, "a-1", kind="fb"),
            compute.submit("b", 10, run, "b-1", kind="fb"), compute.call("b", 10, boom)]  # fmt: skip
    got = await asyncio.gather(first, *rest, return_exceptions=True)
    assert got[:4] == ["done h-big", "done h-next", "done a-1", "done b-1"]
    assert isinstance(got[4], ValueError)
    assert calls[0] == ["h-big"]
    assert calls[1] == ["a-1", "b-1"]  # h (1000 ahead) does not ride with a's call
    assert calls[2] == ["h-next"]


def assert_same_grads(got, want, model_id: str) -> None:
    """The pending gradients of `model_id` in engine `got` equal those in `want` (1e-5)."""
    import torch

    g, w = got.adapter_grads(model_id), want.adapter_grads(model_id)
    assert g.keys() == w.keys()
    for k in w:
        if w[k] is None:
            assert g[k] is None, k
        else:
            torch.testing.assert_close(g[k], w[k], atol=1e-5, rtol=1e-5)


def record_steps(engine, *, small: str) -> list[str]:
    """Wrap `engine.forward_backward_steps` so that each micro-batch a request runs (and its
    end) appends its name to the list returned: "big" for a request of several datums, else
    `small`."""
    events: list[str] = []
    steps = engine.forward_backward_steps

    def recorded(req):
        name = "big" if len(req.data) > 1 else small
        gen = steps(req)
        while True:
            try:
                n = next(gen)
            except StopIteration as done:
                events.append(name)
                return done.value
            events.append(name)
            yield n

    engine.forward_backward_steps = recorded
    return events


async def test_a_big_request_runs_a_micro_batch_per_turn_and_others_run_between(bus, qwen3_path):
    """A request of several micro-batches yields the thread after each (engine.forward_backward_steps):
    a small key's step, ready just after it, runs after its first micro-batch instead of after its
    last. Its gradients are its own: result, pending gradients and the step after equal a
    reference engine's, which ran it whole."""
    import msgspec
    import torch

    from openrl.bus.messages import AdamParams, ForwardBackwardResult, OptimStep
    from openrl.trainer.engine import LoraEngine
    from openrl.trainer.service import Trainer, TrainerConfig

    await bus.ensure()
    engine = LoraEngine(qwen3_path, device="cpu", microbatch_tokens=64)  # a 60-token datum per micro-batch
    trainer = Trainer(TrainerConfig(base_model=BASE, model_path=qwen3_path, worker_id=f"t-{uuid.uuid4().hex[:6]}"), bus, engine)
    events = record_steps(engine, small="small")
    big_model, small_model = await model_of(bus, trainer, "hostile"), await model_of(bus, trainer, "small")
    big, small = long_fb(big_model, 1, 4, 60), long_fb(small_model, 1, 1, 6)
    await pending(bus, big, "hostile")
    await pending(bus, small, "small")
    await asyncio.wait_for(asyncio.gather(trainer.on_train(big), trainer.on_train(small)), 120)
    assert events == ["big", "small", "big", "big", "big"], events  # arrival order ran the big one whole first

    reference = LoraEngine(qwen3_path, device="cpu")
    for m in (big_model, small_model):
        reference.create(m, LoraSpec(rank=4, seed=1))
    for msg in (big, small):
        fut = await _future(bus, msg.request_id)
        assert fut.state == "done", fut.error
        got, want = msgspec.msgpack.decode(fut.payload, type=ForwardBackwardResult), reference.forward_backward(msg)
        np.testing.assert_allclose(got.metrics["loss:sum"], want.metrics["loss:sum"], rtol=1e-5, atol=1e-5)
        for raw, lp in zip(got.logprobs, want.logprobs, strict=True):
            np.testing.assert_allclose(np.frombuffer(raw, "<f4"), lp, rtol=1e-5, atol=1e-5)
    for m in (big_model, small_model):
        assert_same_grads(engine, reference, m)
    step = OptimStep(request_id=f"{big_model}-2", model_id=big_model, seq_id=2, adam=AdamParams(learning_rate=1e-2))
    await pending(bus, step, "hostile")
    await asyncio.wait_for(trainer.on_train(step), 60)
    reference.optim_step(big_model, step.adam)
    for k, v in LoraEngine.adapter_state(reference, big_model).items():
        torch.testing.assert_close(LoraEngine.adapter_state(engine, big_model)[k], v, atol=1e-5, rtol=1e-5)


async def test_a_small_keys_next_request_in_sequence_runs_before_the_big_ones_next_micro_batch(bus, qwen3_path):
    """A client sends forward_backward and optim_step back to back: the optim_step becomes ready
    only as the forward_backward finishes (its model's turn). It still runs before the hostile
    key's next micro-batch (the thread lets what a finished call readied come in before it picks),
    rather than a whole micro-batch later."""
    from openrl.bus.messages import AdamParams, OptimStep
    from openrl.trainer.engine import LoraEngine
    from openrl.trainer.service import Trainer, TrainerConfig

    await bus.ensure()
    engine = LoraEngine(qwen3_path, device="cpu", microbatch_tokens=64)
    trainer = Trainer(TrainerConfig(base_model=BASE, model_path=qwen3_path, worker_id=f"t-{uuid.uuid4().hex[:6]}"), bus, engine)
    events = record_steps(engine, small="fb")
    optim = engine.optim_step
    engine.optim_step = lambda *a: events.append("optim") or optim(*a)
    big_model, small_model = await model_of(bus, trainer, "hostile"), await model_of(bus, trainer, "small")
    big, fb = long_fb(big_model, 1, 4, 60), long_fb(small_model, 1, 1, 6)
    step = OptimStep(request_id=f"{small_model}-2", model_id=small_model, seq_id=2, adam=AdamParams(learning_rate=1e-2))
    for msg, owner in ((big, "hostile"), (fb, "small"), (step, "small")):
        await pending(bus, msg, owner)
    await asyncio.wait_for(asyncio.gather(trainer.on_train(big), trainer.on_train(fb), trainer.on_train(step)), 120)
    assert events == ["big", "fb", "optim", "big", "big", "big"], events


async def test_a_big_jobs_later_steps_keep_it_behind_a_key_that_keeps_sending():
    """FairCompute alone: a stepped job of key h (charged 1000 at its start, then 10 steps) and key
    a sending 30 calls of 10 one after another. After its fifth, a waits until a step of h has
    run alone (nothing of a's waiting). a's calls all run before h's last step: a step of h run
    alone does not move the virtual time to h's finish (it did: a then ranked behind h and
    waited for all its steps; in the hostile benchmark, clients waited seconds behind one key's
    passes)."""
    from concurrent.futures import ThreadPoolExecutor

    compute = FairCompute(ThreadPoolExecutor(max_workers=1))
    order: list[str] = []
    loop, alone = asyncio.get_running_loop(), asyncio.Event()

    def steps():
        for _ in range(10):
            order.append("h")
            if order.count("a") == 5:  # a is waiting for this: h runs alone
                loop.call_soon_threadsafe(alone.set)
            yield 0
        return "h done"

    async def sender():
        for i in range(30):
            await compute.call("a", 10, order.append, "a")
            if i == 4:
                await alone.wait()

    big = asyncio.ensure_future(compute.steps("h", 1000, steps))
    await asyncio.sleep(0)
    assert await asyncio.wait_for(asyncio.gather(big, sender()), 30) == ["h done", None]
    last_a, last_h = max(i for i, x in enumerate(order) if x == "a"), max(i for i, x in enumerate(order) if x == "h")
    assert last_a < last_h, "".join(order)
    assert compute.share.now < 1000  # never moved to h's finish


async def test_a_stepped_job_cancelled_between_steps_has_its_generator_closed_at_once():
    """The caller of a stepped job goes away (cancelled) between two steps: its generator is
    closed on the compute thread before the next call runs (dropped, it was closed wherever the
    last reference went: on the event loop, where a pass paused inside would block the loop while
    it unwinds, or later, by the garbage collector, holding its thread and activations meanwhile)."""
    from concurrent.futures import ThreadPoolExecutor

    compute = FairCompute(ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute"))
    events: list[str] = []
    stepped = asyncio.Event()

    def steps():
        try:
            while True:
                events.append("step")
                yield 0
        finally:
            events.append(f"closed on {threading.current_thread().name}")

    job = asyncio.ensure_future(compute.steps("h", 10, steps))
    gate = asyncio.get_running_loop().create_future()

    async def other():  # holds the thread's queue open while the job is cancelled
        await compute.call("a", 1, lambda: None)
        stepped.set()
        await gate
        await compute.call("a", 1, events.append, "other")

    others = asyncio.ensure_future(other())
    await asyncio.wait_for(stepped.wait(), 10)
    job.cancel()
    gate.set_result(None)
    await asyncio.wait_for(others, 10)
    closed = [e for e in events if e.startswith("closed")]
    assert closed == ["closed on compute_0"] and events.index(closed[0]) < events.index("other"), events
    assert job.cancelled()
