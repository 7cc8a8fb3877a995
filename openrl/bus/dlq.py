"""Dead letters: messages that were delivered `max_deliver` times without being handled.

`Bus.consume` moves such a message to the `OPENRL_DLQ` stream (subject
`openrl.dlq.<stream>`, the original payload, headers saying where it came from and why) and
fails its future with an error starting "dead-lettered:". An operator lists them with
`openrl dlq list` and, once the cause is fixed, re-runs one with `openrl dlq retry ID` (the
ID is its sequence in OPENRL_DLQ): its future goes back to pending and the message is
published again to its original subject. Training requests cannot be retried: their place
in the model's sequence has passed (they failed there, in order), so the client re-sends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
from nats.js.errors import NotFoundError

from openrl.bus import subjects
from openrl.bus.client import TRACE_HEADER, Bus
from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import Future

_REQUEST_ID = msgspec.msgpack.Decoder(dict)


@dataclass(frozen=True)
class DeadLetter:
    id: int  # sequence in OPENRL_DLQ
    stream: str
    subject: str
    consumer: str
    stream_seq: int
    delivered: int
    reason: str
    at: float
    size: int
    request_id: str


def _letter(raw) -> DeadLetter:
    h = raw.headers or {}
    try:
        request_id = str(_REQUEST_ID.decode(raw.data).get("request_id", ""))
    except (msgspec.MsgspecError, AttributeError):
        request_id = ""
    return DeadLetter(
        id=raw.seq,
        stream=h.get("Openrl-Dlq-Stream", ""),
        subject=h.get("Openrl-Dlq-Subject", ""),
        consumer=h.get("Openrl-Dlq-Consumer", ""),
        stream_seq=int(h.get("Openrl-Dlq-Stream-Seq", 0) or 0),
        delivered=int(h.get("Openrl-Dlq-Delivered", 0) or 0),
        reason=h.get("Openrl-Dlq-Reason", ""),
        at=raw.time.timestamp() if getattr(raw, "time", None) else 0.0,
        size=len(raw.data or b""),
        request_id=request_id,
    )


async def list_dead(bus: Bus, limit: int = 1000) -> list[DeadLetter]:
    """The dead letters, oldest first."""
    out: list[DeadLetter] = []
    async for raw in bus.messages(subjects.DLQ_STREAM, subjects.DLQ_ALL):
        out.append(_letter(raw))
        if len(out) >= limit:
            break
    return out


async def retry(bus: Bus, letter_id: int) -> DeadLetter:
    """Publish a dead letter again to its original subject (its future back to pending), then
    remove it from the dead-letter stream."""
    try:
        raw = await bus.js.get_msg(subjects.DLQ_STREAM, seq=letter_id)
    except NotFoundError:
        raise NotFound(f"no dead letter {letter_id}") from None
    letter = _letter(raw)
    if letter.stream == subjects.TRAIN_STREAM:
        raise InvalidRequest(
            f"dead letter {letter_id} is a training request: it already failed in its place in the "
            "model's sequence and cannot run out of order; re-send it from the client"
        )
    if letter.request_id:
        stored = await bus.kv_get(bus.futures, letter.request_id, Future)
        if stored is not None and stored.state != "pending":
            pending = msgspec.structs.replace(stored, state="pending", error="", category="", payload=b"", finished_at=0.0)
            await bus.kv_put(bus.futures, letter.request_id, pending)
    headers = {"Nats-Msg-Id": f"dlq-retry-{letter_id}-{time.time_ns()}"}
    if TRACE_HEADER in (raw.headers or {}):
        headers[TRACE_HEADER] = raw.headers[TRACE_HEADER]
    await bus.js.publish(letter.subject, raw.data, headers=headers, timeout=10)
    await bus.js.delete_msg(subjects.DLQ_STREAM, letter_id)
    return letter

