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
