"""The object store in chunks: read, copy and delete objects without holding them whole.

nats-py's `ObjectStore.get()` gathers every chunk of an object into one bytes value (and its
push subscription may buffer many chunks ahead of a slow reader), so a gateway serving a 10 GB
checkpoint would hold 10 GB. Here an object is read one chunk at a time, each chunk fetched only
when the previous one has been handed on (a direct get by stream sequence), so memory is one
chunk (128 KiB, nats-py's default chunk size) whatever the object's size. `copy` feeds those
chunks to nats-py's own `put` through a reader, so the copy is written in chunks too.

`put` and `read` are for whole objects held in memory anyway (adapters, checkpoints): `put`
writes in chunks of `CHUNK_BYTES` (1 MiB) rather than nats-py's 128 KiB, and `read` fetches by
direct gets (raw messages) rather than through a consumer, so the default model's adapter (0.5 MB) goes in one
publish and comes back in two round trips (its info, its one chunk), where nats-py took four
acknowledged publishes and a consumer's creation: these are on the path from a save to the first
token sampled with the new weights. Readers in chunks (`chunks`) hold one chunk of 1 MiB.

`delete` also drops the object's tombstone: nats-py marks a deleted object with a meta message
that stays in the stream forever, which with one object name per saved version (adapters,
snapshots) is a little growth per training step.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import AsyncIterator

import nats.errors
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import OBJ_CHUNKS_PRE_TEMPLATE, OBJ_META_PRE_TEMPLATE, ObjectStore

GONE = (ObjectNotFoundError, ObjectDeletedError, NotFoundError)
CHUNK_BYTES = 1 << 20  # well under the server's max_payload (32 MiB, bus/server.py, deploy/nats)


class Truncated(Exception):
    """An object changed or was deleted while it was being read."""


def _stream(store: ObjectStore) -> str:
    return store._stream  # noqa: SLF001 - nats-py keeps the stream name here


def _meta_subject(store: ObjectStore, name: str) -> str:
    return OBJ_META_PRE_TEMPLATE.format(bucket=store._name, obj=base64.urlsafe_b64encode(name.encode()).decode())  # noqa: SLF001


async def open_object(js: JetStreamContext, store: ObjectStore, name: str) -> tuple[int, AsyncIterator[bytes]]:
    """(size, chunks) of the object as it is now; one of GONE when it does not exist.

    The chunks are read one at a time, each fetched when the previous one was consumed; the
    iterator raises Truncated when the object was deleted or replaced meanwhile (or its digest
    does not match): a caller streaming it out must then abort its response."""
    info = await store.get_info(name)
    return info.size, _chunks(js, store, name, info)


async def chunks(js: JetStreamContext, store: ObjectStore, name: str) -> AsyncIterator[bytes]:
    """The object's bytes chunk by chunk (`open_object`); GONE on the first step when it does not exist."""
    info = await store.get_info(name)
    async for chunk in _chunks(js, store, name, info):
        yield chunk


async def _chunks(js: JetStreamContext, store: ObjectStore, name: str, info, direct: bool = False) -> AsyncIterator[bytes]:
    """`direct`: each chunk by a direct get (the raw message), falling back to the stream
    leader's API (JSON, the chunk in base64: a 0.5 MB chunk takes 3-4x as long) only when the
    direct get finds nothing: any replica may answer a direct get, and one behind the leader
    may not have the chunk yet."""
    if info.size == 0:
        return
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=store._name, obj=info.nuid)  # noqa: SLF001
    digest = hashlib.sha256()
    seq, total = 1, 0
    while total < info.size:
        try:
            try:
                raw = await js.get_msg(_stream(store), seq=seq, subject=subject, next=True, direct=direct)
            except NotFoundError:
                if not direct:
                    raise
                raw = await js.get_msg(_stream(store), seq=seq, subject=subject, next=True)
        except NotFoundError:
            raise Truncated(f"object {name} was deleted or replaced while it was read") from None
        seq = raw.seq + 1
        digest.update(raw.data)
        total += len(raw.data)
        yield raw.data
    want = (info.digest or "").split("=", 1)[-1]
    if total != info.size or (want and base64.urlsafe_b64decode(want) != digest.digest()):
        raise Truncated(f"object {name} does not match its digest")


async def put(store: ObjectStore, name: str, data: bytes) -> int:
    """Store `data` as the object `name` (replacing any object of that name) in chunks of
    CHUNK_BYTES; its size."""
    meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
    return (await store.put(name, data, meta=meta)).size


async def read(js: JetStreamContext, store: ObjectStore, name: str) -> bytes:
    """The whole object, by direct gets (`_chunks`): one of GONE when it does not exist,
    Truncated when it was deleted or replaced while it was read."""
    info = await store.get_info(name)
    return b"".join([chunk async for chunk in _chunks(js, store, name, info, direct=True)])


FETCH_TIMEOUT_S = 10.0  # names: the longest a fetch waits for objects counted as pending


async def names(js: JetStreamContext, store: ObjectStore, prefix: str = "") -> list[str]:
    """The names of the objects in the store that start with `prefix` (deleted ones whose
    tombstone is left may be among them). Not nats-py's `list()`: its push watcher can end
    early on a busy machine and stays subscribed when cancelled. This pulls the last meta
    message of each object, headers only (the name is in the subject), until none is left, and
    always unsubscribes."""
    meta = f"$O.{store._name}.M."  # noqa: SLF001
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT, ack_policy=api.AckPolicy.NONE, headers_only=True,
        inactive_threshold=30.0, mem_storage=True, filter_subject=f"{meta}>",
    )  # fmt: skip
    sub = await js.pull_subscribe(f"{meta}>", stream=_stream(store), config=config)
    found: list[str] = []
    try:
        remaining = (await sub.consumer_info()).num_pending
        while remaining > 0:
            try:
                msgs = await sub.fetch(min(remaining, 512), timeout=FETCH_TIMEOUT_S)
            except nats.errors.TimeoutError:
                # Nothing came: what was pending was deleted after it was counted (a retention
                # sweep), or the server is slow. Counted again: none left ends the listing.
                if (remaining := (await sub.consumer_info()).num_pending) == 0:
                    break
                raise
            for msg in msgs:
                remaining = msg.metadata.num_pending
                name = base64.urlsafe_b64decode(msg.subject[len(meta) :]).decode()
                if name.startswith(prefix):
                    found.append(name)
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # the connection is gone: so is the subscription
            pass
    return found


class _Reader(io.RawIOBase):
    """A blocking reader (what nats-py's `put` reads from, on an executor thread) over an async
    chunk iterator running on the event loop."""

    def __init__(self, source: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop):
        self._source = source
        self._loop = loop
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while not self._left:
            try:
                chunk = asyncio.run_coroutine_threadsafe(anext(self._source), self._loop).result()
            except StopAsyncIteration:
                return 0
            self._left = memoryview(chunk)
        n = min(len(buf), len(self._left))
        buf[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


async def copy(js: JetStreamContext, store: ObjectStore, src: str, dst: str) -> int:
    """Copy object `src` to `dst` in chunks; the bytes copied. One of GONE when `src` does not
    exist, Truncated when it changed meanwhile (then `dst` is left as it was)."""
    source = chunks(js, store, src)
    first = await anext(source, None)  # raises GONE now, before anything is written

    async def all_chunks() -> AsyncIterator[bytes]:
        if first is not None:
            yield first
            async for chunk in source:
                yield chunk

    info = await store.put(dst, _Reader(all_chunks(), asyncio.get_running_loop()))
    return info.size


async def delete(store: ObjectStore, name: str) -> bool:
    """Delete the object and its tombstone; False when it did not exist."""
    try:
        await store.delete(name)
    except GONE:
        return False
    finally:
        await store._js.purge_stream(_stream(store), subject=_meta_subject(store, name))  # noqa: SLF001
    return True
