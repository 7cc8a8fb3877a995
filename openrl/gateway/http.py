"""What every route module of the gateway shares: JSON replies, request bodies, ids, and the
one place where errors become HTTP answers.

It sits below every route module and imports none of them: `app.make_app` puts the modules
together, and each module takes what it needs from here.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from aiohttp import web

from openrl.bus.errors import InvalidRequest, NotFound, Unauthorized, Unavailable

log = structlog.get_logger(__name__)

API = "/api/v1"


def key_id(api_key: str) -> str:
    """What the system stores and compares: never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24]


def request_id(kind: str, *parts: object) -> str:
    """Deterministic: a retried submission maps to the same id on any replica."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=12).hexdigest()
    return f"{kind}-{digest}"


def reply(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """`data` as a JSON response (msgspec encodes it)."""
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json", headers=headers)


async def read_body(request: web.Request, type_: type):
    """The request's JSON body as `type_` (msgspec validates types; unknown fields are ignored)."""
    raw = await request.read()  # raises 413 above client_max_size
    try:
        return msgspec.json.decode(raw or b"{}", type=type_)
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid request body: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None


def check_ttl(ttl_seconds: int | None) -> None:
    if ttl_seconds is not None and not 3600 <= ttl_seconds <= 10 * 365 * 86400:
        raise InvalidRequest(f"ttl_seconds must be between 3600 and 10 years, got {ttl_seconds}")


# -- the gateway's errors, beyond the bus's ---------------------------------------------


class Forbidden(NotFound):
    """The caller may read this (a published checkpoint) but not change it: 403."""


class QuotaExceeded(InvalidRequest):
    """The key holds as much of something as its quota allows (quotas.py): 429, and the
    message says which quota and how to free room. Still a refusal of this request: a
    sequenced one fills its seq_id like any other 4xx."""


class Backlogged(Unavailable):
    """The key has as many bytes of training requests waiting as it may (quotas.py): 429 with
    Retry-After. Nothing is decided, so a sequenced request fills nothing: the client sends the
    same request again (the SDK does, on a 429) once some of its earlier ones have finished."""


class InvalidToken(Unauthorized):
    """A JWT that is malformed, tampered with, not ours or expired (auth.py): 401 with
    `WWW-Authenticate: Bearer error="invalid_token"`, on which the SDK fetches a fresh JWT and
    replays the request once."""


# -- errors: translated here, and only here ---------------------------------------------

# Every error raised on purpose, by what the client should do: (status, type, headers). An
# error is answered by the entry of the nearest class in its MRO, so Forbidden (a NotFound) is
# a 403 and InvalidToken (an Unauthorized) carries its challenge, whatever the order here.
ANSWERS: dict[type[Exception], tuple[int, str, dict[str, str] | None]] = {
    InvalidRequest: (400, "invalid_request", None),
    QuotaExceeded: (429, "quota_exceeded", None),
    # A key NATS refuses (a trailing '.', a space, a wildcard) that no route checked first.
    nats.js.errors.InvalidKeyError: (400, "invalid_request", None),
    NotFound: (404, "not_found", None),
    Forbidden: (403, "forbidden", None),
    Unauthorized: (401, "unauthorized", None),
    InvalidToken: (401, "unauthorized", {"WWW-Authenticate": 'Bearer error="invalid_token"'}),
    Unavailable: (503, "unavailable", {"Retry-After": "2"}),
    Backlogged: (429, "rate_limited", {"Retry-After": "2"}),
}

# Errors that mean "the bus is down or reconnecting", not "this request is wrong".
BUS_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoServersError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)


def _answer(e: Exception) -> tuple[int, str, dict[str, str] | None]:
    return next(ANSWERS[cls] for cls in type(e).__mro__ if cls in ANSWERS)


@web.middleware
async def errors(request: web.Request, handler):
    try:
        return await handler(request)
    except tuple(ANSWERS) as e:
        status, kind, headers = _answer(e)
        detail = str(e) if not isinstance(e, nats.js.errors.InvalidKeyError) else "malformed id: not a valid key"
        return reply({"detail": detail, "type": kind}, status=status, headers=headers)
    except BUS_UNAVAILABLE as e:
        # The bus is down or reconnecting: nothing was decided, so the client may retry.
        log.warning("bus_unavailable", path=request.path, error=repr(e))
        return reply({"detail": f"message bus unavailable: {type(e).__name__}; retry shortly", "type": "unavailable"},
                     status=503, headers={"Retry-After": "2"})  # fmt: skip
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # Never a bare 4xx: the SDK reads an empty 400 as a proxy drop and retries.
        return reply({"detail": e.reason if e.text is None else e.text, "type": "http_error"}, status=e.status)
    except Exception:
        error_id = uuid.uuid4().hex[:12]
        log.exception("request_failed", path=request.path, error_id=error_id)
        return reply({"detail": f"internal error (id {error_id})", "type": "internal"}, status=500)
