"""Who may do what on the bus: one NATS user per role, each allowed only what its role needs.

Roles are `gateway`, `trainer`, `sampler`, `rewarder` (the long-running processes) and
`operator` (the CLI: `openrl up` itself, status, keys, dlq, export, record, replay, bus-init).
A role's permissions are allow-lists built from the table below: the subjects it publishes
and subscribes to, the streams it reads (consumers, gets, acks), the KV buckets and object
stores it reads or writes, and the streams it may create. Anything not listed is refused by
the server. The signing secrets (KV `openrl-secrets`) are the gateway's alone: it creates the
bucket and is the only role that may touch it. The operator creates and updates every other
stream and bucket (`openrl up`, or `openrl bus-init` in a cluster); workers only bind to them.

Each role gets its own inbox prefix (`_INBOX.<role>`), so replies to one role (JetStream API
answers, pulled messages, KV watches) cannot be read by another.

Credentials are user/password pairs (nats-py supports them without extra packages). Files
that hold them are written with `write_private`: created 0600 from the start, atomically.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from openrl.bus import subjects

# The local stack keeps every role's credentials here, under its data dir (0600).
LOCAL_FILE = "nats-credentials.json"
ROLES = ("gateway", "trainer", "sampler", "rewarder", "operator")
P = subjects.PREFIX

# Every KV bucket and object store OpenRL uses; the secrets bucket is listed apart.
BUCKETS = (
    subjects.FUTURES_BUCKET, subjects.MODELS_BUCKET, subjects.SESSIONS_BUCKET, subjects.WORKERS_BUCKET,
    subjects.WEIGHTS_BUCKET, subjects.SAMPLERS_BUCKET, subjects.SNAPSHOTS_BUCKET, subjects.LEASES_BUCKET,
    subjects.KEYS_BUCKET, subjects.INFLIGHT_BUCKET,
)  # fmt: skip
STREAMS = (
    subjects.TRAIN_STREAM, subjects.CREATE_STREAM, subjects.SAMPLE_STREAM, subjects.DLQ_STREAM,
    subjects.REWARD_STREAM, subjects.AUDIT_STREAM, subjects.USAGE_STREAM,
)  # fmt: skip
OBJECTS = (subjects.WEIGHTS_OBJECTS,)


class Refused(PermissionError):
    """NATS refused our credentials (none, or wrong): retrying with the same ones will not help."""


@dataclass(frozen=True)
class Role:
    """What one role may do. Streams are named as JetStream names them; buckets by bucket name."""

    publish: tuple[str, ...] = ()  # subjects it publishes to (a stream's subjects included)
    subscribe: tuple[str, ...] = ()  # core subjects it subscribes to (its inbox is added)
    streams: tuple[str, ...] = ()  # streams it reads: consumers, fetches, acks, direct gets
    purges: tuple[str, ...] = ()  # streams whose messages it may purge or delete
    kv_read: tuple[str, ...] = ()
    kv_write: tuple[str, ...] = ()  # implies read
    objects_read: tuple[str, ...] = ()
    objects_write: tuple[str, ...] = ()  # implies read
    creates: tuple[str, ...] = ()  # streams (KV_x, OBJ_x included) it may create and update


# What each worker publishes besides its stream's subjects: done notifications, usage records,
# and dead letters (every consumer moves a message that keeps failing to the DLQ).
_WORKER_OUT = (f"{P}.done.>", f"{P}.usage.>", f"{P}.dlq.>")

TABLE: dict[str, Role] = {
    "gateway": Role(
        publish=(f"{P}.train.>", f"{P}.create.>", f"{P}.sample.>", f"{P}.reward.>", f"{P}.audit.>", *_WORKER_OUT,
                 f"{P}.cancel.>"),  # a sample request whose OpenAI client left (openai_api.Run.cancel)
        subscribe=(f"{P}.done.>",),
        streams=STREAMS,  # queue depths (metrics, 429s), audit and usage logs, trace export
        purges=(subjects.SAMPLE_STREAM,),  # an OpenAI request whose client left: its queued message (openai_api.Run.cancel)
        kv_write=(*BUCKETS, subjects.SECRETS_BUCKET),
        objects_write=OBJECTS,
        creates=(f"KV_{subjects.SECRETS_BUCKET}",),  # the only role that may: nobody else can even look
    ),
    "trainer": Role(
        publish=(*_WORKER_OUT, f"{P}.adapter.>"),  # a sampler weights version stored (samplers prefetch it)
        streams=(subjects.TRAIN_STREAM, subjects.CREATE_STREAM),
        purges=(subjects.TRAIN_STREAM,),  # the train log, below each model's newest snapshot
        kv_write=(subjects.FUTURES_BUCKET, subjects.MODELS_BUCKET, subjects.WORKERS_BUCKET, subjects.WEIGHTS_BUCKET,
                  subjects.SNAPSHOTS_BUCKET, subjects.LEASES_BUCKET),
        kv_read=(subjects.SESSIONS_BUCKET, subjects.SAMPLERS_BUCKET),
        objects_write=OBJECTS,
    ),  # fmt: skip
    "sampler": Role(
        publish=_WORKER_OUT,
        subscribe=(f"{P}.cancel.>", f"{P}.adapter.>"),  # stop generating a request whose client left; prefetch a new adapter
        streams=(subjects.SAMPLE_STREAM,),
        kv_write=(subjects.FUTURES_BUCKET, subjects.WORKERS_BUCKET),
        kv_read=(subjects.WEIGHTS_BUCKET, subjects.SAMPLERS_BUCKET, subjects.MODELS_BUCKET, subjects.SESSIONS_BUCKET),
        objects_read=OBJECTS,
    ),
    "rewarder": Role(
        publish=_WORKER_OUT,
        streams=(subjects.REWARD_STREAM,),
        kv_write=(subjects.FUTURES_BUCKET, subjects.WORKERS_BUCKET),
    ),
    # The administrator's CLI: everything but the secrets. `openrl record` may subscribe to any
    # OpenRL subject and bucket, `openrl replay` publish them, `openrl dlq retry` re-publish.
    "operator": Role(
        publish=(f"{P}.>",),
        subscribe=(f"{P}.>", *(f"$KV.{b}.>" for b in BUCKETS), *(f"$O.{b}.>" for b in OBJECTS)),
        streams=STREAMS,
        purges=STREAMS,  # openrl dlq retry deletes the dead letter it re-published
        kv_write=BUCKETS,
        objects_write=OBJECTS,
        creates=(*STREAMS, *(f"KV_{b}" for b in BUCKETS), *(f"OBJ_{b}" for b in OBJECTS)),
    ),
}


def inbox_prefix(role: str) -> str:
    """Where a role's replies go: only that role may subscribe there."""
    return f"_INBOX.{role}"


def _read_stream(stream: str, write: bool) -> list[str]:
    """The JetStream API subjects that reading one stream takes (and purging it, for writers)."""
    api = "$JS.API"
    out = [
        f"{api}.STREAM.INFO.{stream}", f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}", f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.DURABLE.CREATE.{stream}.>", f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>", f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
        f"{api}.CONSUMER.LIST.{stream}", f"{api}.CONSUMER.NAMES.{stream}",
        f"$JS.ACK.{stream}.>", f"$JS.FC.{stream}.>",
    ]  # fmt: skip
    if write:  # deleting an object or a dead letter purges / deletes stream messages
        out += [f"{api}.STREAM.PURGE.{stream}", f"{api}.STREAM.MSG.DELETE.{stream}"]
    return out


def permissions(role: str) -> dict:
    """The nats-server `permissions` block of a role: allow-lists only."""
    r = TABLE[role]
    publish = list(r.publish) + ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    subscribe = list(r.subscribe) + [f"{inbox_prefix(role)}.>"]
    for stream in r.streams:
        publish += _read_stream(stream, write=stream in r.purges)
    for bucket in r.kv_write:
        publish += [f"$KV.{bucket}.>", *_read_stream(f"KV_{bucket}", write=True)]
    for bucket in r.kv_read:
        publish += _read_stream(f"KV_{bucket}", write=False)
    for bucket in r.objects_write:
        publish += [f"$O.{bucket}.>", *_read_stream(f"OBJ_{bucket}", write=True)]
    for bucket in r.objects_read:
        publish += _read_stream(f"OBJ_{bucket}", write=False)
    for stream in r.creates:
        publish += [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.STREAM.INFO.{stream}"]
    if role in ("operator", "gateway"):
        publish.append("$JS.API.STREAM.LIST")  # openrl status and the gateway's /metrics: every stream's state
    return {"publish": {"allow": sorted(set(publish))}, "subscribe": {"allow": sorted(set(subscribe))}}


# -- credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(default="", repr=False)
    ca: str = ""  # the CA that signed the server's TLS certificate (a PEM file, or PEM text), for tls:// URLs


def tls_context(ca: str) -> ssl.SSLContext | None:
    """A client TLS context trusting `ca` (a path, or the PEM itself as a Secret's env var gives it)."""
    if not ca:
        return None
    if ca.lstrip().startswith("-----BEGIN"):
        return ssl.create_default_context(cadata=ca)
    return ssl.create_default_context(cafile=ca)


def connect_options(role: str, creds: Credentials | None) -> dict:
    """nats.connect keyword arguments for a process of `role` (no credentials: an open server)."""
    opts: dict = {"inbox_prefix": inbox_prefix(role)}
    if creds is not None and creds.user:
        opts.update(user=creds.user, password=creds.password)
    if creds is not None and creds.ca:
        opts["tls"] = tls_context(creds.ca)
    return opts


def new_password() -> str:
    """192 random bits as letters and digits, starting with a letter: nats-server parses the
    value of an environment variable its config refers to (Kubernetes), and one that starts
    with a digit would be read as a number."""
    return "pw" + secrets.token_hex(24)


def generate() -> dict[str, Credentials]:
    """Fresh credentials for every role: user = the role's name, a random password."""
    return {role: Credentials(user=role, password=new_password()) for role in ROLES}


def authorization(creds: dict[str, Credentials]) -> dict:
    """The nats-server `authorization` block enforcing `creds` with each role's permissions."""
    return {"users": [{"user": c.user, "password": c.password, "permissions": permissions(role)} for role, c in creds.items()]}


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only from the first byte (no chmod
    window, whatever the umask), replacing the file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # a umask such as 0o277 would leave the owner unable to read it back
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def save(path: Path, creds: dict[str, Credentials]) -> None:
    """Every role's credentials in one file (the local stack's `nats-credentials.json`)."""
    write_private(path, json.dumps({role: {"user": c.user, "password": c.password} for role, c in creds.items()}, indent=1) + "\n")


def load_all(path: Path) -> dict[str, Credentials]:
    data = json.loads(Path(path).read_text())
    return {role: Credentials(user=v["user"], password=v["password"]) for role, v in data.items() if role in ROLES}


def load(path: Path, role: str) -> Credentials:
    """A role's credentials from a file: `{"user": ..., "password": ...}` (one role's, as a
    Kubernetes Secret would hold them), or the local stack's file of every role."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read NATS credentials from {path}: {e}") from None
    entry = data if "user" in data else data.get(role)
    if not isinstance(entry, dict) or not entry.get("user") or "password" not in entry:
        raise ValueError(f"{path} holds no NATS credentials for role {role!r}")
    return Credentials(user=str(entry["user"]), password=str(entry["password"]))


# -- Kubernetes ----------------------------------------------------------------------------

HELM_HEADER = """\
# NATS users for OpenRL's roles, with each role's permissions (openrl/bus/auth.py), for the
# official NATS Helm chart, on top of values.yaml:
#   helm install nats nats/nats -n nats -f deploy/nats/values.yaml -f deploy/nats/values-auth.yaml
# Generated: python -m openrl.bus.auth > deploy/nats/values-auth.yaml (do not edit by hand;
# tests/deploy/test_deploy_nats.py fails when it differs from the code). The passwords are
# environment variables of the NATS pods, from the Secret `openrl-nats-users` (values.yaml,
# container.env); `<< $VAR >>` is written unquoted, so nats-server reads the variable.
"""


def password_env(role: str) -> str:
    """The NATS pods' environment variable holding a role's password (Kubernetes)."""
    return f"OPENRL_NATS_{role.upper()}_PASSWORD"


def helm_values() -> str:
    """deploy/nats/values-auth.yaml: the chart's `config.merge.authorization` for every role."""
    import yaml  # only here: the bus itself does not need PyYAML

    users = [{"user": role, "password": f"<< ${password_env(role)} >>", "permissions": permissions(role)} for role in ROLES]
    return HELM_HEADER + yaml.safe_dump({"config": {"merge": {"authorization": {"users": users}}}}, sort_keys=False, width=200)


if __name__ == "__main__":
    print(helm_values(), end="")
