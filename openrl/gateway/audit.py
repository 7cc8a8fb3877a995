"""The audit log: changes to checkpoints, sessions and keys, as they happen, and the admin route.

    GET /api/v1/audit        ?event_type=all|checkpoints|projects|teams|organizations&day=YYYY-MM-DD

Each event is an `AuditEvent` appended to the OPENRL_AUDIT stream (limits retention) under
`openrl.audit.<owner>`, by whichever gateway (or `openrl keys`) made the change, so every replica
reads the same log. A key reads only its own events: those about its things, including what the
TTL reaper did to them. Events: checkpoint_delete, checkpoint_expire, checkpoint_publish,
checkpoint_unpublish, checkpoint_ttl_set, checkpoint_copy, session_create, session_finish,
session_project_set, key_create, key_revoke. Checkpoint saves are not here: a trainer makes them
(they are in the catalogue and in the session's trace export).

Recording is best effort once the change is made: a bus hiccup on the audit append is logged, not
turned into an error for a change that already happened.
"""

from __future__ import annotations

import time
import uuid
from datetime import date, datetime, timezone
from typing import Any

import structlog
from aiohttp import web

from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import AuditEvent, decode
from openrl.gateway.http import API, reply

log = structlog.get_logger(__name__)

EVENT_TYPES = {
    "all": ("",),
    "checkpoints": ("checkpoint_",),
    "projects": ("session_project_",),
    "teams": ("key_",),  # one key is one principal here: key changes are the nearest thing
    "organizations": ("key_",),
}


async def record(bus: Bus, owner: str, event: str, *, actor: str = "", **fields: Any) -> None:
    """Append one event to `owner`'s log; never raises (the change it records is already made)."""
    details = {str(k): str(v) for k, v in (fields.pop("details", None) or {}).items()}
    msg = AuditEvent(at=time.time(), owner=owner, event=event, actor=actor, details=details, **fields)
    try:
        await bus.publish(subjects.audit(owner), msg, msg_id=f"audit-{uuid.uuid4().hex}")
    except Exception as e:  # noqa: BLE001 - see the module note
        log.warning("audit_append_failed", event_name=event, owner=owner, error=repr(e))


async def read_log(bus: Bus, stream: str, subject: str, type_: type, start: float = 0.0, end: float = float("inf")) -> list:
    """The records on `subject` of a limits stream with `start <= at < end`, oldest first.
    One direct get per record: fine for thousands per key; a time-indexed start is the next step."""
    found = []
    async for raw in bus.messages(stream, subject):
        try:
            rec = decode(raw.data, type_)
        except Exception:  # noqa: BLE001 - an undecodable entry is skipped, not fatal
            log.error("log_entry_undecodable", stream=stream, stream_seq=raw.seq)
        else:
            if start <= rec.at < end:
                found.append(rec)
    return found


async def events(bus: Bus, owner: str, start: float = 0.0, end: float = float("inf")) -> list[AuditEvent]:
    """`owner`'s events with `start <= at < end`, oldest first."""
    return await read_log(bus, subjects.AUDIT_STREAM, subjects.audit(owner), AuditEvent, start, end)


def entry_json(ev: AuditEvent) -> dict[str, Any]:
    details: dict[str, Any] = {"owner": ev.owner, "actor": ev.actor or "system", **ev.details}
    for name in ("tinker_path", "model_id", "session_id"):
        if getattr(ev, name) is not None:
            details[name] = getattr(ev, name)
    return {
        "timestamp": datetime.fromtimestamp(ev.at, timezone.utc).isoformat(),
        "event": ev.event,
        "event_details": details,
        "model_id": ev.model_id,
        "tinker_path": ev.tinker_path,
    }


def add_routes(app: web.Application, gw) -> None:
    async def get_audit_log(request: web.Request) -> web.Response:
        owner = gw.owner(request)
        event_type = request.query.get("event_type", "all")
        if event_type not in EVENT_TYPES:
            raise InvalidRequest(f"event_type must be one of {', '.join(EVENT_TYPES)}, got {event_type[:40]!r}")
        try:
            day = date.fromisoformat(request.query["day"]) if "day" in request.query else datetime.now(timezone.utc).date()
        except ValueError:
            raise InvalidRequest("day must be a date, YYYY-MM-DD") from None
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()
        found = await events(gw.bus, owner, start, start + 86400)
        prefixes = EVENT_TYPES[event_type]
        return reply({"entries": [entry_json(e) for e in found if e.event.startswith(prefixes)]})

    app.router.add_get(f"{API}/audit", get_audit_log)
