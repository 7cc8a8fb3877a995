"""Rewarder test helpers: rewarder processes started the way users start them
(`python -m openrl rewarder ...`), and bus-level submit/wait helpers that do what the
gateway does (a pending future, then the request on the work queue).

The fixture `rewarders` is imported by the test modules that use it (names the tests
import live in plainly named modules, never in a conftest.py: see tests/stack_helpers.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from openrl.bus import subjects
from openrl.bus.client import Bus
from openrl.bus.messages import Future, ScoreItem, ScoreRequest, WorkerInfo

HERE = Path(__file__).resolve().parent


@pytest.fixture
def rewarders(nats_server, tmp_path):
    """Start rewarder processes; each is stopped with SIGTERM at the end and must exit 0."""
    started: list[RewarderProc] = []

    def start(fn: str, name: str, *args: str) -> RewarderProc:
        p = start_rewarder(nats_server.url, tmp_path, fn, name, *args)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            code = p.stop()
            assert code == 0, f"rewarder {p.name} exited with {code} on SIGTERM:\n{p.output()}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class RewarderProc:
    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self, timeout_s: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


def start_rewarder(nats_url: str, tmp_path: Path, fn: str, name: str, *args: str) -> RewarderProc:
    log = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "openrl", "rewarder", "--fn", fn, "--name", name, "--nats-url", nats_url, "--log-format", "json", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    return RewarderProc(name=name, proc=proc, log=log)


async def wait_heartbeat(bus: Bus, proc: RewarderProc, timeout_s: float = 30) -> WorkerInfo:
    """Until `proc` is serving (its heartbeat is in the workers bucket)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, f"rewarder exited with {proc.proc.returncode}:\n{proc.output()}"
        for info in await workers(bus):
            if info.pid == proc.pid and info.kind == "rewarder":
                return info
        await asyncio.sleep(0.2)
    raise TimeoutError(f"rewarder {proc.name} did not start:\n{proc.output()}")


async def workers(bus: Bus) -> list[WorkerInfo]:
    keys = await bus.kv_keys(bus.workers)
    found = []
    for k in keys:
        info = await bus.kv_get(bus.workers, k, WorkerInfo)
        if info is not None:
            found.append(info)
    return found


def item(completion: str, prompt: str = "", reference: object = None) -> ScoreItem:
    return ScoreItem(prompt=prompt, completion=completion, reference=msgspec.json.encode(reference))


async def submit(bus: Bus, name: str, items: list[ScoreItem], owner: str = "test-owner", rid: str | None = None) -> str:
    rid = rid or unique("score")
    await bus.kv_create(bus.futures, rid, Future(request_id=rid, owner=owner, request_type="Score", created_at=time.time()))
    await bus.publish(subjects.reward(name), ScoreRequest(request_id=rid, reward_name=name, items=items), msg_id=rid)
    return rid


async def result(bus: Bus, rid: str, timeout_s: float = 60) -> dict:
    """The ScoreResult JSON of a done future (waits for it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fut = await bus.kv_get(bus.futures, rid, Future)
        if fut is not None and fut.state != "pending":
            assert fut.state == "done", fut
            assert fut.content_type == "json"
            return msgspec.json.decode(fut.payload)
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no result for {rid}")
