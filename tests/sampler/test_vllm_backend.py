"""The vLLM sampler backend (openrl/sampler/vllm_backend.py).

Without vLLM (CI, CPU machines) its pure parts run for real: request validation; our request as
vLLM sampling parameters; vLLM's outputs (built here from plain-torch references, laid out as
vLLM's logprobs processor lays them out: the actual token at its rank, then the top-k at ranks
1..k) as our results, checked against the transformers backend on the same tokens; the PEFT
folder vLLM loads, checked by loading it with peft; the sampler service awaiting an async
backend over a real NATS; the CLI's refusal when vLLM is missing.

The backend itself, on a real vLLM engine, runs in vLLM's own environment (scripts/vllm_env.sh,
OPENRL_VLLM_PYTHON): test_vllm_engine runs tests/sampler/vllm_cases.py there. Without that
environment it skips, unless OPENRL_VLLM_REQUIRED=1 (CI), where it fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from openrl.bus.errors import InvalidRequest
from openrl.sampler.spec import MAX_TOPK
from openrl.sampler.sampling import SENTINEL_LOGPROB, derive_seed
from openrl.sampler.vllm_backend import (
    Completion,
    FairPriorities,
    RowShare,
    adapter_files,
    first_stop_string,
    finish,
    sampling_kwargs,
    stop_ids,
    to_result,
    top,
    validate,
)
from factories import respec, sample_spec
from vllm_model import junit_counts, vllm_model, vllm_python  # noqa: F401  (fixtures)
from test_backend import (  # noqa: F401  (fixtures)
    BAD,
    TOL,
    base,
    chat_prompt,
    engine,
    one,
    one_thread,
    prompts,
    ref_logits,
    ref_logprobs,
    ref_model,
    sampler,
    tiny_path,
    trainer_logprobs,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


# ---------------------------------------------------------------------- what vLLM's outputs look like


def vllm_position(logp_V: torch.Tensor, token: int, k: int) -> dict[int, tuple[float, int]]:
    """One position as vLLM returns it (in plain types): the actual token with its rank (1 + how
    many tokens are more likely), then the k most likely at ranks 1..k (overwriting the actual
    token's entry when it is among them)."""
    logp = logp_V.float()
    position = {int(token): (float(logp[token]), int((logp > logp[token]).sum()) + 1)}
    if k:
        values, tokens = logp.topk(k)
        for rank, (t, v) in enumerate(zip(tokens.tolist(), values.tolist(), strict=True), start=1):
            position[t] = (v, rank)
    return position


def vllm_rows(model, prompt, generated: list[list[int]], temperature: float, k: int, finish_reason="length") -> list[Completion]:
    """Completions for `generated` (one list of tokens per row) with vLLM's processed logprobs:
    log_softmax(logits / temperature) (temperature 1 when greedy)."""
    rows = []
    for tokens in generated:
        seq = list(prompt) + list(tokens)
        logp_T_V = (ref_logits(model, seq[:-1])[len(prompt) - 1 :] / temperature).log_softmax(-1)
        positions = [vllm_position(logp_T_V[i], t, k) for i, t in enumerate(tokens)]
        rows.append(Completion(token_ids=list(tokens), logprobs=positions, finish_reason=finish_reason))
    return rows


def vllm_prompt(model, prompt, k: int) -> list:
    """vLLM's prompt logprobs: None, then each prompt token at temperature 1 with the top-k."""
    logp_M_V = ref_logits(model, prompt)[:-1].log_softmax(-1)
    return [None] + [vllm_position(logp_M_V[i], prompt[i + 1], k) for i in range(len(prompt) - 1)]


# ---------------------------------------------------------------------- requests


VLLM_BAD = [
    (dict(target_prompt_logprobs=np.zeros((2, 1), dtype=np.int64)), "target_prompt_logprobs"),
    (dict(prompt_alt_tokens_k=2), "prompt_alt_tokens_k"),
    (dict(temperature=0.005), "temperature"),
    (dict(temperature=1e-5), "temperature"),
]


@pytest.mark.parametrize("bad, field", [b for b in BAD if b[1] != "adapter"] + VLLM_BAD)
def test_validate_names_the_field(sampler, bad, field):
    """Everything the transformers backend refuses, and what vLLM cannot do, is a user error naming the field."""
    with pytest.raises(InvalidRequest, match=field):
        validate(base(**bad), sampler.info)


@pytest.mark.parametrize("ok", [dict(temperature=0.0), dict(temperature=9e-6), dict(temperature=0.01), dict(temperature=2.5),
                                dict(top_k=3, top_p=0.5, seed=-4), dict(topk_sample_logprobs=MAX_TOPK, topk_prompt_logprobs=MAX_TOPK),
                                dict(prompt_logprobs=True, prompt_logprobs_last_n=2), dict(stop_at_eos=False)])  # fmt: skip
def test_validate_accepts_what_vllm_does(sampler, ok):
    validate(base(**ok), sampler.info)


def test_sampling_kwargs():
    spec = sample_spec(
        prompt=[5, 6, 7], num_samples=3, max_tokens=9, temperature=0.7, top_k=5, top_p=0.9, seed=11,
        stop_strings=["ab"], stop_token_ids=[8], prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=2,
    )  # fmt: skip
    rows = [sampling_kwargs(spec, j, (3, 9)) for j in range(3)]
    assert rows[0] == dict(
        n=1, max_tokens=9, temperature=0.7, top_k=5, top_p=0.9, seed=derive_seed(11, 0, 0), ignore_eos=True,
        stop_token_ids=[3, 8, 9], stop=["ab"], detokenize=True, skip_special_tokens=False, logprobs=2, prompt_logprobs=3,
    )  # fmt: skip
    # Every row its own stream, the same on every call; prompt logprobs from row 0 only.
    assert [r["seed"] for r in rows] == [derive_seed(11, 0, j) for j in range(3)]
    assert len({r["seed"] for r in rows}) == 3
    assert [r["prompt_logprobs"] for r in rows] == [3, None, None]
    assert all(0 <= r["seed"] < 2**63 for r in rows)  # what torch.Generator.manual_seed takes, never vLLM's -1
    # stop=[]: no EOS; no stop strings: no text.
    plain = sampling_kwargs(respec(spec, stop_at_eos=False, stop_strings=[]), 0, (3, 9))
    assert plain["stop_token_ids"] == [8] and plain["stop"] == [] and plain["detokenize"] is False and plain["ignore_eos"]
    # Greedy: no top-k/top-p (they would truncate vLLM's logprobs in a mixed batch), no seed.
    greedy = sampling_kwargs(respec(spec, temperature=0.0), 1, (3,))
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"], greedy["seed"]) == (0.0, -1, 1.0, None)
    assert sampling_kwargs(respec(spec, seed=None), 0, ())["seed"] is None
    # prompt_logprobs alone: vLLM's 0 (the prompt token only); neither: none asked.
    assert sampling_kwargs(dataclasses.replace(spec, topk_prompt_logprobs=0), 0, ())["prompt_logprobs"] == 0
    assert sampling_kwargs(dataclasses.replace(spec, topk_prompt_logprobs=0, prompt_logprobs=False), 0, ())["prompt_logprobs"] is None


# ---------------------------------------------------------------------- outputs


def test_fair_priorities_put_other_keys_before_a_big_keys_next_request():
    """vLLM's priority (lower first) per request: a key's start in virtual time. A key's second
    128-row request goes after what other keys submit meanwhile; a key idle for a while rejoins at
    the earliest start in flight, with no credit for its idle time."""
    fair = FairPriorities()
    h1, h2 = fair.submit("hostile", 1280), fair.submit("hostile", 1280)
    s1, s2 = fair.submit("small", 10), fair.submit("small", 10)
    assert (h1, h2, s1, s2) == (0, 1280, 0, 10)  # FCFS would run h2 before s1 and s2
    for start in (h1, s1, s2):
        fair.done(start)
    assert fair.submit("late", 5) == 1280  # only h2 (start 1280) is in flight: no credit for idling
    assert fair.submit("small", 10) == 1280 and fair.submit("hostile", 1) == 2560
    fair.done(h2)
    assert fair.submit("small", 10) == 1290
    serial = FairPriorities()  # one request at a time: the last one's start is the virtual time
    serial.done(serial.submit("a", 100))
    serial.done(serial.submit("a", 100))
    assert serial.submit("b", 1) == 100 and serial.submit("a", 1) == 200  # b rejoins at a's last start


def test_row_share_holds_a_key_to_its_share_of_the_engines_rows():
    """RowShare (the transformers engine's rule for vLLM's max_num_seqs): a key alone leaves the
    reserve free; with others in or waiting, max(min share, cap / keys); rows already in are
    never taken back, a key over its share only waits to add more."""
    rows = RowShare(256)
    assert rows.limit("big") == 240  # alone: 16 rows kept for another key's request
    for _ in range(240):
        assert rows.may_enter("big")
        rows.enter("big")
    assert not rows.may_enter("big")
    rows.waiting["small"] += 1  # another key wants in: shares of 128, and room for it now
    assert rows.limit("big") == 128 and rows.may_enter("small") and not rows.may_enter("big")
    rows.waiting["small"] -= 1
    rows.enter("small")
    for k in ("c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"):
        rows.waiting[k] += 1
    assert rows.limit("small") == 16  # 17 keys: 256 / 17 = 15, at least 16
    for _ in range(240):
        rows.leave("big")
    assert "big" not in rows.inside
    assert RowShare(32).limit("a") == 32  # under 4 x the reserve: no reserve (RowShare(cap=32))
    assert RowShare(8, min_share=2, reserve=2).limit("a") == 6


def test_top_picks_the_k_most_likely():
    position = {7: (-9.0, 50), 1: (-0.1, 1), 2: (-1.0, 2), 4: (-1.5, 3)}  # 7: the sampled token, far down
    tokens, logprobs = top(position, 2)
    assert tokens.tolist() == [1, 2] and logprobs.tolist() == pytest.approx([-0.1, -1.0])
    tokens, logprobs = top(position, 3)
    assert tokens.tolist() == [1, 2, 4]
    tokens, logprobs = top({1: (-0.5, 1), 2: (-0.9, 2)}, 4)  # fewer entries than k: Tinker's sentinel cells
    assert tokens.tolist() == [1, 2, 0, 0] and logprobs[2:].tolist() == [SENTINEL_LOGPROB] * 2
    assert tokens.dtype == np.int64 and logprobs.dtype == np.float32
    # A sampled token tied with the k-th (rank k) does not displace vLLM's own top-k entry.
    tokens, _ = top({9: (-1.0, 2), 1: (-0.1, 1), 2: (-1.0, 2)}, 2)
    assert tokens.tolist()[0] == 1 and len(set(tokens.tolist())) == 2


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_outputs_match_the_transformers_backend_on_the_same_tokens(sampler, ref_model, temperature):
    """vLLM-shaped outputs for the tokens the transformers backend drew become exactly its result."""
    p = prompts(30, (9,))[0]
    spec = sample_spec(
        prompt=p, num_samples=2, max_tokens=7, temperature=temperature, seed=4, stop_at_eos=False,
        prompt_logprobs=True, topk_prompt_logprobs=4, topk_sample_logprobs=3,
    )  # fmt: skip
    expected = one(sampler, spec)
    rows = vllm_rows(ref_model, p, [s.tokens.tolist() for s in expected.sequences], temperature or 1.0, 3)
    got = to_result(spec, rows, vllm_prompt(ref_model, p, 4), stop_ids(spec, sampler.info.eos_token_ids), None)
    for a, b in zip(expected.sequences, got.sequences, strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        assert b.tokens.dtype == np.int32 and b.logprobs.dtype == np.float32
        np.testing.assert_allclose(a.logprobs, b.logprobs, **TOL)
        assert a.stop_reason == b.stop_reason == "length"
        np.testing.assert_array_equal(a.topk_tokens, b.topk_tokens)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, **TOL)
    np.testing.assert_allclose(expected.prompt_logprobs, got.prompt_logprobs, **TOL)  # NaN in the same places
    np.testing.assert_array_equal(expected.topk_prompt_tokens, got.topk_prompt_tokens)
    np.testing.assert_allclose(expected.topk_prompt_logprobs, got.topk_prompt_logprobs, **TOL)
    assert got.target_prompt_logprobs is None and got.prompt_alt_tokens is None

    # prompt_logprobs_last_n: NaN (and sentinel top-k rows) before the last N, as the transformers backend.
    last = dataclasses.replace(spec, prompt_logprobs_last_n=3)
    expected = one(sampler, last)
    got = to_result(last, rows, vllm_prompt(ref_model, p, 4), set(), None)
    assert np.isnan(got.prompt_logprobs[:6]).all() and not np.isnan(got.prompt_logprobs[6:]).any()
    np.testing.assert_allclose(expected.prompt_logprobs, got.prompt_logprobs, **TOL)
    np.testing.assert_allclose(expected.topk_prompt_logprobs, got.topk_prompt_logprobs, **TOL)
    assert (got.topk_prompt_logprobs[:6] == SENTINEL_LOGPROB).all()


def test_no_prompt_statistics_unless_asked(sampler, ref_model):
    p = prompts(31, (5,))[0]
    spec = sample_spec(prompt=p, num_samples=1, max_tokens=3, stop_at_eos=False)
    got = to_result(spec, vllm_rows(ref_model, p, [[5, 6, 7]], 1.0, 0), None, set(), None)
    assert got.prompt_logprobs is None and got.topk_prompt_tokens is None
    assert got.sequences[0].topk_tokens is None
    with pytest.raises(RuntimeError):  # one row per sample, or the engine misbehaved
        to_result(dataclasses.replace(spec, num_samples=2), vllm_rows(ref_model, p, [[5]], 1.0, 0), None, set(), None)


def row(tokens, reason) -> Completion:
    return Completion(token_ids=list(tokens), logprobs=[{t: (-1.0, 1)} for t in tokens], finish_reason=reason)


def test_stop_reasons_are_the_transformers_backends():
    spec = sample_spec(prompt=[1, 2], num_samples=1, max_tokens=4)
    stops = {3}

    def seq(tokens, reason):
        s = finish(row(tokens, reason), spec, stops, None)
        return s.tokens.tolist(), s.stop_reason

    # vLLM checks the length first: a stop token drawn as the last allowed token comes back "length".
    assert seq([10, 11, 12, 3], "length") == ([10, 11, 12, 3], "stop")
    assert seq([10, 11, 12, 13], "length") == ([10, 11, 12, 13], "length")
    assert seq([10, 3], "stop") == ([10, 3], "stop")
    assert seq([10, 3, 11], "length") == ([10, 3], "stop")  # never past the first stop token
    with pytest.raises(RuntimeError, match="abort"):
        seq([10], "abort")
    with pytest.raises(RuntimeError, match="logprobs"):
        finish(Completion(token_ids=[10, 11], logprobs=[{10: (-1.0, 1)}], finish_reason="length"), spec, stops, None)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


def test_stop_strings_cut_after_the_first_token_that_completes_one(tokenizer):
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    text = "the cat sat on the mat, and then it ran off to 17 other mats."
    tokens = tokenizer.encode(text, add_special_tokens=False)
    checked = 0
    for start in range(0, len(text) - 4, 3):
        stop = text[start : start + 4]
        linear = next(i for i in range(1, len(tokens) + 1) if stop in decode(tokens[:i]))
        assert first_stop_string(tokens, ["zzzq", stop], decode) == linear
        spec = sample_spec(prompt=[1], num_samples=1, max_tokens=len(tokens), stop_strings=["zzzq", stop])
        got = finish(row(tokens, "stop" if linear < len(tokens) else "length"), spec, set(), decode)
        assert got.tokens.tolist() == tokens[:linear] and got.stop_reason == "stop"
        checked += linear < len(tokens)
    assert checked > 5  # most stops end inside the text
    spec = sample_spec(prompt=[1], num_samples=1, max_tokens=len(tokens), stop_strings=["zzzq"])
    got = finish(row(tokens, "length"), spec, set(), decode)
    assert got.tokens.tolist() == tokens and got.stop_reason == "length"
    assert first_stop_string(tokens, [], decode) is None


# ---------------------------------------------------------------------- adapters


def test_adapter_files_are_the_peft_folder_the_trainer_agrees_with(tiny_path, engine, tmp_path):
    """The folder vLLM loads (adapter_config.json + adapter_model.safetensors), loaded with peft,
    computes the trainer's logprobs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from openrl.trainer.weights import adapter_bytes

    blob = adapter_bytes(engine, "m2")  # rank 8, attention only
    files = adapter_files(blob, max_rank=8, base_model=tiny_path)
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads(files["adapter_config.json"])
    assert (config["r"], config["lora_alpha"], config["bias"], config["peft_type"]) == (8, 32, "none", "LORA")
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32), str(tmp_path)).eval()
    p, g = prompts(32, (6, 8))
    with torch.inference_mode():
        logp = model(input_ids=torch.tensor([p + g])).logits[0, :-1].float().log_softmax(-1)
    ours = logp[torch.arange(len(p) - 1, len(p) + len(g) - 1), torch.tensor(g)].numpy()
    np.testing.assert_allclose(ours, trainer_logprobs(engine, "m2", p, g), **TOL)
    assert json.loads(adapter_files(adapter_bytes(engine, "m1"), max_rank=8)["adapter_config.json"])["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"
    ]  # fmt: skip


def test_bad_adapter_blobs_are_user_errors(engine):
    from safetensors.torch import save

    state = engine.adapter_state("m2")
    with pytest.raises(InvalidRequest, match="safetensors"):
        adapter_files(b"not safetensors", max_rank=64)
    with pytest.raises(InvalidRequest, match="max-lora-rank"):
        adapter_files(save({k: v.contiguous() for k, v in state.items()}), max_rank=4)
    broken = {k: v.clone().contiguous() for k, v in state.items()}
    next(iter(broken.values()))[0, 0] = float("nan")
    with pytest.raises(InvalidRequest, match="finite"):
        adapter_files(save(broken), max_rank=64)
    with pytest.raises(InvalidRequest, match="lora_B"):
        adapter_files(save({k: v.contiguous() for k, v in state.items() if "lora_B" not in k}), max_rank=64)
    with pytest.raises(InvalidRequest, match="unexpected"):
        adapter_files(save({"model.embed_tokens.weight": torch.zeros(2, 2)}), max_rank=64)


# ---------------------------------------------------------------------- the CLI


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_without_vllm_says_how_to_install_it(how):
    argv = [sys.executable, "-m", "openrl", "sampler", "--nats-url", "nats://127.0.0.1:1"]
    env = {k: v for k, v in os.environ.items() if k != "OPENRL_SAMPLER_BACKEND"}
    if how == "flag":
        argv += ["--backend", "vllm"]
    else:
        env["OPENRL_SAMPLER_BACKEND"] = "vllm"
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert "pip install 'openrl-server[vllm]'" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_module_imports_without_vllm():
    code = "import sys, openrl.sampler.vllm_backend, openrl.sampler.service; sys.exit(1 if 'vllm' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ---------------------------------------------------------------------- the engine, in vLLM's environment


def test_vllm_engine(vllm_python, vllm_model, tmp_path):
    """tests/sampler/vllm_cases.py (the backend on a real vLLM engine) under OPENRL_VLLM_PYTHON:
    every case must pass; none may skip."""
    env = dict(os.environ, OPENRL_VLLM_TEST_MODEL=str(vllm_model), VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    argv = [vllm_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={tmp_path / 'cases.xml'}",
            str(Path(__file__).with_name("vllm_cases.py"))]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[2], timeout=900)
    report = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    counts = junit_counts(tmp_path / "cases.xml")
    assert counts["tests"] >= 14 and counts["skipped"] == counts["failures"] == counts["errors"] == 0, (counts, report)
