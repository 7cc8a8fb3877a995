"""What a model's state is rebuilt from: its newest snapshot and its log of training requests.

A model's full state (adapter + AdamW) is stored in the object store every `snapshot_every`
requests; the train stream keeps the requests as a log, purged below the newest snapshot once
it is recorded (docs/storage.md). Recovery (Trainer._hydrate) loads the snapshot and replays
the log after it. These are the bus reads and writes it needs.
"""

from __future__ import annotations

import time

import msgspec
import structlog
from nats.js.errors import NotFoundError, ObjectNotFoundError

from openrl.bus import objects, paths, subjects
from openrl.bus.client import Bus
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import ModelRecord, SnapshotRecord, TrainRequest, decode

log = structlog.get_logger(__name__)


async def read_log(bus: Bus, rec: ModelRecord) -> tuple[dict[int, tuple[int, TrainRequest]], int]:
    """The model's training requests from the stream, first occurrence of each seq_id, as
    {seq_id: (stream sequence, request)}, and the stream sequence after the last one read."""
    subject = subjects.train(rec.base_model, rec.model_id)
    entries: dict[int, tuple[int, TrainRequest]] = {}
    after = 1
    async for raw in bus.messages(subjects.TRAIN_STREAM, subject):
        after = raw.seq + 1
        try:
            msg = decode(raw.data, TrainRequest)
            entries.setdefault(msg.seq_id, (raw.seq, msg))
        except msgspec.MsgspecError:
            log.error("log_entry_undecodable", model_id=rec.model_id, stream_seq=raw.seq)
    return entries, after


async def store_snapshot(bus: Bus, model_id: str, seq_id: int, blob: bytes) -> bool:
    """Upload, then point the record at it, then drop the previous one. A crash in between
    leaves the previous record (still valid: recovery just replays more). Never raises: the
    log still holds everything after the previous snapshot. True when a snapshot at or past
    `seq_id` is recorded (so the log below it may go)."""
    obj = paths.snapshot_object(model_id, seq_id)
    try:
        previous = await bus.kv_get(bus.snapshots, model_id, SnapshotRecord)
        if previous is not None and previous.seq_id >= seq_id:
            return True  # a replayed request: a newer snapshot exists
        await bus.objects.put(obj, blob)
        record = SnapshotRecord(model_id=model_id, seq_id=seq_id, object=obj, size_bytes=len(blob), created_at=time.time())
        await bus.kv_put(bus.snapshots, model_id, record)
        if previous is not None:
            await objects.delete(bus.objects, previous.object)
        log.info("snapshot_saved", model_id=model_id, seq_id=seq_id, bytes=len(blob))
        return True
    except Exception as e:
        log.warning("snapshot_failed", model_id=model_id, seq_id=seq_id, error=repr(e))
        return False


async def applied_below(bus: Bus, rec: ModelRecord) -> int | None:
    """The stream sequence below which every message of the model's log is acked by its
    consumer: each one applied, a duplicate of one applied, or dead (and failed in its place).
    Read while the model's turn is held right after seq_id S was applied, nothing past S has
    been applied yet, so every message below it has seq_id <= S. None when it cannot be read."""
    try:
        info = await bus.js.consumer_info(subjects.TRAIN_STREAM, subjects.train_consumer(rec.base_model, rec.model_id))
        return info.ack_floor.stream_seq + 1 if info.ack_floor and info.ack_floor.stream_seq else None
    except Exception as e:  # no consumer (a replay outside a trainer), the bus reconnecting: purge nothing
        log.warning("log_position_unknown", model_id=rec.model_id, error=repr(e))
        return None


async def purge_log(bus: Bus, rec: ModelRecord, below: int) -> None:
    """Drop the model's log entries with stream sequence < `below`. Only after a snapshot that
    covers all of them is recorded (`store_snapshot`, `applied_below`): recovery starts at the
    snapshot and replays only what follows it. Never raises: an entry left is only replayed
    as a duplicate (skipped)."""
    try:
        await bus.js.purge_stream(subjects.TRAIN_STREAM, subject=subjects.train(rec.base_model, rec.model_id), seq=below)
        log.info("log_purged", model_id=rec.model_id, below_stream_seq=below)
    except Exception as e:
        log.warning("log_purge_failed", model_id=rec.model_id, error=repr(e))


async def newest_snapshot(bus: Bus, model_id: str) -> SnapshotRecord | None:
    return await bus.kv_get(bus.snapshots, model_id, SnapshotRecord)


async def checkpoint_blob(bus: Bus, obj: str) -> bytes:
    """A stored checkpoint's bytes; InvalidRequest when it is gone."""
    try:
        return (await bus.objects.get(obj)).data
    except (ObjectNotFoundError, NotFoundError):
        raise InvalidRequest(f"checkpoint data {obj} is gone (expired or deleted)") from None
