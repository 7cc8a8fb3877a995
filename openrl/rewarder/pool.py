"""A pool of reward worker processes (child.py) with a per-call timeout and a memory cap.

User code never runs in the rewarder itself: a crash, a C-level hang or a memory blow-up
takes down one worker process at most. A request's items go to the workers in chunks: a
worker borrowed from the idle queue gets several items in one frame, calls the function on
each in turn and sends each result as it is done. When a call raises, returns garbage or
runs out of memory the worker says so; when it dies or one call outlives `timeout_s` the
pool kills it. Either way that item gets an `ItemScore` with an error, the chunk's items it
had not reached go back to the request's queue, and a dead worker is replaced in the
background, so the pool keeps its size.

Chunks are sized to about `CHUNK_TARGET_S` of work (from the pool's recent seconds per call)
so a worker is handed out again often, and it goes to whichever waiting request is next in fair
order between API keys (openrl/fair.py, the cost being items): a key with several large
requests in flight gets the workers for half the chunks when one other key is waiting, not for
all but one of them. Within a key, its requests take turns (the one served least recently
first), so a small request is never queued behind all of a large one's items. One item per
frame cost 0.35 CPU-s in this process per 4,096 quick items (a task, a queue wait and a pipe
round trip each); docs/rewards.md has the figures.

The parent never imports the reward function: a module that fails to import, hangs or
crashes at import shows up here as a worker that does not get ready.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import math
import os
import signal
import struct
import sys
import time

import msgspec
import structlog

from openrl.bus.errors import InvalidRequest, Unavailable
from openrl.bus.messages import ItemScore, ScoreItem
from openrl.fair import FairShare
from openrl.rewarder.child import Ready, scrubbed_env

log = structlog.get_logger(__name__)

_HEADER = struct.Struct("<I")
_ready_decoder = msgspec.msgpack.Decoder(Ready)
_score_decoder = msgspec.msgpack.Decoder(ItemScore)
_encoder = msgspec.msgpack.Encoder()

CHUNK_TARGET_S = 0.02  # work per chunk: how long a worker is held before it goes back to the idle queue
MAX_CHUNK = 256  # items per chunk (one frame)


class RewardLoadError(InvalidRequest):
    """The reward function cannot be loaded (bad spec, import error): a configuration error."""


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    async def send(self, items: list[ScoreItem]) -> None:
        data = _encoder.encode(items)
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        await self.proc.stdin.drain()

    async def receive(self) -> bytes:
        (n,) = _HEADER.unpack(await self.proc.stdout.readexactly(_HEADER.size))
        return await self.proc.stdout.readexactly(n)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class Pool:
    def __init__(self, fn: str, name: str, size: int, *, timeout_s: float = 30.0, memory_mb: int = 2048, start_timeout_s: float = 60.0,
                 pass_env: tuple[str, ...] = ()):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.fn = fn
        self.name = name
        self.size = size
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.start_timeout_s = start_timeout_s
        self.pass_env = tuple(pass_env)  # variables a reward function sees though they look secret
        self.broken: str | None = None  # set when workers can no longer be started
        self._idle: collections.deque[_Worker] = collections.deque()  # never non-empty while runners wait
        # Runners waiting for a worker, by key: heaps of (when their request last got a worker,
        # arrival, request, future); a cancelled one stays until it reaches the top (its future
        # is done) and is dropped there.
        self._waiting: dict[str, list[tuple[int, int, int, asyncio.Future]]] = {}
        self._arrivals = itertools.count()
        self._ticks = itertools.count()  # hand-outs so far
        self._served: dict[int, int] = {}  # request -> the tick of its last hand-out (running requests only)
        self._share = FairShare()  # between the keys of waiting requests; cost = items
        self._requests = 0
        self._workers: set[_Worker] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._broken = asyncio.Event()
        self._busy_s = 0.0  # finished calls
        self._running: dict[int, float] = {}  # call id -> start (monotonic)
        self._next_call = 0
        self._call_s: float | None = None  # recent seconds per call (moving average), sizes chunks
        self.replaced = 0

    # -- workers

    async def _spawn(self) -> _Worker:
        env = {
            **scrubbed_env(os.environ, self.pass_env),  # no bus credentials, no secrets
            # The worker imports the function exactly as this process would.
            "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
            # One call at a time per process: the pool is the parallelism (and BLAS thread
            # pools would eat the address-space limit).
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "openrl.rewarder", self.name, "worker", self.fn,
            "--memory-mb", str(self.memory_mb), "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        worker = _Worker(proc)
        try:
            ready = _ready_decoder.decode(await asyncio.wait_for(worker.receive(), self.start_timeout_s))
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, msgspec.DecodeError, ConnectionError) as e:
            worker.kill()
            await proc.wait()
            why = "did not get ready in time" if isinstance(e, asyncio.TimeoutError) else f"died while starting ({_exit_status(proc.returncode)})"
            raise RewardLoadError(f"reward worker for {self.fn} {why}; see the log for its output") from None
        except BaseException:
            worker.kill()
            raise
        if ready.error:
            await proc.wait()
            raise RewardLoadError(ready.error)
        self._workers.add(worker)
        log.debug("reward_worker_started", name=self.name, pid=proc.pid)
        return worker

    async def start(self) -> None:
        """Start every worker; raises RewardLoadError when the function cannot be loaded."""
        results = await asyncio.gather(*(self._spawn() for _ in range(self.size)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for r in results:
            if not isinstance(r, BaseException):
                self._give(r)
        if errors:
            await self.close()
            raise errors[0]
        log.info("reward_pool_started", name=self.name, fn=self.fn, size=self.size, pids=self.pids())

    def pids(self) -> list[int]:
        return sorted(w.proc.pid for w in self._workers)

    def _retire(self, worker: _Worker, why: str) -> None:
        """Kill `worker` and start its replacement in the background (once, however often it is called)."""
        if worker not in self._workers:
            return
        worker.kill()
        self._workers.discard(worker)
        if self._closing:
            return
        self.replaced += 1
        log.warning("reward_worker_replaced", name=self.name, pid=worker.proc.pid, reason=why)
        task = asyncio.create_task(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, old: _Worker) -> None:
        await old.proc.wait()  # reap it
        for attempt in range(6):
            if self._closing:
                return
            try:
                self._give(await self._spawn())
                return
            except RewardLoadError as e:
                log.error("reward_worker_start_failed", name=self.name, attempt=attempt, error=str(e))
                await asyncio.sleep(min(8.0, 0.25 * 2**attempt))
        self.broken = f"reward workers for {self.fn} keep failing to start"
        self._broken.set()
        for heap in self._waiting.values():
            for *_, future in heap:
                if not future.done():
                    future.set_exception(Unavailable(self.broken))
        self._waiting.clear()

    async def wait_broken(self) -> str:
        await self._broken.wait()
        return self.broken or ""

    # -- calls

    async def score(self, item: ScoreItem) -> ItemScore:
        """Score one item in a worker; every failure of the user code is an ItemScore error."""
        return (await self.score_many([item]))[0]

    async def score_many(self, items: list[ScoreItem], key: str = "") -> list[ItemScore]:
        """Score every item, in order; every failure of the user code is an error for its item
        alone. At most `size` workers at once, each on a chunk at a time, handed out fairly
        between the `key`s (owners) of the requests waiting (docstring above). Raises
        Unavailable when the pool broke (it can no longer start workers)."""
        scores: list[ItemScore | None] = [None] * len(items)
        todo = collections.deque(range(len(items)))
        request = self._requests
        self._requests += 1

        async def runner() -> None:
            while todo:
                worker = await self._take(key, request)
                if not todo:  # the other runners took the rest meanwhile
                    self._give(worker)
                    return
                chunk = [todo.popleft() for _ in range(min(len(todo), self._chunk_size(len(todo))))]
                self._share.charge(key, len(chunk))
                await self._run(worker, items, chunk, scores, todo)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(self.size, len(items))):
                    tg.create_task(runner())
        except* Unavailable as group:
            raise group.exceptions[0] from None
        finally:
            self._served.pop(request, None)
        return scores  # type: ignore[return-value]  # every slot is filled once the runners end

    def _chunk_size(self, left: int) -> int:
        """About CHUNK_TARGET_S of calls, at most an even share of what is left per worker."""
        per_call = self._call_s
        target = 4 if per_call is None else int(CHUNK_TARGET_S / max(per_call, 1e-6))
        return max(1, min(MAX_CHUNK, target, math.ceil(left / self.size)))

    async def _run(self, worker: _Worker, items: list[ScoreItem], chunk: list[int], scores: list, todo: collections.deque) -> None:
        """Score `chunk` (item indices) in `worker`, filling `scores`; what the worker could not
        reach after a dead or retired call goes back to the front of `todo`."""
        call_id = self._next_call
        self._next_call += 1
        started = self._running[call_id] = time.monotonic()
        try:
            await worker.send([items[i] for i in chunk])
            for done, i in enumerate(chunk):
                try:
                    async with asyncio.timeout(self.timeout_s):
                        data = await worker.receive()
                    score = _score_decoder.decode(data)
                except TimeoutError:
                    self._retire(worker, "timeout")
                    score = ItemScore(error=f"reward function timed out after {self.timeout_s:g} s", error_kind="timeout")
                except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError):
                    try:  # the pipe closed: wait briefly for the exit status, which says why
                        await asyncio.wait_for(worker.proc.wait(), 2.0)
                    except asyncio.TimeoutError:
                        pass
                    finally:
                        status = _exit_status(worker.proc.returncode)
                        self._retire(worker, "crashed")
                    score = ItemScore(error=f"reward worker process died ({status})", error_kind="crashed")
                now = time.monotonic()
                seconds, started = now - started, now  # the worker started the next item as it sent this one
                scores[i] = msgspec.structs.replace(score, seconds=round(seconds, 6))
                if score.error_kind is None:
                    self._call_s = seconds if self._call_s is None else 0.9 * self._call_s + 0.1 * seconds
                elif score.error_kind == "memory":  # a MemoryError may leave the process half-broken
                    self._retire(worker, "memory")
                if worker not in self._workers:  # retired: the rest of the chunk goes to another worker
                    todo.extendleft(reversed(chunk[done + 1 :]))
                    return
            self._give(worker)
        except BaseException:  # cancelled mid-call (shutdown, request handed back): its state is unknown
            self._retire(worker, "cancelled")
            raise
        finally:
            self._busy_s += time.monotonic() - self._running.pop(call_id)

    async def _take(self, key: str, request: int) -> _Worker:
        """An idle worker, at once or when it is this request's turn (`_give`)."""
        if self.broken:
            raise Unavailable(self.broken)
        if self._idle:
            self._served[request] = next(self._ticks)
            return self._idle.popleft()
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting.setdefault(key, []), (self._served.get(request, -1), next(self._arrivals), request, future))
        try:
            return await future
        except BaseException:  # cancelled while waiting: a worker handed to it meanwhile goes on
            if future.done() and not future.cancelled() and future.exception() is None:
                self._give(future.result())
            raise

    def _give(self, worker: _Worker) -> None:
        """A worker is free: to the waiting runner next in fair order (the key least served so
        far; within a key, the request served least recently, a new one first), or to the idle
        queue when none waits. O(keys waiting + log runners)."""
        best: tuple[tuple[float, int, int], str] | None = None
        for key in list(self._waiting):
            heap = self._waiting[key]
            while heap and heap[0][-1].done():  # cancelled
                heapq.heappop(heap)
            if not heap:
                del self._waiting[key]
                continue
            rank = (self._share.vtime(key), heap[0][0], heap[0][1])
            if best is None or rank < best[0]:
                best = (rank, key)
        if best is None:
            self._idle.append(worker)
            return
        heap = self._waiting[best[1]]
        *_, request, future = heapq.heappop(heap)
        if not heap:
            del self._waiting[best[1]]
        self._served[request] = next(self._ticks)
        future.set_result(worker)

    def busy_seconds(self) -> float:
        """Seconds workers have spent in calls so far, counting the calls still running."""
        now = time.monotonic()
        return self._busy_s + sum(now - t for t in self._running.values())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self._workers)
        for w in workers:
            with contextlib.suppress(Exception):
                w.proc.stdin.close()  # an idle worker exits on EOF
            w.kill()
        await asyncio.gather(*(w.proc.wait() for w in workers), return_exceptions=True)
        self._workers.clear()


def _exit_status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
