"""Subject, stream, consumer and bucket names: the only place they are spelled.

Subjects are built from tokens that NATS accepts: user-facing names (a base model such
as "Qwen/Qwen3-0.6B", a model id such as "s-abc:train:0") go through `token()` first.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "openrl"

# Streams (JetStream) and what they hold.
TRAIN_STREAM = "OPENRL_TRAIN"  # limits retention: the per-model training log (replay, recovery)
CREATE_STREAM = "OPENRL_CREATE"  # work queue: model creation for any trainer of a base model
SAMPLE_STREAM = "OPENRL_SAMPLE"  # work queue: sample requests for any sampler of a base model

# Key-value buckets.
FUTURES_BUCKET = "openrl-futures"
MODELS_BUCKET = "openrl-models"
SESSIONS_BUCKET = "openrl-sessions"
WORKERS_BUCKET = "openrl-workers"
WEIGHTS_BUCKET = "openrl-weights"  # KV: tinker:// path -> WeightsRecord
SAMPLERS_BUCKET = "openrl-samplers"  # KV: sampler id -> SamplerRecord
SNAPSHOTS_BUCKET = "openrl-snapshots"  # KV: model id -> SnapshotRecord (the newest)
WEIGHTS_OBJECTS = "openrl-weights"  # object store: adapter safetensors

_SAFE = re.compile(r"[^A-Za-z0-9_\-:]")


def token(name: str) -> str:
    """A NATS-subject-safe, readable, collision-free token for an arbitrary name."""
    cleaned = _SAFE.sub("_", name)
    if cleaned == name:
        return name
    digest = hashlib.blake2b(name.encode(), digest_size=4).hexdigest()
    return f"{cleaned}_{digest}"


def train(base_model: str, model_id: str) -> str:
    return f"{PREFIX}.train.{token(base_model)}.{token(model_id)}"


def train_all(base_model: str) -> str:
    return f"{PREFIX}.train.{token(base_model)}.>"


def create(base_model: str) -> str:
    return f"{PREFIX}.create.{token(base_model)}"


def done(request_id: str) -> str:
    """Core-NATS notification that a future finished (the result itself is in KV)."""
    return f"{PREFIX}.done.{token(request_id)}"


DONE_ALL = f"{PREFIX}.done.>"


def sample(base_model: str) -> str:
    return f"{PREFIX}.sample.{token(base_model)}"


def sampler_consumer(base_model: str) -> str:
    return f"sampler-{token(base_model)}".replace(":", "_")


def trainer_consumer(base_model: str) -> str:
    return f"trainer-{token(base_model)}".replace(":", "_")


def kv_key(name: str) -> str:
    """KV keys allow [-/_=.A-Za-z0-9]; model ids contain ':'."""
    return re.sub(r"[^A-Za-z0-9_\-=.]", lambda m: f"={ord(m.group()):02x}", name)
