"""Every Tinker loss of LoraEngine against a plain-torch reference.

The reference (reference.py) runs each datum alone through an independent copy of the
base model with hand-written LoRA layers (`W x + (alpha / r) B A x`) and applies AdamW by
hand; each loss is written out here from Tinker's docs (clipping with torch.where, GSPO's
ratio as sg(s) * p / sg(p)) without importing openrl.trainer.losses. Loss, per-datum
logprobs, gradients and the weights after optim_step must agree to fp32 tolerance. The data
are built so that ratios are clipped on both sides and advantages take both signs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import AdamParams, Datum, ForwardBackward, LoraSpec, Tensor
from openrl.trainer.engine import LORA_ALPHA, LoraEngine
from factories import tensor
from reference import Reference, cross_entropy as ref_cross_entropy

VOCAB = 96
TOL = dict(rtol=1e-4, atol=1e-5)
RANK = 4
# eps well above fp32 noise: Adam's first steps move each weight by about lr * g / (|g| + eps),
# which for a tiny eps turns rounding noise in near-zero gradients into lr-sized differences
# (test_engine.py covers AdamW itself).
ADAM = AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-4, weight_decay=0.1, grad_clip_norm=0.5)


# ---------------------------------------------------------------------- request builders


def csr(dense, dtype: str) -> Tensor:
    """A 2-D array as the SDK's sparse CSR TensorData (zeros unlisted)."""
    arr = np.asarray(dense, dtype="<i8" if dtype == "int64" else "<f4")
    rows, cols = np.nonzero(arr)
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=arr.shape[0]))]).astype("<i8")
    return Tensor(
        dtype=dtype, data=arr[rows, cols].tobytes(), shape=list(arr.shape),
        crow=crow.tobytes(), col=cols.astype("<i8").tobytes(),
    )  # fmt: skip


def make_datum(tokens, **inputs) -> Datum:
    """inputs: name -> Tensor, or values (target_tokens int64, the rest float32)."""
    built = {
        k: v if isinstance(v, Tensor) else tensor(v, "int64" if k == "target_tokens" else "float32")
        for k, v in inputs.items()
    }
    return Datum(tokens=np.asarray(tokens, dtype="<i4").tobytes(), loss_fn_inputs=built)


def fb(data, loss_fn, config=None, forward_only=False) -> ForwardBackward:
    return ForwardBackward(
        request_id="r", model_id="m", seq_id=1, loss_fn=loss_fn, loss_fn_config=config or {},
        forward_only=forward_only, data=data,
    )  # fmt: skip


# ---------------------------------------------------------------------- the reference losses


def clip(r, low, high):
    """clamp written with torch.where: outside [low, high] the value is the bound, no gradient."""
    low, high = torch.as_tensor(low, dtype=r.dtype), torch.as_tensor(high, dtype=r.dtype)
    return torch.where(r < low, low, torch.where(r > high, high, r))


def ref_importance_sampling(lp, d):
    return -(torch.exp(lp - d["logprobs"]) * d["advantages"]).sum()


def ref_ppo(low, high):
    def loss(lp, d):
        lo, hi = d.get("clip_low_threshold", low), d.get("clip_high_threshold", high)
        r, a = torch.exp(lp - d["logprobs"]), d["advantages"]
        return -torch.min(r * a, clip(r, lo, hi) * a).sum()

    return loss


def ref_cispo(low, high):
    def loss(lp, d):
        lo, hi = d.get("clip_low_threshold", low), d.get("clip_high_threshold", high)
        r = torch.exp(lp - d["logprobs"])
        return -(clip(r, lo, hi).detach() * lp * d["advantages"]).sum()

    return loss


def ref_dro(beta):
    def loss(lp, d):
        q, a = d["logprobs"], d["advantages"]
        return -(lp * a - 0.5 * beta * (lp - q) ** 2).sum()

    return loss


def ref_gspo(low, high):
    def loss(lp, d):
        lo, hi = d.get("clip_low_threshold", low), d.get("clip_high_threshold", high)
        keep = d["sequence_ratio_mask"] != 0
        s = torch.exp((lp[keep] - d["logprobs"][keep]).mean())  # the sequence ratio
        r = s.detach() * torch.exp(lp) / torch.exp(lp).detach()  # value s, gradient of lp
        a = d["advantages"]
        return -torch.min(r * a, clip(r, lo, hi) * a).sum()

    return loss


# ---------------------------------------------------------------------- data


def rl_data(ref: Reference, seed: int, *, spread=1.5, lengths=(9, 13, 6), prompt=2) -> list[dict]:
    """Datums whose sampler logprobs q differ from the learner's lp by up to ±spread nats,
    so exp(lp - q) lands on both sides of any clip range; advantages of both signs, 0 on
    the prompt positions (where q is 0 as a sampler leaves it and the ratio mask is 0)."""
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        tokens = rng.integers(0, VOCAB, n)
        targets = rng.integers(0, VOCAB, n)
        with torch.no_grad():
            lp = ref.logprobs(tokens.tolist(), targets).numpy()
        q = (lp - rng.uniform(-spread, spread, n)).astype(np.float32)
        adv = rng.normal(0, 1, n).astype(np.float32)
        q[:prompt], adv[:prompt] = 0.0, 0.0
        mask = np.ones(n, dtype=np.float32)
        mask[:prompt] = 0.0
        data.append(dict(tokens=tokens, target_tokens=targets, logprobs=q, advantages=adv, sequence_ratio_mask=mask))
    return data


def gspo_data(ref: Reference, seed: int) -> list[dict]:
    """Like rl_data, with each datum's sequence log-ratio shifted: +0.6 (ratio above 1.2),
    -0.6 (below 0.8), 0 (inside)."""
    data = rl_data(ref, seed, spread=0.3)
    for d, shift in zip(data, (0.6, -0.6, 0.0)):
        d["logprobs"] = np.where(d["sequence_ratio_mask"] != 0, d["logprobs"] - shift, 0.0).astype(np.float32)
    return data


def datums(data: list[dict], keys) -> list[Datum]:
    return [make_datum(d["tokens"], **{k: d[k] for k in keys if k in d}) for d in data]


def ratios(ref: Reference, data) -> np.ndarray:
    """exp(lp - q) on the positions that carry an advantage (not the prompt's)."""
    out = []
    with torch.no_grad():
        for d in data:
            r = np.exp(ref.logprobs(d["tokens"], d["target_tokens"]).numpy() - d["logprobs"])
            out.append(r[d["advantages"] != 0])
    return np.concatenate(out)


# ---------------------------------------------------------------------- comparison


def assert_tensors_close(got: dict, want: dict, **tol):
    """Each tensor close elementwise, with an absolute slack of 1e-4 of its largest entry:
    a gradient is a sum of many terms, and where they cancel, an entry keeps only the
    rounding noise of the big ones (batching vs one datum at a time sums differently)."""
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:
            assert got[k] is None or not got[k].any(), k
        else:
            scaled = dict(rtol=1e-4, atol=max(1e-5, 1e-4 * want[k].abs().max().item()))
            torch.testing.assert_close(got[k], want[k], msg=lambda m: f"{k}: {m}", **(tol or scaled))


def new_pair(path: str, seed: int = 7) -> tuple[LoraEngine, Reference]:
    engine = LoraEngine(path, device="cpu")
    engine.create("m", LoraSpec(rank=RANK, seed=seed))
    return engine, Reference(path, engine.adapter_state("m"), rank=RANK, alpha=LORA_ALPHA)


def step_both(engine, ref, request: ForwardBackward, data: list[dict], ref_loss_fn) -> None:
    out = engine.forward_backward(request)
    want_lp, want_loss = ref.forward_backward(data, ref_loss_fn)
    assert out.metrics["loss:sum"] == pytest.approx(want_loss, rel=1e-4, abs=1e-4)
    assert out.metrics["tokens:sum"] == sum(len(d["tokens"]) for d in data)
    assert all(key.count(":") == 1 for key in out.metrics)
    assert len(out.logprobs) == len(data)
    for got, want in zip(out.logprobs, want_lp):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, **TOL)
    assert_tensors_close(engine.adapter_grads("m"), ref.grads())
    engine.optim_step("m", ADAM)
    ref.optim_step(ADAM)
    assert_tensors_close(engine.adapter_state("m"), ref.state())


RL_KEYS = ("target_tokens", "logprobs", "advantages")

# loss_fn, config sent, reference, the clip range the data must straddle (None: no clipping)
RL_CASES = {
    "importance_sampling": ("importance_sampling", {}, ref_importance_sampling, None),
    "ppo defaults": ("ppo", {}, ref_ppo(0.8, 1.2), (0.8, 1.2)),
    "ppo explicit": ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.5}, ref_ppo(0.9, 1.5), (0.9, 1.5)),
    "cispo defaults": ("cispo", {}, ref_cispo(0.0, 4.0), (0.0, 4.0)),
    "cispo explicit": ("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}, ref_cispo(0.5, 1.5), (0.5, 1.5)),
    "dro defaults": ("dro", {}, ref_dro(0.05), None),
    "dro explicit": ("dro", {"beta": 0.7}, ref_dro(0.7), None),
}  # fmt: skip


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(RL_CASES))
def test_rl_losses_match_reference(case, qwen3_path):
    loss_fn, config, ref_loss_fn, clip_range = RL_CASES[case]
    engine, ref = new_pair(qwen3_path)
    spread = 3.0 if case == "cispo defaults" else 1.5  # reach ratios above 4 and below 0.1
    for step in range(3):
        data = rl_data(ref, seed=step, spread=spread)
        if clip_range and step == 0:
            r = ratios(ref, data)
            low, high = clip_range
            # Clipped on both sides; a zero low clips nothing, but ratios under 0.1 would
            # expose a default low that is not 0.
            assert (r > high).any() and (r < max(low, 0.1)).any(), sorted(r)
        step_both(engine, ref, fb(datums(data, RL_KEYS), loss_fn, config), data, ref_loss_fn)


@pytest.mark.parametrize("config, low, high", [({}, 0.8, 1.2), ({"clip_low_threshold": 0.7, "clip_high_threshold": 1.4}, 0.7, 1.4)])
def test_gspo_matches_reference(config, low, high, qwen3_path):
    engine, ref = new_pair(qwen3_path)
    for step in range(3):
        data = gspo_data(ref, seed=step)
        if step == 0:  # one sequence ratio above the range, one below, one inside
            seq = [np.exp(np.mean(np.log(ratios(ref, [d])))) for d in data]  # mask == (A != 0) here
            assert seq[0] > high and seq[1] < low and low < seq[2] < high, seq
        request = fb(datums(data, (*RL_KEYS, "sequence_ratio_mask")), "gspo", config)
        step_both(engine, ref, request, data, ref_gspo(low, high))


def test_gspo_ratio_ignores_unmasked_tokens(qwen3_path):
    """Changing q where the mask is 0 changes nothing (those tokens' A is 0 too)."""
    engine, ref = new_pair(qwen3_path)
    data = gspo_data(ref, seed=5)
    keys = (*RL_KEYS, "sequence_ratio_mask")
    first = engine.forward_backward(fb(datums(data, keys), "gspo", forward_only=True))
    for d in data:
        d["logprobs"] = np.where(d["sequence_ratio_mask"] != 0, d["logprobs"], -9.0).astype(np.float32)
    second = engine.forward_backward(fb(datums(data, keys), "gspo", forward_only=True))
    assert first.metrics["loss:sum"] == second.metrics["loss:sum"]
    data[0]["sequence_ratio_mask"][:] = 1.0  # now the -9 counts: the loss moves
    third = engine.forward_backward(fb(datums(data, keys), "gspo", forward_only=True))
    assert third.metrics["loss:sum"] != pytest.approx(first.metrics["loss:sum"], rel=1e-3)


@pytest.mark.parametrize("loss_fn", ["ppo", "cispo", "gspo"])
def test_per_token_clip_thresholds(loss_fn, qwen3_path):
    """clip_*_threshold inputs replace the config for their datum's tokens; other datums
    keep the config's values."""
    engine, ref = new_pair(qwen3_path)
    config = {"clip_low_threshold": 0.85, "clip_high_threshold": 1.3}
    make_ref = {"ppo": ref_ppo, "cispo": ref_cispo, "gspo": ref_gspo}[loss_fn]
    keys = (*RL_KEYS, "sequence_ratio_mask", "clip_low_threshold", "clip_high_threshold")
    for step in range(2):
        data = gspo_data(ref, seed=10 + step) if loss_fn == "gspo" else rl_data(ref, seed=10 + step)
        n = len(data[0]["tokens"])
        data[0]["clip_low_threshold"] = np.linspace(0.3, 0.95, n).astype(np.float32)
        data[0]["clip_high_threshold"] = np.linspace(1.05, 2.0, n).astype(np.float32)
        data[1]["clip_high_threshold"] = np.full(len(data[1]["tokens"]), 1.1, dtype=np.float32)  # low from config
        if loss_fn != "gspo":
            data = [{k: v for k, v in d.items() if k != "sequence_ratio_mask"} for d in data]
        step_both(engine, ref, fb(datums(data, keys), loss_fn, config), data, make_ref(0.85, 1.3))


def _top_k_data(seed: int) -> list[dict]:
    """A (N,) datum and two top-K datums of different K, weights of both signs."""
    rng = np.random.default_rng(seed)
    data = []
    for n, k in ((7, None), (10, 3), (5, 5)):
        shape = (n,) if k is None else (n, k)
        weights = rng.uniform(-0.5, 1.5, shape).astype(np.float32)
        weights[rng.uniform(size=shape) < 0.3] = 0.0  # sparse, as top-K distillation sends
        data.append(dict(tokens=rng.integers(0, VOCAB, n), target_tokens=rng.integers(1, VOCAB, shape), weights=weights))
    return data


@pytest.mark.parametrize("encoding", ["dense", "csr"])
def test_cross_entropy_top_k_matches_reference(encoding, qwen3_path):
    engine, ref = new_pair(qwen3_path)
    for step in range(3):
        data = _top_k_data(step)
        request_data = []
        for d in data:
            if encoding == "csr" and d["weights"].ndim == 2:
                # The SDK sends 2-D targets and weights as CSR when that is smaller; targets
                # unlisted are token 0, so zero their weights' cells for a fair reference.
                d["target_tokens"] = np.where(d["weights"] != 0, d["target_tokens"], 0)
                inputs = dict(target_tokens=csr(d["target_tokens"], "int64"), weights=csr(d["weights"], "float32"))
            else:
                inputs = dict(target_tokens=d["target_tokens"], weights=d["weights"])
            request_data.append(make_datum(d["tokens"], **inputs))
        step_both(engine, ref, fb(request_data, "cross_entropy"), data, ref_cross_entropy)


def test_cross_entropy_top_k_weights_default_to_one(qwen3_path):
    engine, ref = new_pair(qwen3_path)
    data = [{k: v for k, v in d.items() if k != "weights"} for d in _top_k_data(4)]
    step_both(engine, ref, fb(datums(data, ("target_tokens",)), "cross_entropy"), data, ref_cross_entropy)


@pytest.mark.parametrize(
    "loss_fn, defaults",
    [
        ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        ("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
        ("dro", {"beta": 0.05}),
        ("gspo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ],
)
def test_config_defaults_equal_explicit_values(loss_fn, defaults, qwen3_path):
    """Omitting the config equals sending the documented defaults, and a different value
    changes the result (so the config is read at all)."""
    engine, ref = new_pair(qwen3_path)
    data = datums(gspo_data(ref, seed=3) if loss_fn == "gspo" else rl_data(ref, seed=3, spread=3.0),
                  (*RL_KEYS, "sequence_ratio_mask") if loss_fn == "gspo" else RL_KEYS)  # fmt: skip
    outs = [engine.forward_backward(fb(data, loss_fn, config, forward_only=True)) for config in ({}, defaults)]
    assert outs[0].metrics == outs[1].metrics
    other = {k: v * 0.5 + 0.05 for k, v in defaults.items()}
    moved = engine.forward_backward(fb(data, loss_fn, other, forward_only=True))
    assert moved.metrics["loss:sum"] != pytest.approx(outs[0].metrics["loss:sum"], rel=1e-4)


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro", "gspo"])
def test_forward_only_rl_loss_changes_nothing(loss_fn, qwen3_path):
    engine, ref = new_pair(qwen3_path)
    data = gspo_data(ref, seed=1)
    keys = (*RL_KEYS, "sequence_ratio_mask") if loss_fn == "gspo" else RL_KEYS
    before = engine.adapter_state("m")
    fwd = engine.forward_backward(fb(datums(data, keys), loss_fn, forward_only=True))
    assert all(g is None for g in engine.adapter_grads("m").values())
    assert_tensors_close(engine.adapter_state("m"), before, rtol=0, atol=0)
    full = engine.forward_backward(fb(datums(data, keys), loss_fn))
    assert fwd.metrics == pytest.approx(full.metrics, rel=1e-6)


# ---------------------------------------------------------------------- bad requests

N = 4
TOKENS = [1, 2, 3, 4]
GOOD = dict(target_tokens=[2, 3, 4, 5], logprobs=[-1.0, -2.0, -0.5, -1.5], advantages=[1.0, -1.0, 0.5, 0.0])


def rl(loss_fn="ppo", config=None, **changes):
    """A ppo-style request with some inputs replaced (None removes one)."""
    inputs = {k: v for k, v in {**GOOD, **changes}.items() if v is not None}
    return fb([make_datum(TOKENS, **inputs)], loss_fn, config)


def ce(config=None, **inputs):
    return fb([make_datum(TOKENS, **inputs)], "cross_entropy", config)


NAN, INF = float("nan"), float("inf")
MASK = dict(sequence_ratio_mask=[0.0, 1.0, 1.0, 1.0])
SUPPORTED = "supported: cross_entropy, importance_sampling, ppo, cispo, dro, gspo"
BAD = {
    # unsupported losses
    "stable_reinforce": (lambda: rl("stable_reinforce"), ["'stable_reinforce' is not supported", "math is unpublished", "importance_sampling, ppo or cispo", SUPPORTED]),
    "custom": (lambda: rl("custom"), ["'custom' is not supported", "server-side custom losses", SUPPORTED]),
    "unknown loss": (lambda: rl("grpo"), ["loss_fn 'grpo' is not supported; " + SUPPORTED]),
    # inputs: required, unknown, dtype, shape
    "ppo without logprobs": (lambda: rl(logprobs=None), ["data[0].loss_fn_inputs: logprobs is required by ppo"]),
    "is without advantages": (lambda: rl("importance_sampling", advantages=None), ["advantages is required by importance_sampling"]),
    "gspo without mask": (lambda: rl("gspo"), ["sequence_ratio_mask is required by gspo"]),
    "ppo with weights": (lambda: rl(weights=[1.0] * N), ["unknown ['weights']; ppo takes ['advantages', 'clip_high_threshold', 'clip_low_threshold', 'logprobs', 'target_tokens']"]),
    "dro with clip input": (lambda: rl("dro", clip_low_threshold=[0.5] * N), ["unknown ['clip_low_threshold']; dro takes ['advantages', 'logprobs', 'target_tokens']"]),
    "advantages as int64": (lambda: rl(advantages=tensor([1, 0, 1, 0], "int64")), ["advantages: dtype must be float32, got int64"]),
    "mask as int64": (lambda: rl("gspo", sequence_ratio_mask=tensor([1, 1, 1, 1], "int64")), ["sequence_ratio_mask: dtype must be float32"]),
    "logprobs too short": (lambda: rl(logprobs=[-1.0] * 3), ["logprobs: shape must be [4] (one per token), got [3]"]),
    "2-D rl targets": (lambda: rl(target_tokens=[[2, 3]] * N), ["target_tokens: shape must be [4] (one per token), got [4, 2]", "only cross_entropy takes (N, K)"]),
    "2-D advantages": (lambda: rl(advantages=[[1.0]] * N), ["advantages: shape must be [4]"]),
    "top-k targets wrong rows": (lambda: ce(target_tokens=[[2, 3]] * 3), ["target_tokens: shape must be [4] or [4, K]"]),
    "top-k with K = 0": (lambda: ce(target_tokens=np.zeros((N, 0), dtype=np.int64)), ["needs K >= 1"]),
    "1-D weights for top-k": (lambda: ce(target_tokens=[[2, 3]] * N, weights=[1.0] * N), ["weights: shape must be [4, 2] (that of target_tokens)"]),
    "top-k target out of vocab": (lambda: ce(target_tokens=[[2, VOCAB]] * N), ["target_tokens: token ids must be in"]),
    "csr top-k target out of vocab": (lambda: ce(target_tokens=csr([[2, VOCAB]] * N, "int64")), ["target_tokens: token ids must be in"]),
    # non-finite values
    "nan logprobs": (lambda: rl(logprobs=[-1.0, NAN, -1.0, -1.0]), ["logprobs: values must be finite"]),
    "-inf logprobs": (lambda: rl(logprobs=[-1.0, -INF, -1.0, -1.0]), ["logprobs: values must be finite"]),
    "inf advantages": (lambda: rl(advantages=[1.0, INF, 0.0, 0.0]), ["advantages: values must be finite"]),
    "nan 2-D weights": (lambda: ce(target_tokens=[[2, 3]] * N, weights=[[1.0, NAN]] * N), ["weights: values must be finite"]),
    "nan csr weights": (lambda: ce(target_tokens=[[2, 3]] * N, weights=csr([[0.0, NAN]] * N, "float32")), ["weights: values must be finite"]),
    "nan mask": (lambda: rl("gspo", sequence_ratio_mask=[1.0, NAN, 1.0, 1.0]), ["sequence_ratio_mask: values must be finite"]),
    "gspo all-zero mask": (lambda: rl("gspo", sequence_ratio_mask=[0.0] * N), ["data[0].loss_fn_inputs.sequence_ratio_mask is all zero"]),
    # config
    "ppo unknown config": (lambda: rl(config={"clip_range": 0.2}), ["loss_fn_config: unknown ['clip_range']; ppo takes ['clip_high_threshold', 'clip_low_threshold']"]),
    "ce with config": (lambda: ce(target_tokens=GOOD["target_tokens"], config={"beta": 0.1}), ["loss_fn_config: unknown ['beta']; cross_entropy takes no keys"]),
    "dro kl_coeff": (lambda: rl("dro", config={"kl_coeff": 0.1}), ["unknown ['kl_coeff']; dro takes ['beta']"]),
    "text config": (lambda: rl(config={"clip_low_threshold": "0.8"}), ["loss_fn_config['clip_low_threshold'] must be a finite number, got '0.8'"]),
    "nan config": (lambda: rl("dro", config={"beta": NAN}), ["loss_fn_config['beta'] must be a finite number"]),
    "inf threshold": (lambda: rl(config={"clip_high_threshold": INF}), ["must be a finite number"]),
    "low above high": (lambda: rl(config={"clip_low_threshold": 1.3}), ["need 0 <= clip_low_threshold <= clip_high_threshold, got 1.3, 1.2"]),
    "negative low": (lambda: rl("cispo", config={"clip_low_threshold": -0.1}), ["need 0 <= clip_low_threshold"]),
    "negative beta": (lambda: rl("dro", config={"beta": -0.05}), ["loss_fn_config['beta'] must be >= 0"]),
    # per-token thresholds
    "per-token low above high": (lambda: rl(clip_low_threshold=[0.5, 0.5, 1.5, 0.5]), ["data[0].loss_fn_inputs: need 0 <= clip_low_threshold <= clip_high_threshold at every token, got 1.5, 1.2 at position 2"]),
    "per-token negative low": (lambda: rl("gspo", **MASK, clip_low_threshold=[0.5, -1.0, 0.5, 0.5]), ["position 1"]),
    "per-token nan high": (lambda: rl(clip_high_threshold=[1.2, NAN, 1.2, 1.2]), ["clip_high_threshold: values must be finite"]),
    # a later datum is bad: nothing of the earlier ones is applied
    "bad second datum": (lambda: fb([make_datum(TOKENS, **GOOD), make_datum(TOKENS, **{**GOOD, "advantages": [NAN] * N})], "ppo"), ["data[1].loss_fn_inputs.advantages"]),
    # overflowing ratios: exp(lp - q) is inf, so the gradients would be NaN
    "is ratio overflow": (lambda: rl("importance_sampling", logprobs=[-1.0, -500.0, -1.0, -1.0]), ["gradients are not finite", "nothing was applied"]),
    # ... also where the loss stays finite (A > 0 picks the clipped branch) but its gradient is NaN
    "ppo ratio overflow": (lambda: rl(logprobs=[-500.0, -1.0, -1.0, -1.0]), ["gradients are not finite"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(qwen3_path):
    engine = LoraEngine(qwen3_path, device="cpu")
    engine.create("m", LoraSpec(rank=RANK, seed=1))
    engine.forward_backward(ce(target_tokens=GOOD["target_tokens"]))
    engine.optim_step("m", AdamParams(learning_rate=1e-2))  # B off zero: every gradient counts
    return engine


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_are_rejected_and_change_nothing(case, trained):
    make, phrases = BAD[case]
    trained.forward_backward(ce(target_tokens=GOOD["target_tokens"]))  # pending gradients must survive
    before, grads = trained.adapter_state("m"), trained.adapter_grads("m")
    with pytest.raises(InvalidRequest) as err:
        trained.forward_backward(make())
    for phrase in phrases:
        assert phrase in str(err.value), f"{phrase!r} not in {str(err.value)!r}"
    assert_tensors_close(trained.adapter_grads("m"), grads, rtol=0, atol=0)
    assert_tensors_close(trained.adapter_state("m"), before, rtol=0, atol=0)
    trained.optim_step("m", AdamParams(learning_rate=0.0))  # clear for the next case


def test_the_request_the_bad_cases_start_from_is_good(trained):
    """So each bad case above fails for its own reason."""
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        out = trained.forward_backward(rl(loss_fn))
        assert math.isfinite(out.metrics["loss:sum"])
    assert math.isfinite(trained.forward_backward(rl("gspo", **MASK)).metrics["loss:sum"])
    trained.optim_step("m", AdamParams(learning_rate=0.0))


def test_error_names_every_supported_loss():
    """The supported list in the messages is the engine's own list, in order."""
    from openrl.trainer.engine import LOSSES

    assert SUPPORTED == "supported: " + ", ".join(LOSSES)
