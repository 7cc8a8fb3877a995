"""Admission by share: a key that holds far more of what is in flight than another key that is
active now waits at the gateway, before its request is read, until it no longer does.

Inside each worker, keys already share fairly (fair.py: the trainer's compute thread, a
sampler's rows, a rewarder's workers). What those cannot share is what lies between processes:
on one machine (`openrl up`) the samplers, the rewarders, the trainer and the gateway take the
same cores or GPU, and a key flooding the samplers and rewarders slows every other key's
training however fairly each process orders its own work. So the gateway also limits how much
of the stack one key may hold at once, where all the processes meet:

- Each request that makes work is counted in flight, in its **pool**, from its admission to its
  done notice (futures.Waiters hears every one): creates and training requests in "train",
  sampling (Tinker and OpenAI routes) in "sample", scoring in "score". With `shared` (what
  `openrl up` sets: one machine) the three are one pool.
- Each key's **occupancy** in a pool is its number of requests in flight, averaged over the last
  few seconds (an exponential average, half-life `half_life_s`).
- A request of key k waits while k has at least max(`per_key`, `capacity` / the keys active in
  the pool) requests in flight there **and** another key that is active there now has an
  occupancy below k's divided by `slack`. A key alone, or among keys using about as much, is
  never held: nothing is held back that nobody else wants. A key always has its even share of
  `capacity` in flight (32 each for two keys, 4 each among sixteen), at least `per_key`: a
  tenant whose RL loop keeps many sample requests in flight, which a GPU batches almost for free,
  keeps most of them beside one light key; a flood among many keys is cut to a few.
- Creates, sampling and scoring wait; training requests (forward, forward_backward, optim_step,
  saves) are counted but never held: they are sequenced per model, and holding one while the
  key's later ones wait in the trainer for it would stall the model. The trainer shares its own
  thread between keys (compute.py).
- A request waits at most `max_hold_s` (then goes in: a heavy key is slowed, never starved),
  and at most `max_waiting` of one key's requests wait at once; past that a 429 with
  Retry-After, which changes nothing (the SDK sends it again).
- **Refusals cool a key down** (`middleware`): every 429 a key is answered fills its bucket by
  one, which drains at REFUSALS_PER_S. While it is over REFUSALS_BURST and another key is
  active, the key's next request of a route that makes work waits, before its body is read,
  until the bucket is back at the burst (at most MAX_COOL_S). The SDK backs off on a 429 by
  itself and never gets here; a client that ignores Retry-After (sending 4 MiB bodies far
  ahead of its model, or sessions past its quota, as fast as it can) no longer makes the gateway
  read them as fast as it sends them.

Per replica: each gateway replica counts what it admitted (a key spread over N replicas may
hold N times as much). A done notice lost by core NATS is caught by reading the future back
(`sweep`). Pure bookkeeping on the event loop; `clock` is injectable for the unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import structlog
from aiohttp import web

from openrl import metrics
from openrl.gateway.http import Backlogged

log = structlog.get_logger(__name__)

KINDS = ("train", "sample", "score")
SWEEP_EVERY_S = 10.0
SWEEP_AFTER_S = 30.0  # a request in flight this long has its future read back at each sweep
SWEEP_MAX = 256  # futures read back per sweep at most (a key may have thousands of training requests pending)
POLL_S = 0.05  # a waiting request re-checks this often (occupancies decay between events)
REFUSALS_BURST = 8.0  # 429s a key may be answered in a burst before its requests cool down
REFUSALS_PER_S = 4.0  # ... and how fast the bucket drains
MAX_COOL_S = 5.0
# The routes that make work (or KV writes) and so cool down; never a long poll or a heartbeat.
COOLED = ("/forward_backward", "/forward", "/optim_step", "/asample", "/score", "/create_session", "/create_model",
          "/save_weights", "/save_weights_for_sampler", "/save_weights_external", "/load_weights", "/completions", "/chat/completions")
ACTIVE_GAP_S = 1.0  # a key whose request finished or went in this recently is active (it is between requests)
STALE_S = 15.0  # a key with requests in flight but nothing admitted or finished for this long is not


@dataclass(frozen=True)
class AdmissionConfig:
    per_key: int = 2  # requests a key may always have in flight in a pool; 0 turns admission off
    capacity: int = 64  # ... and its even share of this many, among the keys active in the pool, if more
    slack: float = 2.0  # held only past slack x an active key's occupancy
    max_hold_s: float = 20.0  # below the SDK's 60 s HTTP timeout
    max_waiting: int = 64  # a key's requests waiting at once; past it a 429
    shared: bool = False  # one pool for all kinds: the processes share one machine
    half_life_s: float = 5.0


class _Key:
    """One key in one pool: requests in flight and waiting, and the average in flight."""

    __slots__ = ("n", "waiting", "occ", "at")

    def __init__(self, now: float):
        self.n = 0
        self.waiting = 0
        self.occ = 0.0
        self.at = now  # when n last changed

    def active(self, now: float) -> bool:
        """Wanting its share now: requests waiting, or one that went in or finished a moment
        ago, or requests in flight that are moving. One that has held the same requests in
        flight for STALE_S (a training request waiting for a seq_id its client never sends)
        is not."""
        quiet = now - self.at
        return self.waiting > 0 or quiet < ACTIVE_GAP_S or (self.n > 0 and quiet < STALE_S)

    def occupancy(self, now: float, decay: float) -> float:
        """The average of `n` over time, decayed to `now` (n has been constant since `at`)."""
        w = math.exp(-max(now - self.at, 0.0) * decay)
        return self.occ * w + self.n * (1.0 - w)

    def settle(self, now: float, decay: float) -> None:
        self.occ = self.occupancy(now, decay)
        self.at = now


@dataclass(eq=False)
class Slot:
    """One admitted request: in flight in its pool until all its request ids have finished
    (or, if it never tracked one, until the `admit` block exits)."""

    owner: str
    pool: str
    rids: set[str] = field(default_factory=set)
    since: float = 0.0
    left: bool = False
    admission: "Admission | None" = None

    def track(self, rid: str) -> None:
        """The request `rid` was accepted and is about to be published: in flight until its
        done notice."""
        assert self.admission is not None
        self.rids.add(rid)
        self.admission._slot_of[rid] = self


class Admission:
    def __init__(self, cfg: AdmissionConfig = AdmissionConfig(), clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self._decay = math.log(2) / max(cfg.half_life_s, 1e-3)
        self._pools: dict[str, dict[str, _Key]] = {}
        self._changed: dict[str, asyncio.Event] = {}  # set (and replaced) when a pool's counts change
        self._slot_of: dict[str, Slot] = {}  # request id -> its slot, while in flight
        self._forgot: dict[str, float] = {}  # pool -> when its idle keys were last dropped
        self._summaries: dict[str, tuple[float, int, list[tuple[float, str]]]] = {}  # pool -> (when, active keys, two lightest)
        self._refusals: dict[str, tuple[float, float]] = {}  # owner -> (bucket level, when)
        self.cooled = 0  # requests that cooled down (tests and the bench read it)
        self.held = 0  # requests that waited (tests and the bench read it)

    def pool(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown admission kind {kind!r}")
        return "all" if self.cfg.shared else kind

    def _key(self, pool: str, owner: str) -> _Key:
        keys = self._pools.setdefault(pool, {})
        k = keys.get(owner)
        if k is None:
            k = keys[owner] = _Key(self.clock())
        return k

    def occupancy(self, pool: str, owner: str) -> float:
        k = self._pools.get(pool, {}).get(owner)
        return 0.0 if k is None else k.occupancy(self.clock(), self._decay)

    def in_flight(self, pool: str, owner: str) -> int:
        k = self._pools.get(pool, {}).get(owner)
        return 0 if k is None else k.n

    def must_wait(self, pool: str, owner: str) -> bool:
        """Whether a new request of `owner` waits now (the rule in the module docstring)."""
        if self.cfg.per_key <= 0:
            return False
        keys = self._pools.get(pool, {})
        me = keys.get(owner)
        if me is None or me.n < self.cfg.per_key:
            return False
        now = self.clock()
        n_active, lightest = self._summary(pool, now)
        others = n_active - (1 if me.active(now) else 0)
        lighter = next((occ for occ, o in lightest if o != owner), None)
        if lighter is None or lighter * self.cfg.slack >= me.occupancy(now, self._decay):
            return False
        return me.n >= self.cfg.capacity / (others + 1)

    def _summary(self, pool: str, now: float) -> tuple[int, list[tuple[float, str]]]:
        """The keys active in `pool` now: how many, and the two lightest (occupancy, owner).
        One walk of the pool's keys per POLL_S / 2 or per change, whatever the requests waiting."""
        cached = self._summaries.get(pool)
        if cached is not None and now - cached[0] < POLL_S / 2:
            return cached[1], cached[2]
        active = [(k.occupancy(now, self._decay), o) for o, k in self._pools.get(pool, {}).items() if k.active(now)]
        lightest = heapq.nsmallest(2, active)
        self._summaries[pool] = (now, len(active), lightest)
        return len(active), lightest

    def _move(self, pool: str, owner: str, delta: int) -> None:
        k = self._key(pool, owner)
        k.settle(self.clock(), self._decay)
        k.n += delta
        self._summaries.pop(pool, None)
        self._notify(pool)
        self._forget(pool)

    def _forget(self, pool: str) -> None:
        """Drop the keys that hold nothing and have not for a while (at most every second)."""
        now = self.clock()
        if now - self._forgot.get(pool, -1e9) < 1.0:
            return
        self._forgot[pool] = now
        keys = self._pools[pool]
        for owner in [o for o, k in keys.items() if k.n == 0 and k.waiting == 0 and not k.active(now) and k.occupancy(now, self._decay) < 1e-3]:
            del keys[owner]

    def _notify(self, pool: str) -> None:
        event = self._changed.pop(pool, None)
        if event is not None:  # the requests waiting in this pool look again
            event.set()

    async def _enter(self, owner: str, kind: str) -> Slot:
        pool = self.pool(kind)
        slot = Slot(owner=owner, pool=pool, admission=self)
        if self.must_wait(pool, owner):
            k = self._key(pool, owner)
            if k.waiting >= self.cfg.max_waiting:
                raise Backlogged(
                    f"this key has {k.waiting} requests waiting for their share of the {pool} workers, the most it may "
                    "(other keys are active and this key holds far more in flight than they do): retry shortly"
                )
            started = time.monotonic()
            deadline = started + self.cfg.max_hold_s
            k.waiting += 1
            self._summaries.pop(pool, None)
            self.held += 1
            metrics.ADMISSION_HELD.inc(pool=pool)
            try:
                while self.must_wait(pool, owner) and (left := deadline - time.monotonic()) > 0:
                    event = self._changed.setdefault(pool, asyncio.Event())
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(event.wait(), min(POLL_S, left))
            finally:
                k.waiting -= 1  # (never forgotten meanwhile: _forget keeps a key with requests waiting)
                self._summaries.pop(pool, None)
                metrics.ADMISSION_HOLD_SECONDS.observe(time.monotonic() - started, pool=pool)
        slot.since = self.clock()
        self._move(pool, owner, +1)
        return slot

    def _leave(self, slot: Slot) -> None:
        if not slot.left:
            slot.left = True
            for rid in slot.rids:
                self._slot_of.pop(rid, None)
            self._move(slot.pool, slot.owner, -1)

    @contextlib.asynccontextmanager
    async def admit(self, owner: str, kind: str) -> AsyncIterator[Slot]:
        """Wait for `owner`'s turn to send work of `kind` (possibly not at all), then hold a
        place in flight: until the done notices of the request ids the block `track`s, or, if
        it tracks none (refused, or a retry of a request already accepted), until it exits."""
        slot = await self._enter(owner, kind)
        try:
            yield slot
        finally:
            if not slot.rids:
                self._leave(slot)

    # -- refusals

    def refusals(self, owner: str) -> float:
        """`owner`'s bucket of 429s, drained to now."""
        level, at = self._refusals.get(owner, (0.0, 0.0))
        return max(level - (self.clock() - at) * REFUSALS_PER_S, 0.0)

    def refused(self, owner: str) -> None:
        """`owner` was answered a 429."""
        level = min(self.refusals(owner) + 1.0, REFUSALS_BURST + MAX_COOL_S * REFUSALS_PER_S)
        self._refusals[owner] = (level, self.clock())
        if len(self._refusals) > 4096:  # drained buckets hold nothing
            self._refusals = {o: v for o, v in self._refusals.items() if self.refusals(o) > 0}

    def others_active(self, owner: str) -> bool:
        now = self.clock()
        return any(o != owner and k.active(now) for keys in self._pools.values() for o, k in keys.items())

    async def cool(self, owner: str) -> None:
        """Wait while `owner`'s refusals are over the burst and another key is active."""
        over = self.refusals(owner) - REFUSALS_BURST
        if self.cfg.per_key > 0 and over > 0 and self.others_active(owner):
            self.cooled += 1
            wait = min(over / REFUSALS_PER_S, MAX_COOL_S)
            metrics.ADMISSION_HELD.inc(pool="refusals")
            metrics.ADMISSION_HOLD_SECONDS.observe(wait, pool="refusals")
            await asyncio.sleep(wait)

    def middleware(self, owner_of: Callable[[web.Request], str]):
        """The aiohttp middleware for refusals: cools a key down before a route that makes work,
        and counts the 429s it is answered (inside it, the error middleware has made them)."""

        @web.middleware
        async def refusals(request: web.Request, handler):
            if request.method != "POST" or not request.path.endswith(COOLED):
                return await handler(request)
            try:
                owner = owner_of(request)
            except Exception:  # no key, or not a valid one: the handler answers that
                return await handler(request)
            await self.cool(owner)
            response = await handler(request)
            if response.status == 429:
                self.refused(owner)
            return response

        return refusals

    def count(self, owner: str, kind: str, rid: str) -> None:
        """`rid`, accepted, is in flight without having waited (training requests)."""
        slot = Slot(owner=owner, pool=self.pool(kind), since=self.clock(), admission=self)
        self._move(slot.pool, owner, +1)
        slot.track(rid)

    def finished(self, rid: str) -> None:
        """A request's done notice (every one this gateway hears, admitted here or not)."""
        slot = self._slot_of.pop(rid, None)
        if slot is not None:
            slot.rids.discard(rid)
            if not slot.rids:
                self._leave(slot)

    async def sweep(self, pending: Callable[[str], Awaitable[bool]], older_than_s: float = SWEEP_AFTER_S) -> int:
        """Read back the futures of requests in flight longer than `older_than_s`; those no
        longer pending (their done notice was lost) finish now. Returns how many did."""
        now = self.clock()
        done = 0
        old = [(slot.since, rid) for rid, slot in self._slot_of.items() if now - slot.since >= older_than_s]
        for _, rid in heapq.nsmallest(SWEEP_MAX, old):  # the oldest first; the rest at later sweeps
            if rid in self._slot_of and not await pending(rid):
                self.finished(rid)
                done += 1
        return done

    async def run_sweeps(self, pending: Callable[[str], Awaitable[bool]]) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                if n := await self.sweep(pending):
                    log.info("admission_swept", finished=n)
            except Exception as e:  # the bus is down: next time
                log.warning("admission_sweep_failed", error=repr(e))
