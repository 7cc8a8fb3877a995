"""Metrics, request ids and `openrl status` against the real `openrl up` stack.

Every process of the stack serves Prometheus text on its own port (recorded in
run/stack.json); a training step, a sample and a score must move the named series by the
amounts the work implies. A request id sent as X-Request-Id (or made by the gateway) must
show up in the log of every process the request went through.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
import uuid

import httpx
import pytest
import tinker

from openrl.demo import make_datum, sft_examples

from stack_helpers import API_KEY, BASE_MODEL
from test_shutdown import _result

pytestmark = pytest.mark.timeout(600)

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format -> {(name, labels): value}; every line must be well-formed."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line) or not line, line
            continue
        m = _SAMPLE.match(line)
        assert m, f"malformed sample line: {line!r}"
        name, labels, value = m.groups()
        out[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return out


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name` over every sample whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def label_sets(samples: dict, name: str) -> list[dict]:
    return [dict(ls) for (n, ls) in samples if n == name]


@pytest.fixture(scope="module")
def endpoints(stack) -> dict[str, str]:
    facts = json.loads((stack.data_dir / "run" / "stack.json").read_text())
    return facts["metrics"]


def test_up_gives_every_process_its_own_metrics_port(stack, endpoints):
    assert set(endpoints) == {"trainer", "sampler-0", "sampler-1", "gateway", "rewarder-exact_match", "rewarder-math", "rewarder-sql"}
    assert len(set(endpoints.values())) == len(endpoints)
    health = stack.healthz()
    workers = {"trainer": health["trainers"], "sampler": health["samplers"], "rewarder": health["rewarders"]}
    seen: dict[str, set] = {"trainer": set(), "sampler": set(), "rewarder": set()}
    for role, url in endpoints.items():
        samples = scrape(url)
        kind = role.split("-")[0]
        assert total(samples, "openrl_bus_connected", process=kind) == 1, role
        if kind == "gateway":
            continue
        busy = label_sets(samples, "openrl_worker_busy_fraction")
        assert len(busy) == 1 and busy[0]["kind"] == kind, (role, busy)
        seen[kind].add(busy[0]["worker_id"])
        base = url.removesuffix("/metrics")
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200
            assert json.loads(r.read()) == {"ready": True, "bus": True, "model": True, "serving": True}
        with urllib.request.urlopen(f"{base}/livez", timeout=5) as r:
            assert json.loads(r.read()) == {"live": True}
    # The worker ids in the metrics are the live workers the gateway sees.
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in workers.items()}


def test_series_move_when_work_is_done(stack, endpoints):
    samplers = [u for r, u in endpoints.items() if r.startswith("sampler")]
    before = {role: scrape(url) for role, url in endpoints.items()}

    service = stack.service_client()
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=11).result()
    tokenizer = tc.get_tokenizer()
    batch = [make_datum(tokenizer, q, a) for q, a in sft_examples(3, seed=5)]
    tc.forward_backward(batch, loss_fn="cross_entropy").result(timeout=120)
    tc.forward(batch, loss_fn="cross_entropy").result(timeout=120)
    tc.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result(timeout=120)
    sampling = tc.save_weights_and_get_sampling_client("obs").result()
    prompt = tinker.types.ModelInput.from_ints(tokenizer.encode("The answer is"))
    params = tinker.types.SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    generated = 0
    for _ in range(3):  # the same adapter three times: one fetch per sampler at most, the rest cache hits
        out = sampling.sample(prompt, num_samples=2, sampling_params=params).result(timeout=120)
        generated += sum(len(s.tokens) for s in out.sequences)
    r = httpx.post(f"{stack.url}/api/v1/score", headers={"X-API-Key": API_KEY}, timeout=30,
                   json={"reward_name": "exact_match", "items": [{"completion": "4", "reference": "4"}, {"completion": "4", "reference": None}]})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    result = httpx.post(f"{stack.url}/api/v1/retrieve_future", headers={"X-API-Key": API_KEY}, json={"request_id": rid}, timeout=60).json()
    assert [s["error_kind"] for s in result["scores"]] == [None, "exception"], result

    after = {role: scrape(url) for role, url in endpoints.items()}

    def moved(role, name, **labels) -> float:
        return total(after[role], name, **labels) - total(before[role], name, **labels)

    def moved_samplers(name, **labels) -> float:
        return sum(moved(r, name, **labels) for r in endpoints if r.startswith("sampler"))

    tokens = sum(d.model_input.length for d in batch)
    assert moved("trainer", "openrl_trained_tokens_total", **{"pass": "forward_backward"}) == tokens
    assert moved("trainer", "openrl_trained_tokens_total", **{"pass": "forward"}) == tokens
    assert moved("trainer", "openrl_optim_steps_total") == 1
    # create (1 on the create stream) and fwd/bwd, forward, optim, save (4 on the model's consumer)
    assert moved("trainer", "openrl_messages_total", stream="OPENRL_TRAIN", consumer="models", outcome="ack") == 4
    assert moved("trainer", "openrl_messages_total", stream="OPENRL_CREATE", outcome="ack") == 1
    assert moved("trainer", "openrl_message_seconds_count", stream="OPENRL_TRAIN") == 4
    assert total(after["trainer"], "openrl_worker_models") >= 1

    assert moved_samplers("openrl_sampled_tokens_total") == generated > 0
    assert moved_samplers("openrl_messages_total", stream="OPENRL_SAMPLE", outcome="ack") == 3
    assert moved_samplers("openrl_adapter_cache_total") == 3
    assert 1 <= moved_samplers("openrl_adapter_cache_total", result="miss") <= len(samplers)
    assert 1 <= moved_samplers("openrl_adapter_loads_total") <= len(samplers)

    assert moved("rewarder-exact_match", "openrl_reward_items_total", reward="exact_match") == 2
    assert moved("rewarder-exact_match", "openrl_reward_errors_total", reward="exact_match", kind="exception") == 1
    assert moved("rewarder-exact_match", "openrl_reward_seconds_count", reward="exact_match") == 1
    assert moved("rewarder-exact_match", "openrl_messages_total", stream="OPENRL_REWARD", outcome="ack") == 1
    assert moved("rewarder-math", "openrl_reward_items_total", reward="math") == 0

    gw = "gateway"
    assert moved(gw, "openrl_http_requests_total", route="/api/v1/forward_backward", method="POST", status="200") >= 2
    assert moved(gw, "openrl_http_requests_total", route="/api/v1/asample", method="POST", status="200") == 3
    assert moved(gw, "openrl_http_request_seconds_count", route="/api/v1/score", status="200") == 1
    assert total(after[gw], "openrl_http_request_seconds_bucket", route="/api/v1/score", le="+Inf") >= 1
    # queue depth per stream and consumer, read from JetStream by the gateway
    consumers = {(d["stream"], d["consumer"]) for d in label_sets(after[gw], "openrl_consumer_pending")}
    assert any(s == "OPENRL_SAMPLE" and c.startswith("sampler-") for s, c in consumers), consumers
    assert ("OPENRL_REWARD", "rewarder-exact_match") in consumers
    assert any(s == "OPENRL_TRAIN" and c.startswith("train-") for s, c in consumers), consumers
    assert total(after[gw], "openrl_consumer_pending", stream="OPENRL_SAMPLE") == 0
    assert total(after[gw], "openrl_stream_messages", stream="OPENRL_TRAIN") > 0
    assert ("openrl_futures_waiting", frozenset()) in after[gw]


def test_unknown_routes_and_errors_are_counted_by_template(stack, endpoints):
    before = scrape(endpoints["gateway"])
    r = httpx.get(f"{stack.url}/api/v1/samplers/some-unknown-id", headers={"X-API-Key": API_KEY})
    assert r.status_code == 404
    r = httpx.get(f"{stack.url}/no/such/{uuid.uuid4().hex}")
    assert r.status_code == 404
    after = scrape(endpoints["gateway"])
    routes = {d["route"] for d in label_sets(after, "openrl_http_requests_total")}
    assert not any("some-unknown-id" in r for r in routes)  # the template, never the raw path
    labels = dict(route="/api/v1/samplers/{sampler_id}", method="GET", status="404")
    assert total(after, "openrl_http_requests_total", **labels) - total(before, "openrl_http_requests_total", **labels) == 1
    labels = dict(route="unmatched", method="GET", status="404")
    assert total(after, "openrl_http_requests_total", **labels) - total(before, "openrl_http_requests_total", **labels) == 1


def _events(stack, role: str, trace_id: str) -> list[dict]:
    lines = (stack.data_dir / "logs" / f"{role}.log").read_text().splitlines()
    events = [json.loads(x) for x in lines if x.startswith("{") and trace_id in x]
    assert all(e.get("trace_id") == trace_id for e in events)
    return events


def test_request_id_follows_a_request_through_every_process(stack):
    trace = f"trace-{uuid.uuid4().hex}"
    service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY, default_headers_overrides={"X-Request-Id": trace})
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=12).result()
    tokenizer = tc.get_tokenizer()
    tc.forward_backward([make_datum(tokenizer, "q", "a")], loss_fn="cross_entropy").result(timeout=120)
    sampling = tc.save_weights_and_get_sampling_client("trace").result()
    prompt = tinker.types.ModelInput.from_ints(tokenizer.encode("Hi"))
    sampling.sample(prompt, num_samples=1, sampling_params=tinker.types.SamplingParams(max_tokens=3)).result(timeout=120)

    gateway = _events(stack, "gateway", trace)
    routes = {e["route"] for e in gateway if e["event"] == "http_request"}
    assert {"/api/v1/create_model", "/api/v1/forward_backward", "/api/v1/asample", "/api/v1/retrieve_future"} <= routes
    handled = {e["subject"].split(".")[1] for e in _events(stack, "trainer", trace) if e["event"] == "message_handled"}
    assert handled == {"create", "train"}
    sampled = [e for role in ("sampler-0", "sampler-1") for e in _events(stack, role, trace) if e["event"] == "message_handled"]
    assert len(sampled) == 1 and sampled[0]["subject"].startswith("openrl.sample.")


def test_request_id_header_is_returned_honoured_or_replaced(stack):
    def post_score(rid: str | bytes | None):
        headers = {"X-API-Key": API_KEY, **({"X-Request-Id": rid} if rid is not None else {})}
        return httpx.post(f"{stack.url}/api/v1/score", headers=headers, timeout=30,
                          json={"reward_name": "exact_match", "items": [{"completion": "x", "reference": "x"}]})

    trace = f"score-trace-{uuid.uuid4().hex[:12]}"
    r = post_score(trace)
    assert r.status_code == 200 and r.headers["X-Request-Id"] == trace
    result = httpx.post(f"{stack.url}/api/v1/retrieve_future", headers={"X-API-Key": API_KEY}, json={"request_id": r.json()["request_id"]}, timeout=60)
    assert result.json()["scores"][0]["reward"] == 1.0
    scored = [e for e in _events(stack, "rewarder-exact_match", trace) if e["event"] in ("scored", "message_handled")]
    assert {e["event"] for e in scored} == {"scored", "message_handled"}
    assert any(e["event"] == "http_request" and e["route"] == "/api/v1/score" for e in _events(stack, "gateway", trace))

    accepted = []
    for bad in (b"has spaces in it", b"x" * 200, b"short", "\u00e9t\u00e9-1234567".encode(), b"a\\b-12345678"):
        r = post_score(bad)
        assert r.status_code == 200
        assert re.fullmatch(r"req-[0-9a-f]{32}", r.headers["X-Request-Id"]), (bad, r.headers["X-Request-Id"])
        accepted.append(r.json()["request_id"])
    r = post_score(None)
    assert re.fullmatch(r"req-[0-9a-f]{32}", r.headers["X-Request-Id"])
    accepted.append(r.json()["request_id"])
    # Scored before the next test reads the queues (`openrl status` expects none in flight).
    for rid in accepted:
        assert _result(stack.url, rid)["scores"][0]["reward"] == 1.0
    # Errors carry one too (the 4xx comes from the error middleware, inside ours).
    r = httpx.post(f"{stack.url}/api/v1/score", headers={"X-API-Key": "tml-wrong", "X-Request-Id": trace + "-401"}, json={})
    assert r.status_code == 401 and r.headers["X-Request-Id"] == trace + "-401"


def test_status_prints_the_running_stacks_workers(stack):
    # At least one session, whatever ran before.
    httpx.post(f"{stack.url}/api/v1/create_session", json={}, headers={"X-API-Key": API_KEY}, timeout=30).raise_for_status()
    health = stack.healthz()
    ids = health["trainers"] + health["samplers"] + health["rewarders"]
    assert len(ids) == 1 + 2 + 3
    for argv in (["--nats-url", stack.nats_url, "--url", stack.url], ["--data-dir", str(stack.data_dir)]):
        out = subprocess.run([sys.executable, "-m", "openrl", "status", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        for worker_id in ids:
            assert re.search(rf"^\s+(trainer|sampler|rewarder)\s+{re.escape(worker_id)}\s", text, re.M), (worker_id, text)
        assert "gateway: bus connected; sees 1 trainers, 2 samplers, 3 rewarders" in text
        for stream in ("OPENRL_TRAIN", "OPENRL_CREATE", "OPENRL_SAMPLE", "OPENRL_REWARD"):
            assert re.search(rf"^\s+{stream}\s+\d+", text, re.M), text
        assert re.search(r"^\s+OPENRL_REWARD\s+rewarder-exact_match\s+0\s+0\s+\d+\s+\d+", text, re.M), text
        sessions = int(re.search(r"SESSIONS: (\d+)", text).group(1))
        assert sessions >= 1
        # A dead-letter stream, where one exists, is listed with its message count.
        assert re.search(r"^DEAD LETTERS: (no DLQ stream|\S*DLQ\S* \d+)$", text, re.M), text
    out = subprocess.run([sys.executable, "-m", "openrl", "status", "--nats-url", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot reach NATS at nats://127.0.0.1:1" in out.stderr
