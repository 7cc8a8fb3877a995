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
DLQ_STREAM = "OPENRL_DLQ"  # limits: messages that failed max_deliver times, with the reason
REWARD_STREAM = "OPENRL_REWARD"  # work queue: score requests for any rewarder of a reward function
AUDIT_STREAM = "OPENRL_AUDIT"  # limits: catalogue, session and key events (AuditEvent), per owner
USAGE_STREAM = "OPENRL_USAGE"  # limits: what workers did for whom (UsageRecord), for billing usage

# Key-value buckets.
FUTURES_BUCKET = "openrl-futures"
MODELS_BUCKET = "openrl-models"
SESSIONS_BUCKET = "openrl-sessions"
WORKERS_BUCKET = "openrl-workers"
WEIGHTS_BUCKET = "openrl-weights"  # KV: tinker:// path -> WeightsRecord
SAMPLERS_BUCKET = "openrl-samplers"  # KV: sampler id -> SamplerRecord
SNAPSHOTS_BUCKET = "openrl-snapshots"  # KV: model id -> SnapshotRecord (the newest)
LEASES_BUCKET = "openrl-leases"  # KV: <base>.<model id> -> Lease (which trainer owns a model)
KEYS_BUCKET = "openrl-keys"  # KV: key id (a hash of the API key) -> ApiKeyRecord
SECRETS_BUCKET = "openrl-secrets"  # KV: name -> Secret (the download-URL signing key, made once)
INFLIGHT_BUCKET = "openrl-inflight"  # KV: gateway replica -> InFlight (what each key has in flight there)
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
    """Core-NATS notification that a future finished, once it is stored in KV (the message
    carries the stored future when it is small: Bus.finish_future)."""
    return f"{PREFIX}.done.{token(request_id)}"


DONE_ALL = f"{PREFIX}.done.>"


def cancel(base_model: str, request_id: str) -> str:
    """Core-NATS notice that a sample request's client left (its future is already failed):
    a sampler generating it stops. The request's token is the subject's last token."""
    return f"{PREFIX}.cancel.{token(base_model)}.{token(request_id)}"


def cancel_all(base_model: str) -> str:
    """What the samplers of one base model listen to."""
    return f"{PREFIX}.cancel.{token(base_model)}.>"


def adapter_stored(base_model: str) -> str:
    """Core-NATS notice (AdapterStored) that a trainer stored a sampler weights version of a
    model on `base_model`: the samplers of that base model that served the model fetch it now,
    before the first sample request naming it arrives. A lost notice only loses that head start."""
    return f"{PREFIX}.adapter.{token(base_model)}"


def sample(base_model: str) -> str:
    return f"{PREFIX}.sample.{token(base_model)}"


def sampler_consumer(base_model: str) -> str:
    return f"sampler-{token(base_model)}".replace(":", "_")


def reward(name: str) -> str:
    return f"{PREFIX}.reward.{token(name)}"


def rewarder_consumer(name: str) -> str:
    """One durable per reward function, shared by all its rewarders (competing consumers)."""
    return f"rewarder-{token(name)}".replace(":", "_")


def trainer_consumer(base_model: str) -> str:
    return f"trainer-{token(base_model)}".replace(":", "_")


def lease_key(base_model: str, model_id: str) -> str:
    """A model's key in the leases bucket: grouped by base model, so a trainer watches `lease_prefix`."""
    return f"{token(base_model)}.{model_id}"


def lease_prefix(base_model: str) -> str:
    return f"{kv_key(token(base_model))}.>"


def train_consumer(base_model: str, model_id: str) -> str:
    """The durable consumer of one model's training requests; it outlives its owner, so a new
    owner resumes exactly where the old one stopped (unacked messages are redelivered)."""
    return f"train-{token(base_model)}-{token(model_id)}".replace(":", "_")


def dlq(stream: str) -> str:
    """Where the dead letters of a stream go."""
    return f"{PREFIX}.dlq.{token(stream)}"


DLQ_ALL = f"{PREFIX}.dlq.>"


def audit(owner: str) -> str:
    """Where an owner's (key id's) audit events go; `openrl.audit.>` is the whole log."""
    return f"{PREFIX}.audit.{token(owner)}"


def usage(owner: str) -> str:
    """Where usage records for an owner's work go; `openrl.usage.>` is all of it."""
    return f"{PREFIX}.usage.{token(owner)}"


def kv_key(name: str) -> str:
    """KV keys allow [-/_=.A-Za-z0-9]; model ids contain ':'."""
    return re.sub(r"[^A-Za-z0-9_\-=.]", lambda m: f"={ord(m.group()):02x}", name)
