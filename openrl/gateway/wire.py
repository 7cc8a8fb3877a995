"""Tinker's protobuf payloads ↔ bus messages. Protocol encodings stay in the gateway.

The schema is the SDK's own (`tinker/proto/tinker_public_pb2.py`, Apache-2.0), so the
gateway and the client can never disagree about field numbers.
"""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import Datum, ForwardBackward, ForwardBackwardResult, SampleResult, Tensor, TopK
from openrl.gateway import bounds
from openrl.gateway.proto import pb

_DTYPES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_INT64: "int64"}
_MAX_DECOMPRESSED = 256 * 1024 * 1024


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo `Content-Encoding: zstd` (the SDK's proto_compress_fwdbwd), bounded by `limit`."""
    if not encoding or encoding == "identity":
        return body
    if encoding != "zstd":
        raise InvalidRequest(f"unsupported Content-Encoding {encoding!r}; use zstd or none")
    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            out = reader.read(min(limit, _MAX_DECOMPRESSED) + 1)
    except zstandard.ZstdError as e:
        raise InvalidRequest(f"body is not valid zstd: {e}") from None
    if len(out) > limit:
        raise InvalidRequest(f"decompressed body exceeds {limit} bytes")
    return out


def parse_forward_backward(body: bytes) -> pb.ForwardBackwardRequest:
    """Parse the protobuf body; a body that is not one is a 400 (no seq_id to keep)."""
    req = pb.ForwardBackwardRequest()
    try:
        req.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError, or RuntimeWarning-ish errors on junk
        raise InvalidRequest(f"body is not a ForwardBackwardRequest protobuf: {e}") from None
    if not req.model_id:
        raise InvalidRequest("model_id is required")
    if req.seq_id < 1:
        raise InvalidRequest(f"seq_id must be >= 1, got {req.seq_id}")
    return req


def to_message(req: pb.ForwardBackwardRequest, request_id: str) -> ForwardBackward:
    """The bus message for a parsed request; raises InvalidRequest for content the
    trainer could never run (the caller turns that into a `Rejected` in the sequence)."""
    config: dict[str, float | str] = {}
    if req.loss_fn_config_v2:  # v2 carries strings too; v1 only doubles (spec §3.2)
        for key, value in req.loss_fn_config_v2.items():
            config[key] = value.text if value.WhichOneof("value") == "text" else value.number
    else:
        config.update(req.loss_fn_config)
    if len(req.data) > bounds.MAX_DATUMS:
        raise InvalidRequest(f"at most {bounds.MAX_DATUMS} datums per request, got {len(req.data)}; send them over several requests")
    budget = bounds.Budget()
    data = [_datum(i, d, budget) for i, d in enumerate(req.data)]
    return ForwardBackward(
        request_id=request_id,
        model_id=req.model_id,
        seq_id=req.seq_id,
        loss_fn=req.loss_fn,
        loss_fn_config=config,
        forward_only=req.forward_only,
        data=data,
    )


def _datum(index: int, d: pb.Datum, budget: bounds.Budget) -> Datum:
    tokens = bytearray()
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidRequest(f"datum {index}: {kind} chunks are not supported; this server serves text-only models")
        if len(chunk.encoded_text.tokens) % 4:
            raise InvalidRequest(f"datum {index}: encoded_text tokens are not int32 bytes")
        tokens += chunk.encoded_text.tokens
    if len(d.loss_fn_inputs) > bounds.MAX_LOSS_INPUTS:
        raise InvalidRequest(f"datum {index}: at most {bounds.MAX_LOSS_INPUTS} loss_fn_inputs, got {len(d.loss_fn_inputs)}")
    inputs = {name: _tensor(index, name, t, budget) for name, t in d.loss_fn_inputs.items()}
    _check_spans(index, d, len(tokens) // 4)
    return Datum(tokens=bytes(tokens), loss_fn_inputs=inputs)


def _check_spans(index: int, d: pb.Datum, n_tokens: int) -> None:
    """Provenance spans (which sampled sequence each run of tokens came from) are not used by
    any supported loss, but they are checked as the SDK defines them: both lists or neither,
    each run naming a sequence with offset, length >= 0, the runs tiling their field."""
    model_spans, loss_spans = list(d.model_input_spans), list(d.loss_fn_input_spans)
    if not model_spans and not loss_spans:
        return
    if not model_spans or not loss_spans:
        raise InvalidRequest(f"datum {index}: provenance comes as a pair: send both model_input_spans and loss_fn_input_spans, or neither")
    target = d.loss_fn_inputs.get("target_tokens")
    if target is None:
        raise InvalidRequest(f"datum {index}: loss_fn_input_spans annotate target_tokens, which is missing")
    rows = int(target.shape[0]) if len(target.shape) else len(target.dense) // 8
    for field, spans, total in (("model_input_spans", model_spans, n_tokens), ("loss_fn_input_spans", loss_spans, rows)):
        covered = 0
        for j, span in enumerate(spans):
            kind = span.WhichOneof("span")
            run = getattr(span, kind) if kind else None
            if run is None or not run.sequence_id or run.offset < 0 or run.length < 0:
                raise InvalidRequest(f"datum {index}: {field}[{j}] needs a sequence_id, offset >= 0 and length >= 0")
            covered += run.length
        if covered != total:
            raise InvalidRequest(f"datum {index}: {field} cover {covered} positions, but the field has {total}")


def _tensor(index: int, name: str, t: pb.Tensor, budget: bounds.Budget) -> Tensor:
    """A loss input, its size bounded as the trainer would hold it: a sparse one by its shape
    (rows x columns, what densifying it costs), a dense one by its values."""
    where = f"datum {index}: loss_fn_inputs[{name!r}]"
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidRequest(f"{where} has dtype {t.dtype}; use float32 or int64")
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape):
        raise InvalidRequest(f"{where} has a negative dimension")
    if t.WhichOneof("encoding") == "sparse_csr":
        csr = t.sparse_csr
        budget.add(bounds.tensor_elements(shape, where), where)
        return Tensor(dtype=dtype, data=csr.values, shape=shape, crow=csr.crow_indices, col=csr.col_indices)
    bounds.tensor_elements(shape, where)  # (N,) or (N, K), K bounded
    budget.add(len(t.dense) // (8 if dtype == "int64" else 4), where)
    return Tensor(dtype=dtype, data=t.dense, shape=shape)


def forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """ForwardBackwardOutput protobuf: ArrayRecords whose `logprobs` field is a BatchedTensor
    (datums concatenated, int64 *byte* offsets). Consecutive datums with the same trailing
    shape ([] for (N,) targets, [K] for top-K) share one record; the client concatenates them."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        out.metrics[key] = value
    trailing = result.trailing or [[] for _ in result.logprobs]
    start = 0
    while start < len(result.logprobs) or not out.loss_fn_outputs:
        end = start + 1
        while end < len(result.logprobs) and trailing[end] == trailing[start]:
            end += 1
        arrays = result.logprobs[start:end]
        record = out.loss_fn_outputs.add()
        record.type_tag = "ArrayRecord"
        record.num_datums = len(arrays)
        offsets = [0]
        for arr in arrays:
            offsets.append(offsets[-1] + len(arr))
        field = record.fields["logprobs"]
        field.data = b"".join(arrays)
        field.offsets = struct.pack(f"<{len(offsets)}q", *offsets)
        field.dtype = pb.DTYPE_FLOAT32
        field.trailing_shape.extend(trailing[start] if arrays else [])
        start = end
    return out.SerializeToString()


_STOP = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
_PB_DTYPES = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}


def sample_response(result: SampleResult) -> bytes:
    """SampleResponse protobuf (spec §5.7). Top-k token ids go out as int32, as the schema says."""
    out = pb.SampleResponse(prompt_cache_hit_tokens=0)
    for seq in result.sequences:
        s = out.sequences.add(stop_reason=_STOP[seq.stop_reason], tokens=seq.tokens, logprobs=seq.logprobs)
        if seq.topk is not None:
            _topk(s.topk_sampled_logprobs, seq.topk)
    if result.prompt_logprobs is not None:
        out.prompt_logprobs = result.prompt_logprobs
    if result.topk_prompt is not None:
        _topk(out.topk_prompt_logprobs, result.topk_prompt)
    if result.target_prompt_logprobs is not None:
        _tensor_out(out.target_prompt_logprobs, result.target_prompt_logprobs)
    if result.prompt_alt is not None:
        alt = result.prompt_alt
        rows = len(alt.logprobs) // 4 // max(alt.k, 1)
        _tensor_out(out.prompt_alt_tokens.tokens, Tensor(dtype="int64", data=alt.tokens, shape=[rows, alt.k]))
        _tensor_out(out.prompt_alt_tokens.logprobs, Tensor(dtype="float32", data=alt.logprobs, shape=[rows, alt.k]))
    return out.SerializeToString()


def _topk(msg, topk: TopK) -> None:
    ids = np.frombuffer(topk.tokens, dtype="<i8").astype("<i4")
    msg.k = topk.k
    msg.length = len(ids) // max(topk.k, 1)
    msg.token_ids = ids.tobytes()
    msg.logprobs = topk.logprobs


def _tensor_out(msg, t: Tensor) -> None:
    msg.dtype = _PB_DTYPES[t.dtype]
    msg.shape.extend(t.shape)
    if t.crow is not None:
        msg.sparse_csr.values = t.data
        msg.sparse_csr.crow_indices = t.crow
        msg.sparse_csr.col_indices = t.col or b""
    else:
        msg.dense = t.data
