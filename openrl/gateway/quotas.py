"""Per-key quotas: how much one API key may hold at once, so that no key can exhaust what all
tenants share (docs/limits.md has the defaults and the flags).

- live sessions: not finished, and created or heartbeated within SESSION_LIVE_S (the SDK beats
  every 10 s while its ServiceClient lives);
- models: training runs in the key's live sessions;
- checkpoints: named saves (KV `openrl-weights`) not yet expired, by count and by bytes;
- reward items in flight: items of the key's score requests whose futures are still pending;
- sample sequences in flight: `num_samples` of the key's sample requests still pending, so one
  key cannot fill the samplers' shared queue;
- training bytes in flight: the bytes (as the bus carries them) of the key's training requests
  published and still pending, so one key cannot fill the train log ahead of the trainers. Past
  it a 429 with Retry-After that fills nothing (http.Backlogged): the client sends it again.

Every gateway keeps its own view of the first three by watching the KV buckets (as keys.py
watches the keys), so a check is a dictionary lookup, whichever replica answers; what this
replica creates counts at once, what another replica creates counts once its watch has seen
it (within a moment): a key racing several replicas may overshoot by the requests in flight.
What is in flight (reward items, sample sequences, training bytes) is counted by the replica
that accepted it, which publishes its totals per key to KV `inflight` (at most PUBLISH_DELAY_S
after a change, and every REFRESH_S while it holds any; the bucket's TTL drops a dead
replica's); every replica adds the others' totals to its own before a check. A refusal is a 429
naming the quota and its flag; a refused sequenced request still fills its seq_id
(service._in_sequence).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import msgspec
import structlog
from aiohttp import web

from openrl.bus.client import INFLIGHT_TTL_S, Bus, stop_watch
from openrl.bus.subjects import kv_key
from openrl.bus.messages import Future, InFlight, ModelRecord, SessionRecord, WeightsRecord, decode, encode
from openrl.gateway.http import Backlogged, QuotaExceeded

log = structlog.get_logger(__name__)

SESSION_LIVE_S = 120.0  # a session nobody heartbeated for this long no longer counts
SWEEP_EVERY_S = 0.5
SWEEP_ENTRIES = 4096
PUBLISH_DELAY_S = 0.1  # this replica's in-flight totals reach the others this long after a change (plus the bus)
REFRESH_S = 10.0  # ... and are rewritten this often while it holds any (the bucket's TTL is INFLIGHT_TTL_S)
MAX_PUBLISHED_OWNERS = 4096  # per kind: the keys holding the most (one entry stays well under a NATS payload)


@dataclass(frozen=True)
class Quotas:
    """What one key may hold; 0 turns a quota off."""

    sessions: int = 256
    models: int = 256
    checkpoints: int = 1024
    checkpoint_bytes: int = 64 * 1024**3
    reward_items: int = 65536
    sample_sequences: int = 1024
    train_bytes: int = 2 * 1024**3  # training requests in flight (published, future pending), as the bus carries them


class Usage:
    """What each key holds, kept current from the KV buckets, and the checks against `quotas`.
    Records are keyed as the bucket keys them (escaped: subjects.kv_key), so a deletion seen
    by the watch finds its record."""

    def __init__(self, bus: Bus, quotas: Quotas, replica: str | None = None):
        self.bus = bus
        self.quotas = quotas
        self.replica = replica or uuid.uuid4().hex[:16]  # this gateway's entry in KV `inflight`
        self.others: dict[str, InFlight] = {}  # the other replicas' in-flight totals, by their entry's key
        self._changed = asyncio.Event()  # what this replica holds in flight changed since it was published
        self._published = False  # its entry in KV `inflight` was ever written
        self.sessions: dict[str, SessionRecord] = {}
        self.models: dict[str, ModelRecord] = {}
        self.checkpoints: dict[str, WeightsRecord] = {}
        self._sessions_of: dict[str, set[str]] = defaultdict(set)
        self._models_of: dict[str, set[str]] = defaultdict(set)
        self._checkpoints_of: dict[str, set[str]] = defaultdict(set)
        # In flight, by kind ("reward", "sample"): owner -> request id -> items or sequences.
        self._in_flight: dict[str, dict[str, dict[str, int]]] = {"reward": defaultdict(dict), "sample": defaultdict(dict), "train": defaultdict(dict)}
        self._tasks: list[asyncio.Task] = []
        self._swept: dict[str, float] = {}  # owner -> when its training requests in flight were last read back
        self._in_flight_as: dict[str, tuple[str, str]] = {}  # request id -> (kind, owner), while in flight

    # -- what a key holds

    def live_sessions(self, owner: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return sum(1 for sid in self._sessions_of.get(owner, ()) if _live(self.sessions.get(sid), now))

    def live_models(self, owner: str, now: float | None = None) -> int:
        now = time.time() if now is None else now
        live = {self.sessions[k].session_id for k in self._sessions_of.get(owner, ()) if _live(self.sessions.get(k), now)}
        return sum(1 for k in self._models_of.get(owner, ()) if self.models[k].session_id in live)

    def held_checkpoints(self, owner: str, now: float | None = None) -> tuple[int, int]:
        now = time.time() if now is None else now
        recs = [self.checkpoints[p] for p in self._checkpoints_of.get(owner, ())]
        recs = [r for r in recs if r.expires_at is None or r.expires_at > now]
        return len(recs), sum(r.size_bytes for r in recs)

    # -- checks (each raises QuotaExceeded: a 429)

    def check_session(self, owner: str) -> None:
        q = self.quotas.sessions
        if q and (n := self.live_sessions(owner)) >= q:
            raise QuotaExceeded(
                f"quota exceeded: this key has {n} live sessions, the most it may hold (--quota-sessions / OPENRL_QUOTA_SESSIONS); "
                f"finish sessions it no longer uses (a session without heartbeats stops counting after {SESSION_LIVE_S:g} s)"
            )

    def check_model(self, owner: str) -> None:
        q = self.quotas.models
        if q and (n := self.live_models(owner)) >= q:
            raise QuotaExceeded(
                f"quota exceeded: this key has {n} models in its live sessions, the most it may hold "
                "(--quota-models / OPENRL_QUOTA_MODELS); finish the sessions of models it no longer trains"
            )

    def check_checkpoint(self, owner: str) -> None:
        n, size = self.held_checkpoints(owner)
        if self.quotas.checkpoints and n >= self.quotas.checkpoints:
            raise QuotaExceeded(
                f"quota exceeded: this key holds {n} checkpoints, the most it may hold "
                "(--quota-checkpoints / OPENRL_QUOTA_CHECKPOINTS); delete some, or save with a ttl_seconds"
            )
        if self.quotas.checkpoint_bytes and size >= self.quotas.checkpoint_bytes:
            raise QuotaExceeded(
                f"quota exceeded: this key's checkpoints hold {size} bytes, the most it may hold is "
                f"{self.quotas.checkpoint_bytes} (--quota-checkpoint-gb / OPENRL_QUOTA_CHECKPOINT_GB); delete some"
            )

    async def check_reward_items(self, owner: str, request_id: str, items: int) -> None:
        await self._check_in_flight(
            "reward", owner, request_id, items, self.quotas.reward_items,
            "reward items being scored", "--quota-reward-items / OPENRL_QUOTA_REWARD_ITEMS",
        )  # fmt: skip

    def scoring(self, owner: str, request_id: str, items: int) -> None:
        self._in_flight_as[request_id] = ("reward", owner)
        self._in_flight["reward"][owner][request_id] = items
        self._changed.set()

    async def check_samples(self, owner: str, request_id: str, sequences: int) -> None:
        await self._check_in_flight(
            "sample", owner, request_id, sequences, self.quotas.sample_sequences,
            "sequences being sampled", "--quota-samples / OPENRL_QUOTA_SAMPLES",
        )  # fmt: skip

    def sampling(self, owner: str, request_id: str, sequences: int) -> None:
        self._in_flight_as[request_id] = ("sample", owner)
        self._in_flight["sample"][owner][request_id] = sequences
        self._changed.set()

    async def check_train_bytes(self, owner: str, request_id: str, size: int) -> None:
        """Room for a training request of `size` bytes in the train log ahead of the trainer;
        past the quota a Backlogged (429 + Retry-After, nothing filled: the client retries)."""
        await self._check_in_flight(
            "train", owner, request_id, size, self.quotas.train_bytes,
            "bytes of training requests waiting to be applied", "--quota-train-gb / OPENRL_QUOTA_TRAIN_GB", error=Backlogged,
        )  # fmt: skip

    def training(self, owner: str, request_id: str, size: int) -> None:
        if self.quotas.train_bytes:  # (off: nothing would ever read the entries back)
            self._in_flight_as[request_id] = ("train", owner)
            self._in_flight["train"][owner][request_id] = size
            self._changed.set()

    def finished(self, request_id: str) -> None:
        """A request's future finished (its done notice, which futures.Waiters hears for every
        request): it is no longer in flight, and no quota check reads its future back. A notice
        that never arrives (core NATS drops some) is covered by the read-back below."""
        where = self._in_flight_as.pop(request_id, None)
        if where is not None:
            kind, owner = where
            mine = self._in_flight[kind].get(owner)
            if mine is not None:
                mine.pop(request_id, None)
                if not mine:
                    del self._in_flight[kind][owner]
            self._changed.set()

    def held_elsewhere(self, kind: str, owner: str, now: float | None = None) -> int:
        """What the other gateway replicas have in flight for `owner` (as they last published it;
        an entry older than the bucket's TTL is a replica that died: not counted)."""
        now = time.time() if now is None else now
        return sum(rec.held.get(kind, {}).get(owner, 0) for rec in self.others.values() if now - rec.at < INFLIGHT_TTL_S)

    def published(self, now: float | None = None) -> InFlight:
        """This replica's entry for KV `inflight`: its totals per kind and owner (nonzero only)."""
        held = {}
        for kind, by_owner in self._in_flight.items():
            totals = sorted(((sum(m.values()), owner) for owner, m in by_owner.items() if m), reverse=True)
            if totals:
                held[kind] = {owner: n for n, owner in totals[:MAX_PUBLISHED_OWNERS]}
        return InFlight(replica=self.replica, at=time.time() if now is None else now, held=held)

    async def _check_in_flight(self, kind: str, owner: str, request_id: str, n: int, q: int, what: str, flag: str,
                               error: type[Exception] = QuotaExceeded) -> None:  # fmt: skip
        """Room for `n` more in flight; finished requests are forgotten first (read back from
        their futures only when the count says the key is at its quota)."""
        mine = self._in_flight[kind][owner]
        if not q or request_id in mine:
            return
        theirs = self.held_elsewhere(kind, owner)
        # Training requests are many, small ones too, and finish in order: they are read back
        # also when a key has more than SWEEP_ENTRIES of them (else a quota of bytes would let
        # millions of small entries pile up), at most every SWEEP_EVERY_S per key, oldest first,
        # stopping once there is room.
        held = sum(mine.values())
        if kind != "train":
            sweep = held + theirs + n > q
        else:
            sweep = (held + theirs + n > q or len(mine) > SWEEP_ENTRIES) and time.monotonic() - self._swept.get(owner, 0.0) > SWEEP_EVERY_S
        if sweep:
            self._swept[owner] = time.monotonic()
            for rid in list(mine):
                fut = await self.bus.kv_get(self.bus.futures, rid, Future)
                if fut is None or fut.state != "pending":
                    held -= mine.pop(rid, 0)
                    self._in_flight_as.pop(rid, None)
                    self._changed.set()
                    if kind == "train" and held + theirs + n <= q and len(mine) <= SWEEP_ENTRIES // 2:
                        break
        if (held := sum(mine.values()) + theirs) + n > q:
            where = f" ({theirs} of them through other gateway replicas)" if theirs else ""
            raise error(
                f"quota exceeded: this key has {held} {what}{where} and asks for {n} more; at most {q} may be in flight "
                f"({flag}): wait for results before sending more"
            )

    # -- kept current

    def saw_session(self, rec: SessionRecord) -> None:
        self._saw(self.sessions, self._sessions_of, kv_key(rec.session_id), rec)

    def saw_model(self, rec: ModelRecord) -> None:
        self._saw(self.models, self._models_of, kv_key(rec.model_id), rec)

    def saw_checkpoint(self, rec: WeightsRecord) -> None:
        self._saw(self.checkpoints, self._checkpoints_of, kv_key(rec.path), rec)

    @staticmethod
    def _saw(records: dict, index: dict[str, set[str]], key: str, rec) -> None:
        records[key] = rec
        index[rec.owner].add(key)

    def saw_inflight(self, rec: InFlight) -> None:
        if rec.replica != self.replica:
            self.others[kv_key(rec.replica)] = rec
        # Replicas that died wrote no deletion (their entries expired): forgotten here.
        for key in [k for k, r in self.others.items() if time.time() - r.at >= INFLIGHT_TTL_S]:
            del self.others[key]

    @staticmethod
    def _forget(records: dict, index: dict[str, set[str]] | None, key: str) -> None:
        rec = records.pop(key, None)
        if rec is not None and index is not None:
            index[rec.owner].discard(key)

    async def _watch(self, kv, type_, saw, records, index, ready: asyncio.Event) -> None:
        unreadable: set[str] = set()  # entries of another shape: skipped, said once each
        while True:
            watcher = None
            try:
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is None:  # the initial values are in
                        ready.set()
                        continue
                    if entry.operation in ("DEL", "PURGE") or not entry.value:
                        self._forget(records, index, entry.key)
                        continue
                    try:
                        rec = decode(entry.value, type_)
                    except msgspec.MsgspecError as e:  # not ours to count; watching goes on
                        if entry.key not in unreadable and len(unreadable) < 10_000:
                            unreadable.add(entry.key)
                            log.warning("quota_entry_unreadable", bucket=getattr(kv, "_name", ""), key=entry.key, error=str(e))
                        continue
                    saw(rec)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus reconnecting: watch again
                log.warning("quota_watch_failed", bucket=getattr(kv, "_name", ""), error=repr(e))
                await asyncio.sleep(1.0)
            finally:
                await stop_watch(watcher)  # its subscription (an ordered consumer) goes with it

    async def start(self) -> None:
        watches = [
            (self.bus.sessions, SessionRecord, self.saw_session, self.sessions, self._sessions_of),
            (self.bus.models, ModelRecord, self.saw_model, self.models, self._models_of),
            (self.bus.weights, WeightsRecord, self.saw_checkpoint, self.checkpoints, self._checkpoints_of),
            (self.bus.inflight, InFlight, self.saw_inflight, self.others, None),
        ]
        ready = []
        for kv, type_, saw, records, index in watches:
            event = asyncio.Event()
            ready.append(event)
            self._tasks.append(asyncio.create_task(self._watch(kv, type_, saw, records, index, event)))
        self._tasks.append(asyncio.create_task(self._publish()))
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 20)
        except asyncio.TimeoutError:
            log.warning("quota_usage_not_loaded", after_s=20)

    async def _publish(self) -> None:
        """Keep this replica's entry in KV `inflight` current: rewritten PUBLISH_DELAY_S after a
        change, and every REFRESH_S while it holds anything (so that the TTL keeps it)."""
        key = kv_key(self.replica)
        written_empty = True  # nothing written yet: nothing to clear
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), REFRESH_S)
                await asyncio.sleep(PUBLISH_DELAY_S)  # a burst of changes, one write
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
            entry = self.published()
            if not entry.held and written_empty:
                continue
            try:
                await self.bus.inflight.put(key, encode(entry))
                written_empty = not entry.held
                self._published = True
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus reconnecting: the next change or refresh writes it
                log.warning("quota_inflight_not_published", error=repr(e))
                self._changed.set()
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._published or not self.bus.nc.is_connected:
            return  # nothing to clear, or no bus to clear it on (the entry expires with the TTL)
        try:  # what this replica held no longer counts anywhere (else it would until the TTL)
            await asyncio.wait_for(self.bus.inflight.delete(kv_key(self.replica)), 2.0)
        except Exception as e:
            log.info("quota_inflight_not_cleared", error=repr(e))


def _live(rec: SessionRecord | None, now: float) -> bool:
    if rec is None or rec.finished_at is not None:
        return False
    return now - max(rec.created_at, rec.last_heartbeat or 0.0) < SESSION_LIVE_S


USAGE = web.AppKey("usage", Usage)


def attach(app: web.Application, gw) -> None:
    """Load and watch what each key holds for this gateway (`gw.usage`)."""

    async def start(app: web.Application) -> None:
        await gw.usage.start()

    async def stop(app: web.Application) -> None:
        await gw.usage.stop()

    app[USAGE] = gw.usage
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
