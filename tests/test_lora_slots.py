"""LoRA slots (openrl/lora_slots.py) against peft, the format and reference they replace.

Golden: a batch whose rows mix several adapters (different ranks and target modules, the head
among them) and the base model gives, row by row, the logits peft gives each row alone with
its adapter (fp32; tolerance 1e-5 absolute, measured ~1e-6); base rows are bitwise the base
model. Gradients routed through per-segment leaf tensors equal each tenant's alone. Bad
adapters are refused naming the module, and change nothing. The sampler engine, with every
slot pinned, waits for a slot with a bound and never runs a request on another adapter.
"""

from __future__ import annotations

import asyncio
import copy
import io
import time
import warnings

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save
from transformers import AutoModelForCausalLM, Qwen3Config

from openrl.bus.errors import InvalidRequest
from openrl.lora_slots import BASE, PREFIX, LoraSlots, Segment
from factories import sample_spec

VOCAB = 64
ALPHA = 32
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config() -> Qwen3Config:
    return Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval().requires_grad_(False)


# (rank, target modules): ranks below, at and above the slots' starting rank (8); the head too.
ADAPTERS = {
    "a": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]),
    "b": (8, ["q_proj", "v_proj"]),
    "c": (16, ["gate_proj", "up_proj", "down_proj", "lm_head"]),
}


def random_state(model, rank: int, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A peft-format adapter state with nonzero A and B for every targeted Linear."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            state[f"{PREFIX}{name}.lora_A.weight"] = torch.randn((rank, m.in_features), generator=g) * 0.3
            state[f"{PREFIX}{name}.lora_B.weight"] = torch.randn((m.out_features, rank), generator=g) * 0.3
    return state


def peft_logits(base, state, rank, targets, ids) -> torch.Tensor:
    """The reference: peft's own LoRA model with `state`, one forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=targets))
    params = {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".default." in n}
    assert params.keys() == state.keys()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
        return model(input_ids=ids).logits


def test_a_mixed_batch_equals_peft_row_by_row(base):
    model = copy.deepcopy(base)
    slots = LoraSlots(model, num_slots=6, rank=8)
    assert slots.allocated == 4
    states = {k: random_state(base, r, t, seed=i) for i, (k, (r, t)) in enumerate(ADAPTERS.items())}
    slot_of = {}
    for slot, (key, (rank, _)) in zip((2, 0, 5), ADAPTERS.items()):  # "c" grows both slots and rank
        slots.load(slot, slots.check(states[key], rank), rank=rank, alpha=ALPHA)
        slot_of[key] = slot
    assert slots.rank == 16 and slots.allocated == 6  # grew once, for "c", keeping "a" and "b"
    rows = ["a", None, "c", "b", "a", None, "c", "b"]
    ids = torch.randint(0, VOCAB, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), slots.route([BASE if k is None else slot_of[k] for k in rows]):
        mixed = model(input_ids=ids).logits
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    for b, key in enumerate(rows):
        if key is None:
            assert torch.equal(mixed[b], plain[b])  # a base row is the base model, bit for bit
            continue
        rank, targets = ADAPTERS[key]
        ref = peft_logits(base, states[key], rank, targets, ids[b : b + 1])[0]
        torch.testing.assert_close(mixed[b], ref, atol=ATOL, rtol=0)
        assert (ref - plain[b]).abs().max() > 1e-2  # the adapter matters
    # One slot for every row (the fast path without index_select) gives the same.
    with torch.no_grad(), slots.route([slot_of["c"]] * 3):
        same = model(input_ids=ids[[2, 6, 6]]).logits
    torch.testing.assert_close(same, mixed[[2, 6, 6]], atol=ATOL, rtol=0)
    # No route: the base model.
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)
    # The stored adapter reads back as its peft state (peft format in and out).
    back = slots.state(slot_of["c"])
    assert back.keys() == states["c"].keys() and all(torch.equal(back[k], states["c"][k]) for k in back)


def test_a_decode_step_of_mixed_slots_runs_dense_and_equals_peft_row_by_row(base):
    """One position per row (a decode step) with several slots present takes the dense route
    (every row against slots [0, k) at once, masked to its own): the same numbers as peft, row by
    row; base rows bitwise. Slot 0 held an adapter of more modules before: what it no longer
    targets must not leak into the dense pass."""
    model = copy.deepcopy(base)
    slots = LoraSlots(model, num_slots=6, rank=8)
    states = {k: random_state(base, r, t, seed=10 + i) for i, (k, (r, t)) in enumerate(ADAPTERS.items())}
    for slot, key in ((0, "a"), (1, "c"), (2, "a")):
        slots.load(slot, slots.check(states[key], ADAPTERS[key][0]), rank=ADAPTERS[key][0], alpha=ALPHA)
    slots.free(0)
    slots.load(0, slots.check(states["b"], 8), rank=8, alpha=ALPHA)  # "b": q and v only, rank 8 of 16
    slot_of = {"b": 0, "c": 1, "a": 2}
    rows = ["b", "c", None, "a", "c", None, "b"]
    ids = torch.randint(0, VOCAB, (len(rows), 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), slots.route([BASE if k is None else slot_of[k] for k in rows]):
        assert slots.dense is not None and slots.dense.k == 3
        mixed = model(input_ids=ids).logits
    assert slots.dense is None  # the route ends with the block
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    for b, key in enumerate(rows):
        if key is None:
            assert torch.equal(mixed[b], plain[b])
            continue
        rank, targets = ADAPTERS[key]
        ref = peft_logits(base, states[key], rank, targets, ids[b : b + 1])[0]
        torch.testing.assert_close(mixed[b], ref, atol=ATOL, rtol=0)
        assert (ref - plain[b]).abs().max() > 1e-2
    # The grouped route (longer inputs, or slots spread too thin) gives the same numbers.
    slots.dense_max_tokens = 0
    with torch.no_grad(), slots.route([BASE if k is None else slot_of[k] for k in rows]):
        grouped = model(input_ids=ids).logits
    torch.testing.assert_close(grouped, mixed, atol=ATOL, rtol=0)
    slots.dense_max_tokens = 1
    slots.free(1)
    with torch.no_grad(), slots.route([0, 2, 0]):  # slots 0 and 2 of k = 3: still dense (one unused)
        assert slots.dense is not None and slots.dense.k == 3
        two = model(input_ids=ids[[0, 3, 6]]).logits
    torch.testing.assert_close(two, mixed[[0, 3, 6]], atol=ATOL, rtol=0)
    with torch.no_grad(), slots.route([2, 2]):  # one slot: grouped (nothing to gain)
        assert slots.dense is None
    slots.free(2)
    slots.load(5, slots.check(states["c"], 16), rank=16, alpha=ALPHA)
    with torch.no_grad(), slots.route([0, 5]):  # slots 0 and 5: 4 of k = 6 unused, grouped
        assert slots.dense is None
        spread = model(input_ids=ids[[0, 1]]).logits
    torch.testing.assert_close(spread, mixed[[0, 1]], atol=ATOL, rtol=0)


def test_freeing_and_reloading_a_slot(base):
    model = copy.deepcopy(base)
    slots = LoraSlots(model, num_slots=1, rank=8)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    for key in ("a", "b"):  # "b" targets fewer modules: "a"'s terms must not linger
        rank, targets = ADAPTERS[key]
        state = random_state(base, rank, targets, seed=7)
        slots.load(0, slots.check(state, rank), rank=rank, alpha=ALPHA)
        with torch.no_grad(), slots.route([0, 0]):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, peft_logits(base, state, rank, targets, ids), atol=ATOL, rtol=0)
    slots.free(0)
    with pytest.raises(ValueError, match="holds no adapter"):
        with slots.route([0]):
            pass


def test_bad_adapters_are_refused_naming_the_module_and_change_nothing(base):
    model = copy.deepcopy(base)
    slots = LoraSlots(model, num_slots=2, rank=8, max_rank=16)
    rank, targets = ADAPTERS["a"]
    good = random_state(base, rank, targets, seed=3)
    slots.load(0, slots.check(good, rank), rank=rank, alpha=ALPHA)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    before_buffers = {n: layer.A.clone() for n, layer in slots.layers.items()}

    wrong = dict(good)
    key = f"{PREFIX}model.layers.1.mlp.down_proj.lora_A.weight"
    wrong[key] = torch.zeros((rank, 17))
    with pytest.raises(InvalidRequest, match=r"'model\.layers\.1\.mlp\.down_proj'.*do not fit"):
        slots.check(wrong, rank)
    with pytest.raises(InvalidRequest, match="model.layers.0.mlp.nothing"):
        slots.check({**good, f"{PREFIX}model.layers.0.mlp.nothing.lora_A.weight": torch.zeros(rank, 32)}, rank)
    lone = {k: v for k, v in good.items() if not k.endswith("q_proj.lora_B.weight")}
    with pytest.raises(InvalidRequest, match="lacks lora_B"):
        slots.check(lone, rank)
    nan = {k: v.clone() for k, v in good.items()}
    nan[key][0, 0] = float("nan")
    with pytest.raises(InvalidRequest, match="finite"):
        slots.check(nan, rank)
    with pytest.raises(InvalidRequest, match=r"rank must be in \[1, 16\]"):
        slots.check(random_state(base, 32, ["q_proj"], seed=4), 32)
    with pytest.raises(InvalidRequest, match="not a peft LoRA weight"):
        slots.check({"lora_A": torch.zeros(1)}, rank)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(torch.equal(before_buffers[n], layer.A) for n, layer in slots.layers.items())


def test_gradients_reach_each_segments_own_leaves(base):
    """The trainer's shape: rows of two tenants in one pass, each through its own leaf tensors."""
    model = copy.deepcopy(base)
    slots = LoraSlots(model, num_slots=1, rank=8)
    names = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "down_proj"))]
    slots.wrap(names)
    g = torch.Generator().manual_seed(5)
    tenants = []
    for rank in (4, 8):
        leaves = {}
        for n in names:
            lin = slots.linears[n]
            leaves[n] = (torch.randn((rank, lin.in_features), generator=g).requires_grad_(),
                         (torch.randn((lin.out_features, rank), generator=g) * 0.1).requires_grad_())  # fmt: skip
        tenants.append((leaves, ALPHA / rank))

    def weights(t):
        leaves, scale = tenants[t]
        return lambda name: (*leaves[name], scale) if name in leaves else None

    ids = torch.randint(0, VOCAB, (4, 6), generator=g)
    own = [[0, 2], [1, 3]]

    def loss_of(logits):
        return logits.log_softmax(-1)[..., 0].sum()

    segments = [Segment(rows=torch.tensor(r), weights=weights(t)) for t, r in enumerate(own)]
    with slots.route_segments(segments):
        loss_of(model(input_ids=ids).logits).backward()
    shared = [{n: (a.grad.clone(), b.grad.clone()) for n, (a, b) in leaves.items()} for leaves, _ in tenants]
    for t, r in enumerate(own):
        for a, b in tenants[t][0].values():
            a.grad = b.grad = None
        with slots.route_segments([Segment(rows=None, weights=weights(t))]):
            loss_of(model(input_ids=ids[r]).logits).backward()
        for n, (a, b) in tenants[t][0].items():
            torch.testing.assert_close(a.grad, shared[t][n][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.grad, shared[t][n][1], atol=1e-5, rtol=1e-5)
            assert a.grad.abs().max() > 0


def test_engine_waits_for_a_pinned_slot_with_a_bound(tmp_path):
    """One slot, pinned by a long request: a request on another adapter waits, then runs on its
    own adapter (not the pinned one); with no time to wait it fails, naming the slots."""
    from openrl.sampler.hf_engine import HfEngine, SampleFailed
    from openrl.sampler.hf_model import TransformersSampler

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    model.save_pretrained(tmp_path)
    targets = ["q_proj", "v_proj"]
    blobs = {k: save(random_state(model, 4, targets, seed=s)) for s, k in enumerate(("x", "y"))}
    prompt = [1, 2, 3, 4]

    async def scenario(slot_wait_s: float):
        engine = HfEngine(TransformersSampler(str(tmp_path), device="cpu", max_adapters=1), slot_wait_s=slot_wait_s)
        try:
            long = sample_spec(prompt=prompt, num_samples=1, max_tokens=56, seed=1, adapter="x", stop_at_eos=False)
            short = sample_spec(prompt=prompt, num_samples=1, max_tokens=4, seed=2, adapter="y", stop_at_eos=False)
            first = asyncio.ensure_future(engine.sample(long, blobs["x"]))
            # The long request holds the slot (its adapter loaded, it is admitted in the same
            # turn of the engine's loop) before the short one is sent, with 56 steps to go.
            deadline = time.monotonic() + 30
            while not engine.sampler.has_adapter("x") and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            second = await asyncio.gather(engine.sample(short, blobs["y"]), return_exceptions=True)
            await first
            return engine, second[0]
        finally:
            engine.close()

    engine, got = asyncio.run(scenario(30.0))
    assert not isinstance(got, BaseException), got
    # It ran on "y": its logprobs are peft's with y's weights.
    ids = torch.tensor([prompt + list(got.sequences[0].tokens)])
    from safetensors.torch import load

    ref = peft_logits(model.eval(), load(blobs["y"]), 4, targets, ids)[0].log_softmax(-1)
    want = ref[len(prompt) - 1 : -1].gather(-1, ids[0, len(prompt) :, None])[:, 0]
    np.testing.assert_allclose(got.sequences[0].logprobs, want.numpy(), atol=1e-4)
    _, failed = asyncio.run(scenario(0.0))
    assert isinstance(failed, SampleFailed) and "all 1 adapter slots are in use" in str(failed)
