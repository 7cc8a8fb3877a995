"""Tenants: what one API key makes, another cannot read, change, sample, load or delete.

Every refused attempt must be a 404 with a JSON body (403 for changing a checkpoint that is
published, which others may read), hostile names and ids a 400, and an expired checkpoint
must disappear with its blobs.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import httpx
import msgspec
import pytest
import tinker
from nats.js.errors import ObjectNotFoundError
from tinker import types

from openrl.bus.client import Bus
from openrl.bus.messages import WeightsRecord
from openrl.demo import make_datum, sft_examples

from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY, bus_config

pytestmark = pytest.mark.timeout(600)


class Owner:
    """What API_KEY owns: a session, a model with a state, a sampler checkpoint and a sampler."""

    def __init__(self, stack):
        self.url = stack.url
        self.service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
        self.tc = self.service.create_lora_training_client(base_model=BASE_MODEL, rank=2, seed=7).result()
        self.model_id = self.tc.get_info().model_id
        self.session_id = self.model_id.split(":train:")[0]
        tok = self.tc.get_tokenizer()
        self.data = [make_datum(tok, q, a) for q, a in sft_examples(2, seed=9)]
        self.prompt = tok.encode("say the word: pear")
        self.state = self.tc.save_state("iso-state").result().path
        self.sampler_ckpt = self.tc.save_weights_for_sampler("iso-sampler").result().path
        self.sc = self.tc.create_sampling_client(self.sampler_ckpt).result()
        self.sampler_id = self.sc._sampling_session_id  # noqa: SLF001


@pytest.fixture(scope="module")
def owner(stack):
    return Owner(stack)


class Http:
    def __init__(self, url: str, key: str):
        self.http = httpx.Client(base_url=f"{url}/api/v1", timeout=60)
        self.key = key

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:
        return self.http.request(method, path, headers={"X-API-Key": self.key, **kwargs.pop("headers", {})}, **kwargs)

    def raw(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """The path sent byte for byte (httpx would resolve '..' before sending)."""
        url = self.http.base_url
        conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"X-API-Key": self.key, **({"Content-Type": "application/json"} if data else {})}
            conn.request(method, f"{url.path.rstrip('/')}{path}", body=data, headers=headers)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def other(stack):
    return Http(stack.url, OTHER_KEY)


@pytest.fixture(scope="module")
def mine(stack):
    return Http(stack.url, API_KEY)


@pytest.fixture(scope="module")
def other_session(other):
    r = other("POST", "/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "test", "type": "create_session"})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def refused(r: httpx.Response, status: int = 404) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()  # always a JSON body
    assert isinstance(body, dict) and body.get("detail"), body


def ckpt_url(path: str, suffix: str = "") -> str:
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    return f"/training_runs/{parsed.training_run_id}/checkpoints/{parsed.checkpoint_id}{suffix}"


def test_another_key_cannot_read(owner, other):
    refused(other("GET", f"/training_runs/{owner.model_id}"))
    refused(other("GET", f"/training_runs/{owner.model_id}/checkpoints"))
    refused(other("GET", f"/sessions/{owner.session_id}"))
    refused(other("GET", f"/samplers/{owner.sampler_id}"))
    refused(other("POST", "/get_info", json={"model_id": owner.model_id, "type": "get_info"}))
    for path in (owner.state, owner.sampler_ckpt):
        refused(other("POST", "/weights_info", json={"tinker_path": path}))
    # Listings hold only the caller's things.
    assert owner.model_id not in other("GET", "/training_runs", params={"limit": 1000}).text
    assert owner.session_id not in other("GET", "/sessions", params={"limit": 1000}).text
    assert owner.state not in other("GET", "/checkpoints", params={"limit": 1000}).text
    assert owner.session_id not in other("POST", "/sessions/search", json={"limit": 200}).text
    assert owner.state not in str(other("GET", "/billing/usage/checkpoints/current").json())
    # The owner sees them all (the same calls are not refused for everyone).
    assert owner.state in [c.tinker_path for c in tinker_rest(owner, API_KEY).list_checkpoints(owner.model_id).result().checkpoints]


def tinker_rest(owner, key: str):
    return tinker.RestClient(base_url=owner.url, api_key=key)


def test_another_key_cannot_write_sample_load_or_delete(owner, other, other_session, mine):
    before = tinker_rest(owner, API_KEY).get_training_run(owner.model_id).result().last_request_time
    refused(other("POST", "/optim_step", json={"model_id": owner.model_id, "seq_id": 999, "adam_params": {"learning_rate": 1.0}}))
    for route, kind in (("/save_weights", "save_weights"), ("/save_weights_external", "save_weights_external"), ("/save_weights_for_sampler", "save_weights_for_sampler")):
        refused(other("POST", route, json={"model_id": owner.model_id, "seq_id": 999, "path": "stolen", "type": kind}))
    refused(other("POST", "/load_weights", json={"model_id": owner.model_id, "seq_id": 999, "path": owner.state, "optimizer": False}))
    refused(other("POST", "/session_heartbeat", json={"session_id": owner.session_id}))
    refused(other("POST", f"/sessions/{owner.session_id}/finish", json={"reason": {"type": "errored"}}))
    refused(other("PUT", f"/sessions/{owner.session_id}/project", json={"project_id": "mine-now"}))
    refused(other("POST", "/create_model", json={"session_id": owner.session_id, "model_seq_id": 77, "base_model": BASE_MODEL, "lora_config": {"rank": 1}}))
    # sample: neither the owner's sampling session nor a sampler made from its checkpoint
    refused(other("POST", "/asample", json={"sampling_session_id": owner.sampler_id, "seq_id": 0, "num_samples": 1,
                                             "prompt": {"chunks": [{"type": "encoded_text", "tokens": owner.prompt}]},
                                             "sampling_params": {"max_tokens": 2}}))  # fmt: skip
    refused(other("POST", "/create_sampling_session", json={"session_id": other_session, "sampling_session_seq_id": 0, "model_path": owner.sampler_ckpt}))
    # load: not into a model of its own (create-via-load)
    refused(other("POST", "/load_weights", json={"session_id": other_session, "model_seq_id": 0, "path": owner.state, "optimizer": True}))
    # delete, publish, ttl
    for path in (owner.state, owner.sampler_ckpt):
        refused(other("DELETE", ckpt_url(path)))
        refused(other("POST", ckpt_url(path, "/publish")))
        refused(other("DELETE", ckpt_url(path, "/publish")))
        refused(other("PUT", ckpt_url(path, "/ttl"), json={"ttl_seconds": 3600}))
    # a future of the owner's
    # (ahead of the model, so it stays pending; within the window, or the gateway refuses it)
    fut = mine("POST", "/optim_step", json={"model_id": owner.model_id, "seq_id": 1000, "adam_params": {"learning_rate": 0.0}})
    refused(other("POST", "/retrieve_future", json={"request_id": fut.json()["request_id"]}))
    # The SDK, too, gets NotFoundError.
    other_service = tinker.ServiceClient(base_url=owner.url, api_key=OTHER_KEY)
    with pytest.raises(tinker.NotFoundError):
        other_service.create_sampling_client(model_path=owner.sampler_ckpt).result()
    with pytest.raises(tinker.NotFoundError):
        other_service.create_training_client_from_state(owner.state).result()
    with pytest.raises(tinker.NotFoundError):
        tinker_rest(owner, OTHER_KEY).delete_checkpoint_from_tinker_path(owner.state).result()
    # ... and nothing changed: the owner's things are all there, untouched.
    rest = tinker_rest(owner, API_KEY)
    listed = {c.tinker_path: c for c in rest.list_checkpoints(owner.model_id).result().checkpoints}
    assert owner.state in listed and owner.sampler_ckpt in listed
    assert not listed[owner.state].public and listed[owner.state].expires_at is None
    assert all(not p.endswith("/stolen") for p in listed)
    assert rest.get_session(owner.session_id).result().training_run_ids == [owner.model_id]
    info = mine("GET", f"/sessions/{owner.session_id}").json()
    assert info["training_run_ids"] == [owner.model_id]
    assert mine("POST", "/session_heartbeat", json={"session_id": owner.session_id}).status_code == 200  # not finished
    assert rest.get_training_run(owner.model_id).result().last_request_time >= before
    assert len(owner.sc.sample(types.ModelInput.from_ints(owner.prompt), 1, types.SamplingParams(max_tokens=2)).result().sequences) == 1


def test_published_checkpoints_are_readable_not_changeable(owner, other, other_session):
    rest = tinker_rest(owner, API_KEY)
    for path in (owner.state, owner.sampler_ckpt):
        rest.publish_checkpoint_from_tinker_path(path).result()
    try:
        other_rest = tinker_rest(owner, OTHER_KEY)
        assert other_rest.get_weights_info_by_tinker_path(owner.state).result().lora_rank == 2
        other_service = tinker.ServiceClient(base_url=owner.url, api_key=OTHER_KEY)
        # sample it, and load it into a model of one's own
        theirs = other_service.create_sampling_client(model_path=owner.sampler_ckpt).result()
        prompt = types.ModelInput.from_ints(owner.prompt)
        greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
        assert theirs.sample(prompt, 1, greedy).result().sequences[0].tokens == owner.sc.sample(prompt, 1, greedy).result().sequences[0].tokens
        loaded = other_service.create_training_client_from_state_with_optimizer(owner.state).result()
        assert loaded.get_info().model_id.split(":train:")[0] != owner.session_id
        out = loaded.forward(owner.data, "cross_entropy").result()
        assert out.metrics["loss:sum"] > 0
        # but not change it: 403 with a JSON body
        for path in (owner.state, owner.sampler_ckpt):
            refused(other("DELETE", ckpt_url(path)), 403)
            refused(other("DELETE", ckpt_url(path, "/publish")), 403)
            refused(other("POST", ckpt_url(path, "/publish")), 403)
            refused(other("PUT", ckpt_url(path, "/ttl"), json={"ttl_seconds": 3600}), 403)
        # the run and session stay private
        refused(other("GET", f"/training_runs/{owner.model_id}"))
        refused(other("GET", f"/sessions/{owner.session_id}"))
        assert all(c.public for c in rest.list_checkpoints(owner.model_id).result().checkpoints if c.tinker_path in (owner.state, owner.sampler_ckpt))
    finally:
        for path in (owner.state, owner.sampler_ckpt):
            rest.unpublish_checkpoint_from_tinker_path(path).result()
    refused(other("POST", "/weights_info", json={"tinker_path": owner.state}))
    with pytest.raises(tinker.BadRequestError):  # unpublishing twice is a plain 400, never a retried 409
        rest.unpublish_checkpoint_from_tinker_path(owner.state).result()


HOSTILE_NAMES = ["..", ".", "a/b", "../x", "%2e%2e", "%2E%2E%2Fx", "a\x00b", "x" * 129, ".hidden", "a..b", "with space", "ü", "a\\b"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[repr(n)[:24] for n in HOSTILE_NAMES])
def test_hostile_checkpoint_names_are_refused_and_leave_no_gap(owner, name):
    for save in (owner.tc.save_state, owner.tc.save_weights_for_sampler, owner.tc.save_weights_external):
        with pytest.raises(tinker.BadRequestError) as e:
            save(name).result()
        assert "checkpoint name" in str(e.value)
    # The refused saves took their seq_ids: the model's sequence goes on.
    assert owner.tc.forward(owner.data, "cross_entropy").result(timeout=120).metrics["loss:sum"] > 0


HOSTILE_IDS = ["..", "%2e%2e", "a%00b", "x" * 300, "a..b", ".x", "%2F", "s-1%2Fx", "a%20b"]


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=[repr(n)[:24] for n in HOSTILE_IDS])
def test_hostile_ids_and_checkpoint_addresses_are_400(owner, mine, bad):
    run = owner.model_id
    for method, path in (
        ("DELETE", f"/training_runs/{run}/checkpoints/weights/{bad}"),
        ("POST", f"/training_runs/{run}/checkpoints/weights/{bad}/publish"),
        ("PUT", f"/training_runs/{run}/checkpoints/sampler_weights/{bad}/ttl"),
        ("DELETE", f"/training_runs/{bad}/checkpoints/weights/iso-state"),
        ("GET", f"/training_runs/{bad}"),
        ("GET", f"/training_runs/{bad}/checkpoints"),
        ("GET", f"/sessions/{bad}"),
        ("DELETE", f"/training_runs/{run}/checkpoints/weights/{bad}/deeper"),
    ):
        status, body = mine.raw(method, path, {"ttl_seconds": 3600} if method == "PUT" else None)
        assert status == 400 and body["detail"], (method, path, status, body)
    r = mine("POST", "/weights_info", json={"tinker_path": f"tinker://{run}/weights/{bad}"})
    assert r.status_code == 400, r.text
    # Nothing was deleted by any of it.
    assert owner.state in mine("GET", f"/training_runs/{run}/checkpoints").text


async def _bus_record(nats_url: str, path: str, expires_at: float | None = None):
    """Read (and optionally age) a checkpoint's record straight from the bus, and say which of
    its blobs still exist."""
    bus = await Bus.connect(bus_config(nats_url, name="test-isolation"))
    try:
        rec = await bus.kv_get(bus.weights, path, WeightsRecord)
        if rec is not None and expires_at is not None:
            await bus.kv_put(bus.weights, path, msgspec.structs.replace(rec, expires_at=expires_at))
        objects = [] if rec is None else [f"{rec.object}/{f}" for f in rec.files] or [rec.object]
        return rec, {obj: await _blob_exists(bus, obj) for obj in objects}
    finally:
        await bus.close()


async def _blob_exists(bus: Bus, obj: str) -> bool:
    """Whether the object store holds `obj`. Only "no such object" is an answer of False: any
    other error (the bus unreachable, say) is raised, never taken for a deleted blob."""
    try:
        await bus.objects.get_info(obj)
    except ObjectNotFoundError:
        return False
    return True


async def _blobs_exist(nats_url: str, names: list[str]) -> dict[str, bool]:
    bus = await Bus.connect(bus_config(nats_url, name="test-isolation"))
    try:
        return {obj: await _blob_exists(bus, obj) for obj in names}
    finally:
        await bus.close()


def test_ttl_expiry_deletes_the_checkpoint_and_its_blobs(stack, owner):
    rest = tinker_rest(owner, API_KEY)
    admin = tinker.AdminClient(base_url=stack.url, api_key=API_KEY)
    used = lambda: sum(d.size_bytes for d in admin.get_current_checkpoint_storage_usage().result().data)  # noqa: E731
    paths = [owner.tc.save_state("ttl-state").result().path, owner.tc.save_weights_external("ttl-export").result().path]
    for path in paths:
        rest.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    blobs = {}
    sizes = 0
    for path in paths:
        rec, found = asyncio.run(_bus_record(stack.nats_url, path))
        assert rec.expires_at is not None and rec.expires_at > time.time() + 3000 and all(found.values()), (rec, found)
        blobs.update(found)
        sizes += rec.size_bytes
    before = used()
    # An hour passes (on the record): the reaper, running in the gateway, deletes it all.
    for path in paths:
        asyncio.run(_bus_record(stack.nats_url, path, expires_at=time.time() - 1))
    listed = [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert not set(paths) & set(listed)  # invisible at once
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if asyncio.run(_bus_record(stack.nats_url, paths[0]))[0] is None and asyncio.run(_bus_record(stack.nats_url, paths[1]))[0] is None:
            break
        time.sleep(1)
    for path in paths:
        assert asyncio.run(_bus_record(stack.nats_url, path))[0] is None, f"{path} was not reaped"
    assert not any(asyncio.run(_blobs_exist(stack.nats_url, list(blobs))).values()), "blobs were left behind"
    assert used() == before - sizes
    with pytest.raises(tinker.NotFoundError):
        tinker.ServiceClient(base_url=stack.url, api_key=API_KEY).create_training_client_from_state(paths[0]).result()


def test_deleting_a_checkpoint_frees_its_storage(stack, owner):
    admin = tinker.AdminClient(base_url=stack.url, api_key=API_KEY)
    used = lambda: sum(d.size_bytes for d in admin.get_current_checkpoint_storage_usage().result().data)  # noqa: E731
    path = owner.tc.save_state("to-delete").result().path
    rec, blobs = asyncio.run(_bus_record(stack.nats_url, path))
    before = used()
    tinker_rest(owner, API_KEY).delete_checkpoint_from_tinker_path(path).result()
    assert used() == before - rec.size_bytes
    assert asyncio.run(_bus_record(stack.nats_url, path))[0] is None
    assert not any(asyncio.run(_blobs_exist(stack.nats_url, list(blobs))).values())
    with pytest.raises(tinker.NotFoundError):  # deleting twice: gone
        tinker_rest(owner, API_KEY).delete_checkpoint_from_tinker_path(path).result()


def test_keys_create_list_revoke(stack, owner):
    made = stack.keys("create", "--name", "alice")
    assert made.returncode == 0, made.stdout + made.stderr
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("tml-") and len(key) > 40
    assert stack.keys("create", "--name", "alice").returncode == 2  # a live name is unique
    listed = stack.keys("list").stdout
    assert "alice" in listed and key not in listed and key[:8] in listed  # stored hashed; a hint only
    # The new key works at once, through the SDK, as its own tenant.
    deadline = time.monotonic() + 10
    while Http(stack.url, key)("GET", "/sessions").status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    tc = tinker.ServiceClient(base_url=stack.url, api_key=key).create_lora_training_client(base_model=BASE_MODEL, rank=1).result()
    alice = Http(stack.url, key)
    assert alice("GET", "/training_runs", params={"limit": 1000}).json()["training_runs"][0]["training_run_id"] == tc.get_info().model_id
    refused(alice("GET", f"/training_runs/{owner.model_id}"))
    refused(Http(stack.url, API_KEY)("GET", f"/training_runs/{tc.get_info().model_id}"))
    # Revoked: refused (401) within a moment, on this gateway, with a JSON body.
    revoked = stack.keys("revoke", "--name", "alice")
    assert revoked.returncode == 0 and "Revoked" in revoked.stdout, revoked.stdout + revoked.stderr
    deadline = time.monotonic() + 5
    while alice("GET", "/sessions").status_code != 401:
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.1)
    refused(alice("GET", "/sessions"), 401)
    assert "alice" in stack.keys("list").stdout  # kept, marked revoked
    assert stack.keys("revoke", "--name", "alice").returncode == 2  # nothing live to revoke
    # The --api-key keys still work.
    assert Http(stack.url, API_KEY)("GET", "/sessions").status_code == 200


def test_copy_weights_needs_read_access_and_the_copy_is_the_callers(owner, other, mine, other_session):
    rest, other_rest = tinker_rest(owner, API_KEY), tinker_rest(owner, OTHER_KEY)
    with pytest.raises(tinker.NotFoundError):  # not published: it does not exist for the other key
        other_rest.copy_weights(owner.state, "theirs").result()
    rest.publish_checkpoint_from_tinker_path(owner.state).result()
    try:
        copied = other_rest.copy_weights(owner.state, "theirs").result()
    finally:
        rest.unpublish_checkpoint_from_tinker_path(owner.state).result()
    assert other_rest.get_weights_info_by_tinker_path(copied).result().lora_rank == 2  # theirs, unpublished source or not
    assert copied in [c.tinker_path for c in other_rest.list_user_checkpoints(limit=1000).result().checkpoints]
    assert copied not in [c.tinker_path for c in rest.list_user_checkpoints(limit=1000).result().checkpoints]
    refused(mine("POST", "/weights_info", json={"tinker_path": copied}))  # the source's owner cannot see the copy
    run = types.ParsedCheckpointTinkerPath.from_tinker_path(copied).training_run_id
    refused(mine("GET", f"/training_runs/{run}"))
    other_rest.delete_checkpoint_from_tinker_path(copied).result()
    assert rest.get_weights_info_by_tinker_path(owner.state).result().lora_rank == 2  # the source is untouched
    # Into a session: a free model_seq_id of one's own session; a taken one, another's session or a bad path is refused.
    into = other("POST", "/copy_weights", json={"source_path": owner.sampler_ckpt, "session_id": other_session, "model_seq_id": 5})
    refused(into)  # the sampler checkpoint is not published
    refused(other("POST", "/copy_weights", json={"source_path": owner.state, "session_id": owner.session_id, "model_seq_id": 9}))
    r = mine("POST", "/copy_weights", json={"source_path": owner.state, "session_id": owner.session_id, "model_seq_id": 7})
    assert r.status_code == 200 and r.json()["tinker_path"] == f"tinker://{owner.session_id}:train:7/weights/iso-state", r.text
    refused(mine("POST", "/copy_weights", json={"source_path": owner.sampler_ckpt, "session_id": owner.session_id, "model_seq_id": 7}), 400)
    refused(mine("POST", "/copy_weights", json={"source_path": owner.state, "session_id": owner.session_id, "model_seq_id": 0}), 400)
    for bad in ("tinker://x/weights/..", f"tinker://{owner.model_id}/weights/a%2e%2e", "tinker://a/b", "not-a-path"):
        refused(mine("POST", "/copy_weights", json={"source_path": bad, "destination_project_id": "p"}), 400)
    refused(mine("POST", "/copy_weights", json={"source_path": owner.state}), 400)  # no destination
    refused(mine("POST", "/copy_weights", json={"source_path": owner.state, "destination_project_id": "p", "ttl_seconds": 5}), 400)


def test_download_urls_and_traces_are_the_owners(owner, other, mine):
    export = owner.tc.save_weights_external("iso-export").result().path
    refused(other("GET", ckpt_url(export, "/external_weights_urls")))
    refused(other("GET", f"/sessions/{owner.session_id}/trace_export"))
    refused(mine("GET", ckpt_url(owner.state, "/external_weights_urls")), 400)  # a state is not an export
    urls = mine("GET", ckpt_url(export, "/external_weights_urls")).json()["urls"]
    url = urls["adapter_config.json"]
    assert httpx.get(url, timeout=60).status_code == 200  # no key
    # Another file under the same signature, another signature, none: 403 with a JSON body.
    refused(httpx.get(url.replace("adapter_config.json", "adapter_model.safetensors"), timeout=60), 403)
    refused(httpx.get(url[:-4] + ("0000" if not url.endswith("0000") else "1111"), timeout=60), 403)
    refused(httpx.get(url.split("?")[0], timeout=60), 403)
    refused(httpx.get(url.replace("/object/", "/trace/"), timeout=60), 403)
