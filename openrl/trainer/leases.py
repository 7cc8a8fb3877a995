"""Which trainer owns which model: one trainer's view of the leases of its base model.

The leases bucket (KV `openrl-leases`) is the truth: one key per model, written only by
compare-and-set. Every trainer watches the leases of its base model. A trainer holds
(consumes the training requests of) exactly the models whose lease names it. A model whose
owner's heartbeat is gone is taken over by the least loaded live trainer; the old owner, if
it was only paused, sees the lease move and lets go. The model's durable consumer and its log
outlive any owner, so the new owner rebuilds the state and resumes where the old one stopped.

This module reads and moves leases; what a trainer does when one changes (start or stop
consuming a model) is the service's `_reconcile`, called back with the model id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import nats
import structlog
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE

from openrl import metrics
from openrl.bus import subjects
from openrl.bus.client import Bus, stop_watch
from openrl.bus.messages import Lease, WorkerInfo, decode, encode

log = structlog.get_logger(__name__)


def least_loaded(candidates: set[str], load: dict[str, int]) -> str:
    """The rule every trainer computes the same way: fewest models, ties by worker id."""
    return min(candidates, key=lambda w: (load.get(w, 0), w))


class Leases:
    def __init__(self, bus: Bus, base_model: str, worker_id: str, on_change: Callable[[str], None]):
        self.bus = bus
        self.base_model = base_model
        self.worker_id = worker_id
        self.on_change = on_change  # called with a model id whose lease changed
        self.by_model: dict[str, tuple[Lease, int]] = {}  # model_id -> (lease, KV revision), as last seen
        self._keys: dict[str, str] = {}  # KV key -> model_id (deletes carry only the key)

    def mine(self, model_id: str) -> bool:
        entry = self.by_model.get(model_id)
        return entry is not None and entry[0].owner == self.worker_id and entry[0].failed is None

    def counts(self) -> dict[str, int]:
        """Models per owner (failed leases not counted)."""
        counts: dict[str, int] = {}
        for lease, _ in self.by_model.values():
            if lease.failed is None:
                counts[lease.owner] = counts.get(lease.owner, 0) + 1
        return counts

    def orphans(self, live: set[str]) -> list[str]:
        return sorted(m for m, (lease, _) in self.by_model.items() if lease.failed is None and lease.owner not in live)

    async def live_trainers(self) -> set[str]:
        """Worker ids of the trainers of this base model whose heartbeat is current (and this one)."""
        live = {self.worker_id}
        for key in await self.bus.kv_keys(self.bus.workers):
            try:
                info = await self.bus.kv_get(self.bus.workers, key, WorkerInfo)
            except (msgspec.MsgspecError, NotFoundError):
                continue
            if info is not None and info.kind == "trainer" and info.base_model == self.base_model:
                live.add(info.worker_id)
        return live

    async def place(self, model_id: str) -> Lease:
        """The model's lease: the existing one, or a new one for the least loaded live trainer."""
        key = subjects.lease_key(self.base_model, model_id)
        lease = await self.bus.kv_get(self.bus.leases, key, Lease)
        if lease is not None:
            return lease
        owner = least_loaded(await self.live_trainers(), self.counts())
        lease = Lease(model_id=model_id, base_model=self.base_model, owner=owner, acquired_at=time.time())
        if not await self.bus.kv_create(self.bus.leases, key, lease):
            lease = await self.bus.kv_get(self.bus.leases, key, Lease)  # another trainer placed it first
        return lease

    async def mark_failed(self, model_id: str, error: str) -> None:
        """A model that could not be built: its lease says why, and nobody takes it over."""
        key = subjects.lease_key(self.base_model, model_id)
        entry = self.by_model.get(model_id)
        lease = entry[0] if entry else await self.bus.kv_get(self.bus.leases, key, Lease)
        if lease is not None and lease.owner == self.worker_id and lease.failed is None:
            await self.bus.kv_put(self.bus.leases, key, msgspec.structs.replace(lease, failed=error))

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep `by_model` current from the bucket (an ordered consumer; it survives reconnects)."""
        while not stop.is_set():
            watcher = None
            try:
                watcher = await self.bus.leases.watch(subjects.lease_prefix(self.base_model))
                while not stop.is_set():
                    try:
                        entry = await watcher.updates(timeout=1.0)
                    except nats.errors.TimeoutError:
                        continue
                    if entry is None:  # the initial values are all in
                        continue
                    if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
                        model_id = self._keys.pop(entry.key, None)
                        if model_id is not None:
                            self.by_model.pop(model_id, None)
                            self.on_change(model_id)
                        continue
                    try:
                        lease = decode(entry.value, Lease)
                    except msgspec.MsgspecError:
                        log.error("lease_undecodable", key=entry.key)
                        continue
                    self._keys[entry.key] = lease.model_id
                    self.by_model[lease.model_id] = (lease, entry.revision)
                    self.on_change(lease.model_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # reconnecting: watch again
                log.warning("lease_watch_failed", error=repr(e))
                await asyncio.sleep(1.0)
            finally:
                await stop_watch(watcher)

    async def take_over(self, model_id: str) -> bool:
        """Move an orphan's lease to this trainer by compare-and-set; False if another moved it first."""
        lease, revision = self.by_model[model_id]
        new = msgspec.structs.replace(
            lease, owner=self.worker_id, epoch=lease.epoch + 1, acquired_at=time.time(), previous_owner=lease.owner
        )
        key = subjects.kv_key(subjects.lease_key(self.base_model, model_id))
        try:
            revision = await self.bus.leases.update(key, encode(new), last=revision)
        except KeyWrongLastSequenceError:
            return False  # the watch brings the news
        self.by_model[model_id] = (new, revision)
        log.warning("model_taken_over", model_id=model_id, previous_owner=lease.owner, epoch=new.epoch)
        return True

    async def hand_over(self, models: list[str]) -> None:
        """Shutting down: move each model's lease to the least loaded other live trainer by
        compare-and-set, so it takes the model now rather than after the heartbeat TTL. A lease
        that moved meanwhile is left alone; with no other trainer, leases stay (a restart with
        the same worker id takes its models straight back)."""
        try:
            heirs = await self.live_trainers() - {self.worker_id}
        except Exception as e:  # the bus is gone: the others take over after the TTL
            log.warning("hand_over_failed", error=repr(e), models=len(models))
            return
        if not heirs:
            log.info("models_kept", models=len(models), reason="no other live trainer")
            return
        load = {w: n for w, n in self.counts().items() if w in heirs}
        moved = 0
        for model_id in models:
            key = subjects.kv_key(subjects.lease_key(self.base_model, model_id))
            try:
                entry = await self.bus.leases.get(key)
                lease = decode(entry.value, Lease)
                if lease.owner != self.worker_id or lease.failed is not None:
                    continue
                heir = least_loaded(heirs, load)
                new = msgspec.structs.replace(lease, owner=heir, epoch=lease.epoch + 1, acquired_at=time.time(), previous_owner=self.worker_id)
                await self.bus.leases.update(key, encode(new), last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # moved meanwhile: whoever moved it owns it
            except Exception as e:
                log.warning("hand_over_failed", model_id=model_id, error=repr(e))
                continue
            load[heir] = load.get(heir, 0) + 1
            moved += 1
            metrics.LEASES_HANDED_OVER.inc()
            log.info("model_handed_over", model_id=model_id, to=heir, epoch=new.epoch)
        log.info("models_handed_over", moved=moved, held=len(models))
