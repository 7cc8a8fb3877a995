"""openrl/metrics.py on prometheus_client: what /metrics, /healthz and /livez answer, the
standard process series, scrape-time collectors, and the GPU memory gauges (on CUDA).

The whole stack's series (each process its own port, moved by real work) are checked in
tests/test_observability.py; here one metrics server runs in the test process."""

from __future__ import annotations

import sys

import aiohttp
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from openrl import metrics
from stack_helpers import free_port


def families(text: str) -> dict:
    """name -> family, parsed by prometheus_client's own parser (it raises on a bad line)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for f in fams.values() for s in f.samples}


async def test_metrics_health_and_liveness_endpoints():
    registry = metrics.Registry()
    requests = registry.add(metrics.Counter("test_requests_total", "requests", ["route"]))
    depth = registry.add(metrics.Gauge("test_depth", "set by a collector"))
    seconds = registry.add(metrics.Histogram("test_seconds", "latency", ["route"], buckets=(0.1, 1)))
    calls = []

    async def async_collector():
        calls.append("async")
        depth.set(7)

    def failing_collector():
        calls.append("failing")
        raise RuntimeError("JetStream is away")

    registry.collect(failing_collector)  # logged and skipped: the scrape still answers
    registry.collect(async_collector)
    requests.inc(route="/a")
    requests.inc(2, route="/a")
    seconds.observe(0.5, route="/a")
    checks = {"bus": True, "model": False}
    port = free_port()
    runner = await metrics.serve(port, "127.0.0.1", lambda: checks, registry=registry)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/metrics") as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await r.text()
            assert calls == ["failing", "async"]
            got = samples(families(text))
            assert got[("test_requests_total", frozenset({("route", "/a")}))] == 3
            assert got[("test_depth", frozenset())] == 7
            assert got[("test_seconds_bucket", frozenset({("route", "/a"), ("le", "0.1")}))] == 0
            assert got[("test_seconds_bucket", frozenset({("route", "/a"), ("le", "1.0")}))] == 1
            assert got[("test_seconds_count", frozenset({("route", "/a")}))] == 1
            assert not [name for name, _ in got if name.endswith("_created")]  # disabled: no twin per counter
            # The standard series of prometheus_client's process, GC and platform collectors.
            assert got[("process_resident_memory_bytes", frozenset())] > 10 * 2**20
            assert got[("process_cpu_seconds_total", frozenset())] > 0
            assert got[("process_open_fds", frozenset())] > 0
            assert ("python_gc_collections_total", frozenset({("generation", "0")})) in got
            assert any(name == "python_info" for name, _ in got)
            # OpenMetrics when the scraper asks for it.
            async with http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await r.text()).endswith("# EOF\n")
            async with http.get("/healthz") as r:
                assert r.status == 503 and await r.json() == {"ready": False, "bus": True, "model": False}
            checks["model"] = True
            async with http.get("/healthz") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            async with http.get("/livez") as r:
                assert r.status == 200 and await r.json() == {"live": True}
    finally:
        await runner.cleanup()
    assert await metrics.serve(0) is None  # port 0: no server


def test_every_series_is_exposed_with_its_declared_type_and_labels():
    import prometheus_client

    fams = families(prometheus_client.generate_latest(metrics.REGISTRY.prom).decode())
    for name in metrics.SERIES:
        series = metrics.REGISTRY.metrics[name]
        kind = {metrics.Counter: "counter", metrics.Gauge: "gauge", metrics.Histogram: "histogram"}[type(series)]
        family = fams[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind and family.documentation == series.help, name
    assert "openrl_gpu_memory_allocated_bytes" in metrics.SERIES and "openrl_messages_total" in metrics.SERIES


def test_labels_must_match_the_declared_ones():
    with pytest.raises(ValueError, match="openrl_messages_total: labels"):
        metrics.MESSAGES.inc(stream="OPENRL_TRAIN")  # consumer and outcome missing
    with pytest.raises(ValueError, match="openrl_optim_steps_total: labels"):
        metrics.OPTIM_STEPS.inc(model="m")
    with pytest.raises(ValueError, match="defined twice"):
        metrics.REGISTRY.add(metrics.Counter("openrl_optim_steps_total", "again"))


def _gpu_samples() -> dict:
    import prometheus_client

    got = samples(families(prometheus_client.generate_latest(metrics.REGISTRY.prom).decode()))
    return {k: v for k, v in got.items() if k[0].startswith("openrl_gpu_memory_")}


def test_gpu_memory_is_skipped_without_torch_or_cuda(monkeypatch):
    for gauge in (metrics.GPU_MEMORY_ALLOCATED, metrics.GPU_MEMORY_RESERVED, metrics.GPU_MEMORY_USED, metrics.GPU_MEMORY_TOTAL):
        gauge.clear()
    monkeypatch.delitem(sys.modules, "torch")  # a gateway or rewarder: torch is never imported
    metrics.collect_gpu_memory()
    assert "torch" not in sys.modules and _gpu_samples() == {}
    monkeypatch.undo()
    if not torch.cuda.is_available():  # torch on a CPU-only machine: no series, no error
        metrics.collect_gpu_memory()
        assert _gpu_samples() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_on_cuda():
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    metrics.collect_gpu_memory()
    got = _gpu_samples()
    device = frozenset({("device", str(torch.cuda.current_device()))})
    allocated = got[("openrl_gpu_memory_allocated_bytes", device)]
    assert allocated >= block.numel()
    assert got[("openrl_gpu_memory_reserved_bytes", device)] >= allocated
    assert allocated <= got[("openrl_gpu_memory_used_bytes", device)] <= got[("openrl_gpu_memory_total_bytes", device)]
    del block
    torch.cuda.empty_cache()
    metrics.collect_gpu_memory()
    assert _gpu_samples()[("openrl_gpu_memory_allocated_bytes", device)] < allocated
