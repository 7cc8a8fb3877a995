"""The vLLM backend itself (openrl/sampler/vllm_backend.py's VllmSampler) on a real vLLM engine.

Not collected by the main test run (its name does not match test_*.py): vLLM lives in its own
environment (scripts/vllm_env.sh), and tests/sampler/test_vllm_backend.py::test_vllm_engine
runs this module there, `$OPENRL_VLLM_PYTHON -m pytest tests/sampler/vllm_cases.py`, with
OPENRL_VLLM_TEST_MODEL set to the snapshot of the tiny head-64 model (tests/vllm_model.py).
One engine for the whole module (starting one takes ~20 s on CPU).

References: the model in plain torch (fp32, a full forward per sequence, no cache) and the
trainer's forward (openrl.trainer, fp32) for adapters. vLLM runs fp32 on CPU (bf16 on a GPU),
so its logprobs agree with them to float32 rounding of a different kernel order: LOGPROB_ATOL.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import AdamParams, ForwardBackward, LoraSpec
from openrl.sampler.sampling import SENTINEL_LOGPROB
from factories import datum, respec, sample_spec

# |vLLM - reference| per logprob, both fp32 on CPU. Measured: 5e-6 (docs/vllm.md); the bound
# leaves room for another CPU's kernels, and is far below what a wrong temperature, adapter
# or position moves (> 0.05 on this model, checked where it matters).
LOGPROB_ATOL = 5e-4
VLLM_BAD = [
    (dict(target_prompt_logprobs=np.zeros((4, 1), dtype=np.int64)), "target_prompt_logprobs"),
    (dict(prompt_alt_tokens_k=2), "prompt_alt_tokens_k"),
    (dict(temperature=0.005), "temperature"),
]


def assert_close(got, expected, atol: float = LOGPROB_ATOL):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64), rtol=0, atol=atol)


def ref_logits(model, tokens) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(tokens)])).logits[0].float()


def ref_logprobs(model, prompt, generated, temperature: float = 1.0) -> np.ndarray:
    seq = list(prompt) + list(generated)
    logp = (ref_logits(model, seq[:-1]) / temperature).log_softmax(-1)
    return logp[torch.arange(len(prompt) - 1, len(seq) - 1), torch.tensor(seq[len(prompt):])].numpy()


def trainer_logprobs(engine, model_id: str, prompt, generated) -> np.ndarray:
    seq = list(prompt) + list(generated)
    req = ForwardBackward(request_id="f", model_id=model_id, seq_id=2, loss_fn="cross_entropy", forward_only=True,
                          data=[datum(seq[:-1], seq[1:])])  # fmt: skip
    return engine.forward_backward(req).logprobs[0][len(prompt) - 1:]


def random_prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(10, 800, n).tolist()


@pytest.fixture(scope="module")
def model_path() -> str:
    path = os.environ.get("OPENRL_VLLM_TEST_MODEL")
    if not path:
        pytest.fail("OPENRL_VLLM_TEST_MODEL is not set: run this module through tests/sampler/test_vllm_backend.py")
    return path


KILLED_OWNER = """
import sys
from openrl.sampler import private_dirs
for prefix, parent in ((sys.argv[1], None), (sys.argv[2], sys.argv[3])):
    path, lock = private_dirs.make(prefix, parent)
    (path / "lora-7").mkdir()
    print(path, flush=True)
sys.stdin.read()
"""


KILLED_DIRS: list[Path] = []  # what the fixture's killed sampler left


def killed_samplers_dirs(adapter_dir: Path) -> list[Path]:
    """The socket and adapter directories of a process that made them as a sampler does and was
    killed with SIGKILL (it could not remove them)."""
    import signal
    import subprocess
    import sys

    from openrl.sampler.vllm_backend import ADAPTERS_PREFIX, RPC_PREFIX

    proc = subprocess.Popen([sys.executable, "-c", KILLED_OWNER, RPC_PREFIX, ADAPTERS_PREFIX, str(adapter_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    dirs = [Path(proc.stdout.readline().strip()) for _ in range(2)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert all(d.is_dir() for d in dirs)
    return dirs


@pytest.fixture(scope="module")
async def vllm_sampler(model_path, tmp_path_factory):
    from openrl.sampler.vllm_backend import VllmSampler

    adapter_dir = tmp_path_factory.mktemp("vllm-adapters")
    KILLED_DIRS.extend(killed_samplers_dirs(adapter_dir))
    s = VllmSampler(model_path, max_loras=2, max_lora_rank=16, max_adapters=2, max_model_len=256, enforce_eager=True,
                    kv_cache_memory_bytes=256 << 20, adapter_dir=str(adapter_dir))  # fmt: skip
    yield s
    rpc = s._rpc_dir
    s.close()
    assert rpc is not None and not rpc.exists(), "close() leaves vLLM's socket directory behind"


async def test_engine_sockets_live_in_a_private_directory(vllm_sampler):
    """vLLM's IPC sockets go into the sampler's own directory (removed by close, checked in the
    fixture's teardown), not loose into the system temp dir."""
    import stat
    import tempfile

    rpc = vllm_sampler._rpc_dir
    assert rpc is not None and rpc.parent == Path(tempfile.gettempdir()) and rpc.name.startswith("openrl-vllm-rpc-")
    assert stat.S_IMODE(rpc.stat().st_mode) == 0o700
    sockets = [p for p in rpc.iterdir() if stat.S_ISSOCK(p.stat().st_mode)]
    assert sockets, f"no vLLM socket in {rpc}: {list(rpc.iterdir())}"
    assert "VLLM_RPC_BASE_PATH" not in os.environ  # put back as it was once the engine started


async def test_a_killed_samplers_directories_are_removed_when_the_next_one_starts(vllm_sampler):
    assert KILLED_DIRS and not any(d.exists() for d in KILLED_DIRS), KILLED_DIRS
    assert vllm_sampler._dir.is_dir() and vllm_sampler._rpc_dir.is_dir()  # its own, made after the sweep


@pytest.fixture(scope="module")
def ref(model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def trainer(model_path):
    """Tenants: "attn" and "attn2" (rank 8, attention and MLP, two different trainings: two weights
    versions), "unembed" (rank 8, lm_head too), "big" (rank 32: above the sampler's 16)."""
    from openrl.trainer.engine import LoraEngine

    engine = LoraEngine(model_path, device="cpu")
    rng = np.random.default_rng(0)
    vocab = engine.info.vocab_size
    for model_id, lora, steps in (
        ("attn", LoraSpec(rank=8, seed=1, train_unembed=False), 3),
        ("attn2", LoraSpec(rank=8, seed=1, train_unembed=False), 6),
        ("unembed", LoraSpec(rank=8, seed=2), 3),
        ("big", LoraSpec(rank=32, seed=3, train_unembed=False), 1),
    ):
        engine.create(model_id, lora)
        data = [datum(rng.integers(0, vocab, 12), rng.integers(0, vocab, 12)) for _ in range(2)]
        for _ in range(steps):
            engine.forward_backward(ForwardBackward(request_id="r", model_id=model_id, seq_id=1, loss_fn="cross_entropy", data=data))
            engine.optim_step(model_id, AdamParams(learning_rate=0.05))
    return engine


def blob(trainer, model_id: str) -> bytes:
    from openrl.trainer.weights import adapter_bytes

    return adapter_bytes(trainer, model_id)


async def test_engine_runs_on_this_platform(vllm_sampler):
    import vllm

    assert vllm.__version__.startswith("0.32")
    assert vllm_sampler.info.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert vllm_sampler.info.max_context == 256 and not vllm_sampler.dead


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_sampled_logprobs_are_the_tempered_forward(vllm_sampler, ref, temperature):
    p = random_prompt(1, 10)
    r = await vllm_sampler.sample(sample_spec(prompt=p, num_samples=3, max_tokens=12, temperature=temperature, seed=5, stop_at_eos=False))
    assert len(r.sequences) == 3
    for seq in r.sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        expected = ref_logprobs(ref, p, seq.tokens, temperature)
        assert_close(seq.logprobs, expected)
        if temperature != 1.0:  # the check can tell tempered from untempered logprobs
            assert np.abs(ref_logprobs(ref, p, seq.tokens, 1.0) - expected).max() > 20 * LOGPROB_ATOL
    if temperature == 1.0:
        assert len({tuple(s.tokens) for s in r.sequences}) == 3  # each row its own stream


async def test_greedy_follows_the_argmax(vllm_sampler, ref):
    p = random_prompt(11, 8)
    r = await vllm_sampler.sample(sample_spec(prompt=p, num_samples=2, max_tokens=10, temperature=0.0, stop_at_eos=False))
    for seq in r.sequences:
        logits = ref_logits(ref, p + seq.tokens.tolist()[:-1])[len(p) - 1:]
        top2 = logits.topk(2).values
        for t, (row, (first, second)) in enumerate(zip(logits, top2.tolist(), strict=True)):
            if first - second > 1e-3:  # not a near-tie
                assert seq.tokens[t] == int(row.argmax()), t
        assert_close(seq.logprobs, ref_logprobs(ref, p, seq.tokens, 1.0))  # greedy logprobs: temperature 1
    assert r.sequences[0].tokens.tolist() == r.sequences[1].tokens.tolist()


async def test_seeds_are_reproducible(vllm_sampler):
    p = random_prompt(2, 8)
    spec = sample_spec(prompt=p, num_samples=2, max_tokens=20, seed=123, stop_at_eos=False)
    first, again = await vllm_sampler.sample(spec), await vllm_sampler.sample(spec)
    for a, b in zip(first.sequences, again.sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    other = await vllm_sampler.sample(respec(spec, seed=124))
    assert other.sequences[0].tokens.tolist() != first.sequences[0].tokens.tolist()
    unseeded = respec(spec, seed=None, num_samples=1)
    x, y = await vllm_sampler.sample(unseeded), await vllm_sampler.sample(unseeded)
    assert x.sequences[0].tokens.tolist() != y.sequences[0].tokens.tolist()


async def test_stop_token_ids_eos_and_length(vllm_sampler):
    p = random_prompt(3, 6)
    full = (await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=12, temperature=0, stop_at_eos=False))).sequences[0].tokens.tolist()
    i = next(i for i in range(2, 12) if full[i] not in full[:i])

    async def greedy(**kw):
        [seq] = (await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, temperature=0, **kw))).sequences
        return seq.tokens.tolist(), seq.stop_reason

    assert await greedy(max_tokens=12, stop_token_ids=[full[i]], stop_at_eos=False) == (full[: i + 1], "stop")
    assert await greedy(max_tokens=i, stop_at_eos=False) == (full[:i], "length")
    assert await greedy(max_tokens=i + 1, stop_token_ids=[full[i]], stop_at_eos=False) == (full[: i + 1], "stop")  # on the last allowed token
    # EOS: a prompt after which greedy decoding meets one of the model's EOS ids stops there, unless stop=[].
    eos = set(vllm_sampler.info.eos_token_ids)
    assert eos, "the model has EOS ids"
    hits = [j for j, t in enumerate(full) if t in eos]
    if hits:  # this random model may never emit EOS greedily: then the stop-token path above covers it
        assert await greedy(max_tokens=12, stop_at_eos=True) == (full[: hits[0] + 1], "stop")


async def test_stop_strings(vllm_sampler):
    tok, p = vllm_sampler.tokenizer, random_prompt(12, 6)
    [run_on] = (await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=20, temperature=0, stop_at_eos=False))).sequences
    text = tok.decode(run_on.tokens.tolist(), skip_special_tokens=False)
    stop = text[4:9]
    cut = next(i for i in range(1, 21) if stop in tok.decode(run_on.tokens[:i].tolist(), skip_special_tokens=False))
    spec = sample_spec(prompt=p, num_samples=1, max_tokens=20, temperature=0, stop_strings=["zzzq", stop], stop_at_eos=False)
    [cut_seq] = (await vllm_sampler.sample(spec)).sequences
    assert cut_seq.tokens.tolist() == run_on.tokens[:cut].tolist() and cut_seq.stop_reason == "stop"


async def test_prompt_and_topk_logprobs(vllm_sampler, ref):
    p = random_prompt(4, 9)
    spec = sample_spec(prompt=p, num_samples=2, max_tokens=4, temperature=0.8, seed=2, stop_at_eos=False,
                      prompt_logprobs=True, topk_prompt_logprobs=4, topk_sample_logprobs=3)  # fmt: skip
    r = await vllm_sampler.sample(spec)
    logp = ref_logits(ref, p).log_softmax(-1)[:-1]  # row i predicts p[i + 1], temperature 1
    assert r.prompt_logprobs.shape == (9,) and np.isnan(r.prompt_logprobs[0])
    assert_close(r.prompt_logprobs[1:], logp[torch.arange(8), torch.tensor(p[1:])].numpy())
    assert r.topk_prompt_tokens.shape == (9, 4) and (r.topk_prompt_logprobs[0] == SENTINEL_LOGPROB).all()
    assert_close(r.topk_prompt_logprobs[1:], logp.topk(4).values.numpy())
    assert_close(r.topk_prompt_logprobs[1:], logp.gather(1, torch.from_numpy(r.topk_prompt_tokens[1:])).numpy())
    for seq in r.sequences:
        tempered = (ref_logits(ref, p + seq.tokens.tolist()[:-1])[len(p) - 1:] / 0.8).log_softmax(-1)
        assert seq.topk_tokens.shape == (4, 3)
        assert_close(seq.topk_logprobs, tempered.topk(3).values.numpy())
        assert_close(seq.topk_logprobs, tempered.gather(1, torch.from_numpy(seq.topk_tokens)).numpy())
    r = await vllm_sampler.sample(respec(spec, prompt_logprobs_last_n=3))
    assert np.isnan(r.prompt_logprobs[:6]).all() and not np.isnan(r.prompt_logprobs[6:]).any()
    assert (r.topk_prompt_logprobs[:6] == SENTINEL_LOGPROB).all() and (r.topk_prompt_logprobs[6:] > SENTINEL_LOGPROB).all()


async def test_top_k_samples_only_the_top_k(vllm_sampler, ref):
    """Never a token outside the top k; the logprobs are vLLM's processed ones: the tempered
    distribution renormalised over the top k (the transformers backend reports them before truncation)."""
    p = random_prompt(5, 6)
    temperature, k = 1.3, 3
    r = await vllm_sampler.sample(sample_spec(prompt=p, num_samples=8, max_tokens=3, temperature=temperature, top_k=k, seed=0, stop_at_eos=False))
    for seq in r.sequences:
        scaled = ref_logits(ref, p + seq.tokens.tolist()[:-1])[len(p) - 1:] / temperature
        for t, (row, token) in enumerate(zip(scaled, seq.tokens.tolist(), strict=True)):
            values, tokens = row.topk(k + 1)
            assert float(row[token]) >= float(values[k - 1]) - 1e-4, (t, token)
            if float(values[k - 1]) - float(values[k]) > 1e-3:  # an unambiguous top-k set
                truncated = row[tokens[:k]].log_softmax(-1)
                assert abs(seq.logprobs[t] - float(truncated[tokens[:k].tolist().index(token)])) < LOGPROB_ATOL


async def test_lora_adapters_match_the_trainer(vllm_sampler, trainer, ref):
    p = random_prompt(6, 7)
    key = "adapters/attn/seq-1"
    spec = sample_spec(prompt=p, num_samples=2, max_tokens=10, seed=9, stop_at_eos=False, adapter=key)
    tuned, plain = await asyncio.gather(vllm_sampler.sample(spec, blob(trainer, "attn")),
                                        vllm_sampler.sample(respec(spec, adapter=None)))  # one batch, mixed  # fmt: skip
    assert vllm_sampler.has_adapter(key)
    for seq in tuned.sequences:
        expected = trainer_logprobs(trainer, "attn", p, seq.tokens)
        assert_close(seq.logprobs, expected)
        assert np.abs(ref_logprobs(ref, p, seq.tokens) - expected).max() > 20 * LOGPROB_ATOL  # the adapter matters
    for seq in plain.sequences:
        assert_close(seq.logprobs, ref_logprobs(ref, p, seq.tokens))
    again = await vllm_sampler.sample(spec)  # loaded: no blob needed
    assert_close(again.sequences[0].logprobs, trainer_logprobs(trainer, "attn", p, again.sequences[0].tokens))


async def test_each_weights_version_is_its_own_adapter(vllm_sampler, trainer):
    """Two versions of one model (seq-1, seq-2) on the same prompt, one after the other: each is
    its own adapter (name and id), and the second is not served the first's prefix-cached KV."""
    p = random_prompt(13, 40)  # long enough to fill prefix-cache blocks
    one, two = "adapters/versioned/seq-1", "adapters/versioned/seq-2"
    spec = sample_spec(prompt=p, num_samples=1, max_tokens=6, seed=4, stop_at_eos=False, prompt_logprobs=True)
    first = await vllm_sampler.sample(respec(spec, adapter=one), blob(trainer, "attn"))
    second = await vllm_sampler.sample(respec(spec, adapter=two), blob(trainer, "attn2"))
    a, b = vllm_sampler._loras[one].request, vllm_sampler._loras[two].request
    assert a.lora_name != b.lora_name and a.lora_int_id != b.lora_int_id
    assert a.lora_name.startswith(one + "#") and b.lora_name.startswith(two + "#")
    for result, model_id in ((first, "attn"), (second, "attn2")):
        seq = result.sequences[0]
        assert_close(seq.logprobs, trainer_logprobs(trainer, model_id, p, seq.tokens))
        prompt_ref = trainer_logprobs(trainer, model_id, p[:1], p[1:])
        assert_close(result.prompt_logprobs[1:], prompt_ref)
    assert np.abs(first.prompt_logprobs[1:] - second.prompt_logprobs[1:]).max() > 20 * LOGPROB_ATOL  # the versions differ


async def test_adapter_lru_evicts_engine_and_folder(vllm_sampler, trainer):
    data = blob(trainer, "attn")
    spec = sample_spec(prompt=random_prompt(7, 5), num_samples=1, max_tokens=2, seed=1)
    ids = []
    for key in ("lru/a", "lru/b", "lru/c"):  # max_adapters=2
        await vllm_sampler.sample(respec(spec, adapter=key), data)
        ids.append(vllm_sampler._loras[key].request.lora_int_id)
    assert vllm_sampler.adapter_keys()[-2:] == ["lru/b", "lru/c"] and not vllm_sampler.has_adapter("lru/a")
    await asyncio.gather(*list(vllm_sampler._removing))
    assert len(list(vllm_sampler._dir.glob("lora-*"))) == 2  # the evicted adapter's folder is gone
    assert ids[0] not in await vllm_sampler.engine.list_loras()  # and vLLM dropped it
    with pytest.raises(NotFound):
        await vllm_sampler.sample(respec(spec, adapter="lru/a"))
    await vllm_sampler.sample(respec(spec, adapter="lru/a"), data)  # loads again, under a fresh id
    assert vllm_sampler._loras["lru/a"].request.lora_int_id not in ids


async def test_lm_head_adapter_matches_the_trainer(vllm_sampler, trainer):
    """vLLM 0.32's Qwen3 takes a LoRA on lm_head (train_unembed=True, the SDK's default)."""
    p = random_prompt(8, 6)
    spec = sample_spec(prompt=p, num_samples=1, max_tokens=6, seed=2, stop_at_eos=False, adapter="adapters/unembed/seq-1")
    r = await vllm_sampler.sample(spec, blob(trainer, "unembed"))
    assert_close(r.sequences[0].logprobs, trainer_logprobs(trainer, "unembed", p, r.sequences[0].tokens))


async def test_refuses_what_it_cannot_do_and_keeps_serving(vllm_sampler, trainer):
    p = random_prompt(9, 5)
    for bad, field in VLLM_BAD:
        with pytest.raises(InvalidRequest, match=field):
            await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=2, **bad))
    with pytest.raises(InvalidRequest, match="max_tokens|context"):  # past max_model_len 256
        await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=300))
    with pytest.raises(InvalidRequest, match="rank"):  # 32 > --max-lora-rank 16
        await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=2, adapter="big"), blob(trainer, "big"))
    assert not vllm_sampler.has_adapter("big")
    # An adapter vLLM itself refuses (its config names a module the model does not have):
    # a user error with vLLM's reason; nothing is left behind, and the engine carries on.
    from safetensors.torch import load, save

    state = load(blob(trainer, "attn"))
    renamed = {k.replace("q_proj", "no_such_proj"): v for k, v in state.items()}
    before = set(vllm_sampler._dir.iterdir())
    with pytest.raises(InvalidRequest, match="cannot load adapter"):
        await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=2, adapter="broken"), save(renamed))
    assert not vllm_sampler.has_adapter("broken") and set(vllm_sampler._dir.iterdir()) == before
    ok = await vllm_sampler.sample(sample_spec(prompt=p, num_samples=1, max_tokens=2))
    assert len(ok.sequences[0].tokens) >= 1 and not vllm_sampler.dead


async def test_a_cancelled_sample_is_aborted_in_the_engine(vllm_sampler):
    """Cancelling `sample` (the sampler service does when the request's client left) aborts its
    vLLM requests: the engine holds none of them soon after, and serves on."""
    spec = sample_spec(prompt=random_prompt(8, 8), num_samples=4, max_tokens=240, temperature=1.0, seed=1, stop_at_eos=False)
    processor = vllm_sampler.engine.output_processor
    task = asyncio.create_task(vllm_sampler.sample(spec))
    while processor.get_num_unfinished_requests() < 4:
        assert not task.done(), "finished before it could be cancelled"
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):  # 5 s
        if processor.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)
    assert processor.get_num_unfinished_requests() == 0
    short = respec(spec, max_tokens=5)
    result = await vllm_sampler.sample(short)
    assert [len(s.tokens) for s in result.sequences] == [5] * 4


async def test_requests_go_to_the_engine_in_fair_order_between_keys(vllm_sampler):
    """The engine schedules by priority, and a key's second request goes in behind a small key's
    that arrived after it (FairPriorities); every row is what the same seed gives alone."""
    assert vllm_sampler.engine.vllm_config.scheduler_config.policy == "priority"
    p = random_prompt(9, 6)
    specs = {f"h{i}": sample_spec(prompt=p, num_samples=8, max_tokens=6, temperature=1.0, seed=i, stop_at_eos=False, owner="hostile")
             for i in range(2)}  # fmt: skip
    specs["small"] = sample_spec(prompt=p, num_samples=1, max_tokens=6, temperature=1.0, seed=7, stop_at_eos=False, owner="small")
    alone = {name: await vllm_sampler.sample(respec(spec, owner="alone")) for name, spec in specs.items()}
    priorities: dict[str, set[int]] = {}
    current = contextvars.ContextVar("current")  # which of specs a vLLM request is a row of
    generate = vllm_sampler.engine.generate

    def recording(*args, priority=0, **kwargs):
        priorities.setdefault(current.get(), set()).add(priority)
        return generate(*args, priority=priority, **kwargs)

    async def sample(name):
        current.set(name)
        return await vllm_sampler.sample(specs[name])

    vllm_sampler.engine.generate = recording
    try:
        tasks = {}
        for name in specs:  # submitted in this order: h0, h1, small
            tasks[name] = asyncio.create_task(sample(name))
            await asyncio.sleep(0)
        results = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    finally:
        del vllm_sampler.engine.generate
    [h0], [h1], [small] = priorities["h0"], priorities["h1"], priorities["small"]
    assert h0 <= small < h1, priorities  # first come first served: h1 before small
    for name, result in results.items():
        assert [s.tokens.tolist() for s in result.sequences] == [s.tokens.tolist() for s in alone[name].sequences], name


async def test_a_keys_rows_in_the_engine_stay_within_its_share(vllm_sampler):
    """RowShare on the real engine, at a small cap: a key alone never has more than cap - reserve
    rows in vLLM, two keys at once never more than their share each, and every request still
    completes with every row, as the same seeds give alone."""
    from openrl.sampler.vllm_backend import RowShare

    p = random_prompt(11, 5)
    specs = {"a": sample_spec(prompt=p, num_samples=7, max_tokens=5, temperature=1.0, seed=3, stop_at_eos=False, owner="a"),
             "b": sample_spec(prompt=p, num_samples=3, max_tokens=5, temperature=1.0, seed=4, stop_at_eos=False, owner="b")}  # fmt: skip
    alone = {k: await vllm_sampler.sample(respec(spec, owner="alone")) for k, spec in specs.items()}
    most: dict[str, int] = {}
    share = RowShare(4, min_share=2, reserve=1)  # a key alone: 3 rows; two keys: 2 each
    enter = share.enter

    def recording(owner):
        enter(owner)
        most[owner] = max(most.get(owner, 0), share.inside[owner])

    share.enter = recording
    real, vllm_sampler._rows = vllm_sampler._rows, share
    try:
        solo = await vllm_sampler.sample(specs["a"])
        assert most == {"a": 3}
        most.clear()
        both = dict(zip(specs, await asyncio.gather(*(vllm_sampler.sample(s) for s in specs.values())), strict=True))
    finally:
        vllm_sampler._rows = real
    assert most["b"] <= 2 and most["a"] <= 3, most
    assert not share.inside and not share.waiting
    for name, result in [("a", solo), *both.items()]:
        assert [s.tokens.tolist() for s in result.sequences] == [s.tokens.tolist() for s in alone[name].sequences], name
