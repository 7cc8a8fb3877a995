"""The gateway's per-request lookups that skip a KV round trip: a model record comes from the
quota watch's copy of the models bucket (records are never changed or deleted), and only a model
the watch has not seen yet is read from KV. Ownership holds on both paths."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from openrl.bus.errors import NotFound
from openrl.bus.messages import LoraSpec, ModelRecord
from openrl.bus.subjects import kv_key
from openrl.gateway.service import Gateway, GatewayConfig

pytestmark = pytest.mark.timeout(120)


def _record(owner: str) -> ModelRecord:
    sid = "s-" + uuid.uuid4().hex[:8]
    return ModelRecord(model_id=f"{sid}:train:0", session_id=sid, owner=owner, base_model="b", lora=LoraSpec(rank=1, seed=0),
                       created_at=time.time(), create_request_id="")  # fmt: skip


async def test_a_model_seen_by_the_watch_is_looked_up_without_kv(bus):
    gw = Gateway(GatewayConfig(), bus)
    await gw.usage.start()
    real_get, reads = bus.kv_get, []

    async def counting_get(kv, key, type_):
        reads.append(key)
        return await real_get(kv, key, type_)

    try:
        rec = _record("owner-a")
        await bus.kv_create(bus.models, rec.model_id, rec)
        for _ in range(100):
            if kv_key(rec.model_id) in gw.usage.models:
                break
            await asyncio.sleep(0.05)
        bus.kv_get = counting_get
        assert await gw.model(rec.model_id, "owner-a") == rec
        assert reads == [], "the model record was read from KV although the watch holds it"
        with pytest.raises(NotFound, match="unknown model_id"):  # another key's model looks absent
            await gw.model(rec.model_id, "owner-b")

        # Not seen by the watch (stopped here, as if it lagged): read from KV, owner checked.
        await gw.usage.stop()
        late = _record("owner-a")
        await bus.kv_create(bus.models, late.model_id, late)
        assert await gw.model(late.model_id, "owner-a") == late
        assert reads == [late.model_id]
        with pytest.raises(NotFound, match="unknown model_id"):
            await gw.model(late.model_id, "owner-b")
        with pytest.raises(NotFound, match="unknown model_id"):
            await gw.model(f"s-{uuid.uuid4().hex[:8]}:train:0", "owner-a")
    finally:
        bus.kv_get = real_get
        await gw.usage.stop()
