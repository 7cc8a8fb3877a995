"""The unmodified tinker SDK against `openrl up`: real nats-server, gateway and trainer processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import httpx
import numpy as np
import pytest
import tinker
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from openrl.demo import run_sft_demo

from sdk_helpers import assert_logprobs_equal, finish_across_a_trainer_kill, logprobs, sdk_steps, training_client
from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------------- helpers


class Raw:
    """Hand-made HTTP requests for what the SDK never sends: chosen seq_ids, junk bodies."""

    def __init__(self, url: str, api_key: str = API_KEY):
        self.http = httpx.Client(base_url=f"{url}/api/v1", timeout=60)
        self.api_key = api_key

    def post(self, path: str, *, json=None, content: bytes | None = None, headers=None, api_key: str | None = None):
        h = {"X-API-Key": api_key or self.api_key, **(headers or {})}
        if api_key == "":
            del h["X-API-Key"]
        return self.http.post(path, json=json, content=content, headers=h)

    def forward_backward(self, model_id: str, seq_id: int, datums, *, loss_fn="cross_entropy", forward_only=False):
        req = tinker.types.ForwardBackwardRequest(
            model_id=model_id,
            seq_id=seq_id,
            forward_backward_input=tinker.types.ForwardBackwardInput(data=datums, loss_fn=loss_fn),
        )
        proto = forward_backward_request_to_proto(req)
        proto.forward_only = forward_only
        return self.post("/forward_backward", content=proto.SerializeToString(), headers={"Content-Type": "application/x-protobuf"})

    def optim_step(self, model_id: str, seq_id: int, lr: float = 5e-3):
        return self.post("/optim_step", json={"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": lr}})

    def result(self, request_id: str, timeout_s: float = 120):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.post("/retrieve_future", json={"request_id": request_id}, headers={"Accept": "application/x-protobuf"})
            if r.status_code != 408:
                return r
        raise TimeoutError(request_id)

    def forward_logprobs(self, model_id: str, seq_id: int, datums) -> list[np.ndarray]:
        r = self.forward_backward(model_id, seq_id, datums, forward_only=True)
        assert r.status_code == 200, r.text
        res = self.result(r.json()["request_id"])
        assert res.headers["content-type"].startswith("application/x-protobuf"), res.text
        return logprobs(deserialize_forward_backward_output(res.content))


def assert_healthy(stack):
    health = stack.healthz()
    assert health["status"] == "ok" and health["bus"] and health["trainers"], health


# ---------------------------------------------------------------------- the SDK loop


def test_sft_loss_falls_by_more_than_half(stack):
    """The README's demo loop, 30 steps: one pass over 16 examples is 2 steps."""
    losses = run_sft_demo(stack.url, stack.api_key, base_model=BASE_MODEL, steps=30)
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert last < first / 2, losses


def test_get_info_and_capabilities(stack):
    service, tc = training_client(stack, seed=3, rank=4)
    info = tc.get_info()
    assert info.model_data.model_name == BASE_MODEL and info.model_data.arch == "qwen3"
    assert info.lora_rank == 4 and info.model_id == tc.model_id
    assert tc.model_id.endswith(":train:0")
    caps = Raw(stack.url).http.get("/get_server_capabilities", headers={"X-API-Key": API_KEY}).json()
    assert {"model_name": BASE_MODEL, "max_context_length": 2048, "trainable": True, "sampleable": True} in caps["supported_models"]
    raw = Raw(stack.url).post("/get_info", json={"model_id": tc.model_id}).json()
    assert raw["lora_alpha"] == 32
    assert set(raw["lora_target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def exported_adapter(stack, tc, name: str, folder) -> None:
    """The training client's current LoRA weights as a PEFT folder, fetched by signed URLs."""
    path = tc.save_weights_external(name).result().path
    urls = tinker.RestClient(base_url=stack.url, api_key=stack.api_key).get_external_weights_urls(path).result().urls
    folder.mkdir()
    for file, url in urls.items():
        r = httpx.get(url, timeout=60)
        assert r.status_code == 200, r.text
        (folder / file).write_bytes(r.content)


def peft_reference_step(model_path, adapter, data, adam) -> tuple[tuple[float, list[np.ndarray]], tuple[float, list[np.ndarray]]]:
    """Plain peft + torch: Tinker's cross_entropy (-sum of weight * logprob) of `data` and its
    logprobs, before and after one torch.optim.AdamW step with `adam`'s hyperparameters."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied lm_head, gradient-checkpointing deprecations
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), adapter, is_trainable=True).eval()

    def loss_and_logprobs():
        loss, lps = torch.zeros(()), []
        for d in data:
            logits = model(input_ids=torch.tensor([d.model_input.to_ints()])).logits[0]
            targets = torch.as_tensor(d.loss_fn_inputs["target_tokens"].to_numpy())
            lp = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None])[:, 0]
            loss = loss - (torch.as_tensor(d.loss_fn_inputs["weights"].to_numpy()) * lp).sum()
            lps.append(lp.detach().numpy())
        return loss, lps

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay)
    loss, before = loss_and_logprobs()
    loss.backward()
    opt.step()
    with torch.no_grad():
        loss_after, after = loss_and_logprobs()
    return (loss.item(), before), (loss_after.item(), after)


def test_chunked_forward_backward_equals_unchunked(stack, extra_gateway, data, default_model, tmp_path):
    """The second gateway serves fwdbwd_max_chunk_len=2: 8 datums become 4 chunks, 4 seq_ids,
    each zstd-compressed by the SDK (proto_compress_fwdbwd). Both paths give what plain peft +
    torch AdamW give from the same adapter. (Not "the loss falls": whether one step of this
    size lowers it depends on the base model.)"""
    _, chunked = training_client(stack, seed=11, base_url=extra_gateway)
    _, whole = training_client(stack, seed=11)
    exported_adapter(stack, whole, "chunked-start", tmp_path / "start")  # the same for both: same seed
    adam = tinker.types.AdamParams(learning_rate=2e-3)
    outs = []
    for tc in (chunked, whole):
        fb = tc.forward_backward(data, loss_fn="cross_entropy").result()
        tc.optim_step(adam).result()
        after = tc.forward(data, loss_fn="cross_entropy").result()
        outs.append((fb, after))
    (fb_c, after_c), (fb_w, after_w) = outs
    assert fb_c.metrics["loss:sum"] == pytest.approx(fb_w.metrics["loss:sum"], rel=1e-5)
    assert_logprobs_equal(logprobs(fb_c), logprobs(fb_w))
    # The gradients of all chunks were accumulated into one step.
    assert after_c.metrics["loss:sum"] == pytest.approx(after_w.metrics["loss:sum"], rel=1e-5)
    assert_logprobs_equal(logprobs(after_c), logprobs(after_w))
    # Both equal the reference, before and after the step, and the step moved the model.
    (ref_loss, ref_lps), (ref_after_loss, ref_after_lps) = peft_reference_step(default_model, tmp_path / "start", data, adam)
    assert fb_w.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-4)
    assert_logprobs_equal(logprobs(fb_w), ref_lps, rtol=1e-4, atol=1e-5)
    assert after_w.metrics["loss:sum"] == pytest.approx(ref_after_loss, rel=1e-4)
    assert_logprobs_equal(logprobs(after_w), ref_after_lps, rtol=1e-4, atol=1e-5)
    moved = max(np.abs(a - b).max() for a, b in zip(logprobs(after_w), logprobs(fb_w)))
    assert moved > 1e-2, moved


def test_rl_losses_and_top_k_targets_through_the_sdk(stack, data):
    """The RL losses run end to end, and (N, K) top-K targets come back as (N, K) logprobs."""
    _, tc = training_client(stack, seed=91)
    d = data[0]
    n = d.model_input.length
    targets = np.asarray(d.loss_fn_inputs["target_tokens"].to_numpy(), dtype=np.int64)
    topk = np.stack([targets, (targets + 1) % 100], axis=1)
    datum_k = tinker.types.Datum(
        model_input=d.model_input,
        loss_fn_inputs={
            "target_tokens": tinker.types.TensorData.from_numpy(topk),
            "weights": tinker.types.TensorData.from_numpy(np.full((n, 2), 0.5, dtype=np.float32)),
        },
    )
    out = tc.forward_backward([datum_k, d], loss_fn="cross_entropy").result()
    assert [o["logprobs"].to_numpy().shape for o in out.loss_fn_outputs] == [(n, 2), (n,)]
    base = logprobs(tc.forward([d], loss_fn="cross_entropy").result())[0]
    rl = tinker.types.Datum(
        model_input=d.model_input,
        loss_fn_inputs={
            "target_tokens": targets.tolist(),
            "logprobs": (base - 0.1).tolist(),
            "advantages": [1.0] * n,
        },
    )
    for loss_fn, config in [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
                            ("cispo", None), ("dro", {"beta": 0.1})]:  # fmt: skip
        res = tc.forward_backward([rl], loss_fn=loss_fn, loss_fn_config=config).result()
        assert np.isfinite(res.metrics["loss:sum"]), loss_fn
        np.testing.assert_allclose(logprobs(res)[0], base, atol=1e-5)  # no step in between
    tc.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()


def test_forward_backward_custom_equals_the_builtin_loss(stack, data):
    """The SDK's two-round protocol (forward, then cross_entropy with weights -dC/dlp) with
    C = the cross_entropy sum gives the built-in loss and the same update."""
    import torch

    def custom(batch, logprobs_list):
        loss = sum(-(torch.as_tensor(d.loss_fn_inputs["weights"].to_numpy()) * lp).sum() for d, lp in zip(batch, logprobs_list))
        return loss, {"custom:sum": float(loss.detach())}

    _, builtin = training_client(stack, seed=81)
    _, custom_tc = training_client(stack, seed=81)
    a = builtin.forward_backward(data[:4], loss_fn="cross_entropy").result()
    b = custom_tc.forward_backward_custom(data[:4], custom).result()
    assert b.metrics["loss:sum"] == pytest.approx(a.metrics["loss:sum"], rel=1e-5)
    for tc in (builtin, custom_tc):
        tc.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
    assert_logprobs_equal(
        logprobs(custom_tc.forward(data, loss_fn="cross_entropy").result()),
        logprobs(builtin.forward(data, loss_fn="cross_entropy").result()),
        rtol=1e-4,
        atol=1e-5,
    )


def test_out_of_order_and_retried_requests_apply_once_in_order(stack, data):
    """seq 3, 2, 1 arrive reversed and seq 2 twice; the result equals the in-order SDK run."""
    _, sdk = training_client(stack, seed=21)
    sdk_steps(sdk, [[data[0]], [data[1]]])  # seq 1 fb(d0), 2 optim, 3 fb(d1), 4 optim
    _, raw_tc = training_client(stack, seed=21)
    raw = Raw(stack.url)
    model = raw_tc.model_id
    # The same four requests by hand, out of order, with a retry of seq 3.
    r4 = raw.optim_step(model, 4)
    r3 = raw.forward_backward(model, 3, [data[1]])
    r3_again = raw.forward_backward(model, 3, [data[1]])
    r2 = raw.optim_step(model, 2)
    time.sleep(0.5)  # nothing may run yet: seq 1 is missing
    pending = raw.post("/retrieve_future", json={"request_id": r4.json()["request_id"]}, headers={"x-stainless-read-timeout": "6"})
    assert pending.status_code == 408 and pending.json()["type"] == "try_again"
    r1 = raw.forward_backward(model, 1, [data[0]])
    for r in (r1, r2, r3, r3_again, r4):
        assert r.status_code == 200, r.text
    assert r3_again.json()["request_id"] == r3.json()["request_id"]
    for r in (r1, r2, r3, r4):
        assert raw.result(r.json()["request_id"]).status_code == 200
    # A retry after the fact returns the original id and changes nothing.
    assert raw.forward_backward(model, 3, [data[1]]).json()["request_id"] == r3.json()["request_id"]
    got = raw.forward_logprobs(model, 5, data)
    want = logprobs(sdk.forward(data, loss_fn="cross_entropy").result())
    assert_logprobs_equal(got, want, rtol=0, atol=0)


def test_results_are_retrievable_repeatedly_and_from_any_gateway(stack, extra_gateway, data):
    _, tc = training_client(stack, seed=31)
    fut = tc.forward_backward(data[:2], loss_fn="cross_entropy")
    first = fut.result()
    rid = fut.request_id if hasattr(fut, "request_id") else None
    if rid is None:  # the SDK keeps it on the inner APIFuture
        rid = Raw(stack.url).forward_backward(tc.model_id, 1, data[:2]).json()["request_id"]
    for url in (stack.url, extra_gateway, stack.url):
        r = Raw(url).result(rid)
        assert r.status_code == 200
        out = deserialize_forward_backward_output(r.content)
        assert out.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"], rel=1e-6)
    # Another key does not see this key's futures.
    assert Raw(stack.url, api_key=OTHER_KEY).result(rid).status_code == 404


# ---------------------------------------------------------------------- checkpoints


def test_save_state_then_resume_with_optimizer_equals_not_stopping(stack, data):
    service, straight = training_client(stack, seed=101)
    _, stopped = training_client(stack, seed=101)
    batches = [data[0:2], data[2:4], data[4:6], data[6:8]]
    sdk_steps(straight, batches)
    sdk_steps(stopped, batches[:2])
    path = stopped.save_state("half").result().path
    assert path == f"tinker://{stopped.model_id}/weights/half"
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id != stopped.model_id and resumed.model_id.endswith(f":train:{1}")
    sdk_steps(resumed, batches[2:])
    want = logprobs(straight.forward(data, loss_fn="cross_entropy").result())
    assert_logprobs_equal(logprobs(resumed.forward(data, loss_fn="cross_entropy").result()), want, rtol=0, atol=0)
    # Without the optimizer the weights are the same but Adam starts afresh: a different path.
    fresh = service.create_training_client_from_state(path).result()
    at_save = logprobs(stopped.forward(data, loss_fn="cross_entropy").result())
    assert_logprobs_equal(logprobs(fresh.forward(data, loss_fn="cross_entropy").result()), at_save, rtol=0, atol=0)
    sdk_steps(fresh, batches[2:])
    assert np.abs(np.concatenate(logprobs(fresh.forward(data, loss_fn="cross_entropy").result())) - np.concatenate(want)).max() > 1e-6


@pytest.mark.parametrize("delete_source", [False, True], ids=["kept", "source-deleted"])
def test_a_model_created_from_state_survives_a_trainer_kill_9(stack, data, delete_source):
    """Recovery rebuilds it from its seq 0 (the checkpoint, snapshotted when it was created)
    plus its log, also after the checkpoint it was loaded from has been deleted."""
    service, straight = training_client(stack, seed=141)
    _, stopped = training_client(stack, seed=141)
    sdk_steps(straight, [data[:4], data[4:], data[:4]])
    sdk_steps(stopped, [data[:4]])
    path = stopped.save_state("pre-kill").result().path
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    if delete_source:
        service.create_rest_client().delete_checkpoint_from_tinker_path(path).result()
    sdk_steps(resumed, [data[4:]])
    victim = stack.pid("trainer")
    os.kill(victim, signal.SIGKILL)
    sdk_steps(resumed, [data[:4]])
    assert stack.wait_restarted("trainer", victim) != victim
    want = logprobs(straight.forward(data, loss_fn="cross_entropy").result())
    assert_logprobs_equal(logprobs(resumed.forward(data, loss_fn="cross_entropy").result()), want, rtol=0, atol=0)


def test_a_model_loaded_without_its_optimizer_recovers_after_its_source_is_deleted(stack, data):
    """The seq-0 snapshot of a create-via-load without the optimizer restores the same state
    (weights loaded, Adam fresh) as loading the checkpoint did."""
    service, source = training_client(stack, seed=151)
    sdk_steps(source, [data[:4]])
    path = source.save_state("no-optimizer").result().path
    control = service.create_training_client_from_state(path).result()
    victim = service.create_training_client_from_state(path).result()
    service.create_rest_client().delete_checkpoint_from_tinker_path(path).result()
    sdk_steps(control, [data[4:], data[:4]])
    want = logprobs(control.forward(data, loss_fn="cross_entropy").result())
    sdk_steps(victim, [data[4:]])
    pid = stack.pid("trainer")
    os.kill(pid, signal.SIGKILL)
    sdk_steps(victim, [data[:4]])
    assert stack.wait_restarted("trainer", pid) != pid
    assert_logprobs_equal(logprobs(victim.forward(data, loss_fn="cross_entropy").result()), want, rtol=0, atol=0)


def test_load_state_in_place_goes_back_to_the_checkpoint(stack, data):
    _, tc = training_client(stack, seed=111)
    sdk_steps(tc, [data[:4]])
    path = tc.save_state("early").result().path
    early = logprobs(tc.forward(data, loss_fn="cross_entropy").result())
    sdk_steps(tc, [data[4:], data[:4]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the SDK may mark the in-place load deprecated
        tc.load_state_with_optimizer(path).result()
    assert_logprobs_equal(logprobs(tc.forward(data, loss_fn="cross_entropy").result()), early, rtol=0, atol=0)


def test_save_weights_external_is_a_peft_folder(stack, data, default_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, tc = training_client(stack, seed=121)
    sdk_steps(tc, [data[:4]])
    path = tc.save_weights_external("export").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/export"
    out = subprocess.run(
        [sys.executable, "-m", "openrl", "export", path, str(tmp_path / "peft"), "--nats-url", stack.nats_url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model), tmp_path / "peft").eval()
    want = logprobs(tc.forward(data[:2], loss_fn="cross_entropy").result())
    for d, lp in zip(data[:2], want):
        tokens = torch.tensor([d.model_input.to_ints()])
        targets = torch.tensor(d.loss_fn_inputs["target_tokens"].to_numpy())
        with torch.no_grad():
            got = torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1).gather(1, targets[:, None])[:, 0]
        np.testing.assert_allclose(got.numpy(), lp, atol=1e-4)


def test_bad_checkpoint_requests(stack, data):
    service, tc = training_client(stack, seed=131)
    path = tc.save_state("taken").result().path
    with pytest.raises(tinker.RequestFailedError) as err:
        tc.save_state("taken").result()
    assert err.value.category == tinker.types.RequestErrorCategory.User and "already exists" in str(err.value)
    tc.forward(data[:1], loss_fn="cross_entropy").result()  # the sequence goes on
    raw = Raw(stack.url)
    missing = f"tinker://{tc.model_id}/weights/nope"
    assert raw.post("/load_weights", json={"model_id": tc.model_id, "seq_id": 99, "path": missing, "optimizer": False}).status_code == 404
    assert raw.post("/load_weights", json={"path": "not-a-path", "session_id": "x", "model_seq_id": 0}).status_code == 400
    other = Raw(stack.url, api_key=OTHER_KEY)
    session = other.post("/create_session", json={"sdk_version": "test"}).json()["session_id"]
    r = other.post("/load_weights", json={"path": path, "session_id": session, "model_seq_id": 0, "optimizer": True})
    assert r.status_code == 404, r.text  # another key's checkpoint does not exist for you
    assert raw.post("/save_weights", json={"model_id": tc.model_id, "seq_id": 99, "path": "a/b"}).status_code == 400


# ---------------------------------------------------------------------- failures


def _final_logprobs_of_run(stack, data, *, seed: int, steps: int, kill_at: int | None = None):
    _, tc = training_client(stack, seed=seed)
    killed = None
    for step in range(steps):
        if step == kill_at:
            killed = stack.pid("trainer")
            os.kill(killed, signal.SIGKILL)
        batch = [data[(step * 2 + i) % len(data)] for i in range(2)]
        sdk_steps(tc, [batch])
    if killed is not None:
        assert stack.wait_restarted("trainer", killed) != killed
    return logprobs(tc.forward(data, loss_fn="cross_entropy").result())


def test_trainer_kill_9_mid_run_completes_with_identical_weights(stack, data):
    """The supervisor restarts the trainer; it rebuilds each model from its seed plus the
    train-stream log, so the run finishes with the weights of a run without the fault."""
    clean = _final_logprobs_of_run(stack, data, seed=41, steps=8)
    faulty = _final_logprobs_of_run(stack, data, seed=41, steps=8, kill_at=4)
    assert_logprobs_equal(faulty, clean, rtol=0, atol=0)
    assert_healthy(stack)


def test_recovery_starts_from_the_newest_snapshot(stack, data):
    """The stack runs with --snapshot-every 4: a restarted trainer loads each model from its
    newest snapshot and replays only the requests after it, with the same result."""
    _, tc = training_client(stack, seed=151)
    _, clean = training_client(stack, seed=151)
    batches = [data[(2 * i) % 8 : (2 * i) % 8 + 2] for i in range(7)]
    sdk_steps(clean, batches)
    sdk_steps(tc, batches[:6])  # 12 requests: snapshots after seq 4, 8 and 12
    loads = finish_across_a_trainer_kill(stack, tc, clean, batches[6:], data)
    # The kill may land before the newest snapshot's upload finished: then the one before it.
    assert loads and loads[-1]["snapshot"] >= 8 and loads[-1]["replayed"] <= 6, loads


def test_gateway_kill_9_mid_run_completes(stack, data):
    _, tc = training_client(stack, seed=51)
    sdk_steps(tc, [data[:2]])
    old = stack.pid("gateway")
    os.kill(old, signal.SIGKILL)
    sdk_steps(tc, [data[2:4], data[4:6]])  # the SDK retries until the restarted gateway answers
    assert stack.wait_restarted("gateway", old) != old
    assert_healthy(stack)


def test_nats_kill_9_mid_run_completes(stack, data):
    """nats-server dies and is restarted on its file store: the gateway answers 503 (the
    SDK retries) while the bus is away, workers reconnect, and no accepted request is lost."""
    _, tc = training_client(stack, seed=71)
    sdk_steps(tc, [data[:2]])
    old = stack.pid("nats")
    os.kill(old, signal.SIGKILL)
    sdk_steps(tc, [data[2:4], data[4:6]])
    assert stack.wait_restarted("nats", old) != old
    _, again = training_client(stack, seed=71)  # same seed, no fault: the same weights
    sdk_steps(again, [data[:2], data[2:4], data[4:6]])
    assert_logprobs_equal(
        logprobs(tc.forward(data, loss_fn="cross_entropy").result()),
        logprobs(again.forward(data, loss_fn="cross_entropy").result()),
        rtol=0,
        atol=0,
    )
    deadline = time.monotonic() + 30
    while not stack.healthz()["trainers"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert_healthy(stack)


# ---------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def victim(stack):
    """A model that bad requests are aimed at; it must keep working afterwards."""
    _, tc = training_client(stack, seed=61)
    return tc


PROTO = {"Content-Type": "application/x-protobuf"}


@pytest.mark.parametrize(
    "path, kwargs, status, detail",
    [
        ("/create_session", dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        ("/optim_step", dict(content=b"{\"model_id\": ", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
        ("/forward_backward", dict(content=b"\xff\xff\xff\xff garbage", headers=PROTO), 400, "protobuf"),
        ("/forward_backward", dict(content=b"\x28\x01", headers={**PROTO, "Content-Encoding": "zstd"}), 400, "zstd"),
        ("/optim_step", dict(json={"model_id": "m", "seq_id": "one"}), 400, "seq_id"),
        ("/create_model", dict(json={"session_id": 5, "model_seq_id": 0, "base_model": BASE_MODEL}), 400, "session_id"),
        ("/retrieve_future", dict(json={"request_id": ["x"]}), 400, "request_id"),
        ("/optim_step", dict(json={"model_id": "nobody:train:0", "seq_id": 1, "adam_params": {}}), 404, "unknown model_id"),
        ("/get_info", dict(json={"model_id": "nobody:train:0"}), 404, "unknown model_id"),
        ("/retrieve_future", dict(json={"request_id": "train-000"}), 404, "unknown request_id"),
        ("/create_model", dict(json={"session_id": "no-such-session", "model_seq_id": 0, "base_model": BASE_MODEL}), 404, "unknown session"),
        ("/get_info", dict(json={"model_id": "x"}, api_key=""), 401, "missing"),
        ("/get_info", dict(json={"model_id": "x"}, api_key="tml-wrong-key-000000"), 401, "unknown API key"),
        ("/create_session", dict(json={}, api_key="not-a-tml-key"), 401, "unknown API key"),
    ],
)
def test_bad_http_requests_get_clear_4xx_json(stack, path, kwargs, status, detail):
    r = Raw(stack.url).post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert detail in r.json()["detail"], r.json()


def test_unknown_base_model_and_bad_lora_are_400(stack):
    raw = Raw(stack.url)
    session = raw.post("/create_session", json={"sdk_version": "test"}).json()["session_id"]
    for body, detail in [
        ({"base_model": "no/such-model"}, "not served here"),
        ({"base_model": BASE_MODEL, "lora_config": {"rank": 0}}, "rank"),
        ({"base_model": BASE_MODEL, "lora_config": {"rank": 4, "train_attn": False, "train_mlp": False, "train_unembed": False}}, "train_"),
        ({"base_model": BASE_MODEL, "optimizer_config": {"type": "dimuon"}}, "adamw"),
    ]:
        r = raw.post("/create_model", json={"session_id": session, "model_seq_id": 0, **body})
        assert r.status_code == 400 and detail in r.json()["detail"], r.text


def test_oversize_body_is_413(stack, victim):
    r = Raw(stack.url).post("/forward_backward", content=b"\0" * (33 * 1024 * 1024), headers=PROTO)
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/json")


def _datum(tokens, targets, weights=None, targets_dtype="int64"):
    inputs = {"target_tokens": tinker.types.TensorData(data=targets, dtype=targets_dtype, shape=[len(targets)])}
    if weights is not None:
        inputs["weights"] = tinker.types.TensorData(data=weights, dtype="float32", shape=[len(weights)])
    return tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


BAD_DATA = {
    "token id outside the vocabulary": ([_datum([1, 2, 10**6], [2, 3, 4])], "cross_entropy", "token ids must be in"),
    "negative target id": ([_datum([1, 2, 3], [2, -3, 4])], "cross_entropy", "token ids must be in"),
    "targets shorter than tokens": ([_datum([1, 2, 3], [2, 3])], "cross_entropy", "shape must be [3]"),
    "weights longer than tokens": ([_datum([1, 2], [2, 3], [1.0, 1.0, 1.0])], "cross_entropy", "shape must be [2]"),
    "targets as floats": ([_datum([1, 2], [2.0, 3.0], targets_dtype="float32")], "cross_entropy", "dtype must be int64"),
    "unknown loss_fn": ([_datum([1, 2], [2, 3])], "no_such_loss", "no_such_loss"),
    "unimplemented loss_fn": ([_datum([1, 2], [2, 3])], "stable_reinforce", "math is unpublished"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_the_future_as_user_error_and_changes_nothing(stack, victim, data, case):
    datums, loss_fn, message = BAD_DATA[case]
    before = logprobs(victim.forward(data[:2], loss_fn="cross_entropy").result())
    with pytest.raises(tinker.RequestFailedError) as err:
        victim.forward_backward(datums, loss_fn=loss_fn).result()
    assert err.value.category == tinker.types.RequestErrorCategory.User
    assert message in str(err.value)
    # Nothing was applied, and the model's sequence goes on.
    victim.optim_step(tinker.types.AdamParams(learning_rate=1e-1)).result()
    assert_logprobs_equal(logprobs(victim.forward(data[:2], loss_fn="cross_entropy").result()), before, rtol=0, atol=0)
    assert_healthy(stack)


def _with_spans(proto, model_lengths, loss_lengths, offset=0):
    for datum in proto.data:
        for field, lengths in (("model_input_spans", model_lengths), ("loss_fn_input_spans", loss_lengths)):
            for i, n in enumerate(lengths):
                span = getattr(datum, field).add()
                run = span.sampled_tokens if i else span.prompt_tokens
                run.sequence_id, run.offset, run.length = "sample-x:0", offset, n
    return proto


@pytest.mark.parametrize(
    "model_lengths, loss_lengths, offset, error",
    [
        ((4, None), (4, None), 0, None),  # tiling runs: accepted
        ((4, None), (), 0, "as a pair"),
        ((4, 1), (4, None), 0, "cover"),
        ((4, None), (4, None), -1, "offset >= 0"),
    ],
)
def test_provenance_spans_are_validated(stack, data, model_lengths, loss_lengths, offset, error):
    d = data[0]
    n = d.model_input.length

    def resolve(lengths):  # None: the rest of the field after the first run
        return [n - lengths[0] if x is None else x for x in lengths]

    req = tinker.types.ForwardBackwardRequest(
        model_id="set-below", seq_id=1, forward_backward_input=tinker.types.ForwardBackwardInput(data=[d], loss_fn="cross_entropy")
    )
    proto = _with_spans(forward_backward_request_to_proto(req), resolve(model_lengths), resolve(loss_lengths), offset)
    proto.forward_only = True
    # Sent on a fresh model so seq 1 is next.
    _, tc = training_client(stack, seed=161)
    proto.model_id = tc.model_id
    raw = Raw(stack.url)
    r = raw.post("/forward_backward", content=proto.SerializeToString(), headers=PROTO)
    assert r.status_code == 200, r.text
    res = raw.result(r.json()["request_id"])
    if error is None:
        assert res.headers["content-type"].startswith("application/x-protobuf"), res.text
    else:
        body = res.json()
        assert body["category"] == "user" and error in body["error"], body


def test_bad_optimizer_params_fail_as_user_error(stack, victim):
    with pytest.raises(tinker.RequestFailedError) as err:
        victim.optim_step(tinker.types.AdamParams(learning_rate=1e-3, beta1=1.5)).result()
    assert err.value.category == tinker.types.RequestErrorCategory.User and "beta1" in str(err.value)
    victim.optim_step(tinker.types.AdamParams(learning_rate=1e-3)).result()


def test_stack_processes_show_their_roles_and_log_under_the_data_dir(stack):
    for role in ("nats", "trainer", "gateway", "sampler-0", "sampler-1"):
        pid = stack.pid(role)
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        if role == "nats":
            assert "nats-server" in cmdline
        else:
            kind = role.split("-")[0]
            assert f"openrl {kind}" in cmdline and open(f"/proc/{pid}/comm").read().startswith(f"openrl-{kind}"), cmdline
        assert (stack.data_dir / "logs" / f"{role}.log").stat().st_size > 0


def test_client_dynamic_config_is_served(stack):
    """The flags every SDK client fetches at construction and every refresh_interval_sec."""
    resp = httpx.post(f"{stack.url}/api/v1/client/dynamic_config", json={"sdk_version": tinker.__version__},
                      headers={"X-API-Key": API_KEY}, timeout=30)  # fmt: skip
    assert resp.status_code == 200, resp.text
    cfg = tinker.types.ClientDynamicConfigResponse.model_validate(resp.json())
    assert cfg.sample_cancel_enabled is False and cfg.refresh_interval_sec >= 60
