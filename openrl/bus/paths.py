"""`tinker://` paths and object-store names, shared by the gateway and the workers.

Syntax (spec §5.9): `tinker://<model_id>/<segment>/<name>`, exactly three parts, with
segment `weights`, `sampler_weights` or `external_weights`. Neither part may hold '/'.
Adapter versions in the object store are named by model and seq_id, so saving the same
point of a model's sequence twice (a replay after a crash) writes the same object.
"""

from __future__ import annotations

from typing import NamedTuple

from openrl.bus.errors import InvalidRequest

SCHEME = "tinker://"
SEGMENTS = ("weights", "sampler_weights", "external_weights")
MAX_NAME = 128


class TinkerPath(NamedTuple):
    model_id: str
    segment: str
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.model_id}/{self.segment}/{self.name}"


def check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME or "/" in name or name.strip() != name:
        raise InvalidRequest(f"checkpoint name must be 1-{MAX_NAME} characters without '/' or surrounding spaces, got {name!r}")
    return name


def make(model_id: str, segment: str, name: str) -> str:
    return str(TinkerPath(model_id, segment, check_name(name)))


def parse(path: str) -> TinkerPath:
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise InvalidRequest(f"model_path must start with {SCHEME}, got {path!r}")
    parts = path[len(SCHEME) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise InvalidRequest(f"model_path must be {SCHEME}<model_id>/<segment>/<name>, got {path!r}")
    if parts[1] not in SEGMENTS:
        raise InvalidRequest(f"unknown checkpoint kind {parts[1]!r} in {path!r}; expected one of {', '.join(SEGMENTS)}")
    return TinkerPath(*parts)


def adapter_object(model_id: str, seq_id: int) -> str:
    return f"adapters/{model_id}/seq-{seq_id:09d}"


SEGMENT_OF_KIND = {"sampler": "sampler_weights", "state": "weights", "external": "external_weights"}


def checkpoint_object(model_id: str, seq_id: int, kind: str) -> str:
    """Where a save of `kind` at `seq_id` keeps its bytes; the sampler kind is the adapter version."""
    if kind == "sampler":
        return adapter_object(model_id, seq_id)
    return f"{kind}/{model_id}/seq-{seq_id:09d}"


def snapshot_object(model_id: str, seq_id: int) -> str:
    return f"snapshots/{model_id}/seq-{seq_id:09d}"
