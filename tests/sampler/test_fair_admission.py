"""Sampler admission is fair between keys (openrl/fair.py): a hostile key's big requests queued
first do not fill the batch, or the engine's running requests, while other keys' requests wait;
while other keys have work, a key's rows in the decode are held to its share of the batch.

Uses the tiny model and sampler of test_backend.py. Requests are told apart by their owner key
(SampleSpec.owner, which the service fills from the request's future)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import pytest

from openrl.sampler.hf_batching import Scheduler
from openrl.sampler.hf_engine import HfEngine
from factories import sample_spec
from test_backend import engine, one, prompts, sampler, tiny_path  # noqa: F401  (fixtures)
from test_continuous import assert_same, run


def finish_order(scheduler: Scheduler, specs: dict[str, object]) -> list[str]:
    for spec_id, spec in specs.items():
        scheduler.add(spec_id, spec)
    order = []
    while not scheduler.idle:
        order += [spec_id for spec_id, _ in scheduler.step()]
    return order


def test_a_full_batch_admits_the_other_keys_before_the_hostile_keys_next(sampler, monkeypatch):
    monkeypatch.setattr(sampler, "max_batch_rows", 8)
    ps = prompts(70, (4, 3, 5))
    specs = {f"h{i}": sample_spec(prompt=ps[0], num_samples=8, max_tokens=3, seed=i, stop_at_eos=False, owner="hostile") for i in range(3)}
    specs |= {k: sample_spec(prompt=ps[1 + n], num_samples=1, max_tokens=3, seed=10 + n, stop_at_eos=False, owner=k) for n, k in enumerate("ab")}
    order = finish_order(Scheduler(sampler), specs)
    # h0 fills the batch (8 rows); then a and b (they have been admitted nothing yet), then h1, h2.
    # First come first served finished h0, h1, h2 before a and b.
    assert order == ["h0", "a", "b", "h1", "h2"], order


def rows_by_key(scheduler: Scheduler) -> Counter:
    return Counter(scheduler._running[n].spec.owner for n in scheduler._req)


def test_a_key_is_held_to_its_share_of_the_rows_while_another_key_has_work(sampler, monkeypatch):
    """A key's 128-sequence request alone takes the batch but its 16 reserve rows (48 of 64); a
    small key arriving then joins at the next step (the rule before the reserve: it waited for the
    big key's rows to finish, running rows are never preempted), and from then on the big key is
    held to 64 / 2 keys = 32 rows while the small key has work: its next slices join as its share
    allows. Every row is what it is when the request runs alone, in one piece."""
    ps = prompts(73, (5, 3))
    big = sample_spec(prompt=ps[0], num_samples=128, max_tokens=4, seed=3, temperature=1.0, stop_at_eos=False,
                      prompt_logprobs=True, topk_sample_logprobs=2, owner="hostile")  # fmt: skip
    small = sample_spec(prompt=ps[1], num_samples=1, max_tokens=6, seed=4, temperature=1.0, stop_at_eos=False, owner="small")
    alone = {"big": one(sampler, big), "small": one(sampler, small)}  # max_batch_rows 256: in one piece
    monkeypatch.setattr(sampler, "max_batch_rows", 64)
    seen: list[Counter] = []
    scheduler = Scheduler(sampler)
    results = run(scheduler, {0: [("big", big)], 1: [("small", small)]}, check=lambda s: seen.append(rows_by_key(s)))
    assert seen[0] == {"hostile": 48}, seen[0]  # alone: all but the reserve (once: all 128 rows; then all 64)
    with_small = [c for c in seen if c["small"]]
    assert with_small and seen.index(with_small[0]) == 1, seen  # at the next step, beside the running rows
    assert all(c["hostile"] <= 48 for c in with_small), seen  # nothing more for the big key meanwhile
    assert 32 in [c["hostile"] for c in with_small], seen  # its next slice: its share
    assert scheduler.idle and not sampler._pins
    for name, spec in (("big", big), ("small", small)):
        assert_same(alone[name], results[name], spec)


def test_a_small_key_is_admitted_beside_a_big_key_queued_first(sampler, monkeypatch):
    """Both queued at once, the big key first: the small key's row goes into the first step with
    the big key's share (the old code admitted the 128 rows alone, the small key after them)."""
    ps = prompts(74, (4, 3))
    big = sample_spec(prompt=ps[0], num_samples=128, max_tokens=3, seed=5, temperature=1.0, stop_at_eos=False, owner="hostile")
    small = sample_spec(prompt=ps[1], num_samples=1, max_tokens=3, seed=6, temperature=1.0, stop_at_eos=False, owner="small")
    alone = one(sampler, big)
    monkeypatch.setattr(sampler, "max_batch_rows", 64)
    seen: list[Counter] = []
    results = run(Scheduler(sampler), {0: [("big", big), ("small", small)]}, check=lambda s: seen.append(rows_by_key(s)))
    assert seen[0] == {"hostile": 32, "small": 1}, seen[0]
    assert seen[3] == {"hostile": 48}, seen  # the small key done: the big key alone fills the batch but the reserve
    assert_same(alone, results["big"], big)


def test_a_key_alone_uses_the_batch_but_the_reserve(sampler, monkeypatch):
    """One key's two 48-row requests fill the 64 rows but the 16 reserved for another key (the
    second one waits for the first), and a request with more samples than the batch takes the
    same 48 a slice. With a batch under 4 x the reserve, a key alone fills it all."""
    ps = prompts(75, (4, 6))
    specs = {f"r{i}": sample_spec(prompt=ps[i], num_samples=48, max_tokens=3, seed=i, temperature=1.0, stop_at_eos=False, owner="k") for i in range(2)}
    specs["huge"] = sample_spec(prompt=ps[0], num_samples=100, max_tokens=2, seed=7, temperature=1.0, stop_at_eos=False, owner="k")
    alone = {name: one(sampler, spec) for name, spec in specs.items()}
    monkeypatch.setattr(sampler, "max_batch_rows", 64)
    seen: list[int] = []
    results = run(Scheduler(sampler), {0: list(specs.items())}, check=lambda s: seen.append(s.rows))
    assert seen[0] == 48 and max(seen) == 48, seen
    for name, spec in specs.items():
        assert_same(alone[name], results[name], spec)
    monkeypatch.setattr(sampler, "max_batch_rows", 60)  # < 4 x 16: no reserve
    seen.clear()
    run(Scheduler(sampler), {0: [("huge", specs["huge"])]}, check=lambda s: seen.append(s.rows))
    assert seen[0] == 60, seen


def test_a_cancelled_request_with_samples_still_waiting_leaves_nothing_behind(sampler, monkeypatch):
    """Cancelled after its first slice: its running rows and its waiting samples both go, its
    adapter is unpinned, and the other key's request is what it is alone."""
    ps = prompts(76, (4, 3))
    big = sample_spec(prompt=ps[0], num_samples=40, max_tokens=8, seed=8, adapter="m1", stop_at_eos=False, owner="hostile")
    small = sample_spec(prompt=ps[1], num_samples=2, max_tokens=8, seed=9, temperature=1.0, stop_at_eos=False, owner="small")
    alone = one(sampler, small)
    monkeypatch.setattr(sampler, "max_batch_rows", 32)
    scheduler = Scheduler(sampler)
    scheduler.add("big", big)
    scheduler.add("small", small)
    assert scheduler.step() == [] and rows_by_key(scheduler) == {"hostile": 16, "small": 2}
    assert scheduler.requests == 2
    assert scheduler.cancel("big") and rows_by_key(scheduler) == {"small": 2} and scheduler.requests == 1
    results = run(scheduler, {})
    assert list(results) == ["small"] and scheduler.idle and not sampler._pins
    assert_same(alone, results["small"], small)


def test_within_a_key_requests_keep_their_order_and_equal_keys_alternate(sampler, monkeypatch):
    monkeypatch.setattr(sampler, "max_batch_rows", 2)
    p = prompts(71, (3,))[0]
    specs = {f"{k}{i}": sample_spec(prompt=p, num_samples=2, max_tokens=2, seed=i, stop_at_eos=False, owner=k) for k in "xy" for i in range(3)}
    assert finish_order(Scheduler(sampler), specs) == ["x0", "y0", "x1", "y1", "x2", "y2"]


@pytest.mark.timeout(120)
async def test_the_engine_admits_fairly_when_its_running_requests_are_full(sampler):
    """HfEngine(max_requests=1): a hostile key's three requests wait in the engine's queue with a
    small key's one behind them; the small one goes second, and every result is what it is alone."""
    eng = HfEngine(sampler, max_requests=1, idle_wait_s=0.05)
    queued = threading.Event()  # the engine takes nothing off its queue until all four are there
    take = eng._take
    eng._take = lambda pending, wait: (queued.wait(30), take(pending, wait))
    ps = prompts(72, (4, 3))
    specs = {f"h{i}": sample_spec(prompt=ps[0], num_samples=4, max_tokens=6, seed=i, stop_at_eos=False, owner="hostile") for i in range(3)}
    specs["small"] = sample_spec(prompt=ps[1], num_samples=1, max_tokens=2, seed=9, stop_at_eos=False, owner="small")
    order: list[str] = []

    async def sample(name: str):
        try:
            return await eng.sample(specs[name], None)
        finally:
            order.append(name)

    try:
        tasks = {}
        for name in specs:  # queued in this order: h0 runs, h1 and h2 wait, then small
            tasks[name] = asyncio.create_task(sample(name))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        queued.set()
        results = dict(zip(tasks, await asyncio.wait_for(asyncio.gather(*tasks.values()), 60)))
    finally:
        eng.close()
    assert order.index("small") < order.index("h1"), order  # first come first served: h0, h1, h2, small
    for name, spec in specs.items():
        assert_same(one(sampler, spec), results[name], spec)
