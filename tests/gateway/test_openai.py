"""The OpenAI-compatible routes with the official `openai` client against `openrl up`: base
models and sampler weights saved through the tinker SDK, served by the same samplers over the
bus; the SDK's own answers are the reference. Errors in OpenAI's shape; a client that leaves
mid-stream frees its request."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import numpy as np
import openai
import pytest
import tinker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrl.bus.messages import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

from sdk_helpers import sdk_steps, training_client
from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY, nats_options

pytestmark = pytest.mark.timeout(600)

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Say the word: apple"}]


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def other(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=OTHER_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def trained(stack, data):
    """Sampler weights saved through the tinker SDK after a few SFT steps, and the SDK's sampling client of them."""
    service, tc = training_client(stack, seed=4242, rank=4)
    sdk_steps(tc, [data[:4], data[4:]], lr=2e-2)
    path = tc.save_weights_for_sampler("openai-served").result(timeout=120).path
    return path, service.create_sampling_client(model_path=path).result(timeout=120)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)


def _chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _error(e: openai.APIStatusError) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- models --------------------------------------------------------------------------------


def test_models_lists_the_base_model_and_only_the_keys_own_weights(client, other, trained):
    path, _ = trained
    mine = {m.id: m for m in client.models.list().data}
    theirs = {m.id for m in other.models.list().data}
    assert BASE_MODEL in mine and BASE_MODEL in theirs
    assert mine[BASE_MODEL].object == "model" and mine[BASE_MODEL].model_extra["max_model_len"] == 2048
    assert path in mine and path not in theirs
    assert client.models.retrieve(BASE_MODEL).id == BASE_MODEL


# -- completions ---------------------------------------------------------------------------


def test_completions_sample_what_the_sdk_samples(client, trained, tokenizer):
    """Token ids in, seeded: the same tokens the SDK's sampling client draws from the same weights."""
    path, sampling = trained
    ids = _ids(tokenizer, "Repeat after me: river moon")
    got = client.completions.create(model=path, prompt=ids, n=2, seed=7, temperature=1.0, max_tokens=8)
    want = sampling.sample(tinker.types.ModelInput.from_ints(ids), num_samples=2,
                           sampling_params=tinker.types.SamplingParams(max_tokens=8, seed=7, temperature=1.0)).result(timeout=120)  # fmt: skip
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in want.sequences]
    assert [c.finish_reason for c in got.choices] == ["stop" if s.stop_reason == "stop" else "length" for s in want.sequences]
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == sum(len(s.tokens) for s in want.sequences)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.model == path and got.object == "text_completion"


def test_completions_text_prompts_and_logprobs(client, tokenizer):
    prompts = ["Say the word: cat", "What is 2+3?"]
    got = client.completions.create(model=BASE_MODEL, prompt=prompts, temperature=0, max_tokens=6, logprobs=2)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.usage.prompt_tokens == sum(len(_ids(tokenizer, p)) for p in prompts)
    for c in got.choices:
        lp = c.logprobs
        assert 1 <= len(lp.tokens) <= 6 and len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
        assert all(x <= 0 for x in lp.token_logprobs)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
        # Greedy: each token is its row's most likely one, with the same logprob.
        assert all(max(top.values()) == pytest.approx(x, abs=1e-5) for x, top in zip(lp.token_logprobs, lp.top_logprobs))
        assert "".join(lp.tokens).startswith(c.text)
    # Greedy is deterministic: the same request gives the same text.
    again = client.completions.create(model=BASE_MODEL, prompt=prompts[1], temperature=0, max_tokens=6)
    assert again.choices[0].text == got.choices[1].text


def test_echo_scores_the_prompt_as_compute_logprobs_does(client, trained, tokenizer):
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 0."""
    path, sampling = trained
    text = "Repeat after me: snow tree"
    ids = _ids(tokenizer, text)
    got = client.completions.create(model=path, prompt=text, echo=True, logprobs=1, max_tokens=0, temperature=0)
    [c] = got.choices
    assert c.text == text and c.finish_reason == "length" and got.usage.completion_tokens == 1
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = sampling.compute_logprobs(tinker.types.ModelInput.from_ints(ids)).result(timeout=120)
    np.testing.assert_allclose(lp.token_logprobs[1:], want[1:], atol=1e-4)
    # The trained weights, not the base model's.
    base = client.completions.create(model=BASE_MODEL, prompt=text, echo=True, logprobs=1, max_tokens=0)
    assert not np.allclose(base.choices[0].logprobs.token_logprobs[1:], want[1:], atol=1e-3)


def test_stop_strings_are_left_out(client):
    prompts = ["Repeat after me: river moon star cloud", "What is 12+34?", "Say the word: banana", "apple banana cherry grape"]
    got = client.completions.create(model=BASE_MODEL, prompt=prompts, temperature=0, max_tokens=16)
    prompt, text = next((prompts[c.index], c.text) for c in got.choices if len(c.text) >= 4)
    stop = text[2:4]
    cut = client.completions.create(model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=16, stop=[stop, "never-seen"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop", (text, stop)


# -- chat ----------------------------------------------------------------------------------


def test_chat_applies_the_chat_template(client, tokenizer):
    got = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, temperature=0, max_tokens=10, logprobs=True, top_logprobs=2)
    [c] = got.choices
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    # The prompt is what transformers' apply_chat_template makes of the messages, token for token.
    assert got.usage.prompt_tokens == len(_chat_ids(tokenizer, MESSAGES))
    assert 1 <= got.usage.completion_tokens <= 10 and got.object == "chat.completion"
    assert len(c.logprobs.content) == got.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5) for t in c.logprobs.content)
    # The answer decodes the sampled tokens (the turn's end token is special: not in the text).
    sampled = [t.token for t in c.logprobs.content]
    assert "".join(sampled).replace("<|im_end|>", "").replace("<|endoftext|>", "") == c.message.content


def test_chat_stream_is_the_same_answer_in_chunks(client, stack):
    kw = dict(model=BASE_MODEL, messages=MESSAGES, temperature=0, max_tokens=10, n=2)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    for c in whole.choices:
        parts = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == c.index]
        assert "".join(p.delta.content or "" for p in parts) == c.message.content
        assert [p.finish_reason for p in parts if p.finish_reason] == [c.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    assert len({ch.id for ch in chunks}) == 1
    # On the wire: server-sent events ending with `data: [DONE]`.
    with httpx.stream("POST", f"{stack.url}/v1/completions", json={"model": BASE_MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as r:  # fmt: skip
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_sampling_session_ids_are_models_too(client, stack, tokenizer):
    service, tc = training_client(stack, seed=77, rank=2)
    sc = tc.save_weights_and_get_sampling_client("unnamed").result(timeout=120)
    sid = sc._sampling_session_id  # noqa: SLF001
    got = client.completions.create(model=sid, prompt="Say the word: dog", max_tokens=3, temperature=0)
    assert got.model == sid and got.choices[0].text is not None


# -- errors --------------------------------------------------------------------------------


def test_unknown_model_is_404(client):
    for model in ("no/such-model", "tinker://s-0000:train:0/sampler_weights/nothing", "s-0000:sample:3"):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        err = _error(e.value)
        assert err["code"] == "model_not_found" and err["param"] == "model", err


def test_missing_or_wrong_key_is_401(stack, client):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="tml-not-a-key", max_retries=0).models.list()
    assert _error(e.value)["code"] == "invalid_api_key"
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):
        r = httpx.post(f"{stack.url}/v1/chat/completions", json={"model": BASE_MODEL, "messages": MESSAGES}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error", (headers, r.text)


def test_another_keys_weights_are_404(other, trained):
    path, _ = trained
    with pytest.raises(openai.NotFoundError) as e:
        other.chat.completions.create(model=path, messages=MESSAGES, max_tokens=2)
    assert _error(e.value)["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        other.models.retrieve(path)


def test_max_tokens_past_the_context_is_400(client, tokenizer):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=2048)
    err = _error(e.value)
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded", err
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE_MODEL, prompt=[5] * 2048, max_tokens=1)
    assert _error(e.value)["param"] == "prompt"
    # What fits is served.
    room = 2048 - len(_chat_ids(tokenizer, MESSAGES))
    assert client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=room, temperature=0).choices


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"mystery": 1}, "mystery"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
        ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
    ],
)
def test_unsupported_or_bad_fields_are_400_naming_them(stack, extra, param):
    body = {"model": BASE_MODEL, "messages": MESSAGES, "max_tokens": 2, **extra}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_stop_strings_at_their_bounds_are_served(client):
    """The most stop strings, each of the most characters, are served: the bounds refused above
    are the first values past what is allowed."""
    stops = [chr(0x3b1 + i) * MAX_STOP_STRING_CHARS for i in range(MAX_STOP_STRINGS)]  # never sampled: the tiny tokenizer has no Greek
    got = client.completions.create(model=BASE_MODEL, prompt="hi", temperature=0, max_tokens=4, stop=stops)
    assert got.choices[0].finish_reason == "length"


def test_completions_fields_are_checked(stack):
    for extra, param in (({"logprobs": 6}, "logprobs"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"), ({"prompt": [[1, "a"]]}, "prompt"),
                         ({"prompt": [10**6]}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "ab" * 100_000}, "prompt")):  # fmt: skip
        body = {"model": BASE_MODEL, "prompt": "hi", "max_tokens": 2, **extra}
        r = httpx.post(f"{stack.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    r = httpx.post(f"{stack.url}/v1/completions", content=b"{nope", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 400 and "error" in r.json()


def test_hostile_bodies_get_4xx_in_openai_shape(stack, client):
    """Whatever the fields hold: a 2xx or a 4xx in OpenAI's shape, never a 5xx or a hang, and the
    samplers serve on."""
    pids = {role: stack.pid(role) for role in ("gateway", "sampler-0", "sampler-1")}
    hostile = st.sampled_from([None, True, -1, 0, 1, 2, 2**31, 2**63, 10**400, -(2**63) - 1, 1e308, -0.0, 0.5, "", "x" * 3000, "☃",
                               [], [1, 2], [[]], [[1, "a"]], [-5], {}, {"type": "text"}, {"include_usage": "yes"}, "tinker://x/y/z",
                               "s-0:sample:0", "../..", "a b:sample:1", MESSAGES, [{"role": "user"}], [{"role": "user", "content": 5}]])  # fmt: skip
    keys = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "logprobs",
                            "top_logprobs", "echo", "stream", "stream_options", "best_of", "presence_penalty", "tools", "zzz"])  # fmt: skip
    http = httpx.Client(base_url=f"{stack.url}/v1", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)

    @settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    @given(route=st.sampled_from(["/completions", "/chat/completions"]), fields=st.dictionaries(keys, hostile, max_size=6), valid=st.booleans())
    def attack(route, fields, valid):
        body = {"model": BASE_MODEL, "prompt": "Hi", "messages": MESSAGES, "max_tokens": 2} if valid else {}
        body.update(fields)
        if body.get("max_tokens") in (None, 2**31, 2**63) or body.get("echo") is True:
            body["max_tokens"] = 2  # keep what does run short
        r = http.post(route, json=body)
        assert r.status_code < 500, (body, r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]

    attack()
    http.close()
    assert {role: stack.pid(role) for role in pids} == pids
    assert client.completions.create(model=BASE_MODEL, prompt="Hi", max_tokens=2).choices


# -- a client that leaves ------------------------------------------------------------------


def _nats(stack, coro):
    """Run `coro(js)` against the stack's JetStream."""
    import nats

    async def run():
        nc = await nats.connect(stack.nats_url, **nats_options())
        try:
            return await coro(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


def _queued(stack, request_id: str) -> bool:
    """Whether the sample stream still holds this request's message."""
    from nats.js.errors import NotFoundError

    from openrl.bus import subjects
    from openrl.bus.messages import SampleRequest, decode

    async def scan(js):
        seq = 1
        while True:
            try:
                raw = await js.get_msg(subjects.SAMPLE_STREAM, seq=seq, subject=subjects.sample(BASE_MODEL), next=True)
            except NotFoundError:
                return False
            if decode(raw.data, SampleRequest).request_id == request_id:
                return True
            seq = raw.seq + 1

    return _nats(stack, scan)


def _unfinished(stack) -> tuple[int, int]:
    """The samplers' consumer: messages not yet delivered, and delivered but not acked."""
    from openrl.bus import subjects

    async def info(js):
        c = await js.consumer_info(subjects.SAMPLE_STREAM, subjects.sampler_consumer(BASE_MODEL))
        return c.num_pending, c.num_ack_pending

    return _nats(stack, info)


def _future(stack, request_id: str) -> dict:
    r = httpx.post(f"{stack.url}/api/v1/retrieve_future", json={"request_id": request_id}, headers={"X-API-Key": API_KEY}, timeout=60)
    return {"state": "pending"} if r.status_code == 408 else r.json()


def _wait(what, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not (value := what()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def test_a_client_that_leaves_mid_stream_frees_its_request(client, stack):
    """With both samplers stopped, the request is queued (or held, unstarted, by a stopped
    sampler) when the client hangs up: its future is failed as cancelled and its message leaves
    the queue. Woken, no sampler generates it, and nothing is left pending or unacked."""
    victims = [stack.pid("sampler-0"), stack.pid("sampler-1")]
    logs = [stack.data_dir / "logs" / f"sampler-{i}.log" for i in (0, 1)]
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    try:
        with client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=64, stream=True) as stream:
            [rid] = stream.response.headers["x-openrl-request-ids"].split(",")
            first = next(iter(stream))
            assert first.choices[0].delta.role == "assistant"
            assert _queued(stack, rid)
            assert _future(stack, rid)["state"] == "pending"
        # The client is gone: the gateway notices within its poll and frees the request.
        failed = _wait(lambda: (f := _future(stack, rid)).get("error") and f, 30)
        assert failed["category"] == "user" and "cancelled" in failed["error"], failed
        assert not _queued(stack, rid)
    finally:
        for pid in victims:
            os.kill(pid, signal.SIGCONT)
    # Awake, the samplers take nothing of it: nothing pending or unacked, no result computed.
    _wait(lambda: _unfinished(stack) == (0, 0), 60)
    time.sleep(1.0)
    assert not [line for log in logs for line in log.read_text().splitlines() if rid in line and "sample_already_recorded" in line]
    assert _future(stack, rid) == failed
    # And they serve on.
    assert client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=3).choices


COUNTING = "1 2 3 4 5 6 7 8 9 10 11 12"  # greedy, the default model counts on ("1111...") to the end of its context


def test_a_client_that_leaves_mid_generation_stops_it(stack):
    """A long generation (greedy counting: no end token before max_tokens, ~1,900 tokens x 16
    choices) through the streaming route; the client hangs up after the first keepalive, while a
    sampler generates it. The gateway fails the future and sends the cancel notice; the sampler's
    engine drops the rows within seconds (its log), acks the message and stores nothing."""
    logs = [stack.data_dir / "logs" / f"sampler-{i}.log" for i in (0, 1)]
    seen = [len(log.read_text()) for log in logs]
    body = {"model": BASE_MODEL, "prompt": COUNTING, "max_tokens": 1900, "temperature": 0, "n": 16, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        [rid] = r.headers["x-openrl-request-ids"].split(",")
        first = next(line for line in r.iter_lines() if line)
        assert first == ": keepalive", first  # 5 s in, still generating
        assert _unfinished(stack) == (0, 1), _unfinished(stack)  # a sampler holds it
    left = time.monotonic()

    def sampler_lines(event: str) -> list[dict]:
        lines = [json.loads(x) for log, n in zip(logs, seen, strict=True) for x in log.read_text()[n:].splitlines() if event in x]
        return [x for x in lines if x.get("event") == event]

    aborted = _wait(lambda: [x for x in sampler_lines("sample_aborted") if x["request_id"] == rid], 20)
    stopped = time.monotonic() - left
    assert aborted[0]["generating_s"] is not None  # it was in the engine
    # The engine dropped its rows at its next step (its compute thread logs it).
    assert [x["rows"] for x in _wait(lambda: sampler_lines("sample_cancelled"), 5)] == [16]
    failed = _future(stack, rid)
    assert failed["category"] == "user" and "cancelled" in failed["error"], failed
    _wait(lambda: _unfinished(stack) == (0, 0), 10)  # acked, not handed back
    time.sleep(1.0)
    assert not sampler_lines("sample_already_recorded") and _future(stack, rid) == failed
    assert stopped < 15, stopped


def test_a_client_that_leaves_a_plain_request_frees_it(stack):
    victims = [stack.pid("sampler-0"), stack.pid("sampler-1")]
    gateway_log = stack.data_dir / "logs" / "gateway.log"
    seen = len(gateway_log.read_text())
    for pid in victims:
        os.kill(pid, signal.SIGSTOP)
    try:
        body = {"model": BASE_MODEL, "prompt": "Say the word: sun", "max_tokens": 32}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{stack.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2.0)
        # The request id is not known to this client; the gateway's log names what it cancelled.
        line = _wait(lambda: next((x for x in gateway_log.read_text()[seen:].splitlines() if "openai_request_cancelled" in x), None), 30)
        rid = json.loads(line)["request_id"]
        assert "cancelled" in _future(stack, rid)["error"]
        assert not _queued(stack, rid)
    finally:
        for pid in victims:
            os.kill(pid, signal.SIGCONT)
    _wait(lambda: _unfinished(stack) == (0, 0), 60)
