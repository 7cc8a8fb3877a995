"""What the tests that drive a stack through the tinker SDK share: a training client, the
logprobs of a result, a few SFT steps, the comparison of two runs' logprobs, and a run
finished across a killed trainer. The `tokenizer`
and `data` fixtures built on them are in conftest.py."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import tinker

from stack_helpers import BASE_MODEL


def training_client(stack, *, seed: int, rank: int = 8, base_url: str | None = None, api_key: str | None = None):
    service = stack.service_client(api_key=api_key, base_url=base_url)
    return service, service.create_lora_training_client(base_model=BASE_MODEL, rank=rank, seed=seed).result()


def logprobs(out) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def sdk_steps(tc, batches, lr=5e-3) -> None:
    for batch in batches:
        fb = tc.forward_backward(batch, loss_fn="cross_entropy")
        opt = tc.optim_step(tinker.types.AdamParams(learning_rate=lr))
        fb.result(timeout=120)  # a stuck sequence fails here instead of hanging the suite
        opt.result(timeout=120)


def assert_logprobs_equal(a: list[np.ndarray], b: list[np.ndarray], rtol=1e-5, atol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def finish_across_a_trainer_kill(stack, tc, clean, batches, data) -> list[dict]:
    """SIGKILL the stack's trainer, run `batches` on `tc` (the SDK retries until the restarted
    trainer answers) and check that `tc` ends with exactly the weights of `clean`, a run that
    was never interrupted. Returns the trainer log's `model_loaded` records of `tc`'s model."""
    victim = stack.pid("trainer")
    os.kill(victim, signal.SIGKILL)
    sdk_steps(tc, batches)
    assert stack.wait_restarted("trainer", victim) != victim
    assert_logprobs_equal(
        logprobs(tc.forward(data, loss_fn="cross_entropy").result()),
        logprobs(clean.forward(data, loss_fn="cross_entropy").result()),
        rtol=0,
        atol=0,
    )
    lines = [json.loads(x) for x in (stack.data_dir / "logs" / "trainer.log").read_text().splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "model_loaded" and x.get("model_id") == tc.model_id]
