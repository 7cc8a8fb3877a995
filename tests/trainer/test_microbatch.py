"""Micro-batches and chunked logprobs give the numbers of one pass over the whole request.

The same requests go to two engines built alike from the same tiny random model: one runs
each request in one padded forward with whole-vocabulary logits (a budget and a chunk larger
than any request), the other in micro-batches of a few datums with logits a few positions at
a time. For every loss, `loss:sum`, every datum's logprobs, the accumulated gradients and the
weights after optim_step must agree to 1e-5 relative (fp32, CPU). The data mix lengths so
that micro-batches hold one to three datums and GSPO's per-datum sequence ratio lands in
different micro-batches for different datums.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import AdamParams, Datum, ForwardBackward, LoraSpec
from openrl.trainer.engine import LoraEngine
from openrl.trainer.requests import micro_batches

from factories import VOCAB, random_request, tensor

LENGTHS = (9, 23, 6, 17, 4, 12)  # budget 24: [23], [17], [12, 9], [6, 4] -> groups of 1 and 2
ADAM = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-4, weight_decay=0.1, grad_clip_norm=0.5)
REL = 1e-5
# A loss:sum whose per-token terms (each of order 1) cancel is compared to 1e-5 of its terms'
# size, not of the small total.
LOSS_ABS = REL * sum(LENGTHS)


def request(loss_fn: str, seed: int, config=None, forward_only=False) -> ForwardBackward:
    return random_request(loss_fn, seed, LENGTHS, config=config, forward_only=forward_only)


def engines(path: str, **micro) -> tuple[LoraEngine, LoraEngine]:
    whole = LoraEngine(path, device="cpu", microbatch_tokens=10**6, logits_chunk_bytes=2**40)
    parts = LoraEngine(path, device="cpu", **(micro or dict(microbatch_tokens=24, logits_chunk_bytes=4 * VOCAB * 5)))
    for engine in (whole, parts):
        engine.create("m", LoraSpec(rank=4, seed=3, train_unembed=True))
    return whole, parts


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rel: float = REL) -> None:
    assert got.keys() == want.keys()
    for name in want:
        # Gradients are sums over tokens: where terms cancel an entry is rounding noise of
        # the big ones, so the slack is relative to the tensor's largest entry.
        atol = rel * want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=rel, atol=atol, msg=lambda m: f"{name}: {m}")


LOSSES = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {},
    "cispo": {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5},
    "dro": {"beta": 0.3},
    "gspo": {},
}


@pytest.mark.parametrize("loss_fn", list(LOSSES))
def test_micro_batched_equals_one_pass(loss_fn, qwen3_path):
    whole, parts = engines(qwen3_path)
    assert len(micro_batches(list(LENGTHS), parts.microbatch_tokens)) == 4
    for step in range(2):
        req = request(loss_fn, seed=step, config=LOSSES[loss_fn])
        a, b = whole.forward_backward(req), parts.forward_backward(req)
        assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=REL, abs=LOSS_ABS)
        assert b.metrics["tokens:sum"] == a.metrics["tokens:sum"] == sum(LENGTHS)
        for got, want in zip(b.logprobs, a.logprobs, strict=True):
            assert got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=REL, atol=1e-6)
        grads = whole.adapter_grads("m")
        assert any(g is not None and g.abs().max() > 0 for g in grads.values())
        assert_same(parts.adapter_grads("m"), grads)
        for engine in (whole, parts):
            engine.optim_step("m", ADAM)
        # Adam's first steps move a weight by about lr * g / (|g| + eps): near-zero gradient
        # entries turn their rounding noise into larger differences (tests/trainer/test_losses.py).
        assert_same(parts.adapter_state("m"), whole.adapter_state("m"), rel=1e-4)


def test_forward_only_is_the_same_in_micro_batches(qwen3_path):
    whole, parts = engines(qwen3_path)
    req = request("importance_sampling", seed=5, forward_only=True)
    a, b = whole.forward_backward(req), parts.forward_backward(req)
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=REL, abs=LOSS_ABS)
    for got, want in zip(b.logprobs, a.logprobs, strict=True):
        np.testing.assert_allclose(got, want, rtol=REL, atol=1e-6)
    assert all(g is None for g in parts.adapter_grads("m").values())


def test_activation_checkpointing_changes_no_number(qwen3_path, llama_path):
    for path in (qwen3_path, llama_path):
        plain, ckpt = engines(path, microbatch_tokens=24, activation_checkpointing=True)
        assert ckpt.checkpointing and not plain.checkpointing
        req = request("ppo", seed=2)
        a, b = plain.forward_backward(req), ckpt.forward_backward(req)
        assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=REL, abs=LOSS_ABS)
        assert_same(ckpt.adapter_grads("m"), plain.adapter_grads("m"))
        # The layers are checkpointed: the backward pass recomputes them (up to the last
        # tensor it needs), so a layer's first projection runs twice per micro-batch with
        # checkpointing, once without.
        for engine, runs in ((plain, 1), (ckpt, 2)):
            calls = []
            handle = engine.model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
            engine.forward_backward(request("ppo", seed=3))
            handle.remove()
            passes = len(micro_batches(list(LENGTHS), engine.microbatch_tokens))
            assert len(calls) == runs * passes, (engine.checkpointing, len(calls))


def test_a_datum_over_the_budget_runs_alone_and_the_plan_groups_by_length():
    assert micro_batches([5, 40, 7, 6], 12) == [[1], [2], [3, 0]]
    assert micro_batches([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert micro_batches([8], 1) == [[0]]
    assert micro_batches([], 8) == []
    for lengths in ([1] * 50, list(range(1, 40)), [30, 1, 29, 2, 28]):
        plan = micro_batches(lengths, 32)
        assert sorted(i for group in plan for i in group) == list(range(len(lengths)))
        for group in plan:
            padded = len(group) * max(lengths[i] for i in group)
            assert padded <= 32 or len(group) == 1


def test_microbatch_tokens_below_one_is_refused(qwen3_path):
    with pytest.raises(ValueError, match="microbatch_tokens must be >= 1"):
        LoraEngine(qwen3_path, device="cpu", microbatch_tokens=0)


def test_a_sequence_longer_than_the_context_is_refused_and_changes_nothing(qwen3_path):
    _, parts = engines(qwen3_path)
    before = parts.adapter_state("m")
    req = request("cross_entropy", seed=0)
    n = 65  # the tiny models' max_position_embeddings is 64
    long = Datum(tokens=np.ones(n, "<i4").tobytes(), loss_fn_inputs={"target_tokens": tensor(np.ones(n), "int64")})
    bad = ForwardBackward(request_id="r", model_id="m", seq_id=1, loss_fn="cross_entropy", data=[*req.data, long])
    with pytest.raises(InvalidRequest, match="data\\[6\\].tokens: 65 tokens exceed the max context of 64 tokens"):
        parts.forward_backward(bad)
    assert all(g is None for g in parts.adapter_grads("m").values())
    assert_same(parts.adapter_state("m"), before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_defaults_micro_batch_with_checkpointing_and_match_one_pass(qwen3_path):
    """On CUDA the defaults are bf16 and activation checkpointing: micro-batched with chunked
    logprobs agrees with one pass to bf16 precision."""
    whole = LoraEngine(qwen3_path, device="cuda", microbatch_tokens=10**6, logits_chunk_bytes=2**40)
    parts = LoraEngine(qwen3_path, device="cuda", microbatch_tokens=24, logits_chunk_bytes=4 * VOCAB * 5)
    assert parts.checkpointing and parts.info.dtype == "bfloat16"
    for engine in (whole, parts):
        engine.create("m", LoraSpec(rank=4, seed=3))
    req = request("importance_sampling", seed=1)
    a, b = whole.forward_backward(req), parts.forward_backward(req)
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=2e-2, abs=0.5)
    for got, want in zip(b.logprobs, a.logprobs, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=5e-2)
