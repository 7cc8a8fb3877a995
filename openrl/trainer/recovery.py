"""What a model's state is rebuilt from: its newest snapshot and its log of training requests.

A model's full state (adapter + AdamW) is stored in the object store every `snapshot_every`
requests; the train stream keeps every request as a log. Recovery (Trainer._hydrate) loads the
snapshot and replays the log after it. These are the bus reads and writes it needs.
"""

from __future__ import annotations

import time

import msgspec
import structlog
from nats.js.errors import NotFoundError, ObjectNotFoundError

from openrl.bus import paths, subjects
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


async def store_snapshot(bus: Bus, model_id: str, seq_id: int, blob: bytes) -> None:
    """Upload, then point the record at it, then drop the previous one. A crash in between
    leaves the previous record (still valid: recovery just replays more). Never raises: the
    log still holds everything."""
    obj = paths.snapshot_object(model_id, seq_id)
    try:
        previous = await bus.kv_get(bus.snapshots, model_id, SnapshotRecord)
        if previous is not None and previous.seq_id >= seq_id:
            return  # a replayed request: a newer snapshot exists
        await bus.objects.put(obj, blob)
        record = SnapshotRecord(model_id=model_id, seq_id=seq_id, object=obj, size_bytes=len(blob), created_at=time.time())
        await bus.kv_put(bus.snapshots, model_id, record)
        if previous is not None:
            await bus.objects.delete(previous.object)
        log.info("snapshot_saved", model_id=model_id, seq_id=seq_id, bytes=len(blob))
    except Exception as e:
        log.warning("snapshot_failed", model_id=model_id, seq_id=seq_id, error=repr(e))


async def newest_snapshot(bus: Bus, model_id: str) -> SnapshotRecord | None:
    return await bus.kv_get(bus.snapshots, model_id, SnapshotRecord)


async def checkpoint_blob(bus: Bus, obj: str) -> bytes:
    """A stored checkpoint's bytes; InvalidRequest when it is gone."""
    try:
        return (await bus.objects.get(obj)).data
    except (ObjectNotFoundError, NotFoundError):
        raise InvalidRequest(f"checkpoint data {obj} is gone (expired or deleted)") from None
