"""Short-lived JWTs: the tinker SDK's JWT mode, which `RestClient.whoami` needs.

    POST /api/v1/auth/token   X-API-Key: tml-...   {}   ->   {"jwt": "<HS256 JWT>"}

When client/config says `pjwt_auth_enabled` (the gateway's `--jwt-auth` / OPENRL_JWT_AUTH=1),
the SDK exchanges its API key here once per client, then sends the JWT in X-API-Key instead
of the key, refreshing it at about half its lifetime. `whoami` decodes the JWT's `sub` and
`org_id` claims on the client and sends nothing. The mode is opt-in because it costs every
client an extra round trip and a background refresh, and buys nothing but `whoami`.

Every gateway accepts JWTs, whatever its flag, so a fleet may switch one replica at a time:
they are signed with a secret made once in KV `openrl-secrets` (create wins, everyone reads
the winner), its own entry, apart from the download-URL secret, so either can be rotated
alone. A JWT names its API key's id; the key is checked on every request as a plain key is,
so revoking a key ends its JWTs at once. Only an API key buys a JWT: a JWT cannot renew itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time

import structlog
from aiohttp import web

from openrl.bus.errors import Unauthorized
from openrl.bus.messages import Secret
from openrl.gateway.http import API, InvalidToken

log = structlog.get_logger(__name__)

JWT_TTL_S = 3600
ISSUER = "openrl"
SIGNING_KEY = "jwt-signing"
_HEADER = {"alg": "HS256", "typ": "JWT"}
_KEY_ID = re.compile(r"[0-9a-f]{24}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signing_input: str) -> str:
    return _b64(hmac.new(secret, signing_input.encode("utf-8", "replace"), hashlib.sha256).digest())


def issue(secret: bytes, key_id: str, now: float | None = None, ttl_s: int = JWT_TTL_S) -> str:
    """A JWT for the API key with this id. `sub` and `org_id` are what whoami shows: each key
    is its own tenant, named as billing and storage usage name it (`openrl:key:<id>`)."""
    iat = int(time.time() if now is None else now)
    claims = {"iss": ISSUER, "sub": f"openrl:key:{key_id}", "org_id": key_id, "key_id": key_id, "iat": iat, "exp": iat + ttl_s}
    signing_input = _b64(json.dumps(_HEADER, separators=(",", ":")).encode()) + "." + _b64(json.dumps(claims, separators=(",", ":")).encode())
    return signing_input + "." + _sign(secret, signing_input)


def verify(token: str, secret: bytes | None) -> str:
    """The API key id a valid, unexpired JWT of ours names; InvalidToken otherwise."""
    if secret is None:
        raise InvalidToken("this gateway cannot check JWTs yet")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("malformed JWT")
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    if not hmac.compare_digest(_sign(secret, parts[0] + "." + parts[1]).encode(), parts[2].encode("utf-8", "replace")):
        raise InvalidToken("JWT signature does not match: it was changed or not issued here")
    try:  # signed by us from here on; still checked, in case the format ever changes
        header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
        key_id, exp = claims["key_id"], float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        raise InvalidToken("malformed JWT") from None
    if header != _HEADER or claims.get("iss") != ISSUER or not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidToken("JWT not issued by OpenRL")
    if exp <= time.time():
        raise InvalidToken("JWT expired; exchange the API key for a new one at /api/v1/auth/token")
    return key_id


async def load_secret(bus) -> bytes:
    rec = await bus.kv_get(bus.secrets, SIGNING_KEY, Secret)
    if rec is None:
        await bus.kv_create(bus.secrets, SIGNING_KEY, Secret(secret=secrets.token_bytes(32), created_at=time.time()))
        rec = await bus.kv_get(bus.secrets, SIGNING_KEY, Secret)  # the winner's, if another gateway raced
    return rec.secret


def attach(app: web.Application, gw) -> None:
    """Serve auth/token, and load the signing secret into `gw.jwt_secret` at startup."""

    async def start(app: web.Application) -> None:
        gw.jwt_secret = await load_secret(gw.bus)

    async def auth_token(request: web.Request) -> web.Response:
        """Trade an API key for a JWT valid for an hour (the SDK's JWT mode)."""
        if request.headers.get("X-API-Key", "").startswith("eyJ"):
            raise Unauthorized("auth/token takes an API key (tml-...), not a JWT")
        key_id = gw.owner(request)
        log.info("jwt_issued", owner=key_id, ttl_s=JWT_TTL_S)
        return web.json_response({"jwt": issue(gw.jwt_secret, key_id)})

    app.on_startup.append(start)
    app.router.add_post(f"{API}/auth/token", auth_token)
