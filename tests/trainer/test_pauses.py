"""A long pass pauses inside, at layer boundaries, and other tenants run meanwhile (trainer/pauses.py).

The engine runs a pausable pass on a thread of its own that hands the caller control at each
pause point past its slice (here a slice of ~0: every point). Between the pauses another tenant's
calls run on the caller's thread and switch the active adapter; the paused request's results,
and both tenants' gradients, still equal a reference engine's that ran each request whole. A
pass closed while paused stops there and leaves nothing behind. Through a real Trainer, a small
key's request that arrives while another key's long pass (one micro-batch) runs finishes first.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import msgspec
import numpy as np
import pytest

from openrl import metrics
from openrl.bus.messages import ForwardBackward, ForwardBackwardResult, LoraSpec
from openrl.trainer.engine import PREEMPT_MIN_TOKENS, LoraEngine
from openrl.trainer.pauses import PausablePasses
from openrl.trainer.service import Trainer, TrainerConfig
from factories import random_request
from test_fairness import BASE, assert_same_grads, model_of, pending
from test_trainer_bounds import _future

pytestmark = pytest.mark.timeout(300)

EVERY_POINT = 1e-6  # ms: every pause point pauses
LONG = [60] * 10  # one micro-batch of 600 tokens: pausable


def req(loss_fn: str, seed: int, lengths, model_id: str, forward_only: bool = False) -> ForwardBackward:
    return random_request(loss_fn, seed, lengths, model_id=model_id, forward_only=forward_only)


def engines(path: str, **kw) -> tuple[LoraEngine, LoraEngine]:
    paused = LoraEngine(path, device="cpu", preempt_slice_ms=EVERY_POINT, **kw)
    reference = LoraEngine(path, device="cpu", preempt_slice_ms=0, **kw)
    for e in (paused, reference):
        e.create("long", LoraSpec(rank=4, seed=1))
        e.create("other", LoraSpec(rank=8, seed=2, train_unembed=True))
    return paused, reference


def assert_same(got, want) -> None:
    np.testing.assert_allclose(got.metrics["loss:sum"], want.metrics["loss:sum"], rtol=1e-5, atol=1e-5)
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def pass_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "compute-pass"]


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "importance_sampling", "gspo"])
@pytest.mark.parametrize("path_fixture", ["qwen3_path", "llama_path"])
def test_a_paused_pass_equals_the_pass_run_whole_while_another_tenant_runs_between(path_fixture, loss_fn, request):
    """cross_entropy and importance_sampling take the chunked backward of the head; gspo (a
    per-sequence loss) the head's chunks recomputed inside the backward: pauses in each."""
    paused, reference = engines(request.getfixturevalue(path_fixture), logits_chunk_bytes=4 * 96 * 16)  # 16 positions a chunk
    long = req(loss_fn, 1, LONG, "long")
    assert paused.pausable(sum(LONG)) and sum(LONG) >= PREEMPT_MIN_TOKENS and not reference.pausable(sum(LONG))
    other_fb, other_fwd = req("cross_entropy", 2, [9, 7], "other"), req("cross_entropy", 3, [5], "other", forward_only=True)

    steps = paused.forward_backward_steps(long)
    between = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            got = done.value
            break
        assert len(pass_threads()) == 1
        # Another tenant's calls while the long pass is paused; each makes its adapter the active one.
        assert_same(paused.forward_backward(other_fwd), reference.forward_backward(other_fwd))
        if between % 4 == 0:
            paused.forward_backward(other_fb)
            reference.forward_backward(other_fb)
        between += 1
    # Paused at least at each layer's start (2) and each chunk of the head (600 / 16 = 38), and
    # in the backward at each layer's output gradient (2).
    assert between >= 2 + 38 + 2, between
    assert paused.pauses == between
    assert_same(got, reference.forward_backward(long))
    assert_same_grads(paused, reference, "long")
    assert_same_grads(paused, reference, "other")
    assert not pass_threads()


def test_a_forward_only_pass_pauses_too_and_a_short_one_does_not(qwen3_path):
    paused, reference = engines(qwen3_path)
    long, short = req("cross_entropy", 4, LONG, "long", forward_only=True), req("cross_entropy", 5, [60] * 8, "long", forward_only=True)
    steps, yields = paused.forward_backward_steps(long), 0
    while True:
        try:
            next(steps)
            yields += 1
            paused.forward_backward(req("cross_entropy", 6, [5], "other", forward_only=True))
        except StopIteration as done:
            assert_same(done.value, reference.forward_backward(long))
            break
    assert yields >= 3  # two layers and the head
    before = paused.pauses
    assert list(_drain(paused.forward_backward_steps(short))) == []  # 480 tokens: under PREEMPT_MIN_TOKENS
    assert paused.pauses == before


def _drain(steps):
    while True:
        try:
            yield next(steps)
        except StopIteration:
            return


def test_a_pass_closed_while_paused_stops_there_and_changes_nothing(qwen3_path):
    """A request cancelled mid-pass (its generator closed): the pass's thread ends, the tenant has
    no gradients, and the next requests run (and pause) as if it had never started."""
    paused, reference = engines(qwen3_path, logits_chunk_bytes=4 * 96 * 16)
    long = req("importance_sampling", 7, LONG, "long")
    total = len(list(_drain(LoraEngine.forward_backward_steps(paused, long))))
    paused.drop("long")
    paused.create("long", LoraSpec(rank=4, seed=1))
    assert total >= 2 + 38 + 2
    for pauses_before_close in (1, 5, total):  # in the forward, in the head, at the last layer's backward
        steps = paused.forward_backward_steps(long)
        for _ in range(pauses_before_close):
            next(steps)
        steps.close()
        assert not pass_threads()
        assert all(g is None for g in paused.adapter_grads("long").values())
    assert_same(paused.forward_backward(long), reference.forward_backward(long))
    assert_same_grads(paused, reference, "long")


def test_one_paused_pass_at_a_time_the_next_runs_whole():
    """A second pausable pass while one is paused runs at once on the caller's thread (a trainer
    holds one paused pass's activations at most); its exception reaches the caller."""
    passes = PausablePasses(slice_s=1e-9)
    from openrl.trainer.pauses import pause_point

    order: list[str] = []

    def first():
        for i in range(3):
            order.append(f"first {i}")
            pause_point()
        return "first done"

    def second():
        pause_point()  # not pausable: a no-op
        order.append("second")
        raise KeyError("second's own error")

    gen = passes.run(first, on_resume=lambda: order.append("resumed"))
    next(gen)
    assert passes.busy
    with pytest.raises(KeyError, match="second's own error"):
        next(passes.run(second, on_resume=lambda: order.append("never")))
    with pytest.raises(StopIteration) as done:
        while True:
            next(gen)
    assert done.value.value == "first done"
    assert order == ["first 0", "second", "resumed", "first 1", "resumed", "first 2", "resumed"]
    assert not passes.busy and not pass_threads()
    with pytest.raises(ValueError, match="slice_s must be > 0"):
        PausablePasses(slice_s=0)


def test_pausing_inside_a_pass_is_refused_off_the_cpu(qwen3_path):
    with pytest.raises(ValueError, match="CPU only"):
        LoraEngine(qwen3_path, device="meta", preempt_slice_ms=50)


async def test_a_small_keys_request_finishes_while_a_long_one_micro_batch_pass_is_paused(bus, qwen3_path):
    """Through a real Trainer: a hostile key's request of one micro-batch (600 tokens; before
    pauses it ran as one call) starts first, a small key's 5-token request arrives once it has
    paused. The small one finishes first; both results equal a reference engine's."""
    await bus.ensure()
    engine = LoraEngine(qwen3_path, device="cpu", preempt_slice_ms=EVERY_POINT)
    trainer = Trainer(TrainerConfig(base_model=BASE, model_path=qwen3_path, worker_id=f"t-{uuid.uuid4().hex[:6]}"), bus, engine)
    big_model, small_model = await model_of(bus, trainer, "hostile"), await model_of(bus, trainer, "small")
    big = msgspec.structs.replace(req("cross_entropy", 8, LONG, big_model), request_id=f"{big_model}-1")
    small = msgspec.structs.replace(req("cross_entropy", 9, [5], small_model), request_id=f"{small_model}-1")
    await pending(bus, big, "hostile")
    await pending(bus, small, "small")
    assert big.data and len(big.data) * 60 <= engine.microbatch_tokens  # one micro-batch
    # On this tiny model the whole pass takes milliseconds: its first pause holds (on the compute
    # thread, the pass stopped at its first layer) until the small request waits for the thread.
    steps, paused = engine.forward_backward_steps, asyncio.Event()
    loop = asyncio.get_running_loop()

    def gated(msg):
        gen = steps(msg)
        if msg.model_id != big_model:  # the small one (forward_backward runs the steps whole)
            return (yield from gen)
        yield next(gen)  # the pass's first pause (a request that never paused would fail here)
        loop.call_soon_threadsafe(paused.set)
        deadline = time.monotonic() + 60
        while not trainer._compute.waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        yield 0  # the dispatcher picks again: the small key's call, not this one's next slice
        return (yield from gen)

    engine.forward_backward_steps = gated
    pauses_before = _pauses_counted()
    first = asyncio.ensure_future(trainer.on_train(big))
    await asyncio.wait_for(paused.wait(), 60)
    await asyncio.wait_for(asyncio.gather(first, trainer.on_train(small)), 120)
    got_big, got_small = await _future(bus, big.request_id), await _future(bus, small.request_id)
    assert got_big.state == got_small.state == "done", (got_big.error, got_small.error)
    assert got_small.finished_at < got_big.finished_at
    assert _pauses_counted() - pauses_before == engine.pauses > 0  # what an operator sees on /metrics
    reference = LoraEngine(qwen3_path, device="cpu", preempt_slice_ms=0)
    for m in (big_model, small_model):
        reference.create(m, LoraSpec(rank=4, seed=1))
    for msg, fut in ((big, got_big), (small, got_small)):
        got, want = msgspec.msgpack.decode(fut.payload, type=ForwardBackwardResult), reference.forward_backward(msg)
        np.testing.assert_allclose(got.metrics["loss:sum"], want.metrics["loss:sum"], rtol=1e-5, atol=1e-5)
        for raw, lp in zip(got.logprobs, want.logprobs, strict=True):
            np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(lp.shape), lp, rtol=1e-5, atol=1e-5)
    for m in (big_model, small_model):
        assert_same_grads(engine, reference, m)


def _pauses_counted() -> float:
    """openrl_trainer_pass_pauses_total as the trainer's /metrics shows it."""
    return metrics.REGISTRY.prom.get_sample_value("openrl_trainer_pass_pauses_total") or 0.0
