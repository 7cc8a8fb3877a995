"""LoraEngine against a plain-torch reference.

The reference (reference.py) replaces each targeted nn.Linear of an independent copy of the base model
with `W x + (alpha / r) * B A x` written out in torch (no peft), computes Tinker's
cross_entropy (-sum(weights * logprob)) and applies AdamW + global-norm clipping written
out by hand. Loss, logprobs, gradients and updated weights must agree to fp32 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openrl.bus.errors import InvalidRequest, NotFound
from openrl.bus.messages import AdamParams, Datum, ForwardBackward, LoraSpec, Tensor
from openrl.trainer.engine import LORA_ALPHA, LoraEngine
from factories import datum, tensor
from reference import Reference

VOCAB = 96
TOL = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- request builders


def fb(model_id: str, data: list[Datum], *, loss_fn="cross_entropy", forward_only=False) -> ForwardBackward:
    return ForwardBackward(request_id="r", model_id=model_id, seq_id=1, loss_fn=loss_fn, forward_only=forward_only, data=data)


def random_data(seed: int, lengths=(7, 12, 3)) -> list[tuple[list[int], list[int], list[float]]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tokens = rng.integers(0, VOCAB, n).tolist()
        targets = rng.integers(0, VOCAB, n).tolist()
        weights = rng.uniform(-0.5, 1.5, n).astype(np.float32).tolist()  # negative weights are legal
        out.append((tokens, targets, weights))
    return out


def ref_inputs(tokens, targets, weights=None) -> dict:
    """One random_data tuple as the reference's datum dict (weights float32, as sent)."""
    d = dict(tokens=tokens, target_tokens=targets)
    if weights is not None:
        d["weights"] = np.asarray(weights, dtype=np.float32)
    return d


# ---------------------------------------------------------------------- comparison


def assert_tensors_close(got: dict, want: dict, **tol):
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:
            assert got[k] is None or not got[k].any(), k
        else:
            torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{k}: {m}", **(tol or TOL))


def step_both(engine, ref, model_id, data, adam):
    out = engine.forward_backward(fb(model_id, [datum(*d) for d in data]))
    ref_lp, ref_loss = ref.forward_backward([ref_inputs(*d) for d in data])
    assert out.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-4, abs=1e-4)
    assert out.metrics["tokens:sum"] == sum(len(d[0]) for d in data)
    assert len(out.logprobs) == len(data)
    for got, want in zip(out.logprobs, ref_lp):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, **TOL)
    assert_tensors_close(engine.adapter_grads(model_id), ref.grads())
    metrics = engine.optim_step(model_id, adam)
    norm = ref.optim_step(adam)
    assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-4)
    assert_tensors_close(engine.adapter_state(model_id), ref.state())


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_cross_entropy_and_adamw_match_reference(arch, qwen3_path, llama_path):
    path = qwen3_path if arch == "qwen3" else llama_path
    engine = LoraEngine(path, device="cpu")
    engine.create("m", LoraSpec(rank=4, seed=7))
    ref = Reference(path, engine.adapter_state("m"), rank=4, alpha=LORA_ALPHA)
    # Clipping active (tiny clip norm), decoupled weight decay on, non-default betas.
    adam = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.05)
    for step in range(3):
        step_both(engine, ref, "m", random_data(step), adam)


def test_weights_default_to_one_and_targets_everything(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=2))
    ref = Reference(qwen3_path, engine.adapter_state("m"), rank=2, alpha=LORA_ALPHA)
    targeted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in engine.adapter_state("m")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    data = [(t, g, None) for t, g, _ in random_data(3)]
    step_both(engine, ref, "m", data, AdamParams(learning_rate=1e-2))


def test_gradients_accumulate_until_optim_step(qwen3_path):
    """Two forward_backward calls then a step equal one call with both batches."""
    data = random_data(11, lengths=(5, 9, 4, 6))
    adam = AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)
    split, whole = LoraEngine(qwen3_path, device="cpu"), LoraEngine(qwen3_path, device="cpu")
    for engine in (split, whole):
        engine.create("m", LoraSpec(rank=4, seed=1))
    split.forward_backward(fb("m", [datum(*d) for d in data[:2]]))
    split.forward_backward(fb("m", [datum(*d) for d in data[2:]]))
    whole.forward_backward(fb("m", [datum(*d) for d in data]))
    assert_tensors_close(split.adapter_grads("m"), whole.adapter_grads("m"))
    split.optim_step("m", adam)
    whole.optim_step("m", adam)
    assert_tensors_close(split.adapter_state("m"), whole.adapter_state("m"))
    assert all(g is None for g in split.adapter_grads("m").values())  # optim_step zeroes grads


def test_tenants_are_isolated(qwen3_path):
    """Training one tenant changes neither another tenant's weights nor its results."""
    shared = LoraEngine(qwen3_path, device="cpu")
    alone = LoraEngine(qwen3_path, device="cpu")
    shared.create("a", LoraSpec(rank=4, seed=1))
    shared.create("b", LoraSpec(rank=8, seed=2, train_mlp=False))  # ranks and targets may differ
    alone.create("b", LoraSpec(rank=8, seed=2, train_mlp=False))
    b_before = shared.adapter_state("b")
    adam_a = AdamParams(learning_rate=5e-2, grad_clip_norm=0.1)
    adam_b = AdamParams(learning_rate=1e-2, weight_decay=0.5)
    for step in range(2):
        # a's gradients are accumulated but not applied while b steps: b must not see them.
        shared.forward_backward(fb("a", [datum(*d) for d in random_data(100 + step)]))
        shared.forward_backward(fb("b", [datum(*d) for d in random_data(step)]))
        alone.forward_backward(fb("b", [datum(*d) for d in random_data(step)]))
        assert_tensors_close(shared.adapter_grads("b"), alone.adapter_grads("b"))
        shared.optim_step("b", adam_b)
        alone.optim_step("b", adam_b)
        shared.optim_step("a", adam_a)
    assert_tensors_close(shared.adapter_state("b"), alone.adapter_state("b"))
    assert not all(torch.equal(b_before[k], v) for k, v in shared.adapter_state("b").items())
    assert not any("gate_proj" in k or "down_proj" in k for k in shared.adapter_state("b"))
    out_shared = shared.forward_backward(fb("b", [datum(*random_data(9)[0])], forward_only=True))
    out_alone = alone.forward_backward(fb("b", [datum(*random_data(9)[0])], forward_only=True))
    np.testing.assert_allclose(out_shared.logprobs[0], out_alone.logprobs[0], **TOL)


def test_optim_step_only_moves_its_own_tenant(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("a", LoraSpec(rank=4, seed=1))
    engine.create("b", LoraSpec(rank=4, seed=2))
    engine.forward_backward(fb("a", [datum(*d) for d in random_data(0)]))
    engine.forward_backward(fb("b", [datum(*d) for d in random_data(1)]))
    a_before, b_grads = engine.adapter_state("a"), engine.adapter_grads("b")
    engine.optim_step("b", AdamParams(learning_rate=1e-2))
    assert_tensors_close(engine.adapter_state("a"), a_before, rtol=0, atol=0)
    assert any(g is not None for g in engine.adapter_grads("a").values())  # a's grads still pending
    assert any(g is not None for g in b_grads.values())


def test_forward_only_changes_nothing(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=4, seed=3))
    data = [datum(*d) for d in random_data(5)]
    # Move B off zero first so the adapter matters.
    engine.forward_backward(fb("m", data))
    engine.optim_step("m", AdamParams(learning_rate=1e-2))
    before = engine.adapter_state("m")
    fwd = engine.forward_backward(fb("m", data, forward_only=True))
    assert all(g is None for g in engine.adapter_grads("m").values())
    assert_tensors_close(engine.adapter_state("m"), before, rtol=0, atol=0)
    full = engine.forward_backward(fb("m", data))
    assert fwd.metrics["loss:sum"] == pytest.approx(full.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(fwd.logprobs, full.logprobs):
        np.testing.assert_allclose(a, b, **TOL)


def test_lora_init_is_a_function_of_the_seed(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    torch.manual_seed(123)
    engine.create("a", LoraSpec(rank=4, seed=5))
    engine.create("other", LoraSpec(rank=4, seed=6))
    torch.manual_seed(999)  # global RNG state must not matter
    engine.create("b", LoraSpec(rank=4, seed=5))
    a, b, other = engine.adapter_state("a"), engine.adapter_state("b"), engine.adapter_state("other")
    assert_tensors_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a[k], other[k]) for k in a)
    # peft's init: A random, B zero, so a fresh adapter leaves the base model unchanged.
    assert all(not v.any() for k, v in a.items() if "lora_B" in k)


def test_drop_and_recreate(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=4, seed=1))
    first = engine.adapter_state("m")
    engine.drop("m")
    assert not engine.has("m")
    with pytest.raises(NotFound):
        engine.forward_backward(fb("m", [datum(*random_data(0)[0])]))
    engine.create("m", LoraSpec(rank=4, seed=1))
    assert_tensors_close(engine.adapter_state("m"), first, rtol=0, atol=0)


def _raw_datum(tokens: bytes, **inputs: Tensor) -> Datum:
    return Datum(tokens=tokens, loss_fn_inputs=inputs)


TOK5 = np.arange(5, dtype="<i4").tobytes()
BAD_REQUESTS = {
    "unknown loss_fn": (lambda: fb("m", [datum([1, 2], [2, 3])], loss_fn="nope"), "loss_fn 'nope'"),
    "token id >= vocab": (lambda: fb("m", [datum([1, VOCAB], [2, 3])]), "token ids must be in"),
    "negative token id": (lambda: fb("m", [datum([1, -1], [2, 3])]), "token ids must be in"),
    "target id >= vocab": (lambda: fb("m", [datum([1, 2], [2, VOCAB + 5])]), "target_tokens: token ids"),
    "targets too short": (lambda: fb("m", [datum([1, 2, 3], [2, 3])]), "shape must be [3]"),
    "weights too long": (lambda: fb("m", [datum([1, 2], [2, 3], [1, 1, 1])]), "weights: shape must be [2]"),
    "missing targets": (lambda: fb("m", [_raw_datum(TOK5, weights=tensor([1.0] * 5, "float32"))]), "target_tokens is required"),
    "unknown input": (lambda: fb("m", [_raw_datum(TOK5, target_tokens=tensor(range(5), "int64"), advantages=tensor([1.0] * 5, "float32"))]), "unknown ['advantages']"),
    "targets as float": (lambda: fb("m", [_raw_datum(TOK5, target_tokens=tensor(range(5), "float32"))]), "dtype must be int64"),
    "non-finite weights": (lambda: fb("m", [datum([1, 2], [2, 3], [1.0, float("nan")])]), "finite"),
    "empty tokens": (lambda: fb("m", [datum([], [])]), "tokens is empty"),
    "ragged bytes": (lambda: fb("m", [_raw_datum(b"\x01\x02\x03", target_tokens=tensor([1], "int64"))]), "whole number of int32"),
    "too long": (lambda: fb("m", [datum([1] * 65, [1] * 65)]), "exceed the max context"),
    "shape/data mismatch": (lambda: fb("m", [_raw_datum(TOK5, target_tokens=Tensor(dtype="int64", data=np.arange(5, dtype="<i8").tobytes(), shape=[6]))]), "does not match"),
    "bad second datum": (lambda: fb("m", [datum([1, 2], [2, 3]), datum([1, 2], [2, 300])]), "data[1]"),
}  # fmt: skip


@pytest.fixture(scope="module")
def trained_engine(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=4, seed=1))
    engine.forward_backward(fb("m", [datum(*d) for d in random_data(0)]))
    engine.optim_step("m", AdamParams(learning_rate=1e-2))
    return engine


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_rejected_and_change_nothing(case, trained_engine):
    make, message = BAD_REQUESTS[case]
    before = trained_engine.adapter_state("m")
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        trained_engine.forward_backward(make())
    assert all(g is None for g in trained_engine.adapter_grads("m").values())
    assert_tensors_close(trained_engine.adapter_state("m"), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "adam, message",
    [
        (AdamParams(learning_rate=-1.0), "learning_rate"),
        (AdamParams(beta1=1.0), "beta1"),
        (AdamParams(eps=0.0), "eps"),
        (AdamParams(learning_rate=float("nan")), "finite"),
        (AdamParams(grad_clip_norm=-1.0), "grad_clip_norm"),
    ],
)
def test_bad_adam_params_change_nothing(adam, message, trained_engine):
    trained_engine.forward_backward(fb("m", [datum(*random_data(4)[0])]))
    before, grads = trained_engine.adapter_state("m"), trained_engine.adapter_grads("m")
    with pytest.raises(InvalidRequest, match=message):
        trained_engine.optim_step("m", adam)
    assert_tensors_close(trained_engine.adapter_state("m"), before, rtol=0, atol=0)
    assert_tensors_close(trained_engine.adapter_grads("m"), grads, rtol=0, atol=0)
    trained_engine.optim_step("m", AdamParams(learning_rate=0.0))  # clear for the next case


@pytest.mark.parametrize(
    "lora, message",
    [
        (LoraSpec(rank=0), "rank"),
        (LoraSpec(rank=10_000), "rank"),
        (LoraSpec(train_attn=False, train_mlp=False, train_unembed=False), "targets nothing"),
    ],
)
def test_bad_lora_specs(lora, message, qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    with pytest.raises(InvalidRequest, match=message):
        engine.create("m", lora)
    assert not engine.has("m")
    engine.create("m", LoraSpec(rank=2))  # the engine still works
    with pytest.raises(InvalidRequest, match="already exists"):
        engine.create("m", LoraSpec(rank=2))


def test_base_info(qwen3_path):
    info = LoraEngine(qwen3_path, device="cpu", model_name="tiny").info
    assert (info.model_name, info.arch, info.vocab_size, info.max_context) == ("tiny", "qwen3", VOCAB, 64)
    assert info.lora_alpha == 32 and info.device == "cpu" and info.dtype == "float32"
    assert "lm_head" in info.lora_targets and "q_proj" in info.lora_targets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_close_to_cpu_fp32(qwen3_path):
    """On a GPU the trainer runs bf16; it must track the fp32 CPU result loosely."""
    cpu = LoraEngine(qwen3_path, device="cpu")
    gpu = LoraEngine(qwen3_path, device="cuda")
    assert gpu.info.dtype == "bfloat16"
    data = [datum(*d) for d in random_data(0)]
    for engine in (cpu, gpu):
        engine.create("m", LoraSpec(rank=4, seed=1))
    a = cpu.forward_backward(fb("m", data))
    b = gpu.forward_backward(fb("m", data))
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=5e-2)
    for x, y in zip(a.logprobs, b.logprobs):
        np.testing.assert_allclose(x, y, rtol=0.1, atol=0.1)
