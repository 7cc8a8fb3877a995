"""Download URLs that need no API key: signed by the gateway, valid until they expire.

    GET /api/v1/training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls
        -> {"urls": {file: url}, "expires": datetime}    (the files of a save_weights_external)
    GET /api/v1/sessions/{sid}/trace_export
        -> {"status": "ready", "url": url}               (the session's requests and timings)
    GET /api/v1/signed/{resource}?expires=<unix s>&sig=<hex>   (no X-API-Key)

A URL names a resource, `object/<object-store name>` or `trace/<session id>`, and carries
HMAC-SHA256(secret, resource + "\\n" + expires). The secret is made once, by the first gateway
that needs it, in KV `openrl-secrets` (create wins, everyone reads the winner), so any replica
verifies any replica's URLs. An expired or tampered URL is a 403 with a JSON body; a resource
deleted since signing (a deleted or overwritten checkpoint) is a 404. Only the gateway signs, and
it signs only names it took from records the caller may read, so a URL can never reach beyond
what its caller could read when it was made.

A trace is built when it is downloaded, from what the bus keeps: the session's models and their
training log (OPENRL_TRAIN), each request's future (type, state, created and finished times,
error), and the samplers' sample futures (ids are deterministic: sampler id and seq_id). It is
Chrome trace-event JSON, which ui.perfetto.dev opens. Futures live `futures_ttl_s` (6 h by
default): older requests are in the trace with state "unknown" and their seq_id only.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import msgspec
import structlog
from aiohttp import web

from openrl.bus import objects, subjects
from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import Future, ModelRecord, SamplerRecord, Secret, SessionRecord, SnapshotRecord, TrainRequest, decode
from openrl.gateway.catalogue import Catalogue
from openrl.gateway.http import API, Forbidden, reply, request_id
from openrl.gateway.names import check_id
from openrl.gateway.service import Gateway

log = structlog.get_logger(__name__)

URL_TTL_S = 3600
SIGNING_KEY = "download-signing"
TRACE_BATCH = 256  # trace events encoded and written at a time
SAMPLE_MISSES = 64  # consecutive unknown seq_ids after which a sampler's requests (or a purged log's) are taken to end


class Expired(Forbidden):
    """A bad, tampered or expired signed URL: 403."""


class Signer:
    def __init__(self, gw: Gateway):
        self.bus = gw.bus
        self._secret: bytes | None = None

    async def secret(self) -> bytes:
        if self._secret is None:
            rec = await self.bus.kv_get(self.bus.secrets, SIGNING_KEY, Secret)
            if rec is None:
                await self.bus.kv_create(self.bus.secrets, SIGNING_KEY, Secret(secret=secrets.token_bytes(32), created_at=time.time()))
                rec = await self.bus.kv_get(self.bus.secrets, SIGNING_KEY, Secret)  # the winner's, if another gateway raced
            self._secret = rec.secret
        return self._secret

    async def _mac(self, resource: str, expires: int) -> str:
        return hmac.new(await self.secret(), f"{resource}\n{expires}".encode("utf-8", "replace"), hashlib.sha256).hexdigest()

    async def url(self, request: web.Request, resource: str, expires: int) -> str:
        sig = await self._mac(resource, expires)
        return f"{request.url.origin()}{API}/signed/{quote(resource, safe='/:')}?expires={expires}&sig={sig}"

    async def verify(self, resource: str, expires: str, sig: str) -> None:
        try:
            exp = int(expires)
        except ValueError:
            raise Expired("this download URL is malformed (expires)") from None
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        if not hmac.compare_digest((await self._mac(resource, exp)).encode(), sig.encode("utf-8", "replace")):
            raise Expired("this download URL's signature does not match: it was changed or not made here")
        if exp < time.time():
            raise Expired("this download URL has expired; ask for a new one")


def _us(t: float) -> float:
    return round(t * 1e6, 1)


class Downloads:
    def __init__(self, gw: Gateway, catalogue: Catalogue):
        self.gw = gw
        self.bus = gw.bus
        self.cat = catalogue
        self.signer = Signer(gw)

    async def external_urls(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        m = request.match_info
        if m["segment"] != "external_weights":
            raise InvalidRequest("external_weights_urls serves external weights only (tinker://<run>/external_weights/<name>)")
        rec = await self.cat.checkpoint(m["run"], m["segment"], m["name"], owner, write=False)
        expires = int(time.time()) + URL_TTL_S
        if rec.expires_at is not None:
            expires = min(expires, int(rec.expires_at))
        urls = {f: await self.signer.url(request, f"object/{rec.object}/{f}", expires) for f in rec.files}
        log.info("download_urls_signed", path=rec.path, owner=owner, files=len(urls))
        return reply({"urls": urls, "expires": datetime.fromtimestamp(expires, timezone.utc).isoformat()})

    async def trace_export(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        sid = check_id(request.match_info["session_id"], "session id")
        await self.gw.session(sid, owner)
        url = await self.signer.url(request, f"trace/{sid}", int(time.time()) + URL_TTL_S)
        return reply({"status": "ready", "url": url})

    async def signed(self, request: web.Request) -> web.Response:
        resource = request.match_info["resource"]
        await self.signer.verify(resource, request.query.get("expires", ""), request.query.get("sig", ""))
        kind, _, name = resource.partition("/")
        if kind == "trace":
            return await self._send_trace(request, await self.trace(name), name)
        # Streamed a chunk at a time (objects.chunks): the gateway holds one chunk, whatever the size.
        try:
            size, source = await objects.open_object(self.bus.js, self.bus.objects, name)
        except objects.GONE:
            raise NotFound("this file is gone (its checkpoint was deleted, overwritten or expired)") from None
        filename = name.rsplit("/", 1)[-1]
        response = web.StreamResponse(headers={"Content-Disposition": f'attachment; filename="{filename}"'})
        response.content_type = "application/octet-stream"
        response.content_length = size
        await response.prepare(request)
        try:
            async for chunk in source:
                await response.write(chunk)
        except objects.Truncated as e:  # deleted or replaced mid-download: the client sees a short body
            log.warning("download_truncated", object=name, error=str(e))
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    # -- the trace

    async def _send_trace(self, request: web.Request, trace: dict[str, Any], sid: str) -> web.StreamResponse:
        """The trace as JSON, written a few hundred events at a time rather than encoded whole."""
        response = web.StreamResponse(headers={"Content-Disposition": f'attachment; filename="{sid}.trace.json"'})
        response.content_type = "application/json"
        await response.prepare(request)
        events = trace.pop("traceEvents")
        await response.write(b'{"traceEvents":[')
        for i in range(0, len(events), TRACE_BATCH):
            batch = msgspec.json.encode(events[i : i + TRACE_BATCH])[1:-1]
            await response.write((b"," if i else b"") + batch)
        await response.write(b"]," + msgspec.json.encode(trace)[1:])
        await response.write_eof()
        return response

    async def _future(self, rid: str) -> Future | None:
        return await self.bus.kv_get(self.bus.futures, rid, Future)

    async def _futures_by_id(self, kind: str, owner: str, seq_ids: Iterable[int]) -> AsyncIterator[tuple[int, str, Future]]:
        """(seq_id, request id, future) of `owner`'s `kind` requests at `seq_ids`, in that order,
        found by their deterministic ids, until SAMPLE_MISSES ids in a row have no future (expired,
        or never made)."""
        misses = 0
        for seq in seq_ids:
            if misses >= SAMPLE_MISSES:
                return
            rid = request_id(kind, owner, seq)
            fut = await self._future(rid)
            if fut is None:
                misses += 1
            else:
                misses = 0
                yield seq, rid, fut

    def _event(self, name: str, track: str, fut: Future | None, args: dict[str, Any], start: float | None) -> dict[str, Any]:
        """A complete ("X") event from submission to finish; an instant ("i") at the finish when
        the submission time is unknown (a sample's: its queue keeps no record once taken)."""
        start = (fut.created_at if fut and fut.created_at else None) or start
        end = fut.finished_at if fut and fut.finished_at else None
        args = {**args, "state": fut.state if fut else "unknown", "created_at": start, "finished_at": end}
        if fut and fut.error:
            args |= {"error": fut.error, "category": fut.category}
        ev = {"name": name, "cat": track.split(":")[1] if ":" in track else "session", "pid": 1, "tid": track, "args": args}
        if start is not None:
            return ev | {"ph": "X", "ts": _us(start), "dur": _us(max(0.0, (end or start) - start))}
        return ev | {"ph": "i", "s": "t", "ts": _us(end or 0.0)}

    async def trace(self, sid: str) -> dict[str, Any]:
        session = await self.bus.kv_get(self.bus.sessions, sid, SessionRecord)
        if session is None:
            raise NotFound(f"unknown session {sid!r}")
        models = await self.cat.records(self.bus.models, ModelRecord, f"{sid}:train:")
        samplers = await self.cat.records(self.bus.samplers, SamplerRecord, f"{sid}:sample:")
        events: list[dict[str, Any]] = []
        requests: list[dict[str, Any]] = []
        for rec in sorted(models, key=lambda r: r.model_id):
            if rec.create_request_id:
                fut = await self._future(rec.create_request_id)
                events.append(self._event(fut.request_type if fut else "CreateModel", rec.model_id, fut,
                                          {"request_id": rec.create_request_id, "seq_id": 0}, rec.created_at))  # fmt: skip
            subject = subjects.train(rec.base_model, rec.model_id)
            seen: set[str] = set()
            first = 2**63
            async for raw in self.bus.messages(subjects.TRAIN_STREAM, subject):
                try:
                    msg = decode(raw.data, TrainRequest)
                except msgspec.MsgspecError:
                    continue
                if msg.request_id in seen:
                    continue
                seen.add(msg.request_id)
                fut = await self._future(msg.request_id)
                at = raw.time.timestamp() if getattr(raw, "time", None) else rec.created_at
                events.append(self._event(fut.request_type if fut else type(msg).__name__, rec.model_id, fut,
                                          {"request_id": msg.request_id, "seq_id": msg.seq_id}, at))  # fmt: skip
                first = min(first, msg.seq_id)
            # Below the log's first entry it was purged (covered by a snapshot): those requests
            # are found by their futures' ids (deterministic), newest first, until they expired.
            if not seen:
                snap = await self.bus.kv_get(self.bus.snapshots, rec.model_id, SnapshotRecord)
                first = snap.seq_id + 1 if snap else 1
            async for seq, rid, fut in self._futures_by_id("train", rec.model_id, range(first - 1, 0, -1)):
                # Its submission time left with its log entry: shown at its finish, zero long.
                events.append(self._event(fut.request_type, rec.model_id, fut, {"request_id": rid, "seq_id": seq, "purged": True}, fut.finished_at))
        for s in sorted(samplers, key=lambda r: r.sampler_id):
            async for n, rid, fut in self._futures_by_id("sample", s.sampler_id, itertools.count()):
                events.append(self._event(fut.request_type, s.sampler_id, fut, {"request_id": rid, "seq_id": n}, None))
        for ev in sorted(events, key=lambda e: e["ts"]):
            a = ev["args"]
            requests.append({"request_id": a["request_id"], "track": ev["tid"], "type": ev["name"], "seq_id": a["seq_id"],
                             "state": a["state"], "created_at": a["created_at"], "finished_at": a["finished_at"],
                             "error": a.get("error")})  # fmt: skip
        return {
            "traceEvents": sorted(events, key=lambda e: e["ts"]),
            "displayTimeUnit": "ms",
            "otherData": {
                "session_id": sid,
                "created_at": session.created_at,
                "finished_at": session.finished_at,
                "training_runs": [r.model_id for r in models],
                "samplers": [s.sampler_id for s in samplers],
                "requests": requests,
            },
        }


DOWNLOADS = web.AppKey("downloads", Downloads)


def add_routes(app: web.Application, gw: Gateway, catalogue: Catalogue) -> None:
    """Register before the catalogue's catch-all checkpoint route."""
    dl = Downloads(gw, catalogue)
    app[DOWNLOADS] = dl
    r = app.router
    r.add_get(f"{API}/training_runs/{{run}}/checkpoints/{{segment}}/{{name}}/external_weights_urls", dl.external_urls)
    r.add_get(f"{API}/sessions/{{session_id}}/trace_export", dl.trace_export)
    r.add_get(f"{API}/signed/{{resource:.+}}", dl.signed)
