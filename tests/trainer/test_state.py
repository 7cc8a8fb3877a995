"""Trainer checkpoints: LoraEngine.export_state / import_state, weights.state_bytes /
read_state, lora_spec_of and the PEFT folder (peft_files).

Resuming from a checkpoint with its optimizer state must be exact: on CPU, training on after
a save/load lands bitwise on the weights of never having stopped. Without the optimizer the
next step must be a fresh AdamW's. Bad checkpoints are refused and change nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import AdamParams, Datum, ForwardBackward, LoraSpec
from openrl.trainer.engine import LORA_ALPHA, LoraEngine, lora_spec_of
from openrl.trainer.weights import adapter_bytes, read_state, state_bytes
from factories import datum

VOCAB = 96
TOL = dict(rtol=1e-4, atol=1e-5)
# Clipping, decoupled weight decay and non-default betas all on: each is part of the state's effect.
ADAM = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.5)
OPT = "optimizer."


def batch(seed: int, lengths=(7, 12, 3)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        tokens, targets = rng.integers(0, VOCAB, n).tolist(), rng.integers(0, VOCAB, n).tolist()
        out.append(datum(tokens, targets, rng.uniform(-0.5, 1.5, n).astype(np.float32).tolist()))
    return out


def fb(model_id: str, data: list[Datum], *, forward_only=False) -> ForwardBackward:
    return ForwardBackward(
        request_id="r", model_id=model_id, seq_id=1, loss_fn="cross_entropy", forward_only=forward_only, data=data
    )


def train(engine: LoraEngine, model_id: str, steps: range, adam: AdamParams = ADAM) -> None:
    """One forward_backward + optim_step per step, step i on batch(i)."""
    for i in steps:
        engine.forward_backward(fb(model_id, batch(i)))
        engine.optim_step(model_id, adam)


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def snapshot(engine: LoraEngine, model_id: str):
    """Everything import_state may touch: weights, AdamW state, pending gradients."""
    tensors, _ = engine.export_state(model_id, with_optimizer=True)
    return tensors, engine.adapter_grads(model_id)


def assert_unchanged(engine: LoraEngine, model_id: str, before) -> None:
    tensors, grads = snapshot(engine, model_id)
    assert_identical(tensors, before[0])
    assert grads.keys() == before[1].keys()
    for k, g in before[1].items():
        assert (grads[k] is None and g is None) or torch.equal(grads[k], g), k


# ---------------------------------------------------------------------- resuming


def test_resume_with_optimizer_is_bitwise_exact(qwen3_path):
    spec = LoraSpec(rank=4, seed=1)
    straight = LoraEngine(qwen3_path, device="cpu")
    straight.create("m", spec)
    train(straight, "m", range(3))
    blob = state_bytes(straight, "m", with_optimizer=True)
    train(straight, "m", range(3, 7))  # never stopped

    resumed = LoraEngine(qwen3_path, device="cpu")
    resumed.create("other", LoraSpec(rank=8, seed=3))  # another tenant first: a different peft adapter name
    resumed.create("m2", LoraSpec(rank=4, seed=99))  # same LoraSpec but the seed: different init
    train(resumed, "m2", range(50, 52))  # its own optimizer state, to be replaced
    resumed.forward_backward(fb("m2", batch(60)))  # pending gradients, to be dropped
    tensors, metadata = read_state(blob)
    assert metadata["optimizer"] == "adamw"
    steps = [v.item() for k, v in tensors.items() if k.endswith(".step")]
    assert steps and all(s == 3 for s in steps)
    resumed.import_state("m2", tensors, metadata, with_optimizer=True)
    assert all(g is None for g in resumed.adapter_grads("m2").values())
    assert_identical(resumed.export_state("m2", with_optimizer=True)[0], tensors)  # round trip

    train(resumed, "m2", range(3, 7))
    assert_identical(resumed.adapter_state("m2"), straight.adapter_state("m"))
    assert_identical(resumed.export_state("m2", with_optimizer=True)[0], straight.export_state("m", with_optimizer=True)[0])


def test_resume_without_optimizer_starts_a_fresh_adamw(qwen3_path):
    source = LoraEngine(qwen3_path, device="cpu")
    source.create("m", LoraSpec(rank=4, seed=1))
    train(source, "m", range(3))
    tensors, metadata = read_state(state_bytes(source, "m", with_optimizer=False))
    assert metadata["optimizer"] == "none"
    assert not any(k.startswith(OPT) for k in tensors)
    assert_identical(tensors, source.adapter_state("m"))

    target = LoraEngine(qwen3_path, device="cpu")
    target.create("m", LoraSpec(rank=4, seed=5))
    train(target, "m", range(20, 22))  # AdamW state that must not survive the load
    target.forward_backward(fb("m", batch(30)))
    target.import_state("m", tensors, metadata, with_optimizer=False)
    assert_identical(target.adapter_state("m"), source.adapter_state("m"))
    assert all(g is None for g in target.adapter_grads("m").values())
    state, _ = target.export_state("m", with_optimizer=True)
    assert all(not v.any() for k, v in state.items() if k.startswith(OPT))  # fresh: zero moments, step 0

    # The next step is a fresh AdamW's first step from the loaded weights: m_hat = g, v_hat = g^2.
    adam = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)
    target.forward_backward(fb("m", batch(3)))
    weights, grads = target.adapter_state("m"), target.adapter_grads("m")
    assert all(g is not None for g in grads.values())
    target.optim_step("m", adam)
    lr = adam.learning_rate
    for k, p in target.adapter_state("m").items():
        g = grads[k]
        want = weights[k] * (1 - lr * adam.weight_decay) - lr * g / (g.abs() + adam.eps)
        torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")

    # ...which differs from carrying the source's AdamW state on (the optimizer state matters).
    source.forward_backward(fb("m", batch(3)))
    source.optim_step("m", adam)
    assert any(not torch.allclose(source.adapter_state("m")[k], v) for k, v in target.adapter_state("m").items())


# ---------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    "spec",
    [
        LoraSpec(rank=4, seed=7),
        LoraSpec(rank=8, seed=2**40 + 3, train_mlp=False),
        LoraSpec(rank=2, seed=0, train_attn=False, train_unembed=False),
    ],
)
def test_lora_spec_of_round_trips(spec, qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu", model_name="openrl/tiny")
    engine.create("m", spec)
    for with_optimizer in (True, False):
        tensors, metadata = read_state(state_bytes(engine, "m", with_optimizer=with_optimizer))
        assert all(isinstance(v, str) for v in metadata.values())
        assert lora_spec_of(metadata) == spec
        assert metadata["rank"] == str(spec.rank) and metadata["seed"] == str(spec.seed)
        assert metadata["lora_alpha"] == str(LORA_ALPHA)
        assert metadata["base_model"] == "openrl/tiny" and metadata["base_arch"] == "qwen3"
        assert metadata["vocab_size"] == str(VOCAB)
        assert metadata["optimizer"] == ("adamw" if with_optimizer else "none")
        targeted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in engine.adapter_state("m")}
        assert set(json.loads(metadata["target_modules"])) == targeted
    # Create-via-load: the spec is enough to make a tenant the checkpoint loads into.
    other = LoraEngine(qwen3_path, device="cpu")
    other.create("loaded", lora_spec_of(metadata))
    other.import_state("loaded", tensors, metadata, with_optimizer=False)
    assert_identical(other.adapter_state("loaded"), engine.adapter_state("m"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "something"}, "not an OpenRL"),
        ({"format_version": "99"}, "format_version"),
        ({"rank": "four"}, "'rank' must be an integer"),
        ({"train_mlp": "yes"}, "'train_mlp'"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"optimizer": "dimuon"}, "optimizer 'dimuon'"),
    ],
)
def test_lora_spec_of_bad_metadata(change, message, qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=2))
    _, metadata = engine.export_state("m", with_optimizer=False)
    with pytest.raises(InvalidRequest, match=message):
        lora_spec_of({**metadata, **change})
    seed_missing = {k: v for k, v in metadata.items() if k != "seed"}
    with pytest.raises(InvalidRequest, match="lacks 'seed'"):
        lora_spec_of(seed_missing)


# ---------------------------------------------------------------------- PEFT folder


@pytest.mark.parametrize("spec", [LoraSpec(rank=4, seed=1), LoraSpec(rank=8, seed=2, train_mlp=False)])
def test_peft_folder_loads_with_peft(spec, qwen3_path, tmp_path):
    engine = LoraEngine(qwen3_path, device="cpu", model_name="openrl/tiny-qwen3")
    engine.create("m", spec)
    train(engine, "m", range(3))  # B off zero: the adapter changes the outputs
    files = engine.peft_files("m")
    assert set(files) == {"adapter_model.safetensors", "adapter_config.json"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == spec.rank and config["lora_alpha"] == LORA_ALPHA
    assert config["base_model_name_or_path"] == "openrl/tiny-qwen3"
    _, metadata = engine.export_state("m", with_optimizer=False)
    assert sorted(config["target_modules"]) == sorted(json.loads(metadata["target_modules"]))

    base = AutoModelForCausalLM.from_pretrained(qwen3_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    data = batch(40, lengths=(9, 5))
    got = engine.forward_backward(fb("m", data, forward_only=True)).logprobs
    with torch.no_grad():
        for d, lp in zip(data, got):
            tokens = torch.from_numpy(np.frombuffer(d.tokens, "<i4").astype(np.int64))[None]
            targets = torch.from_numpy(np.frombuffer(d.loss_fn_inputs["target_tokens"].data, "<i8").copy())
            want = torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1).gather(1, targets[:, None])[:, 0]
            np.testing.assert_allclose(lp, want.numpy(), **TOL)
            with model.disable_adapter():  # the adapter must matter, or this proves nothing
                plain = torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1).gather(1, targets[:, None])[:, 0]
            assert not np.allclose(lp, plain.numpy(), **TOL)


# ---------------------------------------------------------------------- bad checkpoints


@pytest.fixture(scope="module")
def tenants(qwen3_path):
    """"m": the tenant loaded into (trained, gradients pending); "src": a compatible,
    differently trained one whose checkpoint would change everything; others differ."""
    engine = LoraEngine(qwen3_path, device="cpu")
    for model_id, spec in {
        "m": LoraSpec(rank=4, seed=1),
        "src": LoraSpec(rank=4, seed=2),
        "r8": LoraSpec(rank=8, seed=1),
        "no_attn": LoraSpec(rank=4, seed=1, train_attn=False),
    }.items():
        engine.create(model_id, spec)
    train(engine, "src", range(10, 12))
    train(engine, "m", range(2))
    engine.forward_backward(fb("m", batch(5)))
    return engine


def _corrupt(key_of, value):
    """A checkpoint of "src" with one tensor (chosen by key_of(weight keys)) replaced."""

    def make(engine):
        tensors, metadata = engine.export_state("src", with_optimizer=True)
        key = key_of(list(engine.adapter_state("src")))
        tensors[key] = value(tensors[key].clone())
        return tensors, metadata, True

    return make


def _nan_at_end(t):
    t.view(-1)[-1] = float("nan")
    return t


def _without(key_of, *, with_optimizer=True):
    def make(engine):
        tensors, metadata = engine.export_state("src", with_optimizer=True)
        del tensors[key_of(list(engine.adapter_state("src")))]
        return tensors, metadata, with_optimizer

    return make


def _meta(change):
    def make(engine):
        tensors, metadata = engine.export_state("src", with_optimizer=True)
        return tensors, {**metadata, **change}, True

    return make


def _export(model_id, *, saved_with, load_with):
    def make(engine):
        return *engine.export_state(model_id, with_optimizer=saved_with), load_with

    return make


BAD_IMPORTS = {
    "different rank": (_export("r8", saved_with=True, load_with=True), "rank 8 differs from the model's rank 4"),
    "different targets": (_export("no_attn", saved_with=True, load_with=False), "targets .* differ"),
    "missing weight": (_without(lambda keys: keys[-1]), "missing 1 tensor"),
    "missing weight, no optimizer": (_without(lambda keys: keys[0], with_optimizer=False), "missing 1 tensor"),
    "missing exp_avg": (_without(lambda keys: f"{OPT}{keys[-1]}.exp_avg"), "missing 1 tensor"),
    "missing step": (_without(lambda keys: f"{OPT}{keys[-1]}.step"), "missing 1 tensor"),
    "wrong shape": (_corrupt(lambda keys: keys[-1], lambda t: t.T.contiguous()), "has shape"),
    "wrong moment shape": (_corrupt(lambda keys: f"{OPT}{keys[-1]}.exp_avg_sq", lambda t: t[:1]), "has shape"),
    "NaN weight": (_corrupt(lambda keys: keys[-1], _nan_at_end), "non-finite"),
    "inf weight": (_corrupt(lambda keys: keys[-1], lambda t: t.fill_(float("inf"))), "non-finite"),
    "NaN exp_avg": (_corrupt(lambda keys: f"{OPT}{keys[-1]}.exp_avg", _nan_at_end), "non-finite"),
    "negative exp_avg_sq": (_corrupt(lambda keys: f"{OPT}{keys[-1]}.exp_avg_sq", lambda t: t.fill_(-1.0)), "negative"),
    "fractional step": (_corrupt(lambda keys: f"{OPT}{keys[-1]}.step", lambda t: t + 0.5), "whole number"),
    "integer weight": (_corrupt(lambda keys: keys[-1], lambda t: t.to(torch.int64)), "floating-point"),
    "optimizer from a checkpoint without one": (_export("src", saved_with=False, load_with=True), "without optimizer state"),
    "format version": (_meta({"format_version": "2"}), "format_version"),
    "not a checkpoint": (_meta({"format": "safetensors"}), "not an OpenRL"),
    "other base model": (_meta({"vocab_size": str(VOCAB * 2)}), "vocab"),
    "other lora_alpha": (_meta({"lora_alpha": "16"}), "lora_alpha"),
    "unexpected tensor": (lambda engine: _with_extra(engine), "unexpected"),
}


def _with_extra(engine):
    tensors, metadata = engine.export_state("src", with_optimizer=True)
    tensors["base_model.model.extra.lora_A.weight"] = torch.zeros(2, 2)
    return tensors, metadata, True


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_bad_imports_are_refused_and_change_nothing(case, tenants):
    make, message = BAD_IMPORTS[case]
    tensors, metadata, with_optimizer = make(tenants)
    before = snapshot(tenants, "m")
    with pytest.raises(InvalidRequest, match=message):
        tenants.import_state("m", tensors, metadata, with_optimizer=with_optimizer)
    assert_unchanged(tenants, "m", before)


def test_good_import_changes_everything(tenants, qwen3_path):
    """The control for the cases above: the unspoilt "src" checkpoint does load and does change
    weights, optimizer state and pending gradients (so 'unchanged' above means refused)."""
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=4, seed=1))
    train(engine, "m", range(2))
    engine.forward_backward(fb("m", batch(5)))
    before = snapshot(engine, "m")
    tensors, metadata = tenants.export_state("src", with_optimizer=True)
    engine.import_state("m", tensors, metadata, with_optimizer=True)
    after, grads = snapshot(engine, "m")
    assert all(not torch.equal(after[k], v) for k, v in before[0].items() if not k.endswith(".step"))
    assert all(g is None for g in grads.values())
    assert_identical(after, tensors)


@pytest.mark.parametrize(
    "blob",
    [b"", b"garbage", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}", bytes(range(256)) * 4, "truncated", "plain adapter"],
)
def test_read_state_refuses_what_is_not_a_checkpoint(blob, qwen3_path):
    if isinstance(blob, str):
        engine = LoraEngine(qwen3_path, device="cpu")
        engine.create("m", LoraSpec(rank=2))
        good = state_bytes(engine, "m", with_optimizer=True)
        read_state(good)  # control: the untouched bytes read
        blob = good[:-7] if blob == "truncated" else adapter_bytes(engine, "m")  # safetensors, no metadata
    with pytest.raises(InvalidRequest):
        read_state(blob)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda_fused_adamw(qwen3_path):
    """On a GPU AdamW is fused (its step lives on the device); a resumed run tracks the original."""
    straight, resumed = LoraEngine(qwen3_path, device="cuda"), LoraEngine(qwen3_path, device="cuda")
    straight.create("m", LoraSpec(rank=4, seed=1))
    resumed.create("m", LoraSpec(rank=4, seed=9))
    train(straight, "m", range(2))
    tensors, metadata = read_state(state_bytes(straight, "m", with_optimizer=True))
    resumed.import_state("m", tensors, metadata, with_optimizer=True)
    train(straight, "m", range(2, 4))
    train(resumed, "m", range(2, 4))
    got, want = resumed.export_state("m", with_optimizer=True)[0], straight.export_state("m", with_optimizer=True)[0]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
