"""The per-token math of sampling, as pure functions on batched tensors (no model, no state).

Randomness comes in as uniforms drawn by the caller, one per draw, so that a row's tokens
depend only on its own seed and never on what else shares the batch. A token is drawn by
inverting the cumulative distribution: the first token whose cumulative probability exceeds
`u * total`. A token of probability zero is never drawn.
"""

from __future__ import annotations

import numpy as np
import torch

SENTINEL_TOKEN = 0  # Tinker's empty top-k cell: (token 0, logprob -99999.0)
SENTINEL_LOGPROB = -99999.0


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for the stream `key` of a request seeded with `seed` (any Python int).

    Streams with different keys are independent; the same (seed, key) always gives the same seed.
    """
    entropy = seed % 2**128  # SeedSequence takes non-negative ints only; keeps negative seeds distinct
    state = np.random.SeedSequence(entropy, spawn_key=key).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def uniforms(seed: int, *key: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 uniforms in [0, 1) for stream `key`, drawn on the CPU so every device sees the same ones."""
    gen = torch.Generator().manual_seed(derive_seed(seed, *key))
    return torch.rand(shape, generator=gen)


def filter_top_k_top_p(scaled_B_V: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits that top-k, then top-p (on the renormalised rest), remove.

    `scaled_B_V` are temperature-scaled logits. `top_k_B` is int64 (>= vocab size: off; ties
    with the k-th logit are kept), `top_p_B` float32 in (0, 1] (1: off). As in HF's and vLLM's
    warpers, top-p keeps the smallest set of most likely tokens whose probability reaches p
    (always at least the most likely one).
    """
    sorted_B_V, order_B_V = scaled_B_V.sort(dim=-1, descending=True)
    vocab = scaled_B_V.shape[-1]
    kth_B = sorted_B_V.gather(-1, (top_k_B.clamp(1, vocab) - 1)[:, None])
    sorted_B_V = sorted_B_V.masked_fill(sorted_B_V < kth_B, float("-inf"))
    probs_B_V = sorted_B_V.softmax(dim=-1)
    mass_before_B_V = probs_B_V.cumsum(dim=-1) - probs_B_V  # probability of the more likely tokens
    drop_B_V = mass_before_B_V >= top_p_B[:, None]
    drop_B_V[:, 0] = False
    sorted_B_V = sorted_B_V.masked_fill(drop_B_V, float("-inf"))
    return torch.empty_like(scaled_B_V).scatter_(-1, order_B_V, sorted_B_V)


def draw(probs_N_V: torch.Tensor, u_N_K: torch.Tensor) -> torch.Tensor:
    """K tokens per row by inverse CDF: int64 [N, K]. Rows of `probs_N_V` need not be normalised."""
    cdf_N_V = probs_N_V.cumsum(dim=-1)
    target_N_K = u_N_K.to(cdf_N_V.dtype) * cdf_N_V[:, -1:]
    tokens_N_K = torch.searchsorted(cdf_N_V, target_N_K, right=True)
    # u * total can round up to total itself: fall back to the last token that has probability.
    last_N = (probs_N_V > 0).cumsum(dim=-1).argmax(dim=-1)
    return torch.minimum(tokens_N_K, last_N[:, None])


def top_logprobs(logp_N_V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logprobs per row: (int64 tokens [N, k], float32 logprobs [N, k]).

    When k exceeds the vocabulary the extra cells hold Tinker's sentinel (0, -99999.0).
    """
    n, vocab = logp_N_V.shape
    values_N_K, tokens_N_K = logp_N_V.topk(min(k, vocab), dim=-1)
    if k > vocab:
        pad = (0, k - vocab)
        tokens_N_K = torch.nn.functional.pad(tokens_N_K, pad, value=SENTINEL_TOKEN)
        values_N_K = torch.nn.functional.pad(values_N_K, pad, value=SENTINEL_LOGPROB)
    return tokens_N_K, values_N_K.float()


def pick(logits_B_V: torch.Tensor, rows, u_B: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The next token of every row, its logprob, and the tempered logprobs [B, V] it came from."""
    logits_B_V = logits_B_V.float()
    scaled_B_V = logits_B_V / rows.temperature[:, None]
    logp_B_V = scaled_B_V.log_softmax(-1)
    token_B = logits_B_V.argmax(-1)
    if rows.any_random:
        if rows.any_filter:
            probs_B_V = filter_top_k_top_p(scaled_B_V, rows.top_k, rows.top_p).softmax(-1)
        else:
            probs_B_V = logp_B_V.exp()
        token_B = torch.where(rows.greedy, token_B, draw(probs_B_V, u_B[:, None])[:, 0])
    return token_B, logp_B_V.gather(-1, token_B[:, None])[:, 0], logp_B_V
