"""TransformersSampler against plain-torch references.

The references run full forwards without a KV cache, one sequence at a time, on an
independent copy of the model (the sampler's copy is wrapped by peft once an adapter is
loaded), and the trainer's own forward for adapters. Tiny random Qwen3s are built in the
test; stop strings and EOS use the default model (built once in the test HF cache).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import AdamParams, ForwardBackward, LoraSpec
from openrl.sampler.hf_model import TransformersSampler
from openrl.sampler.spec import MAX_NUM_SAMPLES, MAX_TOPK, SampleSpec
from openrl.sampler.sampling import SENTINEL_LOGPROB, draw, filter_top_k_top_p
from openrl.trainer.engine import LORA_ALPHA, LoraEngine
from factories import datum, sample_spec

VOCAB = 96
EOS = 3
CONTEXT = 64
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and OpenMP threads on busy shared cores spin:
    one thread keeps this file fast whatever else runs on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
        initializer_range=0.5,  # peaky, varied next-token distributions: greedy runs are not constant
        eos_token_id=EOS,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=[EOS])
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ref_model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_path):
    """Two trained tenants: "m1" (rank 4, every target) and "m2" (rank 8, attention only)."""
    engine = LoraEngine(tiny_path, device="cpu")
    rng = np.random.default_rng(0)
    for model_id, lora in (
        ("m1", LoraSpec(rank=4, seed=1)),
        ("m2", LoraSpec(rank=8, seed=2, train_mlp=False, train_unembed=False)),
    ):
        engine.create(model_id, lora)
        data = [datum(rng.integers(0, VOCAB, 12), rng.integers(0, VOCAB, 12)) for _ in range(2)]
        engine.forward_backward(
            ForwardBackward(request_id="r", model_id=model_id, seq_id=1, loss_fn="cross_entropy", data=data)
        )
        engine.optim_step(model_id, AdamParams(learning_rate=0.05))  # B moves away from zero
    return engine


@pytest.fixture(scope="module")
def sampler(tiny_path, engine):
    sampler = TransformersSampler(tiny_path, device="cpu")
    for model_id in ("m1", "m2"):
        load_from_engine(sampler, engine, model_id)
    return sampler


def load_from_engine(sampler: TransformersSampler, engine: LoraEngine, model_id: str, key: str | None = None) -> None:
    state = engine.adapter_state(model_id)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    sampler.load_adapter(key or model_id, state, rank=rank, alpha=LORA_ALPHA, target_modules=targets)


# ---------------------------------------------------------------------- references


def ref_logits(model, tokens) -> torch.Tensor:
    """Full forward, no cache: fp32 logits [len(tokens), V]."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(tokens)])).logits[0].float()


def ref_logprobs(model, prompt, generated, temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / T) of each generated token, from one forward over prompt + generated."""
    seq = list(prompt) + list(generated)
    logp = (ref_logits(model, seq[:-1]) / temperature).log_softmax(-1)
    rows = torch.arange(len(prompt) - 1, len(seq) - 1)
    return logp[rows, torch.tensor(seq[len(prompt) :])].numpy()


def ref_greedy(model, prompt, n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(ref_logits(model, seq)[-1].argmax()))
    return seq[len(prompt) :]


def trainer_logprobs(engine: LoraEngine, model_id: str, prompt, generated) -> np.ndarray:
    seq = list(prompt) + list(generated)
    req = ForwardBackward(
        request_id="f",
        model_id=model_id,
        seq_id=2,
        loss_fn="cross_entropy",
        forward_only=True,
        data=[datum(seq[:-1], seq[1:])],
    )
    return engine.forward_backward(req).logprobs[0][len(prompt) - 1 :]


def prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, VOCAB, n).tolist() for n in lengths]


def one(sampler: TransformersSampler, spec: SampleSpec):
    [result] = sampler.sample([spec])
    assert not isinstance(result, Exception), result
    return result


# ---------------------------------------------------------------------- generation vs references


def test_greedy_batch_matches_step_by_step_argmax(sampler, ref_model):
    ps = prompts(1, (3, 9, 1, 6))
    specs = [sample_spec(prompt=p, num_samples=1, max_tokens=8, temperature=0.0, stop_at_eos=False) for p in ps]
    results = sampler.sample(specs)
    distinct = set()
    for p, r in zip(ps, results, strict=True):
        [seq] = r.sequences
        expected = ref_greedy(ref_model, p, 8)
        assert seq.tokens.tolist() == expected
        assert seq.tokens.dtype == np.int32 and seq.logprobs.dtype == np.float32
        assert seq.stop_reason == "length"
        # Greedy logprobs are at temperature 1.
        np.testing.assert_allclose(seq.logprobs, ref_logprobs(ref_model, p, expected), **TOL)
        distinct.update(expected)
    assert len(distinct) > 4  # not a degenerate model that repeats one token


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_the_tempered_full_forward(sampler, ref_model, temperature):
    ps = prompts(2, (4, 10))
    specs = [
        sample_spec(prompt=p, num_samples=3, max_tokens=12, temperature=temperature, seed=5, stop_at_eos=False)
        for p in ps
    ]
    for p, r in zip(ps, sampler.sample(specs), strict=True):
        assert len(r.sequences) == 3
        for seq in r.sequences:
            assert len(seq.tokens) == 12
            np.testing.assert_allclose(seq.logprobs, ref_logprobs(ref_model, p, seq.tokens, temperature), **TOL)
        assert len({tuple(s.tokens) for s in r.sequences}) == 3  # each sample has its own stream


def test_topk_sample_logprobs(sampler, ref_model):
    p = prompts(3, (5,))[0]
    r = one(
        sampler, sample_spec(prompt=p, num_samples=2, max_tokens=4, seed=1, topk_sample_logprobs=3, stop_at_eos=False)
    )
    for seq in r.sequences:
        assert seq.topk_tokens.shape == (4, 3) and seq.topk_logprobs.shape == (4, 3)
        logits = ref_logits(ref_model, p + seq.tokens.tolist()[:-1])[len(p) - 1 :]
        top = logits.log_softmax(-1).topk(3)
        np.testing.assert_array_equal(seq.topk_tokens, top.indices.numpy())
        np.testing.assert_allclose(seq.topk_logprobs, top.values.numpy(), **TOL)


def test_prompt_logprobs_topk_and_targets(sampler, ref_model):
    p = prompts(4, (9,))[0]
    targets = np.array([[5, -1], [7, 8]] * 4, dtype=np.int64)
    spec = sample_spec(
        prompt=p,
        num_samples=1,
        max_tokens=1,
        prompt_logprobs=True,
        topk_prompt_logprobs=4,
        target_prompt_logprobs=targets,
    )
    r = one(sampler, spec)
    logp = ref_logits(ref_model, p).log_softmax(-1)[:-1]  # row i predicts p[i + 1]
    assert r.prompt_logprobs.shape == (9,) and np.isnan(r.prompt_logprobs[0])
    np.testing.assert_allclose(r.prompt_logprobs[1:], logp[torch.arange(8), torch.tensor(p[1:])].numpy(), **TOL)
    assert r.topk_prompt_tokens.shape == (9, 4)
    assert (r.topk_prompt_tokens[0] == 0).all() and (r.topk_prompt_logprobs[0] == SENTINEL_LOGPROB).all()
    top = logp.topk(4)
    np.testing.assert_array_equal(r.topk_prompt_tokens[1:], top.indices.numpy())
    np.testing.assert_allclose(r.topk_prompt_logprobs[1:], top.values.numpy(), **TOL)
    expected = np.where(targets >= 0, logp.gather(1, torch.from_numpy(targets).clamp(min=0)).numpy(), 0.0)
    np.testing.assert_allclose(r.target_prompt_logprobs, expected, **TOL)
    assert r.target_prompt_logprobs.dtype == np.float32

    # last_n: every entry before the last N is NaN (the SDK raises otherwise); top-k rows are sentinels.
    r = one(
        sampler,
        sample_spec(
            prompt=p,
            num_samples=1,
            max_tokens=1,
            prompt_logprobs=True,
            topk_prompt_logprobs=2,
            prompt_logprobs_last_n=3,
        ),
    )
    assert np.isnan(r.prompt_logprobs[:6]).all()
    np.testing.assert_allclose(r.prompt_logprobs[6:], logp[torch.arange(5, 8), torch.tensor(p[6:])].numpy(), **TOL)
    assert (r.topk_prompt_logprobs[:6] == SENTINEL_LOGPROB).all() and (
        r.topk_prompt_logprobs[6:] > SENTINEL_LOGPROB
    ).all()


def test_prompt_alt_tokens(sampler, ref_model):
    p = prompts(5, (7,))[0]
    spec = sample_spec(prompt=p, num_samples=1, max_tokens=1, temperature=0.8, seed=3, prompt_alt_tokens_k=5)
    r = one(sampler, spec)
    assert r.prompt_alt_tokens.shape == (6, 5) and r.prompt_alt_tokens.dtype == np.int64
    tempered = (ref_logits(ref_model, p)[:-1] / 0.8).log_softmax(-1)
    expected = tempered.gather(1, torch.from_numpy(r.prompt_alt_tokens)).numpy()
    np.testing.assert_allclose(r.prompt_alt_logprobs, expected, **TOL)
    assert len(np.unique(r.prompt_alt_tokens)) > 6  # draws, not a copy of the argmax
    np.testing.assert_array_equal(one(sampler, spec).prompt_alt_tokens, r.prompt_alt_tokens)  # seeded
    greedy = one(sampler, sample_spec(prompt=p, num_samples=1, max_tokens=1, temperature=0.0, prompt_alt_tokens_k=2))
    argmax = ref_logits(ref_model, p)[:-1].argmax(-1).numpy()
    np.testing.assert_array_equal(greedy.prompt_alt_tokens, np.stack([argmax, argmax], 1))


# ---------------------------------------------------------------------- adapters and batching


@pytest.mark.parametrize("model_id", ["m1", "m2"])
def test_adapter_logprobs_match_the_trainer(sampler, engine, ref_model, model_id):
    p = prompts(6, (6,))[0]
    r = one(sampler, sample_spec(prompt=p, num_samples=2, max_tokens=10, seed=9, adapter=model_id, stop_at_eos=False))
    for seq in r.sequences:
        expected = trainer_logprobs(engine, model_id, p, seq.tokens)
        np.testing.assert_allclose(seq.logprobs, expected, **TOL)
        # The adapter matters: the base model scores these tokens differently.
        assert np.abs(ref_logprobs(ref_model, p, seq.tokens) - expected).max() > 1e-2


def test_mixed_batch_equals_each_request_alone(sampler):
    ps = prompts(7, (3, 8, 5, 11))
    specs = [
        sample_spec(prompt=ps[0], num_samples=2, max_tokens=7, seed=1),
        sample_spec(prompt=ps[1], num_samples=3, max_tokens=9, seed=2, adapter="m1", temperature=0.9),
        sample_spec(prompt=ps[2], num_samples=1, max_tokens=5, temperature=0.0, adapter="m2"),
        sample_spec(prompt=ps[3], num_samples=2, max_tokens=6, seed=4, adapter="m1", top_k=5, topk_sample_logprobs=2),
    ]
    batched = sampler.sample(specs)
    for spec, together in zip(specs, batched, strict=True):
        alone = one(sampler, spec)
        assert len(together.sequences) == spec.num_samples
        for a, b in zip(alone.sequences, together.sequences, strict=True):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_allclose(a.logprobs, b.logprobs, **TOL)
            assert a.stop_reason == b.stop_reason
            if spec.topk_sample_logprobs:
                np.testing.assert_array_equal(a.topk_tokens, b.topk_tokens)


def test_every_lora_form_samples_the_same(tiny_path, engine, sampler):
    """--lora-form grouped / dense (TransformersSampler's lora_form) only change how a mixed
    batch's LoRA terms are computed: the same tokens, logprobs within rounding, as auto."""
    ps = prompts(17, (4, 9, 6))
    specs = [
        sample_spec(prompt=ps[0], num_samples=3, max_tokens=8, seed=5, adapter="m1"),
        sample_spec(prompt=ps[1], num_samples=2, max_tokens=8, seed=6, adapter="m2"),
        sample_spec(prompt=ps[2], num_samples=2, max_tokens=8, seed=7),
    ]
    want = sampler.sample(specs)
    for form in ("grouped", "dense"):
        other = TransformersSampler(tiny_path, device="cpu", lora_form=form)
        for model_id in ("m1", "m2"):
            load_from_engine(other, engine, model_id)
        assert (other.slots.dense_max_tokens, other.slots.dense_segments) == ((0, False) if form == "grouped" else (1, None))
        assert other.slots.dense_max_work is None if form == "dense" else True
        for got, exp in zip(other.sample(specs), want, strict=True):
            for a, b in zip(got.sequences, exp.sequences, strict=True):
                np.testing.assert_array_equal(a.tokens, b.tokens)
                np.testing.assert_allclose(a.logprobs, b.logprobs, **TOL)
    with pytest.raises(ValueError, match="lora_form"):
        TransformersSampler(tiny_path, device="cpu", lora_form="fast")


def test_seeded_sampling_is_reproducible_and_unseeded_is_not(sampler):
    p = prompts(8, (5,))[0]
    spec = sample_spec(prompt=p, num_samples=2, max_tokens=20, seed=123, stop_at_eos=False)
    first = one(sampler, spec)
    others = [sample_spec(prompt=q, num_samples=3, max_tokens=11, adapter="m1") for q in prompts(9, (2, 13))]
    batched = sampler.sample([others[0], spec, others[1]])[1]
    for a, b in zip(first.sequences, batched.sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
    reseeded = one(sampler, sample_spec(prompt=p, num_samples=2, max_tokens=20, seed=124, stop_at_eos=False))
    assert reseeded.sequences[0].tokens.tolist() != first.sequences[0].tokens.tolist()
    unseeded = sample_spec(prompt=p, num_samples=1, max_tokens=20, stop_at_eos=False)
    assert one(sampler, unseeded).sequences[0].tokens.tolist() != one(sampler, unseeded).sequences[0].tokens.tolist()


def test_stop_token_ids_and_length(sampler, ref_model):
    p = prompts(10, (4,))[0]
    full = ref_greedy(ref_model, p, 12)
    i = next(i for i in range(2, 12) if full[i] not in full[:i])  # first occurrence, not at the start
    r = one(
        sampler,
        sample_spec(prompt=p, num_samples=1, max_tokens=12, temperature=0, stop_token_ids=[full[i]], stop_at_eos=False),
    )
    assert r.sequences[0].tokens.tolist() == full[: i + 1] and r.sequences[0].stop_reason == "stop"
    r = one(sampler, sample_spec(prompt=p, num_samples=1, max_tokens=i, temperature=0, stop_at_eos=False))
    assert r.sequences[0].tokens.tolist() == full[:i] and r.sequences[0].stop_reason == "length"
    # The stop token on the last allowed step is still a stop.
    r = one(
        sampler,
        sample_spec(
            prompt=p, num_samples=1, max_tokens=i + 1, temperature=0, stop_token_ids=[full[i]], stop_at_eos=False
        ),
    )
    assert r.sequences[0].stop_reason == "stop"


def test_rows_stop_independently(sampler):
    """Rows that stop early leave the batch; the others carry on unchanged."""
    p = prompts(11, (5,))[0]
    long = sample_spec(prompt=p, num_samples=4, max_tokens=30, seed=8, stop_at_eos=False)
    stopping = sample_spec(
        prompt=p, num_samples=4, max_tokens=30, seed=8, stop_token_ids=list(range(4, 60)), stop_at_eos=False
    )
    a, b = sampler.sample([long, stopping])
    assert all(s.stop_reason == "length" and len(s.tokens) == 30 for s in a.sequences)
    for x, y in zip(a.sequences, b.sequences, strict=True):
        n = len(y.tokens)
        assert y.stop_reason == "stop" and n < 30
        np.testing.assert_array_equal(x.tokens[:n], y.tokens)
        np.testing.assert_allclose(x.logprobs[:n], y.logprobs, **TOL)


# ---------------------------------------------------------------------- top-k / top-p


def test_filter_top_k_top_p_known_sets():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()

    def allowed(k, p):
        kept = filter_top_k_top_p(logits, torch.tensor([k]), torch.tensor([p]))
        return set(torch.nonzero(kept[0] > float("-inf")).flatten().tolist())

    assert allowed(4, 1.0) == {0, 1, 2, 3}
    assert allowed(2, 1.0) == {1, 3}
    assert allowed(4, 0.7) == {1, 3}  # 0.5 + 0.3 reaches 0.7
    assert allowed(4, 0.8) == {1, 3}
    assert allowed(4, 0.81) == {1, 2, 3}
    assert allowed(4, 0.4) == {1}
    assert allowed(2, 0.62) == {1}  # top-k first: 0.5/0.8 = 0.625 reaches 0.62
    assert allowed(2, 0.63) == {1, 3}
    # Drawing never picks a removed token, and follows the kept distribution.
    kept = filter_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.8])).softmax(-1)
    tokens = draw(kept, torch.rand(1, 20000, generator=torch.Generator().manual_seed(0)))
    counts = np.bincount(tokens.flatten().numpy(), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0, 0.625, 0, 0.375], atol=0.02)
    assert draw(torch.tensor([[0.2, 0.8, 0.0, 0.0]]), torch.tensor([[0.9999999]])).item() == 1


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (-1, 0.3), (6, 0.5)])
def test_top_k_top_p_never_emit_a_filtered_token(sampler, ref_model, top_k, top_p):
    p = prompts(12, (6,))[0]
    temperature = 1.3
    spec = sample_spec(
        prompt=p,
        num_samples=24,
        max_tokens=3,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=0,
        stop_at_eos=False,
    )
    control = sample_spec(prompt=p, num_samples=24, max_tokens=3, temperature=temperature, seed=0, stop_at_eos=False)
    filtered, unfiltered = sampler.sample([spec, control])

    def outside(seq) -> int:
        logits = ref_logits(ref_model, p + seq.tokens.tolist()[:-1])[len(p) - 1 :] / temperature
        n = 0
        for row, token in zip(logits, seq.tokens.tolist(), strict=True):
            order = row.argsort(descending=True).tolist()
            keep = order[: top_k if top_k > 0 else VOCAB]
            probs = row[keep].softmax(-1).tolist()
            mass, nucleus = 0.0, []
            for t, q in zip(keep, probs, strict=True):
                if mass >= top_p:
                    break
                nucleus.append(t)
                mass += q
            n += token not in nucleus
        return n

    assert sum(outside(s) for s in filtered.sequences) == 0
    # Logprobs are the tempered distribution's, before truncation.
    for seq in filtered.sequences[:4]:
        np.testing.assert_allclose(seq.logprobs, ref_logprobs(ref_model, p, seq.tokens, temperature), **TOL)
    assert sum(outside(s) for s in unfiltered.sequences) > 0  # the check can see a filtered token


# ---------------------------------------------------------------------- default model: EOS and stop strings


@pytest.fixture(scope="module")
def default_sampler(default_model):
    return TransformersSampler(str(default_model), device="cpu")


def chat_prompt(sampler, word: str) -> list[int]:
    messages = [{"role": "user", "content": f"Say the word: {word}"}]
    return sampler.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_eos_stops_unless_disabled(default_sampler):
    tok = default_sampler.tokenizer
    assert tok.convert_tokens_to_ids("<|im_end|>") in default_sampler.info.eos_token_ids
    p = chat_prompt(default_sampler, "apple")
    r = one(default_sampler, sample_spec(prompt=p, num_samples=1, max_tokens=20, temperature=0))
    seq = r.sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens[-1] in default_sampler.info.eos_token_ids
    assert seq.tokens.tolist().count(seq.tokens[-1]) == 1
    r = one(default_sampler, sample_spec(prompt=p, num_samples=1, max_tokens=20, temperature=0, stop_at_eos=False))
    assert r.sequences[0].stop_reason == "length" and len(r.sequences[0].tokens) == 20
    assert r.sequences[0].tokens[: len(seq.tokens)].tolist() == seq.tokens.tolist()


def test_stop_strings(default_sampler):
    tok = default_sampler.tokenizer
    p = chat_prompt(default_sampler, "banana")
    full = one(
        default_sampler, sample_spec(prompt=p, num_samples=1, max_tokens=24, temperature=0, stop_at_eos=False)
    ).sequences[0]
    text = tok.decode(full.tokens.tolist(), skip_special_tokens=False)
    # A stop string that ends inside the text, spanning a token boundary where possible.
    stop = text[4:9]
    cut = next(
        i
        for i in range(len(full.tokens))
        if stop in tok.decode(full.tokens[: i + 1].tolist(), skip_special_tokens=False)
    )
    assert cut < len(full.tokens) - 1
    r = one(
        default_sampler,
        sample_spec(
            prompt=p, num_samples=1, max_tokens=24, temperature=0, stop_strings=["zzzq", stop], stop_at_eos=False
        ),
    )
    assert r.sequences[0].tokens.tolist() == full.tokens[: cut + 1].tolist()
    assert r.sequences[0].stop_reason == "stop"
    r = one(
        default_sampler,
        sample_spec(prompt=p, num_samples=1, max_tokens=24, temperature=0, stop_strings=["zzzq"], stop_at_eos=False),
    )
    assert r.sequences[0].tokens.tolist() == full.tokens.tolist() and r.sequences[0].stop_reason == "length"


# ---------------------------------------------------------------------- validation and adapters


def base(**kw) -> SampleSpec:
    return sample_spec(**{"prompt": [5, 6, 7], "num_samples": 1, "max_tokens": 4, **kw})


BAD = [
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=MAX_NUM_SAMPLES + 1), "num_samples"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(prompt=[]), "prompt"),
    (dict(max_tokens=CONTEXT - 2), "max_tokens"),
    (dict(prompt=[5, VOCAB]), "prompt"),
    (dict(prompt=[-1, 5]), "prompt"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(stop_token_ids=[VOCAB]), "stop"),
    (dict(adapter="nope"), "adapter"),
    (dict(target_prompt_logprobs=np.zeros((3, 2), dtype=np.int64)), "target_prompt_logprobs"),
    (dict(target_prompt_logprobs=np.zeros(2, dtype=np.int64)), "target_prompt_logprobs"),
    (dict(target_prompt_logprobs=np.full((2, 1), VOCAB)), "target_prompt_logprobs"),
    (dict(prompt_logprobs=True, prompt_logprobs_last_n=3), "prompt_logprobs_last_n"),
    (dict(prompt_logprobs_last_n=1), "prompt_logprobs_last_n"),
    (dict(topk_prompt_logprobs=MAX_TOPK + 1), "topk_prompt_logprobs"),
    (dict(topk_sample_logprobs=-1), "topk_sample_logprobs"),
    (dict(prompt_alt_tokens_k=MAX_TOPK + 1), "prompt_alt_tokens_k"),
]


@pytest.mark.parametrize("bad, field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_invalid_requests_name_the_field(sampler, bad, field):
    spec = base(**bad)
    with pytest.raises(InvalidRequest, match=field):
        sampler.validate(spec)
    good = base(temperature=0)
    results = sampler.sample([good, spec, good])
    assert isinstance(results[1], InvalidRequest) and field in str(results[1])
    assert results[0].sequences[0].tokens.tolist() == results[2].sequences[0].tokens.tolist()


def test_stop_strings_need_a_tokenizer(sampler):
    assert not sampler.info.has_tokenizer
    with pytest.raises(InvalidRequest, match="stop"):
        sampler.validate(base(stop_strings=["x"]))


def test_adapter_lru_replace_and_bad_states(tiny_path, engine):
    sampler = TransformersSampler(tiny_path, device="cpu", max_adapters=2)
    load_from_engine(sampler, engine, "m1", key="a")
    load_from_engine(sampler, engine, "m2", key="b")
    sampler.sample([base(adapter="a")])  # "a" is now the most recently used
    load_from_engine(sampler, engine, "m1", key="c")
    assert sampler.adapter_keys() == ["a", "c"] and not sampler.has_adapter("b")
    [result] = sampler.sample([base(adapter="b")])
    assert isinstance(result, NotFound)
    # Replacing a key serves the new weights.
    p = prompts(13, (5,))[0]
    before = one(
        sampler, sample_spec(prompt=p, num_samples=1, max_tokens=6, seed=1, adapter="a", stop_at_eos=False)
    ).sequences[0]
    load_from_engine(sampler, engine, "m2", key="a")
    after = one(
        sampler, sample_spec(prompt=p, num_samples=1, max_tokens=6, seed=1, adapter="a", stop_at_eos=False)
    ).sequences[0]
    np.testing.assert_allclose(after.logprobs, trainer_logprobs(engine, "m2", p, after.tokens), **TOL)
    assert not np.allclose(before.logprobs, after.logprobs)
    # Bad states are refused before anything changes.
    state = engine.adapter_state("m1")
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
    with pytest.raises(InvalidRequest, match="shape"):
        sampler.load_adapter("d", state, rank=5, alpha=LORA_ALPHA, target_modules=targets)
    with pytest.raises(InvalidRequest, match="missing"):
        sampler.load_adapter("d", engine.adapter_state("m2"), rank=8, alpha=LORA_ALPHA, target_modules=targets)
    with pytest.raises(InvalidRequest, match="target_modules"):
        sampler.load_adapter("d", state, rank=4, alpha=LORA_ALPHA, target_modules=["conv"])
    broken = {k: v.clone() for k, v in state.items()}
    next(iter(broken.values()))[0, 0] = float("nan")
    with pytest.raises(InvalidRequest, match="finite"):
        sampler.load_adapter("d", broken, rank=4, alpha=LORA_ALPHA, target_modules=targets)
    assert sampler.adapter_keys() == ["c", "a"]
