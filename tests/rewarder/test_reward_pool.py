"""The worker-process pool on its own: every way user code can fail becomes an error for
that item, dead or hung workers are replaced, and the pool keeps serving."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from openrl.rewarder.pool import Pool, RewardLoadError

from rewarder_helpers import item
from stack_helpers import alive


async def _full(pool: Pool, timeout_s: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(pool.pids()) < pool.size or len(pool._idle) < pool.size:  # noqa: SLF001 - waiting for replacements
        assert time.monotonic() < deadline, f"pool did not refill: {pool.pids()}"
        await asyncio.sleep(0.05)
    return pool.pids()


@pytest.fixture
async def chaos_pool():
    pool = Pool("chaos_rewards:chaos", "chaos-pool", 2, timeout_s=1.5, memory_mb=256)
    await pool.start()
    yield pool
    pids = pool.pids()
    await pool.close()
    assert not [p for p in pids if alive(p)], "close() left workers running"


FAILURES = [
    ("raise:x", "exception", "ValueError: boom x"),
    ("sleep:30", "timeout", "timed out after 1.5 s"),
    ("exit", "crashed", "exit code 3"),
    ("kill", "crashed", "killed by SIGKILL"),
    ("oom:1024", "memory", "limit 256 MB"),
    ("nan", "bad_result", "returned nan"),
    ("str", "bad_result", "expected a float or a dict of floats"),
]


@pytest.mark.parametrize("completion,kind,message", FAILURES, ids=[f[0] for f in FAILURES])
async def test_a_failing_call_is_an_error_for_its_item_and_the_pool_keeps_serving(chaos_pool, completion, kind, message):
    before = await _full(chaos_pool)
    score = await chaos_pool.score(item(completion))
    assert score.reward is None
    assert score.error_kind == kind
    assert message in score.error
    if kind == "timeout":
        assert 1.5 <= score.seconds < 3.0
    # The same pool goes on scoring, at full size, with the failed worker replaced if it had to go.
    for i in range(4):
        assert (await chaos_pool.score(item(f"ok:{i}"))).reward == float(i)
    after = await _full(chaos_pool)
    replaced = kind in ("timeout", "crashed", "memory")
    assert chaos_pool.replaced == (1 if replaced else 0)
    assert (set(after) != set(before)) == replaced
    for pid in set(before) - set(after):
        assert not alive(pid), f"replaced worker {pid} still runs"


async def test_failures_and_successes_in_parallel_each_get_their_own_result(chaos_pool):
    completions = ["ok:1", "kill", "ok:2", "sleep:30", "raise:y", "ok:3", "exit", "dict", "ok:4"]
    scores = await asyncio.gather(*(chaos_pool.score(item(c)) for c in completions))
    assert [s.reward for s in scores] == [1.0, None, 2.0, None, None, 3.0, None, 1.25, 4.0]
    assert [s.error_kind for s in scores] == [None, "crashed", None, "timeout", "exception", None, "crashed", None, None]
    assert scores[7].metrics == {"format": 0.25, "correct": 1.0}
    assert len(await _full(chaos_pool)) == 2


async def test_user_output_and_stdin_do_not_touch_the_protocol(chaos_pool):
    assert (await chaos_pool.score(item("print"))).reward == 2.0
    assert (await chaos_pool.score(item("stdin"))).reward == 0.0  # stdin is /dev/null
    assert (await chaos_pool.score(item("reference", reference={"x": 4.5}))).reward == 4.5
    assert chaos_pool.replaced == 0


async def test_calls_run_in_parallel_in_separate_processes(chaos_pool):
    started = time.monotonic()
    scores = await asyncio.gather(*(chaos_pool.score(item("sleep:0.6")) for _ in range(4)))
    elapsed = time.monotonic() - started
    assert [s.reward for s in scores] == [1.0] * 4
    assert 1.1 < elapsed < 2.5, elapsed  # two at a time
    pids = {(await chaos_pool.score(item("pid"))).reward for _ in range(6)}
    assert pids <= {float(p) for p in chaos_pool.pids()} and os.getpid() not in pids
    assert chaos_pool.busy_seconds() >= 2.3


async def test_workers_show_their_role_in_ps(chaos_pool):
    for pid in chaos_pool.pids():
        cmdline = open(f"/proc/{pid}/cmdline").read().split("\0")
        assert cmdline[1:6] == ["-m", "openrl.rewarder", "chaos-pool", "worker", "chaos_rewards:chaos"], cmdline
        assert open(f"/proc/{pid}/comm").read().strip() == "openrl-rewardfn"


async def test_async_functions_and_dicts_of_floats():
    pool = Pool("chaos_rewards:async_length", "async", 1, timeout_s=5, memory_mb=256)
    await pool.start()
    try:
        score = await pool.score(item("abcd", prompt="xy"))
        assert score.reward == 4.0 and score.metrics == {"reward": 4.0, "prompt_chars": 2.0} and score.error is None
    finally:
        await pool.close()


@pytest.mark.parametrize(
    "fn,message",
    [
        ("broken_rewards:anything", "this reward module is broken on purpose"),
        ("chaos_rewards:missing", "has no attribute 'missing'"),
        ("chaos_rewards:raise_at_import", "is not callable"),
        ("no_such_module_xyz:fn", "No module named 'no_such_module_xyz'"),
        ("not-a-spec", "module:function"),
    ],
)
async def test_a_function_that_cannot_be_loaded_is_a_clear_error(fn, message):
    pool = Pool(fn, "bad", 2, timeout_s=5)
    with pytest.raises(RewardLoadError) as e:
        await pool.start()
    assert message in str(e.value)
    assert pool.pids() == []


async def test_cancelled_calls_leave_the_pool_whole(chaos_pool):
    """A request handed back mid-call (shutdown) kills the busy worker; waiting calls just leave."""
    running = [asyncio.create_task(chaos_pool.score(item("sleep:30"))) for _ in range(2)]
    waiting = [asyncio.create_task(chaos_pool.score(item("ok:1"))) for _ in range(3)]
    await asyncio.sleep(0.5)
    busy = chaos_pool.pids()
    for task in running + waiting:
        task.cancel()
    await asyncio.gather(*running, *waiting, return_exceptions=True)
    after = await _full(chaos_pool)
    assert not set(after) & set(busy) and not [p for p in busy if alive(p)]
    assert [s.reward for s in await asyncio.gather(*(chaos_pool.score(item(f"ok:{i}")) for i in range(4)))] == [0.0, 1.0, 2.0, 3.0]
    assert chaos_pool.busy_seconds() < 5


async def test_a_failure_inside_a_chunk_costs_its_item_alone_and_the_rest_are_scored_in_order():
    """One worker, so a request's items go to it several per frame: after a crash, a timeout or
    an out-of-memory call mid-chunk, the items the worker had not reached go to its replacement."""
    pool = Pool("chaos_rewards:chaos", "chunks", 1, timeout_s=1.5, memory_mb=256)
    await pool.start()
    try:
        assert pool._chunk_size(100) > 1  # noqa: SLF001 - the premise: several items per frame
        completions = ["ok:1", "kill", "ok:2", "ok:3", "sleep:30", "ok:4", "oom:1024", "ok:5", "raise:z", "ok:6", "exit", "ok:7"]
        scores = await pool.score_many([item(c) for c in completions])
        assert [s.reward for s in scores] == [1.0, None, 2.0, 3.0, None, 4.0, None, 5.0, None, 6.0, None, 7.0]
        assert [s.error_kind for s in scores] == [None, "crashed", None, None, "timeout", None, "memory", None, "exception", None, "crashed", None]
        assert 1.5 <= scores[4].seconds < 3.0
        assert pool.replaced == 4
        assert [s.reward for s in await pool.score_many([item(f"ok:{i}") for i in range(300)])] == [float(i) for i in range(300)]
        assert len(await _full(pool)) == 1
    finally:
        await pool.close()


async def test_a_small_request_is_not_queued_behind_a_large_ones_items():
    """A key's requests take turns chunk by chunk (the one served least recently first): a
    1-item request sent while a 300-item one of the same key runs (3 s of calls on one worker)
    finishes first. With one task per item, all of the large request's items were queued
    ahead of it."""
    pool = Pool("chaos_rewards:chaos", "turns", 1, timeout_s=5, memory_mb=256)
    await pool.start()
    try:
        large = asyncio.create_task(pool.score_many([item("sleep:0.01")] * 300))
        await asyncio.sleep(0.3)
        small = await pool.score_many([item("ok:7")])
        assert small[0].reward == 7.0
        assert not large.done()
        assert [s.reward for s in await large] == [1.0] * 300
    finally:
        await pool.close()


async def test_one_frame_carries_many_quick_items():
    """Quick calls are sent in large chunks (the per-frame cost is the pool's overhead)."""
    pool = Pool("chaos_rewards:chaos", "quick", 2, timeout_s=5, memory_mb=256)
    await pool.start()
    try:
        scores = await pool.score_many([item(f"ok:{i % 7}") for i in range(4096)])
        assert [s.reward for s in scores] == [float(i % 7) for i in range(4096)]
        assert pool._next_call < 4096 // 16  # noqa: SLF001 - frames sent: far fewer than items
    finally:
        await pool.close()


async def test_workers_are_shared_fairly_between_keys_not_between_requests(tmp_path):
    """Key a has four 60-item requests in flight when key b sends one of 20 items, one worker:
    from b's first call to its last, a's calls are about as many as b's (half the chunks each),
    not four times as many (one turn per request), and a's own requests take turns. The calls'
    log gives their order."""
    log = tmp_path / "calls.log"
    pool = Pool("chaos_rewards:counted", "fair", 1, timeout_s=5, memory_mb=256)
    await pool.start()
    try:

        def items(first: int, n: int) -> list:
            return [item("x", reference={"i": first + i, "sleep": 0.01, "log": str(log)}) for i in range(n)]

        a = [asyncio.create_task(pool.score_many(items(100 * r, 60), key="a")) for r in range(4)]
        while not log.exists() or len(log.read_text().split()) < 20:  # a runs alone for a while
            await asyncio.sleep(0.01)
        b = await pool.score_many(items(1000, 20), key="b")
        assert [s.reward for s in b] == [1000.0 + i for i in range(20)]
        for r, scores in enumerate(await asyncio.gather(*a)):
            assert [s.reward for s in scores] == [100.0 * r + i for i in range(60)]
        calls = [int(x) for x in log.read_text().split()]
        positions = [i for i, c in enumerate(calls) if c >= 1000]
        a_between = sum(1 for c in calls[positions[0] : positions[-1]] if c < 1000)
        assert a_between <= 28, (a_between, calls)  # 20 (+ a chunk or two); one turn per request gives ~80
        # Within key a, its requests take turns: each of the four started before any finished.
        first = [min(i for i, c in enumerate(calls) if 100 * r <= c < 100 * r + 60) for r in range(4)]
        last = [max(i for i, c in enumerate(calls) if 100 * r <= c < 100 * r + 60) for r in range(4)]
        assert max(first) < min(last), (first, last)
    finally:
        await pool.close()
