"""Kubernetes probes: `python -m openrl.probe --kind trainer` exits 0 when this pod's worker is live.

Workers serve no HTTP yet, so their readiness is read where the gateway reads it: the
heartbeat a worker writes to the `openrl-workers` bucket every 2 s once its model is loaded
and its bus connected. The bucket's TTL removes an entry soon after the last beat, so "an
entry of this kind from this host exists" means "a worker here beat recently". A pod's
hostname is its pod name, and the probe runs in the worker's container, so the host matches.

`--kind gateway` asks the gateway's own /api/v1/healthz and wants `"bus": true` (the route
answers 200 even while NATS is unreachable).

Liveness wants `--unreachable-ok`: when the probe cannot reach NATS either, the worker is
not the one at fault and restarting it would not help.

Exit codes: 0 live, 1 not live; one line on stdout says why (kubelet puts it in the pod's
events). The probe never creates or changes a stream or bucket (it does not use
`Bus.connect`, whose `ensure` would bring every stream to its own replica count).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import urllib.request

import msgspec

from openrl.bus import subjects
from openrl.bus.client import kv_keys
from openrl.bus.messages import WorkerInfo, decode

WORKER_KINDS = ("trainer", "sampler", "rewarder")


class Unreachable(Exception):
    """NATS (or the gateway) could not be asked at all."""


async def find_worker(nats_url: str, kind: str, host: str, timeout_s: float, credentials=None) -> list[WorkerInfo]:
    """The live heartbeats of `kind` workers on `host` (in a pod: one), freshest first.
    `credentials`: the worker role's (it runs in the worker's container, with its environment)."""
    import nats

    from openrl.bus import auth
    from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError

    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:  # nats-py would print a traceback per attempt
        errors.append(e)

    try:
        nc = await asyncio.wait_for(
            nats.connect(servers=[nats_url], name="openrl-probe", connect_timeout=timeout_s, allow_reconnect=False,
                         max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=on_error,
                         **auth.connect_options(kind, credentials)),
            timeout_s,
        )
    except Exception as e:
        raise Unreachable(f"nats {nats_url}: {(errors[-1] if errors else e)!r}") from None
    try:
        try:
            js = nc.jetstream(timeout=timeout_s)
            kv = await js.key_value(subjects.WORKERS_BUCKET)
            keys = await kv_keys(js, kv)
        except (BucketNotFoundError, NotFoundError, NoKeysError):
            return []  # no worker has ever beaten, or none is beating now
        found: list[WorkerInfo] = []
        for key in keys:
            try:
                entry = await kv.get(key)
            except Exception:  # expired between keys() and get()
                continue
            if not entry.value:
                continue
            try:
                info = decode(entry.value, WorkerInfo)
            except msgspec.MsgspecError:
                continue
            if info.kind == kind and info.host == host:
                found.append(info)
        return sorted(found, key=lambda i: -i.heartbeat_at)
    finally:
        await nc.close()


def gateway_bus_connected(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            health = json.loads(r.read())
    except (OSError, ValueError) as e:
        raise Unreachable(f"gateway {url}: {e!r}") from None
    return health.get("bus") is True


def credentials(role: str):
    """The worker's NATS credentials, from the environment it runs with: OPENRL_NATS_USER and
    OPENRL_NATS_PASSWORD, or the file OPENRL_NATS_CREDS, and OPENRL_NATS_CA for TLS; None without any."""
    from openrl.bus import auth

    ca = os.environ.get("OPENRL_NATS_CA", "")
    if os.environ.get("OPENRL_NATS_USER"):
        return auth.Credentials(user=os.environ["OPENRL_NATS_USER"], password=os.environ.get("OPENRL_NATS_PASSWORD", ""), ca=ca)
    if os.environ.get("OPENRL_NATS_CREDS"):
        creds = auth.load(os.environ["OPENRL_NATS_CREDS"], role)
        return auth.Credentials(user=creds.user, password=creds.password, ca=ca)
    return auth.Credentials(user="", ca=ca) if ca else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m openrl.probe", description=__doc__.split("\n")[0])
    p.add_argument("--kind", required=True, choices=("gateway", *WORKER_KINDS))
    p.add_argument("--nats-url", default=os.environ.get("OPENRL_NATS_URL", "nats://127.0.0.1:4222"),
                   help="[OPENRL_NATS_URL], as the worker reads it")
    p.add_argument("--host", default=socket.gethostname(), help="the worker's host (default: this one, i.e. the pod name)")
    p.add_argument("--url", default="http://127.0.0.1:8000/api/v1/healthz", help="the gateway's healthz (--kind gateway)")
    p.add_argument("--timeout-s", type=float, default=4.0)
    p.add_argument("--unreachable-ok", action="store_true",
                   help="exit 0 when NATS (or the gateway) cannot be reached at all: for liveness probes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.kind == "gateway":
            ok = gateway_bus_connected(args.url, args.timeout_s)
            print("gateway bus connected" if ok else "gateway up, bus not connected")
            return 0 if ok else 1
        found = asyncio.run(find_worker(args.nats_url, args.kind, args.host, args.timeout_s, credentials(args.kind)))
    except Unreachable as e:
        print(f"unreachable: {e}")
        return 0 if args.unreachable_ok else 1
    if not found:
        print(f"no live {args.kind} heartbeat from host {args.host}")
        return 1
    for info in found:
        print(f"{args.kind} {info.worker_id} live (base model {info.base_model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
