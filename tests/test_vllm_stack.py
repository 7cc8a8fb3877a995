"""`openrl up` with a vLLM sampler, driven by the tinker SDK.

The sampler runs under vLLM's environment (OPENRL_VLLM_PYTHON, scripts/vllm_env.sh; vLLM's CPU
build here) via `openrl up --sampler-backend vllm --sampler-python ...`; everything else runs in
this environment. The base model is the tiny head-64 Qwen3 of tests/vllm_model.py. One stack for
the module (vLLM's engine takes ~20 s to start on CPU).

Tolerance: vLLM runs fp32 on CPU, as the trainer and the transformers backend do here, so sampled
logprobs agree with theirs up to float32 rounding of differently ordered kernels (measured below
5e-6 on the base model; docs/vllm.md). LOGPROB_ATOL = 5e-4 leaves room for another CPU, and is far below what a
wrong weights version, temperature or position moves (checked: > 0.04).
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import tinker
from tinker import types

from stack_helpers import Stack, run_stack
from vllm_model import VLLM_MODEL, vllm_model, vllm_python  # noqa: F401  (fixtures)

LOGPROB_ATOL = 5e-4
MAX_ADAPTERS = 2


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory, vllm_python, vllm_model, nats_credentials):
    args = ("--base-model", VLLM_MODEL, "--samplers", "1", "--sampler-backend", "vllm", "--sampler-python", vllm_python)
    env = {"OPENRL_KV_CACHE_GIB": "0.25", "OPENRL_MAX_MODEL_LEN": "256", "OPENRL_ENFORCE_EAGER": "1",
           "OPENRL_MAX_LORA_RANK": "8", "OPENRL_MAX_LORAS": "2", "OPENRL_MAX_ADAPTERS": str(MAX_ADAPTERS),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}  # fmt: skip
    yield from run_stack(tmp_path_factory.mktemp("vllm-stack"), nats_credentials, args=args, env=env, stop_s=90)


def sampler_events(stack: Stack, event: str) -> list[dict]:
    """The sampler's JSON log lines with this event (every run of it: restarts append)."""
    out = []
    for line in (stack.data_dir / "logs" / "sampler.log").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            out.append(record)
    return out


@pytest.fixture(scope="module")
def tuned(vllm_stack):
    """A LoRA training client after one SFT step, and its tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(VLLM_MODEL)
    service = vllm_stack.service_client()
    tc = service.create_lora_training_client(base_model=VLLM_MODEL, rank=8, seed=3).result()
    step(tc, tokenizer, 0)
    return service, tc, tokenizer


def step(tc, tokenizer, i: int) -> None:
    ids = tokenizer.encode(f"Say the word: river {i} river river", add_special_tokens=False)
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})  # fmt: skip
    tc.forward_backward([datum], loss_fn="cross_entropy").result(timeout=120)
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result(timeout=120)


def forward_logprobs(tc, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The trainer's logprobs of `tokens` after `prompt` (cross_entropy forward)."""
    seq = prompt + tokens
    datum = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                        loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)})  # fmt: skip
    out = tc.forward([datum], loss_fn="cross_entropy").result(timeout=120)
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()[len(prompt) - 1:]


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_sdk_samples_match_the_trainers_forward(vllm_stack, tuned):
    service, tc, tokenizer = tuned
    sc = tc.save_weights_and_get_sampling_client(name="v1").result(timeout=120)
    prompt = prompt_ids(tokenizer, "Say the word: apple")
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=7, stop=[])
    out = sc.sample(types.ModelInput.from_ints(prompt), num_samples=3, sampling_params=params).result(timeout=300)
    assert len(out.sequences) == 3 and len({tuple(s.tokens) for s in out.sequences}) > 1
    for seq in out.sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        np.testing.assert_allclose(seq.logprobs, forward_logprobs(tc, prompt, list(seq.tokens)), rtol=0, atol=LOGPROB_ATOL)
    again = sc.sample(types.ModelInput.from_ints(prompt), num_samples=3, sampling_params=params).result(timeout=300)
    assert [s.tokens for s in again.sequences] == [s.tokens for s in out.sequences]  # seeded: the same draws
    # The sampler that served them is the vLLM one.
    [loaded] = sampler_events(vllm_stack, "sampler_loaded")[:1]
    assert loaded["backend"] == "vllm" and loaded["device"] == "cpu" and loaded["kv_cache_memory_bytes"] == 1 << 28


def test_base_model_samples_match_the_transformers_backend(vllm_stack, tuned, vllm_model):
    """The same prompt and tokens through the transformers backend (HfEngine, in this process)."""
    import asyncio

    from openrl.sampler.hf_engine import HfEngine
    from openrl.sampler.hf_model import TransformersSampler
    from factories import sample_spec

    service, _, tokenizer = tuned
    sc = service.create_sampling_client(base_model=VLLM_MODEL).result(timeout=60)
    prompt = prompt_ids(tokenizer, "Repeat after me: cloud river")
    out = sc.sample(types.ModelInput.from_ints(prompt), num_samples=2,
                    sampling_params=types.SamplingParams(max_tokens=10, temperature=0.7, seed=2, stop=[])).result(timeout=300)  # fmt: skip

    async def transformers_logprobs(tokens):
        engine = HfEngine(TransformersSampler(str(vllm_model), device="cpu"))
        try:
            spec = sample_spec(prompt=prompt + tokens, num_samples=1, max_tokens=1, prompt_logprobs=True, stop_at_eos=False)
            return (await engine.sample(spec)).prompt_logprobs[len(prompt):]
        finally:
            engine.close()

    for seq in out.sequences:
        untempered = asyncio.run(transformers_logprobs(list(seq.tokens)))
        # vLLM's sampled logprobs are at the sampling temperature; prompt logprobs at temperature 1.
        assert np.abs(np.asarray(seq.logprobs) - untempered).max() > 20 * LOGPROB_ATOL
    ids = list(out.sequences[0].tokens)
    vllm_prompt = sc.compute_logprobs(types.ModelInput.from_ints(prompt + ids)).result(timeout=300)
    np.testing.assert_allclose(np.asarray(vllm_prompt[len(prompt):], dtype=np.float64), asyncio.run(transformers_logprobs(ids)),
                               rtol=0, atol=LOGPROB_ATOL)  # fmt: skip


def test_weights_versions_load_and_evict_and_stay_exact(vllm_stack, tuned):
    """More versions than the sampler keeps: the oldest is evicted, and sampling it again loads it
    again; every version samples its own weights (its logprobs are its trainer forward's)."""
    _, tc, tokenizer = tuned
    prompt = prompt_ids(tokenizer, "Say the word: tiger")
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=1, stop=[])
    clients, references = [], []
    for version in range(MAX_ADAPTERS + 1):
        step(tc, tokenizer, 10 + version)
        sc = tc.save_weights_and_get_sampling_client(name=f"evict-{version}").result(timeout=120)
        seq = sc.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result(timeout=300).sequences[0]
        clients.append(sc)
        references.append((list(seq.tokens), np.asarray(seq.logprobs)))
    evicted = sampler_events(vllm_stack, "adapter_evicted")
    assert evicted, "no adapter was evicted with more versions than --max-adapters"
    first = clients[0]
    seq = first.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result(timeout=300).sequences[0]
    assert list(seq.tokens) == references[0][0]  # the first version again, reloaded: the same draw
    np.testing.assert_allclose(seq.logprobs, references[0][1], rtol=0, atol=LOGPROB_ATOL)
    # The versions differ (a wrong version would show), and each load was its own adapter.
    assert np.abs(references[0][1] - references[-1][1]).max() > 20 * LOGPROB_ATOL or references[0][0] != references[-1][0]
    loaded = sampler_events(vllm_stack, "adapter_loaded")
    assert len({r["lora_id"] for r in loaded}) == len(loaded) >= MAX_ADAPTERS + 2


def group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_kill_9_of_the_vllm_sampler_loses_no_request(vllm_stack, tuned):
    service, _, tokenizer = tuned
    sc = service.create_sampling_client(base_model=VLLM_MODEL).result(timeout=60)
    prompt = types.ModelInput.from_ints(prompt_ids(tokenizer, "Say the word: candle"))
    params = types.SamplingParams(max_tokens=32, temperature=1.0, stop=[])
    victim = vllm_stack.pid("sampler")
    futures = [sc.sample(prompt, num_samples=2, sampling_params=params) for _ in range(6)]
    time.sleep(1.0)  # some are being generated, some wait in the queue
    os.kill(victim, signal.SIGKILL)
    assert vllm_stack.wait_restarted("sampler", victim) != victim
    assert group_gone(victim, 15), "vLLM's engine-core processes outlived the killed sampler (openrl/supervisor.py)"
    results = [f.result(timeout=420) for f in futures]  # redelivered to the restarted sampler
    assert all(len(r.sequences) == 2 and all(len(s.tokens) == 32 for s in r.sequences) for r in results)
    after = sc.sample(prompt, num_samples=1, sampling_params=params).result(timeout=300)
    assert len(after.sequences[0].tokens) == 32
