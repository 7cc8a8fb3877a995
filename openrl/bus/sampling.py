"""The checks of a sampling request that need no model, in one place.

The gateway runs them before it queues a request (a 400 naming the field), and the sampler
runs them again (a message on the bus need not have come through a gateway); the sampler then
adds the checks that need its model (context length, vocabulary: openrl.sampler.spec).
"""

from __future__ import annotations

import math
import numbers

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SampleRequest, SamplingParams


def check_params(p: SamplingParams) -> None:
    """Raise InvalidRequest naming the first bad field of `p`."""
    if p.max_tokens is not None and (not _is_int(p.max_tokens) or p.max_tokens < 1):
        raise InvalidRequest(f"sampling_params.max_tokens must be >= 1, got {p.max_tokens}")
    if not _is_number(p.temperature) or not math.isfinite(p.temperature) or p.temperature < 0:
        raise InvalidRequest(f"sampling_params.temperature must be >= 0, got {p.temperature}")
    if not _is_number(p.top_p) or not math.isfinite(p.top_p) or not 0 < p.top_p <= 1:
        raise InvalidRequest(f"sampling_params.top_p must be in (0, 1], got {p.top_p}")
    if not _is_int(p.top_k) or (p.top_k != -1 and p.top_k < 1):
        raise InvalidRequest(f"sampling_params.top_k must be -1 (off) or >= 1, got {p.top_k}")
    if p.seed is not None and not _is_int(p.seed):
        raise InvalidRequest(f"sampling_params.seed must be an integer, got {p.seed!r}")
    if len(p.stop_strings) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"sampling_params.stop: {len(p.stop_strings)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
    if not all(isinstance(s, str) and s for s in p.stop_strings):
        raise InvalidRequest("sampling_params.stop: stop strings must be non-empty strings")
    if any(len(s) > MAX_STOP_STRING_CHARS for s in p.stop_strings):
        raise InvalidRequest(f"sampling_params.stop: a stop string may hold at most {MAX_STOP_STRING_CHARS} characters")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"sampling_params.stop: {len(p.stop_token_ids)} stop token ids; at most {MAX_STOP_TOKEN_IDS} are allowed")
    if not all(_is_int(t) and t >= 0 for t in p.stop_token_ids):
        raise InvalidRequest("sampling_params.stop: token ids must be integers >= 0")


def params_of(msg: SampleRequest) -> SamplingParams:
    """The request's sampling parameters: `msg.sampling`, or from the flat fields an older
    gateway sent (its max_tokens 0 meant the sampler's default)."""
    if msg.sampling is not None:
        return msg.sampling
    return SamplingParams(
        max_tokens=msg.max_tokens or None,
        temperature=msg.temperature,
        top_k=msg.top_k,
        top_p=msg.top_p,
        seed=msg.seed,
        stop_strings=list(msg.stop_strings),
        stop_token_ids=list(msg.stop_token_ids),
        stop_at_eos=msg.stop_at_eos,
    )


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
