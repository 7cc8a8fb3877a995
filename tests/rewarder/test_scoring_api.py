"""The scoring API over HTTP (a real gateway app on a real port, real rewarder processes,
the real API-key checks) and `openrl.client` end to end."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aiohttp import web

from openrl.bus.client import Bus
from stack_helpers import bus_config
from openrl.bus.errors import InvalidRequest, Unauthorized
from openrl.bus.server import free_port
from openrl.client import AsyncRewardClient, RewardClient, Score
from openrl.gateway.app import GatewayConfig, make_app

from rewarder_helpers import start_rewarder, unique, wait_heartbeat

API_KEY = "tml-scoring-key-0123456789"
OTHER_KEY = "tml-scoring-other-9876543210"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
async def gateway(nats_server):
    bus = await Bus.connect(bus_config(nats_server.url, "gateway", name="test-gateway"))
    port = free_port()
    cfg = GatewayConfig(port=port, nats_url=nats_server.url, api_keys=(API_KEY, OTHER_KEY), long_poll_s=3.0, max_body_bytes=1024 * 1024)
    runner = web.AppRunner(make_app(cfg, bus), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()
    await bus.close()


@pytest.fixture(scope="module")
async def served(nats_server, tmp_path_factory):
    """Two reward functions served by rewarder processes: `<exact>` and `<chaos>`."""
    tmp = tmp_path_factory.mktemp("scoring")
    names = {"exact": unique("exact"), "chaos": unique("chaos")}
    procs = [
        start_rewarder(nats_server.url, tmp, "chaos_rewards:exact", names["exact"], "--concurrency", "1"),
        start_rewarder(nats_server.url, tmp, "chaos_rewards:chaos", names["chaos"], "--concurrency", "2", "--timeout-s", "2"),
    ]
    bus = await Bus.connect(bus_config(nats_server.url))
    try:
        for p in procs:
            await wait_heartbeat(bus, p)
    finally:
        await bus.close()
    yield names
    for p in procs:
        assert p.stop() == 0, p.output()


def http(url: str, key: str | None = API_KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{url}/api/v1", headers={"X-API-Key": key} if key else {}, timeout=30)


async def retrieve(client: httpx.AsyncClient, rid: str) -> httpx.Response:
    while True:
        r = await client.post("/retrieve_future", json={"request_id": rid})
        if r.status_code != 408:
            return r
        assert r.json()["type"] == "try_again"


async def test_score_then_retrieve_over_http(gateway, served):
    async with http(gateway) as c:
        items = [
            {"prompt": "capital of France?", "completion": "Paris", "reference": "Paris"},
            {"prompt": "2+2?", "completion": "5", "reference": 4},
            {"completion": "4", "reference": 4},
        ]
        r = await c.post("/score", json={"reward_name": served["exact"], "items": items})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["reward_name"] == served["exact"] and body["items"] == 3
        res = await retrieve(c, body["request_id"])
        assert res.status_code == 200, res.text
        out = res.json()
        assert out["type"] == "score" and out["request_id"] == body["request_id"] and out["reward_name"] == served["exact"]
        assert [s["reward"] for s in out["scores"]] == [1.0, 0.0, 1.0]
        assert all(s["error"] is None for s in out["scores"])
        # Results stay retrievable.
        assert (await retrieve(c, body["request_id"])).json() == out


async def test_item_errors_come_back_in_their_slots(gateway, served):
    async with http(gateway) as c:
        items = [{"completion": "ok:3"}, {"completion": "raise:z"}, {"completion": "sleep:30"}, {"completion": "kill"}, {"completion": "str"}]
        rid = (await c.post("/score", json={"reward_name": served["chaos"], "items": items})).json()["request_id"]
        scores = (await retrieve(c, rid)).json()["scores"]
    assert [s["reward"] for s in scores] == [3.0, None, None, None, None]
    assert [s["error_kind"] for s in scores] == [None, "exception", "timeout", "crashed", "bad_result"]


async def test_api_keys_guard_requests_and_results(gateway, served):
    async with http(gateway) as mine, http(gateway, OTHER_KEY) as other, http(gateway, None) as anonymous, http(gateway, "tml-wrong") as wrong:
        body = {"reward_name": served["exact"], "items": [{"completion": "a", "reference": "a"}]}
        rid = (await mine.post("/score", json=body)).json()["request_id"]
        assert (await retrieve(mine, rid)).status_code == 200
        theirs = await retrieve(other, rid)
        assert theirs.status_code == 404 and theirs.json()["type"] == "not_found"
        for client in (anonymous, wrong):
            for r in (await client.post("/score", json=body), await client.post("/retrieve_future", json={"request_id": rid}),
                      await client.get("/rewards")):  # fmt: skip
                assert r.status_code == 401 and r.json()["type"] == "unauthorized"


async def test_unknown_reward_names_and_bad_bodies_get_4xx_json(gateway, served):
    async with http(gateway) as c:
        r = await c.post("/score", json={"reward_name": "no-such-reward", "items": [{"completion": "x"}]})
        assert r.status_code == 400
        assert served["exact"] in r.json()["available"] and served["chaos"] in r.json()["available"]
        assert "no-such-reward" in r.json()["detail"]
        name = served["exact"]
        bad = [
            b"{not json",
            b"[]",
            json.dumps({"items": [{"completion": "x"}]}).encode(),  # no reward_name
            json.dumps({"reward_name": name}).encode(),  # no items
            json.dumps({"reward_name": name, "items": []}).encode(),
            json.dumps({"reward_name": name, "items": [{"prompt": "no completion"}]}).encode(),
            json.dumps({"reward_name": name, "items": [{"completion": 7}]}).encode(),
            json.dumps({"reward_name": name, "items": "x"}).encode(),
            json.dumps({"reward_name": name, "items": [{"completion": "x"}] * 5000}).encode(),
            json.dumps({"reward_name": name, "items": [{"completion": "x"}], "idempotency_key": ""}).encode(),
            json.dumps({"reward_name": name, "items": [{"completion": "x"}], "idempotency_key": 5}).encode(),
        ]
        for raw in bad:
            r = await c.post("/score", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (raw[:80], r.status_code, r.text)
            assert r.json()["type"] == "invalid_request" and r.json()["detail"]
        huge = json.dumps({"reward_name": name, "items": [{"completion": "x" * (2 * 1024 * 1024)}]})
        r = await c.post("/score", content=huge, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"]
        r = await c.post("/retrieve_future", json={"request_id": "score-does-not-exist"})
        assert r.status_code == 404


async def test_an_idempotency_key_makes_retries_the_same_request(gateway, served):
    async with http(gateway) as c:
        body = {"reward_name": served["exact"], "items": [{"completion": "a", "reference": "a"}], "idempotency_key": unique("k")}
        first, again = [(await c.post("/score", json=body)).json()["request_id"] for _ in range(2)]
        assert first == again
        assert (await retrieve(c, first)).json()["scores"][0]["reward"] == 1.0
        assert (await c.post("/score", json=body)).json()["request_id"] == first  # after it finished, too
        # The same key with other items is another request, never the old result.
        other = (await c.post("/score", json={**body, "items": [{"completion": "b", "reference": "a"}]})).json()["request_id"]
        assert other != first and (await retrieve(c, other)).json()["scores"][0]["reward"] == 0.0
        # The same key from another API key is another request too.
        async with http(gateway, OTHER_KEY) as o:
            assert (await o.post("/score", json=body)).json()["request_id"] != first
        # Without a key, each submission is its own request.
        plain = {"reward_name": served["exact"], "items": body["items"]}
        assert len({(await c.post("/score", json=plain)).json()["request_id"] for _ in range(2)}) == 2


async def test_rewards_lists_what_rewarders_serve(gateway, served):
    async with http(gateway) as c:
        listed = {r["name"]: r for r in (await c.get("/rewards")).json()["rewards"]}
        health = (await c.get("/healthz")).json()
    assert listed[served["exact"]]["workers"] == 1 and listed[served["exact"]]["concurrency"] == 1
    assert listed[served["chaos"]]["concurrency"] == 2
    assert 0.0 <= listed[served["chaos"]]["busy_fraction"] <= 1.0
    assert len(health["rewarders"]) >= 2
    async with http(gateway) as c:  # rewarders are not models
        caps = (await c.get("/get_server_capabilities")).json()["supported_models"]
    assert all(m["model_name"] for m in caps)


async def test_reward_client_end_to_end(gateway, served):
    def blocking() -> tuple[list[Score], list[dict]]:
        with RewardClient(gateway, API_KEY) as client:
            scores = client.score(served["chaos"], [{"completion": "ok:2"}, {"completion": "raise:q"}, {"completion": "dict"}])
            return scores, client.rewards()

    scores, listed = await asyncio.to_thread(blocking)  # the gateway runs on this event loop
    assert [s.reward for s in scores] == [2.0, None, 1.25]
    assert scores[0].ok and not scores[1].ok and scores[1].error_kind == "exception" and "boom q" in scores[1].error
    assert scores[2].metrics == {"format": 0.25, "correct": 1.0}
    assert {served["exact"], served["chaos"]} <= {r["name"] for r in listed}

    async with AsyncRewardClient(gateway, API_KEY) as client:
        batches = await asyncio.gather(
            *(client.score(served["exact"], [{"completion": str(i), "reference": i}, {"completion": "x", "reference": i}]) for i in range(20))
        )
        assert [[s.reward for s in b] for b in batches] == [[1.0, 0.0]] * 20
        with pytest.raises(InvalidRequest, match="unknown reward function"):
            await client.score("no-such-reward", [{"completion": "x"}])
        with pytest.raises(InvalidRequest, match="completion"):
            await client.score(served["exact"], [{"prompt": "no completion"}])
    async with AsyncRewardClient(gateway, "tml-wrong") as client:
        with pytest.raises(Unauthorized):
            await client.rewards()
