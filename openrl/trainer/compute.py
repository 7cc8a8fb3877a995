"""The trainer's one compute thread, shared fairly between API keys (openrl/fair.py).

Every call the trainer makes into its engine (a model's forward_backward or optim_step, a save's
export, a rebuild's import) waits here while the thread is busy, as a job with an owner key and a
cost in tokens. When the thread frees up, the next job is the one whose key's virtual time is the
lowest: one key's 4 x 2048-token steps no longer hold up the 16-token steps of sixteen others,
which run first; the big one runs once the others have run as much, or when nothing else waits.

A job may also be a generator run a step at a time (`steps`: a big forward_backward, one
micro-batch per step, or a slice of one pass: trainer/pauses.py): after each step it waits again,
in its key's turn, so other keys' jobs run between its steps. Its whole cost is charged when it
first starts; its later steps are neither charged nor move the virtual time, so the other keys
keep their turns ahead of it until they have run as much.

Jobs of one `kind` (forward_backward, forward-only or not) may share a call: with the job picked,
up to `max_shared - 1` more of its kind ride along (each key charged its own cost), lowest first,
those whose keys were not past the picked job's end in virtual time (a key's other models
with it, a key in debt not). The caller keeps each
model's order: a model holds its turn while its job waits, so it has at most one job here.

    compute = FairCompute(ThreadPoolExecutor(max_workers=1), max_shared=8)
    out = await compute.call("key-a", 64, engine.optim_step, model_id, adam)
    fut = await compute.submit("key-b", 4096, run_many, item, kind="fb")   # run_many(items) -> results
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from openrl.bus.errors import Unavailable
from openrl.fair import FairShare


@dataclass
class _Job:
    key: str
    cost: float
    run: Callable[[list[Any]], list[Any]]  # on the compute thread: one result per item
    item: Any
    kind: Hashable | None  # jobs of one kind may share a call
    done: asyncio.Future
    steps: Generator | None = None  # a job run a step at a time: its generator, once started


class _Steps:
    """`run` of a job run a step at a time (FairCompute.steps)."""

    def __init__(self, make: Callable[..., Generator], args: tuple):
        self.make, self.args = make, args


def _advance(job: _Job) -> tuple[bool, Any]:
    """One step of a stepped job, on the compute thread: (finished, its result)."""
    if job.steps is None:
        job.steps = job.item.make(*job.item.args)
    try:
        next(job.steps)
    except StopIteration as done:
        return True, done.value
    return False, None


SETTLE_TURNS = 16  # event-loop turns a finished call's follow-up gets to arrive (_let_ready_in)


def _call_one(items: list[tuple[Callable, tuple]]) -> list[Any]:
    (fn, args), = items
    return [fn(*args)]


class FairCompute:
    def __init__(self, pool: ThreadPoolExecutor, *, max_shared: int = 1, share: FairShare | None = None):
        self.pool = pool
        self.share = share or FairShare()
        self.max_shared = max(1, max_shared)
        self.busy_s = 0.0  # seconds the thread has spent on jobs
        self._waiting: list[_Job] = []
        self._dispatching: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def call(self, key: str, cost: float, fn: Callable, *args) -> Any:
        """`fn(*args)` on the compute thread, in `key`'s fair turn; its exception is raised here."""
        return await self.submit(key, cost, _call_one, (fn, args))

    async def steps(self, key: str, cost: float, make: Callable[..., Generator], *args) -> Any:
        """The return value of the generator `make(*args)`, run on the compute thread a step (a
        `next`) per turn of `key`: other keys' jobs run between its steps. Its exceptions are
        raised here. Cancelled, it runs no further step."""
        return await self.submit(key, cost, _advance, _Steps(make, args))

    async def submit(self, key: str, cost: float, run: Callable[[list[Any]], list[Any]], item: Any, kind: Hashable | None = None) -> Any:
        """`run([item, ...])`'s result for `item`, on the compute thread in `key`'s fair turn, in
        one call with other jobs of the same `kind` (None: alone). Cancelled before its call
        starts, it never runs."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(_Job(key=key, cost=cost, run=run, item=item, kind=kind, done=done))
        if self._dispatching is None or self._dispatching.done():
            self._dispatching = asyncio.ensure_future(self._dispatch())
        return await done

    async def _on_thread(self, loop, jobs: list[_Job], fn: Callable, arg) -> tuple[bool, Any]:
        """`fn(arg)` on the compute thread, its time counted busy: (True, its result), or (False,
        None) once its exception has failed `jobs` (theirs, not the next ones')."""
        started = time.perf_counter()
        try:
            return True, await loop.run_in_executor(self.pool, fn, arg)
        except Exception as e:  # the call's own error (or the executor shut down)
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(e)
            return False, None
        finally:
            self.busy_s += time.perf_counter() - started

    async def _step(self, loop, job: _Job) -> None:
        """Run one step of a stepped job; finished, hand its result over, else it waits again."""
        ok, out = await self._on_thread(loop, [job], _advance, job)
        if not ok:
            return
        finished, result = out
        if finished:
            if not job.done.done():
                job.done.set_result(result)
        else:  # its next step in its key's next turn (charged already)
            job.cost = 0.0
            self._waiting.append(job)

    async def _let_ready_in(self) -> None:
        """Before a job of a key ahead of the virtual time (it would run only because no other key
        waits), let the event loop turn a few times: a call that just finished often readies its
        model's next request (a client sends forward_backward and optim_step back to back), and
        that one should go first, not a whole call of the other key later. No wall-clock wait."""
        for _ in range(SETTLE_TURNS):
            live = [j for j in self._waiting if not j.done.done()]
            if not live or self.share.vtime(live[self.share.pick(live, key=lambda j: j.key)].key) <= self.share.now:
                return
            await asyncio.sleep(0)

    async def _close_dropped(self, loop) -> None:
        """Stepped jobs whose callers are gone (cancelled between two steps): their generators are
        closed on the compute thread, so that a pass paused inside (pauses.py) stops there and
        lets go of its thread and activations now, not whenever the garbage collector runs."""
        for job in [j for j in self._waiting if j.done.done() and j.steps is not None]:
            self._waiting.remove(job)
            await self._on_thread(loop, [], lambda _, gen=job.steps: gen.close(), None)

    def _next(self) -> list[_Job]:
        """The jobs of the next call (charged), out of the waiting ones."""
        self._waiting = [j for j in self._waiting if not j.done.done()]  # cancelled callers: never run
        if not self._waiting:
            return []
        lead = self._waiting.pop(self.share.pick(self._waiting, key=lambda j: j.key))
        before = {j.key: self.share.vtime(j.key) for j in self._waiting}  # as the call is formed
        if lead.steps is None:
            end = self.share.charge(lead.key, lead.cost)
        else:  # a later step of a job charged at its start: a continuation, neither charged nor moving
            # the virtual time (to its key's finish, past every other key, which would then rank
            # behind it and wait for all its steps)
            end = self.share.vtime(lead.key)
        batch = [lead]
        if lead.kind is not None and self.max_shared > 1:
            for job in self.share.order([j for j in self._waiting if j.kind == lead.kind], key=lambda j: j.key):
                if len(batch) >= self.max_shared:
                    break
                if before[job.key] <= end:  # not in debt past the picked job: rides along, charged its own
                    self.share.charge(job.key, job.cost, advance=False)
                    batch.append(job)
            for job in batch[1:]:
                self._waiting.remove(job)
        return batch

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Job] = []
        try:
            while True:
                await self._let_ready_in()
                await self._close_dropped(loop)
                if not (batch := self._next()):
                    break
                if isinstance(batch[0].item, _Steps):
                    await self._step(loop, batch[0])
                    continue
                ok, results = await self._on_thread(loop, batch, batch[0].run, [j.item for j in batch])
                if not ok:
                    continue
                for job, result in zip(batch, results, strict=True):
                    if not job.done.done():
                        job.done.set_result(result)
        finally:  # this task was cancelled (the loop is closing): nobody is left waiting forever
            for job in batch + self._waiting:
                if not job.done.done():
                    job.done.set_exception(Unavailable("trainer stopping"))
            self._waiting = [j for j in self._waiting if not j.done.done()]
