"""`openrl status`: what the system is doing, read from NATS (the only place it is written).

Workers (their heartbeats in `openrl-workers`), streams and consumers (JetStream consumer
info: the backlog, unacked, redelivered), dead letters where a DLQ stream exists, and the
number of sessions and models. It reads only: no stream or bucket is created or changed
(it does not use `Bus.connect`, whose `ensure` would bring them to its own config).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import dataclass, field

import msgspec

from openrl.bus import subjects
from openrl.bus.client import kv_keys
from openrl.bus.messages import Lease, WorkerInfo, decode
from openrl.metrics import consumer_stats


@dataclass
class Snapshot:
    nats_url: str
    at: float
    workers: list[WorkerInfo] = field(default_factory=list)
    streams: dict[str, dict] = field(default_factory=dict)
    consumers: list[dict] = field(default_factory=list)
    sessions: int = 0
    models: int = 0
    leases: dict[str, int] = field(default_factory=dict)  # owner -> models leased to it
    gateway: dict | None = None
    gateway_error: str = ""


async def _kv_values(js, bucket: str) -> list[bytes]:
    from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError

    try:
        kv = await js.key_value(bucket)
        keys = await kv_keys(js, kv)
    except (BucketNotFoundError, NotFoundError, NoKeysError):
        return []
    values = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except Exception:  # expired between keys() and get()
            continue
        if entry.value:
            values.append(entry.value)
    return values


async def _kv_count(js, bucket: str) -> int:
    from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError

    try:
        return len(await kv_keys(js, await js.key_value(bucket)))
    except (BucketNotFoundError, NotFoundError, NoKeysError):
        return 0


async def snapshot(nats_url: str, timeout_s: float = 5.0, credentials=None) -> Snapshot:
    """`credentials`: the operator's (openrl.bus.auth.Credentials), None on an open server."""
    import nats

    from openrl.bus import auth

    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)

    try:
        nc = await nats.connect(servers=[nats_url], name="openrl-status", connect_timeout=timeout_s, allow_reconnect=False,
                                max_reconnect_attempts=1, error_cb=on_error,
                                **auth.connect_options("operator", credentials))  # fmt: skip
    except Exception as e:
        raise ConnectionError(f"cannot reach NATS at {nats_url}: {(errors[-1] if errors else e)!r}") from None
    try:
        js = nc.jetstream(timeout=timeout_s)
        snap = Snapshot(nats_url=nats_url, at=time.time())
        for raw in await _kv_values(js, subjects.WORKERS_BUCKET):
            try:
                snap.workers.append(decode(raw, WorkerInfo))
            except msgspec.MsgspecError:
                continue
        snap.workers.sort(key=lambda w: (w.kind, w.base_model or w.reward_name, w.worker_id))
        snap.streams, snap.consumers = await consumer_stats(js)
        snap.sessions = await _kv_count(js, subjects.SESSIONS_BUCKET)
        snap.models = await _kv_count(js, subjects.MODELS_BUCKET)
        for raw in await _kv_values(js, subjects.LEASES_BUCKET):
            try:
                lease = decode(raw, Lease)
            except msgspec.MsgspecError:
                continue
            snap.leases[lease.owner] = snap.leases.get(lease.owner, 0) + 1
        return snap
    finally:
        await nc.close()


def gateway_health(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/healthz", timeout=timeout_s) as r:
        return json.loads(r.read())


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(snap: Snapshot) -> str:
    out = [f"OpenRL status  {snap.nats_url}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(snap.at))}", ""]
    if snap.gateway is not None:
        g = snap.gateway
        out.append(f"gateway: bus {'connected' if g.get('bus') else 'NOT connected'}; sees {len(g.get('trainers', []))} trainers, "
                   f"{len(g.get('samplers', []))} samplers, {len(g.get('rewarders', []))} rewarders")  # fmt: skip
        out.append("")
    elif snap.gateway_error:
        out += [f"gateway: unreachable ({snap.gateway_error})", ""]
    out.append(f"WORKERS ({len(snap.workers)})")
    if snap.workers:
        rows = [["KIND", "ID", "HOST", "PID", "SERVES", "DEVICE", "BUSY", "HELD", "LEASES", "UP"]]
        for w in snap.workers:
            serves = w.reward_name if w.kind == "rewarder" else w.base_model
            held = f"{w.concurrency} procs" if w.kind == "rewarder" else str(w.models)
            leases = str(snap.leases.get(w.worker_id, 0)) if w.kind == "trainer" else "-"
            rows.append([w.kind, w.worker_id, w.host, str(w.pid), serves, w.device or "-", f"{100 * w.busy_fraction:.0f}%", held,
                         leases, _age(snap.at - w.started_at) if w.started_at else "-"])  # fmt: skip
        out += ["  " + line for line in _table(rows)]
    else:
        out.append("  none (no heartbeat in the last 10 s)")
    out += ["", "STREAMS"]
    rows = [["STREAM", "MESSAGES", "BYTES", "CONSUMERS"]]
    for name, s in snap.streams.items():
        rows.append([name + (" (dead letters)" if s["dead_letters"] else ""), str(s["messages"]), str(s["bytes"]), str(s["consumers"])])
    out += ["  " + line for line in _table(rows)]
    out += ["", "CONSUMERS"]
    if snap.consumers:
        rows = [["STREAM", "CONSUMER", "PENDING", "ACK PENDING", "REDELIVERED", "WAITING"]]
        for c in snap.consumers:
            rows.append([c["stream"], c["consumer"], str(c["pending"]), str(c["ack_pending"]), str(c["redelivered"]), str(c["waiting"])])
        out += ["  " + line for line in _table(rows)]
    else:
        out.append("  none")
    dead = {n: s["messages"] for n, s in snap.streams.items() if s["dead_letters"]}
    out += ["", "DEAD LETTERS: " + (", ".join(f"{n} {m}" for n, m in dead.items()) if dead else "no DLQ stream")]
    out.append(f"SESSIONS: {snap.sessions}   MODELS: {snap.models}   LEASED: {sum(snap.leases.values())}")
    return "\n".join(out) + "\n"


async def collect(nats_url: str, gateway_url: str = "", credentials=None) -> Snapshot:
    snap = await snapshot(nats_url, credentials=credentials)
    if gateway_url:
        try:
            snap.gateway = await asyncio.to_thread(gateway_health, gateway_url)
        except (OSError, ValueError) as e:
            snap.gateway_error = repr(e)
    return snap
