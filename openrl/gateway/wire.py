"""Tinker's protobuf payloads ↔ bus messages. Protocol encodings stay in the gateway.

The schema is the SDK's own (`tinker/proto/tinker_public_pb2.py`, Apache-2.0), so the
gateway and the client can never disagree about field numbers.
"""

from __future__ import annotations

import struct

import zstandard

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import Datum, ForwardBackward, ForwardBackwardResult, Tensor
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
    data = [_datum(i, d) for i, d in enumerate(req.data)]
    return ForwardBackward(
        request_id=request_id,
        model_id=req.model_id,
        seq_id=req.seq_id,
        loss_fn=req.loss_fn,
        loss_fn_config=config,
        forward_only=req.forward_only,
        data=data,
    )


def _datum(index: int, d: pb.Datum) -> Datum:
    tokens = bytearray()
    for chunk in d.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidRequest(f"datum {index}: {kind} chunks are not supported; this server serves text-only models")
        if len(chunk.encoded_text.tokens) % 4:
            raise InvalidRequest(f"datum {index}: encoded_text tokens are not int32 bytes")
        tokens += chunk.encoded_text.tokens
    inputs = {name: _tensor(index, name, t) for name, t in d.loss_fn_inputs.items()}
    return Datum(tokens=bytes(tokens), loss_fn_inputs=inputs)


def _tensor(index: int, name: str, t: pb.Tensor) -> Tensor:
    dtype = _DTYPES.get(t.dtype)
    if dtype is None:
        raise InvalidRequest(f"datum {index}: loss_fn_inputs[{name!r}] has dtype {t.dtype}; use float32 or int64")
    shape = [int(s) for s in t.shape]
    if any(s < 0 for s in shape):
        raise InvalidRequest(f"datum {index}: loss_fn_inputs[{name!r}] has a negative dimension")
    if t.WhichOneof("encoding") == "sparse_csr":
        csr = t.sparse_csr
        return Tensor(dtype=dtype, data=csr.values, shape=shape, crow=csr.crow_indices, col=csr.col_indices)
    return Tensor(dtype=dtype, data=t.dense, shape=shape)


def forward_backward_output(result: ForwardBackwardResult) -> bytes:
    """ForwardBackwardOutput protobuf: one ArrayRecord whose `logprobs` field is a
    BatchedTensor (all datums concatenated, int64 *byte* offsets, trailing_shape [])."""
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    for key, value in result.metrics.items():
        out.metrics[key] = value
    record = out.loss_fn_outputs.add()
    record.type_tag = "ArrayRecord"
    record.num_datums = len(result.logprobs)
    offsets = [0]
    for arr in result.logprobs:
        offsets.append(offsets[-1] + len(arr))
    field = record.fields["logprobs"]
    field.data = b"".join(result.logprobs)
    field.offsets = struct.pack(f"<{len(offsets)}q", *offsets)
    field.dtype = pb.DTYPE_FLOAT32
    return out.SerializeToString()
