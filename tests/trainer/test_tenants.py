"""Many LoRA tenants in one LoraEngine train exactly as each would alone.

Eight tenants of one tiny base model, with different seeds, ranks (4, 8, 16) and target
mixes (train_mlp / train_attn / train_unembed), get their requests interleaved in an
irregular order: one tenant's forward_backward often lands between another's
forward_backward and optim_step, gradients accumulate over several calls, losses mix
cross_entropy and importance_sampling, forward-only calls come in between. Each tenant
must end with bitwise the same weights, optimizer state and results (`torch.equal` on
CPU) as the same tenant given the same request sequence in an engine of its own.
Dropping tenants (the active one and an idle one) must leave the others' weights,
pending gradients and optimizer state untouched, and training continues exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openrl.bus.messages import AdamParams, Datum, ForwardBackward, LoraSpec
from openrl.trainer.engine import LoraEngine
from factories import tensor

VOCAB = 96

# model_id -> LoraSpec. Ids hold '.', as real ones do; every flag mix but "nothing".
SPECS = {
    "run.a": LoraSpec(rank=4, seed=1),
    "run.b": LoraSpec(rank=8, seed=2, train_mlp=False),
    "run.c": LoraSpec(rank=16, seed=3, train_attn=False),
    "run.d": LoraSpec(rank=4, seed=4, train_unembed=False),
    "run.e": LoraSpec(rank=8, seed=5, train_mlp=False, train_unembed=False),  # attention only
    "run.f": LoraSpec(rank=16, seed=6, train_attn=False, train_unembed=False),  # MLP only
    "run.g": LoraSpec(rank=4, seed=7, train_attn=False, train_mlp=False),  # unembed only
    "run.h": LoraSpec(rank=8, seed=1),  # same seed as run.a, another rank
}
LATE = ("run.i", LoraSpec(rank=16, seed=9, train_unembed=False))  # created after the drops


@pytest.fixture(autouse=True)
def one_thread():
    # The model is tiny: threads only add overhead, and far more on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- requests


def make_fb(model_id: str, loss_fn: str, seed: int, *, forward_only: bool = False) -> ForwardBackward:
    """A forward_backward of 1-3 random datums of 2-11 tokens (ragged: padding matters)."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(rng.integers(1, 4)):
        n = int(rng.integers(2, 12))
        tokens = rng.integers(0, VOCAB, n)
        inputs = {"target_tokens": tensor(rng.integers(0, VOCAB, n), "int64")}
        if loss_fn == "cross_entropy":
            inputs["weights"] = tensor(rng.uniform(-0.5, 1.5, n), "float32")
        else:  # importance_sampling: sampler logprobs near the model's own (~ -log V), advantages
            inputs["logprobs"] = tensor(-np.log(VOCAB) + rng.uniform(-0.3, 0.3, n), "float32")
            inputs["advantages"] = tensor(rng.normal(0, 1, n), "float32")
        data.append(Datum(tokens=tokens.astype("<i4").tobytes(), loss_fn_inputs=inputs))
    return ForwardBackward(
        request_id=f"r{seed}", model_id=model_id, seq_id=seed, loss_fn=loss_fn, forward_only=forward_only, data=data
    )


def tenant_script(model_id: str, index: int, steps: int) -> list[tuple]:
    """One tenant's requests: per step 1-3 forward_backward calls (loss chosen at random,
    sometimes a forward-only one in between), then an optim_step with the tenant's own
    hyperparameters. Ends with a forward_backward whose gradients stay pending."""
    rng = np.random.default_rng(1000 + index)
    adam = AdamParams(
        learning_rate=float(rng.choice([1e-3, 5e-3, 2e-2])),
        beta1=float(rng.choice([0.9, 0.8])),
        weight_decay=float(rng.choice([0.0, 0.1])),
        grad_clip_norm=float(rng.choice([0.0, 0.05, 1.0])),  # 0.05: clipping active
    )
    ops: list[tuple] = []
    seed = 10_000 * (index + 1)
    for _ in range(steps):
        for _ in range(rng.integers(1, 4)):
            loss_fn = str(rng.choice(["cross_entropy", "importance_sampling"]))
            ops.append(("fb", make_fb(model_id, loss_fn, seed := seed + 1)))
            if rng.random() < 0.2:
                ops.append(("fwd", make_fb(model_id, "cross_entropy", seed := seed + 1, forward_only=True)))
        ops.append(("step", model_id, adam))
    ops.append(("fb", make_fb(model_id, "cross_entropy", seed := seed + 1)))
    return ops


def run(engine: LoraEngine, op: tuple):
    """Apply one request; returns what a client would get back."""
    if op[0] == "step":
        _, model_id, adam = op
        return engine.optim_step(model_id, adam)
    out = engine.forward_backward(op[1])
    return out.metrics, out.logprobs


def model_of(op: tuple) -> str:
    return op[1] if op[0] == "step" else op[1].model_id


def interleave(scripts: dict[str, list[tuple]], seed: int) -> list[tuple]:
    """Merge the scripts in a random order that keeps each tenant's own order."""
    rng = np.random.default_rng(seed)
    queues = {m: list(ops) for m, ops in scripts.items()}
    merged = []
    while queues:
        m = str(rng.choice(sorted(queues)))
        merged.append(queues[m].pop(0))
        if not queues[m]:
            del queues[m]
    return merged


# ---------------------------------------------------------------------- comparisons


def snapshot(engine: LoraEngine, model_id: str) -> dict[str, torch.Tensor | None]:
    """Weights, AdamW moments and steps (export_state) and pending gradients of a tenant."""
    tensors, _ = engine.export_state(model_id, with_optimizer=True)
    grads = {f"grad.{k}": g for k, g in engine.adapter_grads(model_id).items()}
    return {**tensors, **grads}


def assert_identical(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, w in want.items():
        g = got[k]
        if w is None or g is None:
            assert g is None and w is None, f"{what}: {k} pending gradient in one engine only"
        else:
            assert g.dtype == w.dtype and torch.equal(g, w), f"{what}: {k} differs (max |diff| {(g - w).abs().max()})"


def assert_same_result(got, want, what: str) -> None:
    if isinstance(want, dict):  # optim_step metrics
        assert got == want, what
        return
    (got_metrics, got_lp), (want_metrics, want_lp) = got, want
    assert got_metrics == want_metrics, what
    assert len(got_lp) == len(want_lp), what
    for g, w in zip(got_lp, want_lp):
        assert np.array_equal(g, w), f"{what}: logprobs differ"


# ---------------------------------------------------------------------- the test


def test_interleaved_tenants_train_exactly_as_alone(qwen3_path):
    scripts = {m: tenant_script(m, i, steps=3) for i, m in enumerate(SPECS)}
    order = interleave(scripts, seed=4)

    # The order really is interleaved: some tenant's forward_backward falls between another
    # tenant's forward_backward and its optim_step, and tenants switch on most requests.
    pending: set[str] = set()  # tenants with gradients accumulated and not yet applied
    cut_in = 0
    for op in order:
        m = model_of(op)
        if op[0] == "fb":
            cut_in += bool(pending - {m})
            pending.add(m)
        elif op[0] == "step":
            pending.discard(m)
    switches = sum(model_of(a) != model_of(b) for a, b in zip(order, order[1:]))
    assert cut_in >= 20 and switches >= len(order) // 2, (cut_in, switches, len(order))
    losses_used = {op[1].loss_fn for op in order if op[0] == "fb"}
    assert losses_used == {"cross_entropy", "importance_sampling"}

    shared = LoraEngine(qwen3_path, device="cpu")
    for m, spec in SPECS.items():
        shared.create(m, spec)
    shared_out: dict[str, list] = {m: [] for m in SPECS}
    for op in order:
        shared_out[model_of(op)].append(run(shared, op))

    # Every tenant alone, in an engine of its own, with its own requests in its own order.
    alone: dict[str, LoraEngine] = {}
    for m, spec in SPECS.items():
        alone[m] = LoraEngine(qwen3_path, device="cpu")
        alone[m].create(m, spec)
        outs = [run(alone[m], op) for op in scripts[m]]
        assert len(outs) == len(shared_out[m])
        for i, (got, want) in enumerate(zip(shared_out[m], outs)):
            assert_same_result(got, want, f"{m} request {i} ({scripts[m][i][0]})")
        assert_identical(snapshot(shared, m), snapshot(alone[m], m), m)

    # The tenants really differ: target modules follow the flags, and the weights moved.
    for m, spec in SPECS.items():
        modules = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in shared.adapter_state(m)}
        assert ("lm_head" in modules) == spec.train_unembed, m
        assert bool(modules & {"q_proj", "o_proj"}) == spec.train_attn, m
        assert bool(modules & {"gate_proj", "down_proj"}) == spec.train_mlp, m
        a_weights = [v for k, v in shared.adapter_state(m).items() if "lora_A" in k]
        assert all(v.shape[0] == spec.rank for v in a_weights), m
        b_weights = [v for k, v in shared.adapter_state(m).items() if "lora_B" in k]
        assert any(v.any() for v in b_weights), f"{m} never trained"  # B starts at zero
        assert any(g is not None for g in shared.adapter_grads(m).values()), f"{m} has no pending gradient"

    # Drop the tenant of the last request (the active adapter), then an idle one: the others
    # keep their weights, pending gradients and optimizer state, bit for bit.
    last = model_of(order[-1])
    idle = next(m for m in SPECS if m != last)
    for victim in (last, idle):
        before = {m: snapshot(shared, m) for m in shared.model_ids() if m != victim}
        shared.drop(victim)
        assert not shared.has(victim)
        for m, snap in before.items():
            assert_identical(snapshot(shared, m), snap, f"{m} after dropping {victim}")

    # Training goes on exactly: the survivors apply their pending gradients and take more
    # steps, interleaved, alongside a tenant created after the drops.
    late_id, late_spec = LATE
    shared.create(late_id, late_spec)
    alone[late_id] = LoraEngine(qwen3_path, device="cpu")
    alone[late_id].create(late_id, late_spec)
    survivors = shared.model_ids()
    assert set(survivors) == (set(SPECS) - {last, idle}) | {late_id}
    more = {}
    for i, m in enumerate(survivors):
        tail = tenant_script(m, 100 + i, steps=2)
        more[m] = [("step", m, AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)), *tail]
    for op in interleave(more, seed=5):
        m = model_of(op)
        assert_same_result(run(shared, op), run(alone[m], op), f"{m} after the drops")
    for m in survivors:
        assert_identical(snapshot(shared, m), snapshot(alone[m], m), f"{m} after the drops")


def test_a_tenant_switch_leaves_peft_as_its_set_adapter_would(qwen3_path):
    """The engine switches the active adapter itself (peft's set_adapter walks every module):
    after each switch, every adapter parameter's requires_grad and every LoRA layer's active
    adapter are what peft's own set_adapter gives."""
    engine = LoraEngine(qwen3_path, device="cpu")
    for m, spec in SPECS.items():
        engine.create(m, spec)

    def state() -> tuple[dict[str, bool], list]:
        flags = {n: p.requires_grad for n, p in engine.peft.named_parameters() if ".lora_" in n}
        return flags, [list(layer.active_adapters) for layer in engine._peft_layers()], engine.peft.active_adapter

    for m in [*SPECS, *reversed(SPECS)]:
        tenant = engine._tenants[m]
        engine._activate(tenant)
        mine = state()
        assert any(mine[0].values()) and mine[2] == tenant.adapter, m
        engine.peft.set_adapter(tenant.adapter)
        assert state() == mine, m


def _peft_state(engine: LoraEngine) -> dict:
    """Everything peft and the engine hold about the adapters: every parameter (name, dtype,
    requires_grad, values), every module's training flag, the adapters' configs and targeted
    module names, the active adapter, and each tenant's parameters in order."""
    peft = engine.peft
    return {
        "params": [(n, p.dtype, p.requires_grad, p.detach().clone()) for n, p in peft.named_parameters()],
        "training": [(n, m.training) for n, m in peft.named_modules()],
        "configs": {a: c.to_dict() for a, c in peft.peft_config.items()},
        "targeted": list(peft.base_model.targeted_module_names),
        "active": (peft.active_adapter, sorted({tuple(layer.active_adapters) for layer in engine._peft_layers()})),
        "tenants": {m: [(k, p.detach().clone()) for k, p in t.params.items()] for m, t in engine._tenants.items()},
    }


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    for key in ("training", "configs", "targeted", "active"):
        assert got[key] == want[key], f"{what}: {key}"
    assert [p[:3] for p in got["params"]] == [p[:3] for p in want["params"]], what
    for (name, *_, g), (*_, w) in zip(got["params"], want["params"], strict=True):
        assert torch.equal(g, w), f"{what}: {name}"
    assert got["tenants"].keys() == want["tenants"].keys(), what
    for m, params in want["tenants"].items():
        assert [k for k, _ in got["tenants"][m]] == [k for k, _ in params], f"{what}: {m} parameter order"
        assert all(torch.equal(g, w) for (_, g), (_, w) in zip(got["tenants"][m], params, strict=True)), f"{what}: {m}"


@pytest.mark.parametrize("path_fixture,dtype", [("qwen3_path", torch.float32), ("llama_path", torch.float32), ("qwen3_path", torch.bfloat16)])
def test_tenants_added_to_and_dropped_from_existing_lora_layers_leave_what_peft_would(path_fixture, dtype, request, monkeypatch):
    """create adds a tenant to the LoRA layers that are already there and drop removes it from
    them (no walk over the model): after every create and drop, the engine is in the state peft's
    own add_adapter and delete_adapter leave (bitwise: parameters, dtypes, flags, configs, module
    names, active adapter), and the tenants train the same. Tenants whose targets are not all
    LoRA layers yet go through peft."""
    path = request.getfixturevalue(path_fixture)
    fast, slow = LoraEngine(path, device="cpu", dtype=dtype), LoraEngine(path, device="cpu", dtype=dtype)
    slow.direct_layers = False
    script = [
        ("create", "m.attn", LoraSpec(rank=4, seed=1, train_mlp=False, train_unembed=False)),  # the first: get_peft_model
        ("create", "m.attn2", LoraSpec(rank=8, seed=2, train_mlp=False, train_unembed=False)),  # fast
        ("create", "m.all", LoraSpec(rank=4, seed=3)),  # MLP and head are new: peft
        ("create", "m.mlp", LoraSpec(rank=16, seed=4, train_attn=False, train_unembed=False)),  # fast
        ("train", "m.all"),
        ("drop", "m.attn"),
        ("create", "m.head", LoraSpec(rank=8, seed=5, train_attn=False, train_mlp=False)),  # fast, after a drop
        ("create", "m.all2", LoraSpec(rank=32, seed=3)),  # fast; same seed as m.all
        ("train", "m.all2"),
        ("drop", "m.all2"),  # the active one: each layer picks another, as peft's delete does
        ("train", "m.mlp"),
        ("drop", "m.head"),  # an idle one
        ("create", "m.late", LoraSpec(rank=4, seed=6, train_unembed=False)),
        ("train", "m.late"),
    ]
    peft_adds = []
    for op, model_id, *spec in script:
        if op == "create":
            if fast.peft is not None:
                monkeypatch.setattr(fast.peft, "add_adapter", lambda *a, _add=fast.peft.add_adapter, **k: (peft_adds.append(a[0]), _add(*a, **k)))
            for engine in (fast, slow):
                engine.create(model_id, spec[0])
        elif op == "drop":
            fast.drop(model_id), slow.drop(model_id)
        else:
            for i in range(2):
                fb = make_fb(model_id, "cross_entropy", seed=i)
                assert_same_result(run(fast, ("fb", fb)), run(slow, ("fb", fb)), f"{op} {model_id}")
                step = ("step", model_id, AdamParams(learning_rate=1e-2))
                assert_same_result(run(fast, step), run(slow, step), f"{op} {model_id}")
        _assert_same_state(_peft_state(fast), _peft_state(slow), f"after {op} {model_id}")
    assert [fast._tenants[m].adapter for m in fast._tenants if fast._tenants[m].adapter in peft_adds] == [fast._tenants["m.all"].adapter]
    if dtype == torch.bfloat16:
        assert {p.dtype for n, p in fast.peft.named_parameters() if ".lora_" in n} == {torch.float32}


def test_a_create_that_fails_inside_a_layer_leaves_the_engine_as_it_was(qwen3_path, monkeypatch):
    """Out of memory in the middle of adding a tenant to the layers: the error reaches the
    caller, nothing of the tenant stays behind, and the same create then succeeds as peft's."""
    engine, reference = LoraEngine(qwen3_path, device="cpu"), LoraEngine(qwen3_path, device="cpu")
    reference.direct_layers = False
    for e in (engine, reference):
        e.create("m.a", LoraSpec(rank=4, seed=1))
    before = _peft_state(engine)
    layer = engine._lora_layers_of(engine._targets(LoraSpec(rank=8, seed=2)))[5][1]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(layer, "update_layer", out_of_memory)
    with pytest.raises(RuntimeError, match="injected"):
        engine.create("m.b", LoraSpec(rank=8, seed=2))
    _assert_same_state(_peft_state(engine), before, "after the failed create")
    assert not engine.has("m.b")
    monkeypatch.undo()
    for e in (engine, reference):
        e.create("m.b", LoraSpec(rank=8, seed=2))
    state, want = _peft_state(engine), _peft_state(reference)
    # The failed attempt took an adapter name, so the names differ by one: compare the rest.
    assert [a["r"] for a in state["configs"].values()] == [a["r"] for a in want["configs"].values()]
    for m in ("m.a", "m.b"):
        assert [k for k, _ in state["tenants"][m]] == [k for k, _ in want["tenants"][m]]
        assert all(torch.equal(g, w) for (_, g), (_, w) in zip(state["tenants"][m], want["tenants"][m], strict=True)), m
