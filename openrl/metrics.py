"""Prometheus metrics, request ids, and the small HTTP server every process runs on
`--metrics-port` (`/metrics`; `/healthz` readiness and `/livez` liveness for workers).

The registry, the metric values and the exposition are `prometheus_client`'s: one
`CollectorRegistry` per process with our series plus the standard `process_*` (CPU, memory,
open files), `python_gc_*` and `python_info` collectors; `/metrics` answers in the format
the scraper asks for (Prometheus text, or OpenMetrics by `Accept`). Each process serves its
own /metrics (no multiprocess mode: every openrl process is one program with its own port).

Two things are ours, on top: series are called with their labels as keywords
(`MESSAGES.inc(stream=s, consumer=c, outcome="ack")`, the same as
`MESSAGES.metric.labels(...).inc()`), and a scrape first runs the collectors registered with
`REGISTRY.collect`, which may be async: the queue gauges come from JetStream consumer info,
an awaited request that prometheus_client's synchronous `collect()` cannot make.

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
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable

import prometheus_client
import structlog
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from openrl.bus import subjects

log = structlog.get_logger(__name__)

# -- the registry -----------------------------------------------------------------------------


class _Series:
    """One prometheus_client metric, called with its labels as keywords."""

    def __init__(self, metric: prometheus_client.metrics.MetricWrapperBase, name: str, help: str, label_names: Iterable[str]):
        self.metric, self.name, self.help, self.label_names = metric, name, help, tuple(label_names)

    def _child(self, labels: dict[str, object]):
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.label_names)}")
        return self.metric.labels(**labels) if labels else self.metric


class Counter(_Series):
    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        super().__init__(prometheus_client.Counter(name, help, labels, registry=None), name, help, labels)

    def inc(self, amount: float = 1.0, **labels) -> None:
        self._child(labels).inc(amount)


class Gauge(_Series):
    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        super().__init__(prometheus_client.Gauge(name, help, labels, registry=None), name, help, labels)

    def set(self, value: float, **labels) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1.0, **labels) -> None:
        self._child(labels).inc(amount)

    def dec(self, amount: float = 1.0, **labels) -> None:
        self._child(labels).dec(amount)

    def clear(self) -> None:
        """Drop every label set (a labelled gauge only)."""
        self.metric.clear()


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram(_Series):
    def __init__(self, name: str, help: str, labels: Iterable[str] = (), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(prometheus_client.Histogram(name, help, labels, registry=None, buckets=tuple(buckets)), name, help, labels)

    def observe(self, value: float, **labels) -> None:
        self._child(labels).observe(value)


Collector = Callable[[], None] | Callable[[], Awaitable[None]]


class Registry:
    """A prometheus_client `CollectorRegistry` (`.prom`) with the standard process, GC and
    platform collectors, our series by name (`.metrics`), and the collectors that run before
    every scrape."""

    def __init__(self):
        self.prom = prometheus_client.CollectorRegistry(auto_describe=True)
        for standard in (prometheus_client.ProcessCollector, prometheus_client.GCCollector, prometheus_client.PlatformCollector):
            standard(registry=self.prom)
        self.metrics: dict[str, _Series] = {}
        self.collectors: list[Collector] = []

    def add(self, series):
        if series.name in self.metrics:
            raise ValueError(f"{series.name} is defined twice")
        self.prom.register(series.metric)
        self.metrics[series.name] = series
        return series

    def collect(self, fn: Collector) -> None:
        """Run `fn` (sync or async; it sets gauges) before every scrape."""
        self.collectors.append(fn)

    async def refresh(self, timeout_s: float = 5.0) -> None:
        """Run the scrape-time collectors; one that fails or hangs is logged and skipped (a
        scrape still answers with what it has)."""
        for fn in self.collectors:
            try:
                result = fn()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, timeout_s)
            except Exception as e:
                log.warning("metrics_collect_failed", collector=getattr(fn, "__qualname__", repr(fn)), error=repr(e))


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
ADMISSION_HELD = _r.add(Counter("openrl_gateway_admission_held_total", "requests that waited at the gateway for their key's share (gateway/admission.py)", ["pool"]))
ADMISSION_HOLD_SECONDS = _r.add(Histogram("openrl_gateway_admission_hold_seconds", "how long a held request waited at the gateway", ["pool"]))
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
PASS_PAUSES = _r.add(Counter("openrl_trainer_pass_pauses_total", "times a long training pass paused inside so other keys' calls could run (CPU only: trainer/pauses.py)"))
WORKER_MODELS = _r.add(Gauge("openrl_worker_models", "models this worker holds (trainer: LoRA tenants built; sampler: adapters cached)", ["kind", "worker_id"]))
LEASES_HANDED_OVER = _r.add(Counter("openrl_leases_handed_over_total", "models handed to another trainer at shutdown"))
SAMPLED_TOKENS = _r.add(Counter("openrl_sampled_tokens_total", "tokens generated"))
ADAPTER_CACHE = _r.add(Counter("openrl_adapter_cache_total", "sampler adapter lookups: result=hit (cached bytes) or miss (fetched from the object store); result=prefetch: fetched ahead on a trainer's notice", ["result"]))
ADAPTER_LOADS = _r.add(Counter("openrl_adapter_loads_total", "adapters loaded into the sampling backend"))
REWARD_SECONDS = _r.add(Histogram("openrl_reward_seconds", "time to score one request (all its items)", ["reward"]))
REWARD_ITEMS = _r.add(Counter("openrl_reward_items_total", "items scored", ["reward"]))
REWARD_ERRORS = _r.add(Counter("openrl_reward_errors_total", "items whose reward call failed, by kind", ["reward", "kind"]))
# GPU memory of trainers and samplers, by CUDA device index as this process sees it (no
# samples without CUDA): what this process's tensors hold and what its caching allocator
# reserved, and the device's memory in use by every process on it (vLLM's engine included).
GPU_MEMORY_ALLOCATED = _r.add(Gauge("openrl_gpu_memory_allocated_bytes", "GPU memory held by this process's tensors", ["device"]))
GPU_MEMORY_RESERVED = _r.add(Gauge("openrl_gpu_memory_reserved_bytes", "GPU memory reserved by this process's caching allocator", ["device"]))
GPU_MEMORY_USED = _r.add(Gauge("openrl_gpu_memory_used_bytes", "GPU memory in use on the device, by all processes", ["device"]))
GPU_MEMORY_TOTAL = _r.add(Gauge("openrl_gpu_memory_total_bytes", "GPU memory of the device", ["device"]))

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

    # A counter's `_created` twin doubles the series for a timestamp nobody here queries.
    prometheus_client.disable_created_metrics()
    exposition = make_aiohttp_handler(registry.prom)  # the format by Accept, gzip by Accept-Encoding

    async def metrics(request: web.Request) -> web.StreamResponse:
        await registry.refresh()
        return await exposition(request)

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


def collect_gpu_memory() -> None:
    """Set the GPU memory gauges, where this process runs torch with CUDA initialised.

    torch is looked up, never imported: this module is shared with the gateway and the
    rewarders, which must not load it, and a process that has not touched CUDA yet gets no
    CUDA context made for it by a scrape (every call below needs an initialised one)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_available() or not cuda.is_initialized():
        return
    for i in range(cuda.device_count()):
        GPU_MEMORY_ALLOCATED.set(cuda.memory_allocated(i), device=str(i))
        GPU_MEMORY_RESERVED.set(cuda.memory_reserved(i), device=str(i))
    current = cuda.current_device()  # device-wide figures for ours only: asking another would make a context there
    free, total = cuda.mem_get_info(current)
    GPU_MEMORY_USED.set(total - free, device=str(current))
    GPU_MEMORY_TOTAL.set(total, device=str(current))


def watch_worker(kind: str, info: Callable[[], object]) -> None:
    """Export a worker's busy fraction from its heartbeat info (WorkerInfo), and for trainers
    and samplers their GPU memory."""
    if kind in ("trainer", "sampler"):
        REGISTRY.collect(collect_gpu_memory)

    def collect() -> None:
        i = info()
        WORKER_BUSY.set(i.busy_fraction, kind=kind, worker_id=i.worker_id)
        if kind != "rewarder":
            WORKER_MODELS.set(i.models, kind=kind, worker_id=i.worker_id)

    REGISTRY.collect(collect)
