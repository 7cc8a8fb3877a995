"""Per-key quotas (openrl/gateway/quotas.py, docs/limits.md): what one key may hold is capped,
and a request past a quota is a 429 naming the quota and its flag.

Against `openrl up` and a second gateway replica with small quotas (`quota_gateway`: 3 live
sessions, 2 models, 2 checkpoints, 4 reward items and 4 sample sequences in flight), each test with a fresh key made
by `openrl keys create` (quotas count per key, and other tests' keys hold plenty). The
accounting itself (live sessions, expiry, bytes) is also checked on `Usage` directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import tinker

from openrl.bus.client import INFLIGHT_TTL_S
from openrl.bus.messages import Future, InFlight, LoraSpec, ModelRecord, SessionRecord, WeightsRecord
from openrl.gateway.http import QuotaExceeded
from openrl.bus.subjects import kv_key
from openrl.gateway.quotas import SESSION_LIVE_S, Quotas, Usage
from stack_helpers import BASE_MODEL

pytestmark = pytest.mark.timeout(600)


def fresh_key(stack) -> str:
    return stack.new_key("quota")


class Client:
    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": key}, timeout=60)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.http.post(path, **kwargs)

    def session(self, idem: str | None = None) -> httpx.Response:
        return self.post("/create_session", json={}, headers={"X-Idempotency-Key": idem or uuid.uuid4().hex})

    def result(self, rid: str, timeout_s: float = 120) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.post("/retrieve_future", json={"request_id": rid}, headers={"x-stainless-read-timeout": "15"})
            if r.status_code != 408:
                assert r.status_code == 200, r.text
                return r.json() if r.headers["content-type"].startswith("application/json") else {"bytes": len(r.content)}
        raise AssertionError(f"{rid} still pending after {timeout_s} s")


def over_quota(r: httpx.Response, *words: str) -> None:
    assert r.status_code == 429, (r.status_code, r.text)
    body = r.json()
    assert body["type"] == "quota_exceeded", body
    for w in words:
        assert w in body["detail"], (w, body["detail"])


def test_live_sessions_and_models_per_key(stack, quota_gateway):
    c = Client(quota_gateway, fresh_key(stack))
    sids = [c.session(f"s{i}").json()["session_id"] for i in range(3)]
    over_quota(c.session(), "3 live sessions", "--quota-sessions")
    assert c.session("s1").json()["session_id"] == sids[1]  # a retried create is never refused
    assert c.post(f"/sessions/{sids[2]}/finish", json={}).status_code == 200
    fourth = c.session()
    assert fourth.status_code == 200, fourth.text

    def create(sid: str, n: int) -> httpx.Response:
        return c.post("/create_model", json={"session_id": sid, "model_seq_id": n, "base_model": BASE_MODEL, "lora_config": {"rank": 1}})

    first = [create(sids[0], 0), create(sids[1], 0)]
    assert all(r.status_code == 200 for r in first), [r.text for r in first]
    over_quota(create(sids[0], 1), "2 models", "--quota-models")
    assert create(sids[0], 0).status_code == 200  # the same model again: a retry
    for r in first:
        assert c.result(r.json()["request_id"])["model_id"]
    # Models of finished sessions stop counting.
    assert c.post(f"/sessions/{sids[1]}/finish", json={}).status_code == 200
    assert create(sids[0], 1).status_code == 200


def test_checkpoints_per_key_and_the_refused_save_keeps_its_place(stack, quota_gateway):
    key = fresh_key(stack)
    tc = tinker.ServiceClient(base_url=quota_gateway, api_key=key).create_lora_training_client(base_model=BASE_MODEL, rank=1, seed=5).result()
    tc.save_state("q-one").result(timeout=120)  # seq 1
    tc.save_state("q-two").result(timeout=120)  # seq 2
    c = Client(quota_gateway, key)
    over_quota(c.post("/save_weights", json={"model_id": tc.model_id, "seq_id": 3, "path": "q-three"}), "2 checkpoints", "--quota-checkpoints")
    over_quota(c.post("/save_weights_for_sampler", json={"model_id": tc.model_id, "seq_id": 4, "path": "q-four"}), "checkpoints")
    # Overwriting a name it holds needs no room; the refused seq_ids 3 and 4 did not stop the model.
    r = c.post("/save_weights", json={"model_id": tc.model_id, "seq_id": 5, "path": "q-one", "overwrite": True})
    assert r.status_code == 200, r.text
    assert c.result(r.json()["request_id"])["path"].endswith("/weights/q-one")
    r = c.post("/optim_step", json={"model_id": tc.model_id, "seq_id": 6, "adam_params": {"learning_rate": 1e-3}})
    assert "metrics" in c.result(r.json()["request_id"])
    # Deleting one makes room again.
    assert c.http.delete(f"/training_runs/{tc.model_id}/checkpoints/weights/q-two").status_code in (200, 204)
    deadline = time.monotonic() + 10
    while True:
        r = c.post("/save_weights", json={"model_id": tc.model_id, "seq_id": 7, "path": "q-three"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)  # the watch sees the deletion within a moment
    assert r.status_code == 200, r.text


def test_reward_items_in_flight_per_key(stack, quota_gateway):
    c = Client(quota_gateway, fresh_key(stack))
    slow = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    ref = {"schema": "CREATE TABLE t (a INTEGER);", "gold": "SELECT 1", "timeout_s": 3}
    items = [{"completion": slow, "reference": ref}] * 3
    first = c.post("/score", json={"reward_name": "sql", "items": items})
    assert first.status_code == 200, first.text
    over_quota(c.post("/score", json={"reward_name": "sql", "items": items[:2]}), "3 reward items", "--quota-reward-items")
    assert c.post("/score", json={"reward_name": "sql", "items": items[:1]}).status_code == 200  # 4: still within
    c.result(first.json()["request_id"])
    r = c.post("/score", json={"reward_name": "exact_match", "items": [{"completion": "a", "reference": "a"}] * 2})
    assert r.status_code == 200, r.text  # the finished request no longer counts


def test_sample_sequences_in_flight_per_key(stack, quota_gateway):
    c = Client(quota_gateway, fresh_key(stack))
    sid = c.session().json()["session_id"]
    sampler = c.post("/create_sampling_session", json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": BASE_MODEL}).json()
    body = {"sampling_session_id": sampler["sampling_session_id"], "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0.0}}  # fmt: skip
    over_quota(c.post("/asample", json={**body, "seq_id": 1, "num_samples": 5}), "sequences being sampled", "--quota-samples")
    r = c.post("/asample", json={**body, "seq_id": 2, "num_samples": 4})
    assert r.status_code == 200, r.text
    c.result(r.json()["request_id"])
    r = c.post("/asample", json={**body, "seq_id": 3, "num_samples": 4})  # the finished one no longer counts
    assert r.status_code == 200, r.text


def test_what_a_key_has_in_flight_through_another_replica_counts_here(stack, quota_gateway):
    """Reward items accepted by the stack's own gateway (default quotas) count on the replica
    with a quota of 4: every replica publishes its totals per key (KV `inflight`) and adds the
    others' before a check. Once the other replica's request finishes, they stop counting."""
    key = fresh_key(stack)
    slow = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    ref = {"schema": "CREATE TABLE t (a INTEGER);", "gold": "SELECT 1", "timeout_s": 5}
    elsewhere = Client(stack.url, key).post("/score", json={"reward_name": "sql", "items": [{"completion": slow, "reference": ref}] * 3})
    assert elsewhere.status_code == 200, elsewhere.text
    c = Client(quota_gateway, key)
    quick = {"reward_name": "exact_match", "items": [{"completion": "a", "reference": "a"}]}
    slow_one = {"reward_name": "sql", "items": [{"completion": slow, "reference": ref}]}

    def seen_here(want: str) -> None:
        """Probe with 5 items (always past the quota of 4: never accepted) until the refusal
        shows what this replica counts."""
        deadline = time.monotonic() + 15
        while want not in (r := c.post("/score", json={**quick, "items": quick["items"] * 5})).json()["detail"]:
            assert r.status_code == 429 and time.monotonic() < deadline, r.text
            time.sleep(0.1)

    seen_here("has 3 reward items being scored (3 of them through other gateway replicas)")
    here = c.post("/score", json=slow_one)
    assert here.status_code == 200, here.text  # 3 + 1: within 4
    over_quota(c.post("/score", json=quick), "4 reward items", "3 of them through other gateway replicas", "--quota-reward-items")
    Client(stack.url, key).result(elsewhere.json()["request_id"])
    c.result(here.json()["request_id"])
    seen_here("has 0 reward items")  # both finished: nothing counts any more
    assert c.post("/score", json={**quick, "items": quick["items"] * 4}).status_code == 200


# -- the accounting, without a stack


class _Futures:
    """The one bus call the in-flight accounting makes (read a future), over a dict."""

    def __init__(self):
        self.futures = "futures"
        self.states: dict[str, str] = {}

    async def kv_get(self, kv, key: str, type_):
        state = self.states.get(key)
        return None if state is None else Future(request_id=key, owner="k", request_type="Sample", created_at=0.0, state=state)


async def test_usage_counts_what_is_in_flight_until_it_finishes():
    bus = _Futures()
    u = Usage(bus=bus, quotas=Quotas(sample_sequences=8, reward_items=0))
    for rid, n in (("a", 4), ("b", 3)):
        await u.check_samples("k", rid, n)
        u.sampling("k", rid, n)
        bus.states[rid] = "pending"
    await u.check_samples("k", "a", 4)  # a retry of one in flight: not counted twice
    await u.check_samples("other", "c", 8)  # another key's room is its own
    with pytest.raises(QuotaExceeded, match="7 sequences being sampled and asks for 2 more; at most 8"):
        await u.check_samples("k", "d", 2)
    bus.states["a"] = "done"
    await u.check_samples("k", "d", 2)
    await u.check_reward_items("k", "r", 10**9)  # 0: that quota is off




async def test_other_replicas_in_flight_counts_until_their_entry_is_stale():
    bus = _Futures()
    u = Usage(bus=bus, quotas=Quotas(sample_sequences=8), replica="me")
    u.saw_inflight(InFlight(replica="other", at=time.time(), held={"sample": {"k": 5}, "reward": {"k": 100}}))
    u.saw_inflight(InFlight(replica="me", at=time.time(), held={"sample": {"k": 100}}))  # its own entry, read back: not counted
    await u.check_samples("k", "a", 3)
    u.sampling("k", "a", 3)
    bus.states["a"] = "pending"
    with pytest.raises(QuotaExceeded, match=r"8 sequences being sampled \(5 of them through other gateway replicas\) and asks for 1 more"):
        await u.check_samples("k", "b", 1)
    await u.check_samples("k2", "c", 8)  # another key's room is its own
    assert u.published().held == {"sample": {"k": 3}} and u.published().replica == "me"
    # A replica that stopped rewriting its entry (dead: the bucket's TTL drops it, with no
    # deletion to watch) stops counting once the entry is that old, and is forgotten.
    assert u.held_elsewhere("sample", "k") == 5 and u.held_elsewhere("sample", "k", now=time.time() + INFLIGHT_TTL_S) == 0
    u.saw_inflight(InFlight(replica="other", at=time.time() - INFLIGHT_TTL_S - 1, held={"sample": {"k": 5}}))
    assert u.others == {}
    await u.check_samples("k", "b", 5)
    u.finished("a")
    assert u.published().held == {}


def _session(sid: str, owner: str, *, at: float, finished: bool = False) -> SessionRecord:
    return SessionRecord(session_id=sid, owner=owner, created_at=at, last_heartbeat=at, finished_at=at if finished else None)


def test_usage_counts_live_sessions_their_models_and_unexpired_checkpoints():
    now = time.time()
    u = Usage(bus=None, quotas=Quotas(sessions=2, models=2, checkpoints=3, checkpoint_bytes=1000))
    u.saw_session(_session("s-a", "k", at=now))
    u.saw_session(_session("s-b", "k", at=now - SESSION_LIVE_S - 1))  # no heartbeat for too long
    u.saw_session(_session("s-c", "k", at=now, finished=True))
    u.saw_session(_session("s-d", "other", at=now))
    assert u.live_sessions("k") == 1
    u.check_session("k")
    u.saw_session(_session("s-e", "k", at=now))
    with pytest.raises(QuotaExceeded, match="2 live sessions"):
        u.check_session("k")
    for sid, n in (("s-a", 0), ("s-a", 1), ("s-b", 0), ("s-c", 0), ("s-d", 0)):
        owner = "other" if sid == "s-d" else "k"
        u.saw_model(ModelRecord(model_id=f"{sid}:train:{n}", session_id=sid, owner=owner, base_model="b", lora=LoraSpec(rank=1, seed=0),
                                created_at=now, create_request_id=""))  # fmt: skip
    assert u.live_models("k") == 2 and u.live_models("other") == 1
    with pytest.raises(QuotaExceeded, match="2 models"):
        u.check_model("k")

    def ckpt(name: str, size: int, expires_at: float | None = None) -> WeightsRecord:
        return WeightsRecord(path=f"tinker://s-a:train:0/weights/{name}", owner="k", model_id="s-a:train:0", base_model="b", kind="state",
                             name=name, object=name, lora=LoraSpec(rank=1, seed=0), seq_id=1, size_bytes=size, created_at=now,
                             expires_at=expires_at)  # fmt: skip

    u.saw_checkpoint(ckpt("one", 400))
    u.saw_checkpoint(ckpt("gone", 10**6, expires_at=now - 1))  # expired: not held
    assert u.held_checkpoints("k") == (1, 400)
    u.check_checkpoint("k")
    u.saw_checkpoint(ckpt("two", 600))
    with pytest.raises(QuotaExceeded, match="1000 bytes"):
        u.check_checkpoint("k")
    from openrl.bus.subjects import kv_key

    u._forget(u.checkpoints, u._checkpoints_of, kv_key(ckpt("two", 0).path))  # what the watch does on a deletion
    u.check_checkpoint("k")


async def test_an_unreadable_entry_is_skipped_and_the_watch_goes_on(bus):
    """A record of another shape in a watched bucket (an older or newer writer, a stray tool)
    is skipped and said once: the watch neither restarts on it every second (each restart a new
    consumer on the server) nor stops counting what comes after it."""
    before = await bus.js.consumers_info(f"KV_{bus.models._name}")
    stray = "stray-" + uuid.uuid4().hex[:8]
    await bus.kv_put(bus.models, stray, LoraSpec(rank=4))  # no model_id: not a ModelRecord
    u = Usage(bus=bus, quotas=Quotas())
    await u.start()
    try:
        owner = "k-" + uuid.uuid4().hex[:8]
        sid = "s-" + uuid.uuid4().hex[:8]
        await bus.kv_put(bus.models, f"{sid}:train:0", ModelRecord(model_id=f"{sid}:train:0", session_id=sid, owner=owner, base_model="b",
                                                                  lora=LoraSpec(rank=1, seed=0), created_at=time.time(), create_request_id=""))  # fmt: skip
        for _ in range(100):
            if u._models_of[owner]:
                break
            await asyncio.sleep(0.05)
        assert u._models_of[owner] == {kv_key(f"{sid}:train:0")}
        await asyncio.sleep(2.5)  # the old code restarted its watch every second here
        consumers = await bus.js.consumers_info(f"KV_{bus.models._name}")
        assert len(consumers) <= len(before) + 1, [c.name for c in consumers]
    finally:
        await u.stop()
        await bus.models.delete(stray)


async def test_a_done_notice_ends_what_a_key_has_in_flight(bus):
    """A training request stops counting against its key's bytes in flight when its done notice
    arrives (as the gateway's waiters hear it), with no read-back of its future on a later
    request's path; one whose notice never came is still read back once the key is at its quota."""
    from openrl.gateway.futures import Waiters

    u = Usage(bus=bus, quotas=Quotas(train_bytes=1000))
    waiters = Waiters(bus, on_finished=u.finished)
    await waiters.start()
    owner = "k-" + uuid.uuid4().hex[:8]
    announced, silent = (f"train-{uuid.uuid4().hex}" for _ in range(2))
    try:
        for rid in (announced, silent):
            await bus.kv_put(bus.futures, rid, Future(request_id=rid, owner=owner, request_type="OptimStep", created_at=time.time()))
            await u.check_train_bytes(owner, rid, 400)
            u.training(owner, rid, 400)
        await bus.finish_future(Future(request_id=announced, owner=owner, request_type="OptimStep", state="done", payload=b"{}", finished_at=time.time()))
        for _ in range(100):
            if announced not in u._in_flight["train"][owner]:
                break
            await asyncio.sleep(0.05)
        assert set(u._in_flight["train"][owner]) == {silent}, "the done notice did not end the request's bytes in flight"

        # Finished in KV, never announced (a lost notice): read back when the key needs the room.
        await bus.kv_put(bus.futures, silent, Future(request_id=silent, owner=owner, request_type="OptimStep", state="done", finished_at=time.time()))
        await u.check_train_bytes(owner, "train-next", 700)
        assert not u._in_flight["train"][owner]
        assert not u._in_flight_as, "a forgotten request is still mapped to its key"
    finally:
        await waiters.stop()
