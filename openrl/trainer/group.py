"""A trainer group: one trainer to the bus, N ranks on torch.distributed.

`openrl trainer --nproc-per-node N` (or `--nnodes M`) does not train itself: it launches the
ranks with torchrun's own launcher (torch.distributed.run, static rendezvous), which watches them
and, when any rank dies, stops the rest and exits non-zero, so the supervisor (locally) or
Kubernetes (in a cluster) restarts the whole group. A restarted group recovers as a single
trainer does (snapshot + train log): only rank 0 holds state that matters (the bus does), and
the other ranks start from the base model like it.

Rank 0 is the trainer the bus sees: it holds the NATS connection, the leases and the consumers,
and runs the ordinary `Trainer` service with a `GroupEngine`. Every engine call that computes or
changes state is first broadcast to the other ranks (a msgspec message over torch.distributed:
its length, then its bytes), which make the same call on their own `LoraEngine`, in the same
order, on the one compute thread. Reads (adapter weights, checkpoints, peft folders) need no
other rank: adapters are replicated. Why torch.distributed rather than NATS for the hand-off:
the ranks already share a process group for FSDP, the calls must be in lockstep with its
collectives, and a group then has one consumer per model, as the bus's order guarantee needs.

A call that fails validation fails the same way on every rank (same bytes, same checks) before
any collective; anything else that fails on one rank (an OOM, a bug) ends that rank, and the
group with it. A collective that waits longer than `collective_timeout_s` raises rather than
hangs; an idle rank 0 sends a keep-alive every `keepalive_s` so idle followers never time out.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import msgspec
import structlog
import torch
import torch.distributed as dist

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import AdamParams, ForwardBackward, LoraSpec

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GroupConfig:
    """The torchrun-named settings of a group (each also an OPENRL_* env var in the CLI)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""  # required with nnodes > 1: node 0's address
    master_port: int = 0  # 0: a free port on a single node, 29500 across nodes (torchrun's default)
    rendezvous_timeout_s: int = 120  # a node that cannot reach the others fails after this
    collective_timeout_s: int = 600
    keepalive_s: float = 30.0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def check(self, cuda_devices: int | None) -> None:
        """ValueError with a clear message for settings that cannot start. `cuda_devices`: the
        devices this node sees when the group runs on CUDA, else None."""
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.master_addr:
            raise ValueError("--master-addr (node 0's address) is required with --nnodes > 1")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"--master-port must be in [1, 65535] (or 0: a free one on a single node), got {self.master_port}")
        if self.rendezvous_timeout_s < 1 or self.collective_timeout_s < 1:
            raise ValueError("--rendezvous-timeout-s and --collective-timeout-s must be >= 1")
        if cuda_devices is not None and self.nproc_per_node > cuda_devices:
            raise ValueError(
                f"--nproc-per-node {self.nproc_per_node} is more ranks than the {cuda_devices} CUDA device(s) "
                "this node sees (CUDA_VISIBLE_DEVICES); one rank per GPU"
            )


def launch(cfg: GroupConfig, argv: list[str]) -> int:
    """Run the group's ranks on this node with torchrun's launcher until they end; each rank
    runs `python -m openrl trainer <argv> --group-rank`. Returns the launcher's exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    single = cfg.nnodes == 1 and not cfg.master_addr
    port = cfg.master_port or (_free_port() if single else 29500)
    args = [
        f"--nproc-per-node={cfg.nproc_per_node}",
        f"--nnodes={cfg.nnodes}",
        f"--node-rank={cfg.node_rank}",
        f"--master-addr={cfg.master_addr or '127.0.0.1'}",
        f"--master-port={port}",
        "--rdzv-backend=static",
        f"--rdzv-conf=timeout={cfg.rendezvous_timeout_s}",
        "--max-restarts=0",  # a dead rank ends the group: the supervisor restarts it whole
        "--monitor-interval=0.5",
        "--module",
        "openrl",
        "trainer",
        *argv,
        "--group-rank",
    ]
    log.info("trainer_group_launching", ranks=cfg.world_size, nproc_per_node=cfg.nproc_per_node, nnodes=cfg.nnodes,
             node_rank=cfg.node_rank, master=f"{cfg.master_addr or '127.0.0.1'}:{port}", single_node=single)
    try:
        torchrun.main(args)
    except SignalException as e:  # asked to stop: torchrun has stopped the ranks
        log.info("trainer_group_stopped", signal=e.sigval.name if hasattr(e.sigval, "name") else str(e.sigval))
        return 0
    except SystemExit as e:  # torchrun ends with sys.exit on a worker failure
        return int(e.code or 0) if isinstance(e.code, int) else 1
    except torch.distributed.DistNetworkError as e:
        log.error("trainer_group_rendezvous_failed", error=str(e)[:300],
                  why=f"node {cfg.node_rank} of {cfg.nnodes} could not reach the group's rendezvous at "
                      f"{cfg.master_addr or '127.0.0.1'}:{port} within {cfg.rendezvous_timeout_s} s")  # fmt: skip
        return 1
    except Exception as e:  # ChildFailedError and friends: already logged by torchrun
        log.error("trainer_group_failed", error=repr(e)[:500])
        return 1
    return 0


@dataclass(frozen=True)
class Rank:
    rank: int
    world: int
    local_rank: int
    device: str


def init_rank(cfg: GroupConfig, device: str) -> Rank:
    """Join the process group this process was launched into (torchrun's env), on `device`."""
    _die_with_parent()
    # A rank that dies inside the backend (an abort in C++: gloo, nccl) prints every thread's
    # Python stack to its stderr first, so the log says which call it was in.
    faulthandler.enable(all_threads=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.collective_timeout_s))
    set_title(f"openrl trainer rank {rank}/{world}")
    log.info("trainer_rank_joined", rank=rank, world=world, local_rank=local_rank, backend=backend)
    return Rank(rank=rank, world=world, local_rank=local_rank, device=device)


def leave(*, together: bool = False) -> None:
    """Leave the process group (destroy it), as torch documents for the end of a program. Left to
    the interpreter's teardown, the backend's threads and store connection are torn down in
    whatever order finalisation picks; a rank that had done all its work was seen to abort then
    ("terminate called without an active exception", exit -6). Without `together` it waits for
    no other rank (a failing rank's way out). `together`, for an orderly stop that every rank
    makes: a barrier first, so no rank tears its connections down while another still reads the
    stop from them (a follower was seen to abort so once, in a full test run)."""
    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def set_title(title: str) -> None:
    """What `ps` shows for this process (its whole command line), where setproctitle is installed."""
    try:
        import setproctitle
    except ImportError:  # e.g. a GPU box without it: ps shows `python -m openrl trainer ... --group-rank`
        return
    args = sys.argv[1:]
    setproctitle.setproctitle(" ".join([title, *(args[1:] if args[:1] == ["trainer"] else args)]))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """A kill -9 of the launcher takes its ranks along (Linux)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------- the calls


class Create(msgspec.Struct, frozen=True, tag=True):
    model_id: str
    lora: LoraSpec


class Drop(msgspec.Struct, frozen=True, tag=True):
    model_id: str


class Step(msgspec.Struct, frozen=True, tag=True):
    model_id: str
    adam: AdamParams


class Compute(msgspec.Struct, frozen=True, tag=True):
    request: ForwardBackward


class Import(msgspec.Struct, frozen=True, tag=True):
    model_id: str
    state: bytes  # safetensors, metadata included
    with_optimizer: bool


class KeepAlive(msgspec.Struct, frozen=True, tag=True):
    pass


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


Call = Create | Drop | Step | Compute | Import | KeepAlive | Stop
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Call)


def _broadcast(call: Call | None, device: str) -> Call:
    """Rank 0 sends `call`; every other rank returns what it sent."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    data = _encoder.encode(call) if dist.get_rank() == 0 else b""
    size[0] = len(data)
    dist.broadcast(size, src=0)
    buf = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        if dist.get_rank() == 0
        else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buf, src=0)
    return call if dist.get_rank() == 0 else _decoder.decode(buf.cpu().numpy().tobytes())


class GroupEngine:
    """Rank 0's engine: a LoraEngine whose state-changing calls every rank makes with it."""

    def __init__(self, engine, cfg: GroupConfig):
        self.engine = engine
        self.info = engine.info
        self.world = engine.world
        self._cfg = cfg
        self._last = time.monotonic()

    def _both(self, call: Call, local):
        """Broadcast `call`, then make it here. Every call, keep-alives too, comes from the one
        compute thread, so calls never interleave."""
        try:
            _broadcast(call, self.info.device)
            self._last = time.monotonic()
            return local()
        except InvalidRequest:
            raise  # refused the same way on every rank, before any collective
        except BaseException as e:
            # A failed collective or a rank that failed alone: the ranks are no longer in step.
            # End the group now (torchrun stops the others, the supervisor restarts it) rather
            # than finish the request with an error: it was not acked, so the restarted group
            # replays it.
            log.critical("trainer_group_broken", call=type(call).__name__, error=repr(e)[:500])
            os._exit(70)

    # Calls every rank makes.
    def create(self, model_id: str, lora: LoraSpec) -> None:
        return self._both(Create(model_id, lora), lambda: self.engine.create(model_id, lora))

    def drop(self, model_id: str) -> None:
        return self._both(Drop(model_id), lambda: self.engine.drop(model_id))

    def forward_backward(self, req: ForwardBackward):
        return self._both(Compute(req), lambda: self.engine.forward_backward(req))

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]:
        return self._both(Step(model_id, adam), lambda: self.engine.optim_step(model_id, adam))

    def import_state(self, model_id: str, tensors, metadata, *, with_optimizer: bool) -> None:
        from safetensors.torch import save

        # Checked here first, so an invalid checkpoint never reaches the other ranks.
        self.engine.check_state(model_id, tensors, metadata, with_optimizer=with_optimizer)
        state = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        call = Import(model_id, state, with_optimizer)
        return self._both(call, lambda: self.engine.import_state(model_id, tensors, metadata, with_optimizer=with_optimizer))

    def keepalive(self) -> None:
        """Called now and then on the compute thread: a no-op call when the group has been idle
        for `keepalive_s`, so the followers' wait never reaches the collective timeout."""
        if time.monotonic() - self._last >= self._cfg.keepalive_s:
            self._both(KeepAlive(), lambda: None)

    def stop(self) -> None:
        """Tell every rank to stop, then leave the group together (`leave(together=True)`)."""
        self._both(Stop(), lambda: None)
        leave(together=True)

    # Reads: adapters are whole on every rank, so rank 0 answers alone.
    def has(self, model_id: str) -> bool:
        return self.engine.has(model_id)

    def model_ids(self) -> list[str]:
        return self.engine.model_ids()

    def adapter_state(self, model_id: str):
        return self.engine.adapter_state(model_id)

    def adapter_grads(self, model_id: str):
        return self.engine.adapter_grads(model_id)

    def export_state(self, model_id: str, *, with_optimizer: bool):
        return self.engine.export_state(model_id, with_optimizer=with_optimizer)

    def peft_files(self, model_id: str) -> dict[str, bytes]:
        return self.engine.peft_files(model_id)


def follow(engine) -> None:
    """A rank other than 0: make rank 0's calls until it says stop (or the group ends)."""
    from safetensors.torch import load

    log.info("trainer_rank_following", rank=engine.rank)
    while True:
        call = _broadcast(None, engine.info.device)
        try:
            match call:
                case Create(model_id, lora):
                    engine.create(model_id, lora)
                case Drop(model_id):
                    engine.drop(model_id)
                case Compute(request):
                    engine.forward_backward(request)
                case Step(model_id, adam):
                    engine.optim_step(model_id, adam)
                case Import(model_id, state, with_optimizer):
                    engine.import_state(model_id, load(state), safetensors_metadata(state), with_optimizer=with_optimizer)
                case KeepAlive():
                    pass
                case Stop():
                    log.info("trainer_rank_stopping", rank=engine.rank)
                    leave(together=True)
                    return
        except InvalidRequest:
            pass  # rank 0 failed the same way and told the client


def safetensors_metadata(state: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob (its JSON header's __metadata__)."""
    import json
    import struct

    (n,) = struct.unpack("<Q", state[:8])
    return json.loads(state[8 : 8 + n]).get("__metadata__", {})
