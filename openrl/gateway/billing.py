"""Billing usage from real accounting: what the workers did for each key, by the hour.

    GET /api/v1/billing/usage/events      ?starting_on=<ISO datetime>&ending_before=<ISO datetime>

Workers append a `UsageRecord` to the OPENRL_USAGE stream (subject `openrl.usage.<owner>`) for
each piece of work they finish: a trainer for each forward / forward_backward / optim_step (kind
"training": the datums' tokens, none for optim_step, and the seconds the step took on the trainer;
the record's metrics feed the web console's curves, not billing), a sampler for each sample
request ("sampling_prefill": prompt tokens; "sampling_sample": generated tokens, and the seconds
from taking the request to its result, batch neighbours included). A request applied twice (a
trainer replaying its log after a crash) is counted once: records are deduplicated by request id.

The answer is the SDK's `BillingUsageResponse`: one event per UTC hour, kind, session and base
model, attributed to the key (`user_id`) and the session's current project, with
`event_info.token_count` and, beyond Tinker's schema, `event_info.worker_seconds`. There are no
prices (costs and rates are null). Checkpoint storage is its own report
(GET /api/v1/billing/usage/checkpoints/current).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from openrl.bus import subjects
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import SessionRecord, UsageRecord
from openrl.gateway.audit import read_log
from openrl.gateway.http import API, reply

MAX_WINDOW_S = 31 * 86400
HOUR = 3600


def _when(request: web.Request, name: str) -> float:
    raw = request.query.get(name)
    if not raw:
        raise InvalidRequest(f"{name} is required (an ISO 8601 datetime)")
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO 8601 datetime, got {raw[:60]!r}") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


def add_routes(app: web.Application, gw) -> None:
    async def usage_events(request: web.Request) -> web.Response:
        owner = gw.owner(request)
        start, end = _when(request, "starting_on"), _when(request, "ending_before")
        if not 0 < end - start <= MAX_WINDOW_S:
            raise InvalidRequest("ending_before must be after starting_on, by at most 31 days")
        records = await read_log(gw.bus, subjects.USAGE_STREAM, subjects.usage(owner), UsageRecord, start, end)
        seen: set[tuple[str, str]] = set()
        buckets: dict[tuple[float, str, str, str], list[float]] = {}
        for r in records:
            if r.request_id and (r.kind, r.request_id) in seen:
                continue
            seen.add((r.kind, r.request_id))
            key = (r.at - r.at % HOUR, r.kind, r.session_id, r.base_model)
            acc = buckets.setdefault(key, [0, 0.0])
            acc[0] += r.tokens
            acc[1] += r.seconds
        sessions: dict[str, SessionRecord | None] = {}
        for _, _, sid, _ in buckets:
            if sid not in sessions:
                rec = await gw.bus.kv_get(gw.bus.sessions, sid, SessionRecord) if sid else None
                sessions[sid] = rec if rec is not None and rec.owner == owner else None
        data: list[dict[str, Any]] = []
        for (hour, kind, sid, base), (tokens, seconds) in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[1][0])):
            info: dict[str, Any] = {"type": kind, "token_count": int(tokens), "worker_seconds": round(seconds, 6)}
            if kind == "sampling_prefill":
                info["cached"] = False  # no prefix cache is billed apart here
            s = sessions.get(sid)
            data.append({
                "bucket_start": _iso(hour), "bucket_end": _iso(hour + HOUR), "base_model": base or None,
                "user_id": f"openrl:key:{owner}", "session_id": sid or None, "project_id": s.project_id if s else None,
                "estimated_cost_usd": None, "event_info": info,
            })  # fmt: skip
        meta = {sid: {"user_metadata": s.user_metadata or None} for sid, s in sessions.items() if s is not None}
        return reply({"data": data, "sessions": meta, "cost_data_through": None})

    app.router.add_get(f"{API}/billing/usage/events", usage_events)
