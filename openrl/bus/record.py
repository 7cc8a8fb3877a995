"""Record bus traffic to a file and replay it into a stack.

`openrl record` subscribes (core NATS) to subject patterns and writes every message it sees,
with its subject, headers and arrival time, to a file; `openrl replay` publishes a file's
messages into a bus, through JetStream where a stream holds the subject (so the replayed
messages are stored and consumed exactly like the originals), else as plain NATS messages.

File format, version 1 (`.orlrec`), one zstd frame stream holding:

    frame := u32 little-endian length, then that many bytes of msgpack
    first frame: {"format": "openrl-record", "version": 1, "created_at": <unix s>,
                  "subjects": [<patterns recorded>]}
    then one frame per message: {"t": <seconds since recording started>, "s": <subject>,
                                 "h": {<header>: <value>} or null, "d": <payload bytes>}

A reader refuses a file whose first frame is not that header, or whose version it does not
know. Messages keep their `Nats-Msg-Id` header, so replaying into the stack they came from
within the streams' duplicate window (10 min) is a no-op: replay into a fresh stack, or
wait the window out. What a recording needs to rebuild state depends on what is replayed:
training requests need the model records (`$KV.openrl-models.>`) recorded with them.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec
import nats
import structlog
import zstandard
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError

from openrl.bus import auth

log = structlog.get_logger(__name__)

FORMAT = "openrl-record"
VERSION = 1
_LEN = struct.Struct("<I")


class Header(msgspec.Struct, kw_only=True):
    format: str
    version: int
    created_at: float
    subjects: list[str]


class Frame(msgspec.Struct):
    t: float  # seconds since the recording started
    s: str  # subject
    h: dict[str, str] | None  # headers
    d: bytes  # payload


class RecordFormatError(ValueError):
    """Not a recording, or one of a version this code cannot read."""


class Writer:
    """Appends frames to a zstd stream; `close()` makes the file complete."""

    def __init__(self, path: Path, subjects: list[str]):
        self._file: BinaryIO = open(path, "wb")
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(self._file, closefd=False)
        self._enc = msgspec.msgpack.Encoder()
        self.count = 0
        self._write(self._enc.encode(Header(format=FORMAT, version=VERSION, created_at=time.time(), subjects=subjects)))

    def _write(self, body: bytes) -> None:
        self._z.write(_LEN.pack(len(body)))
        self._z.write(body)

    def add(self, frame: Frame) -> None:
        self._write(self._enc.encode(frame))
        self.count += 1

    def flush(self) -> None:
        self._z.flush(zstandard.FLUSH_FRAME)
        self._file.flush()

    def close(self) -> None:
        self._z.close()
        self._file.close()


@dataclass
class Recording:
    header: Header
    frames: list[Frame]


def read(path: Path) -> Recording:
    """The header and every frame of a recording (a truncated last frame, left by a recorder
    that was killed, is dropped)."""
    header = None
    frames: list[Frame] = []
    for i, body in enumerate(_bodies(path)):
        if i == 0:
            try:
                header = msgspec.msgpack.decode(body, type=Header)
            except msgspec.MsgspecError:
                raise RecordFormatError(f"{path} is not an openrl recording") from None
            if header.format != FORMAT:
                raise RecordFormatError(f"{path} is not an openrl recording (format {header.format!r})")
            if header.version != VERSION:
                raise RecordFormatError(f"{path} is a version {header.version} recording; this openrl reads version {VERSION}")
            continue
        frames.append(msgspec.msgpack.decode(body, type=Frame))
    if header is None:
        raise RecordFormatError(f"{path} is empty or not an openrl recording")
    return Recording(header=header, frames=frames)


def _bodies(path: Path) -> Iterator[bytes]:
    yielded = 0
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        try:
            while True:
                head = reader.read(_LEN.size)
                if len(head) < _LEN.size:
                    return
                (n,) = _LEN.unpack(head)
                body = reader.read(n)
                if len(body) < n:
                    return
                yield body
                yielded += 1
        except zstandard.ZstdError as e:
            if not yielded:
                raise RecordFormatError(f"{path} is not an openrl recording") from None
            log.warning("recording_truncated", path=str(path), frames=yielded, error=str(e))


def matches(subject: str, pattern: str) -> bool:
    """NATS wildcard matching: `*` one token, `>` the rest."""
    s, p = subject.split("."), pattern.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(s) == len(p)


async def record(nats_url: str, subjects: list[str], out: Path, stop: asyncio.Event, *, duration_s: float | None = None,
                 credentials: auth.Credentials | None = None) -> int:
    """Record until `stop` (or `duration_s`); returns the number of messages written. Connects
    as the operator (`credentials`), which may subscribe to OpenRL's subjects and buckets."""
    nc = await nats.connect(servers=[nats_url], name="openrl-record", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                            **auth.connect_options("operator", credentials))
    writer = Writer(out, subjects)
    started = time.monotonic()

    async def on_msg(msg) -> None:
        writer.add(Frame(t=time.monotonic() - started, s=msg.subject, h=dict(msg.headers) if msg.headers else None, d=msg.data))

    subs = [await nc.subscribe(s, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=4 * 1024**3) for s in subjects]
    await nc.flush()
    log.info("recording", subjects=subjects, out=str(out))
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0 if duration_s is None else max(0.0, min(1.0, duration_s - (time.monotonic() - started))))
            except asyncio.TimeoutError:
                pass
            writer.flush()  # a killed recorder leaves a readable file up to here
            if duration_s is not None and time.monotonic() - started >= duration_s:
                break
        for sub in subs:
            await sub.drain()  # what arrived before we stopped is still written
        await nc.flush()
    finally:
        writer.close()
        await nc.close()
    log.info("recorded", messages=writer.count, out=str(out))
    return writer.count


async def replay(path: Path, nats_url: str, *, subjects: list[str] | None = None, pace: str = "instant", speed: float = 1.0,
                 credentials: auth.Credentials | None = None) -> int:
    """Publish a recording's messages (those matching `subjects`, default all) in order;
    returns how many were published. `pace="original"` keeps the recorded gaps (divided by
    `speed`)."""
    from openrl.bus.client import Bus, BusConfig  # the streams and buckets must exist first

    if pace not in ("instant", "original"):
        raise ValueError(f"pace must be instant or original, got {pace!r}")
    rec = read(path)
    frames = [f for f in rec.frames if not subjects or any(matches(f.s, p) for p in subjects)]
    who = {"role": "operator", "user": credentials.user, "password": credentials.password, "tls_ca": credentials.ca} if credentials else {}
    bus = await Bus.connect(BusConfig(url=nats_url, name="openrl-replay", **who))
    started = time.monotonic()
    first_t = frames[0].t if frames else 0.0
    sent = 0
    try:
        for frame in frames:
            if pace == "original":
                delay = (frame.t - first_t) / speed - (time.monotonic() - started)
                if delay > 0:
                    await asyncio.sleep(delay)
            try:
                await bus.js.publish(frame.s, frame.d, headers=frame.h, timeout=10)
            except (NoStreamResponseError, NoRespondersError):  # no stream holds it: a core message
                await bus.nc.publish(frame.s, frame.d, headers=frame.h)
            sent += 1
        await bus.nc.flush()
    finally:
        await bus.close()
    log.info("replayed", messages=sent, of=len(rec.frames), pace=pace, seconds=round(time.monotonic() - started, 3))
    return sent
