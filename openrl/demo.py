"""A short SFT loop through the unmodified tinker SDK: what `openrl up --demo` runs.

It is also the smallest complete example of using OpenRL from a notebook: point the SDK
at the gateway (`base_url` or TINKER_BASE_URL), make a LoRA training client, and loop
forward_backward + optim_step.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def sft_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs: two-digit sums, in words the default model knows."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append((f"What is {a}+{b}?", str(a + b)))
    return out


def chat_tokens(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def make_datum(tokenizer, question: str, answer: str):
    """Chat-formatted example; only the answer tokens (and end of turn) carry weight."""
    import tinker

    prompt_ids = chat_tokens(tokenizer, question)
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


# -- RL: a task measured on the model itself ------------------------------------------
#
# Whether a fixed task leaves RL room to learn depends on what the base model can already do:
# a model that always answers right (or never does) gives every sample of a group the same
# reward, zero advantages, nothing to learn. So the demo measures its task first. It samples
# each candidate prompt on the starting weights, and rewards an answer when it is one of that
# prompt's most common answers (majority vote as the label, as in test-time RL), as many as
# make REWARD_BAND[0] of the samples. A prompt is kept only if those answers' share (measured
# on other samples) is inside REWARD_BAND, so the reward starts with room to rise whatever
# the model already knows, and RL raises it by making the model surer of its favourite answers.

REWARD_BAND = (0.15, 0.6)


def majority_answers(answers: Sequence[Hashable], band: tuple[float, float] = REWARD_BAND) -> tuple[list, float] | None:
    """The fewest most common answers of the first half of `answers` that make at least
    band[0] of it, and their share of the second half; None when that share is outside the
    band. (Measured on the samples that chose them, the share would be biased upwards: among
    many rare answers, the ones that came up most often are mostly the lucky ones.)"""
    half = len(answers) // 2
    chosen, share = [], 0.0
    for answer, count in Counter(answers[:half]).most_common():  # ties: in order of first appearance
        chosen.append(answer)
        share += count / half
        if share >= band[0]:
            break
    share = sum(a in chosen for a in answers[half:]) / (len(answers) - half)
    return (chosen, share) if band[0] <= share <= band[1] else None


def rl_prompts(n: int, words: tuple[str, ...], seed: int = 0) -> list[tuple[str, list[str]]]:
    """("Say the other word: w1 w2 w3", [w1, w2, w3]): a word task like the default model's
    warm-up, whose reference answers are the three words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = rng.sample(words, 3)
        out.append((f"Say the other word: {' '.join(ws)}", ws))
    return out


def rl_questions(n: int, seed: int = 0) -> list[str]:
    """Candidate prompts for a measured task: two-digit sums and differences, and word tasks,
    in the chat formats of the default model's warm-up (any model answers them somehow)."""
    from openrl.default_model import COPY_WORDS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        kind = rng.randrange(3)
        if kind == 0:
            out.append(f"What is {a}+{b}?")
        elif kind == 1:
            out.append(f"What is {max(a, b)}-{min(a, b)}?")
        else:
            out.append(f"Say the other word: {' '.join(rng.sample(COPY_WORDS, 3))}")
    return out


@dataclass(frozen=True)
class FirstTokenTask:
    """A chat prompt and the first tokens that earn reward 1 (`base_rate`: their share of the
    starting model's samples)."""

    question: str
    prompt: list[int]
    answers: frozenset[int]
    base_rate: float


def measure_first_token_tasks(sampler, tokenizer, questions: Sequence[str], *, samples: int = 64, seed: int = 0) -> list[FirstTokenTask]:
    """The questions whose majority first tokens (see `majority_answers`) fall in REWARD_BAND
    on `sampler`'s weights, measured from `samples` seeded samples each."""
    from tinker import types

    prompts = [chat_tokens(tokenizer, q) for q in questions]
    futures = [
        sampler.sample(types.ModelInput.from_ints(p), samples, types.SamplingParams(max_tokens=1, temperature=1.0, seed=seed + i))
        for i, p in enumerate(prompts)
    ]
    tasks = []
    for question, prompt, future in zip(questions, prompts, futures):
        firsts = [s.tokens[0] if s.tokens else -1 for s in future.result().sequences]
        picked = majority_answers(firsts)
        if picked is not None:
            tasks.append(FirstTokenTask(question, prompt, frozenset(picked[0]), picked[1]))
    return tasks


def run_rl_demo(
    base_url: str,
    api_key: str | None,
    *,
    base_model: str,
    steps: int = 20,
    prompts: int = 8,
    group_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """GRPO-style RL through the unmodified SDK; returns the mean reward of each step.

    First the task is measured on the starting weights: `prompts` questions that leave room
    to learn, each rewarding its majority first tokens (`measure_first_token_tasks`). Then each
    step: a fresh sampling client on the current weights; `group_size` samples of each prompt;
    reward 1 when the sampled token is one its task rewards; advantages are rewards minus their
    group's mean; one `importance_sampling` forward_backward on the sampled tokens (the
    sampler's logprobs as q), then optim_step.
    """
    import tinker
    from tinker import types
    from tqdm import tqdm

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=base_model, rank=16, seed=seed).result()
    tokenizer = training.get_tokenizer()
    sampler = training.save_weights_and_get_sampling_client().result()
    candidates = rl_questions(8 * prompts, seed=seed)
    tasks = measure_first_token_tasks(sampler, tokenizer, candidates, seed=10**6 + seed)[:prompts]  # seeds no step uses
    if len(tasks) < prompts:
        raise RuntimeError(f"only {len(tasks)} of {len(candidates)} prompts leave room to learn on {base_model} (their majority first "
                           f"tokens' share is outside {REWARD_BAND}); need {prompts}")  # fmt: skip
    base_rate = sum(t.base_rate for t in tasks) / len(tasks)
    print(f"task: {len(tasks)} prompts; the starting model samples their majority first tokens {base_rate:.2f} of the time", flush=True)
    rewards = []
    bar = tqdm(range(steps), desc="RL", unit="step", disable=not progress)
    for step in bar:
        if step:
            sampler = training.save_weights_and_get_sampling_client().result()
        # Seeded per step and prompt: with CPU training deterministic too, a run repeats exactly.
        futures = [
            sampler.sample(types.ModelInput.from_ints(task.prompt), group_size, types.SamplingParams(max_tokens=1, temperature=1.0, seed=seed + 1000 * step + i))
            for i, task in enumerate(tasks)
        ]
        datums, step_rewards = [], []
        for task, future in zip(tasks, futures):
            seqs = future.result().sequences
            group = [float(len(s.tokens) > 0 and s.tokens[0] in task.answers) for s in seqs]
            step_rewards += group
            mean = sum(group) / len(group)
            for seq, reward in zip(seqs, group):
                advantage = reward - mean
                if advantage == 0 or not seq.tokens:
                    continue  # no signal: skip the datum
                tokens = task.prompt + list(seq.tokens)
                n_prompt = len(task.prompt) - 1  # positions predicting prompt tokens
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
