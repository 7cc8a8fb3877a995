"""A training request turned into checked numpy arrays, and split into micro-batches.

Every check happens here, before the engine touches any state: an `InvalidRequest` from this
module changes nothing. What a loss reads (its inputs, whether it takes (N, K) targets, whether
it couples a datum's tokens) comes from its `losses.Signature`, not from its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import MAX_REQUEST_ELEMENTS, MAX_TENSOR_COLUMNS, AdamParams, Datum, Tensor
from openrl.trainer import losses

_NP_DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}


@dataclass
class Batch:
    """A validated request: each datum's tokens and its loss inputs, defaults filled in.

    Kept per datum (the only state that grows with the request is its token arrays); the
    engine concatenates one micro-batch's worth at a time with `inputs`."""

    signature: losses.Signature
    tokens_D: list[np.ndarray]  # int64 (N,)
    inputs_D: list[dict[str, np.ndarray]]  # target_tokens (N,) int64 or (N, K); weights like it; others (N,) float32

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens_D]

    @property
    def shapes_D(self) -> list[tuple[int, ...]]:
        return [inputs["target_tokens"].shape for inputs in self.inputs_D]

    def inputs(self, idx: list[int]) -> dict[str, np.ndarray]:
        """The loss inputs of datums `idx`, concatenated along tokens (M): float32 (M,) each,
        target_tokens and weights (M, K) with K the widest of the whole request (pads: token 0,
        weight 0, which add nothing), and for per-sequence losses "datum_index" (M,), each
        token's position in `idx`."""
        width = max(1 if len(shape) == 1 else shape[1] for shape in self.shapes_D)
        x = {}
        for name in self.inputs_D[idx[0]]:
            arrays = [self.inputs_D[i][name] for i in idx]
            if name in ("target_tokens", "weights"):
                arrays = [_pad_columns(a, width) for a in arrays]
            x[name] = np.concatenate(arrays)
        if self.signature.sequence_mask:
            x["datum_index"] = np.repeat(np.arange(len(idx)), [len(self.tokens_D[i]) for i in idx])
        return x


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Datum indices grouped so that each group's padded size (rows x longest) fits `budget`
    tokens; a datum longer than the budget runs alone. Longest first, so datums of similar
    length share a group and padding stays small."""
    groups: list[list[int]] = []
    group: list[int] = []
    longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if group and (len(group) + 1) * longest > budget:
            groups.append(group)
            group = []
        if not group:
            longest = lengths[i]
        group.append(i)
    if group:
        groups.append(group)
    return groups


# ---------------------------------------------------------------------- validation


def check_adam(adam: AdamParams) -> None:
    values = {name: getattr(adam, name) for name in AdamParams.__struct_fields__}
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
        raise InvalidRequest(f"adam params must be finite: {', '.join(bad)}")
    if adam.learning_rate < 0:
        raise InvalidRequest(f"learning_rate must be >= 0, got {adam.learning_rate}")
    for name in ("beta1", "beta2"):
        if not 0 <= values[name] < 1:
            raise InvalidRequest(f"{name} must be in [0, 1), got {values[name]}")
    if adam.eps <= 0:
        raise InvalidRequest(f"eps must be > 0, got {adam.eps}")
    if adam.weight_decay < 0:
        raise InvalidRequest(f"weight_decay must be >= 0, got {adam.weight_decay}")
    if adam.grad_clip_norm < 0:
        raise InvalidRequest(f"grad_clip_norm must be >= 0, got {adam.grad_clip_norm}")


def check_loss_fn(loss_fn: str) -> losses.Signature:
    signature = losses.SIGNATURES.get(loss_fn)
    if signature is not None:
        return signature
    why = {
        # tinker-cookbook 0.6.1's default RL loss, so users meet this first.
        "stable_reinforce": ": its math is unpublished, so OpenRL cannot reproduce it; "
        "use importance_sampling, ppo or cispo instead",
        "custom": ": server-side custom losses (uploaded loss graphs) are not implemented",
    }.get(loss_fn, "")
    raise InvalidRequest(f"loss_fn {loss_fn!r} is not supported{why}; supported: {', '.join(losses.SIGNATURES)}")


def check_config(loss_fn: str, signature: losses.Signature, config: dict[str, float | str]) -> dict[str, float]:
    """The loss's config: the request's values over the defaults, every one a finite number."""
    values = dict(signature.config)
    unknown = sorted(set(config) - set(values))
    if unknown:
        takes = sorted(values) or "no keys"
        raise InvalidRequest(f"loss_fn_config: unknown {unknown}; {loss_fn} takes {takes}")
    for key, value in config.items():
        if isinstance(value, str) or not math.isfinite(value):
            raise InvalidRequest(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        values[key] = float(value)
    if "clip_low_threshold" in values:
        low, high = values["clip_low_threshold"], values["clip_high_threshold"]
        if not 0 <= low <= high:
            raise InvalidRequest(f"loss_fn_config: need 0 <= clip_low_threshold <= clip_high_threshold, got {low}, {high}")
    if values.get("beta", 0.0) < 0:
        raise InvalidRequest(f"loss_fn_config['beta'] must be >= 0, got {values['beta']}")
    return values


def parse(
    data: list[Datum], loss_fn: str, signature: losses.Signature, config: dict[str, float], vocab: int, max_context: int
) -> Batch:
    _check_elements(data)
    tokens_D, inputs_D = [], []
    for i, datum in enumerate(data):
        tokens, inputs = _parse_datum(datum, f"data[{i}]", loss_fn, signature, config, vocab, max_context)
        tokens_D.append(tokens)
        inputs_D.append(inputs)
    return Batch(signature=signature, tokens_D=tokens_D, inputs_D=inputs_D)


def _check_elements(data: list[Datum]) -> None:
    """The request's loss inputs, counted as the dense arrays they become (a CSR tensor as
    rows x columns), within MAX_REQUEST_ELEMENTS before anything is allocated. The gateway
    checks the same; this is for whatever reached the bus some other way."""
    total = 0
    for i, datum in enumerate(data):
        for name, t in datum.loss_fn_inputs.items():
            where = f"data[{i}].loss_fn_inputs.{name}"
            if t.crow is not None or t.col is not None:
                if len(t.shape) == 2 and t.shape[1] > MAX_TENSOR_COLUMNS:
                    raise InvalidRequest(f"{where}: at most {MAX_TENSOR_COLUMNS} columns, got shape {t.shape}")
                n = math.prod(t.shape)
            else:
                n = len(t.data) // _NP_DTYPES.get(t.dtype, np.dtype("<f4")).itemsize
            total += max(n, 0)
            if total > MAX_REQUEST_ELEMENTS:
                raise InvalidRequest(f"{where}: the request's loss inputs come to more than {MAX_REQUEST_ELEMENTS} elements (counted dense)")


def _pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    """(N,) or (N, K) -> (N, width), zeros on the right."""
    a_N_K = a.reshape(len(a), -1)
    return np.pad(a_N_K, ((0, 0), (0, width - a_N_K.shape[1])))


def _parse_datum(
    datum: Datum,
    where: str,
    loss_fn: str,
    signature: losses.Signature,
    config: dict[str, float],
    vocab: int,
    max_context: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A datum's tokens and its loss inputs, every one present (defaults filled in)."""
    if len(datum.tokens) % 4:
        raise InvalidRequest(f"{where}.tokens: {len(datum.tokens)} bytes is not a whole number of int32")
    tokens = np.frombuffer(datum.tokens, dtype="<i4").astype(np.int64)
    n = len(tokens)
    if n == 0:
        raise InvalidRequest(f"{where}.tokens is empty")
    if n > max_context:
        raise InvalidRequest(f"{where}.tokens: {n} tokens exceed the max context of {max_context} tokens (the base model's max_position_embeddings)")
    _check_ids(tokens, f"{where}.tokens", vocab)
    given = datum.loss_fn_inputs
    unknown = sorted(set(given) - set(signature.accepts()))
    if unknown:
        raise InvalidRequest(f"{where}.loss_fn_inputs: unknown {unknown}; {loss_fn} takes {signature.accepts()}")
    for name in signature.required:
        if name not in given:
            raise InvalidRequest(f"{where}.loss_fn_inputs: {name} is required by {loss_fn}")
    targets = _input(given, "target_tokens", where, (n,), top_k=signature.top_k)
    _check_ids(targets, f"{where}.loss_fn_inputs.target_tokens", vocab)
    inputs = {"target_tokens": targets}
    for name in sorted(set(given) - {"target_tokens"}):
        shape = targets.shape if name == "weights" else (n,)
        inputs[name] = _input(given, name, where, shape, top_k=False)
    for name in signature.ones:
        inputs.setdefault(name, np.ones(targets.shape, dtype=np.float32))
    if "clip_low_threshold" in config:
        for name in ("clip_low_threshold", "clip_high_threshold"):
            inputs.setdefault(name, np.full(n, config[name], dtype=np.float32))
        _check_thresholds(inputs["clip_low_threshold"], inputs["clip_high_threshold"], where)
    mask = signature.sequence_mask
    if mask and not inputs[mask].any():
        raise InvalidRequest(
            f"{where}.loss_fn_inputs.{mask} is all zero; {loss_fn}'s sequence ratio "
            "is a mean over the marked tokens, so mark at least one (usually the sampled ones)"
        )
    return tokens, inputs


def _check_ids(ids: np.ndarray, where: str, vocab: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise InvalidRequest(f"{where}: token ids must be in [0, {vocab}), got {lo if lo < 0 else hi}")


def _check_thresholds(low_N: np.ndarray, high_N: np.ndarray, where: str) -> None:
    bad = np.flatnonzero((low_N < 0) | (low_N > high_N))
    if len(bad):
        i = int(bad[0])
        raise InvalidRequest(
            f"{where}.loss_fn_inputs: need 0 <= clip_low_threshold <= clip_high_threshold at every token, "
            f"got {low_N[i]:g}, {high_N[i]:g} at position {i}"
        )


def _input(given: dict[str, Tensor], name: str, where: str, shape: tuple[int, ...], *, top_k: bool) -> np.ndarray:
    """A loss input as an array of its required dtype and `shape` ((N, K) too if `top_k`),
    floats finite."""
    where = f"{where}.loss_fn_inputs.{name}"
    t = given[name]
    dtype = losses.INPUT_DTYPES.get(name, "float32")
    if t.dtype != dtype:
        raise InvalidRequest(f"{where}: dtype must be {dtype}, got {t.dtype}")
    values = _array(t, where)
    want = list(shape)
    if top_k and values.ndim == 2 and values.shape[0] == shape[0]:
        if values.shape[1] < 1:
            raise InvalidRequest(f"{where}: (N, K) needs K >= 1, got shape {list(values.shape)}")
    elif values.shape != shape:
        also = f" or [{shape[0]}, K] (top-K)" if top_k else ""
        what = "that of target_tokens" if name == "weights" else "one per token"
        top_k_elsewhere = name == "target_tokens" and values.ndim == 2 and not top_k
        hint = "; only cross_entropy takes (N, K) top-K targets" if top_k_elsewhere else ""
        raise InvalidRequest(f"{where}: shape must be {want}{also} ({what}), got {list(values.shape)}{hint}")
    if dtype == "float32" and not np.isfinite(values).all():
        raise InvalidRequest(f"{where}: values must be finite")
    return values


def _array(t: Tensor, where: str) -> np.ndarray:
    """Decode a Tensor (dense or CSR) into a numpy array of its shape."""
    dtype = _NP_DTYPES[t.dtype]
    values = _frombuffer(t.data, dtype, where)
    if any(d < 0 for d in t.shape):
        raise InvalidRequest(f"{where}: negative shape {t.shape}")
    if t.crow is not None or t.col is not None:
        return _densify(values, t, where)
    if not t.shape:
        return values  # no shape sent: 1-D
    if math.prod(t.shape) != values.size:
        raise InvalidRequest(f"{where}: shape {t.shape} does not match {values.size} values")
    return values.reshape(t.shape)


def _frombuffer(data: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise InvalidRequest(f"{where}: {len(data)} bytes is not a whole number of {dtype.name}")
    return np.frombuffer(data, dtype=dtype)


def _densify(values: np.ndarray, t: Tensor, where: str) -> np.ndarray:
    """CSR -> dense, unlisted entries 0. A 1-D shape is read as a single row."""
    if t.crow is None or t.col is None:
        raise InvalidRequest(f"{where}: CSR needs both crow and col indices")
    if len(t.shape) not in (1, 2):
        raise InvalidRequest(f"{where}: CSR needs a 1-D or 2-D shape, got {t.shape}")
    rows, cols = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
    crow = _frombuffer(t.crow, _NP_DTYPES["int64"], f"{where}.crow")
    col = _frombuffer(t.col, _NP_DTYPES["int64"], f"{where}.col")
    ok = (
        len(crow) == rows + 1
        and crow[0] == 0
        and crow[-1] == len(col) == len(values)
        and (np.diff(crow) >= 0).all()
        and (len(col) == 0 or (col.min() >= 0 and col.max() < cols))
    )
    if not ok:
        raise InvalidRequest(f"{where}: malformed CSR indices for shape {t.shape}")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(crow)), col] = values
    return dense.reshape(t.shape)
