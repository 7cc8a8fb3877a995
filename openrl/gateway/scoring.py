"""The scoring API: completions scored by named reward functions, beside the Tinker routes.

    POST /api/v1/score     {"reward_name", "items": [{"prompt", "completion", "reference"}],
                            "idempotency_key"?}  ->  {"request_id", "reward_name", "items"}
    POST /api/v1/retrieve_future {"request_id"}  ->  the ScoreResult JSON (long-polled, 408 while pending)
    GET  /api/v1/rewards   ->  {"rewards": [{"name", "workers", "concurrency", "busy_fraction"}]}

Same API keys and futures as the Tinker routes: a key sees only its own results. The
gateway never runs reward code; it checks the request, records a pending future and puts
a `ScoreRequest` on `openrl.reward.<name>` for the rewarders serving that name.
"""

from __future__ import annotations

import hashlib
import uuid

import msgspec
from aiohttp import web

from openrl.bus import subjects
from openrl.bus.errors import InvalidRequest, Unavailable
from openrl.bus.messages import ScoreItem, ScoreRequest, WorkerInfo, encode
from openrl.gateway import bounds
from openrl.gateway.admission import Slot
from openrl.gateway.http import API, read_body, reply, request_id
from openrl.gateway.service import Gateway

MAX_ITEMS = 4096  # per request; send more as several requests (they are scored in parallel)
MAX_IDEMPOTENCY_KEY = 256


class _Item(msgspec.Struct, kw_only=True):
    prompt: str = ""
    completion: str
    reference: msgspec.Raw = msgspec.Raw(b"null")  # any JSON value, passed through as is


class ScoreBody(msgspec.Struct, kw_only=True):
    reward_name: str
    items: list[_Item]
    idempotency_key: str | None = None


class Scoring:
    def __init__(self, gw: Gateway):
        self.gw = gw

    async def rewarders(self) -> list[WorkerInfo]:
        return [w for w in await self.gw.workers() if w.kind == "rewarder"]

    async def rewards(self, request: web.Request) -> web.Response:
        self.gw.owner(request)
        by_name: dict[str, list[WorkerInfo]] = {}
        for w in await self.rewarders():
            by_name.setdefault(w.reward_name, []).append(w)
        return reply(
            {
                "rewards": [
                    {
                        "name": name,
                        "workers": len(ws),
                        "concurrency": sum(w.concurrency for w in ws),
                        "busy_fraction": round(sum(w.busy_fraction for w in ws) / len(ws), 4),
                    }
                    for name, ws in sorted(by_name.items())
                ]
            }
        )

    async def score(self, request: web.Request) -> web.Response:
        owner = self.gw.owner(request)
        async with self.gw.admission.admit(owner, "score") as slot:  # before the body is read
            return await self._score(request, owner, slot)

    async def _score(self, request: web.Request, owner: str, slot: Slot) -> web.Response:
        body = await read_body(request, ScoreBody)
        if not body.items:
            raise InvalidRequest("items is empty")
        if len(body.items) > MAX_ITEMS:
            raise InvalidRequest(f"at most {MAX_ITEMS} items per request, got {len(body.items)}; split them over several requests")
        key = body.idempotency_key if body.idempotency_key is not None else request.headers.get("X-Idempotency-Key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise InvalidRequest(f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        available = sorted({w.reward_name for w in await self.rewarders()})
        if body.reward_name not in available:
            if not available:
                raise Unavailable("no reward worker is running yet; retry shortly")
            return reply(
                {"detail": f"unknown reward function {body.reward_name!r}; available: {', '.join(available)}",
                 "type": "invalid_request", "available": available},
                status=400,
            )  # fmt: skip
        items = [ScoreItem(prompt=i.prompt, completion=i.completion, reference=bytes(i.reference)) for i in body.items]
        if key is None:
            rid = f"score-{uuid.uuid4().hex}"
        else:
            # A retry with the same key and the same items is the same request; a reused key
            # with other items is a new one (never someone else's stale result).
            content = hashlib.blake2b(encode(ScoreRequest(request_id="", reward_name=body.reward_name, items=items)), digest_size=12).hexdigest()
            rid = request_id("score", owner, key, content)
        msg = ScoreRequest(request_id=rid, reward_name=body.reward_name, items=items)
        bounds.encoded(msg, "score request")
        await self.gw.usage.check_reward_items(owner, rid, len(items))
        if await self.gw.accept(rid, owner, "Score"):
            slot.track(rid)
        self.gw.usage.scoring(owner, rid, len(items))
        # Published even when accepted before: the first attempt may have died in between;
        # JetStream drops the duplicate, and a rewarder never scores a finished request again.
        await self.gw.bus.publish(subjects.reward(body.reward_name), msg, msg_id=rid)
        return reply({"request_id": rid, "reward_name": body.reward_name, "items": len(items)})


def add_routes(app: web.Application, gw: Gateway) -> None:
    scoring = Scoring(gw)
    app.router.add_post(f"{API}/score", scoring.score)
    app.router.add_get(f"{API}/rewards", scoring.rewards)
