"""Continuous batching: requests that join a running decode (Scheduler) get exactly what they
get alone, and what full forwards say; rows leave as they finish; adapters stay pinned.

Uses the tiny models, adapters and references of test_backend.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from openrl.bus.errors import InvalidRequest
from openrl.sampler.hf_batching import Scheduler
from openrl.sampler.hf_cache import RoomLayer
from openrl.sampler.hf_model import SlotsBusy, TransformersSampler
from openrl.sampler.spec import SampleSpec
from factories import sample_spec
from test_backend import (  # noqa: F401  (fixtures)
    TOL,
    VOCAB,
    engine,
    load_from_engine,
    one,
    one_thread,
    prompts,
    ref_greedy,
    ref_logits,
    ref_logprobs,
    ref_model,
    sampler,
    tiny_path,
    trainer_logprobs,
)


def run(scheduler: Scheduler, arrivals: dict[int, list[tuple[object, SampleSpec]]], check=None) -> dict:
    """Step until idle, adding arrivals[k] right before step k; every result by spec_id."""
    results, k = {}, 0
    while k <= max(arrivals, default=0) or not scheduler.idle:
        for spec_id, spec in arrivals.get(k, []):
            scheduler.add(spec_id, spec)
        for spec_id, result in scheduler.step():
            assert spec_id not in results
            results[spec_id] = result
        if check is not None:
            check(scheduler)
        k += 1
    return results


def assert_same(alone, together, spec: SampleSpec) -> None:
    assert not isinstance(together, Exception), together
    assert len(together.sequences) == spec.num_samples
    for a, b in zip(alone.sequences, together.sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, **TOL)
        assert a.stop_reason == b.stop_reason
        if spec.topk_sample_logprobs:
            np.testing.assert_array_equal(a.topk_tokens, b.topk_tokens)
            np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, **TOL)
    for name in ("prompt_logprobs", "topk_prompt_tokens", "topk_prompt_logprobs", "prompt_alt_tokens", "prompt_alt_logprobs"):
        x, y = getattr(alone, name), getattr(together, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_allclose(x, y, **TOL)


def cache_is_tight(scheduler: Scheduler) -> None:
    """After a step the running cache is exactly as wide as its longest row (prompt + tokens)."""
    if scheduler.rows:
        assert scheduler._mask_b_W.shape[1] == int((scheduler._plen + scheduler._t).max())
        assert scheduler._cache.layers[0].keys.shape[2] == scheduler._mask_b_W.shape[1]


@pytest.mark.parametrize("joiner_adapter", [None, "m1", "m2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("joiner_len", [2, 20])  # shorter than the running cache, and longer
def test_request_joining_mid_generation_gets_what_it_gets_alone(
    sampler, ref_model, engine, joiner_adapter, temperature, joiner_len
):
    first_len = 5
    p_first, p_join = prompts(20 + joiner_len, (first_len, joiner_len))
    running = sample_spec(prompt=p_first, num_samples=2, max_tokens=30, seed=3, adapter="m1" if joiner_adapter is None else None, stop_at_eos=False)  # fmt: skip
    joiner = sample_spec(
        prompt=p_join, num_samples=2, max_tokens=12, temperature=temperature, seed=11, adapter=joiner_adapter, stop_at_eos=False
    )  # fmt: skip
    results = run(Scheduler(sampler), {0: [("running", running)], 7: [("joiner", joiner)]}, check=cache_is_tight)
    assert_same(one(sampler, running), results["running"], running)
    assert_same(one(sampler, joiner), results["joiner"], joiner)
    # And what the full forwards say, independently of the sampler.
    for seq in results["joiner"].sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        if joiner_adapter is None:
            if temperature == 0.0:
                assert seq.tokens.tolist() == ref_greedy(ref_model, p_join, 12)
            np.testing.assert_allclose(seq.logprobs, ref_logprobs(ref_model, p_join, seq.tokens), **TOL)
        else:
            np.testing.assert_allclose(seq.logprobs, trainer_logprobs(engine, joiner_adapter, p_join, seq.tokens), **TOL)
    if temperature == 0.0:
        a, b = results["joiner"].sequences
        np.testing.assert_array_equal(a.tokens, b.tokens)
    else:
        assert results["joiner"].sequences[0].tokens.tolist() != results["joiner"].sequences[1].tokens.tolist()


def test_joining_request_gets_its_prompt_statistics(sampler, ref_model):
    p_first, p_join = prompts(30, (4, 9))
    running = sample_spec(prompt=p_first, num_samples=3, max_tokens=20, seed=1, stop_at_eos=False)
    targets = np.array([[5, -1], [7, 8]] * 4, dtype=np.int64)
    joiner = sample_spec(
        prompt=p_join, num_samples=2, max_tokens=6, temperature=0.8, seed=2, stop_at_eos=False,
        prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=4, target_prompt_logprobs=targets,
        prompt_alt_tokens_k=2, adapter="m2",
    )  # fmt: skip
    results = run(Scheduler(sampler), {0: [("running", running)], 5: [("joiner", joiner)]}, check=cache_is_tight)
    alone = one(sampler, joiner)
    assert_same(alone, results["joiner"], joiner)
    np.testing.assert_allclose(alone.target_prompt_logprobs, results["joiner"].target_prompt_logprobs, **TOL)
    assert results["joiner"].sequences[0].topk_tokens.shape == (6, 4)
    assert results["running"].sequences[0].topk_tokens is None  # asked for none, though it shared the buffers
    assert_same(one(sampler, running), results["running"], running)


def test_a_long_generation_copies_its_cache_a_few_times_not_every_step(sampler):
    """Through the Scheduler: a request joining a running one, to 55 and 50 tokens; every result
    equals its request alone, the cache stays tight, and the layers' buffers changed a handful
    of times (a few regrowths for columns), not once per step as concatenation did, nor for the
    request joining or leaving (their rows are written and moved in place)."""
    p_first, p_join = prompts(7, (5, 9))
    running = sample_spec(prompt=p_first, num_samples=2, max_tokens=55, seed=3, stop_at_eos=False)
    joiner = sample_spec(prompt=p_join, num_samples=3, max_tokens=50, seed=5, adapter=None, stop_at_eos=False)
    buffers, capacities = [None], []

    def check(scheduler: Scheduler) -> None:
        cache_is_tight(scheduler)
        if scheduler.rows:
            layer = scheduler._cache.layers[0]
            assert isinstance(layer, RoomLayer)
            if layer._k is not buffers[-1]:
                buffers.append(layer._k)
            capacities.append(layer.capacity)

    results = run(Scheduler(sampler), {0: [("running", running)], 4: [("joiner", joiner)]}, check=check)
    assert_same(one(sampler, running), results["running"], running)
    assert_same(one(sampler, joiner), results["joiner"], joiner)
    assert len(capacities) >= 50 and len(buffers) - 1 <= 4
    # Each new buffer was for more columns: the join and the rows leaving happened in place.
    widths = [b.shape[2] for b in buffers[1:]]
    assert widths == sorted(set(widths)), widths
    assert max(capacities) <= max(5 + 55, 9 + 50)  # never past the widest window the rows can make


def test_many_staggered_arrivals_all_complete_correctly(sampler, ref_model):
    """Random requests arriving over time, more rows than fit (they wait), rows stopping at
    different times, an invalid request among them: each equals its request alone."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 24, 24)
    specs = []
    for i, n in enumerate(lengths):
        stop = rng.integers(4, VOCAB, int(rng.integers(0, 3))).tolist()
        specs.append(
            sample_spec(
                prompt=prompts(100 + i, (int(n),))[0],
                num_samples=int(rng.integers(1, 4)),
                max_tokens=int(rng.integers(1, 25)),
                temperature=float(rng.choice([0.0, 0.7, 1.0])),
                top_k=int(rng.choice([-1, 5])),
                seed=int(rng.integers(0, 1000)),
                stop_token_ids=stop,
                stop_at_eos=bool(rng.integers(0, 2)),
                adapter=[None, "m1", "m2"][i % 3],
                topk_sample_logprobs=int(rng.choice([0, 0, 2])),
                prompt_logprobs=bool(rng.integers(0, 2)),
            )
        )
    bad = sample_spec(prompt=[1, 2], num_samples=1, max_tokens=5, top_p=0.0)
    missing = sample_spec(prompt=[1, 2], num_samples=1, max_tokens=5, adapter="nope")
    arrivals: dict[int, list] = {}
    for i, spec in enumerate(specs):
        arrivals.setdefault(int(rng.integers(0, 30)), []).append((i, spec))
    arrivals.setdefault(9, []).extend([("bad", bad), ("missing", missing)])
    saved = sampler.max_batch_rows
    sampler.max_batch_rows = 8  # fewer rows than arrive: requests wait for rows to free up
    seen_rows = []
    try:
        scheduler = Scheduler(sampler)

        def check(s: Scheduler) -> None:
            cache_is_tight(s)
            assert s.rows <= 8
            seen_rows.append(s.rows)

        results = run(scheduler, arrivals, check=check)
    finally:
        sampler.max_batch_rows = saved
    assert scheduler.idle and scheduler.rows == 0 and not sampler._pins
    assert isinstance(results["bad"], InvalidRequest) and "top_p" in str(results["bad"])
    assert isinstance(results["missing"], InvalidRequest) and "nope" in str(results["missing"])
    assert len(results) == len(specs) + 2
    assert max(seen_rows) > 3  # requests really shared steps
    stopped = 0
    for i, spec in enumerate(specs):
        assert_same(one(sampler, spec), results[i], spec)
        stopped += sum(s.stop_reason == "stop" for s in results[i].sequences)
        if spec.adapter is None:
            temperature = 1.0 if spec.temperature == 0.0 else spec.temperature  # greedy: logprobs at 1
            for seq in results[i].sequences:
                np.testing.assert_allclose(seq.logprobs, ref_logprobs(ref_model, spec.prompt, seq.tokens, temperature), **TOL)
    assert stopped > 0  # some rows left early


def test_adapters_in_use_are_never_evicted_or_replaced_under_a_request(tiny_path, engine):
    sampler = TransformersSampler(tiny_path, device="cpu", max_adapters=2)  # two adapter slots
    load_from_engine(sampler, engine, "m1", key="x")
    p = prompts(40, (6,))[0]
    spec = sample_spec(prompt=p, num_samples=2, max_tokens=15, seed=4, adapter="x", stop_at_eos=False)
    alone = one(sampler, spec)
    scheduler = Scheduler(sampler)
    scheduler.add("a", spec)
    results = dict(scheduler.step())
    load_from_engine(sampler, engine, "m2", key="y")  # the second slot
    assert sampler.adapter_keys() == ["x", "y"]
    load_from_engine(sampler, engine, "m2", key="x")  # replaced; the running request keeps the old weights
    assert sampler.adapter_keys() == ["x"]  # "y", not in use, gave up its slot
    assert sampler._doomed == {sampler._adapters["x"] ^ 1}  # the old "x" slot, until its request finishes
    # Every slot pinned (the old "x" by "a", the new "x" by "b"): another adapter is refused,
    # nothing changes, and no request runs on a wrong adapter.
    spec_b = sample_spec(prompt=p, num_samples=1, max_tokens=15, seed=5, adapter="x", stop_at_eos=False)
    scheduler.add("b", spec_b)
    with pytest.raises(SlotsBusy, match="all 2 adapter slots"):
        load_from_engine(sampler, engine, "m1", key="z")
    assert sampler.adapter_keys() == ["x"]
    while not scheduler.idle:
        results.update(scheduler.step())
    assert_same(alone, results["a"], spec)
    # Finished: the old weights are gone and the cap holds again (the newest stays).
    assert sampler.adapter_keys() == ["x"] and not sampler._pins and not sampler._doomed
    for seq in results["b"].sequences:
        np.testing.assert_allclose(seq.logprobs, trainer_logprobs(engine, "m2", p, seq.tokens), **TOL)
    [seq] = one(sampler, sample_spec(prompt=p, num_samples=1, max_tokens=8, seed=4, adapter="x", stop_at_eos=False)).sequences
    np.testing.assert_allclose(seq.logprobs, trainer_logprobs(engine, "m2", p, seq.tokens), **TOL)


def test_abort_drops_everything_and_the_scheduler_goes_on(sampler):
    p, q = prompts(50, (3, 7))
    scheduler = Scheduler(sampler)
    scheduler.add("a", sample_spec(prompt=p, num_samples=2, max_tokens=10, seed=1, adapter="m1"))
    scheduler.step()
    scheduler.add("b", sample_spec(prompt=q, num_samples=1, max_tokens=10, seed=2))
    scheduler.add("bad", sample_spec(prompt=[], num_samples=1, max_tokens=10))
    assert sorted(scheduler.abort()) == ["a", "b"]
    assert scheduler.rows == 0 and not sampler._pins
    assert [i for i, r in scheduler.step()] == ["bad"]  # finished (here: failed) results still come back
    assert scheduler.idle
    spec = sample_spec(prompt=q, num_samples=1, max_tokens=10, seed=2, adapter="m2")
    results = run(scheduler, {0: [("c", spec)]})
    assert_same(one(sampler, spec), results["c"], spec)



def test_a_step_that_raises_can_be_aborted(sampler, monkeypatch):
    """A failure (a bug, out of memory) while a request is being admitted: abort names every
    request in flight, including the one being admitted, and releases their adapters."""
    p, q = prompts(70, (4, 6))
    scheduler = Scheduler(sampler)
    scheduler.add("a", sample_spec(prompt=p, num_samples=2, max_tokens=10, seed=1, adapter="m2"))
    scheduler.step()
    scheduler.add("b", sample_spec(prompt=q, num_samples=1, max_tokens=10, seed=2, adapter="m1"))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(sampler, "_forward", out_of_memory)
    with pytest.raises(RuntimeError):
        scheduler.step()
    pinned = dict(sampler._pins)  # by "a" and "b"
    with pytest.raises(RuntimeError):
        sampler.sample([sample_spec(prompt=p, num_samples=1, max_tokens=3, adapter="m1")])
    assert sampler._pins == pinned  # sample() released what it pinned
    monkeypatch.undo()
    assert sorted(scheduler.abort()) == ["a", "b"]
    assert scheduler.idle and scheduler.rows == 0 and not sampler._pins
    spec = sample_spec(prompt=q, num_samples=2, max_tokens=7, seed=3, adapter="m1")
    assert_same(one(sampler, spec), run(scheduler, {0: [("c", spec)]})["c"], spec)

async def test_engine_answers_each_request_as_it_finishes(sampler):
    """The transformers engine behind the async protocol: requests sent while others run are
    admitted between steps and answered on the event loop; a short request is not held up by a
    long one; a bad request fails alone."""
    import asyncio

    from openrl.sampler.hf_engine import HfEngine

    engine = HfEngine(sampler, max_requests=3, idle_wait_s=0.05)
    ps = prompts(60, (5, 3, 12, 7, 2))
    specs = [
        sample_spec(prompt=ps[0], num_samples=2, max_tokens=40, seed=1, stop_at_eos=False),
        sample_spec(prompt=ps[1], num_samples=1, max_tokens=3, seed=2, adapter="m1", stop_at_eos=False),
        sample_spec(prompt=ps[2], num_samples=3, max_tokens=9, temperature=0.0, adapter="m2"),
        sample_spec(prompt=ps[3], num_samples=1, max_tokens=6, seed=4, top_p=0.0),  # invalid
        sample_spec(prompt=ps[4], num_samples=2, max_tokens=5, seed=5, adapter="unloaded"),  # no weights: fails alone
        sample_spec(prompt=ps[3], num_samples=1, max_tokens=8, seed=6, adapter="m1", prompt_logprobs=True),
    ]
    order: list[int] = []

    async def sample(i: int):
        try:
            return await engine.sample(specs[i], None)
        except InvalidRequest as e:
            return e
        finally:
            order.append(i)

    try:
        tasks = []
        for i in range(len(specs)):
            tasks.append(asyncio.create_task(sample(i)))
            await asyncio.sleep(0.005)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        engine.close()
    assert isinstance(results[3], InvalidRequest) and "top_p" in str(results[3])
    assert isinstance(results[4], InvalidRequest) and "unloaded" in str(results[4])
    for i in (0, 1, 2, 5):
        assert_same(one(sampler, specs[i]), results[i], specs[i])
    assert order[-1] == 0  # the long request, first in, finished last
    assert not sampler._pins and not engine.dead


def test_a_cancelled_request_leaves_the_others_as_they_were(sampler):
    """Cancelling a request between steps takes its rows and their cache columns out of the decode
    at once and unpins its adapter; the rows around it get exactly what they get in a run without
    it. A request cancelled while it waits never runs."""
    pa, pb, pc, pd = prompts(80, (5, 12, 3, 4))
    a = sample_spec(prompt=pa, num_samples=2, max_tokens=30, seed=1, stop_at_eos=False)
    b = sample_spec(prompt=pb, num_samples=3, max_tokens=45, seed=2, adapter="m1", stop_at_eos=False)  # the longest prompt: the cache's widest rows
    c = sample_spec(prompt=pc, num_samples=1, max_tokens=25, seed=3, temperature=0.7, adapter="m2", stop_at_eos=False)
    d = sample_spec(prompt=pd, num_samples=1, max_tokens=10, seed=4, adapter="m1", stop_at_eos=False)
    without = run(Scheduler(sampler), {0: [("a", a)], 4: [("c", c)]})
    steps = 0

    def cancel_b_at_step_8(scheduler: Scheduler) -> None:
        nonlocal steps
        steps += 1
        cache_is_tight(scheduler)
        if steps == 8:  # a, b, c and d (admitted at step 7) running
            rows, width = scheduler.rows, scheduler._mask_b_W.shape[1]
            assert rows == 2 + 3 + 1 + 1
            assert scheduler.cancel("b") and not scheduler.cancel("b")
            assert scheduler.rows == rows - 3 and scheduler._mask_b_W.shape[1] < width  # b's prompt was the widest
            cache_is_tight(scheduler)
            assert scheduler.cancel("d") and scheduler.rows == rows - 4
            assert sampler._adapters["m1"] not in sampler._pins and sampler._adapters["m2"] in sampler._pins  # c's
            scheduler.add("e", d)  # queued, cancelled before it is admitted
            assert scheduler.cancel("e") and scheduler.requests == 2

    results = run(Scheduler(sampler), {0: [("a", a), ("b", b)], 4: [("c", c)], 7: [("d", d)]}, check=cancel_b_at_step_8)
    assert set(results) == {"a", "c"}
    assert_same(without["a"], results["a"], a)
    assert_same(without["c"], results["c"], c)
    assert not sampler._pins and not Scheduler(sampler).cancel("a")


async def test_engine_drops_a_cancelled_call_at_the_next_step(sampler, monkeypatch):
    """The transformers engine behind the async protocol: cancelling a `sample` call (the service
    does when the client left) takes its rows out of the running decode at the next step and frees
    its adapter slot; the request beside it gets what it gets alone, and the engine serves on."""
    import asyncio
    import time

    from openrl.sampler.hf_engine import HfEngine

    decode_rows: list[int] = []  # rows of each decode forward
    forward = sampler._forward

    def slow_forward(tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            decode_rows.append(tokens.shape[0])
            time.sleep(0.01)  # a long request stays long on a fast machine
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(sampler, "_forward", slow_forward)
    engine = HfEngine(sampler, max_requests=4, idle_wait_s=0.05)
    pl, ps = prompts(90, (6, 4))
    long = sample_spec(prompt=pl, num_samples=3, max_tokens=56, seed=1, adapter="m1", stop_at_eos=False)
    short = sample_spec(prompt=ps, num_samples=2, max_tokens=40, seed=2, adapter="m2", stop_at_eos=False)

    async def until(what, timeout_s=30.0):
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    try:
        doomed = asyncio.create_task(engine.sample(long, None))
        await until(lambda: decode_rows[-1:] == [3])
        kept = asyncio.create_task(engine.sample(short, None))
        await until(lambda: decode_rows[-1:] == [5])
        at = len(decode_rows)
        doomed.cancel()
        await until(lambda: sampler._adapters["m1"] not in sampler._pins, timeout_s=5)
        result = await asyncio.wait_for(kept, 60)
        assert doomed.cancelled()
        assert set(decode_rows[at + 1 :]) == {2}  # after the step under way, the short request's rows alone
        assert_same(one(sampler, short), result, short)
        # The engine serves on, the cancelled request's adapter included.
        again = sample_spec(prompt=pl, num_samples=1, max_tokens=5, seed=3, adapter="m1", stop_at_eos=False)
        assert_same(one(sampler, again), await asyncio.wait_for(engine.sample(again, None), 60), again)
    finally:
        engine.close()
    assert not sampler._pins and not engine.dead
