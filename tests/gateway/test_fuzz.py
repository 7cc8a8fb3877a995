"""Hostile input: property-based fuzzing of every gateway route (hypothesis), including
protobuf bodies. Whatever arrives: never a 5xx, never a hang, a JSON error body, no worker
dies or restarts, and another tenant's model is untouched.

The routes come from the gateway's own OpenAPI document, so a new route is fuzzed without
editing this file. The fuzzer knows the victim's ids (model, session, checkpoint path) and
uses them with its own key: isolation is part of what is checked.

The fuzzer also owns a sampling session, so its requests reach the sampler: hostile sample
requests (huge and sparse target shapes, huge integers, dotted ids, extreme parameters) are
refused at the gateway or failed by the sampler, and the samplers keep serving
(docs/limits.md).
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import tinker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinker.proto.request_conv import forward_backward_request_to_proto

from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY
from sdk_helpers import logprobs, sdk_steps, training_client

pytestmark = pytest.mark.timeout(900)

ROLES = ("nats", "trainer", "gateway", "sampler-0", "sampler-1")


@pytest.fixture(scope="module")
def routes(stack) -> list[tuple[str, str]]:
    doc = httpx.get(f"{stack.url}/api/v1/openapi.json", timeout=30).json()
    found = [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops]
    paths = {p for _, p in found}
    # The document lists what the gateway serves (spot-check the Tinker core and our own).
    for must in ("/api/v1/forward_backward", "/api/v1/asample", "/api/v1/retrieve_future", "/api/v1/create_model", "/api/v1/score", "/api/v1/openapi.json"):
        assert must in paths, must
    return found


@pytest.fixture(scope="module")
def victim(stack, data):
    """Another tenant's trained model and checkpoint, and what its model computes now."""
    service, tc = training_client(stack, seed=901, api_key=OTHER_KEY)
    sdk_steps(tc, [data[:4]])
    path = tc.save_state("victim-ckpt").result().path
    return {"tc": tc, "model_id": tc.model_id, "session_id": tc.model_id.split(":")[0], "path": path, "before": logprobs(tc.forward(data, loss_fn="cross_entropy").result())}


@pytest.fixture(scope="module")
def attacker_proto(stack, data):
    """A valid forward_backward protobuf of the attacker's own model, to mutate."""
    _, tc = training_client(stack, seed=902)
    req = tinker.types.ForwardBackwardRequest(
        model_id=tc.model_id, seq_id=1, forward_backward_input=tinker.types.ForwardBackwardInput(data=data[:2], loss_fn="cross_entropy")
    )
    return forward_backward_request_to_proto(req).SerializeToString()


KEYS = [
    "model_id", "seq_id", "session_id", "base_model", "path", "name", "sampler_id", "sampling_session_id", "request_id",
    "lora_config", "rank", "seed", "prompt", "num_samples", "sampling_params", "max_tokens", "temperature", "stop",
    "forward_backward_input", "data", "loss_fn", "loss_fn_config", "adam_params", "learning_rate", "ttl_seconds",
    "reward_name", "items", "completion", "reference", "model_seq_id", "sampling_session_seq_id", "type", "chunks",
    "tokens", "model_input", "loss_fn_inputs", "optimizer", "user_metadata", "tags", "project_id", "limit", "offset",
]  # fmt: skip


def DOTTED(model_id: str) -> list[str]:  # noqa: N802 - a constant's shape, built from an id
    """Ids NATS refuses as KV keys or subject tokens."""
    return [f"{model_id}.", "a.b", "x.*", f"{model_id}.>", "a b", "train-abc.", ".", "*", ">"]


def _values(victim) -> st.SearchStrategy:
    hostile = st.sampled_from([
        victim["model_id"], victim["session_id"], victim["path"], f"{victim['path']}/../../x", BASE_MODEL,
        "../../etc/passwd", "..", "%2e%2e%2f", "a\x00b", "x" * 5000, "tinker://", "tinker://../../x", "☃" * 50,
        -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 2**64, 2**70, -(2**64) - 1, 10**30, 1e308, -0.0, "NaN", "cross_entropy", "ppo",
        "importance_sampling", *DOTTED(victim["model_id"]), *([victim["sampler"]] if "sampler" in victim else []),
    ])  # fmt: skip
    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30) | hostile
    return st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5),
        max_leaves=12,
    )


def _path(template: str, fill: st.DataObject, victim) -> str:
    segment = st.sampled_from([victim["model_id"], victim["session_id"], "..", "%2e%2e", "a%00b", "x" * 300, "weights", "victim-ckpt"]) | st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/?#"), min_size=1, max_size=20
    )
    # Percent-encoded as a client would (control characters included); "%" is kept, so an
    # already-encoded "%2e%2e" reaches the server as such.
    return re.sub(r"{\w+}", lambda _: quote(fill.draw(segment), safe="%") or "x", template)


def _processes(stack) -> dict[str, int]:
    return {role: stack.pid(role) for role in ROLES}


def test_every_route_survives_hostile_input(stack, routes, victim, attacker_proto, data):
    pids = _processes(stack)
    values = _values(victim)
    seen: dict[int, int] = {}
    http = httpx.Client(base_url=stack.url, timeout=httpx.Timeout(60.0, connect=10.0))

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(fill=st.data())
    def attack(fill):
        method, template = fill.draw(st.sampled_from(routes))
        url = _path(template, fill, victim)
        headers = {"X-API-Key": fill.draw(st.sampled_from([API_KEY, API_KEY, API_KEY, "", "tml-not-a-key", API_KEY + "x"]))}
        kind = fill.draw(st.sampled_from(["json-object", "json-any", "bytes", "protobuf", "none"]))
        body: bytes | None
        if kind == "json-object":
            body = json.dumps(fill.draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=8))).encode()
            headers["Content-Type"] = "application/json"
        elif kind == "json-any":
            body = json.dumps(fill.draw(values)).encode()
            headers["Content-Type"] = "application/json"
        elif kind == "bytes":
            body = fill.draw(st.binary(max_size=400))
            headers["Content-Type"] = fill.draw(st.sampled_from(["application/json", "application/x-protobuf", "text/plain"]))
        elif kind == "protobuf":
            proto = bytearray(attacker_proto)
            for _ in range(fill.draw(st.integers(1, 8))):
                i = fill.draw(st.integers(0, len(proto) - 1))
                proto[i] = fill.draw(st.integers(0, 255))
            body = bytes(proto[: fill.draw(st.integers(0, len(proto)))])
            headers["Content-Type"] = "application/x-protobuf"
            if fill.draw(st.booleans()):
                headers["Content-Encoding"] = "zstd"  # claims compression it does not have
        else:
            body = None
        try:
            r = http.request(method, url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise AssertionError(f"{method} {url} hung") from None
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500 or (r.status_code == 503 and r.headers.get("Retry-After")), (method, url, r.status_code, r.text[:300])
        if r.status_code >= 400 and r.status_code != 408:
            assert r.headers["content-type"].startswith("application/json"), (method, url, r.status_code, r.text[:200])
            # The OpenAI-compatible routes answer in OpenAI's error shape (openai_api.py).
            assert "detail" in r.json() or (url.startswith("/v1/") and set(r.json()) == {"error"}), r.text[:200]

    attack()
    http.close()

    assert seen.get(200, 0) > 0 and sum(n for s, n in seen.items() if 400 <= s < 500) > 100, seen  # it got past validation sometimes
    assert _processes(stack) == pids, "a process died and was restarted during the fuzzing"
    health = stack.healthz()
    assert health["bus"] and health["trainers"] and len(health["samplers"]) == 2, health
    # The other tenant's model is exactly as it was, and still trains.
    tc = victim["tc"]
    after = logprobs(tc.forward(data, loss_fn="cross_entropy").result())
    for a, b in zip(after, victim["before"]):
        np.testing.assert_array_equal(a, b)
    sdk_steps(tc, [data[4:]])


# -- sampling: the fuzzer's own sampling session


@pytest.fixture(scope="module")
def attacker_sampler(stack) -> str:
    sc = stack.service_client().create_sampling_client(base_model=BASE_MODEL).result()
    return sc._sampling_session_id  # noqa: SLF001


HUGE = st.sampled_from([2**31, 2**32 + 1, 2**62, 2**63 - 1, 2**64, 2**70, 10**30, -(2**63), -(2**64) - 5])


def _dim() -> st.SearchStrategy:
    return st.integers(-2, 6) | st.integers(1000, 5000) | HUGE


def _target(fill: st.DataObject, n_prompt: int) -> dict:
    """A target_prompt_logprobs, dense or CSR, of any shape: mostly plausible, often huge."""
    rows = fill.draw(st.sampled_from([n_prompt - 1, n_prompt - 1, n_prompt]) | _dim())
    cols = fill.draw(st.integers(1, 4) | _dim())
    if fill.draw(st.booleans()):  # sparse: a few values, indices that may or may not fit
        nnz = fill.draw(st.integers(0, 4))
        crow_len = fill.draw(st.sampled_from([rows + 1 if isinstance(rows, int) and 0 <= rows < 50 else 3, 2, 0]))
        crow = sorted(fill.draw(st.lists(st.integers(0, nnz) | HUGE, min_size=crow_len, max_size=crow_len)))
        return {"data": fill.draw(st.lists(st.integers(-1, 200) | HUGE, min_size=nnz, max_size=nnz)), "dtype": "int64", "shape": [rows, cols],
                "sparse_crow_indices": crow, "sparse_col_indices": fill.draw(st.lists(st.integers(0, 5) | HUGE, min_size=nnz, max_size=nnz))}  # fmt: skip
    size = fill.draw(st.integers(0, 12))
    shape = fill.draw(st.sampled_from([[rows, cols], [rows], [], [rows, cols, 2]]))
    return {"data": fill.draw(st.lists(st.integers(-1, 200) | HUGE, min_size=size, max_size=size)), "dtype": fill.draw(st.sampled_from(["int64", "int64", "float32"])),
            "shape": shape}  # fmt: skip


def test_sampling_survives_hostile_requests(stack, victim, attacker_sampler, tokenizer):
    pids = _processes(stack)
    http = httpx.Client(base_url=f"{stack.url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=httpx.Timeout(60.0, connect=10.0))
    seen: dict[int, int] = {}
    accepted: list[str] = []

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(fill=st.data())
    def attack(fill):
        def pick(benign: st.SearchStrategy, hostile: st.SearchStrategy):
            """Each field is hostile one time in eight: a good share of requests get through to the sampler."""
            return fill.draw(hostile if fill.draw(st.integers(0, 7)) == 0 else benign)

        n_prompt = pick(st.integers(2, 8), st.sampled_from([0, 1, 5000]))
        ids = st.lists(st.integers(0, 200), min_size=n_prompt, max_size=n_prompt)
        prompt = [1] * n_prompt if n_prompt > 100 else pick(ids, st.lists(st.integers(0, 200) | HUGE, min_size=n_prompt, max_size=n_prompt))
        params = {
            "max_tokens": pick(st.integers(1, 3) | st.none(), st.integers(-1, 0) | HUGE),
            "temperature": pick(st.sampled_from([0.0, 1.0, 0.7]), st.sampled_from([1e-30, -1.0, 1e308])),
            "top_k": pick(st.sampled_from([-1, 5]), st.sampled_from([0, 10**6]) | HUGE),
            "top_p": pick(st.sampled_from([1.0, 0.5]), st.sampled_from([0.0, 2.0])),
            "seed": pick(st.none() | st.integers(0, 10), HUGE),
            "stop": pick(st.none() | st.sampled_from([[], [0, 1]]), st.lists(HUGE, min_size=1, max_size=2)),
        }
        body = {
            "sampling_session_id": pick(st.just(attacker_sampler), st.sampled_from(DOTTED(attacker_sampler) + [victim["session_id"] + ":sample:0"])),
            "seq_id": pick(st.integers(1, 10**6), HUGE),
            "num_samples": pick(st.integers(1, 3), st.sampled_from([0, 129, 10**8]) | HUGE),
            "prompt": {"chunks": [{"type": pick(st.just("encoded_text"), st.just("image")), "tokens": prompt}]},
            "sampling_params": params,
            "prompt_logprobs": fill.draw(st.booleans()),
            "topk_prompt_logprobs": pick(st.sampled_from([0, 2]), st.sampled_from([65]) | HUGE),
            "topk_sample_logprobs": pick(st.sampled_from([0, 2]), st.sampled_from([65]) | HUGE),
            "prompt_alt_tokens_k": pick(st.sampled_from([0, 2]), HUGE),
        }
        if fill.draw(st.booleans()):
            k = fill.draw(st.integers(1, 3))
            plausible = st.just({"data": [1] * (max(n_prompt - 1, 0) * k), "dtype": "int64", "shape": [max(n_prompt - 1, 0), k]})
            body["target_prompt_logprobs"] = pick(plausible, st.just(_target(fill, n_prompt)))
        try:
            r = http.post("/asample", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        except httpx.TimeoutException:
            raise AssertionError("asample hung") from None
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500 or (r.status_code == 503 and r.headers.get("Retry-After")), (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert "detail" in r.json(), r.text[:200]
        else:
            accepted.append(r.json()["request_id"])

    attack()
    assert seen.get(200, 0) > 20 and seen.get(400, 0) > 50, seen  # both sides of the bounds were reached
    # Every accepted request ends (done or failed: never stuck), and no sampler died for it.
    for rid in accepted:
        deadline = time.monotonic() + 120
        while True:
            r = http.post("/retrieve_future", json={"request_id": rid}, headers={"x-stainless-read-timeout": "15"})
            assert r.status_code in (200, 408), r.text[:300]
            if r.status_code == 200:
                if r.headers["content-type"].startswith("application/json"):
                    assert r.json().get("category") != "server", r.json()  # refused as the user's error, not a crash
                break
            assert time.monotonic() < deadline, f"{rid} never finished"
    http.close()
    assert _processes(stack) == pids, "a process died and was restarted during the sampling fuzz"
    # The samplers still serve.
    sc = stack.service_client().create_sampling_client(base_model=BASE_MODEL).result()
    prompt = tinker.types.ModelInput.from_ints(tokenizer.encode("hello"))
    out = sc.sample(prompt, num_samples=2, sampling_params=tinker.types.SamplingParams(max_tokens=3, temperature=0.0)).result(timeout=120)
    assert len(out.sequences) == 2
