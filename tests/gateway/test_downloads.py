"""Signed download URLs: an exported PEFT folder fetched with plain GETs (no API key) loads with
peft and computes what the trainer computes; URLs any gateway replica signs with the shared
secret verify, and expire."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
import tinker

from openrl.bus.client import Bus
from openrl.bus.messages import Secret
from openrl.demo import make_datum, sft_examples

from stack_helpers import API_KEY, BASE_MODEL, bus_config

pytestmark = pytest.mark.timeout(600)


async def _secret(nats_url: str) -> bytes:
    bus = await Bus.connect(bus_config(nats_url, "gateway", name="test-downloads"))  # the secrets are the gateway's alone
    try:
        return (await bus.kv_get(bus.secrets, "download-signing", Secret)).secret
    finally:
        await bus.close()


def test_external_weights_download_and_load_with_peft(stack, default_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=17).result()
    tok = tc.get_tokenizer()
    data = [make_datum(tok, q, a) for q, a in sft_examples(2, seed=3)]
    tc.forward_backward(data, "cross_entropy").result()
    tc.optim_step(tinker.types.AdamParams(learning_rate=5e-2)).result()
    path = tc.save_weights_external("dl").result().path
    resp = tinker.RestClient(base_url=stack.url, api_key=API_KEY).get_external_weights_urls(path).result()
    folder = tmp_path / "peft"
    folder.mkdir()
    for name, url in resp.urls.items():
        r = httpx.get(url, timeout=60)
        assert r.status_code == 200, r.text
        (folder / name).write_bytes(r.content)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model), folder).eval()
    want = [o["logprobs"].to_numpy() for o in tc.forward(data, "cross_entropy").result().loss_fn_outputs]
    for d, lp in zip(data, want):
        tokens = torch.tensor([d.model_input.to_ints()])
        targets = torch.tensor(d.loss_fn_inputs["target_tokens"].to_numpy())
        with torch.no_grad():
            got = torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1).gather(1, targets[:, None])[:, 0]
        np.testing.assert_allclose(got.numpy(), lp, atol=1e-4)

    # The shared secret is what makes a URL valid, whichever gateway signed it; expiry is enforced.
    secret = asyncio.run(_secret(stack.nats_url))
    parts = urlsplit(resp.urls["adapter_config.json"])
    resource = parts.path.split("/api/v1/signed/", 1)[1]

    def signed(expires: int) -> str:
        sig = hmac.new(secret, f"{resource}\n{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{parts.scheme}://{parts.netloc}{parts.path}?expires={expires}&sig={sig}"

    assert parse_qs(parts.query)["sig"] == [parse_qs(urlsplit(signed(int(parse_qs(parts.query)["expires"][0]))).query)["sig"][0]]
    fresh = httpx.get(signed(int(time.time()) + 60), timeout=60)
    assert fresh.status_code == 200 and fresh.content == (folder / "adapter_config.json").read_bytes()
    expired = httpx.get(signed(int(time.time()) - 1), timeout=60)
    assert expired.status_code == 403 and "expired" in expired.json()["detail"]
    # Deleting the checkpoint takes its files with it: the URL then finds nothing (404, JSON).
    tinker.RestClient(base_url=stack.url, api_key=API_KEY).delete_checkpoint_from_tinker_path(path).result()
    gone = httpx.get(resp.urls["adapter_config.json"], timeout=60)
    assert gone.status_code == 404 and gone.json()["detail"]


def test_a_session_trace_lists_every_training_request_once_after_its_log_is_purged(stack):
    """The session stack snapshots every 4 requests and purges the train log below the newest
    snapshot: the trace finds the purged requests by their futures' ids (marked purged), the rest
    in the log, and lists each of seq 1..13 exactly once (13: the save for the sampler); a
    sampler's requests likewise by id."""
    service = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=23).result()
    data = [make_datum(tc.get_tokenizer(), q, a) for q, a in sft_examples(2, seed=4)]
    for _ in range(6):  # 12 requests: snapshots after seq 4, 8 and 12
        tc.forward_backward(data, "cross_entropy").result(timeout=120)
        tc.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result(timeout=120)
    sc = tc.save_weights_and_get_sampling_client().result(timeout=120)
    for _ in range(2):
        sc.sample(data[0].model_input, 1, tinker.types.SamplingParams(max_tokens=2)).result(timeout=120)
    model_id = tc.get_info().model_id
    rest = tinker.RestClient(base_url=stack.url, api_key=API_KEY)
    deadline = time.monotonic() + 60
    while True:  # the snapshot is stored, then the log purged, just after the optim_step's result
        events = httpx.get(rest.export_session_trace(model_id.split(":train:")[0]).result(), timeout=60).json()["traceEvents"]
        train = [e["args"] for e in events if e["tid"] == model_id and e["args"]["seq_id"] > 0]
        purged = sorted(a["seq_id"] for a in train if a.get("purged"))
        if len(purged) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert purged[:8] == list(range(1, 9)), purged
    assert sorted(a["seq_id"] for a in train) == list(range(1, 14)), train
    sampled = sorted(e["args"]["seq_id"] for e in events if ":sample:" in e["tid"])
    assert sampled == list(range(len(sampled))) and len(sampled) >= 2, sampled
