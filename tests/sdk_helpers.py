"""What the tests that drive a stack through the tinker SDK share: a training client, the
logprobs of a result, a few SFT steps, and the comparison of two runs' logprobs. The `tokenizer`
and `data` fixtures built on them are in conftest.py."""

from __future__ import annotations

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
