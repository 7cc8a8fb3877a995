"""Bounded requests (docs/limits.md): what one request may cost is checked at the gateway
before anything is built, and a refused request of a model's sequence still takes its seq_id.

Against `openrl up` with the real tinker SDK (and raw HTTP where the SDK would not send such a
body): sample requests past num_samples, column or element bounds are 400s naming the field,
at once; a body whose message would outgrow the bus is refused; JSON integers past int64, ids
NATS refuses and non-ASCII signatures are 4xx; training requests refused for their content,
a missing checkpoint, an undecodable body or being too far ahead leave no hole (the next
seq_id completes); retrieve_future answers another key's id at once. The stack still serves.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import msgspec
import numpy as np
import pytest
import tinker
from tinker.proto.request_conv import forward_backward_request_to_proto

from openrl.bus.messages import (
    MAX_NUM_SAMPLES,
    MAX_REQUEST_ELEMENTS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TENSOR_COLUMNS,
)
from openrl.gateway.bounds import MAX_MESSAGE_BYTES
from openrl.gateway.http import request_id
from openrl.gateway.proto import pb
from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY, run_alone
from sdk_helpers import sdk_steps, training_client

pytestmark = pytest.mark.timeout(900)


class Http:
    def __init__(self, url: str, key: str = API_KEY):
        self.http = httpx.Client(base_url=f"{url}/api/v1", timeout=httpx.Timeout(60.0, connect=10.0))
        self.key = key

    def post(self, path: str, *, key: str | bytes | None = None, **kwargs) -> httpx.Response:
        return self.http.post(path, headers={"X-API-Key": key or self.key, **kwargs.pop("headers", {})}, **kwargs)

    def result(self, rid: str, key: str | None = None, timeout_s: float = 120) -> dict:
        """A future's JSON once it is no longer pending (fails the test if it stays pending)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.post("/retrieve_future", key=key, json={"request_id": rid}, headers={"x-stainless-read-timeout": "15"})
            if r.status_code != 408:
                assert r.status_code == 200, r.text
                return r.json() if r.headers["content-type"].startswith("application/json") else {"bytes": len(r.content)}
        raise AssertionError(f"{rid} still pending after {timeout_s} s: a hole in its sequence?")


@pytest.fixture(scope="module")
def http(stack):
    return Http(stack.url)


@pytest.fixture(scope="module")
def sampler(stack, http) -> str:
    """A sampling session of the base model (raw HTTP, as the SDK makes it)."""
    sid = http.post("/create_session", json={}).json()["session_id"]
    r = http.post("/create_sampling_session", json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": BASE_MODEL})
    assert r.status_code == 200, r.text
    return r.json()["sampling_session_id"]


def asample(sampler: str, **fields) -> dict:
    body = {"sampling_session_id": sampler, "seq_id": 1, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
            "sampling_params": {"max_tokens": 2, "temperature": 0.0}}  # fmt: skip
    body.update(fields)
    return body


def refused(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, (w, detail)


def test_sample_requests_past_a_bound_are_refused_at_once(http, sampler):
    started = time.monotonic()
    refused(http.post("/asample", json=asample(sampler, num_samples=10**8)), 400, "num_samples", str(MAX_NUM_SAMPLES))
    refused(http.post("/asample", json=asample(sampler, num_samples=2**62)), 400, "num_samples")
    assert time.monotonic() - started < 5  # nothing of size num_samples was built
    refused(http.post("/asample", json=asample(sampler, topk_prompt_logprobs=10**6)), 400, "topk_prompt_logprobs")
    sparse = {"data": [5], "dtype": "int64", "shape": [2, 4 * 10**9], "sparse_crow_indices": [0, 1, 1], "sparse_col_indices": [3]}
    refused(http.post("/asample", json=asample(sampler, target_prompt_logprobs=sparse)), 400, "target_prompt_logprobs", f"{MAX_TENSOR_COLUMNS} columns")
    wide = {**sparse, "shape": [2, MAX_TENSOR_COLUMNS]}
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1] * (MAX_REQUEST_ELEMENTS // MAX_TENSOR_COLUMNS + 2)}]}
    wide["shape"] = [MAX_REQUEST_ELEMENTS // MAX_TENSOR_COLUMNS + 1, MAX_TENSOR_COLUMNS]
    wide["sparse_crow_indices"] = [0, 1] + [1] * (wide["shape"][0] - 1)
    refused(http.post("/asample", json=asample(sampler, prompt=prompt, target_prompt_logprobs=wide)), 400, "target_prompt_logprobs", "elements")
    rows = {**sparse, "shape": [7, 4]}  # the prompt has 3 tokens: 2 rows
    refused(http.post("/asample", json=asample(sampler, target_prompt_logprobs=rows)), 400, "[2, K]")
    for field, value in (("seq_id", 2**70), ("num_samples", 2**64), ("sampling_params", {"max_tokens": 2, "seed": 2**65})):
        refused(http.post("/asample", json=asample(sampler, **{field: value})), 400, field if field != "sampling_params" else "seed")
    refused(http.post("/asample", json=asample(sampler, sampling_params={"max_tokens": 2, "stop": [2**40]})), 400, "int32")
    many = ["x"] * (MAX_STOP_STRINGS + 1)
    refused(http.post("/asample", json=asample(sampler, sampling_params={"max_tokens": 2, "stop": many})), 400, "stop strings", str(MAX_STOP_STRINGS))
    long = "y" * (MAX_STOP_STRING_CHARS + 1)
    refused(http.post("/asample", json=asample(sampler, sampling_params={"max_tokens": 2, "stop": ["z", long]})), 400, "stop", str(MAX_STOP_STRING_CHARS))
    ids = list(range(MAX_STOP_TOKEN_IDS + 1))
    refused(http.post("/asample", json=asample(sampler, sampling_params={"max_tokens": 2, "stop": ids})), 400, "stop token ids", str(MAX_STOP_TOKEN_IDS))
    at_bounds = {"max_tokens": 2, "temperature": 0.0, "stop": ["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS}
    r = http.post("/asample", json=asample(sampler, seq_id=3, sampling_params=at_bounds))
    assert r.status_code == 200, r.text
    assert "bytes" in http.result(r.json()["request_id"])
    # Within the bounds it samples, and a sparse target that is allowed works.
    ok = {"data": [5, 7], "dtype": "int64", "shape": [2, 2], "sparse_crow_indices": [0, 1, 2], "sparse_col_indices": [0, 1]}
    r = http.post("/asample", json=asample(sampler, seq_id=2, target_prompt_logprobs=ok))
    assert r.status_code == 200, r.text
    assert "bytes" in http.result(r.json()["request_id"])


def test_a_message_that_would_outgrow_the_bus_is_refused(http, sampler):
    """JSON -> packed int64: 2 bytes per "0," become 8; the body is well under the body limit."""
    cols = MAX_TENSOR_COLUMNS
    rows = MAX_MESSAGE_BYTES // (8 * cols) + 2
    assert rows * cols <= MAX_REQUEST_ELEMENTS
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [1] * (rows + 1)}]}
    target = {"data": [0] * (rows * cols), "dtype": "int64", "shape": [rows, cols]}
    body = json.dumps(asample(sampler, seq_id=3, prompt=prompt, target_prompt_logprobs=target), separators=(",", ":")).encode()
    assert len(body) < MAX_MESSAGE_BYTES / 3
    refused(http.post("/asample", content=body, headers={"Content-Type": "application/json"}), 400, "once encoded", str(MAX_MESSAGE_BYTES))


def _fb_proto(tc, seq_id: int, data) -> bytes:
    req = tinker.types.ForwardBackwardRequest(
        model_id=tc.model_id, seq_id=seq_id, forward_backward_input=tinker.types.ForwardBackwardInput(data=data, loss_fn="cross_entropy")
    )
    return forward_backward_request_to_proto(req).SerializeToString()


def stack_body_limit() -> int:
    from openrl.gateway.service import GatewayConfig

    return GatewayConfig().max_body_bytes


def _optim(http, model_id: str, seq_id: int, key: str | None = None) -> str:
    r = http.post("/optim_step", key=key, json={"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 1e-3}})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def test_refused_training_requests_leave_no_hole(stack, http, data):
    """Each refusal below takes its seq_id; the optim_step after it completes (no wait forever)."""
    _, tc = training_client(stack, seed=41, rank=2)
    sdk_steps(tc, [data[:2]])  # seq 1, 2
    model = tc.model_id
    seq = 3

    # A sparse loss input of 4e9 columns: accepted into the sequence as a Rejected, its future says why.
    proto = pb.ForwardBackwardRequest()
    proto.ParseFromString(_fb_proto(tc, seq, data[:1]))
    t = proto.data[0].loss_fn_inputs["target_tokens"]
    t.ClearField("dense")
    t.ClearField("shape")
    t.shape.extend([len(proto.data[0].model_input[0].encoded_text.tokens) // 4, 4 * 10**9])
    t.sparse_csr.values = np.zeros(1, "<i8").tobytes()
    t.sparse_csr.crow_indices = np.zeros(t.shape[0] + 1, "<i8").tobytes()
    t.sparse_csr.col_indices = b""
    r = http.post("/forward_backward", content=proto.SerializeToString(), headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    out = http.result(r.json()["request_id"])
    assert out["category"] == "user" and f"{MAX_TENSOR_COLUMNS} columns" in out["error"], out
    seq += 1

    # load_weights into the model from a path that does not exist, or is another key's: 404, filled.
    for path in ("tinker://nobody:train:0/weights/nothing", f"tinker://{model}/weights/never-saved"):
        refused(http.post("/load_weights", json={"model_id": model, "seq_id": seq, "path": path}), 404, "no saved weights")
        failed = http.result(request_id("train", model, seq))
        assert failed["category"] == "user" and "no saved weights" in failed["error"], failed
        seq += 1

    # A body that does not decode but names the model and a seq_id: 400, filled.
    refused(http.post("/optim_step", json={"model_id": model, "seq_id": seq, "adam_params": "fast"}), 400, "adam_params")
    assert "adam_params" in http.result(request_id("train", model, seq))["error"]
    seq += 1

    # A name that is not allowed, in a save: 400, filled (as before).
    refused(http.post("/save_weights", json={"model_id": model, "seq_id": seq, "path": "../x"}), 400, "checkpoint name")
    seq += 1

    # Small tensors under many names: the body is under the body limit, the msgpack message
    # over the bus's payload (each tensor's field names cost more there). 400, filled.
    big = pb.ForwardBackwardRequest(model_id=model, seq_id=seq, loss_fn="cross_entropy")
    for _ in range(4096):
        d = big.data.add()
        d.model_input.add().encoded_text.tokens = np.ones(1, "<i4").tobytes()
        for k in range(16):
            t = d.loss_fn_inputs[f"k{k}"]
            t.dtype = pb.DTYPE_FLOAT32
            t.dense = bytes(480)
    body = big.SerializeToString()
    assert len(body) < stack_body_limit()
    refused(http.post("/forward_backward", content=body, headers={"Content-Type": "application/x-protobuf"}), 400, "once encoded")
    assert "once encoded" in http.result(request_id("train", model, seq))["error"]
    seq += 1

    # More loss inputs per datum than any loss takes: accepted as a Rejected, the future says why.
    few = pb.ForwardBackwardRequest()
    few.ParseFromString(_fb_proto(tc, seq, data[:1]))
    for k in range(17):
        few.data[0].loss_fn_inputs[f"x{k}"].CopyFrom(few.data[0].loss_fn_inputs["weights"])
    r = http.post("/forward_backward", content=few.SerializeToString(), headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200, r.text
    assert "loss_fn_inputs" in http.result(r.json()["request_id"])["error"]
    seq += 1

    # The sequence goes on: the next request completes.
    done = http.result(_optim(http, model, seq))
    assert "metrics" in done, done


def test_far_ahead_requests_are_refused_before_the_log(stack, http, data):
    """Past the window (1024) of the model's progress: a 429 with Retry-After naming seq_id and
    the window, at once, for every kind of sequenced request (the SDK sends the same request
    again after its back-off, where a 400 would make it move on and leave a hole); an
    undecodable body there is its decoding error (400). Nothing recorded (no future, nothing in
    the train log), and the model goes on."""
    _, tc = training_client(stack, seed=42, rank=2)
    sdk_steps(tc, [data[:2]])  # seq 1, 2: next is 3
    model = tc.model_id
    for seq in (3 + 1025, 10**6):
        started = time.monotonic()
        r = http.post("/optim_step", json={"model_id": model, "seq_id": seq, "adam_params": {"learning_rate": 1e-3}})
        refused(r, 429, f"seq_id {seq} is too far ahead", "at most 1024")
        assert r.json()["type"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1, (r.headers, r.text)
        assert time.monotonic() - started < 5
        r = http.post("/forward_backward", content=_fb_proto(tc, seq, data[:1]), headers={"Content-Type": "application/x-protobuf"})
        refused(r, 429, f"seq_id {seq} is too far ahead")
        refused(http.post("/save_weights", json={"model_id": model, "seq_id": seq, "path": "far"}), 429, "too far ahead")
        # An undecodable body at a far seq_id is the decoding error, and fills nothing either.
        refused(http.post("/optim_step", json={"model_id": model, "seq_id": seq, "adam_params": "fast"}), 400, "adam_params")
        r = http.post("/retrieve_future", json={"request_id": request_id("train", model, seq)})
        assert r.status_code == 404, r.text  # nothing was recorded for that seq_id
    # Within the window is accepted as before (it waits for seq 3 and 4), and the model goes on.
    waiting = _optim(http, model, 5)
    assert http.result(_optim(http, model, 3))["metrics"] is not None
    assert "metrics" in http.result(_optim(http, model, 4)) and "metrics" in http.result(waiting)


def test_retrieve_future_answers_another_keys_id_at_once(stack, http, data):
    _, tc = training_client(stack, seed=43, rank=2, api_key=OTHER_KEY)
    sdk_steps(tc, [data[:2]])
    waiting = _optim(http, tc.model_id, 5, key=OTHER_KEY)  # waits for seq 3 and 4: pending
    started = time.monotonic()
    r = http.post("/retrieve_future", json={"request_id": waiting})
    assert r.status_code == 404 and time.monotonic() - started < 3, (r.status_code, time.monotonic() - started)
    r = http.post("/retrieve_future", key=OTHER_KEY, json={"request_id": waiting}, headers={"x-stainless-read-timeout": "7"})
    assert r.status_code == 408  # its owner long-polls as before


def test_ids_nats_refuses_and_non_ascii_signatures_are_4xx(stack, http):
    for path, body in (
        ("/get_info", {"model_id": "s-abc:train:0."}),
        ("/get_info", {"model_id": "a b"}),
        ("/retrieve_future", {"request_id": "train-abc."}),
        ("/retrieve_future", {"request_id": "train-*"}),
        ("/session_heartbeat", {"session_id": "s-x.>"}),
        ("/create_sampling_session", {"session_id": "s-x.", "sampling_session_seq_id": 0, "base_model": BASE_MODEL}),
        ("/asample", {"sampling_session_id": "s-1:sample:0.", "seq_id": 1, "prompt": {"chunks": []}, "sampling_params": {}}),
    ):
        r = http.post(path, json=body)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
    r = http.http.get("/samplers/s-x.", headers={"X-API-Key": API_KEY})
    assert r.status_code in (400, 404), r.text
    # A JWT-looking key with a non-ASCII signature, and a download URL's.
    r = http.post("/get_info", key="eyJhbGciOi.eyJzdWIiOi.sig\u00e9\u2603".encode(), json={"model_id": "x"})
    assert r.status_code == 401, r.text
    r = http.http.get("/signed/tinker:/x/weights/y", params={"expires": str(int(time.time()) + 600), "sig": "\u2603" * 64})
    assert r.status_code in (403, 404), r.text
    assert stack.healthz()["bus"]


async def test_far_ahead_check_reads_progress_from_futures(bus):
    """progress.Progress on the session's nats-server, window 4: seq_id S is refused while the
    future of S - 5 is not finished, accepted once it is; a refusal is cached for its TTL (no
    read per request) and never outlives it; what the futures cannot tell (a model older than
    the futures' TTL, a place the trainer refused itself) is left to the trainer; nothing is
    written."""
    from openrl.bus.messages import Future, LoraSpec, ModelRecord
    from openrl.gateway.progress import Progress, TooFarAhead

    await bus.ensure()
    model = f"s-{time.monotonic_ns()}:train:0"
    rec = ModelRecord(model_id=model, session_id=model.split(":")[0], owner="k", base_model=BASE_MODEL, lora=LoraSpec(rank=2),
                      created_at=time.time(), create_request_id="c")  # fmt: skip
    progress = Progress(bus, 4, ttl_s=3.0)

    async def finish(seq: int, state: str = "done", error: str = "") -> None:
        rid = request_id("train", model, seq)
        await bus.kv_put(bus.futures, rid, Future(request_id=rid, owner="k", request_type="OptimStep", state=state, error=error))

    for seq in range(1, 6):  # next is 1: 1..5 are within the window, no read
        await progress.check(rec, seq)
    assert progress.reads == 0
    for seq in (6, 7, 10**9):
        with pytest.raises(TooFarAhead, match=f"seq_id {seq} is too far ahead: at most 4 requests"):
            await progress.check(rec, seq)
    assert progress.reads == 1  # one read, then the cached refusal (6's place: seq 1 unfinished)
    for seq in range(1, 4):
        await finish(seq)
    with pytest.raises(TooFarAhead):  # stale for the TTL (a refused seq_id stays open: it may come again)
        await progress.check(rec, 8)
    await asyncio.sleep(3.1)
    await progress.check(rec, 8)  # seq 3 finished: next >= 4, so 8 is 4 ahead at most
    assert progress.applied[model] == 3 and progress.reads == 2
    await progress.check(rec, 7)  # below what is known applied: no read
    assert progress.reads == 2
    with pytest.raises(TooFarAhead):
        await progress.check(rec, 9)
    # A place the trainer refused as too far ahead (it may be skipped since): the trainer decides.
    await finish(4, "failed", "too far ahead: seq_id 4 is ...")
    await asyncio.sleep(3.1)
    await progress.check(rec, 9)
    # A model older than the futures' TTL: a missing future may have expired; the trainer decides.
    old = msgspec.structs.replace(rec, created_at=time.time() - bus.cfg.futures_ttl_s - 1)
    await Progress(bus, 4).check(old, 10**9)
    assert await bus.kv_get(bus.futures, request_id("train", model, 10**9), Future) is None


async def test_training_bytes_in_flight_per_key_are_bounded(bus):
    """quotas.Usage on the session's nats-server: a key's training requests published and still
    pending count by their bus size; past the quota a Backlogged (429 + Retry-After, which
    _in_sequence does not fill: the client sends the same request again); a finished one stops
    counting (read back at most every SWEEP_EVERY_S); another key is not affected; small
    requests do not pile up entries past SWEEP_ENTRIES."""
    from openrl.bus.errors import InvalidRequest
    from openrl.bus.messages import Future
    from openrl.gateway import quotas
    from openrl.gateway.http import Backlogged, _answer

    await bus.ensure()
    usage = quotas.Usage(bus, quotas.Quotas(train_bytes=1000))
    tag = time.monotonic_ns()

    async def submit(owner: str, n: int, size: int) -> str:
        rid = f"train-q{tag}-{owner}-{n}"
        await usage.check_train_bytes(owner, rid, size)
        await bus.kv_create(bus.futures, rid, Future(request_id=rid, owner=owner, request_type="ForwardBackward"))
        usage.training(owner, rid, size)
        return rid

    first = await submit("a", 1, 600)
    await submit("a", 2, 300)
    with pytest.raises(Backlogged, match="at most 1000 may be in flight .--quota-train-gb") as e:
        await submit("a", 3, 200)
    assert not isinstance(e.value, InvalidRequest)  # so service._in_sequence fills nothing
    assert _answer(e.value) == (429, "rate_limited", {"Retry-After": "2"})
    await submit("b", 1, 900)  # another key's room is its own
    await usage.check_train_bytes("a", first, 600)  # a request already counted (a retry) passes
    await bus.kv_put(bus.futures, first, Future(request_id=first, owner="a", request_type="ForwardBackward", state="done"))
    await asyncio.sleep(quotas.SWEEP_EVERY_S + 0.1)
    await submit("a", 3, 200)  # the finished one no longer counts
    assert sum(usage._in_flight["train"]["a"].values()) == 500

    # Many small finished requests: read back once past SWEEP_ENTRIES, not kept forever.
    small = quotas.Usage(bus, quotas.Quotas(train_bytes=10**9))
    for i in range(quotas.SWEEP_ENTRIES + 1):
        small.training("c", first, 1) if i == 0 else small.training("c", f"gone-{tag}-{i}", 1)
    await small.check_train_bytes("c", f"new-{tag}", 1)
    assert len(small._in_flight["train"]["c"]) <= quotas.SWEEP_ENTRIES // 2


def test_a_huge_prompt_is_refused_before_its_tokens_are_decoded(nats_server):
    """A 32 MB JSON list of token ids in asample: a 400 naming the prompt limit, at once, and
    the gateway (in the probe's process: tracemalloc sees it) never holds the Python ints; a body
    of the same size of fewer, larger tokens decodes as before. An in-process gateway on the
    session's nats-server, driven over HTTP, in a process of its own (run_alone: tracemalloc)."""
    from openrl.gateway.bounds import MAX_PROMPT_TOKENS

    r = run_alone(_huge_prompt_probe, nats_server.url)
    assert 31_000_000 < r["body"] < r["max_body"]
    assert r["status"] == 400 and f"at most {MAX_PROMPT_TOKENS} tokens" in r["out"]["detail"], r
    assert "before decoding" in r["out"]["detail"]
    # The body itself (read once, and a 1 MB slice at a time while counting) and no more: 4
    # million ints and their list would be about 150 MB.
    assert r["peak"] < 2.5 * r["body"], r
    assert r["took"] < 10, r
    # A prompt within the limit, as large as a body allows, is decoded and checked as before
    # (this session does not exist: the 404 comes after the decode).
    assert r["ok_status"] == 404, r


async def _huge_prompt_probe(nats_url: str) -> dict:
    import tracemalloc

    import aiohttp
    from aiohttp import web

    from openrl.bus.client import Bus
    from openrl.bus.server import free_port
    from openrl.gateway.app import GatewayConfig, make_app
    from openrl.gateway.bounds import MAX_PROMPT_TOKENS
    from stack_helpers import bus_config

    bus = await Bus.connect(bus_config(nats_url, "gateway", name="test-gateway-prompt"))
    port = free_port()
    runner = web.AppRunner(make_app(GatewayConfig(port=port, nats_url=nats_url, api_keys=(API_KEY,)), bus), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        head = b'{"sampling_session_id": "s-none:sample:0", "seq_id": 1, "num_samples": 1, "sampling_params": {"max_tokens": 1}, '
        tokens = b",".join([b"1234567"] * 4_000_000)  # 32 MB, 4 million tokens
        body = head + b'"prompt": {"chunks": [{"type": "encoded_text", "tokens": [' + tokens + b"]}]}}"
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/api/v1/asample"
            headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
            tracemalloc.start()
            started = time.monotonic()
            async with http.post(url, data=body, headers=headers) as r:
                status, out = r.status, await r.json()
            took = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            ok = head + b'"prompt": {"chunks": [{"type": "encoded_text", "tokens": [' + b",".join([b"1234567"] * MAX_PROMPT_TOKENS) + b"]}]}}"
            async with http.post(url, data=ok, headers=headers) as r:
                ok_status = r.status
    finally:
        await runner.cleanup()
        await bus.close()
    return {"status": status, "out": out, "took": took, "peak": peak, "body": len(body), "max_body": GatewayConfig().max_body_bytes,
            "ok_status": ok_status}  # fmt: skip


def test_training_bytes_past_the_key_quota_are_a_retryable_429(stack, quota_gateway, data):
    """On the replica with 16 KiB of training requests in flight per key: a request waiting for
    its turn holds its bytes; the next one past the quota is a 429 rate_limited with
    Retry-After that fills nothing (no future); once the first has finished, the same request
    sent again is accepted and applied."""
    key = stack.new_key("train-bytes")  # its own tenant: what other tests hold in flight never counts
    _, tc = training_client(stack, seed=44, rank=2, api_key=key)
    sdk_steps(tc, [data[:2]])  # seq 1, 2: next is 3
    q = Http(quota_gateway, key)
    rows = data[:1]
    while len(_fb_proto(tc, 4, rows)) < 9 * 1024:
        rows = rows + data[:1]
    proto = {"Content-Type": "application/x-protobuf"}
    first = q.post("/forward_backward", content=_fb_proto(tc, 4, rows), headers=proto)  # waits for seq 3
    assert first.status_code == 200, first.text
    r = q.post("/forward_backward", content=_fb_proto(tc, 5, rows), headers=proto)
    assert r.status_code == 429 and r.headers.get("Retry-After") and r.json()["type"] == "rate_limited", (r.status_code, r.text)
    assert "--quota-train-gb" in r.json()["detail"]
    assert q.post("/retrieve_future", json={"request_id": request_id("train", tc.model_id, 5)}).status_code == 404  # nothing filled
    assert "metrics" in q.result(_optim(q, tc.model_id, 3))
    assert "error" not in q.result(first.json()["request_id"])  # a forward_backward's result (binary)
    deadline = time.monotonic() + 30
    while (r := q.post("/forward_backward", content=_fb_proto(tc, 5, rows), headers=proto)).status_code == 429:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    assert "error" not in q.result(r.json()["request_id"])
    assert "metrics" in q.result(_optim(q, tc.model_id, 6))  # the sequence goes on
