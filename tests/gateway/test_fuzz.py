"""Hostile input: property-based fuzzing of every gateway route (hypothesis), including
protobuf bodies. Whatever arrives: never a 5xx, never a hang, a JSON error body, no worker
dies or restarts, and another tenant's model is untouched.

The routes come from the gateway's own OpenAPI document, so a new route is fuzzed without
editing this file. The fuzzer knows the victim's ids (model, session, checkpoint path) and
uses them with its own key: isolation is part of what is checked.
"""

from __future__ import annotations

import json
import re
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


def _values(victim) -> st.SearchStrategy:
    hostile = st.sampled_from([
        victim["model_id"], victim["session_id"], victim["path"], f"{victim['path']}/../../x", BASE_MODEL,
        "../../etc/passwd", "..", "%2e%2e%2f", "a\x00b", "x" * 5000, "tinker://", "tinker://../../x", "☃" * 50,
        -1, 0, 1, 2**31, 2**63 - 1, -(2**63), 1e308, -0.0, "NaN", "cross_entropy", "ppo", "importance_sampling",
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
