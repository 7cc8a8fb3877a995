"""A short SFT loop through the unmodified tinker SDK: what `openrl up --demo` runs.

It is also the smallest complete example of using OpenRL from a notebook: point the SDK
at the gateway (`base_url` or TINKER_BASE_URL), make a LoRA training client, and loop
forward_backward + optim_step.
"""

from __future__ import annotations

import random
import time


def sft_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs: two-digit sums, in words the default model knows."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append((f"What is {a}+{b}?", str(a + b)))
    return out


def make_datum(tokenizer, question: str, answer: str):
    """Chat-formatted example; only the answer tokens (and end of turn) carry weight."""
    import tinker

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = prompt_ids + answer_ids
    weights = [0.0] * len(prompt_ids) + [1.0] * len(answer_ids)
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def run_sft_demo(base_url: str, api_key: str | None, *, base_model: str, steps: int = 40, batch: int = 8, examples: int = 16, lr: float = 2e-3) -> list[float]:
    import tinker
    from tqdm import tqdm

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=base_model, rank=16).result()
    tokenizer = training.get_tokenizer()
    data = [make_datum(tokenizer, q, a) for q, a in sft_examples(examples)]
    losses = []
    bar = tqdm(range(steps), desc="SFT", unit="step")
    started = time.monotonic()
    for step in bar:
        datums = [data[(step * batch + i) % len(data)] for i in range(batch)]
        fwd = training.forward_backward(datums, loss_fn="cross_entropy")
        opt = training.optim_step(tinker.types.AdamParams(learning_rate=lr))
        out = fwd.result()
        opt.result()
        n_tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in datums)
        losses.append(out.metrics["loss:sum"] / n_tokens)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    elapsed = time.monotonic() - started
    print(f"loss per token {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps ({steps / elapsed:.2f} steps/s)", flush=True)
    service.close("success").result()
    return losses


# -- RL: a toy task the default model learns in a minute on a CPU ---------------------


def rl_prompts(n: int, words: tuple[str, ...], seed: int = 0) -> list[tuple[str, list[str]]]:
    """("Say the other word: w1 w2 w3", [w1, w2, w3]): the reward is 1 when the answer's first
    token is one of the named words. The warmed-up default model does that about two times in
    three and babbles otherwise, so each group of samples has both outcomes to learn from."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = rng.sample(words, 3)
        out.append((f"Say the other word: {' '.join(ws)}", ws))
    return out


def run_rl_demo(
    base_url: str,
    api_key: str | None,
    *,
    base_model: str,
    steps: int = 20,
    prompts_per_step: int = 8,
    group_size: int = 8,
    lr: float = 3e-4,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """GRPO-style RL through the unmodified SDK; returns the mean reward of each step.

    Each step: a fresh sampling client on the current weights; `group_size` samples per
    prompt; reward 1 when the first generated token is a word the prompt named; advantages are rewards
    minus their group's mean; one `importance_sampling` forward_backward on the sampled
    tokens (the sampler's logprobs as q), then optim_step.
    """
    import tinker
    from tinker import types
    from tqdm import tqdm

    from openrl.trainer.default_model import COPY_WORDS

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=base_model, rank=16, seed=seed).result()
    tokenizer = training.get_tokenizer()
    rewards = []
    bar = tqdm(range(steps), desc="RL", unit="step", disable=not progress)
    for step in bar:
        sampler = training.save_weights_and_get_sampling_client().result()
        batch = rl_prompts(prompts_per_step, COPY_WORDS, seed=seed * 100_003 + step)
        prompts = []
        for question, words in batch:
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
            named = {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
            prompts.append((tokenizer.encode(text, add_special_tokens=False), named))
        # Seeded per step and prompt: with CPU training deterministic too, a run repeats exactly.
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), group_size, types.SamplingParams(max_tokens=2, temperature=1.0, seed=seed + 1000 * step + i))
            for i, (p, _) in enumerate(prompts)
        ]
        datums, step_rewards = [], []
        for (prompt, answer), future in zip(prompts, futures):
            seqs = future.result().sequences
            group = [float(len(s.tokens) > 0 and s.tokens[0] in answer) for s in seqs]
            step_rewards += group
            mean = sum(group) / len(group)
            for seq, reward in zip(seqs, group):
                advantage = reward - mean
                if advantage == 0 or not seq.tokens:
                    continue  # no signal: skip the datum
                tokens = prompt + list(seq.tokens)
                n_prompt = len(prompt) - 1  # positions predicting prompt tokens
                datums.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": tokens[1:],
                            "logprobs": [0.0] * n_prompt + list(seq.logprobs),
                            "advantages": [0.0] * n_prompt + [advantage] * len(seq.tokens),
                        },
                    )
                )
        if datums:
            fwd = training.forward_backward(datums, loss_fn="importance_sampling")
            opt = training.optim_step(types.AdamParams(learning_rate=lr))
            fwd.result()
            opt.result()
        rewards.append(sum(step_rewards) / len(step_rewards))
        bar.set_postfix(reward=f"{rewards[-1]:.2f}")
    service.close("success").result()
    return rewards
