"""Rewarder fixtures: a Bus on the session nats-server, and rewarder processes that are
stopped with SIGTERM at the end of each test (and must exit 0). Helpers: rewarder_helpers.py."""

from __future__ import annotations

import pytest

from openrl.bus.client import Bus, BusConfig
from rewarder_helpers import RewarderProc, start_rewarder


@pytest.fixture
async def bus(nats_server):
    b = await Bus.connect(BusConfig(url=nats_server.url))
    yield b
    await b.close()


@pytest.fixture
def rewarders(nats_server, tmp_path):
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
