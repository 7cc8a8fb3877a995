"""What a request may cost, checked at the gateway before anything is built from it.

A sparse tensor is counted as the dense array a worker would make of it (rows x columns,
whatever it lists), so a 10-byte body cannot ask a sampler or a trainer for gigabytes; a
message is measured as the bus will carry it (msgpack can be several times the protobuf or
JSON it came from), so nothing oversize reaches `publish`. The numbers themselves live in
`openrl.bus.messages`, where the workers that check them again read them too
(docs/limits.md lists them all).
"""

from __future__ import annotations

import math

import msgspec

from openrl.bus.client import MAX_PAYLOAD
from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import MAX_REQUEST_ELEMENTS, MAX_TENSOR_COLUMNS, encode

# The largest bus message the gateway publishes: the server's max_payload less room for
# the headers (message id, trace id) and JetStream's envelope.
MAX_MESSAGE_BYTES = MAX_PAYLOAD - 64 * 1024
# A forward_backward's datums, and the loss inputs of one datum (no loss takes more than a
# handful): past these the gateway would spend seconds of its event loop on one body. The SDK
# sends at most fwdbwd_max_chunk_len (1024 by default) datums per request.
MAX_DATUMS = 16384
MAX_LOSS_INPUTS = 16
# The tokens of one sample request's prompt: more than any served context. Counted on the body's
# bytes before it is decoded (`prompt_size`), so a body of millions of token ids is refused
# before msgspec makes Python ints of them (tens of bytes each, ten times the body).
MAX_PROMPT_TOKENS = 1 << 18


class _PromptOnly(msgspec.Struct):
    prompt: msgspec.Raw = msgspec.Raw(b"null")


def prompt_size(raw: bytes) -> None:
    """A 400 when an asample body's prompt holds more than MAX_PROMPT_TOKENS token ids, read
    from the JSON text itself: a JSON list of n ints has n - 1 commas, and a chunk adds two
    (its fields, the next chunk), so a prompt of at most MAX_PROMPT_TOKENS tokens in chunks
    of at least one token each has fewer than twice that many commas. msgspec checks the JSON
    and keeps the prompt as a view of the body: nothing is built. A body that does not decode
    here is left to the decoder that follows (its error is the one the client sees)."""
    try:
        prompt = memoryview(msgspec.json.decode(raw or b"{}", type=_PromptOnly).prompt)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    step = 1 << 20
    commas = sum(prompt[i : i + step].tobytes().count(b",") for i in range(0, prompt.nbytes, step))
    if commas > 2 * MAX_PROMPT_TOKENS:
        raise InvalidRequest(
            f"prompt: a {prompt.nbytes}-byte prompt of about {commas} token ids or chunks; a prompt may hold at most "
            f"{MAX_PROMPT_TOKENS} tokens (refused before decoding)"
        )


def tensor_elements(shape: list[int], where: str, *, max_dims: int = 2) -> int:
    """The element count of a tensor of `shape` held dense, after checking the shape: at most
    `max_dims` dimensions, none negative, at most MAX_TENSOR_COLUMNS columns, at most
    MAX_REQUEST_ELEMENTS elements. Python ints: a product of huge dimensions cannot wrap."""
    if len(shape) > max_dims:
        raise InvalidRequest(f"{where}: at most {max_dims} dimensions, got shape {shape}")
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{where}: negative dimension in shape {shape}")
    if len(shape) == 2 and shape[1] > MAX_TENSOR_COLUMNS:
        raise InvalidRequest(f"{where}: at most {MAX_TENSOR_COLUMNS} columns, got shape {shape}")
    n = math.prod(shape)
    if n > MAX_REQUEST_ELEMENTS:
        raise InvalidRequest(f"{where}: shape {shape} is {n} elements; a request may hold at most {MAX_REQUEST_ELEMENTS}")
    return n


class Budget:
    """The elements of one request's tensors, summed as they are checked."""

    def __init__(self) -> None:
        self.elements = 0

    def add(self, n: int, where: str) -> None:
        self.elements += n
        if self.elements > MAX_REQUEST_ELEMENTS:
            raise InvalidRequest(
                f"{where}: the request's tensors come to more than {MAX_REQUEST_ELEMENTS} elements (counted dense); send fewer datums per request"
            )


def encoded(msg: msgspec.Struct, what: str) -> int:
    """The size of `msg` as the bus carries it; a 400 when it is over MAX_MESSAGE_BYTES."""
    try:
        n = len(encode(msg))
    except OverflowError as e:  # an integer msgpack cannot hold, in a field no body type bounds
        raise InvalidRequest(f"{what}: {e}") from None
    if n > MAX_MESSAGE_BYTES:
        raise InvalidRequest(
            f"{what} is {n} bytes once encoded for the message bus; the limit is {MAX_MESSAGE_BYTES} bytes: send a smaller request"
        )
    return n
