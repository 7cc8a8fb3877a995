"""API keys: `openrl keys create | list | revoke`, and the gateway's live view of them.

A key is `tml-` + 32 random bytes (urlsafe base64); the SDK refuses keys without the `tml-`
prefix. Only its hash (the gateway's `key_id`) is stored, in KV `openrl-keys`, with a name and
the first characters as a hint; the key itself is printed once, at creation. Each key is its
own tenant (its key id is the `owner` of everything it makes). Keys given to the gateway with
`--api-key` / OPENRL_API_KEYS keep working beside these and cannot be revoked here.

Every gateway watches the bucket (`watch`), so a created key works, and a revoked one stops
working, on every replica within a moment, and `Gateway.owner` stays a set lookup.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import structlog
from aiohttp import web

from openrl.bus.client import Bus, BusConfig, stop_watch
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import ApiKeyRecord, decode
from openrl.gateway import audit
from openrl.gateway.http import key_id
from openrl.gateway.names import check_name

log = structlog.get_logger(__name__)


def new_key() -> str:
    return "tml-" + secrets.token_urlsafe(32)


async def records(bus: Bus) -> list[ApiKeyRecord]:
    keys = await bus.kv_keys(bus.keys)
    found = [await bus.kv_get(bus.keys, k, ApiKeyRecord) for k in keys]
    return sorted((r for r in found if r is not None), key=lambda r: r.created_at)


async def create(bus: Bus, name: str) -> tuple[str, ApiKeyRecord]:
    """A new key named `name` (names of live keys are unique); the key is returned once."""
    check_name(name)
    if any(r.name == name and r.revoked_at is None for r in await records(bus)):
        raise InvalidRequest(f"a key named {name!r} exists; revoke it first or choose another name")
    key = new_key()
    rec = ApiKeyRecord(key_id=key_id(key), name=name, created_at=time.time(), hint=key[:8])
    await bus.kv_create(bus.keys, rec.key_id, rec)
    await audit.record(bus, rec.key_id, "key_create", details={"name": name, "key_id": rec.key_id})
    return key, rec


async def revoke(bus: Bus, name_or_id: str) -> list[ApiKeyRecord]:
    """Revoke the live keys with this name or key id; the records revoked."""
    hits = [r for r in await records(bus) if r.revoked_at is None and name_or_id in (r.name, r.key_id)]
    if not hits:
        raise InvalidRequest(f"no live key named {name_or_id!r}")
    now = time.time()
    done = []
    for r in hits:
        rec = ApiKeyRecord(key_id=r.key_id, name=r.name, created_at=r.created_at, revoked_at=now, hint=r.hint)
        await bus.kv_put(bus.keys, r.key_id, rec)
        await audit.record(bus, r.key_id, "key_revoke", details={"name": r.name, "key_id": r.key_id})
        done.append(rec)
    return done


async def watch(bus: Bus, valid: set[str], ready: asyncio.Event | None = None) -> None:
    """Keep `valid` equal to the ids of the live keys in the bucket, until cancelled."""
    while True:
        watcher = None
        try:
            watcher = await bus.keys.watchall()
            async for entry in watcher:
                if entry is None:  # the initial values are in
                    if ready is not None:
                        ready.set()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    valid.discard(entry.key)  # key ids are hex: the KV key is the id
                    continue
                rec = decode(entry.value, ApiKeyRecord)
                (valid.discard if rec.revoked_at is not None else valid.add)(rec.key_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the bus reconnecting: watch again
            log.warning("keys_watch_failed", error=repr(e))
            await asyncio.sleep(1.0)
        finally:
            await stop_watch(watcher)  # its subscription must not outlive the watch (or hold up a drain)


KEYS_WATCH = web.AppKey("keys_watch", asyncio.Task)


def attach(app: web.Application, gw) -> None:
    """Run `watch` for this gateway: `gw.live_keys` holds the live keys' ids once it has started."""

    async def start(app: web.Application) -> None:
        ready = asyncio.Event()
        app[KEYS_WATCH] = asyncio.create_task(watch(gw.bus, gw.live_keys, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
        except asyncio.TimeoutError:
            log.warning("keys_not_loaded", after_s=10)

    async def stop(app: web.Application) -> None:
        app[KEYS_WATCH].cancel()
        await asyncio.gather(app[KEYS_WATCH], return_exceptions=True)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


async def main(nats_url: str, action: str, name: str | None, credentials: dict | None = None) -> int:
    """`openrl keys ...`: print what it did; 0 on success. `credentials`: the operator's
    BusConfig fields (role, user, password), none on an open server."""
    bus = await Bus.connect(BusConfig(url=nats_url, name="openrl-keys", **(credentials or {})))
    try:
        if action == "create":
            key, rec = await create(bus, name or "")
            print(f"Created key {rec.name!r} (id {rec.key_id}). It is shown once; keep it:")
            print(key)
        elif action == "list":
            rows = await records(bus)
            print(f"{'name':24} {'key id':26} {'hint':10} {'created':20} revoked")
            for r in rows:
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))
                revoked = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.revoked_at)) if r.revoked_at else "-"
                print(f"{r.name:24} {r.key_id:26} {r.hint + '...':10} {created:20} {revoked}")
        else:
            for r in await revoke(bus, name or ""):
                print(f"Revoked key {r.name!r} (id {r.key_id})")
        return 0
    except InvalidRequest as e:
        print(f"error: {e}")
        return 2
    finally:
        await bus.close()
