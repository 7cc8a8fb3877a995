"""Bus-message builders the tests share: Tensor, Datum, a random ForwardBackward, a SampleSpec.

(In tests/, not beside its users: tests/ is on sys.path for every test directory, since
tests/conftest.py's folder is; a second factories.py anywhere would shadow this one.)"""

from __future__ import annotations

import numpy as np

from openrl.bus.messages import Datum, ForwardBackward, SamplingParams, Tensor
from openrl.sampler.spec import SampleSpec

VOCAB = 96  # tests/trainer/conftest.py's tiny models


def tensor(values, dtype: str) -> Tensor:
    arr = np.asarray(values, dtype="<i8" if dtype == "int64" else "<f4")
    return Tensor(dtype=dtype, data=arr.tobytes(), shape=list(arr.shape))


def datum(tokens, targets, weights=None) -> Datum:
    """A cross_entropy datum: int32 tokens, int64 target_tokens, float32 weights if given."""
    inputs = {"target_tokens": tensor(targets, "int64")}
    if weights is not None:
        inputs["weights"] = tensor(weights, "float32")
    return Datum(tokens=np.asarray(tokens, dtype="<i4").tobytes(), loss_fn_inputs=inputs)


def random_request(
    loss_fn: str, seed: int, lengths, *, model_id: str = "m", config=None, forward_only: bool = False
) -> ForwardBackward:
    """Datums of `lengths` with every input the loss takes: sampler logprobs 0.5-6 nats away
    (ratios clipped on both sides), advantages of both signs, a prompt of 2 unmarked tokens;
    cross_entropy gets (N, 3) top-K targets on every other datum and weights of both signs."""
    rng = np.random.default_rng(seed)
    data = []
    for i, n in enumerate(lengths):
        inputs = {}
        if loss_fn == "cross_entropy":
            k = 3 if i % 2 else 1
            targets = rng.integers(0, VOCAB, (n, k)) if k > 1 else rng.integers(0, VOCAB, n)
            inputs["target_tokens"] = tensor(targets, "int64")
            inputs["weights"] = tensor(rng.normal(0.5, 1.0, targets.shape), "float32")
        else:
            inputs["target_tokens"] = tensor(rng.integers(0, VOCAB, n), "int64")
            q = -rng.uniform(0.5, 6.0, n)
            adv = rng.normal(0, 1, n)
            q[:2], adv[:2] = 0.0, 0.0
            inputs["logprobs"] = tensor(q, "float32")
            inputs["advantages"] = tensor(adv, "float32")
            if loss_fn == "gspo":
                inputs["sequence_ratio_mask"] = tensor([0, 0] + [1] * (n - 2), "float32")
        data.append(Datum(tokens=rng.integers(0, VOCAB, n).astype("<i4").tobytes(), loss_fn_inputs=inputs))
    return ForwardBackward(
        request_id=f"r{seed}", model_id=model_id, seq_id=1, loss_fn=loss_fn, loss_fn_config=config or {},
        forward_only=forward_only, data=data,
    )  # fmt: skip


_PARAMS = frozenset(SamplingParams.__struct_fields__)


def sample_spec(**fields) -> SampleSpec:
    """A SampleSpec from flat keywords: SamplingParams' fields (max_tokens, temperature, top_k,
    top_p, seed, stop_strings, stop_token_ids, stop_at_eos) go to its `params`."""
    params = {k: fields.pop(k) for k in list(fields) if k in _PARAMS}
    return SampleSpec(params=SamplingParams(**params), **fields)


def respec(spec: SampleSpec, **fields) -> SampleSpec:
    """`spec` with `fields` changed, SamplingParams' fields in its `params` (as sample_spec)."""
    import dataclasses

    import msgspec

    params = {k: fields.pop(k) for k in list(fields) if k in _PARAMS}
    return dataclasses.replace(spec, params=msgspec.structs.replace(spec.params, **params), **fields)
