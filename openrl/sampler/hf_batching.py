"""Continuous batching for the transformers engine: a `Scheduler` over one `TransformersSampler`
(hf_model.py), and the per-row state of a running batch (`Rows`, `Outputs`). One thread only."""

from __future__ import annotations

import dataclasses
import secrets
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from openrl.bus.errors import InvalidRequest
from openrl.fair import FairShare
from openrl.sampler.hf_cache import RoomLayer
from openrl.sampler.sampling import pick, top_logprobs
from openrl.sampler.spec import SampledSequence, SampleResult, SampleSpec

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# While other keys have work, a key's rows in the decode are held to max(this, max_batch_rows /
# keys with work): decode cost grows with rows, so one key's 128-sequence requests would slow
# every other key's steps. Also the least rows a slice of a request is admitted with (each slice
# prefills its prompt again), unless the request has fewer left. docs/limits.md.
MIN_SHARE_ROWS = 16
# A key alone leaves this many rows free (when the batch has at least 4 x as many): rows running
# are never preempted, so without them another key's request arriving while one key filled the
# batch waited for that key's rows to finish (up to its max_tokens of steps); with them it joins
# at the next step, and the share rule above takes over. docs/limits.md.
RESERVE_ROWS = MIN_SHARE_ROWS


def key_share(cap: int, keys: int, least: int = MIN_SHARE_ROWS, reserve: int = RESERVE_ROWS) -> int:
    """The rows one key may hold of `cap` while `keys` keys (it too) have work: a key alone all
    but `reserve` (when `cap` is at least 4 x `reserve`), else max(`least`, cap / keys), at most cap."""
    if keys <= 1:
        return cap - reserve if cap >= 4 * reserve else cap
    return min(cap, max(least, cap // keys))


@dataclass
class Rows:
    """Per-row sampling parameters of a batch, as device tensors (B rows)."""

    temperature: torch.Tensor  # float32, 1.0 for greedy rows
    greedy: torch.Tensor  # bool
    top_k: torch.Tensor  # int64, vocab size when off
    top_p: torch.Tensor  # float32
    stop_ids: torch.Tensor  # int64 [B, S], -1 padding
    max_tokens: torch.Tensor  # int64
    u: torch.Tensor  # float32 [B, T] uniforms, one per step
    any_random: bool
    any_filter: bool

    def select(self, idx: torch.Tensor) -> Rows:
        picked = {k: v[idx] if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return Rows(**picked)

    @staticmethod
    def cat(a: Rows, b: Rows) -> Rows:
        """The rows of `a` then those of `b` (stop ids padded with -1, uniforms with zeros)."""
        stops, horizon = max(a.stop_ids.shape[1], b.stop_ids.shape[1]), max(a.u.shape[1], b.u.shape[1])
        return Rows(
            temperature=torch.cat([a.temperature, b.temperature]),
            greedy=torch.cat([a.greedy, b.greedy]),
            top_k=torch.cat([a.top_k, b.top_k]),
            top_p=torch.cat([a.top_p, b.top_p]),
            stop_ids=torch.cat([_pad_right(a.stop_ids, 1, stops, -1), _pad_right(b.stop_ids, 1, stops, -1)]),
            max_tokens=torch.cat([a.max_tokens, b.max_tokens]),
            u=torch.cat([_pad_right(a.u, 1, horizon, 0.0), _pad_right(b.u, 1, horizon, 0.0)]),
            any_random=a.any_random or b.any_random,
            any_filter=a.any_filter or b.any_filter,
        )


@dataclass
class Outputs:
    """What the active rows generated so far: device buffers [b, T(, K)], row i = active row i.

    Token t of a row is written at column t; rows of different ages write different columns."""

    tokens_b_T: torch.Tensor
    logprobs_b_T: torch.Tensor
    top_tokens_b_T_K: torch.Tensor | None  # when some active row asked for top-k sampled logprobs
    top_logprobs_b_T_K: torch.Tensor | None

    @classmethod
    def empty(cls, rows: int, horizon: int, k: int, dev: torch.device) -> Outputs:
        def zeros(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=dev)

        return cls(
            tokens_b_T=zeros(rows, horizon, dtype=torch.int64),
            logprobs_b_T=zeros(rows, horizon, dtype=torch.float32),
            top_tokens_b_T_K=zeros(rows, horizon, k, dtype=torch.int64) if k else None,
            top_logprobs_b_T_K=zeros(rows, horizon, k, dtype=torch.float32) if k else None,
        )

    def record(self, t_b: torch.Tensor, token_b, logprob_b, logp_b_V) -> None:
        rows_b = torch.arange(len(t_b), device=t_b.device)
        self.tokens_b_T[rows_b, t_b] = token_b
        self.logprobs_b_T[rows_b, t_b] = logprob_b
        if self.top_tokens_b_T_K is not None:
            k = self.top_tokens_b_T_K.shape[-1]
            self.top_tokens_b_T_K[rows_b, t_b], self.top_logprobs_b_T_K[rows_b, t_b] = top_logprobs(logp_b_V, k)

    def select(self, idx: torch.Tensor) -> Outputs:
        return Outputs(*(None if v is None else v[idx] for v in self._fields()))

    def _fields(self) -> tuple:
        return (self.tokens_b_T, self.logprobs_b_T, self.top_tokens_b_T_K, self.top_logprobs_b_T_K)

    @staticmethod
    def cat(a: Outputs, b: Outputs) -> Outputs:
        horizon = max(a.tokens_b_T.shape[1], b.tokens_b_T.shape[1])
        k = max(0 if x.top_tokens_b_T_K is None else x.top_tokens_b_T_K.shape[2] for x in (a, b))
        dev = a.tokens_b_T.device

        def grown(x: Outputs) -> list:
            rows = x.tokens_b_T.shape[0]
            fields = [_pad_right(x.tokens_b_T, 1, horizon, 0), _pad_right(x.logprobs_b_T, 1, horizon, 0.0)]
            if k:
                if x.top_tokens_b_T_K is None:
                    fields += [
                        torch.zeros((rows, horizon, k), dtype=torch.int64, device=dev),
                        torch.zeros((rows, horizon, k), dtype=torch.float32, device=dev),
                    ]
                else:
                    fields += [
                        _pad_right(_pad_right(x.top_tokens_b_T_K, 1, horizon, 0), 2, k, 0),
                        _pad_right(_pad_right(x.top_logprobs_b_T_K, 1, horizon, 0.0), 2, k, 0.0),
                    ]
            else:
                fields += [None, None]
            return fields

        return Outputs(*(None if x is None else torch.cat([x, y]) for x, y in zip(grown(a), grown(b), strict=True)))


# ---------------------------------------------------------------------- continuous batching


@dataclass
class _Request:
    spec_id: object
    spec: SampleSpec
    seed: int
    name: str  # peft adapter name, BASE for the base model
    result: SampleResult | None = None  # prompt statistics, once prefilled; sequences when finished
    sequences: list[SampledSequence | None] = field(default_factory=list)
    left: int = 0  # rows still generating or waiting (set when its first slice is admitted)
    admitted: int = 0  # samples admitted so far: 0 .. admitted-1 (it waits while < num_samples)
    number: int = -1  # its admission number, once its first slice is admitted


class Scheduler:
    """Continuous batching over one `TransformersSampler`: requests join a running decode
    between steps, and leave it as soon as their rows have stopped. One thread only.

        scheduler = Scheduler(sampler)
        scheduler.add("a", spec_a)               # validated now; prefilled by the next step
        finished = scheduler.step()              # [(spec_id, SampleResult | InvalidRequest)]
        scheduler.add("b", spec_b)               # joins the running decode at the next step

    `add` validates a request (an invalid one comes back from the next `step` as its
    InvalidRequest, touching nothing) and queues it. `step` first admits queued requests while
    the active rows stay within `max_batch_rows`, fairly between their owner keys
    (openrl/fair.py: the key that has been admitted the fewest tokens, num_samples x (prompt +
    max_tokens), goes first; in order within a key), and within each key's share of the rows:
    while other keys have requests running or waiting here, a key's active rows stay within
    max(`min_share_rows`, max_batch_rows / keys with work); a key alone may fill the batch but
    `reserve_rows` (16, when the batch has at least 4 x as many), kept for a request of another
    key arriving meanwhile, which joins at the next step. A key at its share is admitted nothing
    more until its rows finish (running rows are never preempted); the others' requests go
    meanwhile. A request is admitted in slices of its
    samples (at least `min_share_rows` rows each, or what it has left) when its share or the
    free rows are fewer than its samples; each slice prefills the prompt again (the first one's
    prompt statistics are the request's). Each admission: one left-padded prefill forward for
    the slices admitted (prompt statistics come from it), their KV cache repeated to their
    rows and merged into the running one. Then it draws one token for every active row and
    runs one forward (base and adapters mixed) for the rows that go on; it returns the
    requests whose last row stopped.

    The running cache has one common length W; each row's real tokens are its last columns
    (left padding masked out by the attention mask, positions counted per row), so rows of
    different prompt lengths and ages share every forward. Merging left-pads whichever of
    the two caches is shorter; when rows leave, the leading columns no active row needs are
    cut, and the rows that stay keep their places but for the last ones, which move into the
    places of the rows that left (`_fill_holes`). Its layers are `RoomLayer`s (hf_cache.py):
    a decode step writes its column into room kept to the right of the window, and a merge
    writes the new rows into room kept below the others, where transformers' own layer copied
    the whole cache for each. A
    row's tokens depend only on its own prompt, adapter and seed (uniforms drawn per row and
    step index), never on the rows around it, up to float noise in the logits.
    """

    def __init__(self, sampler):  # a TransformersSampler (hf_model.py imports this module)
        self.sampler = sampler
        self._waiting: deque[_Request] = deque()
        self.share = FairShare()  # between the owner keys of waiting requests
        self.min_share_rows = MIN_SHARE_ROWS
        self.reserve_rows = RESERVE_ROWS
        # The KV cache's room (hf_cache.py). Off: a copy of the cache per step and per join, as
        # transformers' own layer (kv_room), or per join and leave (kv_row_room): bench/kv_cache.py's baselines.
        self.kv_room = self.kv_row_room = True
        self._running: dict[int, _Request] = {}  # by admission number
        self._admitting: list[_Request] = []  # being prefilled and merged (for `abort` if that fails)
        self._done: list[tuple[object, SampleResult | InvalidRequest]] = []
        self._admitted = 0
        self._row_ids = 0  # a fresh id per row, for stop strings
        self._clear_rows()

    def _clear_rows(self) -> None:
        """Active-row state, row i of every field = active row i."""
        self._cache = None  # KV cache [b, heads, W, dim] per layer, each a RoomLayer (hf_cache.py)
        self._mask_b_W: torch.Tensor | None = None  # int64: 1 on the columns a row attends to
        self._logits_b_V: torch.Tensor | None = None  # the next token's logits
        self._pos_b: torch.Tensor | None = None  # the next token's position
        self._t_b: torch.Tensor | None = None  # tokens drawn so far (device copy of `_t`)
        self._params: Rows | None = None
        self._out: Outputs | None = None
        self._names: list[str] = []
        self._req = np.zeros(0, dtype=np.int64)  # admission number of the row's request
        self._sample = np.zeros(0, dtype=np.int64)  # the row's sample index in its request
        self._t = np.zeros(0, dtype=np.int64)
        self._plen = np.zeros(0, dtype=np.int64)  # prompt length
        self._last = np.zeros(0, dtype=np.int64)  # prompt length + max_tokens: the row's widest
        self._ids = np.zeros(0, dtype=np.int64)
        self._stops = StopStrings(self.sampler.tokenizer)

    @property
    def rows(self) -> int:
        """Active rows (sequences being generated)."""
        return len(self._req)

    @property
    def requests(self) -> int:
        """Requests added and not yet returned by `step`."""
        partly = sum(r.number in self._running for r in self._waiting)  # in both: some slices run
        return len(self._waiting) + len(self._running) - partly + len(self._done)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._done)

    def add(self, spec_id: object, spec: SampleSpec) -> None:
        """Validate `spec` and queue it; the next `step` admits it (or returns its error)."""
        sampler = self.sampler
        try:
            sampler.validate(spec)
        except InvalidRequest as e:
            self._done.append((spec_id, e))
            return
        name = BASE
        if spec.adapter is not None:
            sampler._adapters.move_to_end(spec.adapter)
            name = sampler._adapters[spec.adapter]
        sampler._pin(name)  # the adapter stays loaded until this request finishes
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        self._waiting.append(_Request(spec_id=spec_id, spec=spec, seed=seed, name=name))

    def step(self) -> list[tuple[object, SampleResult | InvalidRequest]]:
        """Admit what fits, advance every active row one token; the requests that finished."""
        with torch.inference_mode():
            self._admit()
            if self.rows:
                self._decode_step()
        done, self._done = self._done, []
        return done

    def abort(self) -> list[object]:
        """Drop every waiting and running request (after `step` raised: its state may be half
        updated) and return their spec_ids. Results already finished still come from `step`."""
        dropped = list({id(r): r for r in (*self._waiting, *self._admitting, *self._running.values())}.values())
        for request in dropped:
            self.sampler._unpin(request.name)
        self._waiting.clear()
        self._admitting = []
        self._running.clear()
        self._clear_rows()
        return [r.spec_id for r in dropped]

    def cancel(self, spec_id: object) -> bool:
        """Drop one request between steps (its caller stopped waiting): out of the queue, or its
        rows out of the running decode, their cache columns freed now; its adapter is unpinned.
        The other rows go on as they would have without it (a row's tokens depend only on its own
        prompt, adapter and seed). False if the request is not here (finished, or never added)."""
        waiting = next((r for r in self._waiting if r.spec_id == spec_id), None)
        if waiting is not None:  # not admitted, or some of its samples not yet
            self._waiting.remove(waiting)
        number = next((n for n, r in self._running.items() if r.spec_id == spec_id), None)
        if number is None:
            if waiting is None:
                return False
            self.sampler._unpin(waiting.name)
            return True
        request = self._running.pop(number)
        self.sampler._unpin(request.name)
        gone = self._req == number
        self._stops.drop(self._ids[gone])
        if gone.all():
            self._clear_rows()
            return True
        keep = _fill_holes(~gone)
        with torch.inference_mode():  # the cache's rows move in place, as in `step`
            keep_dev = torch.from_numpy(keep).to(self.sampler.device)
            logits_b_V = self._logits_b_V[keep_dev]  # between steps they are the next token's: kept
            self._select(keep, keep_dev)
            self._logits_b_V = logits_b_V
            self._trim(uncached=0)
        return True

    # -- admission

    def _admit(self) -> None:
        """Admit slices of waiting requests, fair order first, within the free rows and each
        key's share of them."""
        cap, rows, least = self.sampler.max_batch_rows, self.rows, self.min_share_rows
        owners = [self._running[n].spec.owner for n in self._req]
        held = Counter(owners)  # active rows by key
        keys = set(owners) | {r.spec.owner for r in self._waiting}
        share = key_share(cap, len(keys), least, self.reserve_rows)
        group: list[tuple[_Request, int, int]] = []  # (request, first sample, end)
        full: set[str] = set()  # keys at their share: their requests wait, the others' go
        while True:
            ready = [r for r in self._waiting if r.spec.owner not in full]
            if not ready:
                break
            request = ready[self.share.pick(ready, key=lambda r: r.spec.owner)]
            owner, left = request.spec.owner, request.spec.num_samples - request.admitted
            smallest = min(left, least, cap)  # the least slice worth a prefill
            if share - held[owner] < smallest:
                full.add(owner)
                continue
            if cap - rows < smallest and (rows or group):  # the fair next waits for room
                break
            take = min(left, share - held[owner], cap - rows)
            first = request.admitted
            request.admitted += take
            if request.admitted == request.spec.num_samples:
                self._waiting.remove(request)
            self.share.charge(owner, take * (len(request.spec.prompt) + request.spec.max_tokens))
            group.append((request, first, first + take))
            held[owner] += take
            rows += take
        if not group:
            return
        self._admitting = [request for request, _, _ in group]
        self._merge(group)
        self._admitting = []

    def _merge(self, group: list[tuple[_Request, int, int]]) -> None:
        """Prefill `group`'s slices (samples first..end-1 of each request) and merge their rows
        into the running batch."""
        sampler, dev = self.sampler, self.sampler.device
        specs = [_slice(r.spec, first, end) for r, first, end in group]
        requests = [r for r, _, _ in group]
        seeds = [r.seed for r in requests]
        results, last_R_V, cache, mask_R_L = sampler._prefill(specs, [r.name for r in requests], seeds)
        counts = [s.num_samples for s in specs]
        owner = np.repeat(np.arange(len(group)), counts)
        owner_dev = torch.from_numpy(owner).to(dev)
        if len(owner) != len(group):
            cache.batch_select_indices(owner_dev)  # each prompt's cache, copied to its samples' rows
        numbers = []
        for (request, first, _), result in zip(group, results, strict=True):
            if first == 0:  # its first slice: its prompt statistics, its place in the running requests
                request.result, request.sequences = result, [None] * request.spec.num_samples
                request.left, request.number = request.spec.num_samples, self._admitted
                self._running[self._admitted] = request
                self._admitted += 1
            numbers.append(request.number)
        lens = np.array([len(s.prompt) for s in specs], dtype=np.int64)
        ids = np.arange(self._row_ids, self._row_ids + len(owner))
        self._row_ids += len(owner)
        self._stops.add(ids, [specs[r].stop_strings for r in owner])
        new = dict(
            mask=mask_R_L[owner_dev],
            logits=last_R_V[owner_dev],
            pos=torch.from_numpy(lens).to(dev)[owner_dev],
            t=torch.zeros(len(owner), dtype=torch.int64, device=dev),
            params=sampler._rows(specs, seeds, firsts=[first for _, first, _ in group]),
            out=Outputs.empty(len(owner), max(s.max_tokens for s in specs), max(s.topk_sample_logprobs for s in specs), dev),
        )
        host = dict(
            req=np.array(numbers, dtype=np.int64)[owner],
            sample=np.concatenate([np.arange(first, end) for _, first, end in group]),
            t=np.zeros(len(owner), dtype=np.int64),
            plen=lens[owner],
            last=(lens + [s.max_tokens for s in specs])[owner],
            ids=ids,
        )
        names = [requests[r].name for r in owner]
        # The cache's room never goes past the widest window its rows can make (hf_cache.py).
        horizon = int(np.concatenate([self._last, host["last"]]).max()) if self.kv_room else 0
        for layer in cache.layers:
            _check_layer(layer)
        if self.rows == 0:
            max_rows = self.sampler.max_batch_rows if self.kv_room and self.kv_row_room else None
            cache.layers = [RoomLayer.joined([layer], layer.keys.shape[2], horizon, max_rows) for layer in cache.layers]
            self._cache = cache
            self._mask_b_W, self._logits_b_V, self._pos_b = new["mask"], new["logits"], new["pos"]
            self._t_b, self._params, self._out = new["t"], new["params"], new["out"]
            self._names = names
            self._req, self._sample, self._t, self._plen, self._last, self._ids = (
                host[k] for k in ("req", "sample", "t", "plen", "last", "ids")
            )
            return
        width = max(self._mask_b_W.shape[1], new["mask"].shape[1])
        layers = self._cache.layers
        for i, (old_layer, new_layer) in enumerate(zip(layers, cache.layers, strict=True)):
            layers[i] = old_layer.append(new_layer, width, horizon)  # in place where there is room
        self._mask_b_W = torch.cat([_pad_left(self._mask_b_W, 1, width), _pad_left(new["mask"], 1, width)])
        self._logits_b_V = torch.cat([self._logits_b_V, new["logits"].to(self._logits_b_V.dtype)])
        self._pos_b = torch.cat([self._pos_b, new["pos"]])
        self._t_b = torch.cat([self._t_b, new["t"]])
        self._params = Rows.cat(self._params, new["params"])
        self._out = Outputs.cat(self._out, new["out"])
        self._names = self._names + names
        self._req = np.concatenate([self._req, host["req"]])
        self._sample = np.concatenate([self._sample, host["sample"]])
        self._t = np.concatenate([self._t, host["t"]])
        self._plen = np.concatenate([self._plen, host["plen"]])
        self._last = np.concatenate([self._last, host["last"]])
        self._ids = np.concatenate([self._ids, host["ids"]])

    # -- decoding

    def _decode_step(self) -> None:
        dev, params = self.sampler.device, self._params
        u_b = params.u.gather(1, self._t_b[:, None])[:, 0]  # each row's uniform for its own step index
        token_b, logprob_b, logp_b_V = pick(self._logits_b_V, params, u_b)
        self._out.record(self._t_b, token_b, logprob_b, logp_b_V)
        hit_b = (params.stop_ids == token_b[:, None]).any(-1)
        full_b = params.max_tokens <= self._t_b + 1
        # The step's only device-to-host copy: which rows stopped (and tokens, for stop strings).
        flags = torch.stack([hit_b.long(), full_b.long(), token_b]).cpu().numpy()
        hit = flags[0].astype(bool) | self._stops.update(self._ids, flags[2])
        ended = hit | flags[1].astype(bool)
        self._t += 1
        self._t_b = self._t_b + 1
        if ended.any():
            self._finish(np.flatnonzero(ended), hit)
            if ended.all():
                self._clear_rows()
                return
            keep = _fill_holes(~ended)
            keep_dev = torch.from_numpy(keep).to(dev)
            self._select(keep, keep_dev)
            token_b = token_b[keep_dev]
            self._trim()
        mask_b_X = torch.cat([self._mask_b_W, torch.ones((self.rows, 1), dtype=self._mask_b_W.dtype, device=dev)], 1)
        logits_b_1_V, self._cache = self.sampler._forward(
            token_b[:, None], mask_b_X, self._pos_b[:, None], self._cache, self._names, keep_all=False
        )
        self._logits_b_V, self._mask_b_W, self._pos_b = logits_b_1_V[:, -1], mask_b_X, self._pos_b + 1

    def _finish(self, rows: np.ndarray, hit: np.ndarray) -> None:
        """Move the stopped rows' outputs to the CPU (one copy per buffer) into their requests."""
        rows_dev = torch.from_numpy(rows).to(self.sampler.device)
        out = self._out.select(rows_dev)
        tokens, logprobs = out.tokens_b_T.cpu().numpy(), out.logprobs_b_T.cpu().numpy()
        if out.top_tokens_b_T_K is not None:
            top_tokens, top_logprobs_ = out.top_tokens_b_T_K.cpu().numpy(), out.top_logprobs_b_T_K.cpu().numpy()
        for i, b in enumerate(rows):
            request = self._running[self._req[b]]
            n, k = self._t[b], request.spec.topk_sample_logprobs
            request.sequences[self._sample[b]] = SampledSequence(
                tokens=tokens[i, :n].astype(np.int32),
                logprobs=logprobs[i, :n].copy(),
                stop_reason="stop" if hit[b] else "length",
                topk_tokens=top_tokens[i, :n, :k].copy() if k else None,
                topk_logprobs=top_logprobs_[i, :n, :k].copy() if k else None,
            )
            request.left -= 1
            if request.left == 0:
                del self._running[self._req[b]]
                request.result.sequences = request.sequences
                self._done.append((request.spec_id, request.result))
                self.sampler._unpin(request.name)
        self._stops.drop(self._ids[rows])

    def _select(self, keep: np.ndarray, keep_dev: torch.Tensor) -> None:
        moved = torch.from_numpy(np.flatnonzero(keep != np.arange(len(keep)))).to(keep_dev.device)  # rows changing place
        src = keep_dev[moved]
        for layer in self._cache.layers:
            if self.kv_row_room:
                layer.keep_rows(keep_dev, moved, src)
            else:
                layer.batch_select_indices(keep_dev)
        self._mask_b_W, self._pos_b, self._t_b = self._mask_b_W[keep_dev], self._pos_b[keep_dev], self._t_b[keep_dev]
        self._logits_b_V = None  # the next forward replaces them
        self._params, self._out = self._params.select(keep_dev), self._out.select(keep_dev)
        self._names = [self._names[i] for i in keep]
        self._req, self._sample, self._t, self._plen, self._last, self._ids = (
            a[keep] for a in (self._req, self._sample, self._t, self._plen, self._last, self._ids)
        )

    def _trim(self, uncached: int = 1) -> None:
        """Cut the leading cache columns that no active row attends to (rows hold prompt + t -
        `uncached` tokens: within a step the newest token is not in the cache yet, between steps it is)."""
        cut = self._mask_b_W.shape[1] - int((self._plen + self._t - uncached).max())
        if cut <= 0:
            return
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]  # views: the room stays
        self._mask_b_W = self._mask_b_W[:, cut:]


class StopStrings:
    """Stop-string matching on the decoded generated text, for the rows (by row id) that have stop strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.strings: dict[int, list[str]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.window: dict[int, int] = {}

    def add(self, ids, strings_b: list[list[str]]) -> None:
        for b, strings in zip(ids, strings_b, strict=True):
            if strings:
                self.strings[int(b)], self.tokens[int(b)] = strings, []
                # A match ends in the newest token; decoding a window of the last few tokens (generous
                # for tokens that are byte fragments of one character) is enough to see it.
                self.window[int(b)] = 4 * max(map(len, strings)) + 8

    def drop(self, ids) -> None:
        for b in ids:
            for d in (self.strings, self.tokens, self.window):
                d.pop(int(b), None)

    def update(self, ids: np.ndarray, tokens_b: np.ndarray) -> np.ndarray:
        """Record each row's new token; True where a row's text now contains a stop string."""
        hit = np.zeros(len(ids), dtype=bool)
        if not self.strings:
            return hit
        for i, b in enumerate(ids):
            b = int(b)
            if b not in self.strings:
                continue
            toks = self.tokens[b]
            toks.append(int(tokens_b[i]))
            tail = self.tokenizer.decode(toks[-self.window[b] :], skip_special_tokens=False)
            hit[i] = any(s in tail for s in self.strings[b])
        return hit


# ---------------------------------------------------------------------- helpers


def _fill_holes(alive: np.ndarray) -> np.ndarray:
    """The rows to keep, in the order that moves fewest: the first k (k = rows kept) stay where
    they are if alive, and the alive rows past them move into the dead ones' places."""
    keep = np.flatnonzero(alive)
    order = np.arange(len(keep))
    order[~alive[: len(keep)]] = keep[keep >= len(keep)]
    return order


def _slice(spec: SampleSpec, first: int, end: int) -> SampleSpec:
    """What a slice of `spec`'s samples prefills and decodes: samples first..end-1; the prompt
    statistics with the first slice only."""
    if first == 0 and end == spec.num_samples:
        return spec
    if first == 0:
        return dataclasses.replace(spec, num_samples=end)
    return dataclasses.replace(spec, num_samples=end - first, prompt_logprobs=False, topk_prompt_logprobs=0,
                               target_prompt_logprobs=None, prompt_alt_tokens_k=0)  # fmt: skip


def _pad_left(x: torch.Tensor, dim: int, size: int, value=0) -> torch.Tensor:
    """`x` grown to `size` along `dim` with `value` cells in front."""
    n = size - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_full(shape, value), x], dim)


def _pad_right(x: torch.Tensor, dim: int, size: int, value=0) -> torch.Tensor:
    """`x` grown to `size` along `dim` with `value` cells after it."""
    n = size - x.shape[dim]
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x, x.new_full(shape, value)], dim)


def _check_layer(layer) -> None:
    """Merging and cutting caches edit the layers' key/value tensors: full-attention layers only.
    Checked on each prefill's cache, whose layers become the running cache's `RoomLayer`s."""
    if type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", True):
        raise NotImplementedError(f"continuous batching needs full-attention DynamicLayer caches, got {type(layer).__name__}")
