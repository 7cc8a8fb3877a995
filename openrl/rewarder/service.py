"""The rewarder process: competing consumers of one reward function's score queue.

Every rewarder serving a reward name pulls from the same durable consumer on the
`OPENRL_REWARD` work queue (`openrl.reward.<name>`), so N processes share the load and a
request that a dead rewarder held is redelivered to another one after `ack_wait`; while a
request is being scored its message is kept alive with in-progress acks.

A request's items are scored concurrently in the process pool (pool.py); a failing item
becomes an error in its own slot and never fails the request. The result is written to
the request's future with compare-and-set on the pending entry, so a request is recorded
once even when two rewarders end up scoring it (a redelivery racing a slow first attempt),
and a redelivered request whose future is already done is not scored again.

SIGTERM: stop fetching, hand unfinished requests back at once (nak, not after ack_wait),
kill the workers, remove the heartbeat, exit.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
from dataclasses import dataclass

import msgspec
import structlog
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from openrl import metrics
from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.messages import Future, ScoreRequest, ScoreResult, WorkerInfo, decode, encode
from openrl.rewarder.pool import Pool

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RewarderConfig:
    fn: str  # "my_pkg.rewards:exact_match"
    name: str  # what clients ask for
    nats_url: str = "nats://127.0.0.1:4222"
    concurrency: int = 2  # worker processes, i.e. calls at once
    timeout_s: float = 30.0  # per call
    memory_mb: int = 2048  # address-space limit of each worker process; 0 = none
    worker_id: str = ""
    heartbeat_s: float = 2.0
    ack_wait_s: float = 10.0  # a dead rewarder's requests go to another after this
    busy_window_s: float = 30.0  # busy_fraction is measured over this much recent time


class Rewarder:
    def __init__(self, cfg: RewarderConfig, bus: Bus, pool: Pool):
        self.cfg = cfg
        self.bus = bus
        self.pool = pool
        self.worker_id = cfg.worker_id or f"rewarder-{cfg.name}-{socket.gethostname()}-{os.getpid()}"
        self._started = time.time()
        self._busy_samples: collections.deque[tuple[float, float]] = collections.deque()
        self.scored = 0

    async def on_score(self, msg: ScoreRequest) -> None:
        key = subjects.kv_key(msg.request_id)
        try:
            entry = await self.bus.futures.get(key)
        except KeyNotFoundError:
            # Published straight to the bus (a recipe, a replayed recording), not through the
            # gateway: score it all the same; the result is created, not updated.
            entry = None
        if entry is not None and entry.value is not None:
            pending = decode(entry.value, Future)
            if pending.state != "pending":  # scored before (a redelivery after the result was stored):
                await self.bus.announce_finished(msg.request_id, entry.value)  # its scorer may have died before announcing
                return
        else:
            entry = None
            pending = Future(request_id=msg.request_id, owner="", request_type="Score", created_at=time.time())
        started = time.monotonic()
        scores = await self.pool.score_many(msg.items, key=pending.owner)  # Unavailable (the pool broke): the bus naks the request
        result = ScoreResult(request_id=msg.request_id, reward_name=self.cfg.name, scores=scores, worker_id=self.worker_id)
        done = encode(msgspec.structs.replace(pending, state="done", content_type="json", payload=msgspec.json.encode(result), finished_at=time.time()))
        try:
            if entry is None:
                await self.bus.futures.create(key, done)
            else:
                await self.bus.futures.update(key, done, last=entry.revision)
        except KeyWrongLastSequenceError:
            log.info("score_already_recorded", request_id=msg.request_id)
            await self.bus.announce_finished(msg.request_id)
            return
        await self.bus.announce_finished(msg.request_id, done)
        self.scored += 1
        metrics.REWARD_SECONDS.observe(time.monotonic() - started, reward=self.cfg.name)
        metrics.REWARD_ITEMS.inc(len(result.scores), reward=self.cfg.name)
        for s in result.scores:
            if s.error is not None:
                metrics.REWARD_ERRORS.inc(reward=self.cfg.name, kind=s.error_kind or "exception")
        errors = sum(s.error is not None for s in result.scores)
        log.info("scored", request_id=msg.request_id, items=len(msg.items), errors=errors, seconds=round(time.monotonic() - started, 4))

    def busy_fraction(self) -> float:
        """Time the workers spent in calls over the last `busy_window_s`, per worker."""
        now = time.monotonic()
        busy = self.pool.busy_seconds()
        samples = self._busy_samples
        samples.append((now, busy))
        while len(samples) > 2 and now - samples[1][0] >= self.cfg.busy_window_s:
            samples.popleft()
        t0, b0 = samples[0]
        if now - t0 < 1e-6:
            return 0.0
        return max(0.0, min(1.0, (busy - b0) / ((now - t0) * self.pool.size)))

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            kind="rewarder",
            host=socket.gethostname(),
            pid=os.getpid(),
            base_model="",
            reward_name=self.cfg.name,
            concurrency=self.pool.size,
            started_at=self._started,
            heartbeat_at=time.time(),
            busy_fraction=self.busy_fraction(),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop`; raises when the pool can no longer start workers."""
        self._busy_samples.append((time.monotonic(), 0.0))
        broken = asyncio.ensure_future(self.pool.wait_broken())
        broken.add_done_callback(lambda _: stop.set())
        log.info("rewarder_ready", worker_id=self.worker_id, name=self.cfg.name, fn=self.cfg.fn, workers=self.pool.pids())
        try:
            await asyncio.gather(
                self.bus.heartbeat(self.worker_id, self.info, self.cfg.heartbeat_s, stop),
                self.bus.consume(
                    stream=subjects.REWARD_STREAM,
                    durable=subjects.rewarder_consumer(self.cfg.name),
                    filter_subject=subjects.reward(self.cfg.name),
                    type_=ScoreRequest,
                    handle=self.on_score,
                    on_dead=lambda msg, reason: self.bus.fail_dead(msg.request_id, "Score", reason),
                    ack_wait_s=self.cfg.ack_wait_s,
                    # Take only what the pool can start on soon: the rest stays in the queue for
                    # the other rewarders (and is not stranded for ack_wait if this one dies).
                    max_inflight=2 * self.pool.size,
                    batch=self.pool.size,
                    stop=stop,
                ),
            )
        finally:
            broken.cancel()
            await self.pool.close()
            log.info("rewarder_stopped", worker_id=self.worker_id, scored=self.scored, replaced_workers=self.pool.replaced)
        if self.pool.broken:
            raise RuntimeError(self.pool.broken)
