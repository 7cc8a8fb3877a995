"""Several tenants' requests in shared micro-batches (LoraEngine.forward_backward_many) give each
tenant what it gets alone.

Golden: tenants of different ranks, seeds and targets (the head among them), on a tied Qwen3
and an untied Llama, take three rounds of forward_backward (cross_entropy and
importance_sampling mixed, ragged datums) + optim_step; one engine runs each request alone
(`forward_backward`), the other all the round's requests in one `forward_backward_many` call.
Losses, logprobs, pending gradients and the weights after every step agree to 1e-5 (fp32; the
sums group differently, so not bitwise). The same holds where the backward recomputes the
forward (activation checkpointing, logits in several chunks): the recompute runs on the route
its forward had. A request that fails its checks fails alone and changes nothing; the others go
on exactly. Forward-only rounds batch too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openrl.bus.errors import InvalidRequest
from openrl.bus.messages import AdamParams, LoraSpec
from openrl.lora_slots import LoraSlots
from openrl.trainer.engine import LoraEngine
from test_tenants import make_fb

TOL = dict(atol=1e-5, rtol=1e-5)
SPECS = {
    "run.a": LoraSpec(rank=4, seed=1),
    "run.b": LoraSpec(rank=8, seed=2, train_mlp=False),
    "run.c": LoraSpec(rank=16, seed=3, train_attn=False),
    "run.d": LoraSpec(rank=4, seed=4, train_unembed=False),
}


def engines(path: str, dense: bool | None = False, **kw) -> tuple[LoraEngine, LoraEngine]:
    """(shared, alone) engines with the four tenants. `dense`: the shared engine's
    dense_shared_passes (False: the grouped form, which the golden tests below check; the dense
    form has its own test)."""
    pair = []
    for _ in range(2):
        engine = LoraEngine(path, device="cpu", microbatch_tokens=24, **kw)  # small: several passes per round
        for model_id, lora in SPECS.items():
            engine.create(model_id, lora)
        pair.append(engine)
    pair[0].dense_shared_passes = dense
    return pair[0], pair[1]


def assert_results(shared, alone, what: str) -> None:
    assert shared.metrics.keys() == alone.metrics.keys(), what
    for k in alone.metrics:
        np.testing.assert_allclose(shared.metrics[k], alone.metrics[k], **TOL, err_msg=f"{what} {k}")
    assert len(shared.logprobs) == len(alone.logprobs)
    for a, b in zip(shared.logprobs, alone.logprobs, strict=True):
        np.testing.assert_allclose(a, b, **TOL, err_msg=what)


def assert_tenant(shared: LoraEngine, alone: LoraEngine, model_id: str, what: str) -> None:
    for getter in (LoraEngine.adapter_state, LoraEngine.adapter_grads):
        got, want = getter(shared, model_id), getter(alone, model_id)
        assert got.keys() == want.keys()
        for k in want:
            if want[k] is None:
                assert got[k] is None, f"{what} {k}"
            else:
                torch.testing.assert_close(got[k], want[k], **TOL, msg=lambda m: f"{what} {model_id} {k}: {m}")


def three_rounds(shared: LoraEngine, alone: LoraEngine) -> None:
    """Three rounds of the four tenants' forward_backward (one shared call vs each alone) +
    optim_step: results, pending gradients, grad norms and weights equal at every step."""
    ids = list(SPECS)
    seed = 0
    for step in range(3):
        round_ = []
        for k, model_id in enumerate(ids):
            seed += 1
            round_.append(make_fb(model_id, ("cross_entropy", "importance_sampling")[(k + step) % 2], 100 * seed))
        together = shared.forward_backward_many(round_)
        assert shared._slots is not None and shared._slots.layers  # they did share passes
        for req, got in zip(round_, together, strict=True):
            assert_results(got, alone.forward_backward(req), f"step {step} {req.model_id}")
        for model_id in ids:
            assert_tenant(shared, alone, model_id, f"step {step} pending grads")
            adam = AdamParams(learning_rate=0.02, grad_clip_norm=1.0)
            assert shared.optim_step(model_id, adam)["grad_norm:mean"] == pytest.approx(
                alone.optim_step(model_id, adam)["grad_norm:mean"], rel=1e-5
            )
            assert_tenant(shared, alone, model_id, f"step {step} weights")


@pytest.mark.parametrize("path_fixture", ["qwen3_path", "llama_path"])
def test_shared_passes_equal_each_tenant_alone(path_fixture, request):
    shared, alone = engines(request.getfixturevalue(path_fixture))
    three_rounds(shared, alone)
    ids = list(SPECS)
    # Forward-only requests share passes too, and leave no gradients.
    fwd = [make_fb(m, "cross_entropy", 7000 + k, forward_only=True) for k, m in enumerate(ids)]
    for req, got in zip(fwd, shared.forward_backward_many(fwd), strict=True):
        assert_results(got, alone.forward_backward(req), f"forward-only {req.model_id}")
    for model_id in ids:
        assert all(g is None for g in shared.adapter_grads(model_id).values())
    # Single-tenant requests afterwards still run through peft as before, on the same weights.
    req = make_fb("run.b", "cross_entropy", 9001)
    assert_results(shared.forward_backward(req), alone.forward_backward(req), "alone after shared")


@pytest.mark.parametrize("path_fixture", ["qwen3_path", "llama_path"])
@pytest.mark.parametrize("kw", [{}, dict(activation_checkpointing=True, logits_chunk_bytes=4 * 96 * 8)], ids=["plain", "recomputing"])
def test_dense_shared_passes_equal_each_tenant_alone(path_fixture, kw, request, monkeypatch):
    """The dense form of a shared pass (every tenant's LoRA terms of a layer in one pass,
    concatenated, masked per row) gives each tenant what it gets alone, recomputes included.
    Its sums run over more (zero) terms, so its rounding differs from the grouped form's: the
    first step's gradients agree as closely (1.7e-7 of the largest, both), but three AdamW steps
    (which divide by the root of a small second moment) carry it to 1.6e-5 in one weight of 64:
    5e-5 here, far below what a row on the wrong tenant moves (1e-2 and more)."""
    monkeypatch.setitem(TOL, "atol", 5e-5)
    monkeypatch.setitem(TOL, "rtol", 5e-5)
    shared, alone = engines(request.getfixturevalue(path_fixture), dense=True, **kw)
    calls = []
    real = LoraSlots.segment_mask

    def counting(self, *args):
        calls.append(args[0])
        return real(self, *args)

    LoraSlots.segment_mask = counting
    try:
        three_rounds(shared, alone)
    finally:
        LoraSlots.segment_mask = real
    assert calls and any(len(blocks) >= 2 for blocks in calls), "no layer ran the dense form over several tenants"


def test_the_engine_picks_the_dense_form_where_its_extra_arithmetic_is_small(llama_path, monkeypatch):
    """dense_shared_passes None (the default): a layer takes the dense form while tokens x the
    ranks' sum x (in + out) is within LoraSlots.dense_max_work (on CPU), else grouped; results
    are each tenant's alone either way."""
    calls = []
    real = LoraSlots.segment_mask
    monkeypatch.setattr(LoraSlots, "segment_mask", lambda self, *a: calls.append(a[0]) or real(self, *a))
    shared, alone = engines(llama_path, dense=None)
    ids = list(SPECS)
    round_ = [make_fb(m, "cross_entropy", 500 + k) for k, m in enumerate(ids)]
    for req, got in zip(round_, shared.forward_backward_many(round_), strict=True):
        assert_results(got, alone.forward_backward(req), f"auto {req.model_id}")
    assert calls, "tiny layers: the dense form"
    calls.clear()
    shared._slots.dense_max_work = 0
    round_ = [make_fb(m, "cross_entropy", 600 + k) for k, m in enumerate(ids)]
    for req, got in zip(round_, shared.forward_backward_many(round_), strict=True):
        assert_results(got, alone.forward_backward(req), f"grouped {req.model_id}")
    assert not calls, "over the limit: grouped"


RECOMPUTING = {
    "checkpointing": dict(activation_checkpointing=True),
    "chunked_logits": dict(logits_chunk_bytes=4 * 96 * 8),  # 8 positions per chunk (vocab 96): several per pass
    "both": dict(activation_checkpointing=True, logits_chunk_bytes=4 * 96 * 8),
}


@pytest.mark.parametrize("path_fixture", ["qwen3_path", "llama_path"])
@pytest.mark.parametrize("kw", RECOMPUTING.values(), ids=RECOMPUTING.keys())
def test_shared_passes_whose_backward_recomputes_equal_each_alone(path_fixture, kw, request, monkeypatch):
    """Checkpointed decoder layers and chunked logits recompute the forward in the backward
    pass, after the route is gone: the recompute runs on the route its forward had, so shared
    passes (they do share, and do recompute routed) still give each tenant what it gets alone."""
    replayed = []
    replay = LoraSlots._replay

    def counting(self, segments, *rest):
        replayed.append(len(segments))
        return replay(self, segments, *rest)

    monkeypatch.setattr(LoraSlots, "_replay", counting)
    shared, alone = engines(request.getfixturevalue(path_fixture), **kw)
    assert shared._chunk_rows == 8 or "logits_chunk_bytes" not in kw
    three_rounds(shared, alone)
    assert any(replayed), "no shared pass recomputed a routed forward"
    req = make_fb("run.c", "importance_sampling", 9002)  # alone afterwards: peft, with recomputes on no route
    assert_results(shared.forward_backward(req), alone.forward_backward(req), "alone after shared")


def test_a_bad_request_fails_alone_and_changes_nothing(qwen3_path):
    shared, alone = engines(qwen3_path)
    good = [make_fb("run.a", "cross_entropy", 11), make_fb("run.c", "importance_sampling", 12)]
    bad_loss = make_fb("run.b", "cross_entropy", 13)
    bad_loss = type(bad_loss)(**{**{f: getattr(bad_loss, f) for f in bad_loss.__struct_fields__}, "loss_fn": "nope"})
    unknown = make_fb("run.zzz", "cross_entropy", 14)
    out = shared.forward_backward_many([good[0], bad_loss, good[1], unknown])
    assert isinstance(out[1], InvalidRequest) and "nope" in str(out[1])
    assert isinstance(out[3], InvalidRequest) and "run.zzz" in str(out[3])
    assert_results(out[0], alone.forward_backward(good[0]), "good 0")
    assert_results(out[2], alone.forward_backward(good[1]), "good 1")
    for model_id in SPECS:  # run.b and run.d untouched (no grads), the others as alone
        assert_tenant(shared, alone, model_id, "after a bad request")


@pytest.mark.timeout(300)
async def test_the_trainer_shares_passes_among_models_ready_at_once(bus, qwen3_path):
    """A real Trainer on the session's nats-server: four models' requests arrive together (two
    each, seq 1 and 2); the first runs alone, the others that are ready while it runs share one
    call; every future equals what the model gets alone, in each model's own order."""
    import asyncio

    import msgspec

    from openrl.bus.messages import ForwardBackwardResult
    from test_trainer_bounds import _future, _model, _send, _trainer

    trainer = await _trainer(bus, qwen3_path)
    calls = []
    many = trainer.engine.forward_backward_many
    trainer.engine.forward_backward_many = lambda reqs: calls.append([r.model_id for r in reqs]) or many(reqs)
    models = [await _model(bus, trainer) for _ in range(4)]
    reference = LoraEngine(qwen3_path, device="cpu")
    for m in models:
        reference.create(m, LoraSpec(rank=4, seed=1))  # what _model records
    msgs = {m: [make_fb(m, ("cross_entropy", "importance_sampling")[k % 2], 50 * k + s) for s in (1, 2)] for k, m in enumerate(models)}
    for m in models:
        msgs[m] = [type(r)(**{**{f: getattr(r, f) for f in r.__struct_fields__}, "seq_id": s, "request_id": f"{m}-{s}"})
                   for s, r in enumerate(msgs[m], start=1)]  # fmt: skip
    await asyncio.gather(*(_send(bus, trainer, r) for m in models for r in reversed(msgs[m])))  # seq 2 first: it waits
    assert calls and max(map(len, calls)) > 1, calls  # shared passes happened
    assert all(len(set(c)) == len(c) for c in calls)  # never two requests of one model in a call
    for m in models:
        for r in msgs[m]:
            fut = await _future(bus, r.request_id)
            assert fut.state == "done", fut.error
            got = msgspec.msgpack.decode(fut.payload, type=ForwardBackwardResult)
            want = reference.forward_backward(r)
            np.testing.assert_allclose(got.metrics["loss:sum"], want.metrics["loss:sum"], **TOL)
            for raw, lp in zip(got.logprobs, want.logprobs, strict=True):
                np.testing.assert_allclose(np.frombuffer(raw, "<f4"), lp, **TOL)
        assert_tenant(trainer.engine, reference, m, "after the service's shared passes")
