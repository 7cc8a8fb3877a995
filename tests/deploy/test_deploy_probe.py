"""`python -m openrl.probe`, the manifests' exec probes, against a real nats-server and a
real gateway app: run as the kubelet runs it (a subprocess, judged by its exit code)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid

from aiohttp import web

from openrl.bus.client import Bus, BusConfig
from stack_helpers import bus_config
from openrl.bus.messages import WorkerInfo
from openrl.bus.server import free_port


async def probe(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "openrl.probe", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode()


def info(kind: str, host: str, worker_id: str) -> WorkerInfo:
    now = time.time()
    return WorkerInfo(worker_id=worker_id, kind=kind, host=host, pid=1, base_model="openrl/tiny-qwen3", started_at=now, heartbeat_at=now)


async def test_worker_probe_follows_the_heartbeat(nats_server):
    """Ready while a worker of that kind on that host beats; not ready once it stops."""
    bus = await Bus.connect(bus_config(nats_server.url, name="probe-test"))
    host = f"pod-{uuid.uuid4().hex[:8]}"
    url = ["--nats-url", nats_server.url, "--host", host]
    stop = asyncio.Event()
    try:
        assert (await probe("--kind", "sampler", *url))[0] == 1  # nothing beats yet
        beating = asyncio.create_task(bus.heartbeat(f"sampler-{host}", lambda: info("sampler", host, f"sampler-{host}"), 0.2, stop))
        await asyncio.sleep(0.5)
        code, out = await probe("--kind", "sampler", *url)
        assert code == 0, out
        assert (await probe("--kind", "trainer", *url))[0] == 1  # another kind
        assert (await probe("--kind", "sampler", "--nats-url", nats_server.url, "--host", host + "x"))[0] == 1  # another pod
        stop.set()  # a worker that stops removes its heartbeat
        await beating
        code, out = await probe("--kind", "sampler", *url)
        assert code == 1 and "no live sampler" in out
    finally:
        stop.set()
        await bus.close()


async def test_worker_probe_defaults_to_this_host(nats_server):
    """In a pod the probe's hostname is the worker's: the manifests pass no --host."""
    bus = await Bus.connect(bus_config(nats_server.url, name="probe-test"))
    wid = f"rewarder-{uuid.uuid4().hex[:8]}"

    async def beat() -> None:  # as a live worker does (entries expire after 10 s; a loaded CI box starts the probe slowly)
        while True:
            await bus.kv_put(bus.workers, wid, info("rewarder", socket.gethostname(), wid))
            await asyncio.sleep(1.0)

    beating = asyncio.create_task(beat())
    try:
        await asyncio.sleep(0.2)
        code, out = await probe("--kind", "rewarder", "--nats-url", nats_server.url, "--timeout-s", "20")
        assert code == 0 and wid in out, out
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        await bus.workers.delete(wid)
        await bus.close()


async def test_unreachable_nats_fails_readiness_but_not_liveness():
    dead = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, out = await probe("--kind", "trainer", "--nats-url", dead)
    assert code == 1 and "unreachable" in out
    assert time.monotonic() - started < 10  # well inside the manifests' timeoutSeconds
    assert (await probe("--kind", "trainer", "--nats-url", dead, "--unreachable-ok"))[0] == 0


async def test_gateway_probe_wants_the_bus_connected(tmp_path):
    """The real gateway's healthz: ready while its bus is connected, not while NATS is gone."""
    from openrl.bus.server import NatsServer
    from openrl.gateway.app import GatewayConfig, make_app

    nats = NatsServer(tmp_path / "nats").start()
    bus = await Bus.connect(BusConfig(url=nats.url, name="probe-test-gateway"))
    runner = web.AppRunner(make_app(GatewayConfig(api_keys=("tml-probe-test",)), bus))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    healthz = f"http://127.0.0.1:{port}/api/v1/healthz"
    try:
        code, out = await probe("--kind", "gateway", "--url", healthz)
        assert code == 0, out
        nats.kill()
        for _ in range(50):  # until the client notices
            if not bus.nc.is_connected:
                break
            await asyncio.sleep(0.1)
        code, out = await probe("--kind", "gateway", "--url", healthz)
        assert code == 1 and "bus not connected" in out
    finally:
        await runner.cleanup()
        await bus.nc.close()
        nats.stop()
    assert (await probe("--kind", "gateway", "--url", healthz))[0] == 1  # nothing listens
    assert (await probe("--kind", "gateway", "--url", healthz, "--unreachable-ok"))[0] == 0
