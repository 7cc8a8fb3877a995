"""The transformers engine's running KV cache: each layer's keys and values are a window onto a
buffer with free columns to its right, so a decode step writes its new column in place.

transformers' `DynamicLayer` concatenates on every `update`: each decode step copied every
layer's whole cache (rows x width), so a step's cost grew with the cache twice, once for
attention reading it and once for the copy. At 64 rows x 1,024 tokens of Qwen3-8B (about 9.7 GB
of bf16 KV) each step's copy moves twice the bytes its attention reads (arithmetic, not a GPU
measurement; bench/kv_cache.py measures it on CPU against a copy per step).

`RoomLayer` keeps a buffer `[rows, heads, capacity, dim]` and shows `keys`/`values` as the view
`[:, :, start:end]`. `update` writes into `[end:end + n]` while there is room, and only then
copies the window into a new buffer (room: half the width, at least `MIN_ROOM` columns, never
past `horizon`, the widest the window can get: its rows' prompt + max_tokens), so a row's
whole generation costs a few copies, not one per token. Cutting leading columns (the
scheduler's `_trim`) is a view of the same buffer and keeps the room; `batch_select_indices`
(rows leaving) copies the window and its room once, as the plain layer copied the window.
Columns the window shows are always written (tokens, or zeros as left padding), so a masked
column never holds a NaN that attention could pick up.

Anything that replaces `keys`/`values` with a tensor that is not such a view (transformers'
own `crop`, `batch_repeat_interleave`) is still correct: the next `update` copies it into a
new buffer with room.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_ROOM = 16  # columns


class RoomLayer(DynamicLayer):
    def __init__(self, horizon: int):
        super().__init__()
        self.horizon = horizon  # the window never gets wider than this: the room stops there
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    @classmethod
    def joined(cls, layers: list[DynamicLayer], width: int, horizon: int) -> RoomLayer:
        """The rows of `layers` in order, each left-padded to `width` columns (one copy of each)."""
        layer = cls(horizon)
        layer.device, layer.is_initialized = layers[0].keys.device, True
        layer._place([x.keys for x in layers], [x.values for x in layers], width, need=width)
        return layer

    def _place(self, keys: list[torch.Tensor], values: list[torch.Tensor], width: int, need: int) -> None:
        """New buffers holding `keys`/`values` stacked by rows, right-aligned to `width` columns
        (zeros before), with room for `need` columns or more."""
        cap = max(need, min(self.horizon, need + max(MIN_ROOM, need // 2)))
        rows = sum(k.shape[0] for k in keys)
        shape = (rows, keys[0].shape[1], cap, keys[0].shape[3])
        self._k, self._v = keys[0].new_zeros(shape), values[0].new_zeros(shape)
        at = 0
        for k, v in zip(keys, values, strict=True):
            self._k[at : at + k.shape[0], :, width - k.shape[2] : width] = k
            self._v[at : at + k.shape[0], :, width - v.shape[2] : width] = v
            at += k.shape[0]
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    def _start(self) -> int | None:
        """Where the window starts in the buffer, or None if keys/values are not its window."""
        for view, buf in ((self.keys, self._k), (self.values, self._v)):
            if (
                buf is None
                or view.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
                or (view.shape[0], view.shape[1], view.shape[3]) != (buf.shape[0], buf.shape[1], buf.shape[3])
                or view.stride() != buf.stride()
            ):
                return None
        start, rest = divmod(self.keys.storage_offset() - self._k.storage_offset(), self._k.stride(2))
        same = self.values.storage_offset() - self._v.storage_offset() == start * self._v.stride(2)
        return start if rest == 0 and same else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, width = key_states.shape[-2], self.keys.shape[-2]
        start = self._start()
        if start is None or start + width + n > self._k.shape[2]:
            self._place([self.keys], [self.values], width, need=width + n)
            start = 0
        end = start + width
        self._k[:, :, end : end + n] = key_states
        self._v[:, :, end : end + n] = value_states
        self.keys, self.values = self._k[:, :, start : end + n], self._v[:, :, start : end + n]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`: the window and its room, copied once."""
        start, width = self._start(), self.keys.shape[-2]
        if start is None:
            super().batch_select_indices(indices)
            return
        self._k = self._k[:, :, start:].index_select(0, indices)
        self._v = self._v[:, :, start:].index_select(0, indices)
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    @property
    def capacity(self) -> int:
        """Columns in the buffer (the window plus its room, plus cut columns before it)."""
        return 0 if self._k is None else self._k.shape[2]
