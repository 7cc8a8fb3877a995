"""The JetStream client every OpenRL process uses: a few verbs, one ack policy.

- `Bus.connect` opens a connection that reconnects forever and pings every few seconds, as
  its role's NATS user when given credentials (openrl/bus/auth.py).
- `Bus.ensure` creates (or updates) every stream and bucket; it is idempotent. The operator
  role runs it (`openrl up`, `openrl bus-init`); the worker roles may not, and `Bus.bind`
  instead: they wait for the buckets they use to exist. Without credentials (a NATS with no
  authorization) every process ensures, as before.
- `Bus.publish` publishes with a deterministic `Nats-Msg-Id`, so a retried publish of the
  same request is dropped by JetStream's duplicate window.
- `Bus.consume` is the pull loop; `_deliver` is the only place that decides ack / nak /
  term / in_progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import nats
import nats.errors
import structlog
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from openrl.bus import auth, subjects
from openrl.bus.errors import InvalidRequest, Unavailable
from openrl.bus.messages import Future, decode, encode

log = structlog.get_logger(__name__)

# Largest message the bus accepts; the embedded server is started with this
# max_payload and the gateway refuses bodies above it with 413 (nats-py closes the
# connection on an oversize publish, so it must never get that far).
MAX_PAYLOAD = 32 * 1024 * 1024

# A finished future up to this size rides in its done notification (Bus.finish_future), which
# every gateway replica receives: small enough that N replicas each getting it costs little.
DONE_INLINE_MAX = 16 * 1024

# How long a worker's heartbeat entry outlives its last beat: a worker is alive while its
# entry exists (there is no clock comparison across hosts).
WORKER_TTL_S = 10.0
INFLIGHT_TTL_S = 30.0  # a gateway replica's in-flight counts outlive it by at most this (quotas.py)

# A message delivered this many times without being handled (its handler kept failing, or
# the worker holding it kept dying) is a dead letter: moved to OPENRL_DLQ with the reason,
# its future failed; `openrl dlq list | retry` manage them. Kept this long.
MAX_DELIVER = 5
DLQ_MAX_AGE_S = 7 * 24 * 3600
AUDIT_MAX_AGE_S = 400 * 24 * 3600  # audit events and usage records: a little over a year
DEAD_LETTERED = "dead-lettered"  # how a dead letter's failed future starts its error
DLQ_HEADERS = ("Openrl-Dlq-Stream", "Openrl-Dlq-Subject", "Openrl-Dlq-Consumer", "Openrl-Dlq-Stream-Seq", "Openrl-Dlq-Delivered", "Openrl-Dlq-Reason")

# The NATS header that carries a request's trace id (the gateway's X-Request-Id) from the
# publisher's structlog context to the worker's (openrl/metrics.py).
TRACE_HEADER = "Openrl-Trace-Id"


@dataclass(frozen=True)
class Stream:
    """What sets one of OpenRL's streams apart; `Bus.ensure` gives them all file storage, the
    bus's duplicate window and its replicas."""

    name: str
    subject: str  # the one wildcard subject it stores
    retention: api.RetentionPolicy  # WORK_QUEUE: a request until a worker acks it; LIMITS: a log
    max_age_s: float | None = None  # None: no age limit
    max_msg_size: int = -1  # -1: none of its own (the server's max_payload holds)
    max_bytes: int = -1  # -1: no size limit; else the oldest messages go first (DiscardPolicy.OLD)


# A queued create, sample or score request older than this has outlived its future (BusConfig's
# futures_ttl_s): nobody can read its result any more, so the work queue may drop it.
WORK_MAX_AGE_S = 6 * 3600
DLQ_MAX_BYTES = 2 * 1024**3  # dead letters beyond this: the oldest go first

# Every stream OpenRL uses (subjects.py says what each carries). Which have limits, and why the
# others must not lose old entries: docs/storage.md. The train log has none: it is purged below
# each model's newest snapshot (trainer/recovery.py).
STREAMS = (
    Stream(subjects.TRAIN_STREAM, f"{subjects.PREFIX}.train.>", api.RetentionPolicy.LIMITS, max_msg_size=MAX_PAYLOAD),
    Stream(subjects.CREATE_STREAM, f"{subjects.PREFIX}.create.>", api.RetentionPolicy.WORK_QUEUE, max_age_s=WORK_MAX_AGE_S),
    Stream(subjects.SAMPLE_STREAM, f"{subjects.PREFIX}.sample.>", api.RetentionPolicy.WORK_QUEUE, max_age_s=WORK_MAX_AGE_S, max_msg_size=MAX_PAYLOAD),
    Stream(subjects.REWARD_STREAM, f"{subjects.PREFIX}.reward.>", api.RetentionPolicy.WORK_QUEUE, max_age_s=WORK_MAX_AGE_S, max_msg_size=MAX_PAYLOAD),
    Stream(subjects.DLQ_STREAM, subjects.DLQ_ALL, api.RetentionPolicy.LIMITS, max_age_s=DLQ_MAX_AGE_S, max_msg_size=MAX_PAYLOAD, max_bytes=DLQ_MAX_BYTES),
    Stream(subjects.AUDIT_STREAM, f"{subjects.PREFIX}.audit.>", api.RetentionPolicy.LIMITS, max_age_s=AUDIT_MAX_AGE_S),
    Stream(subjects.USAGE_STREAM, f"{subjects.PREFIX}.usage.>", api.RetentionPolicy.LIMITS, max_age_s=AUDIT_MAX_AGE_S),
)


async def stop_watch(watcher, timeout_s: float = 2.0) -> None:
    """Stop a KV watcher (its ordered consumer's subscription), for at most `timeout_s`, never
    raising: a watch that ends must not leave its subscription behind (the server keeps
    pushing to it, and a connection's drain waits for it), nor hold up a shutdown."""
    if watcher is None:
        return
    try:
        await asyncio.wait_for(watcher.stop(), timeout_s)
    except Exception:  # closing or closed connection, timeout: nothing more to do
        pass


_KV_SCAN_CHASES = 20


async def kv_keys(js: JetStreamContext, kv: KeyValue) -> list[str]:
    """Every live key of a bucket (escaped, as stored).

    Not nats-py's `KeyValue.keys()`: its watcher can queue its "no more" marker ahead of
    entries still being delivered and return a partial list on a busy machine. Nor a consumer
    that delivers the last message per subject until its pending count reaches 0: a key
    rewritten during the scan (a heartbeat) loses the message the consumer was about to
    deliver, its new revision is not counted, and the key is left out (about 1 scan in 300 with
    8 keys rewritten every ~10 ms), while others are listed twice.

    Our buckets keep one revision per key, so the stream holds just the last message of each.
    This reads it in order from the start (an ephemeral consumer, headers only), using the
    pending count to go fast, then reads on until it has passed the stream's last sequence, so
    a key rewritten during the scan is met at its new place. The last operation seen per key
    decides whether it is live. The consumer is deleted afterwards: an unsubscribe leaves it
    for its inactivity threshold, and a busy caller piles them up to the stream's limit."""
    bucket = kv._name  # noqa: SLF001 - nats-py keeps the bucket name here
    prefix = f"$KV.{bucket}."
    stream = f"KV_{bucket}"
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.ALL, ack_policy=api.AckPolicy.NONE, headers_only=True,
        inactive_threshold=30.0, mem_storage=True, filter_subject=f"{prefix}>",
    )  # fmt: skip
    sub = await js.pull_subscribe(f"{prefix}>", stream=stream, config=config)
    live: dict[str, bool] = {}
    seen = 0  # the stream sequence of the last message read
    consumer = None

    async def read(count: int, timeout_s: float) -> int | None:
        """Up to `count` more messages; the server's pending count after them, None if none came."""
        nonlocal seen
        try:
            msgs = await sub.fetch(min(count, 512), timeout=timeout_s)
        except asyncio.TimeoutError:  # nothing left where the count said there was
            return None
        for msg in msgs:
            seen = msg.metadata.sequence.stream
            headers = msg.headers or {}
            dead = headers.get("KV-Operation") in ("DEL", "PURGE") or bool(headers.get("Nats-Marker-Reason"))
            live[msg.subject[len(prefix):]] = not dead
        return msgs[-1].metadata.num_pending

    try:
        info = await sub.consumer_info()
        consumer = info.name
        remaining = info.num_pending
        while remaining > 0:
            remaining = await read(remaining, 10.0) or 0
        for _ in range(_KV_SCAN_CHASES):  # keys rewritten while we read: each pass is quicker
            state = (await js.stream_info(stream)).state
            # Past the last message; or nothing is left (purged, or every entry past its TTL: the
            # last sequence stays); or it and whatever stood between were removed for good.
            if seen >= state.last_seq or not state.messages or await read(state.last_seq - seen, 1.0) is None:
                break
    finally:
        try:
            await sub.unsubscribe()
            if consumer is not None:
                await js.delete_consumer(stream, consumer)
        except Exception:
            pass
    return [key for key, alive in live.items() if alive]


@dataclass(frozen=True)
class BusConfig:
    url: str = "nats://127.0.0.1:4222"
    name: str = "openrl"
    futures_ttl_s: float = 6 * 3600  # results stay retrievable this long after they finish
    duplicate_window_s: float = 600
    replicas: int = 1  # 3 on a clustered NATS
    # The NATS user of this process's role (openrl/bus/auth.py); none on a server without auth.
    role: str = ""
    user: str = ""
    password: str = field(default="", repr=False)
    tls_ca: str = ""  # for a tls:// URL: the CA of the server's certificate (a PEM path or PEM text)
    # False: bind to the streams and buckets as they are, even as the operator. Tools that read
    # a running system (openrl export, openrl dlq) must not bring its stream configs to theirs.
    ensure: bool = True


# Bus attribute -> KV bucket: what `bind` looks up for a role.
KV_HANDLES = {
    "futures": subjects.FUTURES_BUCKET, "models": subjects.MODELS_BUCKET, "sessions": subjects.SESSIONS_BUCKET,
    "workers": subjects.WORKERS_BUCKET, "weights": subjects.WEIGHTS_BUCKET, "samplers": subjects.SAMPLERS_BUCKET,
    "snapshots": subjects.SNAPSHOTS_BUCKET, "leases": subjects.LEASES_BUCKET, "keys": subjects.KEYS_BUCKET,
    "secrets": subjects.SECRETS_BUCKET, "inflight": subjects.INFLIGHT_BUCKET,
}  # fmt: skip


class Bus:
    """A connection plus handles on the streams and buckets OpenRL uses."""

    def __init__(self, nc: nats.NATS, cfg: BusConfig):
        self.nc = nc
        self.js = nc.jetstream()
        self.cfg = cfg
        self.futures: KeyValue
        self.models: KeyValue
        self.sessions: KeyValue
        self.workers: KeyValue
        self.weights: KeyValue
        self.samplers: KeyValue
        self.snapshots: KeyValue
        self.leases: KeyValue
        self.inflight: KeyValue
        self.keys: KeyValue
        self.secrets: KeyValue
        self.objects: ObjectStore
        # Told when a consumed message starts and how it ends (openrl.metrics.MessageObserver).
        self.observer = None
        # Called (no arguments, on the event loop) after a reconnect or a slow-consumer drop:
        # core-NATS messages such as the future `done` notifications may have been missed.
        self.on_messages_lost: list[Callable[[], None]] = []
        # The last error of each message that failed here, by (stream, sequence): the reason its
        # dead letter gives when it was this process that saw it fail (else: its workers died).
        self.last_errors: LastErrors = OrderedDict()

    def __getattr__(self, name: str):  # only for attributes never set: a bucket this role may not use
        if name in KV_HANDLES or name == "objects":
            raise AttributeError(f"this bus connection (role {self.cfg.role or 'none'}) has no handle on {name}: "
                                 "its NATS role may not use it (openrl/bus/auth.py)")  # fmt: skip
        raise AttributeError(name)

    @classmethod
    async def connect(cls, cfg: BusConfig) -> Bus:
        bus: Bus | None = None  # the callbacks below run only once connected, after it is set
        refused = asyncio.Event()

        async def on_error(e: Exception) -> None:
            if bus is None and "authorization violation" in str(e).lower():
                refused.set()  # wrong or missing credentials: retrying will not help
                return
            log.warning("bus_error", error=repr(e))
            if isinstance(e, nats.errors.SlowConsumerError) and bus is not None:
                bus.messages_lost()

        async def on_disconnect() -> None:
            log.warning("bus_disconnected", url=cfg.url)

        async def on_reconnect() -> None:
            log.info("bus_reconnected", url=cfg.url)
            if bus is not None:
                bus.messages_lost()

        credentials = {"user": cfg.user, "password": cfg.password} if cfg.user else {}
        if cfg.role:
            credentials["inbox_prefix"] = auth.inbox_prefix(cfg.role)
        if cfg.tls_ca:
            credentials["tls"] = auth.tls_context(cfg.tls_ca)
        connecting = asyncio.ensure_future(nats.connect(
            servers=[cfg.url],
            name=cfg.name,
            **credentials,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            ping_interval=5,
            max_outstanding_pings=3,
            connect_timeout=5,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        ))  # fmt: skip
        waiting = asyncio.ensure_future(refused.wait())
        await asyncio.wait([connecting, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            who = f"user {cfg.user!r} (role {cfg.role or 'none'})" if cfg.user else "no credentials"
            raise auth.Refused(f"NATS at {cfg.url} refused the connection: authorization violation with {who}; "
                               "set OPENRL_NATS_USER and OPENRL_NATS_PASSWORD, or OPENRL_NATS_CREDS (docs/security.md)")  # fmt: skip
        nc = connecting.result()
        bus = cls(nc, cfg)
        try:
            if (cfg.user and cfg.role != "operator") or not cfg.ensure:
                await bus.bind()
            else:
                await bus.ensure()
            if cfg.role == "gateway":
                bus.secrets = await bus._ensure_kv(subjects.SECRETS_BUCKET)
        except BaseException:
            await nc.close()
            raise
        return bus

    def messages_lost(self) -> None:
        """Core-NATS messages can be lost while the connection is away, or dropped when a
        subscription falls behind: tell whoever relies on them to re-read their state."""
        for hook in list(self.on_messages_lost):
            hook()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Drain the connection (what was published is flushed, subscriptions finish what they
        hold), for at most `timeout_s`; then close it. Bounded: a subscription whose handler
        cannot go on (e.g. a KV watch whose reader was cancelled, its queue full) would hold
        nats-py's drain for its own 30 s timeout, and a process's shutdown with it. Without a
        server to drain to (disconnected, reconnecting), it closes at once: the client stops
        reconnecting, and what it had buffered is dropped."""
        if self.nc.is_closed:
            return
        try:
            if self.nc.is_connected:
                await asyncio.wait_for(self.nc.drain(), timeout_s)
        except (asyncio.TimeoutError, nats.errors.Error) as e:
            log.warning("bus_drain_incomplete", after_s=timeout_s, error=repr(e))
        finally:
            if not self.nc.is_closed:
                try:
                    await self.nc.close()
                except OSError as e:  # the server went away with writes still buffered: nothing left to flush them to
                    log.warning("bus_close_unflushed", error=repr(e))

    # -- topology ---------------------------------------------------------------

    async def ensure(self) -> None:
        """Create or update every stream and bucket. Safe to call from every process."""
        for stream in STREAMS:
            await self._ensure_stream(
                api.StreamConfig(
                    name=stream.name,
                    subjects=[stream.subject],
                    retention=stream.retention,
                    storage=api.StorageType.FILE,
                    max_age=stream.max_age_s,
                    duplicate_window=self.cfg.duplicate_window_s,
                    max_msg_size=stream.max_msg_size,
                    max_bytes=stream.max_bytes,
                    discard=api.DiscardPolicy.OLD,
                    num_replicas=self.cfg.replicas,
                )
            )
        self.futures = await self._ensure_kv(subjects.FUTURES_BUCKET, ttl=self.cfg.futures_ttl_s)
        self.models = await self._ensure_kv(subjects.MODELS_BUCKET)
        self.sessions = await self._ensure_kv(subjects.SESSIONS_BUCKET)
        # A worker whose heartbeat (every 2 s) stops is gone from here after this TTL; a dead
        # trainer's models move to another trainer then (trainer/service.py, leases).
        self.workers = await self._ensure_kv(subjects.WORKERS_BUCKET, ttl=WORKER_TTL_S)
        self.weights = await self._ensure_kv(subjects.WEIGHTS_BUCKET)
        self.samplers = await self._ensure_kv(subjects.SAMPLERS_BUCKET)
        self.snapshots = await self._ensure_kv(subjects.SNAPSHOTS_BUCKET)
        self.leases = await self._ensure_kv(subjects.LEASES_BUCKET)
        self.keys = await self._ensure_kv(subjects.KEYS_BUCKET)
        # Each gateway replica's keys in flight (gateway/quotas.py), rewritten while it lives.
        self.inflight = await self._ensure_kv(subjects.INFLIGHT_BUCKET, ttl=INFLIGHT_TTL_S)
        if not self.cfg.user:  # with authorization, the gateway makes it: no other role may touch it
            self.secrets = await self._ensure_kv(subjects.SECRETS_BUCKET)
        self.objects = await self._ensure_objects(subjects.WEIGHTS_OBJECTS)

    async def bind(self, retry_s: float = 1.0) -> None:
        """Handles on the streams and buckets this role uses, made by the operator (`ensure`);
        waits until they all exist (a worker may start before `openrl bus-init` has run)."""
        role = auth.TABLE[self.cfg.role or "operator"]  # no role (an open server): what the operator uses
        buckets = {b: a for a, b in KV_HANDLES.items()}
        waited = 0.0
        while True:
            try:
                for stream in role.streams:
                    await self.js.stream_info(stream)
                for bucket in (*role.kv_write, *role.kv_read):
                    if bucket != subjects.SECRETS_BUCKET:
                        setattr(self, buckets[bucket], await self.js.key_value(bucket))
                if role.objects_write or role.objects_read:
                    self.objects = await self.js.object_store(subjects.WEIGHTS_OBJECTS)
                return
            except (NotFoundError, BucketNotFoundError) as e:
                if waited % 30 == 0:
                    log.warning("bus_topology_missing", role=self.cfg.role, error=repr(e),
                                hint="the operator creates streams and buckets: openrl up, or openrl bus-init")  # fmt: skip
                await asyncio.sleep(retry_s)
                waited += retry_s

    async def _ensure_objects(self, bucket: str) -> ObjectStore:
        try:
            return await self.js.object_store(bucket)
        except (BucketNotFoundError, NotFoundError):
            pass
        try:
            cfg = api.ObjectStoreConfig(storage=api.StorageType.FILE, replicas=self.cfg.replicas)
            return await self.js.create_object_store(bucket, config=cfg)
        except BadRequestError:  # a racing process created it first
            return await self.js.object_store(bucket)

    async def _ensure_stream(self, cfg: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(cfg)
        except BadRequestError:  # exists with another config: bring it to ours
            await self.js.update_stream(cfg)

    async def _ensure_kv(self, bucket: str, ttl: float | None = None) -> KeyValue:
        try:
            kv = await self.js.key_value(bucket)
        except (NotFoundError, BadRequestError):
            pass
        else:
            if ttl is not None:  # a store from an older version: bring its TTL to ours
                info = await self.js.stream_info(f"KV_{bucket}")
                if abs((info.config.max_age or 0) - ttl) > 1e-3:
                    info.config.max_age = ttl
                    await self.js.update_stream(info.config)
            return kv
        try:
            return await self.js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    ttl=ttl,
                    max_value_size=MAX_PAYLOAD,
                    storage=api.StorageType.FILE,
                    replicas=self.cfg.replicas,
                )
            )
        except BadRequestError:  # a racing process created it first
            return await self.js.key_value(bucket)

    # -- worker liveness ----------------------------------------------------------

    async def heartbeat(self, worker_id: str, info: Callable[[], msgspec.Struct], every_s: float, stop: asyncio.Event) -> None:
        """Put `info()` in the workers bucket every `every_s` until `stop`, then remove it."""
        while not stop.is_set():
            try:
                await self.kv_put(self.workers, worker_id, info())
            except Exception as e:  # reconnecting: try again next tick
                log.warning("heartbeat_failed", error=repr(e))
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
        try:
            await self.workers.delete(subjects.kv_key(worker_id))
        except Exception:
            pass

    # -- publishing ---------------------------------------------------------------

    async def publish(self, subject: str, msg: msgspec.Struct, *, msg_id: str) -> api.PubAck:
        """Publish to a stream; `msg_id` makes a retried publish of the same request a no-op.
        The ack names the message's stream sequence (a duplicate's: the first one's)."""
        headers = {"Nats-Msg-Id": msg_id}
        trace_id = structlog.contextvars.get_contextvars().get("trace_id")
        if trace_id:
            headers[TRACE_HEADER] = trace_id
        return await self.js.publish(subject, encode(msg), headers=headers, timeout=10)

    # -- key-value helpers ----------------------------------------------------------

    async def kv_get(self, kv: KeyValue, key: str, type_: type):
        """The decoded value under `key`, or None."""
        try:
            entry = await kv.get(subjects.kv_key(key))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return decode(entry.value, type_)

    async def messages(self, stream: str, subject: str) -> AsyncIterator:
        """The messages on `subject` still in `stream`, oldest first (one direct get each)."""
        seq = 1
        while True:
            try:
                raw = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return
            yield raw
            seq = raw.seq + 1

    async def kv_keys(self, kv: KeyValue) -> list[str]:
        """Every live key of a bucket (escaped, as stored): `kv_keys`."""
        return await kv_keys(self.js, kv)

    async def kv_put(self, kv: KeyValue, key: str, value: msgspec.Struct) -> None:
        await kv.put(subjects.kv_key(key), encode(value))

    async def kv_create(self, kv: KeyValue, key: str, value: msgspec.Struct) -> bool:
        """Write `value` only if `key` is absent; False when it already existed."""
        try:
            await kv.create(subjects.kv_key(key), encode(value))
        except KeyWrongLastSequenceError:
            return False
        return True

    async def dead_letter(self, raw, stream: str, durable: str, reason: str) -> None:
        """Copy a message to the dead-letter stream with where it came from and why."""
        meta = raw.metadata
        headers = {k: v for k, v in (raw.headers or {}).items() if k == TRACE_HEADER}
        headers.update(
            {
                "Openrl-Dlq-Stream": stream,
                "Openrl-Dlq-Subject": raw.subject,
                "Openrl-Dlq-Consumer": durable,
                "Openrl-Dlq-Stream-Seq": str(meta.sequence.stream),
                "Openrl-Dlq-Delivered": str(meta.num_delivered),
                "Openrl-Dlq-Reason": reason[:2000].replace("\r", " ").replace("\n", " "),
                "Nats-Msg-Id": f"dlq-{stream}-{durable}-{meta.sequence.stream}",
            }
        )
        await self.js.publish(subjects.dlq(stream), raw.data, headers=headers, timeout=10)
        log.error("message_dead_lettered", subject=raw.subject, stream=stream, consumer=durable, delivered=meta.num_delivered, reason=reason)

    async def fail_dead(self, request_id: str, request_type: str, reason: str) -> None:
        """Fail a dead-lettered request's future, unless it finished meanwhile."""
        stored = await self.kv_get(self.futures, request_id, Future)
        if stored is not None and stored.state != "pending":
            return
        await self.finish_future(
            Future(
                request_id=request_id, owner=stored.owner if stored else "", request_type=request_type, state="failed",
                error=f"{DEAD_LETTERED}: {reason}", category="server", finished_at=time.time(),
            )
        )  # fmt: skip

    async def finish_future(self, fut: Future) -> None:
        """Store a finished future and wake whoever long-polls it."""
        data = encode(fut)
        await self.futures.put(subjects.kv_key(fut.request_id), data)
        await self._announce(fut.request_id, data)

    async def _announce(self, request_id: str, data: bytes) -> None:
        """The done notification, once the future is stored. It carries the stored future when
        that is small (an optim_step's, most forward_backwards'), so that a waiting gateway
        answers without reading KV again; a large one is announced empty and read from KV.
        Every role that may publish it may write the future itself: it is trusted as much."""
        await self.nc.publish(subjects.done(request_id), data if len(data) <= DONE_INLINE_MAX else b"")

    async def announce_finished(self, request_id: str, data: bytes | None = None) -> None:
        """Announce a future that another worker finished, again: that worker may have died
        between storing it and announcing it (kill -9), and whoever waits would then hear
        nothing until its next re-read. A second notice is harmless (every listener is
        idempotent). `data`: the stored future's bytes when already read; else read here."""
        if data is None:
            try:
                entry = await self.futures.get(subjects.kv_key(request_id))
            except KeyNotFoundError:
                return
            data = entry.value
        if data and decode(data, Future).state != "pending":
            await self._announce(request_id, data)

    async def pending_future(self, request_id: str) -> tuple[Future, int] | None:
        """The stored future and its revision while it is pending; None once finished or gone."""
        try:
            entry = await self.futures.get(subjects.kv_key(request_id))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        fut = decode(entry.value, Future)
        return (fut, entry.revision) if fut.state == "pending" else None

    async def finish_pending(self, fut: Future, revision: int | None = None) -> bool:
        """`finish_future`, only if the stored future is still pending (compare-and-set on
        that revision): a worker that stalled past its ack_wait, while its request was
        redelivered and finished elsewhere, records nothing when it wakes. False if so.
        `revision`: the pending future's, read before (saves a round trip)."""
        key = subjects.kv_key(fut.request_id)
        if revision is None:
            pending = await self.pending_future(fut.request_id)
            if pending is None:
                await self.announce_finished(fut.request_id)  # finished elsewhere (or expired)
                return False
            revision = pending[1]
        try:
            data = encode(fut)
            await self.futures.update(key, data, last=revision)
        except KeyWrongLastSequenceError:
            await self.announce_finished(fut.request_id)
            return False
        await self._announce(fut.request_id, data)
        return True

    # -- consuming -----------------------------------------------------------------

    async def consume(
        self,
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        type_: object,
        handle: Callable[[object], Awaitable[None]],
        ack_wait_s: float = 30.0,
        max_inflight: int = 256,
        batch: int = 16,
        stop: asyncio.Event | None = None,
        start_seq: int | None = None,
        inactive_threshold_s: float | None = None,
        fetch_timeout_s: float = 1.0,
        max_deliver: int = MAX_DELIVER,
        on_dead: Callable[[object, str], Awaitable[None]] | None = None,
    ) -> None:
        """Pull messages and hand each to `handle` in its own task until `stop` is set.

        Handlers run concurrently (up to `max_inflight`), so a handler may wait (for its
        model's turn, say) without blocking the others; the message is kept alive with
        in-progress acks while it waits.

        A new durable starts at stream sequence `start_seq` (default: the first message); an
        existing one keeps its position and its unacked messages. `inactive_threshold_s` lets
        the server delete a durable nobody has pulled from for that long.

        A message delivered more than `max_deliver` times is not handled again: it goes to
        the dead-letter stream and `on_dead(msg, reason)` fails its future (0: never).
        """

        async def dead(raw, msg, reason: str) -> None:
            await self.dead_letter(raw, stream, durable, reason)
            if on_dead is not None and msg is not None:
                await on_dead(msg, reason)

        config = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL if start_seq is None else api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            inactive_threshold=inactive_threshold_s,
            ack_wait=ack_wait_s,
            max_ack_pending=max(4 * max_inflight, 1024),
            filter_subject=filter_subject,
        )
        try:  # pull_subscribe ignores config changes to an existing consumer: apply them
            await self.js.add_consumer(stream, config)
        except BadRequestError:
            pass
        sub = await self.js.pull_subscribe(filter_subject, durable=durable, stream=stream)
        slots = asyncio.Semaphore(max_inflight)
        tasks: set[asyncio.Task] = set()
        stop = stop or asyncio.Event()
        log.info("consumer_started", stream=stream, durable=durable, filter=filter_subject)
        try:
            while not stop.is_set():
                free = max(1, min(batch, slots._value))  # noqa: SLF001 - no public accessor
                try:
                    msgs = await sub.fetch(free, timeout=fetch_timeout_s)
                except (nats.errors.TimeoutError, asyncio.TimeoutError):
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                except Exception as e:  # reconnecting, consumer recreated, ...
                    log.warning("fetch_failed", durable=durable, error=repr(e))
                    await asyncio.sleep(0.5)
                    continue
                for raw in msgs:
                    await slots.acquire()
                    # A context of its own: the message's trace id, not whatever the consumer was started under.
                    deliver = _deliver(raw, type_, handle, ack_wait_s=ack_wait_s, observer=self.observer, stream=stream, durable=durable,
                                       max_deliver=max_deliver, on_dead=dead, last_errors=self.last_errors)  # fmt: skip
                    task = asyncio.create_task(deliver, context=contextvars.Context())
                    tasks.add(task)
                    task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
        finally:
            # Unfinished work is handed back: unacked messages are redelivered after
            # ack_wait (or at once, for the ones we nak here).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await sub.unsubscribe()
            except Exception:  # connection already gone
                pass


# What the pull loop hands each message to: the handler, and the dead-letter step
# (raw, decoded message, reason); errors by (stream, stream sequence), oldest first.
Handler = Callable[[object], Awaitable[None]]
OnDead = Callable[[object, object, str], Awaitable[None]]
LastErrors = OrderedDict[tuple[str, int], str]


async def _keep_alive(raw, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await raw.in_progress()
        except Exception:  # connection blip: the next tick tries again
            pass


async def _deliver(raw, type_: object, handle: Handler, *, ack_wait_s: float, observer, stream: str, durable: str, max_deliver: int,
                   on_dead: OnDead, last_errors: LastErrors) -> None:  # fmt: skip
    """Handle one message with its trace id (if it carries one) bound in the log context, and
    tell the bus's observer (metrics, or None) when it starts and how it ended."""
    trace_id = (raw.headers or {}).get(TRACE_HEADER, "")[:128]
    started = time.monotonic()
    outcome = "handed_back"  # unless _decide returns: cancelled (shutting down), message nak'd
    if observer is not None:
        observer.started(stream, durable)
    try:
        with structlog.contextvars.bound_contextvars(**({"trace_id": trace_id} if trace_id else {})):
            outcome = await _decide(raw, type_, handle, ack_wait_s=ack_wait_s, max_deliver=max_deliver, on_dead=on_dead, last_errors=last_errors)
    except Exception:  # the ack itself failed (connection lost): redelivered after ack_wait
        outcome = "error"
        raise
    finally:
        if observer is not None:
            observer.finished(stream, durable, outcome, time.monotonic() - started)


async def _decide(raw, type_: object, handle: Handler, *, ack_wait_s: float, max_deliver: int, on_dead: OnDead,
                  last_errors: LastErrors) -> str:  # fmt: skip
    """The only place that decides ack / nak / term / in_progress; returns which it did.

    A message delivered more than `max_deliver` times (0: no limit) goes to `on_dead(raw, msg,
    reason)` instead of `handle`; `last_errors` keeps each failure's error for that reason."""
    meta = raw.metadata
    key = (meta.stream, meta.sequence.stream)
    try:
        msg = decode(raw.data, type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.error("message_undecodable", subject=raw.subject, error=str(e))
        await raw.term()
        return "term"
    if max_deliver and meta.num_delivered > max_deliver:
        last = last_errors.pop(key, None)
        reason = f"not handled after {meta.num_delivered - 1} deliveries; " + (
            f"last error: {last}" if last else "the workers that took it died or stalled (ack wait expired)"
        )
        await on_dead(raw, msg, reason)
        await raw.term()
        return "dead"
    keep_alive = asyncio.create_task(_keep_alive(raw, max(ack_wait_s / 3, 0.5)))
    started = time.monotonic()
    try:
        await handle(msg)
    except asyncio.CancelledError:
        keep_alive.cancel()
        try:  # shutting down: hand the message back now rather than after ack_wait
            await raw.nak()
            log.info("message_handed_back", subject=raw.subject, reason="shutting down")
        except Exception:
            pass
        raise
    except Unavailable as e:  # not this worker's to do right now (say, a model that moved)
        log.info("message_handed_back", subject=raw.subject, reason=str(e))
        await raw.nak(delay=1.0)
        return "nak"
    except InvalidRequest as e:
        # Handlers record user errors on the future themselves; this is the backstop.
        log.warning("message_invalid", subject=raw.subject, error=str(e))
        await raw.term()
        return "term"
    except Exception as e:
        log.exception("message_failed", subject=raw.subject, delivered=raw.metadata.num_delivered)
        last_errors[key] = f"{type(e).__name__}: {e}"[:500]
        while len(last_errors) > 1024:
            last_errors.popitem(last=False)
        await raw.nak(delay=2.0)
        return "nak"
    else:
        await raw.ack()
        log.info("message_handled", subject=raw.subject, seconds=round(time.monotonic() - started, 4))
        return "ack"
    finally:
        keep_alive.cancel()
