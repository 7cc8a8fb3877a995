"""What a trainer holds for requests that wait for their turn is bounded (docs/limits.md).

A real Trainer on the session's nats-server and a tiny engine: requests go to `on_train` as
the consumer would hand them over (the pull loop is tested elsewhere). A request too far past
its model's next seq_id is refused (its future fails as a user error) and its seq_id is skipped
when the sequence gets there, by this trainer and by one that rebuilds the model from its log;
a waiting request past the byte caps is handed back; the next request is always taken; a
sparse tensor that would densify past the element bound is refused before any allocation.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest

from openrl.bus import subjects
from openrl.bus.errors import InvalidRequest, Unavailable
from openrl.bus.messages import MAX_REQUEST_ELEMENTS, Datum, ForwardBackward, Future, LoraSpec, ModelRecord, Tensor
from openrl.trainer import losses, requests
from openrl.trainer.engine import LoraEngine
from openrl.trainer.service import TOO_FAR_AHEAD, Held, Trainer, TrainerConfig
from factories import datum

BASE = "tiny-bounds"


def fb(model_id: str, seq_id: int, n: int = 6) -> ForwardBackward:
    rng = np.random.default_rng(seq_id)
    d = datum(rng.integers(0, 96, n), rng.integers(0, 96, n), np.ones(n))
    return ForwardBackward(request_id=f"{model_id}-{seq_id}", model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy", data=[d])


async def _trainer(bus, path, **cfg) -> Trainer:
    trainer = Trainer(TrainerConfig(base_model=BASE, model_path=path, worker_id=f"t-{uuid.uuid4().hex[:6]}", **cfg), bus, LoraEngine(path, device="cpu"))
    return trainer


async def _model(bus, trainer: Trainer) -> str:
    model_id = f"s-{uuid.uuid4().hex[:8]}:train:0"
    rec = ModelRecord(model_id=model_id, session_id=model_id.split(":")[0], owner="k", base_model=BASE, lora=LoraSpec(rank=4, seed=1),
                      created_at=time.time(), create_request_id=f"create-{model_id}")  # fmt: skip
    await bus.kv_put(bus.models, model_id, rec)
    trainer.held[model_id] = Held(stop=asyncio.Event(), task=None)  # its consumer is not under test
    return model_id


async def _send(bus, trainer: Trainer, msg, *, log: bool = False) -> None:
    """What the gateway does (a pending future, the message in the log), then the trainer's turn."""
    await bus.kv_create(bus.futures, msg.request_id, Future(request_id=msg.request_id, owner="k", request_type="ForwardBackward", created_at=time.time()))
    if log:
        await bus.publish(subjects.train(BASE, msg.model_id), msg, msg_id=msg.request_id)
    await asyncio.wait_for(trainer.on_train(msg), 60)


async def _future(bus, rid: str) -> Future:
    return await bus.kv_get(bus.futures, rid, Future)


@pytest.mark.timeout(300)
async def test_a_request_too_far_ahead_is_refused_and_its_place_skipped(bus, qwen3_path):
    await bus.ensure()
    trainer = await _trainer(bus, qwen3_path, max_seq_ahead=4)
    model_id = await _model(bus, trainer)
    await _send(bus, trainer, fb(model_id, 1), log=True)
    await _send(bus, trainer, fb(model_id, 7), log=True)  # next is 2: 5 ahead of it
    refused = await _future(bus, f"{model_id}-7")
    assert refused.state == "failed" and refused.category == "user" and refused.error.startswith(TOO_FAR_AHEAD), refused
    assert "at most 4" in refused.error
    assert trainer.tenants[model_id].refused == {7}

    # A trainer that rebuilds the model from its log knows the refusal too.
    other = await _trainer(bus, qwen3_path, max_seq_ahead=4)
    other.held[model_id] = Held(stop=asyncio.Event(), task=None)
    rebuilt = await other.tenant(model_id)
    assert rebuilt.next_seq == 2 and rebuilt.refused == {7}

    # 3 (waits for 2), then 2 .. 6; 7 is skipped, so 8 runs at once instead of waiting forever.
    waiting = asyncio.create_task(_send(bus, trainer, fb(model_id, 3)))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await _send(bus, trainer, fb(model_id, 2))
    await waiting
    for seq in (4, 5, 6, 8):
        await _send(bus, trainer, fb(model_id, seq))
    assert trainer.tenants[model_id].next_seq == 9 and not trainer.tenants[model_id].refused
    for seq in (1, 2, 3, 4, 5, 6, 8):
        assert (await _future(bus, f"{model_id}-{seq}")).state == "done", seq
    assert (await _future(bus, f"{model_id}-7")).error.startswith(TOO_FAR_AHEAD)  # unchanged


@pytest.mark.timeout(300)
async def test_waiting_requests_past_the_byte_caps_are_handed_back(bus, qwen3_path):
    await bus.ensure()
    trainer = await _trainer(bus, qwen3_path, max_held_bytes_per_model=4096, max_held_bytes=4000)
    a, b = await _model(bus, trainer), await _model(bus, trainer)
    await _send(bus, trainer, fb(a, 1))
    held = asyncio.create_task(_send(bus, trainer, fb(a, 3, n=8)))  # waits for 2: holds ~1.2 kB
    await asyncio.sleep(0.2)
    assert trainer.tenants[a].held_bytes > 1024 and not held.done()
    with pytest.raises(Unavailable, match="comes again later"):  # past the model's cap
        await _send(bus, trainer, fb(a, 4, n=400))
    await _send(bus, trainer, fb(b, 1))
    with pytest.raises(Unavailable, match="comes again later"):  # within b's cap, past the cap of all models
        await _send(bus, trainer, fb(b, 3, n=150))
    # The next request of a model is always taken, however large.
    await _send(bus, trainer, fb(a, 2, n=40))
    await held
    await _send(bus, trainer, fb(b, 2, n=48))
    assert trainer.tenants[a].held_bytes == 0 and trainer._held_bytes == 0
    assert trainer.tenants[a].next_seq == 4 and trainer.tenants[b].next_seq == 3


def test_a_sparse_input_past_the_element_bound_is_refused_before_allocation():
    rows = 4
    crow = np.zeros(rows + 1, dtype="<i8").tobytes()
    huge = Tensor(dtype="float32", data=b"", shape=[rows, 2**40], crow=crow, col=b"")
    d = Datum(tokens=np.arange(rows, dtype="<i4").tobytes(), loss_fn_inputs={"target_tokens": huge})
    sig = losses.SIGNATURES["cross_entropy"]
    with pytest.raises(InvalidRequest, match="columns"):
        requests.parse([d], "cross_entropy", sig, dict(sig.config), 96, 64)
    wide = Tensor(dtype="int64", data=b"", shape=[2**30, 16], crow=np.zeros(2**30 + 1, dtype="<i8")[:2].tobytes(), col=b"")
    d = Datum(tokens=np.arange(rows, dtype="<i4").tobytes(), loss_fn_inputs={"target_tokens": wide})
    with pytest.raises(InvalidRequest, match=f"more than {MAX_REQUEST_ELEMENTS} elements"):
        requests.parse([d], "cross_entropy", sig, dict(sig.config), 96, 64)


@pytest.mark.timeout(300)
async def test_the_refused_seq_ids_of_a_model_are_bounded(bus, qwen3_path):
    """Tenant.refused holds at most the window (max_seq_ahead) of seq_ids, each at most twice the
    window past next_seq: those are the places of a client that pipelined past the window. Any
    further ahead is refused all the same (its future fails) but not remembered, so a flood of
    far-ahead seq_ids cannot grow the trainer's memory; a rebuild keeps the same bound."""
    await bus.ensure()
    trainer = await _trainer(bus, qwen3_path, max_seq_ahead=4)
    model_id = await _model(bus, trainer)
    await _send(bus, trainer, fb(model_id, 1), log=True)  # next is 2: 7 .. 10 are within twice the window
    far = [7, 8, 9, 10, 11, 50, 10**6, 10**9] + list(range(2000, 2200))
    for seq in far:
        await _send(bus, trainer, fb(model_id, seq, n=2), log=seq < 60)
        out = await _future(bus, f"{model_id}-{seq}")
        assert out.state == "failed" and out.error.startswith(TOO_FAR_AHEAD), (seq, out)
    assert trainer.tenants[model_id].refused == {7, 8, 9, 10}

    # A rebuild from the log keeps the same bound (11 and 50 are in the log, refused, too far).
    other = await _trainer(bus, qwen3_path, max_seq_ahead=4)
    other.held[model_id] = Held(stop=asyncio.Event(), task=None)
    rebuilt = await other.tenant(model_id)
    assert rebuilt.next_seq == 2 and rebuilt.refused == {7, 8, 9, 10}

    # Full: once the sequence moves on (next 6), 11 is within twice the window but the set
    # already holds the window's worth: refused, not remembered.
    for seq in (2, 3, 4, 5):
        await _send(bus, trainer, fb(model_id, seq))
    t = trainer.tenants[model_id]
    assert t.next_seq == 6
    await _send(bus, trainer, fb(model_id, 11, n=3))  # the same request id as before (fb names it by seq_id)
    assert t.refused == {7, 8, 9, 10}
    # The remembered places are skipped when reached: after 6, next is 11.
    await _send(bus, trainer, fb(model_id, 6))
    assert t.next_seq == 11 and not t.refused
