"""The REST catalogue (RestClient / AdminClient), read from the records the stack already keeps.

    GET    /api/v1/training_runs                                   ?limit&offset&access_scope&project_id
    GET    /api/v1/training_runs/{run}
    GET    /api/v1/training_runs/{run}/checkpoints
    DELETE /api/v1/training_runs/{run}/checkpoints/{segment}/{name}          (record and blobs)
    POST   /api/v1/training_runs/{run}/checkpoints/{segment}/{name}/publish
    DELETE /api/v1/training_runs/{run}/checkpoints/{segment}/{name}/publish
    PUT    /api/v1/training_runs/{run}/checkpoints/{segment}/{name}/ttl      {"ttl_seconds": int | null}
    GET    /api/v1/checkpoints                                     ?limit&offset, newest first
    POST   /api/v1/weights_info                                    {"tinker_path"}
    GET    /api/v1/sessions                                        ?limit&offset, newest first
    GET    /api/v1/sessions/{sid}
    PUT    /api/v1/sessions/{sid}/project                          {"project_id"}
    POST   /api/v1/sessions/search                                 SessionSearchRequest
    GET    /api/v1/billing/usage/checkpoints/current               ?project_id
    POST   /api/v1/copy_weights                                    {source_path, destination_project_id |
                                                                    session_id + model_seq_id, ttl_seconds}

copy_weights copies the bytes (blobs) into objects of the copy's own, so deleting either side never
touches the other, and records the copy under a run of the caller's that holds it and cannot be
trained (ModelRecord.copy_of): `<session>:train:<model_seq_id>` of the caller's session, or
`<new session>:train:0` of a new, finished session in the destination project. The name and kind
stay the source's. A retry (same X-Idempotency-Key) returns the first copy.

Training runs are the models bucket, checkpoints the weights bucket (tinker:// path ->
WeightsRecord, bytes in the object store), sessions the sessions bucket; nothing here has state
of its own. Another key's run, session or checkpoint does not exist for you (404), except a
published checkpoint: anyone may read it (weights_info, sample, load), only its owner may change
it (403 for others). Expired checkpoints are invisible at once and deleted, blobs included, by
the reaper every gateway runs (`reap`); deleting twice is harmless, so replicas need no lock.

Listings scan their bucket's keys (filtered by key prefix where the id allows): fine for
thousands of records; an index per owner is the next step beyond that.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import msgspec
import structlog
from aiohttp import web
from nats.js.errors import KeyNotFoundError, NotFoundError

from openrl.bus import objects, paths, subjects
from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import Lease, ModelRecord, SamplerRecord, SessionRecord, WeightsRecord, decode
from openrl.gateway import audit
from openrl.gateway.http import API, Forbidden, check_ttl, read_body, reply
from openrl.gateway.names import check_id, check_name
from openrl.gateway.service import Gateway

log = structlog.get_logger(__name__)

REAP_EVERY_S = 5.0
CHECKPOINT_TYPE = {"state": "training", "sampler": "sampler", "external": "external"}
SEGMENTS = {"weights": "state", "sampler_weights": "sampler", "external_weights": "external"}
MAX_LIMIT = 1000
ADAPTERS = "adapters/"  # where sampler weights live in the object store (paths.adapter_object)


class _TtlBody(msgspec.Struct, kw_only=True):
    ttl_seconds: int | None = None


class _PathBody(msgspec.Struct, kw_only=True):
    tinker_path: str


class _ProjectBody(msgspec.Struct, kw_only=True):
    project_id: str | None = None


class _CopyBody(msgspec.Struct, kw_only=True):
    source_path: str
    session_id: str | None = None
    model_seq_id: int | None = None
    destination_project_id: str | None = None
    ttl_seconds: int | None = None
    weights_access_token: str | None = None  # not used: published checkpoints need no token here


class _Cursor(msgspec.Struct, kw_only=True):
    last_created_at: str
    last_session_id: str


class _SearchBody(msgspec.Struct, kw_only=True):
    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = {}
    display_name: str | None = None
    owner: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "own"})
    statuses: list[dict[str, Any]] | None = None
    limit: int = 50
    cursor: _Cursor | None = None


def instant(t: float) -> datetime:
    """A stored timestamp at the microsecond precision the API writes (and cursors carry)."""
    return datetime.fromtimestamp(t, timezone.utc)


def iso(t: float) -> str:
    return instant(t).isoformat()


def _page(request: web.Request, default_limit: int) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", default_limit))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise InvalidRequest("limit and offset must be integers") from None
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise InvalidRequest(f"limit must be in [1, {MAX_LIMIT}] and offset >= 0")
    return limit, offset


def checkpoint_json(rec: WeightsRecord) -> dict[str, Any]:
    segment = paths.SEGMENT_OF_KIND[rec.kind]
    return {
        "checkpoint_id": f"{segment}/{rec.name}",
        "checkpoint_type": CHECKPOINT_TYPE[rec.kind],
        "time": iso(rec.created_at),
        "tinker_path": rec.path,
        "size_bytes": rec.size_bytes,
        "public": rec.public,
        "user_metadata": rec.user_metadata,
        "expires_at": None if rec.expires_at is None else iso(rec.expires_at),
    }


def _live(rec: WeightsRecord, now: float) -> bool:
    return rec.expires_at is None or rec.expires_at > now


class _WeightsRef(msgspec.Struct):
    """The one field of a SampleRequest the sampler retention reads."""

    weights: str | None = None


class Catalogue:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.bus = gw.bus
        self._unreferenced: dict[str, float] = {}  # adapter object -> when first seen unreferenced (monotonic)

    # -- reading buckets

    async def records(self, kv, type_: type, prefix: str = "", *, strict: bool = False) -> list:
        """Every record in `kv` whose (unescaped) key starts with `prefix`. One that does not
        decode is skipped (logged), or with `strict` raises: a sweep that deletes what no
        record names must not miss a record."""
        keys = await self.bus.kv_keys(kv)
        want = subjects.kv_key(prefix)
        found = []
        for key in keys:
            if not key.startswith(want):
                continue
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:  # deleted since the listing
                continue
            if entry.value:
                try:
                    found.append(decode(entry.value, type_))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.warning("catalogue_record_undecodable", bucket=kv._name, key=key)  # noqa: SLF001
                    if strict:
                        raise RuntimeError(f"record {key} in {kv._name} is unreadable: sweep stopped") from None  # noqa: SLF001
        return found

    async def checkpoints(self, owner: str | None = None, run: str | None = None) -> list[WeightsRecord]:
        """Live named checkpoints, newest first: of one run, or of one owner, or all."""
        now = time.time()
        recs = await self.records(self.bus.weights, WeightsRecord, f"{paths.SCHEME}{run}/" if run else "")
        recs = [r for r in recs if _live(r, now) and (owner is None or r.owner == owner)]
        return sorted(recs, key=lambda r: (r.created_at, r.path), reverse=True)

    async def checkpoint(self, run: str, segment: str, name: str, owner: str, *, write: bool) -> WeightsRecord:
        """The live checkpoint at this address if `owner` may read it (or change it, with `write`)."""
        check_id(run, "training run id")
        if segment not in SEGMENTS:
            raise InvalidRequest(f"unknown checkpoint kind {segment!r}; expected one of {', '.join(SEGMENTS)}")
        check_name(name)
        path = f"{paths.SCHEME}{run}/{segment}/{name}"
        rec = await self.bus.kv_get(self.bus.weights, path, WeightsRecord)
        if rec is None or not _live(rec, time.time()) or (rec.owner != owner and not rec.public):
            raise NotFound(f"no checkpoint at {path!r}")
        if write and rec.owner != owner:
            raise Forbidden(f"{path} is published by another key: you may read it, not change it")
        return rec

    async def delete(self, rec: WeightsRecord, why: str, actor: str = "") -> None:
        """Blobs first, then the record: a delete cut short is finished by the next one."""
        for obj in [f"{rec.object}/{f}" for f in rec.files] or [rec.object]:
            await objects.delete(self.bus.objects, obj)
        try:
            await self.bus.weights.delete(subjects.kv_key(rec.path))
        except KeyNotFoundError:
            pass
        log.info("checkpoint_deleted", path=rec.path, owner=rec.owner, bytes=rec.size_bytes, reason=why)
        event = "checkpoint_expire" if why == "expired" else "checkpoint_delete"
        await audit.record(self.bus, rec.owner, event, actor=actor, tinker_path=rec.path, model_id=rec.model_id,
                           details={"size_bytes": rec.size_bytes, "reason": why})  # fmt: skip

    async def update(self, rec: WeightsRecord, **changes) -> None:
        await self.bus.kv_put(self.bus.weights, rec.path, msgspec.structs.replace(rec, **changes))

    async def runs(self, owner: str) -> list[ModelRecord]:
        recs = [r for r in await self.records(self.bus.models, ModelRecord) if r.owner == owner]
        return sorted(recs, key=lambda r: (r.created_at, r.model_id), reverse=True)

    async def run_json(self, rec: ModelRecord, checkpoints: list[WeightsRecord] | None = None) -> dict[str, Any]:
        if checkpoints is None:
            checkpoints = await self.checkpoints(run=rec.model_id)
        last = rec.created_at
        try:  # the last request on the model's training log is the last thing that touched it
            msg = await self.bus.js.get_last_msg(subjects.TRAIN_STREAM, subjects.train(rec.base_model, rec.model_id))
            if msg.time is not None:
                last = max(last, msg.time.timestamp())
        except NotFoundError:
            pass
        lease = await self.bus.kv_get(self.bus.leases, subjects.lease_key(rec.base_model, rec.model_id), Lease)
        training = next((c for c in checkpoints if c.kind == "state"), None)
        sampler = next((c for c in checkpoints if c.kind == "sampler"), None)
        return {
            "training_run_id": rec.model_id,
            "base_model": rec.base_model,
            "model_owner": rec.owner,
            "is_lora": True,
            "corrupted": bool(lease and lease.failed),
            "lora_rank": rec.lora.rank,
            "last_request_time": iso(last),
            "last_checkpoint": checkpoint_json(training) if training else None,
            "last_sampler_checkpoint": checkpoint_json(sampler) if sampler else None,
            "user_metadata": rec.user_metadata,
        }

    async def sessions(self, owner: str) -> list[SessionRecord]:
        recs = [r for r in await self.records(self.bus.sessions, SessionRecord) if r.owner == owner]
        return sorted(recs, key=lambda r: (instant(r.created_at), r.session_id), reverse=True)

    # -- training runs

    async def list_training_runs(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        limit, offset = _page(request, 20)
        runs = await self.runs(owner)
        project = request.query.get("project_id")
        if project is not None:
            in_project = {s.session_id for s in await self.sessions(owner) if s.project_id == project}
            runs = [r for r in runs if r.session_id in in_project]
        page = runs[offset : offset + limit]
        return reply(
            {
                "training_runs": [await self.run_json(r) for r in page],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
            }
        )

    async def get_training_run(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        run = check_id(request.match_info["run"], "training run id")
        return reply(await self.run_json(await self.gw.model(run, owner, trainable=False)))

    # -- checkpoints

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        run = check_id(request.match_info["run"], "training run id")
        await self.gw.model(run, owner, trainable=False)
        recs = await self.checkpoints(owner, run=run)
        return reply({"checkpoints": [checkpoint_json(r) for r in recs], "cursor": None})

    async def list_user_checkpoints(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        limit, offset = _page(request, 100)
        recs = await self.checkpoints(owner)
        return reply(
            {
                "checkpoints": [checkpoint_json(r) for r in recs[offset : offset + limit]],
                "cursor": {"offset": offset, "limit": limit, "total_count": len(recs)},
            }
        )

    def _address(self, request: web.Request) -> tuple[str, str, str]:
        m = request.match_info
        return m["run"], m["segment"], m["name"]

    async def delete_checkpoint(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        rec = await self.checkpoint(*self._address(request), owner, write=True)
        await self.delete(rec, "deleted by owner", actor=owner)
        return reply({})

    async def publish(self, request: web.Request) -> web.Response:
        return await self._set_public(request, True)

    async def unpublish(self, request: web.Request) -> web.Response:
        return await self._set_public(request, False)

    async def _set_public(self, request: web.Request, public: bool) -> web.Response:
        owner = self.gw.owner(request)
        rec = await self.checkpoint(*self._address(request), owner, write=True)
        if rec.public == public:  # 400, not 409: the SDK retries 409 for minutes
            raise InvalidRequest(f"{rec.path} is already public" if public else f"{rec.path} is not public")
        await self.update(rec, public=public)
        action = "checkpoint_publish" if public else "checkpoint_unpublish"
        log.info(f"{action}ed", path=rec.path, owner=owner)
        await audit.record(self.bus, owner, action, actor=owner, tinker_path=rec.path, model_id=rec.model_id)
        return reply({})

    async def set_ttl(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        rec = await self.checkpoint(*self._address(request), owner, write=True)
        body = await read_body(request, _TtlBody)
        check_ttl(body.ttl_seconds)
        expires = None if body.ttl_seconds is None else time.time() + body.ttl_seconds
        await self.update(rec, expires_at=expires)
        log.info("checkpoint_ttl_set", path=rec.path, owner=owner, ttl_seconds=body.ttl_seconds)
        await audit.record(self.bus, owner, "checkpoint_ttl_set", actor=owner, tinker_path=rec.path, model_id=rec.model_id,
                           details={"ttl_seconds": body.ttl_seconds})  # fmt: skip
        return reply({})

    async def bad_checkpoint_address(self, request: web.Request) -> web.Response:
        """Anything under .../checkpoints/ that is not <segment>/<name>[/publish|/ttl]."""
        self.gw.owner(request)
        raise InvalidRequest(f"malformed checkpoint id {request.match_info['rest'][:200]!r}; expected <segment>/<name>")

    async def weights_info(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        body = await read_body(request, _PathBody)
        parsed = paths.parse(body.tinker_path)
        rec = await self.checkpoint(parsed.model_id, parsed.segment, parsed.name, owner, write=False)
        return reply(
            {
                "base_model": rec.base_model,
                "optimizer_config": {"type": "adamw"},
                "is_lora": True,
                "lora_rank": rec.lora.rank,
                "train_unembed": rec.lora.train_unembed,
                "train_mlp": rec.lora.train_mlp,
                "train_attn": rec.lora.train_attn,
            }
        )

    async def copy_weights(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        body = await read_body(request, _CopyBody)
        check_ttl(body.ttl_seconds)
        parsed = paths.parse(body.source_path)
        src = await self.checkpoint(parsed.model_id, parsed.segment, parsed.name, owner, write=False)
        self.gw.usage.check_checkpoint(owner)  # a copy is a checkpoint of the caller's (429 past the quota)
        now = time.time()
        if body.session_id is not None:
            if body.model_seq_id is None or body.model_seq_id < 0:
                raise InvalidRequest("copy_weights into a session needs model_seq_id >= 0")
            session = await self.gw.session(check_id(body.session_id, "session id"), owner)
            if session.finished_at is not None:
                raise InvalidRequest(f"session {session.session_id} is finished")
            model_id = f"{session.session_id}:train:{body.model_seq_id}"
            project = session.project_id
        else:
            project = body.destination_project_id
            if not project or len(project) > 256:
                raise InvalidRequest("give destination_project_id (1-256 characters), or session_id and model_seq_id")
            idem = request.headers.get("X-Idempotency-Key") or uuid.uuid4().hex
            sid = "s-" + hashlib.blake2b(f"{owner}|copy|{idem}".encode(), digest_size=8).hexdigest()
            holder = SessionRecord(session_id=sid, owner=owner, created_at=now, project_id=project, display_name=f"copy of {src.path}",
                                   finished_at=now, finish_reason="success", last_heartbeat=now)  # fmt: skip
            if await self.bus.kv_create(self.bus.sessions, sid, holder):
                await audit.record(self.bus, owner, "session_create", actor=owner, session_id=sid, details={"project_id": project, "why": "copy_weights"})
            elif (await self.gw.session(sid, owner)).display_name != holder.display_name:
                raise InvalidRequest("this X-Idempotency-Key was used for another copy")
            model_id = f"{sid}:train:0"
        run = ModelRecord(model_id=model_id, session_id=model_id.split(":train:")[0], owner=owner, base_model=src.base_model, lora=src.lora,
                          created_at=now, create_request_id="", copy_of=src.path)  # fmt: skip
        if not await self.bus.kv_create(self.bus.models, model_id, run):
            taken = await self.bus.kv_get(self.bus.models, model_id, ModelRecord)
            if taken is None or taken.owner != owner or taken.copy_of != src.path:
                raise InvalidRequest(f"training run {model_id} exists; copy into an unused model_seq_id")
        dest = f"{paths.SCHEME}{model_id}/{parsed.segment}/{src.name}"
        done = await self.bus.kv_get(self.bus.weights, dest, WeightsRecord)
        if done is not None:  # a retry of a copy that finished
            return reply({"tinker_path": dest})
        obj = f"copies/{model_id}/{parsed.segment}-{src.name}"
        size = 0
        try:
            for name in src.files or [""]:  # in chunks (objects.copy): never a whole object in memory
                size += await objects.copy(self.bus.js, self.bus.objects, f"{src.object}/{name}" if name else src.object, f"{obj}/{name}" if name else obj)
        except (*objects.GONE, objects.Truncated):
            raise NotFound(f"{src.path} was deleted while it was being copied") from None
        rec = WeightsRecord(
            path=dest, owner=owner, model_id=model_id, base_model=src.base_model, kind=src.kind, name=src.name, object=obj,
            lora=src.lora, seq_id=src.seq_id, size_bytes=size, created_at=time.time(),
            expires_at=None if body.ttl_seconds is None else now + body.ttl_seconds, files=list(src.files), user_metadata=dict(src.user_metadata),
        )  # fmt: skip
        await self.bus.kv_put(self.bus.weights, dest, rec)
        log.info("checkpoint_copied", source=src.path, path=dest, owner=owner, bytes=size, project_id=project)
        await audit.record(self.bus, owner, "checkpoint_copy", actor=owner, tinker_path=dest, model_id=model_id,
                           details={"source_path": src.path, "size_bytes": size, "project_id": project or ""})  # fmt: skip
        return reply({"tinker_path": dest})

    # -- sessions

    async def list_sessions(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        limit, offset = _page(request, 20)
        recs = await self.sessions(owner)
        return reply({"sessions": [s.session_id for s in recs[offset : offset + limit]]})

    async def get_session(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        sid = check_id(request.match_info["session_id"], "session id")
        rec = await self.gw.session(sid, owner)
        runs = await self.records(self.bus.models, ModelRecord, f"{sid}:train:")
        samplers = await self.records(self.bus.samplers, SamplerRecord, f"{sid}:sample:")
        return reply(
            {
                "training_run_ids": [r.model_id for r in sorted(runs, key=lambda r: r.created_at) if r.owner == owner],
                "sampler_ids": [s.sampler_id for s in sorted(samplers, key=lambda s: s.created_at) if s.owner == owner],
                "user_metadata": rec.user_metadata,
                "display_name": rec.display_name,
            }
        )

    async def assign_project(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        sid = check_id(request.match_info["session_id"], "session id")
        rec = await self.gw.session(sid, owner)
        body = await read_body(request, _ProjectBody)
        if not body.project_id or len(body.project_id) > 256:
            raise InvalidRequest("project_id must be a non-empty string of at most 256 characters")
        await self.bus.kv_put(self.bus.sessions, rec.session_id, msgspec.structs.replace(rec, project_id=body.project_id))
        log.info("session_project_assigned", session_id=sid, owner=owner, project_id=body.project_id)
        await audit.record(self.bus, owner, "session_project_set", actor=owner, session_id=sid, details={"project_id": body.project_id})
        return reply({})

    async def search_sessions(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        body = await read_body(request, _SearchBody)
        if not 1 <= body.limit <= 200:
            raise InvalidRequest("limit must be in [1, 200]")
        owner_type = body.owner.get("type", "own")
        if owner_type not in ("own", "accessible", "user"):
            raise InvalidRequest(f"unknown owner type {owner_type!r}")
        # One key is one principal here: "accessible" is what it owns; "user" must name it.
        if owner_type == "user" and owner not in [str(u).rsplit(":", 1)[-1] for u in body.owner.get("owner_urns") or []]:
            return reply({"sessions": [], "next_cursor": None})
        sessions = await self.sessions(owner)
        checkpoints = await self.checkpoints(owner)
        per_session: dict[str, list[WeightsRecord]] = {}
        runs = {r.model_id: r.session_id for r in await self.runs(owner)}
        for c in checkpoints:
            per_session.setdefault(runs.get(c.model_id, ""), []).append(c)

        def matches(s: SessionRecord) -> bool:
            by_id = body.session_id is not None and s.session_id == body.session_id
            words = (body.display_name or "").lower().split()
            by_name = bool(words) and all(w in (s.display_name or "").lower() for w in words)
            if (body.session_id is not None or words) and not (by_id or by_name):
                return False
            if body.project_ids is not None and s.project_id not in body.project_ids:
                return False
            if any(s.user_metadata.get(k) != v for k, v in body.user_metadata.items()):
                return False
            if body.statuses is not None:
                return any(_status_matches(s, q) for q in body.statuses)
            return True

        found = [s for s in sessions if matches(s)]
        if body.cursor is not None:
            # Compare at the cursor's precision (microseconds): a float timestamp can round up
            # when written as ISO text, which would hand back the cursor's own session again.
            try:
                last = datetime.fromisoformat(body.cursor.last_created_at)
            except ValueError:
                raise InvalidRequest("cursor.last_created_at is not an ISO 8601 time") from None
            if last.tzinfo is None:
                last = last.replace(tzinfo=timezone.utc)
            after = (last, body.cursor.last_session_id)
            found = [s for s in found if (instant(s.created_at), s.session_id) < after]
        page = found[: body.limit]
        summaries = []
        for s in page:
            mine = per_session.get(s.session_id, [])
            summaries.append(
                {
                    "session_id": s.session_id,
                    "created_at": iso(s.created_at),
                    "owner": s.owner,
                    "project_id": s.project_id or "",
                    "status": _status(s),
                    "checkpoints_count": len(mine),
                    "display_name": s.display_name,
                    "user_metadata": s.user_metadata,
                    "checkpoint_storage_bytes": sum(c.size_bytes for c in mine),
                }
            )
        cursor = None
        if len(found) > body.limit:
            last = page[-1]
            cursor = {"last_created_at": iso(last.created_at), "last_session_id": last.session_id}
        return reply({"sessions": summaries, "next_cursor": cursor})

    # -- usage

    async def storage_usage(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        project = request.query.get("project_id")
        projects = {s.session_id: s.project_id for s in await self.sessions(owner)}
        runs = {r.model_id: projects.get(r.session_id) for r in await self.runs(owner)}
        groups: dict[str | None, list[WeightsRecord]] = {}
        for c in await self.checkpoints(owner):
            groups.setdefault(runs.get(c.model_id), []).append(c)
        data = [
            {
                "project_id": p,
                "org_user_urn": f"openrl:key:{owner}",
                "checkpoint_count": len(cs),
                "size_bytes": sum(c.size_bytes for c in cs),
                "size_gigabytes": sum(c.size_bytes for c in cs) / 1e9,
            }
            for p, cs in sorted(groups.items(), key=lambda kv: kv[0] or "")
            if project is None or p == project
        ]
        return reply({"data": data, "effective_rate_usd_per_gigabyte_month": None})

    # -- expiry

    async def reap_once(self) -> int:
        """Delete every expired checkpoint (record and blobs); the number deleted."""
        now = time.time()
        expired = [r for r in await self.records(self.bus.weights, WeightsRecord) if not _live(r, now)]
        for rec in expired:
            await self.delete(rec, "expired")
        return len(expired)

    async def reap(self, every_s: float = REAP_EVERY_S) -> None:
        collected_at = 0.0
        while True:
            try:
                await self.reap_once()
                if time.monotonic() - collected_at >= self.gw.cfg.collect_every_s:
                    collected_at = time.monotonic()
                    await self.collect_samplers_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus reconnecting: try again next round
                log.warning("reap_failed", error=repr(e))
            await asyncio.sleep(min(every_s, self.gw.cfg.collect_every_s))

    # -- sampler retention (docs/storage.md)

    async def collect_samplers_once(self) -> tuple[int, int]:
        """The retention policy for sampling sessions and unnamed sampler weights; returns
        (sampling sessions retired, adapter objects deleted).

        A sampling session is retired (its record deleted: asking it to sample is a 404) when
        its session has finished, and, for unnamed sampler weights
        (save_weights_and_get_sampling_client), when it is not among the newest
        `sampler_weights_keep` of its model. An adapter object that no sampling session, no
        named checkpoint and no queued or running sample request references is deleted once it
        has been seen so for `collect_grace_s` (a save being recorded, a sample request being
        published for a session retired a moment ago). Idempotent, so every replica runs it."""
        cfg = self.gw.cfg
        sessions = {s.session_id: s for s in await self.records(self.bus.sessions, SessionRecord)}
        unnamed: dict[str, list[SamplerRecord]] = {}
        retire: list[SamplerRecord] = []
        live: list[SamplerRecord] = []
        for s in await self.records(self.bus.samplers, SamplerRecord, strict=True):
            session = sessions.get(s.session_id)
            if session is not None and session.finished_at is not None:
                retire.append(s)
            elif s.weights and s.weights.startswith(ADAPTERS) and not s.model_path:
                unnamed.setdefault(s.weights.rsplit("/", 1)[0], []).append(s)
            else:
                live.append(s)
        for versions in unnamed.values():
            versions.sort(key=lambda s: (s.weights, s.sampler_id))  # adapters/<model>/seq-<zero-padded seq_id>
            cut = max(0, len(versions) - cfg.sampler_weights_keep)
            retire += versions[:cut]
            live += versions[cut:]
        for s in retire:  # purged, not deleted: a KV delete leaves a marker per key, one per training step here
            await self.bus.js.purge_stream(f"KV_{subjects.SAMPLERS_BUCKET}", subject=f"$KV.{subjects.SAMPLERS_BUCKET}.{subjects.kv_key(s.sampler_id)}")
            log.info("sampler_retired", sampler_id=s.sampler_id, owner=s.owner, weights=s.weights)
        deleted = await self._collect_adapters({s.weights for s in live if s.weights})
        return len(retire), deleted

    async def _collect_adapters(self, referenced: set[str]) -> int:
        referenced |= {w.object for w in await self.records(self.bus.weights, WeightsRecord, strict=True)}
        stored = await objects.names(self.bus.js, self.bus.objects, ADAPTERS)
        unreferenced = set(stored) - referenced
        if unreferenced:
            unreferenced -= await self._queued_weights()
        now = time.monotonic()
        self._unreferenced = {name: self._unreferenced.get(name, now) for name in unreferenced}
        deleted = 0
        for name, since in list(self._unreferenced.items()):
            if now - since >= self.gw.cfg.collect_grace_s:
                if await objects.delete(self.bus.objects, name):
                    deleted += 1
                    log.info("sampler_weights_deleted", object=name)
                del self._unreferenced[name]
        return deleted

    async def _queued_weights(self) -> set[str]:
        """The adapter objects that sample requests still in the sample stream (queued, or taken
        by a sampler and not yet acked) name."""
        if not (await self.bus.js.stream_info(subjects.SAMPLE_STREAM)).state.messages:
            return set()
        names: set[str] = set()
        async for raw in self.bus.messages(subjects.SAMPLE_STREAM, f"{subjects.PREFIX}.sample.>"):
            try:
                ref = decode(raw.data, _WeightsRef)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if ref.weights:
                names.add(ref.weights)
        return names


def _status(s: SessionRecord) -> dict[str, Any]:
    if s.finished_at is None:
        return {"type": "active"}
    reason = s.finish_reason if s.finish_reason in ("success", "errored", "interrupted") else "success"
    return {"type": "client_finished", "reason": {"type": reason}}


def _status_matches(s: SessionRecord, query: dict[str, Any]) -> bool:
    status = _status(s)
    if query.get("type") != status["type"]:
        return False
    reasons = query.get("reasons")
    return status["type"] != "client_finished" or not reasons or status["reason"]["type"] in reasons


CATALOGUE = web.AppKey("catalogue", Catalogue)
REAPER = web.AppKey("reaper", asyncio.Task)


def add_routes(app: web.Application, cat: Catalogue) -> None:
    """The catalogue's routes, and the TTL reaper. A route of another module under
    .../checkpoints/ goes before these: the last one here takes whatever is left there."""
    app[CATALOGUE] = cat
    r = app.router
    ckpt = f"{API}/training_runs/{{run}}/checkpoints/{{segment}}/{{name}}"
    r.add_get(f"{API}/training_runs", cat.list_training_runs)
    r.add_get(f"{API}/training_runs/{{run}}", cat.get_training_run)
    r.add_get(f"{API}/training_runs/{{run}}/checkpoints", cat.list_checkpoints)
    r.add_post(f"{API}/copy_weights", cat.copy_weights)
    r.add_post(f"{ckpt}/publish", cat.publish)
    r.add_delete(f"{ckpt}/publish", cat.unpublish)
    r.add_put(f"{ckpt}/ttl", cat.set_ttl)
    r.add_delete(ckpt, cat.delete_checkpoint)
    r.add_route("*", f"{API}/training_runs/{{run}}/checkpoints/{{rest:.+}}", cat.bad_checkpoint_address)
    r.add_get(f"{API}/checkpoints", cat.list_user_checkpoints)
    r.add_post(f"{API}/weights_info", cat.weights_info)
    r.add_get(f"{API}/sessions", cat.list_sessions)
    r.add_post(f"{API}/sessions/search", cat.search_sessions)
    r.add_get(f"{API}/sessions/{{session_id}}", cat.get_session)
    r.add_put(f"{API}/sessions/{{session_id}}/project", cat.assign_project)
    r.add_get(f"{API}/billing/usage/checkpoints/current", cat.storage_usage)

    async def start_reaper(app: web.Application) -> None:
        app[REAPER] = asyncio.create_task(cat.reap())

    async def stop_reaper(app: web.Application) -> None:
        app[REAPER].cancel()
        await asyncio.gather(app[REAPER], return_exceptions=True)

    app.on_startup.append(start_reaper)
    app.on_cleanup.append(stop_reaper)
