"""The JSON bodies of the Tinker routes (service.py), as the SDK sends them.

msgspec validates types and ignores unknown fields; what a value must be beyond its type is
checked by the route that uses it. Where a body carries a bus type unchanged (AdamParams), it
is the bus's own, so the two can never drift apart.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from openrl.bus.messages import AdamParams

# Every integer a body carries fits in int64: msgpack (the bus's encoding) cannot hold a JSON
# integer past 2^64, so a larger one is a 400 naming the field, never a 500 after the request
# was accepted.
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class LoraConfig(msgspec.Struct, kw_only=True):
    rank: Int
    seed: Int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class OptimizerConfig(msgspec.Struct, frozen=True, kw_only=True):
    type: str = "adamw"


class CreateModelBody(msgspec.Struct, kw_only=True):
    session_id: str
    model_seq_id: Int
    base_model: str
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig = OptimizerConfig()
    user_metadata: dict[str, Any] | None = None


class CreateSessionBody(msgspec.Struct, kw_only=True):
    tags: list[str] = []
    user_metadata: dict[str, Any] | None = None
    sdk_version: str = ""
    project_id: str | None = None
    display_name: str | None = None


class SessionBody(msgspec.Struct, kw_only=True):
    session_id: str


class FinishBody(msgspec.Struct, kw_only=True):
    reason: dict[str, Any] | None = None
    detail: str | None = None


class ModelBody(msgspec.Struct, kw_only=True):
    model_id: str


class OptimStepBody(msgspec.Struct, kw_only=True):
    model_id: str
    seq_id: Int
    adam_params: AdamParams | None = None  # the bus's own type, not a copy of it
    optimizer_params: dict[str, Any] | None = None


class SaveNamedBody(msgspec.Struct, kw_only=True):
    model_id: str
    seq_id: Int
    path: str
    ttl_seconds: Int | None = None
    overwrite: bool | None = None
    user_metadata: dict[str, Any] | None = None


class LoadBody(msgspec.Struct, kw_only=True):
    path: str
    optimizer: bool = False
    model_id: str | None = None  # legacy in-place load
    seq_id: Int | None = None
    session_id: str | None = None  # create-via-load
    model_seq_id: Int | None = None
    base_model: str | None = None
    optimizer_config: OptimizerConfig | None = None
    user_metadata: dict[str, Any] | None = None


class SaveForSamplerBody(msgspec.Struct, kw_only=True):
    model_id: str
    seq_id: Int
    path: str | None = None  # the name, for a named save
    sampling_session_seq_id: Int | None = None  # for an unnamed save
    kind: str = "snapshot"
    ttl_seconds: Int | None = None


class CreateSamplingSessionBody(msgspec.Struct, kw_only=True):
    session_id: str
    sampling_session_seq_id: Int
    base_model: str | None = None
    model_path: str | None = None


class Chunk(msgspec.Struct, kw_only=True):
    type: str = "encoded_text"
    tokens: list[Int] = []


class ModelInput(msgspec.Struct, kw_only=True):
    chunks: list[Chunk]


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: Int | None = None
    seed: Int | None = None
    stop: Any = None  # a string, a list of strings, a list of token ids, or None
    temperature: float = 1.0
    top_k: Int = -1
    top_p: float = 1.0


class JsonTensor(msgspec.Struct, kw_only=True):
    data: list[Int]
    dtype: str = "int64"
    shape: list[Int] | None = None
    sparse_crow_indices: list[Int] | None = None
    sparse_col_indices: list[Int] | None = None


class ASampleBody(msgspec.Struct, kw_only=True):
    sampling_session_id: str
    seq_id: Int
    num_samples: Int = 1
    prompt: ModelInput
    sampling_params: SamplingParams
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Int = 0
    topk_sample_logprobs: Int = 0
    prompt_alt_tokens_k: Int = 0
    target_prompt_logprobs: JsonTensor | None = None
    prompt_logprobs_last_n: Int | None = None
    record_stability_info: bool | None = None


class RetrieveBody(msgspec.Struct, kw_only=True):
    request_id: str
    allow_metadata_only: bool = False

