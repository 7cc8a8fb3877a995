"""Tinker's built-in losses as pure functions of the learner's log-probabilities.

Every loss is a SUM over tokens and datums, never a mean: Tinker leaves normalization to
the caller's weights or advantages. Each function takes flat per-token tensors of the
whole batch (M = all datums' tokens concatenated) and returns a 0-d loss whose gradient
is the one to accumulate; none of them reads anything but its arguments, so a server-side
custom loss can reuse them.

Notation (as in Tinker's docs): `lp` the learner's logprob of each target token, `q` the
sampler's logprob of it (`loss_fn_inputs["logprobs"]`), `A` the advantage, `sg` a
stop-gradient (`.detach()`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Signature:
    """What a loss reads: required and optional `loss_fn_inputs`, `loss_fn_config` keys with
    their defaults, and the facts the engine needs to feed it."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config: tuple[tuple[str, float], ...] = ()
    top_k: bool = False  # target_tokens may be (N, K): logprobs of K candidates per position
    ones: tuple[str, ...] = ()  # optional inputs that default to ones shaped like target_tokens
    # The input marking the tokens of a per-sequence quantity (gspo's sequence ratio): such a
    # loss couples a datum's tokens, so it also gets each token's datum index ("datum_index").
    sequence_mask: str | None = None

    def accepts(self) -> list[str]:
        return sorted(self.required + self.optional)


_RL = ("target_tokens", "logprobs", "advantages")
# Per-token thresholds: the SDK knows these keys as per-token float32 inputs; where a datum
# sends one it replaces that loss_fn_config value for the datum's tokens.
_CLIP = ("clip_low_threshold", "clip_high_threshold")

SIGNATURES = {
    "cross_entropy": Signature(required=("target_tokens",), optional=("weights",), top_k=True, ones=("weights",)),
    "importance_sampling": Signature(required=_RL),
    "ppo": Signature(required=_RL, optional=_CLIP, config=(("clip_low_threshold", 0.8), ("clip_high_threshold", 1.2))),
    # One-sided by default (Tinker tutorial 202): the weight is capped, never floored.
    "cispo": Signature(required=_RL, optional=_CLIP, config=(("clip_low_threshold", 0.0), ("clip_high_threshold", 4.0))),
    # Tinker publishes no default beta; 0.05 is the value its docs' DRO example passes.
    "dro": Signature(required=_RL, config=(("beta", 0.05),)),
    # Tinker publishes no GSPO defaults; we take PPO's, as GSPO reads the same keys. The
    # GSPO paper clips its sequence ratio much tighter (1 - 3e-4, 1 + 4e-4): pass those
    # explicitly to reproduce it.
    "gspo": Signature(
        required=(*_RL, "sequence_ratio_mask"),
        optional=_CLIP,
        config=(("clip_low_threshold", 0.8), ("clip_high_threshold", 1.2)),
        sequence_mask="sequence_ratio_mask",
    ),
}

INPUT_DTYPES = {"target_tokens": "int64"}  # every other loss input is float32

Bound = torch.Tensor | float  # a clip threshold: per token, or one for all tokens


def cross_entropy(lp_M: torch.Tensor, weights_M: torch.Tensor) -> torch.Tensor:
    """-Σ w·lp. Any shape (also (M, K) for top-K distillation); weights may be negative."""
    return -(weights_M * lp_M).sum()


def importance_sampling(lp_M: torch.Tensor, q_M: torch.Tensor, adv_M: torch.Tensor) -> torch.Tensor:
    """-Σ exp(lp - q)·A: REINFORCE corrected for sampling from q."""
    return -(torch.exp(lp_M - q_M) * adv_M).sum()


def ppo(lp_M: torch.Tensor, q_M: torch.Tensor, adv_M: torch.Tensor, low_M: Bound, high_M: Bound) -> torch.Tensor:
    """-Σ min(r·A, clamp(r, low, high)·A), r = exp(lp - q); low/high are absolute ratios."""
    ratio_M = torch.exp(lp_M - q_M)
    return -_pessimistic(ratio_M, adv_M, low_M, high_M).sum()


def cispo(lp_M: torch.Tensor, q_M: torch.Tensor, adv_M: torch.Tensor, low_M: Bound, high_M: Bound) -> torch.Tensor:
    """-Σ sg(clamp(r, low, high))·lp·A: the clipped ratio only weighs the policy gradient,
    so clipped tokens still get a gradient (unlike PPO, which drops them)."""
    weight_M = _clamp(torch.exp(lp_M - q_M), low_M, high_M).detach()
    return -(weight_M * lp_M * adv_M).sum()


def dro(lp_M: torch.Tensor, q_M: torch.Tensor, adv_M: torch.Tensor, beta: float) -> torch.Tensor:
    """-Σ (lp·A - ½·β·(lp - q)²): a quadratic penalty keeps the learner near the sampler."""
    return -(lp_M * adv_M - 0.5 * beta * (lp_M - q_M) ** 2).sum()


def gspo(
    lp_M: torch.Tensor,
    q_M: torch.Tensor,
    adv_M: torch.Tensor,
    in_ratio_M: torch.Tensor,
    datum_M: torch.Tensor,
    low_M: Bound,
    high_M: Bound,
) -> torch.Tensor:
    """GSPO-token: -Σ min(r_t·A, clamp(r_t, low, high)·A) with r_t = exp(ℓ + lp - sg(lp)),
    where ℓ is the mean of sg(lp) - q over the datum's tokens with in_ratio_M != 0.

    r_t's value is the datum's sequence ratio exp(ℓ); its gradient is that of its own lp.
    `datum_M` holds each token's datum index; every datum needs a token in its ratio (the
    caller checks), else ℓ would be 0/0.
    """
    n_datums = int(datum_M.max()) + 1 if datum_M.numel() else 0
    in_ratio_M = (in_ratio_M != 0).to(lp_M.dtype)
    log_ratio_M = (lp_M.detach() - q_M) * in_ratio_M
    sums_D = lp_M.new_zeros(n_datums).index_add_(0, datum_M, log_ratio_M)
    counts_D = lp_M.new_zeros(n_datums).index_add_(0, datum_M, in_ratio_M)
    seq_log_ratio_M = (sums_D / counts_D)[datum_M]
    ratio_M = torch.exp(seq_log_ratio_M + lp_M - lp_M.detach())
    return -_pessimistic(ratio_M, adv_M, low_M, high_M).sum()


def _pessimistic(ratio_M: torch.Tensor, adv_M: torch.Tensor, low_M: Bound, high_M: Bound) -> torch.Tensor:
    """PPO's per-token objective: the smaller of the unclipped and clipped surrogates."""
    return torch.minimum(ratio_M * adv_M, _clamp(ratio_M, low_M, high_M) * adv_M)


def _clamp(x_M: torch.Tensor, low: Bound, high: Bound) -> torch.Tensor:
    # Two one-sided clamps: each bound may be a number or a per-token tensor.
    return x_M.clamp(min=low).clamp(max=high)


def total(loss_fn: str, lp_M: torch.Tensor, x: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    """The summed loss `loss_fn` of a batch. `x` holds its inputs as flat per-token tensors
    with defaults filled in (weights, per-token clip thresholds) plus, for gspo,
    "datum_index"; `config` its validated `loss_fn_config` with defaults. `lp_M` is (M, K)
    for a top-K loss, else (M,).

    Every loss is a sum of per-datum terms, so the total of a request is the sum of its
    micro-batches' totals as long as no datum is split (the engine never splits one)."""
    match loss_fn:
        case "cross_entropy":
            return cross_entropy(lp_M, x["weights"])
        case "importance_sampling":
            return importance_sampling(lp_M, x["logprobs"], x["advantages"])
        case "dro":
            return dro(lp_M, x["logprobs"], x["advantages"], config["beta"])
        case "ppo":
            return ppo(lp_M, x["logprobs"], x["advantages"], x["clip_low_threshold"], x["clip_high_threshold"])
        case "cispo":
            return cispo(lp_M, x["logprobs"], x["advantages"], x["clip_low_threshold"], x["clip_high_threshold"])
        case "gspo":
            return gspo(
                lp_M, x["logprobs"], x["advantages"], x["sequence_ratio_mask"], x["datum_index"],
                x["clip_low_threshold"], x["clip_high_threshold"],
            )  # fmt: skip
    raise ValueError(f"unknown loss {loss_fn!r}")  # the engine checks the name before
