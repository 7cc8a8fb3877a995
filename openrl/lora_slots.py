"""LoRA adapters as data: preallocated slots on a base model's Linear layers, picked per row.

The S-LoRA / Punica shape (what vLLM does): every targeted Linear of the base model is wrapped
once by a `SlotLinear` holding stacked adapter tensors for S slots,

    A[S, r_max, in]    Bt[S, r_max, out] (B transposed)    (and per slot: its rank r_s and scale alpha / r_s)

and a forward computes, for each row b of the batch with slot s_b,

    y_b = base(x_b) + scale[s_b] * ((x_b @ A[s_b, :r]^T) @ B[s_b, :, :r]^T)

Slot -1 (`BASE`) is the base model alone: no contribution at all, so a base row is exactly
the base model's output. Loading a weights version copies its tensors into a slot; freeing a
slot only marks it free. No module is added or removed per version (peft's `add_adapter` /
`delete_adapter` walk every module and rebuild layers); a module is wrapped the first time an
adapter targets it, once.

Which rows use which slot is set for one forward by `LoraSlots.route(slot_B)` (a context
manager). Rows are grouped by slot once per forward, and each layer runs, per slot present,
one pair of matmuls over that slot's rows (`index_select` / `index_add`): the cost is one
adapter matmul per distinct slot, with no per-row gather of the slot tensors. A slot is
computed at its own rank (the stored tensors are zero-padded to r_max, which would give the
same numbers at more cost). The arithmetic is peft's (`lora_B(lora_A(x)) * scaling` added to
the base output, per sub-batch in a mixed batch), so results equal peft's.

A decode step (one position per row) of two or more slots takes the dense route instead (`Dense`):
every row against A[:k] at once (k = the highest slot present + 1), masked to its own slot's
block and scaled, then through Bt[:k] at once: 4 ops per layer, not 6 per slot, at k times the
LoRA arithmetic; so only where that is cheap (`dense_max_tokens`, `dense_max_work`; docs/tenants.md).

`route_segments(segments)` is the same forward with weights given per group of rows instead of
slot indices (any tensors, e.g. leaves that need gradients): a training pass over several
tenants' rows, each through its own adapter, whose gradients autograd routes back to each
tenant's own tensors.

A backward that recomputes a forward (torch.utils.checkpoint: activation checkpointing, logits
in chunks) runs after the route is gone. `checkpoint_contexts` is the `context_fn` to give
such a checkpoint: called when the checkpointed forward runs, it captures the route of that
moment and puts it back around the recompute, so the recomputed forward routes every row as
the first one did.

Memory: S slots cost S * r_max * sum(in + out) over the targeted Linears, so the tensors grow
on demand: room for 4 slots at first, doubled (up to S) when a higher slot is loaded, and
r_max starts at `rank`: an adapter of a larger rank (up to `max_rank`) grows every slot
tensor once (to the larger of its rank and twice r_max), copying what is loaded (a
reallocation, not module surgery); past `max_rank` it is refused. State keys and shapes are peft's saved-adapter format
(`base_model.model.<module>.lora_A.weight` [r, in], `...lora_B.weight` [out, r]); a shape
that does not fit the base model is refused naming the module, before anything is copied.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openrl.bus.errors import InvalidRequest

BASE = -1  # the slot index of "no adapter"
DENSE_MAX_WORK_CPU = 1 << 24  # LoraSlots.dense_max_work on CPU
FORMS = ("auto", "grouped", "dense")  # LoraSlots.set_form
PREFIX = "base_model.model."  # peft's saved-adapter key prefix


@dataclass
class Dense:
    """A decode route over slots [0, k): one pair of matmuls for every row, whatever slots the
    rows use. `mask` [rows, k * r_max] holds, on each row's own slot's block of r_max columns, that
    slot's scale, and 0 elsewhere (a base row: all 0)."""

    k: int
    mask: torch.Tensor


@dataclass
class Segment:
    """A group of a batch's rows (`rows`: their indices along dim 0, or None for all rows) and
    the adapter they go through: `weights(module_name)` -> (A [r, in], B [out, r], scale) or
    None where that adapter does not target the module."""

    rows: torch.Tensor | None
    weights: object  # Callable[[str], tuple[Tensor, Tensor, float] | None]


def block_mask(row_block: torch.Tensor, blocks: tuple[tuple[int, int, float], ...], dtype, device) -> torch.Tensor:
    """[rows, sum of widths]: the columns of each row's own block hold that block's scale, the
    rest 0 (a row whose block is not among `blocks`, e.g. BASE: all 0). `row_block`: each row's
    block id; `blocks`: (block id, width, scale), in column order."""
    col_block = torch.cat([torch.full((w,), b, dtype=torch.long) for b, w, _ in blocks]).to(device)
    col_scale = torch.cat([torch.full((w,), scale, dtype=dtype) for _, w, scale in blocks]).to(device)
    return (row_block.to(device)[:, None] == col_block[None, :]).to(dtype) * col_scale[None, :]


class SlotLinear(torch.nn.Module):
    """A Linear plus the slots' LoRA terms for the rows of the current route."""

    def __init__(self, base: torch.nn.Linear, name: str, owner: LoraSlots):
        super().__init__()
        self.base = base
        self.name = name
        self._owner = [owner]  # a list: not a submodule (the owner is not a Module)
        S, r = owner.allocated, owner.rank
        dev, dtype = base.weight.device, base.weight.dtype
        self.register_buffer("A", torch.zeros((S, r, base.in_features), device=dev, dtype=dtype), persistent=False)
        # B transposed, [S, r, out]: the decode route reads B[:k] as one contiguous [k * r, out].
        self.register_buffer("Bt", torch.zeros((S, r, base.out_features), device=dev, dtype=dtype), persistent=False)
        self.on = [False] * S  # which slots' adapters target this module

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads a Linear's weight (tied embeddings, dtype probes)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        owner = self._owner[0]
        dense = owner.dense
        if (
            dense is not None and x.dim() == 3 and x.shape[0] == dense.mask.shape[0] and x.shape[1] <= owner.dense_max_tokens
            and owner.affordable(x.shape[0] * x.shape[1], dense.mask.shape[1], self)
        ):  # fmt: skip
            # Every row against the A of slots [0, k) at once, masked to its own slot's block
            # (scaled), then through those slots' B at once: 4 ops, not 6 per slot present.
            k, r = dense.k, self.A.shape[1]
            h = F.linear(x.to(self.A.dtype), self.A[:k].reshape(k * r, self.A.shape[2]))
            h.mul_(dense.mask.unsqueeze(1))
            y.add_(torch.matmul(h, self.Bt[:k].reshape(k * r, self.Bt.shape[2])).to(y.dtype))
            return y
        segments = owner.segments
        if not segments:
            return y
        if owner.dense_segments is not False and len(segments) >= 2 and x.dim() == 3:
            out = self._segments_dense(x, y, segments, forced=owner.dense_segments is True)
            if out is not None:
                return out
        for seg in segments:
            w = seg.weights(self.name)
            if w is None:
                continue
            a, b, scale = w
            xs = x if seg.rows is None else x.index_select(0, seg.rows)
            delta = F.linear(F.linear(xs.to(a.dtype), a), b) * scale
            # In place: the base output is fresh, and autograd keeps no Linear output for backward.
            if seg.rows is None:
                y.add_(delta)
            else:
                y.index_add_(0, seg.rows, delta.to(y.dtype))
        return y

    def _segments_dense(self, x: torch.Tensor, y: torch.Tensor, segments: list[Segment], forced: bool) -> torch.Tensor | None:
        """The segments' terms in one pass (`LoraSlots.dense_segments`): the A of every segment
        that targets this module concatenated (autograd routes each block's gradient back to its
        own tensor), every row against all of them, masked to its own segment's block (scaled),
        then through the concatenated B: 5 ops where grouping runs 6 per segment, at the sum of
        the segments' ranks in arithmetic per row. None (not done) when not `forced` and that
        arithmetic is over `dense_max_work`."""
        present = [(i, w) for i, w in ((i, seg.weights(self.name)) for i, seg in enumerate(segments)) if w is not None]
        if not present:
            return y
        if not forced and not self._owner[0].affordable(x.shape[0] * x.shape[1], sum(w[0].shape[0] for _, w in present), self):
            return None
        a = torch.cat([w[0] for _, w in present])  # [sum r, in]
        b = torch.cat([w[1] for _, w in present], dim=1)  # [out, sum r]
        mask = self._owner[0].segment_mask(tuple((i, w[0].shape[0], w[2]) for i, w in present), x.shape[0], a.dtype, x.device)
        h = F.linear(x.to(a.dtype), a) * mask.unsqueeze(1)
        return y.add_(F.linear(h, b).to(y.dtype))

    def grow(self, slots: int, rank: int) -> None:
        """Room for `slots` slots of `rank`, zero-padded (loaded adapters keep their values)."""
        S, r = self.A.shape[0], self.A.shape[1]
        A = self.A.new_zeros((slots, rank, self.A.shape[2]))
        Bt = self.Bt.new_zeros((slots, rank, self.Bt.shape[2]))
        A[:S, :r], Bt[:S, :r] = self.A, self.Bt
        self.A, self.Bt = A, Bt
        self.on += [False] * (slots - S)


class LoraSlots:
    """S LoRA slots on `model`'s Linear layers. Not thread-safe: one compute thread."""

    def __init__(self, model: torch.nn.Module, *, num_slots: int, rank: int = 32, max_rank: int = 256):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be in [1, {max_rank}], got {rank}")
        self.model = model
        self.num_slots = num_slots
        self.allocated = min(num_slots, 4)  # slots with memory so far: grows (doubling) as slots are used
        self.rank = rank
        self.max_rank = max_rank
        self.layers: dict[str, SlotLinear] = {}  # module name -> its wrapper (wrapped once, on first use)
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.ranks = [0] * num_slots  # 0: free (or empty)
        self.scales = [0.0] * num_slots
        self.segments: list[Segment] = []  # the current forward's routing
        self.dense: Dense | None = None  # ... or, for short inputs of several slots, the one-pass form
        # Inputs of up to this many positions per row take the dense route when several slots
        # are present (decode steps: bound by the number of ops, not by arithmetic); longer ones
        # (prefill) are grouped by slot, where the dense form's k-fold LoRA arithmetic would cost.
        self.dense_max_tokens = 1
        # ... and, where arithmetic is dear (CPU), when its extra multiply-adds in a layer, rows x
        # k x r_max x (in + out), are at most this many (bench/lora_slots.py --only-forward: on
        # one CPU thread it wins on the default model's and the tiny Llama's widths, 7.7 M here,
        # and loses on a 1024-wide model, 41 M). On a GPU a decode step is bound by memory and
        # kernel launches, not arithmetic: no limit (None).
        self.dense_max_work: int | None = None
        # route_segments (the trainer's shared passes): all segments of a layer in one pass, not
        # a matmul pair each. None: where its extra arithmetic, tokens x the ranks' sum x (in +
        # out), is within dense_max_work (on CPU; always on a GPU); True: always; False: never.
        # bench/gpu_check.py's tenants part measures both forms on a GPU.
        self.dense_segments: bool | None = None
        self.set_form("auto")
        self._masks: dict = {}  # segment_mask's, for the current route

    def set_form(self, form: str) -> None:
        """How several adapters' LoRA terms run (the three settings above): "auto" (the dense
        forms where they are cheap), "grouped" (never dense) or "dense" (no arithmetic limit)."""
        if form not in FORMS:
            raise ValueError(f"LoRA form must be one of {', '.join(FORMS)}, got {form!r}")
        self.dense_max_tokens = 0 if form == "grouped" else 1
        self.dense_segments = False if form == "grouped" else None
        self.dense_max_work = DENSE_MAX_WORK_CPU if form == "auto" and self._device().type == "cpu" else None

    def affordable(self, tokens: int, width: int, layer: SlotLinear) -> bool:
        """Whether a dense form's LoRA arithmetic in `layer`, `tokens` x `width` (the blocks'
        columns) x (in + out) multiply-adds, is within dense_max_work."""
        limit = self.dense_max_work
        return limit is None or tokens * width * (layer.in_features + layer.out_features) <= limit

    # -- loading

    def check(self, state: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's (A, B) per module name, every shape and value checked against the base
        model: InvalidRequest naming the module otherwise. Touches nothing."""
        if not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise InvalidRequest(f"lora rank must be in [1, {self.max_rank}] on this model's slots, got {rank}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            head, _, kind = key.rpartition(".lora_")
            if not key.startswith(PREFIX) or kind not in ("A.weight", "B.weight"):
                raise InvalidRequest(f"adapter tensor {key!r} is not a peft LoRA weight (base_model.model.<module>.lora_A/B.weight)")
            pairs.setdefault(head.removeprefix(PREFIX), {})[kind[0]] = t
        if not pairs:
            raise InvalidRequest("adapter has no LoRA tensors")
        out = {}
        for module, ab in sorted(pairs.items()):
            linear = self.linears.get(module)
            if linear is None:
                raise InvalidRequest(f"adapter module {module!r} is not a Linear layer of the base model")
            if set(ab) != {"A", "B"}:
                raise InvalidRequest(f"adapter module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}.weight")
            a, b = ab["A"], ab["B"]
            want_a, want_b = (rank, linear.in_features), (linear.out_features, rank)
            if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise InvalidRequest(
                    f"adapter module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the "
                    f"base model's layer (expected {list(want_a)} and {list(want_b)} at rank {rank})"
                )
            if not (a.is_floating_point() and b.is_floating_point() and torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise InvalidRequest(f"adapter module {module!r}: values must be finite floating point")
            out[module] = (a, b)
        return out

    def load(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int, alpha: float) -> None:
        """Copy a checked adapter (`check`'s result) into `slot`, replacing what it held."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        if rank > self.rank or slot >= self.allocated:
            self._grow(
                min(self.num_slots, max(slot + 1, 2 * self.allocated)) if slot >= self.allocated else self.allocated,
                min(self.max_rank, max(rank, 2 * self.rank)) if rank > self.rank else self.rank,
            )
        for name in modules:
            if name not in self.layers:
                self._wrap(name)
        with torch.no_grad():
            for name, layer in self.layers.items():
                ab = modules.get(name)
                layer.on[slot] = ab is not None
                # The dense route reads every slot's whole block, so a module the adapter does
                # not target, and A's rows past `rank`, are zeros (B's are then never used).
                if ab is None:
                    layer.A[slot].zero_()
                    continue
                layer.A[slot, :rank].copy_(ab[0])
                layer.A[slot, rank:].zero_()
                layer.Bt[slot, :rank].copy_(ab[1].t())
        self.ranks[slot] = rank
        self.scales[slot] = alpha / rank

    def free(self, slot: int) -> None:
        """Mark `slot` empty (its tensors are overwritten by the next load)."""
        self.ranks[slot] = 0
        for layer in self.layers.values():
            layer.on[slot] = False

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """The adapter in `slot`, as a peft state (CPU copies)."""
        r = self.ranks[slot]
        out = {}
        for name, layer in self.layers.items():
            if layer.on[slot]:
                out[f"{PREFIX}{name}.lora_A.weight"] = layer.A[slot, :r].to("cpu", copy=True)
                out[f"{PREFIX}{name}.lora_B.weight"] = layer.Bt[slot, :r].t().to("cpu", copy=True).contiguous()
        return out

    def _wrap(self, name: str) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        layer = SlotLinear(self.linears[name], name, self)
        setattr(parent, child, layer)
        self.layers[name] = layer

    def _grow(self, slots: int, rank: int) -> None:
        for layer in self.layers.values():
            layer.grow(slots, rank)
        self.allocated, self.rank = slots, rank

    # -- routing

    @contextlib.contextmanager
    def route(self, slot_B: list[int]):
        """For the forwards inside: row b goes through slot `slot_B[b]` (BASE: the base model)."""
        device = self._device()
        by_slot: dict[int, list[int]] = {}
        for b, s in enumerate(slot_B):
            by_slot.setdefault(s, []).append(b)
        segments = []
        for s, rows in by_slot.items():
            if s == BASE:
                continue
            if not 0 <= s < self.num_slots or self.ranks[s] == 0:
                raise ValueError(f"slot {s} holds no adapter")
            index = None if len(rows) == len(slot_B) else torch.tensor(rows, device=device)
            segments.append(Segment(rows=index, weights=self._slot_weights(s)))
        dense = self._dense(slot_B, [s for s in by_slot if s != BASE]) if len(segments) >= 2 and self.layers else None
        with self.route_segments(segments):
            self.dense = dense
            yield

    @contextlib.contextmanager
    def route_segments(self, segments: list[Segment]):
        """For the forwards inside: each segment's rows through its own weights."""
        if self.segments:
            raise RuntimeError("LoraSlots routes do not nest")
        self.segments, self._masks = segments, {}
        try:
            yield
        finally:
            self.segments, self.dense, self._masks = [], None, {}

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint's `context_fn` (non-reentrant): nothing around the forward,
        and around its recompute in the backward pass the route that was set when the forward
        ran (captured now). The route is a plain attribute, not thread-local: on CUDA the
        recompute runs in autograd's device thread while the caller waits in backward."""
        return contextlib.nullcontext(), self._replay(self.segments, self.dense, self._masks)

    @contextlib.contextmanager
    def _replay(self, segments: list[Segment], dense: Dense | None, masks: dict):
        before = self.segments, self.dense, self._masks
        self.segments, self.dense, self._masks = segments, dense, masks
        try:
            yield
        finally:
            self.segments, self.dense, self._masks = before

    def segment_mask(self, blocks: tuple[tuple[int, int, float], ...], rows: int, dtype, device) -> torch.Tensor:
        """[rows, sum of ranks]: each row's own segment's block of columns holds that segment's
        scale, the rest 0. `blocks`: (segment index, rank, scale) of the segments that target a
        module, in order. Made once per route and set of blocks (every layer of the usual
        all-targets tenants shares one)."""
        key = (blocks, rows, dtype, device)
        mask = self._masks.get(key)
        if mask is None:  # built where the rows' indices are, so a GPU is not synchronised for it
            row_seg = torch.full((rows,), -1, dtype=torch.long, device=device)
            for i, seg in enumerate(self.segments):
                row_seg[slice(None) if seg.rows is None else seg.rows.to(device)] = i
            mask = self._masks[key] = block_mask(row_seg, blocks, dtype, device)
        return mask

    def _device(self) -> torch.device:
        return next((m.weight.device for m in self.linears.values()), torch.device("cpu"))

    def _dense(self, slot_B: list[int], present: list[int]) -> Dense | None:
        """The dense form of a route whose rows use the slots `present`: over slots [0, k), k =
        the highest present + 1, when the slots below k that no row uses (computed, then masked
        out) are at most as many as those used; else None (grouped by slot)."""
        k = max(present) + 1
        if k > 2 * len(present):
            return None
        layer = next(iter(self.layers.values()))
        blocks = tuple((s, self.rank, self.scales[s]) for s in range(k))  # each slot's r_max columns
        return Dense(k=k, mask=block_mask(torch.tensor(slot_B), blocks, layer.A.dtype, layer.A.device))

    def _slot_weights(self, s: int):
        r, scale = self.ranks[s], self.scales[s]

        def weights(name: str):
            layer = self.layers[name]
            return (layer.A[s, :r], layer.Bt[s, :r].t(), scale) if layer.on[s] else None

        return weights

    def wrap(self, names: list[str]) -> None:
        """Wrap these modules now (the trainer's targets, before any tenant's weights)."""
        for name in names:
            if name not in self.layers:
                self._wrap(name)
