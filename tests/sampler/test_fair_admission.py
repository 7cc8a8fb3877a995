"""Sampler admission is fair between keys (openrl/fair.py): a hostile key's big requests queued
first do not fill the batch, or the engine's running requests, while other keys' requests wait.

Uses the tiny model and sampler of test_backend.py. Requests are told apart by their owner key
(SampleSpec.owner, which the service fills from the request's future)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from openrl.sampler.hf_batching import Scheduler
from openrl.sampler.hf_engine import HfEngine
from factories import sample_spec
from test_backend import engine, one, prompts, sampler, tiny_path  # noqa: F401  (fixtures)
from test_continuous import assert_same


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
