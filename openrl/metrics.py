"""Prometheus metrics, request ids, and the small HTTP server every process runs on
`--metrics-port` (`/metrics`; `/healthz` readiness and `/livez` liveness for workers).

A tiny registry and text-format writer of our own rather than `prometheus_client`: every
process here is one asyncio program (no multiprocess mode to manage), we need counters,
gauges and histograms with labels and nothing else, the exposition format is a few dozen
lines, gauges that read state at scrape time (JetStream consumer info, an async call) fit
in naturally, and the images get no new dependency.

Every series the code exports is defined in this module (`SERIES` lists them; the Grafana
dashboard in deploy/ is checked against it). Importing this module only defines them:
processes register their scrape-time collectors and start the server from the CLI.

Request ids: the gateway binds one per HTTP request (`X-Request-Id` if the client sent a
well-formed one) as the structlog context variable `trace_id` (`request_id` already names
a future in this code base) and returns it as `X-Request-Id`; `Bus.publish` copies it into
the message's NATS headers and `Bus.consume` binds it again while a worker handles the
message, so `grep <id> <data>/logs/*.log` shows the request's whole path.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

import structlog
from aiohttp import web

from openrl.bus import subjects

log = structlog.get_logger(__name__)

# -- the registry and the text format --------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()  # the trainer's and sampler's compute threads count too

    def _key(self, labels: dict[str, object]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def _label_text(self, key: tuple[str, ...], extra: str = "") -> str:
        parts = [f'{k}="{_escape(v)}"' for k, v in zip(self.labels, key)]
        if extra:
            parts.append(extra)
        return "{" + ",".join(parts) + "}" if parts else ""

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{self._label_text(k)} {_number(v)}" for k, v in items]
        return lines


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels) -> None:
        self.inc(-amount, **labels)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._hist: dict[tuple[str, ...], tuple[list[int], float]] = {}  # per label set: bucket counts, sum

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._hist.get(key) or ([0] * len(self.buckets), 0.0)
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._hist[key] = (counts, total + value)

    def count(self, **labels) -> int:
        entry = self._hist.get(self._key(labels))
        return entry[0][-1] if entry else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, (list(c), s)) for k, (c, s) in self._hist.items())
        for key, (counts, total) in items:
            for bound, n in zip(self.buckets, counts):
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{self._label_text(key, le)} {n}")
            lines.append(f"{self.name}_sum{self._label_text(key)} {_number(total)}")
            lines.append(f"{self.name}_count{self._label_text(key)} {counts[-1]}")
        return lines


Collector = Callable[[], None] | Callable[[], Awaitable[None]]


class Registry:
    def __init__(self):
        self.metrics: dict[str, _Metric] = {}
        self.collectors: list[Collector] = []

    def add(self, metric):
        if metric.name in self.metrics:
            raise ValueError(f"{metric.name} is defined twice")
        self.metrics[metric.name] = metric
        return metric

    def collect(self, fn: Collector) -> None:
        """Run `fn` (sync or async; it sets gauges) before every scrape."""
        self.collectors.append(fn)

    async def render(self, timeout_s: float = 5.0) -> str:
        for fn in self.collectors:
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, timeout_s)
            except Exception as e:  # a scrape still answers with what it has
                log.warning("metrics_collect_failed", collector=getattr(fn, "__qualname__", repr(fn)), error=repr(e))
        lines: list[str] = []
        for metric in self.metrics.values():
            lines += metric.render()
        return "\n".join(lines) + "\n"


REGISTRY = Registry()
_r = REGISTRY

# -- the series -----------------------------------------------------------------------------

# Every process
BUS_CONNECTED = _r.add(Gauge("openrl_bus_connected", "1 while the NATS connection is up", ["process"]))
MESSAGES = _r.add(Counter("openrl_messages_total", "bus messages handled, by consumer and outcome (ack, nak, term, handed_back, error)", ["stream", "consumer", "outcome"]))
MESSAGES_IN_FLIGHT = _r.add(Gauge("openrl_messages_in_flight", "bus messages being handled now", ["stream", "consumer"]))
MESSAGE_SECONDS = _r.add(Histogram("openrl_message_seconds", "time from delivery to ack/nak/term", ["stream", "consumer"]))

# Gateway
HTTP_REQUESTS = _r.add(Counter("openrl_http_requests_total", "gateway HTTP requests, by route and status", ["route", "method", "status"]))
HTTP_SECONDS = _r.add(Histogram("openrl_http_request_seconds", "gateway HTTP request latency, by route and status", ["route", "method", "status"]))
FUTURES_WAITING = _r.add(Gauge("openrl_futures_waiting", "long polls waiting on an unfinished future in this gateway"))
HTTP_IN_FLIGHT = _r.add(Gauge("openrl_http_requests_in_flight", "gateway HTTP requests being served now"))
# Queues, read from JetStream consumer info (the gateway; `openrl status` reads the same)
CONSUMER_PENDING = _r.add(Gauge("openrl_consumer_pending", "messages not yet delivered to the consumer (backlog)", ["stream", "consumer"]))
CONSUMER_ACK_PENDING = _r.add(Gauge("openrl_consumer_ack_pending", "messages delivered and not yet acked", ["stream", "consumer"]))
CONSUMER_REDELIVERED = _r.add(Gauge("openrl_consumer_redelivered", "delivered messages that were delivered more than once and are unacked", ["stream", "consumer"]))
CONSUMER_WAITING = _r.add(Gauge("openrl_consumer_waiting", "pull requests waiting (idle workers)", ["stream", "consumer"]))
STREAM_MESSAGES = _r.add(Gauge("openrl_stream_messages", "messages stored in the stream", ["stream"]))

# Workers
WORKER_BUSY = _r.add(Gauge("openrl_worker_busy_fraction", "fraction of time the worker computed (trainer, sampler: since start; rewarder: last 30 s)", ["kind", "worker_id"]))
TRAINED_TOKENS = _r.add(Counter("openrl_trained_tokens_total", "tokens through forward (pass=forward) or forward+backward (pass=forward_backward)", ["pass"]))
OPTIM_STEPS = _r.add(Counter("openrl_optim_steps_total", "optimizer steps applied"))
WORKER_MODELS = _r.add(Gauge("openrl_worker_models", "models this worker holds (trainer: LoRA tenants built; sampler: adapters cached)", ["kind", "worker_id"]))
LEASES_HANDED_OVER = _r.add(Counter("openrl_leases_handed_over_total", "models handed to another trainer at shutdown"))
SAMPLED_TOKENS = _r.add(Counter("openrl_sampled_tokens_total", "tokens generated"))
ADAPTER_CACHE = _r.add(Counter("openrl_adapter_cache_total", "sampler adapter lookups: result=hit (cached bytes) or miss (fetched from the object store)", ["result"]))
ADAPTER_LOADS = _r.add(Counter("openrl_adapter_loads_total", "adapters loaded into the sampling backend"))
REWARD_SECONDS = _r.add(Histogram("openrl_reward_seconds", "time to score one request (all its items)", ["reward"]))
REWARD_ITEMS = _r.add(Counter("openrl_reward_items_total", "items scored", ["reward"]))
REWARD_ERRORS = _r.add(Counter("openrl_reward_errors_total", "items whose reward call failed, by kind", ["reward", "kind"]))

SERIES = tuple(REGISTRY.metrics)


def series_names() -> set[str]:
    """Every name a scrape can contain (histograms add _bucket, _sum and _count)."""
    names = set()
    for m in REGISTRY.metrics.values():
        names.add(m.name)
        if isinstance(m, Histogram):
            names |= {f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
    return names


# -- bus messages ---------------------------------------------------------------------------


def _consumer(stream: str, durable: str) -> str:
    # One durable per model on the train stream: label them together, not one series per model.
    return "models" if stream == subjects.TRAIN_STREAM else durable


class MessageObserver:
    """What `Bus.consume` reports (Bus.observer): in flight, then the outcome."""

    def started(self, stream: str, durable: str) -> None:
        MESSAGES_IN_FLIGHT.inc(stream=stream, consumer=_consumer(stream, durable))

    def finished(self, stream: str, durable: str, outcome: str, seconds: float) -> None:
        consumer = _consumer(stream, durable)
        MESSAGES_IN_FLIGHT.dec(stream=stream, consumer=consumer)
        MESSAGES.inc(stream=stream, consumer=consumer, outcome=outcome)
        MESSAGE_SECONDS.observe(seconds, stream=stream, consumer=consumer)


# -- queue depth from JetStream --------------------------------------------------------------

STREAMS = (subjects.TRAIN_STREAM, subjects.CREATE_STREAM, subjects.SAMPLE_STREAM, subjects.REWARD_STREAM)


async def consumer_stats(js) -> tuple[dict[str, dict], list[dict]]:
    """({stream: {messages, bytes, consumers}}, [{stream, consumer, pending, ack_pending,
    redelivered, waiting}]) for every OpenRL stream, plus any dead-letter stream (a stream
    whose name contains DLQ or DEAD)."""
    streams: dict[str, dict] = {}
    consumers: list[dict] = []
    names = list(STREAMS)
    try:
        for info in await js.streams_info():
            name = info.config.name
            if name not in names and ("DLQ" in name.upper() or "DEAD" in name.upper()):
                names.append(name)
    except Exception:  # listing is best effort; the known streams are asked for by name
        pass
    for name in names:
        try:
            info = await js.stream_info(name)
        except Exception:
            continue
        dead = name not in STREAMS
        streams[name] = {"messages": info.state.messages, "bytes": info.state.bytes, "consumers": info.state.consumer_count, "dead_letters": dead}
        if dead:
            continue
        found = []
        while True:  # listed 256 at a time
            page = await js.consumers_info(name, offset=len(found) or None)
            found += page
            if len(page) < 256:
                break
        for c in found:
            consumers.append(
                {
                    "stream": name,
                    "consumer": c.name,
                    "pending": c.num_pending or 0,
                    "ack_pending": c.num_ack_pending or 0,
                    "redelivered": c.num_redelivered or 0,
                    "waiting": c.num_waiting or 0,
                }
            )
    return streams, consumers


def queue_collector(bus, min_interval_s: float = 0.0) -> Callable[[], Awaitable[None]]:
    """A collector that sets the queue gauges from consumer info (at most every `min_interval_s`)."""
    last = [0.0]

    async def collect() -> None:
        if time.monotonic() - last[0] < min_interval_s:
            return
        last[0] = time.monotonic()
        streams, consumers = await consumer_stats(bus.js)
        for g in (CONSUMER_PENDING, CONSUMER_ACK_PENDING, CONSUMER_REDELIVERED, CONSUMER_WAITING, STREAM_MESSAGES):
            g.clear()  # a deleted consumer's series goes away
        for name, s in streams.items():
            STREAM_MESSAGES.set(s["messages"], stream=name)
        for c in consumers:
            labels = dict(stream=c["stream"], consumer=c["consumer"])
            CONSUMER_PENDING.set(c["pending"], **labels)
            CONSUMER_ACK_PENDING.set(c["ack_pending"], **labels)
            CONSUMER_REDELIVERED.set(c["redelivered"], **labels)
            CONSUMER_WAITING.set(c["waiting"], **labels)

    return collect


# -- request ids ----------------------------------------------------------------------------


_WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")


def request_id_of(header: str | None) -> str:
    """The client's X-Request-Id if it is well-formed (8-128 of [A-Za-z0-9._:-]), else a new one."""
    if header and _WELL_FORMED.fullmatch(header):
        return header
    return "req-" + uuid.uuid4().hex


def _route(request: web.Request) -> str:
    """The route template (bounded cardinality), never the raw path."""
    try:
        info = request.match_info.route.resource
    except AttributeError:
        info = None
    if info is None:
        return "unmatched"
    return info.canonical


@web.middleware
async def observe_http(request: web.Request, handler):
    """Gateway middleware (outermost): the request id, and counts and latency by route and status."""
    rid = request_id_of(request.headers.get("X-Request-Id"))
    route, method = _route(request), request.method
    started = time.perf_counter()
    status = 500
    HTTP_IN_FLIGHT.inc()
    with structlog.contextvars.bound_contextvars(trace_id=rid):
        try:
            response = await handler(request)
            status = response.status
            response.headers["X-Request-Id"] = rid
            return response
        except web.HTTPException as e:
            status = e.status
            e.headers["X-Request-Id"] = rid
            raise
        finally:
            seconds = time.perf_counter() - started
            HTTP_IN_FLIGHT.dec()
            HTTP_REQUESTS.inc(route=route, method=method, status=str(status))
            HTTP_SECONDS.observe(seconds, route=route, method=method, status=str(status))
            log.info("http_request", method=method, route=route, status=status, ms=round(seconds * 1000, 1))


# -- the server -----------------------------------------------------------------------------


Readiness = Callable[[], dict[str, bool]]
ROUTES = ("/metrics", "/healthz", "/livez")  # what `serve` answers (the manifests' probes and scrapes use them)


async def serve(port: int, host: str = "0.0.0.0", ready: Readiness | None = None, registry: Registry = REGISTRY) -> web.AppRunner | None:
    """Serve /metrics (and /healthz, /livez when `ready` is given) on `port`; 0: nothing.

    /healthz answers 200 when every check in `ready()` is true, else 503, with the checks as
    JSON (a readiness probe: bus connected, model loaded, not draining). /livez answers 200
    while the event loop runs (a liveness probe: NATS being down is not this process's fault).
    """
    if not port:
        return None

    async def metrics(request: web.Request) -> web.Response:
        text = await registry.render()
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Format": "0.0.4"})

    async def healthz(request: web.Request) -> web.Response:
        checks = ready() if ready else {}
        ok = all(checks.values())
        return web.json_response({"ready": ok, **checks}, status=200 if ok else 503)

    async def livez(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", livez)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics_listening", url=f"http://{host}:{port}/metrics")
    return runner


def watch_bus(bus, process: str) -> None:
    """Export the bus connection state of this process."""
    REGISTRY.collect(lambda: BUS_CONNECTED.set(1 if bus.nc.is_connected else 0, process=process))


def watch_worker(kind: str, info: Callable[[], object]) -> None:
    """Export a worker's busy fraction from its heartbeat info (WorkerInfo)."""

    def collect() -> None:
        i = info()
        WORKER_BUSY.set(i.busy_fraction, kind=kind, worker_id=i.worker_id)
        if kind != "rewarder":
            WORKER_MODELS.set(i.models, kind=kind, worker_id=i.worker_id)

    REGISTRY.collect(collect)
