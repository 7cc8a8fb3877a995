"""Sampling through the unmodified tinker SDK: versioned weights, every sampling method,
competing samplers. The stack fixture runs `openrl up --samplers 2`."""

from __future__ import annotations

import os
import pickle
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from stack_helpers import API_KEY, BASE_MODEL
from openrl.demo import REWARD_BAND, majority_answers, make_datum, run_rl_demo, sft_examples

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def service(stack):
    return stack.service_client()


@pytest.fixture(scope="module")
def trained(service):
    """A training client with a few SFT steps behind it, so its adapter is far from zero."""
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=8, seed=5).result()
    tok = tc.get_tokenizer()
    data = [make_datum(tok, q, a) for q, a in sft_examples(8, seed=3)]
    for _ in range(3):
        tc.forward_backward(data, loss_fn="cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    return tc, tok, data


def chat_prompt(tok, text: str) -> types.ModelInput:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return types.ModelInput.from_ints(tok.encode(ids, add_special_tokens=False))


def forward_logprobs(tc, tokens: list[int]) -> np.ndarray:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [0.0] * (len(tokens) - 1)},
    )
    return tc.forward([datum], loss_fn="cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def test_rl_loop_through_the_sdk_raises_the_reward(stack):
    """GRPO-style: a fresh sampling client each step, group advantages, importance_sampling, on
    prompts measured on the starting weights (their majority first tokens are rewarded)."""
    rewards = run_rl_demo(stack.url, stack.api_key, base_model=BASE_MODEL, steps=20, progress=False)
    # The first step samples the starting weights: that reward leaves room to rise.
    assert rewards[0] <= REWARD_BAND[1] + 0.1, rewards
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert last > first + 0.25 and last > 0.75, rewards


def test_majority_answers_are_chosen_on_one_half_and_measured_on_the_other():
    chosen_on = ["a"] * 3 + list("bcdefg") + ["h"]
    assert majority_answers(chosen_on + ["a"] * 2 + ["b"] * 8) == (["a"], 0.2)
    assert majority_answers(["a"] * 20) is None  # always one answer: no room to rise
    # Among ten answers seen once each, the two "most common" are luck: elsewhere they are 0.
    assert majority_answers(list("abcdefghij") + list("klmnopqrst")) is None


def test_sampled_logprobs_match_the_trainers_forward(trained):
    tc, tok, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = chat_prompt(tok, "What is 12+34?")
    out = sc.sample(prompt, num_samples=3, sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0, seed=1)).result()
    assert len(out.sequences) == 3
    for seq in out.sequences:
        assert 1 <= len(seq.tokens) <= 8 and seq.stop_reason in ("stop", "length")
        full = prompt.to_ints() + list(seq.tokens)
        want = forward_logprobs(tc, full)[-len(seq.tokens) :]
        np.testing.assert_allclose(seq.logprobs, want, atol=1e-3)


def test_sampler_sees_the_weights_as_of_its_creation_never_newer(trained):
    tc, tok, data = trained
    prompt = chat_prompt(tok, "Say the word: river")
    tokens = prompt.to_ints() + tok.encode("river<|im_end|>", add_special_tokens=False)
    before = forward_logprobs(tc, tokens)
    sc = tc.save_weights_and_get_sampling_client().result()
    named = tc.save_weights_for_sampler("v1").result().path
    assert named == f"tinker://{tc.model_id}/sampler_weights/v1"
    for _ in range(2):  # train on: the samplers above must not move
        tc.forward_backward(data, loss_fn="cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    after = forward_logprobs(tc, tokens)
    assert np.abs(after - before).max() > 1e-2  # the model did change
    for client in (sc, tc.create_sampling_client(named).result()):
        got = np.array(client.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:], dtype=np.float32)
        np.testing.assert_allclose(got, before, atol=1e-3)
    fresh = tc.save_weights_and_get_sampling_client().result()
    got = np.array(fresh.compute_logprobs(types.ModelInput.from_ints(tokens)).result()[1:], dtype=np.float32)
    np.testing.assert_allclose(got, after, atol=1e-3)


def test_sampling_clients_from_paths_base_models_handles_and_pickles(service, trained):
    tc, tok, _ = trained
    path = tc.save_weights_for_sampler("for-paths").result().path
    prompt = chat_prompt(tok, "Repeat after me: 1 2 3")
    params = types.SamplingParams(max_tokens=6, temperature=0.0)
    want = tc.create_sampling_client(path).result().sample(prompt, 1, params).result().sequences[0].tokens
    by_path = service.create_sampling_client(model_path=path).result()
    assert by_path.get_base_model() == BASE_MODEL
    clients = [by_path, pickle.loads(pickle.dumps(by_path)), tinker.SamplingClient.from_sampler_handle(by_path.get_sampler_handle(), api_key=API_KEY)]
    for client in clients:
        assert client.sample(prompt, 1, params).result().sequences[0].tokens == want
    base = service.create_sampling_client(base_model=BASE_MODEL).result()
    assert base.sample(prompt, 1, params).result().sequences[0].tokens  # the base model samples too


def test_seeds_stops_and_prompt_logprobs(trained):
    tc, tok, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = chat_prompt(tok, "Repeat after me: apple banana cherry")
    seeded = types.SamplingParams(max_tokens=10, temperature=1.0, seed=1234)
    a = sc.sample(prompt, 2, seeded).result()
    b = sc.sample(prompt, 2, seeded).result()
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    # A stop string ends generation at the token that completes it.
    greedy = sc.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0)).result().sequences[0]
    text = tok.decode(greedy.tokens)
    words = text.replace("<|im_end|>", "").split()
    assert len(words) >= 2, text
    stop = " " + words[1]  # ends mid-answer, wherever the greedy answer goes
    stopped = sc.sample(prompt, 1, types.SamplingParams(max_tokens=10, temperature=0.0, stop=[stop])).result().sequences[0]
    assert stopped.stop_reason == "stop" and tok.decode(stopped.tokens).endswith(stop), (text, stop)
    assert len(stopped.tokens) < len(greedy.tokens)
    assert list(stopped.tokens) == list(greedy.tokens[: len(stopped.tokens)])
    # stop=[] runs to max_tokens, through the end-of-turn token.
    long = sc.sample(prompt, 1, types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])).result().sequences[0]
    assert long.stop_reason == "length" and len(long.tokens) == 12
    # prompt logprobs: NaN first, and NaN before the last N.
    full = sc.compute_logprobs(prompt).result()
    assert full[0] is None and all(x is not None for x in full[1:])
    last = sc.compute_logprobs(prompt, prompt_logprobs_last_n=3).result()
    assert all(x is None for x in last[:-3])
    np.testing.assert_allclose(last[-3:], full[-3:], atol=1e-4)


def test_topk_and_target_prompt_logprobs(trained):
    tc, tok, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = chat_prompt(tok, "Say the word: moon")
    n = prompt.length
    targets = np.full((n - 1, 2), -1, dtype=np.int64)
    targets[:, 0] = prompt.to_ints()[1:]
    out = sc.sample(
        prompt, 1, types.SamplingParams(max_tokens=3, temperature=0.0), include_prompt_logprobs=True,
        topk_prompt_logprobs=3, topk_sample_logprobs=2, target_prompt_logprobs=types.TensorData.from_numpy(targets),
        prompt_alt_tokens_k=2,
    ).result()  # fmt: skip
    plp = out.prompt_logprobs
    tpl = out.target_prompt_logprobs.to_numpy()
    assert tpl.shape == (n - 1, 2)
    np.testing.assert_allclose(tpl[:, 0], np.array(plp[1:], dtype=np.float32), atol=1e-4)
    assert (tpl[:, 1] == 0).all()
    assert out.topk_prompt_logprobs is not None and len(out.topk_prompt_logprobs[1]) == 3
    assert out.sequences[0].topk_logprobs is not None
    assert out.prompt_alt_tokens.tokens.to_numpy().shape == (n - 1, 2)


@pytest.mark.parametrize(
    "body, status, detail",
    [
        ({"num_samples": 0}, 400, "num_samples"),
        ({"num_samples": 10**6}, 400, "num_samples"),
        ({"sampling_params": {"max_tokens": -1}}, 400, "max_tokens"),
        # The checks that need no model run at the gateway (the sampler runs the same again).
        ({"sampling_params": {"max_tokens": 4, "temperature": -1.0}}, 400, "temperature"),
        ({"sampling_params": {"max_tokens": 4, "top_p": 0.0}}, 400, "top_p"),
        ({"sampling_params": {"max_tokens": 4, "top_k": 0}}, 400, "top_k"),
        ({"prompt": {"chunks": [{"type": "image", "data": "x", "format": "png"}]}}, 400, "image"),
        ({"sampling_session_id": "nobody:sample:0"}, 404, "unknown sampling session"),
    ],
)
def test_bad_sample_requests_get_clear_errors(stack, trained, body, status, detail):
    tc, tok, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    sampler_id = sc._sampling_session_id  # what the SDK sends as sampling_session_id
    payload = {
        "sampling_session_id": sampler_id, "seq_id": 10**6 + len(detail), "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 4}, "type": "sample",
    }  # fmt: skip
    payload.update(body)
    r = httpx.post(f"{stack.url}/api/v1/asample", json=payload, headers={"X-API-Key": API_KEY}, timeout=30)
    if r.status_code == 200:  # accepted; the sampler fails the future as a user error
        rid = r.json()["request_id"]
        while (r := httpx.post(f"{stack.url}/api/v1/retrieve_future", json={"request_id": rid}, headers={"X-API-Key": API_KEY}, timeout=60)).status_code == 408:
            pass
        assert r.json()["category"] == "user" and detail in r.json()["error"], r.text
    else:
        assert r.status_code == status and detail in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "tokens, params, detail",
    [
        ([1, 2, 10**6], {"max_tokens": 4}, "token ids"),
        ([1] * 3000, {"max_tokens": 4}, "context"),
    ],
)
def test_bad_sample_content_fails_as_user_error(trained, tokens, params, detail):
    tc, _, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    with pytest.raises(tinker.RequestFailedError) as err:
        sc.sample(types.ModelInput.from_ints(tokens), 1, types.SamplingParams(**params)).result()
    assert err.value.category == types.RequestErrorCategory.User and detail in str(err.value)
    assert sc.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(max_tokens=2)).result().sequences


def test_max_tokens_none_is_the_samplers_default_end_to_end(trained):
    """No max_tokens: the request carries None to the sampler, which samples its default
    (openrl sampler --default-max-tokens, 256) with stop=[]; with a prompt that leaves less
    room than that, the error names the default."""
    tc, _, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    out = sc.sample(types.ModelInput.from_ints([1, 2, 3]), 1, types.SamplingParams(temperature=1.0, seed=5, stop=[])).result()
    assert len(out.sequences[0].tokens) == 256 and out.sequences[0].stop_reason == "length"
    with pytest.raises(tinker.RequestFailedError) as err:
        sc.sample(types.ModelInput.from_ints([1] * 2000), 1, types.SamplingParams(seed=5)).result()
    assert err.value.category == types.RequestErrorCategory.User and "default max_tokens (256)" in str(err.value)


def test_full_sample_queue_answers_429_and_accepts_nothing(stack, extra_gateway, trained):
    tc, _, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    payload = {
        "sampling_session_id": sc._sampling_session_id, "seq_id": 7, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2}, "type": "sample",
    }  # fmt: skip
    r = httpx.post(f"{extra_gateway}/api/v1/asample", json=payload, headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 429 and r.headers["Retry-After"] and "queue is full" in r.json()["detail"]
    # Nothing was accepted: the same seq_id on the main gateway is a fresh request that runs.
    r = httpx.post(f"{stack.url}/api/v1/asample", json=payload, headers={"X-API-Key": API_KEY}, timeout=30)
    assert r.status_code == 200 and len(r.json()["sample_sequence_ids"]) == 1


def test_sampler_kill_9_during_50_concurrent_samples_loses_nothing(stack, trained):
    tc, tok, _ = trained
    sc = tc.save_weights_and_get_sampling_client().result()
    prompt = chat_prompt(tok, "Repeat after me: red blue green")
    params = types.SamplingParams(max_tokens=24, temperature=1.0, stop=[])
    futures = [sc.sample(prompt, 1, params) for _ in range(50)]
    time.sleep(0.5)
    victim = stack.pid("sampler-0")
    os.kill(victim, signal.SIGKILL)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda f: f.result(timeout=300), futures))
    assert len(results) == 50 and all(len(r.sequences[0].tokens) == 24 for r in results)
    assert stack.wait_restarted("sampler-0", victim) != victim
